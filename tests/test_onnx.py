"""fastconv.onnx: every operator and attribute against onnxruntime, whole torch-exported CNNs,
gradients (finite differences, and fine-tuning against torch), export round trips, bad files."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip(
    "onnx", reason="fastconv.onnx reads and writes models with the onnx package"
)
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is the reference for the outputs")

from conftest import assert_close  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fastconv.onnx as fo  # noqa: E402
from fastconv import nn, optim  # noqa: E402
from fastconv.onnx.graph import Graph  # noqa: E402

RTOL = 1e-4  # relative to the largest magnitude of onnxruntime's output (float32)
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch exports the whole-model test cases")


# -- building small models ------------------------------------------------------------------------


def model_proto(nodes, inputs, outputs, initializers=(), opset=17):
    """inputs: {name: array}: graph inputs of those shapes/dtypes; initializers: {name: array};
    outputs: (name, element type[, rank]) (the checker wants a shape, its sizes may be unknown)."""
    graph = helper.make_graph(
        nodes,
        "test",
        [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in inputs.items()
        ],
        [
            helper.make_tensor_value_info(name, elem, [None] * (rank[0] if rank else 0))
            for name, elem, *rank in outputs
        ],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    return model


def onnxruntime_outputs(model_bytes: bytes, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own shape warnings are not failures here
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rand(rng, shape, positive=False):
    x = rng.standard_normal(shape).astype(np.float32)
    return np.abs(x) + 0.5 if positive else x


class Case:
    """One node: `inputs` maps input names to a shape tuple (a graph input), an array (an
    initializer) or None (an optional input left out)."""

    def __init__(
        self, op, inputs, attrs=None, opset=17, positive=(), out=FLOAT, grad=True, id=None
    ):
        self.op, self.inputs, self.attrs, self.opset = op, inputs, attrs or {}, opset
        self.positive, self.out, self.grad = positive, out, grad
        self.id = id or f"{op}-{opset}-" + ",".join(f"{k}={v}" for k, v in self.attrs.items())

    def build(self, seed=0):
        rng = np.random.default_rng(seed)
        feeds, inits, names = {}, {}, []
        for i, (name, value) in enumerate(self.inputs.items()):
            if value is None:
                names.append("")
            elif isinstance(value, tuple):
                feeds[name] = rand(rng, value, i in self.positive)
                names.append(name)
            else:
                inits[name] = value
                names.append(name)
        node = helper.make_node(self.op, names, ["y"], name="node", **self.attrs)
        proto = model_proto([node], feeds, [("y", self.out)], inits, self.opset)
        (y,) = onnxruntime_outputs(proto.SerializeToString(), feeds)  # for the output's rank
        proto = model_proto([node], feeds, [("y", self.out, y.ndim)], inits, self.opset)
        return proto.SerializeToString(), feeds


R = np.random.default_rng(123)
W = lambda *shape: rand(R, shape)  # noqa: E731  an initializer
P = lambda *shape: rand(R, shape, positive=True)  # noqa: E731
I64 = lambda *values: np.array(values, dtype=np.int64)  # noqa: E731

CASES = [
    # Conv: pads, auto_pad, strides, dilations, groups, bias or not, old opsets
    Case("Conv", {"x": (2, 3, 7, 6), "w": W(4, 3, 3, 3), "b": W(4)}, dict(pads=[1, 1, 1, 1])),
    Case("Conv", {"x": (2, 3, 7, 6), "w": W(4, 3, 3, 3)}, dict(strides=[2, 2], pads=[0, 1, 2, 1])),
    Case(
        "Conv",
        {"x": (1, 4, 8, 9), "w": W(6, 2, 3, 2), "b": W(6)},
        dict(dilations=[2, 1], group=2, strides=[1, 2], pads=[2, 0, 1, 1]),
    ),
    Case(
        "Conv", {"x": (2, 4, 6, 6), "w": W(4, 1, 3, 3), "b": W(4)}, dict(group=4, pads=[1, 1, 1, 1])
    ),
    Case(
        "Conv", {"x": (2, 3, 7, 8), "w": W(2, 3, 3, 3)}, dict(auto_pad="SAME_UPPER", strides=[2, 2])
    ),
    Case("Conv", {"x": (2, 3, 7, 8), "w": W(2, 3, 2, 4), "b": W(2)}, dict(auto_pad="SAME_LOWER")),
    Case("Conv", {"x": (2, 3, 7, 8), "w": W(2, 3, 3, 3)}, dict(auto_pad="VALID", strides=[2, 1])),
    Case(
        "Conv",
        {"x": (2, 3, 5, 5), "w": W(2, 3, 1, 3), "b": W(2)},
        dict(kernel_shape=[1, 3]),
        opset=9,
    ),
    Case(
        "Conv",
        {"x": (2, 3, 5, 5), "w": (2, 3, 3, 3), "b": (2,)},
        dict(pads=[1, 0, 1, 0]),
        opset=11,
        id="Conv-weight-and-bias-as-inputs",
    ),
    # MaxPool: strides (default 1), pads (symmetric, asymmetric), ceil_mode, dilations, auto_pad
    Case("MaxPool", {"x": (2, 3, 7, 7)}, dict(kernel_shape=[2, 2], strides=[2, 2])),
    Case("MaxPool", {"x": (2, 3, 7, 7)}, dict(kernel_shape=[3, 3])),
    Case(
        "MaxPool",
        {"x": (2, 3, 7, 8)},
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
    ),
    Case("MaxPool", {"x": (2, 3, 8, 7)}, dict(kernel_shape=[2, 3], strides=[2, 2], ceil_mode=1)),
    Case(
        "MaxPool",
        {"x": (2, 3, 9, 9)},
        dict(kernel_shape=[3, 2], strides=[1, 2], dilations=[2, 2], ceil_mode=1),
    ),
    Case(
        "MaxPool", {"x": (2, 3, 7, 8)}, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 2, 2, 1])
    ),
    Case(
        "MaxPool",
        {"x": (2, 3, 7, 8)},
        dict(kernel_shape=[3, 3], strides=[2, 3], pads=[2, 0, 1, 2], ceil_mode=1),
    ),
    Case(
        "MaxPool",
        {"x": (2, 3, 4, 5)},
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 2, 2], ceil_mode=1),
    ),
    Case(
        "MaxPool",
        {"x": (2, 3, 7, 8)},
        dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    ),
    Case(
        "MaxPool",
        {"x": (2, 3, 7, 8)},
        dict(kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_LOWER"),
    ),
    Case(
        "MaxPool", {"x": (2, 3, 7, 8)}, dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID")
    ),
    Case(
        "MaxPool",
        {"x": (2, 3, 8, 8)},
        dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID", ceil_mode=1),
    ),
    Case(
        "MaxPool",
        {"x": (2, 3, 6, 6)},
        dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]),
        opset=9,
    ),
    # AveragePool: count_include_pad x pads x ceil_mode, auto_pad
    *[
        Case(
            "AveragePool",
            {"x": (2, 3, 7, 8)},
            dict(
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=pads,
                count_include_pad=cip,
                ceil_mode=ceil,
            ),
        )
        for pads in ([1, 1, 1, 1], [0, 2, 2, 1], [1, 0, 0, 2])
        for cip in (0, 1)
        for ceil in (0, 1)
    ],
    Case(
        "AveragePool",
        {"x": (2, 3, 4, 5)},
        dict(
            kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 2, 2], count_include_pad=1, ceil_mode=1
        ),
    ),
    Case("AveragePool", {"x": (2, 3, 7, 8)}, dict(kernel_shape=[2, 3], strides=[2, 1])),
    Case(
        "AveragePool",
        {"x": (2, 3, 7, 8)},
        dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    ),
    Case(
        "AveragePool",
        {"x": (2, 3, 7, 8)},
        dict(kernel_shape=[2, 2], auto_pad="SAME_LOWER", count_include_pad=1),
    ),
    Case(
        "AveragePool",
        {"x": (2, 3, 6, 6)},
        dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]),
        opset=9,
    ),
    Case("GlobalAveragePool", {"x": (2, 3, 5, 4)}),
    Case("GlobalMaxPool", {"x": (2, 3, 5, 4)}),
    # activations
    Case("Relu", {"x": (2, 3, 4, 5)}),
    Case("LeakyRelu", {"x": (2, 3, 4, 5)}),
    Case("LeakyRelu", {"x": (2, 3, 4, 5)}, dict(alpha=0.2)),
    Case("Sigmoid", {"x": (2, 3, 4, 5)}),
    Case("Tanh", {"x": (2, 3, 4, 5)}),
    Case("Clip", {"x": (2, 3, 4, 5)}, dict(min=-0.5, max=0.7), opset=9),
    Case("Clip", {"x": (2, 3, 4, 5)}, dict(min=0.0), opset=10),
    Case("Clip", {"x": (2, 3, 4, 5), "min": np.float32(-0.5), "max": np.float32(0.6)}, opset=11),
    Case("Clip", {"x": (2, 3, 4, 5), "min": None, "max": np.float32(0.6)}, opset=13),
    Case("Clip", {"x": (2, 3, 4, 5), "min": np.float32(0.0), "max": np.float32(6.0)}, opset=17),
    # Gemm and MatMul
    Case("Gemm", {"a": (4, 6), "b": W(6, 5), "c": W(5)}),
    Case("Gemm", {"a": (4, 6), "b": W(5, 6), "c": W(1, 5)}, dict(transB=1, alpha=0.5, beta=2.0)),
    Case("Gemm", {"a": (6, 4), "b": W(6, 5), "c": W(4, 5)}, dict(transA=1)),
    Case("Gemm", {"a": (6, 4), "b": W(5, 6), "c": W(4, 1)}, dict(transA=1, transB=1, alpha=1.5)),
    Case("Gemm", {"a": (4, 6), "b": W(6, 5)}, opset=11),
    Case("Gemm", {"a": (4, 6), "b": W(6, 5), "c": np.float32(0.3)}, dict(beta=0.5), opset=9),
    Case("MatMul", {"a": (4, 6), "b": W(6, 5)}),
    Case("MatMul", {"a": (2, 4, 6), "b": W(6, 5)}),
    Case("MatMul", {"a": (2, 1, 4, 6), "b": (3, 6, 5)}),
    Case("MatMul", {"a": (6,), "b": W(6, 5)}),
    Case("MatMul", {"a": (2, 4, 6), "b": W(6)}),
    Case("MatMul", {"a": W(3, 4), "b": (2, 4, 5)}),
    # element-wise arithmetic, broadcasting both ways, initializer on either side
    *[
        Case(op, inputs, positive=(1,), id=f"{op}-{shapes}")
        for op in ("Add", "Sub", "Mul", "Div")
        for shapes, inputs in [
            ("same", {"a": (2, 3, 4), "b": (2, 3, 4)}),
            ("channel", {"a": (2, 3, 4, 5), "b": P(3, 1, 1)}),
            ("both-ways", {"a": (1, 3, 1, 5), "b": (2, 1, 4, 1)}),
            ("scalar", {"a": (2, 3), "b": P()}),
            ("left-initializer", {"a": W(3, 1), "b": (2, 3, 4)}),
        ]
    ],
    # shapes
    Case("Flatten", {"x": (2, 3, 4, 5)}),
    Case("Flatten", {"x": (2, 3, 4, 5)}, dict(axis=0)),
    Case("Flatten", {"x": (2, 3, 4, 5)}, dict(axis=3), opset=9),
    Case("Flatten", {"x": (2, 3, 4, 5)}, dict(axis=-2), opset=11),
    Case("Reshape", {"x": (2, 3, 4, 5), "shape": I64(0, -1)}),
    Case("Reshape", {"x": (2, 3, 4, 5), "shape": I64(2, 0, 5, 4)}, opset=9),
    Case("Reshape", {"x": (2, 3, 4, 5), "shape": I64(-1, 3, 20)}, dict(allowzero=1), opset=14),
    Case("Transpose", {"x": (2, 3, 4)}),
    Case("Transpose", {"x": (2, 3, 4, 5)}, dict(perm=[0, 2, 3, 1])),
    Case("Concat", {"a": (2, 3, 4), "b": (2, 1, 4), "c": W(2, 2, 4)}, dict(axis=1)),
    Case("Concat", {"a": (2, 3, 4), "b": (2, 3, 2)}, dict(axis=-1), opset=11),
    Case("Identity", {"x": (2, 3)}),
    Case("Squeeze", {"x": (2, 1, 3, 1)}, dict(axes=[1, 3]), opset=11),
    Case("Squeeze", {"x": (2, 1, 3, 1)}, dict(axes=[-1]), opset=12),
    Case("Squeeze", {"x": (2, 1, 3, 1), "axes": I64(1)}, opset=13),
    Case("Squeeze", {"x": (2, 1, 3, 1)}, opset=17),
    Case("Unsqueeze", {"x": (2, 3)}, dict(axes=[0, 3]), opset=9),
    Case("Unsqueeze", {"x": (2, 3), "axes": I64(-1, 1)}, opset=13),
    # normalisation, dropout, softmax
    Case(
        "BatchNormalization",
        {"x": (2, 3, 4, 5), "s": W(3), "b": W(3), "m": W(3), "v": P(3)},
        opset=9,
    ),
    Case(
        "BatchNormalization",
        {"x": (2, 3, 4, 5), "s": W(3), "b": W(3), "m": W(3), "v": P(3)},
        dict(epsilon=1e-3, momentum=0.8),
        opset=14,
    ),
    Case(
        "BatchNormalization",
        {"x": (4, 3), "s": W(3), "b": W(3), "m": W(3), "v": P(3)},
        dict(training_mode=0),
    ),
    Case("Dropout", {"x": (2, 3, 4)}, dict(ratio=0.3), opset=9),
    Case("Dropout", {"x": (2, 3, 4), "ratio": np.float32(0.2)}, opset=12),
    Case(
        "Dropout", {"x": (2, 3, 4), "ratio": np.float32(0.2), "training": np.bool_(False)}, opset=13
    ),
    *[
        Case(op, {"x": (2, 3, 4, 5)}, attrs, opset=opset)
        for op in ("Softmax", "LogSoftmax")
        for opset in (11, 13)
        for attrs in ({}, {"axis": 1}, {"axis": -1}, {"axis": 0})
    ],
    # the runtime shape arithmetic of torch's x.view(x.size(0), -1) with a dynamic batch
    Case("Shape", {"x": (2, 3, 4)}, out=INT64, grad=False),
    Case("Shape", {"x": (2, 3, 4, 5)}, dict(start=1, end=-1), opset=15, out=INT64, grad=False),
    Case("Gather", {"x": (3, 4, 5), "i": I64(2, 0, 2)}, dict(axis=1)),
    Case("Gather", {"x": (3, 4), "i": np.array([[0, 1], [-1, 0]], np.int64)}),
    # element-wise functions (positive inputs where the function needs them)
    *[
        Case(op, {"x": (2, 3, 4, 5)}, attrs, positive=positive, opset=opset)
        for op, attrs, positive, opset in [
            ("Neg", {}, (), 17),
            ("Abs", {}, (), 17),
            ("Sqrt", {}, (0,), 17),
            ("Exp", {}, (), 17),
            ("Log", {}, (0,), 17),
            ("Reciprocal", {}, (0,), 17),
            ("Elu", {}, (), 17),
            ("Elu", {"alpha": 0.5}, (), 9),
            ("Selu", {}, (), 17),
            ("Selu", {"alpha": 1.5, "gamma": 0.9}, (), 9),
            ("Softplus", {}, (), 17),
            ("Softsign", {}, (), 17),
            ("HardSigmoid", {}, (), 17),
            ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, (), 9),
            ("HardSwish", {}, (), 17),
        ]
    ],
    Case("Cast", {"x": (2, 3, 4)}, dict(to=TensorProto.DOUBLE), out=TensorProto.DOUBLE, grad=False),
    Case("Cast", {"x": (2, 3)}, dict(to=INT64), out=INT64, grad=False, opset=9),
    Case("PRelu", {"x": (2, 3, 4, 5), "slope": W(3, 1, 1)}),
    Case("PRelu", {"x": (2, 3, 4, 5), "slope": W(1)}, opset=9),
    Case("PRelu", {"x": (2, 3, 4, 5), "slope": (5,)}, id="PRelu-slope-as-input"),
    Case("Pow", {"a": (2, 3, 4), "b": np.float32(2.0)}, positive=(0,)),
    Case("Pow", {"a": (2, 3, 4), "b": (3, 1)}, positive=(0,), opset=9),
    Case("Pow", {"a": (2, 3, 4), "b": np.array(3, np.int64)}, positive=(0,), opset=15),
    *[
        Case(op, inputs, id=f"{op}-{len(inputs)}", opset=opset)
        for op in ("Sum", "Mean", "Max", "Min")
        for inputs, opset in [
            ({"a": (2, 3, 4)}, 17),
            ({"a": (2, 3, 4), "b": (3, 4), "c": W(1, 4)}, 17),
            ({"a": (2, 3, 1), "b": (1, 3, 4)}, 9),
        ]
    ],
    # Pad: the attribute (opset < 11) or inputs; constant, reflect, edge; negative pads crop
    Case("Pad", {"x": (2, 3, 4, 5)}, dict(pads=[0, 0, 1, 2, 0, 0, 2, 1], value=1.5), opset=9),
    Case("Pad", {"x": (2, 3, 4, 5)}, dict(pads=[0, 0, 2, 1, 0, 0, 1, 3], mode="reflect"), opset=9),
    Case("Pad", {"x": (2, 3, 4, 5)}, dict(pads=[0, 1, 2, 0, 0, 0, 1, 3], mode="edge"), opset=9),
    Case("Pad", {"x": (2, 3, 4, 5), "p": I64(0, 0, 1, 1, 0, 0, 1, 1), "v": np.float32(-2.0)}),
    Case("Pad", {"x": (2, 3, 4, 5), "p": I64(0, 0, 3, 1, 0, 0, 2, 4)}, dict(mode="reflect")),
    Case("Pad", {"x": (2, 3, 4, 5), "p": I64(0, 0, 2, -1, 0, 1, -2, 3)}, dict(mode="edge")),
    Case("Pad", {"x": (2, 3, 4, 5), "p": I64(0, -1, 2, 1, 0, 0, -1, 2)}, opset=13),
    Case("Pad", {"x": (2, 3, 4, 5), "p": I64(1, 2, 2, 0), "v": None, "axes": I64(2, -1)}, opset=18),
    # Slice: attributes (opset < 10) or inputs, negative indices and steps, ends past the end
    Case("Slice", {"x": (3, 4, 6)}, dict(starts=[1, -4], ends=[3, 100], axes=[1, 2]), opset=9),
    Case("Slice", {"x": (3, 4, 6), "s": I64(0, 1), "e": I64(2, 5)}, opset=10),
    Case(
        "Slice",
        {"x": (3, 4, 6), "s": I64(-1, 5), "e": I64(-100, 0), "a": I64(0, -1), "st": I64(-1, -2)},
    ),
    Case("Slice", {"x": (3, 4, 6), "s": I64(1), "e": I64(2**62), "a": I64(1), "st": I64(2)}),
    Case("Tile", {"x": (2, 3, 4), "r": I64(1, 2, 3)}),
    Case("Tile", {"x": (2, 3), "r": I64(3, 1)}, opset=9),
    Case("Expand", {"x": (3, 1), "s": I64(2, 1, 4)}),
    Case("Expand", {"x": (2, 3, 1), "s": I64(3, 1)}, opset=9),
    # normalisation across channels (LRN), per sample (InstanceNormalization), BatchNorm in 3-D
    Case("LRN", {"x": (2, 7, 3, 4)}, dict(size=5)),
    Case("LRN", {"x": (2, 6, 3, 4)}, dict(size=3, alpha=0.1, beta=0.6, bias=2.0), opset=9),
    Case("LRN", {"x": (1, 3, 5, 2)}, dict(size=3, alpha=0.5)),
    Case("InstanceNormalization", {"x": (2, 3, 4, 5), "s": W(3), "b": W(3)}),
    Case("InstanceNormalization", {"x": (2, 3, 6), "s": W(3), "b": W(3)}, dict(epsilon=0.1)),
    Case(
        "BatchNormalization",
        {"x": (2, 3, 6), "s": W(3), "b": W(3), "m": W(3), "v": P(3)},
        dict(epsilon=1e-3),
    ),
    # reductions: axes as an attribute or an input (ReduceSum from opset 13, the others from 18)
    *[
        Case(op, {"x": (2, 3, 4, 5)}, attrs, opset=opset)
        for op in ("ReduceSum", "ReduceMean", "ReduceMax")
        for attrs, opset in [
            ({"axes": [2, 3]}, 11),
            ({"axes": [1, -1], "keepdims": 0}, 11),
            ({}, 11),
            ({"keepdims": 0}, 13),
        ]
    ],
    Case("ReduceSum", {"x": (2, 3, 4, 5), "a": I64(1, 3)}, dict(keepdims=0), opset=13),
    Case("ReduceSum", {"x": (2, 3, 4)}, dict(noop_with_empty_axes=1), opset=13),
    Case("ReduceMean", {"x": (2, 3, 4, 5), "a": I64(-2, -1)}, opset=18),
    Case("ReduceMax", {"x": (2, 3, 4, 5), "a": I64(0)}, dict(keepdims=0), opset=18),
    # DepthToSpace (both orders) and SpaceToDepth: torch's PixelShuffle and PixelUnshuffle
    Case("DepthToSpace", {"x": (2, 8, 3, 4)}, dict(blocksize=2)),
    Case("DepthToSpace", {"x": (2, 18, 2, 3)}, dict(blocksize=3, mode="CRD")),
    Case("DepthToSpace", {"x": (2, 8, 3, 4)}, dict(blocksize=2), opset=9),
    Case("SpaceToDepth", {"x": (2, 3, 4, 6)}, dict(blocksize=2)),
    # ConvTranspose (fastconv.conv_transpose2d): strides, pads (asymmetric too), output_padding,
    # dilations, groups, 1-D
    Case(
        "ConvTranspose",
        {"x": (2, 3, 5, 4), "w": W(3, 4, 3, 3), "b": W(4)},
        dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    ),
    Case("ConvTranspose", {"x": (2, 3, 5, 4), "w": W(3, 2, 3, 2)}, dict(pads=[0, 1, 2, 0])),
    Case(
        "ConvTranspose",
        {"x": (1, 4, 5, 5), "w": W(4, 3, 3, 2), "b": W(6)},
        dict(dilations=[2, 1], group=2, strides=[1, 2], pads=[2, 0, 1, 1], output_padding=[0, 1]),
    ),
    Case(
        "ConvTranspose",
        {"x": (2, 3, 4, 4), "w": W(3, 1, 4, 4), "b": W(3)},
        dict(group=3, strides=[2, 2], pads=[1, 1, 1, 1]),
        opset=9,
    ),
    Case("ConvTranspose", {"x": (2, 2, 3, 4), "w": W(2, 3, 2, 2)}, dict(auto_pad="VALID")),
    Case(
        "ConvTranspose",
        {"x": (2, 3, 7), "w": W(3, 2, 3), "b": W(2)},
        dict(strides=[2], pads=[1, 0], output_padding=[1]),
    ),
    # 1-D Conv and pools, on the 2-D kernels with a height of 1
    Case("Conv", {"x": (2, 3, 9), "w": W(4, 3, 3), "b": W(4)}, dict(pads=[1, 2], strides=[2])),
    Case("Conv", {"x": (2, 4, 11), "w": W(6, 2, 3)}, dict(dilations=[2], group=2), opset=9),
    Case("Conv", {"x": (2, 3, 9), "w": W(2, 3, 4)}, dict(auto_pad="SAME_UPPER")),
    Case("MaxPool", {"x": (2, 3, 9)}, dict(kernel_shape=[3], strides=[2], pads=[1, 1])),
    Case("MaxPool", {"x": (2, 3, 10)}, dict(kernel_shape=[3], strides=[2], ceil_mode=1), opset=10),
    Case(
        "AveragePool",
        {"x": (2, 3, 9)},
        dict(kernel_shape=[3], strides=[2], pads=[1, 2], count_include_pad=1),
    ),
    Case("AveragePool", {"x": (2, 3, 9)}, dict(kernel_shape=[2], pads=[1, 0])),
]


def case_id(case):
    return case.id


NEWEST = onnx.defs.onnx_opset_version()
CASES_NEWEST = [
    Case(c.op, c.inputs, c.attrs, NEWEST, c.positive, c.out, id=f"{c.id}@{NEWEST}")
    for c in CASES
    if c.opset == 17
]


@pytest.mark.parametrize("case", CASES_NEWEST, ids=case_id)
def test_operator_parity_at_the_newest_opset(case):
    test_operator_parity_with_onnxruntime(case)


def test_constants_and_runtime_shape_arithmetic():
    """Constant nodes of every numeric kind, and torch's dynamic x.view(x.size(0), -1)."""
    C = helper.make_node
    nodes = [
        C("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
        C("Constant", [], ["axes"], value_ints=[0]),
        C("Constant", [], ["minus1"], value_ints=[-1]),
        C("Constant", [], ["scale"], value_float=0.5),
        C("Constant", [], ["shift"], value_floats=[1.0, 2.0, 3.0, 4.0]),
        C("Shape", ["x"], ["shape"]),
        C("Gather", ["shape", "zero"], ["batch"], axis=0),
        C("Unsqueeze", ["batch", "axes"], ["batch1"]),
        C("Concat", ["batch1", "minus1"], ["target"], axis=0),
        C("Reshape", ["x", "target"], ["flat"]),
        C("Mul", ["flat", "scale"], ["scaled"]),
        C("Reshape", ["scaled", "shape"], ["back"]),
        C("Transpose", ["back"], ["t"], perm=[0, 2, 3, 1]),
        C("Add", ["t", "shift"], ["y"]),
    ]
    feeds = {"x": rand(np.random.default_rng(0), (2, 4, 5, 3))}
    proto = model_proto(nodes, feeds, [("y", FLOAT, 4)], opset=13)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # a dynamic batch
    data = proto.SerializeToString()
    model = fo.load(data)
    assert_close(model(feeds["x"]), onnxruntime_outputs(data, feeds)[0], RTOL)
    x2 = rand(np.random.default_rng(1), (5, 4, 5, 3))  # the batch size is read at run time
    assert_close(model(x2), onnxruntime_outputs(data, {"x": x2})[0], RTOL)
    assert not list(model.named_parameters())  # Constant values are not trained


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_same_with_dilation_matches_torch(torch):
    """onnxruntime refuses dilations with auto_pad SAME_*; torch's padding='same' is SAME_UPPER."""
    w = W(2, 3, 2, 4)
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", dilations=[2, 1])
    x = rand(np.random.default_rng(0), (2, 3, 7, 8))
    model = fo.load(model_proto([node], {"x": x}, [("y", FLOAT, 4)], {"w": w}).SerializeToString())
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), padding="same", dilation=(2, 1)
    )
    assert_close(model(x), expected.numpy(), RTOL)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_operator_parity_with_onnxruntime(case):
    data, feeds = case.build()
    (expected,) = onnxruntime_outputs(data, feeds)
    model = fo.load(data)
    actual = model(*(feeds[i.name] for i in model.inputs))
    assert_close(actual, expected, RTOL, what=case.id)


@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool", "ConvTranspose"])
def test_random_window_geometries_match_onnxruntime(op):
    """Kernels, strides, dilations, asymmetric pads, ceil_mode, count_include_pad,
    output_padding at random."""
    rng = np.random.default_rng({"Conv": 0, "MaxPool": 1, "AveragePool": 2, "ConvTranspose": 3}[op])
    checked = 0
    for _ in range(60):
        k = [int(v) for v in rng.integers(1, 5, 2)]
        attrs = {"kernel_shape": k, "strides": [int(v) for v in rng.integers(1, 4, 2)]}
        attrs["pads"] = [int(rng.integers(0, k[i % 2])) for i in range(4)]
        if op != "AveragePool":
            attrs["dilations"] = [int(v) for v in rng.integers(1, 3, 2)]
        if op in ("MaxPool", "AveragePool"):
            attrs["ceil_mode"] = int(rng.integers(0, 2))
        if op == "AveragePool":
            attrs["count_include_pad"] = int(rng.integers(0, 2))
        span = [attrs.get("dilations", [1, 1])[i] * (k[i] - 1) + 1 for i in range(2)]
        size = tuple(int(s + rng.integers(0, 5)) for s in span)
        inputs = {"x": (2, 2, *size)}
        if op == "Conv":
            inputs["w"] = W(3, 2, *k)
        if op == "ConvTranspose":  # weight (C_in, C_out / group, kH, kW); onnxruntime's limit
            inputs["w"] = W(2, 3, *k)
            attrs["output_padding"] = [int(rng.integers(0, s)) for s in attrs["strides"]]
        case = Case(op, inputs, attrs)
        try:
            data, feeds = case.build(seed=checked)
        except Exception:  # a geometry onnxruntime refuses (e.g. an output of size 0)
            continue
        (expected,) = onnxruntime_outputs(data, feeds)
        assert_close(fo.load(data)(feeds["x"]), expected, RTOL, what=str(attrs))
        checked += 1
    assert checked >= 40


# -- gradients: finite differences through the graph, in float64 ----------------------------------


def central_differences(objective, array, positions, eps=1e-6):
    flat = array.reshape(-1)
    out = []
    for i in positions:
        saved = flat[i]
        flat[i] = saved + eps
        plus = objective()
        flat[i] = saved - eps
        minus = objective()
        flat[i] = saved
        out.append((plus - minus) / (2 * eps))
    return np.array(out)


@pytest.mark.parametrize("case", [c for c in CASES if c.grad], ids=case_id)
def test_gradients_match_finite_differences(case):
    data, feeds = case.build(seed=1)
    model = fo.load(data).to(np.float64)
    model.needs_input_grad = True
    xs = [feeds[i.name].astype(np.float64) for i in model.inputs]
    rng = np.random.default_rng(2)
    out = model(*xs)
    weights = rng.standard_normal(out.shape)
    model.zero_grad()
    grads = model.backward(weights)
    grads = grads if isinstance(grads, tuple) else (grads,)

    def objective():
        return float(np.sum(model(*xs) * weights))

    arrays = [(f"input {i.name}", x, g) for i, x, g in zip(model.inputs, xs, grads)]
    arrays += [(f"parameter {name}", p.data, p.grad) for name, p in model.named_parameters()]
    for what, array, grad in arrays:
        positions = rng.choice(array.size, min(array.size, 24), replace=False)
        expected = central_differences(objective, array, positions)
        actual = np.zeros(array.size) if grad is None else grad.reshape(-1)[positions]
        scale = max(np.abs(expected).max(), 1e-3)
        np.testing.assert_allclose(
            actual, expected, rtol=0, atol=1e-6 * scale, err_msg=f"{case.id}: {what}"
        )


def test_graph_with_branches_sums_gradients_of_shared_values():
    """y = relu(conv(x)) feeds both a residual Add and a Concat; x itself is used twice."""
    w = W(3, 3, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "x"], ["s"], name="residual"),
        helper.make_node("Mul", ["r", "s"], ["m"], name="mul"),
        helper.make_node("Concat", ["m", "r", "x"], ["y"], axis=1, name="cat"),
    ]
    feeds = {"x": rand(np.random.default_rng(3), (2, 3, 5, 5))}
    data = model_proto(nodes, feeds, [("y", FLOAT, 4)], {"w": w}).SerializeToString()
    (expected,) = onnxruntime_outputs(data, feeds)
    model = fo.load(data)
    assert_close(model(feeds["x"]), expected, RTOL)
    test = Case("Conv", {})  # reuse the finite-difference machinery on this graph
    test.build = lambda seed=0: (data, feeds)
    test.id = "branches"
    test_gradients_match_finite_differences(test)


@pytest.mark.parametrize(
    "opset, split",
    [(11, {"split": [1, 3, 2]}), (13, I64(2, 1, 3)), (13, None), (18, "num_outputs")],
)
def test_split_feeds_several_nodes_and_sums_no_gradient_for_an_unused_part(opset, split):
    """Split's outputs go to different nodes (one to none at all); forward against
    onnxruntime, backward against finite differences."""
    inputs, attrs, inits = ["x"], {"axis": 1}, {}
    if isinstance(split, dict):
        attrs.update(split)
    elif isinstance(split, str):
        attrs["num_outputs"] = 3
    elif split is not None:
        inputs.append("sizes")
        inits["sizes"] = split
    nodes = [
        helper.make_node("Split", inputs, ["a", "b", "c"], name="split", **attrs),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Concat", ["r", "a"], ["y"], axis=1, name="cat"),
    ]
    feeds = {"x": rand(np.random.default_rng(4), (2, 6, 3))}
    data = model_proto(nodes, feeds, [("y", FLOAT, 3)], inits, opset).SerializeToString()
    assert_close(fo.load(data)(feeds["x"]), onnxruntime_outputs(data, feeds)[0], RTOL)
    test = Case("Split", {})
    test.build = lambda seed=0: (data, feeds)
    test.id = f"split-{opset}"
    test_gradients_match_finite_differences(test)


def test_lrn_on_3d_input_and_pixel_shuffle_match_torch(torch):
    """onnxruntime runs LRN on 4-D input only; torch's local_response_norm takes (N, C, L)."""
    x = rand(np.random.default_rng(5), (2, 7, 6))
    node = helper.make_node("LRN", ["x"], ["y"], size=5, alpha=0.3, beta=0.7, bias=1.5)
    model = fo.load(model_proto([node], {"x": x}, [("y", FLOAT, 3)]).SerializeToString())
    expected = torch.nn.functional.local_response_norm(torch.from_numpy(x), 5, 0.3, 0.7, 1.5)
    assert_close(model(x), expected.numpy(), RTOL)
    x = rand(np.random.default_rng(6), (2, 12, 4, 6))
    for op, torch_op in (("DepthToSpace", "pixel_shuffle"), ("SpaceToDepth", "pixel_unshuffle")):
        attrs = {"blocksize": 2, **({"mode": "CRD"} if op == "DepthToSpace" else {})}
        node = helper.make_node(op, ["x"], ["y"], **attrs)
        model = fo.load(model_proto([node], {"x": x}, [("y", FLOAT, 4)]).SerializeToString())
        expected = getattr(torch.nn.functional, torch_op)(torch.from_numpy(x), 2)
        if op == "SpaceToDepth":  # ONNX puts the block offset before the channel, torch after
            expected = expected.reshape(2, 12, 4, 2, 3).transpose(1, 2).reshape(2, 48, 2, 3)
        assert_close(model(x), expected.numpy(), RTOL, what=op)


# -- whole models exported by torch ---------------------------------------------------------------


def torch_models(torch):
    tnn = torch.nn

    class LeNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = tnn.Conv2d(1, 6, 5, padding=2), tnn.Conv2d(6, 16, 5)
            self.fc1, self.fc2, self.fc3 = (
                tnn.Linear(400, 120),
                tnn.Linear(120, 84),
                tnn.Linear(84, 10),
            )

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = x.view(x.size(0), -1)
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    class Block(tnn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(c_out)
            self.conv2 = tnn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(c_out)
            self.shortcut = tnn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = tnn.Sequential(
                    tnn.Conv2d(c_in, c_out, 1, stride, bias=False), tnn.BatchNorm2d(c_out)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class ResNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.stem = tnn.Sequential(
                tnn.Conv2d(3, 8, 3, padding=1, bias=False), tnn.BatchNorm2d(8), tnn.ReLU()
            )
            self.layer1, self.layer2 = Block(8, 8, 1), Block(8, 16, 2)
            self.branch = tnn.Conv2d(16, 4, 1)
            self.fc = tnn.Linear(20, 10)

        def forward(self, x):
            x = self.layer2(self.layer1(self.stem(x)))
            x = torch.cat([x, torch.sigmoid(self.branch(x))], dim=1)  # a concatenated branch
            x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            return self.fc(torch.flatten(x, 1))

    def separable(c_in, c_out, stride):
        return [
            tnn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
            tnn.BatchNorm2d(c_in),
            tnn.ReLU6(),
            tnn.Conv2d(c_in, c_out, 1, bias=False),
            tnn.BatchNorm2d(c_out),
            tnn.ReLU6(),
        ]

    mobile = tnn.Sequential(
        tnn.Conv2d(3, 8, 3, 2, 1, bias=False),
        tnn.BatchNorm2d(8),
        tnn.ReLU6(),
        *separable(8, 16, 1),
        *separable(16, 32, 2),
        *separable(32, 32, 1),
        tnn.AdaptiveAvgPool2d(1),
        tnn.Flatten(),
        tnn.Dropout(0.2),
        tnn.Linear(32, 10),
    )
    decoder = tnn.Sequential(
        tnn.Conv2d(3, 8, 3, 2, 1),
        tnn.ReLU(),
        tnn.ConvTranspose2d(8, 4, 3, 2, 1, output_padding=1),
        tnn.ReLU(),
        tnn.ConvTranspose2d(4, 6, 3, 1, 2, groups=2, dilation=2, bias=False),
    )
    return {
        "decoder": (decoder, (3, 12, 12)),
        "lenet": (LeNet(), (1, 28, 28)),
        "resnet": (ResNet(), (3, 16, 16)),
        "mobilenet": (mobile, (3, 24, 24)),
    }


def randomise_batchnorm(torch, model, seed):
    """Non-trivial statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def export(torch, model, shape, opset=17, fold=True) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, *shape),),
            f,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            do_constant_folding=fold,
            # onnx.version_converter's adapters from opset 6 need every size known
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}} if opset > 6 else None,
        )
    return f.getvalue()


@pytest.mark.parametrize(
    "name, opset, fold",
    [
        ("lenet", 7, True),
        ("lenet", 9, True),
        ("lenet", 13, True),
        ("lenet", 17, False),
        ("resnet", 8, True),
        ("resnet", 11, True),
        ("resnet", 17, False),
        ("resnet", 6, False),
        ("mobilenet", 7, False),
        ("mobilenet", 12, True),
        ("mobilenet", 17, False),
        ("decoder", 9, True),
        ("decoder", 17, False),
    ],
)
def test_torch_exported_models_match_onnxruntime(torch, name, opset, fold):
    torch.manual_seed(0)
    model, shape = torch_models(torch)[name]
    model = randomise_batchnorm(torch, model, 1).eval()
    data = export(torch, model, shape, opset, fold)
    batch = 5 if opset > 6 else 2  # the export's batch size is fixed at opset 6
    x = np.random.default_rng(4).standard_normal((batch, *shape)).astype(np.float32)
    imported = fo.load(data)
    if opset >= 7:  # onnxruntime has no kernels for opset 6's BatchNormalization, Gemm...
        (expected,) = onnxruntime_outputs(data, {"input": x})
        assert_close(imported(x), expected, RTOL)
    with torch.no_grad():
        assert_close(imported(x), model(torch.from_numpy(x)).numpy(), RTOL)


@pytest.mark.parametrize("opset", [6, 7, 8])
def test_old_opsets_are_upgraded_by_the_onnx_version_converter(opset):
    """The same graph and weights at an old opset give onnxruntime's output at the current one
    (onnxruntime has no kernels for some opset-6 operators, e.g. Gemm-6)."""
    proto = onnx.load_from_string(small_model(opset=opset))
    assert proto.opset_import[0].version == opset and proto.ir_version == 3
    current = copy.deepcopy(proto)
    proto.graph.input.extend(  # IR 3 lists the initializers among the graph's inputs
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in proto.graph.initializer
    )
    current.opset_import[0].version, current.ir_version = 17, 8
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    (expected,) = onnxruntime_outputs(current.SerializeToString(), {"x": x})
    assert_close(fo.load(proto.SerializeToString())(x), expected, RTOL)


def test_an_old_opset_the_converter_cannot_upgrade_is_refused_naming_opset_and_node():
    """Upsample-6 has no height_scale/width_scale: onnx.version_converter's adapter refuses it."""
    node = helper.make_node(
        "Upsample", ["x"], ["y"], name="up1", scales=[1.0, 1.0, 2.0, 2.0], mode="nearest"
    )
    data = model_proto(
        [node], {"x": np.zeros((1, 1, 2, 2), np.float32)}, [("y", FLOAT, 4)], opset=6
    ).SerializeToString()
    with pytest.raises(ValueError, match=r"'up1' \(Upsample\).*opset 6 is older than 9.*convert"):
        fo.load(data)


def test_fine_tuning_an_imported_model_follows_torch(torch):
    """A few SGD steps on the imported ResNet (BatchNorm in its inference form, as the file
    describes it, so torch runs in eval mode) give torch's parameters, name by name."""
    torch.manual_seed(1)
    model, shape = torch_models(torch)["resnet"]
    model = randomise_batchnorm(torch, model, 2).eval()
    imported = fo.load(export(torch, model, shape, fold=False))  # keeps BatchNorm separate
    torch_params = dict(model.named_parameters())
    assert {name for name, _ in imported.named_parameters()} <= set(torch_params)
    assert len(list(imported.named_parameters())) == len(torch_params)  # tied copies untied

    rng = np.random.default_rng(5)
    t_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    f_opt = optim.SGD(imported.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    imported.train()
    for _ in range(3):
        x = rng.standard_normal((8, *shape)).astype(np.float32)
        y = rng.integers(0, 10, 8)
        t_opt.zero_grad()
        t_loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        t_loss.backward()
        t_opt.step()
        loss = criterion(imported(x), y)
        imported.zero_grad()
        assert imported.backward(criterion.backward()) is None
        f_opt.step()
        assert loss == pytest.approx(t_loss.item(), rel=1e-4)
    for name, param in imported.named_parameters():
        assert_close(param.data, torch_params[name].detach().numpy(), RTOL, what=name)


def test_fastconv_training_loop_fine_tunes_an_imported_model(torch):
    """fastconv.train.fit drives an imported graph like any fastconv model: the loss falls."""
    from fastconv.train import fit

    torch.manual_seed(2)
    model, shape = torch_models(torch)["lenet"]
    imported = fo.load(export(torch, model.eval(), shape))
    rng = np.random.default_rng(9)
    y = rng.integers(0, 10, 64)
    x = (rng.standard_normal((64, *shape)) * 0.3 + y[:, None, None, None] / 5).astype(np.float32)
    history = fit(
        imported,
        optim.Adam(imported.parameters(), lr=3e-3),
        x,
        y,
        epochs=4,
        batch_size=16,
        progress=False,
        handle_sigint=False,
    )
    assert history["train_loss"][-1] < 0.8 * history["train_loss"][0]


# -- export: fastconv -> ONNX -> onnxruntime and back ---------------------------------------------


def fastconv_model():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding="same", rng=0),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(
            4, 6, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1), groups=2, bias=False, rng=1
        ),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        nn.Sequential(nn.Flatten(), nn.Dropout(0.3, rng=2), nn.Linear(6 * 3 * 2, 16, rng=3)),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 5, rng=4),
    )
    rng = np.random.default_rng(6)
    for bn in (model[1], model[8]):
        bn.running_mean[...] = rng.standard_normal(bn.num_features) * 0.2
        bn.running_var[...] = rng.random(bn.num_features) + 0.5
        bn.weight.data[...] = rng.random(bn.num_features) + 0.5
    return model.eval()


def test_export_round_trip(tmp_path):
    model = fastconv_model()
    path = tmp_path / "model.onnx"
    fo.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    assert fo.is_onnx(path)
    x = np.random.default_rng(7).standard_normal((3, 1, 14, 14)).astype(np.float32)
    (from_ort,) = onnxruntime_outputs(path.read_bytes(), {"input": x})
    expected = model(x)
    assert_close(from_ort, expected, RTOL)
    loaded = fo.load(path)
    state, original = loaded.state_dict(), model.state_dict()
    assert set(state) == {k for k in original if not k.endswith("num_batches_tracked")}
    for key, value in state.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)
        assert value.dtype == original[key].dtype
    assert_close(loaded(x), expected, RTOL)
    # the batch dimension is dynamic
    assert onnxruntime_outputs(path.read_bytes(), {"input": x[:1]})[0].shape == (1, 5)


def test_conv_transpose_export_round_trip():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, rng=0),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, rng=1),
        nn.ConvTranspose2d(6, 3, (2, 3), dilation=(1, 2), bias=False, rng=2),
    ).eval()
    buffer = io.BytesIO()
    fo.save(model, buffer)
    x = np.random.default_rng(7).standard_normal((2, 2, 9, 8)).astype(np.float32)
    (from_ort,) = onnxruntime_outputs(buffer.getvalue(), {"input": x})
    assert_close(from_ort, model(x), RTOL)
    loaded = fo.load(buffer.getvalue())
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value, err_msg=key)
    assert_close(loaded(x), from_ort, RTOL)


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_export_of_a_fine_tuned_import_writes_its_new_weights(torch, name):
    model, shape = torch_models(torch)[name]
    imported = fo.load(
        export(torch, randomise_batchnorm(torch, model, 3).eval(), shape, fold=False)
    )
    for _, p in imported.named_parameters():
        p.data += 0.01
    buffer = io.BytesIO()
    fo.save(imported, buffer)
    x = np.random.default_rng(8).standard_normal((2, *shape)).astype(np.float32)
    (from_ort,) = onnxruntime_outputs(buffer.getvalue(), {"input": x})
    assert_close(imported(x), from_ort, RTOL)
    again = fo.load(buffer.getvalue())
    for key, value in imported.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key], value, err_msg=key)


def test_metadata_round_trip(tmp_path):
    model = fastconv_model()
    meta = {"classes": list("abcde"), "mean": 0.5, "std": 0.25}
    fo.save(model, tmp_path / "m.onnx", input_shape=(1, 14, 14), meta=meta)
    loaded = fo.load(tmp_path / "m.onnx")
    assert loaded.meta == {**meta, "input_shape": [1, 14, 14]}
    model_file, meta_read = fo.load_model(tmp_path / "m.onnx")  # fastconv.io.load_model's shape
    assert isinstance(model_file, Graph) and meta_read == loaded.meta
    buffer = io.BytesIO()
    fo.save(loaded, buffer)  # an imported model keeps its metadata
    assert fo.load(buffer.getvalue()).meta == loaded.meta
    fo.save(model, tmp_path / "plain.onnx")
    assert fo.load(tmp_path / "plain.onnx").meta == {}  # H and W are symbolic: no input_shape
    with pytest.raises(ValueError, match="JSON"):
        fo.save(model, tmp_path / "bad.onnx", meta={"x": object()})


def test_is_onnx(tmp_path):
    fo.save(fastconv_model(), tmp_path / "model.bin")
    assert fo.is_onnx(tmp_path / "model.bin") and fo.is_onnx(tmp_path / "absent.onnx")
    np.savez(tmp_path / "model.npz", a=np.zeros(2))
    assert not fo.is_onnx(tmp_path / "model.npz") and not fo.is_onnx(tmp_path / "absent.npz")


def test_export_input_shape_and_refusals(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, rng=0))
    with pytest.raises(ValueError, match="input_shape"):
        fo.save(model, tmp_path / "a.onnx")
    fo.save(model, tmp_path / "a.onnx", input_shape=(3, 2, 2))
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32)
    assert_close(
        onnxruntime_outputs((tmp_path / "a.onnx").read_bytes(), {"input": x})[0], model(x), RTOL
    )
    with pytest.raises(ValueError, match="CrossEntropyLoss"):
        fo.save(nn.Sequential(nn.Linear(2, 2), nn.CrossEntropyLoss()), tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()


# -- malformed files: a ValueError naming the problem, never a crash ------------------------------


def small_model(**changes):
    nodes = changes.get("nodes") or [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, name="fc"),
    ]
    inits = {"w": W(4, 2, 3, 3), "b": W(4), "fc_w": W(3, 4 * 5 * 5), "fc_b": W(3)}
    inits.update(changes.get("inits", {}))
    for name in changes.get("drop", ()):
        del inits[name]
    proto = model_proto(
        nodes,
        {"x": np.zeros((1, 2, 5, 5), np.float32)},
        [("y", FLOAT, changes.get("rank", 2))],
        inits,
        changes.get("opset", 17),
    )
    return proto.SerializeToString()


def test_small_model_is_valid():
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    data = small_model()
    assert_close(fo.load(data)(x), onnxruntime_outputs(data, {"x": x})[0], RTOL)


@pytest.mark.parametrize("cut", [1, 10, 50, 0.5, 0.9, -1])
def test_truncated_bytes(cut):
    data = small_model()
    n = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    with pytest.raises(ValueError, match="ONNX"):
        fo.load(data[:n])


@pytest.mark.parametrize(
    "data", [b"", b"\x00\x01garbage", b"PK\x03\x04" + bytes(100), bytes(range(256))]
)
def test_not_onnx_at_all(data):
    with pytest.raises(ValueError):
        fo.load(data)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        fo.load(tmp_path / "missing.onnx")
    path = tmp_path / "cut.onnx"
    path.write_bytes(small_model()[:-7])
    with pytest.raises(ValueError, match=str(path)):
        fo.load(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(drop=["w"]), r"conv1.*'w' is undefined.*missing initializer"),
        (dict(inits={"w": W(4, 3, 3, 3)}), r"conv1.*channels"),
        (dict(inits={"b": W(5)}), r"conv1.*bias of shape \(5,\)"),
        (dict(inits={"w": W(4, 2, 3)}), r"conv1.*only 1-D and 2-D convolutions"),
        (dict(inits={"fc_w": W(3, 99)}), r"'fc' \(Gemm\).*do not multiply"),
        (dict(inits={"fc_b": W(4)}), r"'fc' \(Gemm\).*C of shape"),
        (
            dict(nodes=[helper.make_node("Erf", ["x"], ["y"], name="erf1")]),
            r"'erf1' \(Erf\).*operator 'Erf' is not supported",
        ),
        (
            dict(nodes=[helper.make_node("Relu", ["x"], ["y"], name="r", domain="com.example")]),
            r"domain 'com.example'",
        ),
        (
            dict(nodes=[helper.make_node("Relu", ["x"], ["y"], name="r", foo=1)]),
            r"'r' \(Relu\).*attribute 'foo'",
        ),
        (
            dict(
                nodes=[
                    helper.make_node(
                        "MaxPool", ["x"], ["y"], name="mp", kernel_shape=[2, 2], storage_order=1
                    )
                ]
            ),
            r"'mp' \(MaxPool\).*storage_order",
        ),
        (
            dict(
                nodes=[
                    helper.make_node("MaxPool", ["x"], ["y", "idx"], name="mp", kernel_shape=[2, 2])
                ],
                rank=4,
            ),
            None,
        ),
        (
            dict(
                nodes=[
                    helper.make_node(
                        "AveragePool",
                        ["x"],
                        ["y"],
                        name="ap",
                        kernel_shape=[2, 2],
                        dilations=[2, 2],
                    )
                ],
                opset=19,
            ),
            r"'ap' \(AveragePool\).*dilations",
        ),
        (
            dict(
                nodes=[
                    helper.make_node("Relu", ["c"], ["y"], name="late"),
                    helper.make_node("Relu", ["x"], ["c"], name="early"),
                ]
            ),
            r"'late'.*topological",
        ),
        (
            dict(
                nodes=[
                    helper.make_node("Conv", ["x", "w"], ["y"], name="c3", kernel_shape=[3, 3, 3])
                ]
            ),
            r"'c3' \(Conv\).*kernel_shape",
        ),
    ],
)
def test_malformed_models(changes, message):
    data = small_model(**changes)
    if message is None:  # an unused second output (MaxPool's indices) is fine
        fo.load(data)
        return
    with pytest.raises(ValueError, match=message):
        fo.load(data)


def test_unsupported_values_are_refused_at_load():
    x = {"x": np.zeros((2, 3, 4, 4), np.float32)}
    bn = {k: W(3) for k in "sbmv"}
    cases = [
        (
            helper.make_node(
                "BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", training_mode=1
            ),
            bn,
            15,
            "training_mode=1",
        ),
        (
            helper.make_node("Dropout", ["x", "", "t"], ["y"], name="d"),
            {"t": np.bool_(True)},
            13,
            "training_mode=True",
        ),
        (
            helper.make_node("MaxPool", ["x"], ["y", "i"], name="mp", kernel_shape=[2, 2]),
            {},
            17,
            "output 1",
        ),
        (
            helper.make_node("Pad", ["x", "p"], ["y"], name="pad", mode="wrap"),
            {"p": I64(0, 0, 1, 1, 0, 0, 1, 1)},
            19,
            "'pad' \\(Pad\\).*mode='wrap'",
        ),
        (
            helper.make_node("LRN", ["x"], ["y"], name="lrn", size=2),
            {},
            17,
            "'lrn' \\(LRN\\).*size=2",
        ),
        (
            helper.make_node("MaxPool", ["x"], ["y"], name="mp3", kernel_shape=[2, 2, 2]),
            {},
            17,
            "'mp3' \\(MaxPool\\).*only 1-D and 2-D pooling",
        ),
        (
            helper.make_node("Cast", ["x"], ["y"], name="half", to=TensorProto.FLOAT16),
            {},
            17,
            "'half' \\(Cast\\).*float16",
        ),
        (
            helper.make_node("Split", ["x"], ["y", "i"], name="sp", axis=1, split=[1, 1, 1]),
            {},
            11,
            "'sp' \\(Split\\).*split=\\[1, 1, 1\\] does not give 2",
        ),
        (
            helper.make_node(
                "ConvTranspose", ["x", "w"], ["y"], name="ct", auto_pad="SAME_UPPER", strides=[2, 2]
            ),
            {"w": W(3, 2, 3, 3)},
            17,
            "'ct' \\(ConvTranspose\\).*auto_pad=SAME_UPPER",
        ),
        (
            helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct", output_shape=[9, 9]),
            {"w": W(3, 2, 3, 3)},
            17,
            "'ct' \\(ConvTranspose\\).*output_shape",
        ),
    ]
    for node, inits, opset, message in cases:
        outputs = [("y", FLOAT, 4)] + ([("i", INT64, 4)] if len(node.output) > 1 else [])
        data = model_proto([node], x, outputs, inits, opset).SerializeToString()
        with pytest.raises(ValueError, match=message):
            fo.load(data)


def test_runtime_input_checks():
    model = fo.load(small_model())
    with pytest.raises(TypeError, match="float64"):
        model(np.zeros((1, 2, 5, 5)))
    with pytest.raises(ValueError, match=r"\(1, 2, 5, 5\)"):
        model(np.zeros((1, 3, 5, 5), np.float32))
    with pytest.raises(TypeError, match="1 input"):
        model()


def test_graph_is_a_module():
    model = fo.load(small_model())
    assert isinstance(model, Graph) and not model.training
    assert [k for k, _ in model.named_parameters()] == ["w", "b", "fc_w", "fc_b"]
    state = model.state_dict()
    state["b"] = state["b"] + 1
    model.load_state_dict(state)
    np.testing.assert_array_equal(model.state_dict()["b"], state["b"])
    with pytest.raises(ValueError, match="shape"):
        model.load_state_dict({**state, "w": np.zeros((1, 2, 3, 3), np.float32)})
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)
    model(x)
    model.backward(np.ones((1, 3), np.float32))
    first = model.parameters()[0].grad.copy()
    model(x)
    model.backward(np.ones((1, 3), np.float32))
    np.testing.assert_allclose(model.parameters()[0].grad, 2 * first, rtol=1e-6)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "conv1 (Conv)" in repr(model)


# -- the new operators against torch, forward and backward (torch autograd's input gradient) ------


def _torch_cases(torch):
    F = torch.nn.functional
    slope = W(3, 1, 1)
    scale, shift = W(3), W(3)
    return [
        ("Elu", {"alpha": 0.7}, {}, lambda x: F.elu(x, 0.7)),
        ("Selu", {}, {}, F.selu),
        ("Softplus", {}, {}, F.softplus),
        ("Softsign", {}, {}, F.softsign),
        ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}, {}, F.hardsigmoid),
        ("HardSwish", {}, {}, F.hardswish),
        ("Abs", {}, {}, torch.abs),
        ("Neg", {}, {}, torch.neg),
        ("Exp", {}, {}, torch.exp),
        ("PRelu", {}, {"slope": slope}, lambda x: F.prelu(x, torch.from_numpy(slope.ravel()))),
        *[
            (
                "Pad",
                {"mode": mode},
                {"pads": I64(0, 0, 2, 1, 0, 0, 1, 3)},
                lambda x, m=torch_mode: F.pad(x, (1, 3, 2, 1), mode=m),
            )
            for mode, torch_mode in (("reflect", "reflect"), ("edge", "replicate"))
        ],
        (
            "InstanceNormalization",
            {"epsilon": 1e-5},
            {"s": scale, "b": shift},
            lambda x: F.instance_norm(
                x, weight=torch.from_numpy(scale), bias=torch.from_numpy(shift)
            ),
        ),
        ("LRN", {"size": 3, "alpha": 0.2}, {}, lambda x: F.local_response_norm(x, 3, 0.2)),
        ("ReduceMean", {"axes": [2, 3]}, {}, lambda x: x.mean(dim=(2, 3), keepdim=True)),
        ("ReduceMax", {"axes": [1], "keepdims": 0}, {}, lambda x: x.amax(dim=1)),
        ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}, {}, lambda x: F.pixel_shuffle(x, 2)),
    ]


def test_new_operators_match_torch_forward_and_backward(torch):
    x = rand(np.random.default_rng(11), (2, 12, 5, 6))
    for op, attrs, inits, reference in _torch_cases(torch):
        xs = x[:, :3] if op in ("PRelu", "InstanceNormalization") else x
        names = ["x", *inits]
        node = helper.make_node(op, names, ["y"], **attrs)
        opset = 13 if op.startswith("Reduce") else 17
        t = torch.from_numpy(xs.copy()).requires_grad_()
        expected = reference(t)
        output = [("y", FLOAT, expected.ndim)]
        data = model_proto([node], {"x": xs}, output, inits, opset).SerializeToString()
        model = fo.load(data)
        model.needs_input_grad = True
        weights = np.random.default_rng(12).standard_normal(tuple(expected.shape))
        weights = weights.astype(np.float32)
        expected.backward(torch.from_numpy(weights))
        actual = model(xs)
        assert_close(actual, expected.detach().numpy(), RTOL, what=f"{op} forward")
        assert_close(model.backward(weights), t.grad.numpy(), RTOL, what=f"{op} backward")


def test_reflect_padding_past_the_input_is_an_error_as_in_torch_and_onnxruntime():
    x = {"x": np.zeros((1, 1, 1, 6), np.float32)}
    node = helper.make_node("Pad", ["x", "p"], ["y"], name="pad", mode="reflect")
    data = model_proto([node], x, [("y", FLOAT, 4)], {"p": I64(0, 0, 1, 0, 0, 0, 1, 0)})
    with pytest.raises(ValueError, match=r"'pad' \(Pad\).*reflect pads"):
        fo.load(data.SerializeToString())(x["x"])
    with pytest.raises(Exception, match="Pad reflect"):
        onnxruntime_outputs(data.SerializeToString(), x)
