"""ONNX models in and out: `load` turns a model file into a trainable fastconv model, `save`
writes a fastconv model for onnxruntime and the rest of the ecosystem.

    model = fastconv.onnx.load("lenet.onnx")    # a fastconv.nn_graph.Graph (a Module)
    logits = model(x)                           # x: (N, C, H, W) float32
    model.backward(grad)                        # fine-tune it like any fastconv model
    fastconv.onnx.save(model, "mine.onnx")      # a Sequential of fastconv.nn layers, or a Graph

`load` reads opsets 9 to the newest the installed `onnx` package knows, and the operators small
CNNs use (`SUPPORTED_OPERATORS`). Older models (opsets 1 to 8: years of exports) are first
upgraded to opset 9 by the onnx package's own `onnx.version_converter`; one it cannot upgrade is
refused naming the opset (and the node, when the converter's message names its operator). Everything is checked before the model is built: an
unsupported operator or attribute, an undefined input or a missing initializer, initializers
whose shapes do not fit their operator, truncated or corrupted bytes raise a ValueError naming
the node (and the file), never an error halfway through inference. `onnx.checker.check_model`
and ONNX's strict shape inference (together what `check_model(full_check=True)` runs) vet the
rest. Floating-point initializers read by an operation that is differentiable in them (Conv's
weight and bias, Gemm's B and C, BatchNormalization's scale and bias, a MatMul or Add operand...)
become trainable parameters under their ONNX names; BatchNormalization's mean and variance
become buffers; the others are constants. Identity nodes fed by an initializer (torch's exporter
writes them for equal initializers, e.g. two fresh BatchNorm layers) get a parameter of their own,
named after their output, so that fine-tuning does not tie the layers together.

Requires the `onnx` package (`pip install "fastconv[onnx]"`), imported on first use.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np

from .. import nn
from .._args import conv_padding
from .._files import atomic_write
from ..io import ModelFile
from . import graph as G
from .graph import Graph, Node, ValueInfo

__all__ = [
    "load",
    "load_model",
    "save",
    "is_onnx",
    "SUPPORTED_OPERATORS",
    "OLDEST_OPSET",
    "EXPORT_OPSET",
]

OLDEST_OPSET = 9
EXPORT_OPSET = 17
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(
            'fastconv.onnx needs the onnx package: pip install "fastconv[onnx]"'
        ) from None
    return onnx


def is_onnx(path) -> bool:
    """Whether `path` names an ONNX model: a `.onnx` suffix, or a file that starts as a
    serialised ModelProto does (field 1, ir_version) rather than as a zip/.npz ("PK")."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x08 and head[1] < 0x80


# ------------------------------------------------------------------------------------------------
# Import


def load(source) -> Graph:
    """Read an ONNX model (a path, or its bytes) as a fastconv model, in eval mode.

    Returns a `fastconv.nn_graph.Graph`: `model(x)` runs it, `model.backward(grad)` accumulates
    its parameters' gradients, `state_dict()` is keyed by the ONNX initializer names. Raises
    FileNotFoundError for a missing file, ValueError for anything wrong inside it.
    """
    onnx = _onnx()
    where = (
        "ONNX bytes" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
    )
    model = _parse(onnx, source, where)
    try:
        model = _upgrade(onnx, model)
        opset = _opset(model)
        _check_nodes(model.graph, opset)
        try:
            onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            raise ValueError(f"onnx.checker: {_first_line(err)}") from None
        graph = _Importer(onnx, model, opset).build()
        _strict_shapes(onnx, model)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    graph.eval()
    return graph


def load_model(source):
    """`model, meta = load_model(path)`, as fastconv.io.load_model returns for fastconv's own
    files: the Graph and its `meta` (what `save(..., meta=...)` stored, e.g. classes, mean and
    std, plus input_shape [C, H, W] when the file fixes it). Errors as `load`."""
    graph = load(source)
    return ModelFile(graph, dict(graph.meta))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _parse(onnx, source, where: str):
    from google.protobuf.message import DecodeError

    if isinstance(source, (bytes, bytearray, memoryview)):
        data, folder = bytes(source), None
    else:
        path = Path(os.fspath(source))
        data, folder = path.read_bytes(), path.parent
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"{where}: not an ONNX model, or a truncated or corrupted one ({err})"
        ) from None
    if not model.HasField("graph") or not model.opset_import:
        raise ValueError(f"{where}: not an ONNX model (no graph or no opset_import in it)")
    tensors = list(model.graph.initializer)
    if any(onnx.external_data_helper.uses_external_data(t) for t in tensors):
        if folder is None:
            raise ValueError(
                f"{where}: the model keeps its weights in external files; load it from its path"
            )
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(folder))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{where}: cannot read the model's external weight data: {err}"
            ) from None
    return model


def _opset(model) -> int:
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise ValueError("the model imports no version of the default ONNX operator set")
    newest = _onnx().defs.onnx_opset_version()
    opset = max(versions)
    if opset < OLDEST_OPSET:  # _upgrade converts these first
        raise ValueError(f"opset {opset} is older than {OLDEST_OPSET}, the oldest fastconv reads")
    if opset > newest:
        raise ValueError(
            f"opset {opset} is newer than {newest}, the newest the installed onnx "
            "package knows; upgrade onnx"
        )
    return opset


def _upgrade(onnx, model):
    """A model below OLDEST_OPSET, upgraded to it by onnx.version_converter (the onnx package's
    own adapters, operator by operator); newer models are returned as they are."""
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions or max(versions) >= OLDEST_OPSET:
        return model
    opset = max(versions)
    try:  # the adapters (Gemm's, Reshape's...) need the sizes shape inference finds
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # then the converter says what it lacks
        pass
    try:
        return onnx.version_converter.convert_version(model, OLDEST_OPSET)
    except Exception as err:  # the converter raises RuntimeError, ValueError, IndexError...
        message = re.sub(r"^\S+\.(h|cc):\d+: ", "", _first_line(err))  # the C++ source line
        words = set(re.findall(r"[A-Za-z_]\w*", message))
        culprit = next(
            (_label(n, i) + ": " for i, n in enumerate(model.graph.node) if n.op_type in words), ""
        )
        raise ValueError(
            f"{culprit}opset {opset} is older than {OLDEST_OPSET} and "
            f"onnx.version_converter cannot upgrade the model: {message}"
        ) from None


def _label(node, index: int) -> str:
    return f"node {node.name or f'#{index}'!r} ({node.op_type})"


def _check_nodes(graph, opset: int) -> None:
    """Operators, attribute names and input names, before anything else looks at the graph."""
    if graph.sparse_initializer:
        raise ValueError("sparse initializers are not supported")
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    produced_later = {o for n in graph.node for o in n.output if o}
    for index, node in enumerate(graph.node):
        label = _label(node, index)
        spec = _CONVERTERS.get(node.op_type) if node.domain in _DEFAULT_DOMAINS else None
        if spec is None:
            domain = f" of domain {node.domain!r}" if node.domain not in _DEFAULT_DOMAINS else ""
            raise ValueError(
                f"{label}: operator {node.op_type!r}{domain} is not supported "
                f"(supported: {', '.join(SUPPORTED_OPERATORS)})"
            )
        _, allowed = spec
        for attr in node.attribute:
            if attr.name not in allowed:
                raise ValueError(f"{label}: attribute {attr.name!r} is not supported")
        for name in node.input:
            if name and name not in defined:
                if name in produced_later:
                    raise ValueError(
                        f"{label}: input {name!r} is computed by a later node "
                        "(the nodes are not in topological order)"
                    )
                raise ValueError(
                    f"{label}: input {name!r} is undefined: no graph input, "
                    "initializer or node output has that name (a missing initializer?)"
                )
        defined.update(o for o in node.output if o)
    for output in graph.output:
        if output.name not in defined:
            raise ValueError(f"graph output {output.name!r} is computed by no node")


def _strict_shapes(onnx, model) -> None:
    if model.ByteSize() >= 2**31 - 1:
        return  # shape inference needs a model under 2 GB in memory
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as err:
        raise ValueError(f"ONNX shape inference: {_first_line(err)}") from None


class _Importer:
    def __init__(self, onnx, model, opset: int):
        self.onnx, self.model, self.graph_proto, self.opset = onnx, model, model.graph, opset
        self.arrays: dict[str, np.ndarray] = {}  # initializers, and Identity copies of them
        for tensor in self.graph_proto.initializer:
            self.arrays[tensor.name] = self._array(tensor, f"initializer {tensor.name!r}")
        self.constants: dict[str, np.ndarray] = {}  # Constant nodes' values
        self.shapes = self._inferred_shapes()

    def _array(self, tensor, what: str) -> np.ndarray:
        try:
            array = np.array(self.onnx.numpy_helper.to_array(tensor))  # a writable copy
        except Exception as err:  # onnx raises several types for inconsistent tensors
            raise ValueError(f"{what}: cannot read its data ({_first_line(err)})") from None
        if array.dtype.kind == "f" and array.dtype not in (np.float32, np.float64):
            raise ValueError(
                f"{what} has dtype {array.dtype}: fastconv computes in float32 or "
                "float64; convert the model first"
            )
        if array.dtype.kind not in "fiub":
            raise ValueError(
                f"{what} has dtype {array.dtype}, which fastconv does not compute with"
            )
        return array

    def _inferred_shapes(self) -> dict[str, tuple | None]:
        g = self.graph_proto
        try:
            inferred = self.onnx.shape_inference.infer_shapes(self.model).graph
        except Exception:  # strict checking comes later; here shapes only sharpen messages
            inferred = g
        shapes = {}
        for info in [*inferred.value_info, *inferred.input, *inferred.output]:
            shapes[info.name] = _shape_of(info)
        return shapes

    def shape(self, name: str) -> tuple | None:
        for table in (self.arrays, self.constants):
            if name in table:
                return table[name].shape
        return self.shapes.get(name)

    def const(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name, self.constants.get(name))

    def _is_constant(self, name: str) -> bool:
        """A Constant's value or an integer initializer (float ones may become parameters)."""
        return name in self.constants or name in self.arrays and self.arrays[name].dtype.kind != "f"

    def build(self) -> Graph:
        g = self.graph_proto
        inputs = []
        for info in g.input:
            if info.name in self.arrays:  # an initializer listed as an input too (IR < 4)
                continue
            inputs.append(ValueInfo(info.name, _dtype_of(self.onnx, info), _shape_of(info)))
        used_outputs = {name for n in g.node for name in n.input} | {o.name for o in g.output}
        nodes: list[Node] = []
        initializer_roles: dict[str, int] = {}
        folded: set[str] = set()
        for index, proto in enumerate(g.node):
            node = _NodeReader(self, proto, index)
            for k, out in enumerate(proto.output[1:], start=1):
                if out and out in used_outputs and proto.op_type not in _MULTI_OUTPUT:
                    node.fail(
                        f"output {k} ({out!r}) is not supported: only the first output can be used"
                    )
            if proto.op_type == "Constant":
                self.constants[proto.output[0]] = _constant_value(self, node)
                continue
            if proto.op_type == "Identity" and proto.input[0] in self.arrays:
                self.arrays[proto.output[0]] = self.arrays[proto.input[0]].copy()
                folded.add(proto.output[0])
                continue
            converter, _ = _CONVERTERS[proto.op_type]
            assert converter is not None  # only Constant has none, handled above
            op = converter(node)
            if all(not name or self._is_constant(name) for name in proto.input):
                value = node.evaluate(op)  # e.g. a reshape target
                values = value if isinstance(value, tuple) else (value,)
                self.constants.update((k, np.asarray(v)) for k, v in zip(proto.output, values) if k)
                for name in proto.input:
                    if name in self.arrays:
                        initializer_roles.setdefault(name, 0)
                continue
            nodes.append(
                Node(
                    proto.name or f"#{index}",
                    proto.op_type,
                    op,
                    tuple(proto.input),
                    proto.output[0],
                    tuple(proto.output[1:]),
                )
            )
            for i, name in enumerate(proto.input):
                if name in self.arrays:
                    role = _role(proto.op_type, op, i, self.arrays[name])
                    initializer_roles[name] = max(role, initializer_roles.get(name, role))
        tables: dict[str, dict[str, np.ndarray]] = {"parameter": {}, "buffer": {}, "constant": {}}
        graph_outputs = {o.name for o in g.output}
        for name, array in self.arrays.items():  # file order; unused initializers are dropped
            if name in initializer_roles or name in graph_outputs:
                tables[_ROLE_NAMES[initializer_roles.get(name, 0)]][name] = array
        from_initializers = set(tables["constant"])
        tables["constant"].update(self.constants)
        graph = Graph(
            nodes,
            inputs,
            [o.name for o in g.output],
            parameters=tables["parameter"],
            buffers=tables["buffer"],
            constants=tables["constant"],
        )
        graph.source = _Source(_template(self.model, folded), frozenset(from_initializers))
        graph.meta = _read_meta(self.model, inputs)
        return graph


_ROLE_NAMES = {0: "constant", 1: "buffer", 2: "parameter"}


def _role(op_type: str, op, position: int, array: np.ndarray) -> int:
    if array.dtype.kind != "f":
        return 0
    if op_type == "BatchNormalization" and position in (3, 4):
        return 1
    return 2 if op.is_differentiable(position) else 0


@dataclass(frozen=True)
class _Source:
    """What `save` needs to write an imported Graph back: the model without its weights and
    without the folded Identity copies, and which initializers are constants (not in the
    state dict)."""

    template: object  # onnx.ModelProto
    constant_initializers: frozenset


def _template(model, folded: set[str]):
    template = type(model)()
    template.graph.CopyFrom(model.graph)  # graph first: the initializers are dropped below
    for field in (
        "ir_version",
        "producer_name",
        "producer_version",
        "domain",
        "model_version",
        "doc_string",
    ):
        setattr(template, field, getattr(model, field))
    template.opset_import.extend(model.opset_import)
    template.metadata_props.extend(model.metadata_props)
    template.functions.extend(model.functions)
    del template.graph.initializer[:]
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in folded)]
    del template.graph.node[:]
    template.graph.node.extend(keep)
    template.graph.ClearField("value_info")
    return template


META_KEY = "fastconv.meta"


def _read_meta(model, inputs: list[ValueInfo]) -> dict:
    """The JSON `save(..., meta=...)` stored (classes, mean, std...), plus the input's static
    [C, H, W] as input_shape when the file fixes it."""
    meta = {}
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            try:
                meta = json.loads(prop.value)
            except ValueError:
                raise ValueError(f"metadata {META_KEY!r} is not valid JSON") from None
            if not isinstance(meta, dict):
                raise ValueError(f"metadata {META_KEY!r} is not a JSON object")
    if "input_shape" not in meta and len(inputs) == 1:
        shape = inputs[0].shape
        if shape is not None and len(shape) == 4 and None not in shape[1:]:
            meta["input_shape"] = list(shape[1:])
    return meta


def _shape_of(info) -> tuple | None:
    t = info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def _dtype_of(onnx, info) -> np.dtype:
    elem = info.type.tensor_type.elem_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except Exception:
        raise ValueError(f"graph input {info.name!r}: unsupported element type {elem}") from None
    if dtype.kind == "f" and dtype not in (np.float32, np.float64):
        raise ValueError(
            f"graph input {info.name!r} has dtype {dtype}: fastconv computes in "
            "float32 or float64; convert the model first"
        )
    return dtype


class _NodeReader:
    """One node's attributes, inputs and their known shapes, and errors that name the node."""

    _KINDS = {"int": 2, "float": 1, "string": 3, "tensor": 4, "ints": 7, "floats": 6}

    def __init__(self, importer: _Importer, proto, index: int):
        self.importer, self.proto, self.opset = importer, proto, importer.opset
        self.label = _label(proto, index)
        self.attrs = {a.name: a for a in proto.attribute}
        self.spatial = 2  # a Conv or pool's number of spatial axes (1: run with a height of 1)

    def fail(self, message: str) -> NoReturn:
        raise ValueError(f"{self.label}: {message}")

    def has(self, name: str) -> bool:
        return name in self.attrs

    def attr(self, name: str, kind: str, default=None):
        attr = self.attrs.get(name)
        if attr is None:
            return default
        if attr.type != self._KINDS[kind]:
            self.fail(f"attribute {name!r} should be of type {kind}")
        value = self.importer.onnx.helper.get_attribute_value(attr)
        if kind == "ints":
            return tuple(int(v) for v in value)
        if kind == "string":
            return value.decode() if isinstance(value, bytes) else value
        return value

    def input(self, i: int) -> str:
        return self.proto.input[i] if i < len(self.proto.input) else ""

    def shape(self, i: int) -> tuple | None:
        name = self.input(i)
        return self.importer.shape(name) if name else None

    def const(self, i: int) -> np.ndarray | None:
        name = self.input(i)
        return self.importer.const(name) if name else None

    def evaluate(self, op) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run a node whose inputs are all constants, once, at load time."""
        args = [self.importer.const(name) if name else None for name in self.proto.input]
        while args and args[-1] is None:
            args.pop()
        try:
            result = op.forward(*args)
        except (ValueError, TypeError, IndexError) as err:
            self.fail(str(err))
        return result if isinstance(result, tuple) else np.asarray(result)

    def pair(self, name: str, default, minimum: int, height: int = 1) -> tuple[int, int]:
        """A 2-D window attribute; a 1-D node's single value gets `height` before it."""
        value = self.attr(name, "ints", default)
        if value is not None and self.spatial == 1 and name in self.attrs:
            value = (height, *value) if len(value) == 1 else (-1,)  # (-1,): refused below
        if value is None or len(value) != 2:
            self.fail(
                f"attribute {name}={list(value) if value else value}: only 1-D and 2-D windows "
                f"are supported ({self.spatial} value{'s' if self.spatial > 1 else ''} expected)"
            )
        if min(value) < minimum:
            self.fail(f"attribute {name}={list(value)}: values must be >= {minimum}")
        return value

    def spatial_rank(self, *ranks: int | None) -> int:
        """The window's rank (1 or 2), from the first of `ranks` that is known; others must agree."""
        known = {r for r in ranks if r is not None}
        if len(known) > 1 or known - {1, 2}:
            return 0
        self.spatial = known.pop() if known else 2
        return self.spatial


# -- converters: one per operator, each checks what it reads and returns the op -------------------


def _window_attrs(n: _NodeReader) -> tuple:
    strides = n.pair("strides", (1, 1), 1)
    dilations = n.pair("dilations", (1, 1), 1)
    auto_pad = n.attr("auto_pad", "string", "NOTSET")
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        n.fail(f"auto_pad={auto_pad!r} is not supported")
    pads = n.attr("pads", "ints", (0,) * 2 * n.spatial)
    if auto_pad != "NOTSET" and any(pads):
        n.fail(f"pads={list(pads)} cannot be given with auto_pad={auto_pad}")
    if len(pads) != 2 * n.spatial or min(pads) < 0:
        where = "(begin, end)" if n.spatial == 1 else "(top, left, bottom, right)"
        n.fail(f"pads={list(pads)}: expected {2 * n.spatial} values >= 0 {where}")
    if n.spatial == 1:
        pads = (0, pads[0], 0, pads[1])
    return strides, dilations, pads, auto_pad


def _rank(shape, offset: int = 2) -> int | None:
    return None if shape is None else len(shape) - offset


def _one_d(n: _NodeReader, op: G.Op) -> G.Op:
    return G.OneD(op) if n.spatial == 1 else op


def _conv_attrs(n: _NodeReader) -> tuple:
    """Conv's and ConvTranspose's kernel (from the attribute or the weight), window attributes
    and group, for 1-D (given a height of 1) or 2-D nodes."""
    x, w = n.shape(0), n.shape(1)
    kernel = n.attr("kernel_shape", "ints")
    if not n.spatial_rank(_rank(w), _rank(x), _rank(kernel, 0)):
        n.fail(
            f"only 1-D and 2-D convolutions are supported (input {_dims(x)}, weight {_dims(w)}"
            + (f", kernel_shape={list(kernel)})" if kernel is not None else ")")
        )
    if kernel is not None and w is not None and None not in w[2:] and tuple(w[2:]) != kernel:
        n.fail(f"kernel_shape={list(kernel)} does not fit the weight's shape {_dims(w)}")
    if kernel is None:
        if w is None or None in w[2:]:
            n.fail("the kernel size is unknown: give kernel_shape or a weight of known shape")
        kernel = tuple(w[2:])
    kernel = (1, *kernel) if n.spatial == 1 else kernel
    group = n.attr("group", "int", 1)
    if group < 1:
        n.fail(f"group={group} must be >= 1")
    return kernel, _window_attrs(n), group


def _conv_transpose(n: _NodeReader):
    x, w, b = n.shape(0), n.shape(1), n.shape(2)
    _, (strides, dilations, pads, auto_pad), group = _conv_attrs(n)
    if auto_pad.startswith("SAME"):
        n.fail(f"auto_pad={auto_pad} is not supported: give pads (or auto_pad=VALID)")
    if n.has("output_shape"):
        n.fail("attribute 'output_shape' is not supported: give pads and output_padding")
    output_padding = n.pair("output_padding", (0, 0), 0, height=0)
    if any(p >= max(s, d) for p, s, d in zip(output_padding, strides, dilations)):
        n.fail(
            f"output_padding={list(output_padding)} must be smaller than the stride or the "
            f"dilation ({list(strides)}, {list(dilations)})"
        )
    if w is not None and w[0] is not None:
        if w[0] % group:
            n.fail(f"the weight's {w[0]} input channels are not divisible by group={group}")
        if x is not None and x[1] is not None and x[1] != w[0]:
            n.fail(f"input with {x[1]} channels does not fit weight {_dims(w)}")
        if b is not None and w[1] is not None and tuple(b) != (w[1] * group,):
            n.fail(f"bias of shape {_dims(b)} does not fit {w[1] * group} output channels")
    return _one_d(n, G.ConvTranspose(strides, dilations, pads, output_padding, group))


def _conv(n: _NodeReader):
    x, w, b = n.shape(0), n.shape(1), n.shape(2)
    kernel, (strides, dilations, pads, auto_pad), group = _conv_attrs(n)
    if w is not None and w[0] is not None:
        if w[0] % group:
            n.fail(f"the weight's {w[0]} output channels are not divisible by group={group}")
        if b is not None and tuple(b) != (w[0],):
            n.fail(f"bias of shape {_dims(b)} does not fit the weight's {w[0]} output channels")
    if w is not None and x is not None and None not in (x[1], w[1]) and x[1] != w[1] * group:
        n.fail(f"input with {x[1]} channels does not fit weight {_dims(w)} with group={group}")
    return _one_d(n, G.Conv(kernel, strides, dilations, pads, auto_pad, group))


def _pool(kind: str) -> Callable:
    def convert(n: _NodeReader):
        x, kernel = n.shape(0), n.attr("kernel_shape", "ints")
        if not n.spatial_rank(_rank(x), _rank(kernel, 0)):
            n.fail(
                f"only 1-D and 2-D pooling is supported (input {_dims(x)}"
                + (f", kernel_shape={list(kernel)})" if kernel is not None else ")")
            )
        kernel = n.pair("kernel_shape", None, 1)
        strides, dilations, pads, auto_pad = _window_attrs(n)
        if auto_pad == "NOTSET" and any(p >= k for p, k in zip(pads, kernel * 2)):
            n.fail(f"pads={list(pads)} must be smaller than kernel_shape={list(kernel)}")
        if n.attr("storage_order", "int", 0) != 0:
            n.fail("storage_order=1 (column-major indices) is not supported")
        if kind == "Average" and dilations != (1, 1):
            n.fail(f"dilations={list(dilations)} are not supported for AveragePool")
        pool = G.Pool(
            kind if kind == "Max" else "Avg",
            kernel,
            strides,
            dilations,
            pads,
            auto_pad,
            bool(n.attr("ceil_mode", "int", 0)),
            bool(n.attr("count_include_pad", "int", 0)),
        )
        return _one_d(n, pool)

    return convert


def _clip(n: _NodeReader):
    if n.opset < 11:
        return G.Clip(n.attr("min", "float"), n.attr("max", "float"))
    for i in (1, 2):
        s = n.shape(i)
        if s is not None and len(s) != 0:
            n.fail(
                f"input {i} ({'min' if i == 1 else 'max'}) must be a scalar, got shape {_dims(s)}"
            )
    return G.Clip()


def _gemm(n: _NodeReader):
    a, b, c = n.shape(0), n.shape(1), n.shape(2)
    trans_a, trans_b = bool(n.attr("transA", "int", 0)), bool(n.attr("transB", "int", 0))
    for name, s in (("A", a), ("B", b)):
        if s is not None and len(s) != 2:
            n.fail(f"{name} must be 2-D, got shape {_dims(s)}")
    if a is not None and b is not None:
        (m, k1), (k2, cols) = (a[::-1] if trans_a else a), (b[::-1] if trans_b else b)
        if None not in (k1, k2) and k1 != k2:
            n.fail(
                f"A {_dims(a)} (transA={int(trans_a)}) and B {_dims(b)} (transB={int(trans_b)}) "
                "do not multiply"
            )
        if c is not None and not _broadcasts_to(c, (m, cols)):
            n.fail(f"C of shape {_dims(c)} does not broadcast to the product's ({m}, {cols})")
    return G.Gemm(
        float(n.attr("alpha", "float", 1.0)), float(n.attr("beta", "float", 1.0)), trans_a, trans_b
    )


def _matmul(n: _NodeReader):
    a, b = n.shape(0), n.shape(1)
    if a is not None and b is not None and len(a) and len(b):
        k1, k2 = a[-1], b[0] if len(b) == 1 else b[-2]
        if None not in (k1, k2) and k1 != k2:
            n.fail(f"operands of shapes {_dims(a)} and {_dims(b)} do not multiply")
    return G.MatMul()


def _arithmetic(kind: str) -> Callable:
    def convert(n: _NodeReader):
        a, b = n.shape(0), n.shape(1)
        if a is not None and b is not None and not _broadcastable(a, b):
            n.fail(f"operands of shapes {_dims(a)} and {_dims(b)} do not broadcast")
        return G.Arithmetic(kind)

    return convert


def _flatten(n: _NodeReader):
    axis, x = n.attr("axis", "int", 1), n.shape(0)
    if x is not None and not -len(x) <= axis <= len(x):
        n.fail(f"axis={axis} out of range for an input of rank {len(x)}")
    return G.Flatten(axis)


def _reshape(n: _NodeReader):
    allowzero = bool(n.attr("allowzero", "int", 0))
    shape, x = n.const(1), n.shape(0)
    if shape is not None:
        target = [int(v) for v in shape.reshape(-1)]
        if target.count(-1) > 1 or min(target, default=0) < -1:
            n.fail(f"shape {target}: at most one -1 and no other negative size")
        if allowzero and 0 in target and -1 in target:
            n.fail(f"shape {target}: 0 and -1 together with allowzero=1")
        if x is not None and None not in x:
            sizes = [
                x[i] if v == 0 and not allowzero and i < len(x) else v for i, v in enumerate(target)
            ]
            known = int(np.prod([v for v in sizes if v != -1]))
            total = int(np.prod(x))
            if (-1 not in sizes and known != total) or (
                -1 in sizes and (known == 0 or total % known)
            ):
                n.fail(f"an input of shape {_dims(x)} cannot be reshaped to {target}")
    return G.Reshape(allowzero)


def _transpose(n: _NodeReader):
    perm, x = n.attr("perm", "ints"), n.shape(0)
    if perm is not None and sorted(perm) != list(range(len(perm))):
        n.fail(f"perm={list(perm)} is not a permutation")
    if perm is not None and x is not None and len(perm) != len(x):
        n.fail(f"perm={list(perm)} does not fit an input of rank {len(x)}")
    return G.Transpose(perm)


def _concat(n: _NodeReader):
    if not n.has("axis"):
        n.fail("attribute 'axis' is required")
    return G.Concat(n.attr("axis", "int"))


def _batch_norm(n: _NodeReader):
    if n.attr("training_mode", "int", 0):
        n.fail("training_mode=1 is not supported: only the inference form (running statistics)")
    x = n.shape(0)
    channels = x[1] if x is not None and len(x) > 1 else None
    for i, name in enumerate(("scale", "B", "mean", "var"), start=1):
        s = n.shape(i)
        if s is not None and (len(s) != 1 or None not in (s[0], channels) and s[0] != channels):
            n.fail(f"{name} of shape {_dims(s)} does not fit an input of shape {_dims(x)}")
        channels = channels if channels is not None or s is None or len(s) != 1 else s[0]
    return G.BatchNorm(float(n.attr("epsilon", "float", 1e-5)))


def _dropout(n: _NodeReader):
    if n.input(2):
        training = n.const(2)
        if training is None:
            n.fail(
                "training_mode must be a constant (only inference, training_mode=False, "
                "is supported)"
            )
        if bool(np.asarray(training).reshape(-1)[0]):
            n.fail("training_mode=True is not supported: only inference")
    return G.Identity()


def _softmax(log: bool) -> Callable:
    def convert(n: _NodeReader):
        legacy = n.opset < 13
        axis, x = n.attr("axis", "int", 1 if legacy else -1), n.shape(0)
        if x is not None and not -len(x) <= axis < max(len(x), 1):
            n.fail(f"axis={axis} out of range for an input of rank {len(x)}")
        return G.Softmax(axis, log=log, legacy=legacy)

    return convert


def _squeeze(n: _NodeReader):
    if n.opset < 13:
        return G.Squeeze(n.attr("axes", "ints"))
    return G.Squeeze()


def _unsqueeze(n: _NodeReader):
    if n.opset < 13:
        axes = n.attr("axes", "ints")
        if axes is None:
            n.fail("attribute 'axes' is required")
        return G.Unsqueeze(axes)
    if not n.input(1):
        n.fail("input 'axes' is required")
    return G.Unsqueeze()


def _shape(n: _NodeReader):
    return G.Shape(n.attr("start", "int", 0), n.attr("end", "int"))


def _constant_value(importer: _Importer, n: _NodeReader) -> np.ndarray:
    attrs = n.attrs
    if len(attrs) != 1:
        n.fail("expected exactly one value attribute")
    (name,) = attrs
    if name == "value":
        return importer._array(n.attr("value", "tensor"), n.label)
    if name in ("value_float", "value_floats"):
        return np.array(n.attr(name, name[6:]), dtype=np.float32)
    if name in ("value_int", "value_ints"):
        return np.array(n.attr(name, name[6:]), dtype=np.int64)
    n.fail(f"attribute {name!r} is not supported (only numeric tensors)")


# element-wise functions: ONNX's attribute defaults
_UNARY_ATTRS: dict[str, dict[str, float]] = {
    "Neg": {},
    "Abs": {},
    "Sqrt": {},
    "Exp": {},
    "Log": {},
    "Reciprocal": {},
    "Sigmoid": {},
    "Tanh": {},
    "Elu": {"alpha": 1.0},
    "Selu": {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875},
    "Softplus": {},
    "Softsign": {},
    "HardSigmoid": {"alpha": 0.2, "beta": 0.5},
    "HardSwish": {},
}


def _unary(kind: str) -> Callable:
    def convert(n: _NodeReader):
        defaults = _UNARY_ATTRS[kind]
        return G.Unary(kind, **{k: float(n.attr(k, "float", v)) for k, v in defaults.items()})

    return convert


def _cast(n: _NodeReader):
    to = n.attr("to", "int")
    try:
        dtype = np.dtype(n.importer.onnx.helper.tensor_dtype_to_np_dtype(to))
    except Exception:
        dtype = np.dtype(object)
    if dtype.kind not in "fiub" or dtype.kind == "f" and dtype not in (np.float32, np.float64):
        n.fail(f"to={to} ({dtype}): fastconv computes in float32/float64, integers and booleans")
    if not n.attr("saturate", "int", 1):
        n.fail("saturate=0 (for float8 types) is not supported")
    return G.Cast(dtype)


def _prelu(n: _NodeReader):
    x, slope = n.shape(0), n.shape(1)
    if x is not None and slope is not None and not _broadcasts_to(slope, x):
        n.fail(f"slope of shape {_dims(slope)} does not broadcast to the input's {_dims(x)}")
    return G.PRelu()


def _broadcasting(op: Callable[[], G.Op]) -> Callable:
    def convert(n: _NodeReader):
        shapes = [n.shape(i) for i in range(len(n.proto.input))]
        known = [s for s in shapes if s is not None]
        if any(not _broadcastable(a, b) for a in known for b in known):
            n.fail(f"operands of shapes {', '.join(map(_dims, known))} do not broadcast")
        return op()

    return convert


def _ints_input_or_attr(n: _NodeReader, name: str, index: int, since: int):
    """An ints parameter that is an attribute before opset `since`, input `index` from it on."""
    if n.opset < since:
        return n.attr(name, "ints")
    if n.has(name):
        n.fail(f"attribute {name!r} is an input from opset {since} on")
    return None


def _pad(n: _NodeReader):
    mode = n.attr("mode", "string", "constant")
    if mode not in ("constant", "reflect", "edge"):
        n.fail(f"mode={mode!r} is not supported (constant, reflect, edge)")
    pads = _ints_input_or_attr(n, "pads", 1, 11)
    if n.opset < 11 and pads is None:
        n.fail("attribute 'pads' is required")
    if n.opset >= 11 and not n.input(1):
        n.fail("input 'pads' is required")
    x = n.shape(0)
    if pads is not None and x is not None and len(pads) != 2 * len(x):
        n.fail(f"pads={list(pads)} do not fit an input of rank {len(x)}")
    return G.Pad(mode, pads, float(n.attr("value", "float", 0.0)))


def _slice(n: _NodeReader):
    if n.opset < 10:
        starts, ends = n.attr("starts", "ints"), n.attr("ends", "ints")
        if starts is None or ends is None:
            n.fail("attributes 'starts' and 'ends' are required")
        return G.Slice(list(starts), list(ends), n.attr("axes", "ints"))
    if not n.input(1) or not n.input(2):
        n.fail("inputs 'starts' and 'ends' are required")
    return G.Slice()


def _split(n: _NodeReader):
    split = _ints_input_or_attr(n, "split", 1, 13)
    outputs = len(n.proto.output)
    count = n.attr("num_outputs", "int")
    if count is not None and count != outputs:
        n.fail(f"num_outputs={count} but the node has {outputs} outputs")
    if split is not None and len(split) != outputs:
        n.fail(f"split={list(split)} does not give {outputs} outputs")
    if n.opset >= 18 and count is None and not n.input(1):
        n.fail("either input 'split' or attribute 'num_outputs' is required")
    return G.Split(n.attr("axis", "int", 0), outputs, None if split is None else list(split))


def _constant_of_shape(n: _NodeReader):
    tensor = n.attr("value", "tensor")
    value = np.zeros(1, np.float32) if tensor is None else n.importer._array(tensor, n.label)
    if value.size != 1:
        n.fail(f"value must hold one element, got shape {value.shape}")
    return G.ConstantOfShape(value)


def _lrn(n: _NodeReader):
    size = n.attr("size", "int")
    if size is None or size < 1 or size % 2 == 0:
        n.fail(
            f"size={size}: an odd size >= 1 is required (an even window's centre differs between "
            "ONNX and torch, and onnxruntime refuses it)"
        )
    attrs = [
        float(n.attr(k, "float", d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0))
    ]
    return G.LRN(size, *attrs)


def _instance_norm(n: _NodeReader):
    x = n.shape(0)
    if x is not None and len(x) < 3:
        n.fail(f"expected an input (N, C, ...) with spatial axes, got {_dims(x)}")
    return G.InstanceNorm(float(n.attr("epsilon", "float", 1e-5)))


def _reduce(kind: str) -> Callable:
    since = 13 if kind == "ReduceSum" else 18  # axes: an attribute before, an input from then on

    def convert(n: _NodeReader):
        axes = _ints_input_or_attr(n, "axes", 1, since)
        x = n.shape(0)
        if axes is not None and x is not None and any(not -len(x) <= a < len(x) for a in axes):
            n.fail(f"axes={list(axes)} out of range for an input of rank {len(x)}")
        noop = bool(n.attr("noop_with_empty_axes", "int", 0))
        return G.Reduce(kind, bool(n.attr("keepdims", "int", 1)), axes, noop)

    return convert


def _depth_to_space(inverse: bool) -> Callable:
    def convert(n: _NodeReader):
        blocksize, mode = n.attr("blocksize", "int"), n.attr("mode", "string", "DCR")
        if blocksize is None or blocksize < 1:
            n.fail("attribute 'blocksize' (>= 1) is required")
        if mode not in ("DCR", "CRD"):
            n.fail(f"mode={mode!r} is not supported (DCR, CRD)")
        return G.DepthToSpace(blocksize, mode, inverse)

    return convert


_MULTI_OUTPUT = frozenset({"Split"})


_CONVERTERS: dict[str, tuple[Callable | None, frozenset]] = {
    name: (fn, frozenset(attrs))
    for name, fn, attrs in [
        ("Conv", _conv, ["auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"]),
        (
            "ConvTranspose",
            _conv_transpose,
            [
                "auto_pad",
                "dilations",
                "group",
                "kernel_shape",
                "output_padding",
                "output_shape",
                "pads",
                "strides",
            ],
        ),
        (
            "MaxPool",
            _pool("Max"),
            [
                "auto_pad",
                "ceil_mode",
                "dilations",
                "kernel_shape",
                "pads",
                "storage_order",
                "strides",
            ],
        ),
        (
            "AveragePool",
            _pool("Average"),
            [
                "auto_pad",
                "ceil_mode",
                "count_include_pad",
                "dilations",
                "kernel_shape",
                "pads",
                "strides",
            ],
        ),
        ("GlobalAveragePool", lambda n: G.GlobalPool("Average"), []),
        ("GlobalMaxPool", lambda n: G.GlobalPool("Max"), []),
        ("Relu", lambda n: G.relu(), []),
        ("LeakyRelu", lambda n: G.leaky_relu(float(n.attr("alpha", "float", 0.01))), ["alpha"]),
        *((kind, _unary(kind), list(attrs)) for kind, attrs in _UNARY_ATTRS.items()),
        ("Cast", _cast, ["to", "saturate"]),
        ("PRelu", _prelu, []),
        ("Pow", _broadcasting(G.Pow), []),
        *(
            (kind, _broadcasting(functools.partial(G.Variadic, kind)), [])
            for kind in ("Sum", "Mean", "Max", "Min")
        ),
        ("Pad", _pad, ["mode", "pads", "value"]),
        ("Slice", _slice, ["starts", "ends", "axes"]),
        ("Split", _split, ["axis", "split", "num_outputs"]),
        ("Tile", lambda n: G.Tile(), []),
        ("Expand", lambda n: G.Expand(), []),
        ("ConstantOfShape", _constant_of_shape, ["value"]),
        ("LRN", _lrn, ["size", "alpha", "beta", "bias"]),
        ("InstanceNormalization", _instance_norm, ["epsilon"]),
        *(
            (kind, _reduce(kind), ["axes", "keepdims", "noop_with_empty_axes"])
            for kind in ("ReduceSum", "ReduceMean", "ReduceMax")
        ),
        ("DepthToSpace", _depth_to_space(False), ["blocksize", "mode"]),
        ("SpaceToDepth", _depth_to_space(True), ["blocksize"]),
        ("Clip", _clip, ["min", "max"]),
        ("Gemm", _gemm, ["alpha", "beta", "transA", "transB"]),
        ("MatMul", _matmul, []),
        ("Add", _arithmetic("Add"), []),
        ("Sub", _arithmetic("Sub"), []),
        ("Mul", _arithmetic("Mul"), []),
        ("Div", _arithmetic("Div"), []),
        ("Flatten", _flatten, ["axis"]),
        ("Reshape", _reshape, ["allowzero"]),
        ("Transpose", _transpose, ["perm"]),
        ("Concat", _concat, ["axis"]),
        ("BatchNormalization", _batch_norm, ["epsilon", "momentum", "training_mode"]),
        ("Dropout", _dropout, ["ratio", "seed"]),
        ("Softmax", _softmax(log=False), ["axis"]),
        ("LogSoftmax", _softmax(log=True), ["axis"]),
        ("Identity", lambda n: G.Identity(), []),
        (
            "Constant",
            None,
            [
                "value",
                "value_float",
                "value_floats",
                "value_int",
                "value_ints",
                "sparse_value",
                "value_string",
                "value_strings",
            ],
        ),
        ("Squeeze", _squeeze, ["axes"]),
        ("Unsqueeze", _unsqueeze, ["axes"]),
        ("Shape", _shape, ["start", "end"]),
        ("Gather", lambda n: G.Gather(n.attr("axis", "int", 0)), ["axis"]),
    ]
}
SUPPORTED_OPERATORS = tuple(sorted(_CONVERTERS))


def _dims(shape) -> str:
    if shape is None:
        return "(?)"
    return (
        "("
        + ", ".join("?" if s is None else str(s) for s in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )


def _broadcastable(a, b) -> bool:
    return all(x is None or y is None or x == y or 1 in (x, y) for x, y in zip(a[::-1], b[::-1]))


def _broadcasts_to(shape, target) -> bool:
    """Unidirectional: `shape` broadcasts to `target` (Gemm's C)."""
    if len(shape) > len(target):
        return False
    return all(s is None or t is None or s in (1, t) for s, t in zip(shape[::-1], target[::-1]))


# ------------------------------------------------------------------------------------------------
# Export


def save(
    model,
    path,
    *,
    input_shape: tuple[int, ...] | None = None,
    meta: dict | None = None,
    opset: int = EXPORT_OPSET,
) -> None:
    """Write `model` as an ONNX file (a path, or a binary file object), checked with onnx.checker.

    `model` is a fastconv.nn.Sequential of Conv2d, ConvTranspose2d, MaxPool2d, AvgPool2d, ReLU, LeakyReLU,
    Flatten, Linear, Dropout (left out: the file is the inference form), BatchNorm1d/2d (with
    their running statistics), nested Sequentials; or a Graph from `load`, written back with
    its current weights. The batch dimension is dynamic ("N"); `input_shape` (without the batch,
    e.g. (1, 28, 28)) fixes the others, else those the first layer does not determine stay
    symbolic. Initializers are named by the state_dict keys, so `load(path).state_dict()` holds
    the same weights under the same keys. `meta` (JSON-able: classes, mean, std, ..., as
    fastconv.io.save_model's) is stored in the file's metadata_props; `load(path).meta` reads
    it back (a Graph's own `meta` is written when none is given). The file is replaced atomically.
    """
    onnx = _onnx()
    if isinstance(model, Graph):
        proto = _graph_to_proto(onnx, model)
        meta = getattr(model, "meta", None) if meta is None else meta
    else:
        proto = _Exporter(onnx, opset).export(model, input_shape)
    if meta:
        try:
            text = json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise ValueError(f"save: meta is not JSON-serialisable: {err}") from None
        kept = [p for p in proto.metadata_props if p.key != META_KEY]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        proto.metadata_props.add(key=META_KEY, value=text)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ValueError(
            f"save: the exported model fails onnx.checker: {_first_line(err)}"
        ) from None
    data = proto.SerializeToString()
    if hasattr(path, "write"):
        path.write(data)
    else:
        with atomic_write(path) as f:
            f.write(data)


def _graph_to_proto(onnx, graph: Graph):
    source = getattr(graph, "source", None)
    if source is None:
        raise ValueError(
            "save: this Graph was not read by fastconv.onnx.load; nothing to write it from"
        )
    proto = copy.deepcopy(source.template)
    arrays = dict(graph._state_arrays())
    arrays.update((n, v) for n, v in graph.constants.items() if n in source.constant_initializers)
    proto.graph.initializer.extend(
        onnx.numpy_helper.from_array(_contiguous(v), k) for k, v in arrays.items()
    )
    return proto


class _Exporter:
    def __init__(self, onnx, opset: int):
        self.onnx, self.helper, self.opset = onnx, onnx.helper, opset
        self.nodes: list = []
        self.initializers: list = []
        self.value, self.count = "input", 0
        self.rank = 0  # the current value's, set by export

    def export(self, model, input_shape):
        layers = list(_leaves(model, ""))
        if not layers:
            raise ValueError("save: the model has no layers")
        dtype = _float_dtype(model)
        first = next(
            (layer for _, layer in layers if not isinstance(layer, nn.Dropout)), layers[0][1]
        )
        if input_shape is not None:
            dims = ["N", *(int(d) for d in input_shape)]
        elif isinstance(first, (nn.Conv2d, nn.ConvTranspose2d)):
            dims = ["N", first.in_channels, "H", "W"]
        elif isinstance(first, nn.Linear):
            dims = ["N", first.in_features]
        elif isinstance(first, (nn.BatchNorm2d,)):
            dims = ["N", first.num_features, "H", "W"]
        elif isinstance(first, (nn.MaxPool2d, nn.AvgPool2d)):
            dims = ["N", "C", "H", "W"]
        else:
            raise ValueError(
                f"save: give input_shape (the input's rank is unknown for a model "
                f"starting with {type(first).__name__})"
            )
        self.rank = len(dims)
        for key, layer in layers:
            self._layer(key, layer)
        self.out_dims = ["N"] + [None] * (self.rank - 1)  # onnx.checker wants the rank
        if isinstance(layers[-1][1], nn.Linear):
            self.out_dims[-1] = layers[-1][1].out_features
        elem = self.helper.np_dtype_to_tensor_dtype(dtype)
        graph = self.helper.make_graph(
            self.nodes,
            "fastconv",
            [self.helper.make_tensor_value_info("input", elem, dims)],
            [self.helper.make_tensor_value_info(self.value, elem, self.out_dims)],
            self.initializers,
        )
        proto = self.helper.make_model(
            graph,
            producer_name="fastconv",
            opset_imports=[self.helper.make_opsetid("", self.opset)],
        )
        proto.ir_version = 8  # what onnxruntime releases of the last years all read
        return proto

    def _node(self, key: str, op_type: str, inputs: list[str], **attrs) -> None:
        self.count += 1
        out = f"{key}:{op_type}" if key else f"{op_type}_{self.count}"
        self.nodes.append(
            self.helper.make_node(op_type, [self.value, *inputs], [out], name=out, **attrs)
        )
        self.value = out

    def _tensor(self, name: str, array) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(_contiguous(array), name))
        return name

    def _weight_and_bias(self, prefix: str, layer) -> list[str]:
        names = [self._tensor(prefix + "weight", layer.weight.data)]
        if layer.bias is not None:
            names.append(self._tensor(prefix + "bias", layer.bias.data))
        return names

    def _layer(self, key: str, layer) -> None:
        prefix = f"{key}." if key else ""
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            if isinstance(layer, nn.Conv2d):
                t, b, lft, r = conv_padding(
                    layer.padding, layer.kernel_size, layer.stride, layer.dilation
                )
                op_type, geometry = "Conv", {"pads": [t, lft, b, r]}
            else:
                op_type = "ConvTranspose"
                geometry = {
                    "pads": list(layer.padding) * 2,
                    "output_padding": list(layer.output_padding),
                }
            self._node(
                key,
                op_type,
                self._weight_and_bias(prefix, layer),
                kernel_shape=list(layer.kernel_size),
                strides=list(layer.stride),
                dilations=list(layer.dilation),
                group=layer.groups,
                **geometry,
            )
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
            kernel, stride, pads = pair(layer.kernel_size), pair(layer.stride), pair(layer.padding)
            attrs = dict(
                kernel_shape=kernel, strides=stride, pads=pads * 2, ceil_mode=int(layer.ceil_mode)
            )
            if isinstance(layer, nn.MaxPool2d):
                self._node(key, "MaxPool", [], dilations=pair(layer.dilation), **attrs)
            else:
                self._node(
                    key, "AveragePool", [], count_include_pad=int(layer.count_include_pad), **attrs
                )
        elif isinstance(layer, nn.ReLU):
            self._node(key, "Relu", [])
        elif isinstance(layer, nn.LeakyReLU):
            self._node(key, "LeakyRelu", [], alpha=layer.negative_slope)
        elif isinstance(layer, nn.Dropout):
            pass  # the inference form
        elif isinstance(layer, nn.Flatten):
            self._flatten(key, layer)
        elif isinstance(layer, nn.Linear):
            self._linear(key, prefix, layer)
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self._batch_norm(key, prefix, layer)
        else:
            raise ValueError(
                f"save: layer {key or '0'} ({type(layer).__name__}) has no ONNX export"
            )

    def _flatten(self, key, layer) -> None:
        start = layer.start_dim % self.rank
        end = layer.end_dim % self.rank
        if end != self.rank - 1 or start == 0:
            raise ValueError(
                f"save: Flatten({layer.start_dim}, {layer.end_dim}) is exported only "
                "with start_dim >= 1 and end_dim = -1"
            )
        if start == 1:
            self._node(key, "Flatten", [], axis=1)
        else:
            shape = self._tensor(
                f"{key}.shape" if key else "flatten.shape", np.array([0] * start + [-1], np.int64)
            )
            self._node(key, "Reshape", [shape])
        self.rank = start + 1

    def _linear(self, key, prefix, layer) -> None:
        weight = self._tensor(prefix + "weight", layer.weight.data)
        bias = [self._tensor(prefix + "bias", layer.bias.data)] if layer.bias is not None else []
        if self.rank == 2:
            self._node(key, "Gemm", [weight, *bias], transB=1)
            return
        transposed = f"{prefix}weight_T"
        self.nodes.append(
            self.helper.make_node("Transpose", [weight], [transposed], name=transposed)
        )
        self._node(key, "MatMul", [transposed])
        if bias:
            self._node(f"{key}.bias" if key else "", "Add", bias)

    def _batch_norm(self, key, prefix, layer) -> None:
        if not layer.track_running_stats:
            raise ValueError(
                f"save: {type(layer).__name__} {key} has no running statistics "
                "(track_running_stats=False), so no inference form"
            )
        c, dtype = layer.num_features, layer.running_mean.dtype
        scale = layer.weight.data if layer.weight is not None else np.ones(c, dtype)
        bias = layer.bias.data if getattr(layer, "bias", None) is not None else np.zeros(c, dtype)
        names = [
            prefix + "weight" if layer.weight is not None else prefix + "onnx_scale",
            prefix + "bias" if getattr(layer, "bias", None) is not None else prefix + "onnx_bias",
        ]
        inputs = [
            self._tensor(names[0], scale),
            self._tensor(names[1], bias),
            self._tensor(prefix + "running_mean", layer.running_mean),
            self._tensor(prefix + "running_var", layer.running_var),
        ]
        self._node(key, "BatchNormalization", inputs, epsilon=layer.eps)


def _contiguous(array: np.ndarray) -> np.ndarray:
    """C order, and 0-d stays 0-d (np.ascontiguousarray would make it 1-d)."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _leaves(module, prefix: str):
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}{name}" if not prefix else f"{prefix}.{name}")
    else:
        yield prefix, module


def _float_dtype(model) -> np.dtype:
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        raise ValueError(f"save: the model mixes parameter dtypes {sorted(map(str, dtypes))}")
    return np.dtype(dtypes.pop()) if dtypes else np.dtype(np.float32)
