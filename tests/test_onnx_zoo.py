"""The model zoo's CNN architectures end to end: built with torch.nn (tests/zoo_architectures.py),
exported by torch.onnx.export at an old opset (7: upgraded at load by onnx.version_converter) and
a current one (17), loaded with fastconv.onnx.load, equal to onnxruntime's output within 1e-4
relative on a random 224x224 image. Narrower (and some shallower) than published, same
operators and structure, so that the file runs in well under a minute; SqueezeNet and ResNet-18
are the published widths. Three of them also fine-tune: parameter gradients equal torch's."""

from __future__ import annotations

import time

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="fastconv.onnx reads models with the onnx package")
pytest.importorskip("onnxruntime", reason="onnxruntime is the reference for the outputs")
torch = pytest.importorskip("torch", reason="the architectures are built and exported by torch")

import zoo_architectures as zoo  # noqa: E402
from conftest import assert_close  # noqa: E402
from test_onnx import export, onnxruntime_outputs  # noqa: E402

import fastconv.onnx as fo  # noqa: E402

RTOL = 1e-4
OLD, CURRENT = 7, 17

ARCHITECTURES = {  # (width divisor, depth divisor): see tests/zoo_architectures.py
    "squeezenet1.0": lambda: zoo.squeezenet("1.0", classes=100),
    "squeezenet1.1": lambda: zoo.squeezenet("1.1", classes=100),
    "shufflenet_v1": lambda: zoo.shufflenet(1, width=2, depth=2, classes=100),
    "shufflenet_v2": lambda: zoo.shufflenet(2, width=2, depth=2, classes=100),
    "mobilenet_v2": lambda: zoo.mobilenet_v2(width=2, classes=100),
    "resnet18": lambda: zoo.resnet((2, 2, 2, 2), classes=100),
    "resnet50": lambda: zoo.resnet((3, 4, 6, 3), bottleneck=True, width=4, classes=100),
    "densenet121": lambda: zoo.densenet121(width=2, depth=2, classes=100),
    "inception_v1": lambda: zoo.inception_v1(width=2, classes=100),
    "inception_v2": lambda: zoo.inception_v2(width=2, classes=100),
    "vgg19": lambda: zoo.vgg19(width=4, classes=100),
    "alexnet": lambda: zoo.alexnet(width=2, classes=100),
    "zfnet": lambda: zoo.zfnet(width=2, classes=100),
}


@pytest.fixture(scope="module")
def exports():
    """{name: (torch model, {opset: ONNX bytes})}, each exported once for the module."""
    cache: dict = {}

    def get(name, opset):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = (zoo.randomise_batchnorm(ARCHITECTURES[name](), 1), {})
        model, files = cache[name]
        if opset not in files:
            files[opset] = export(torch, model, (3, 224, 224), opset)  # dynamic batch
        return model, files[opset]

    return get


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)


@pytest.mark.parametrize("opset", [OLD, CURRENT])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_matches_onnxruntime(exports, image, name, opset):
    model, data = exports(name, opset)
    proto = onnx.load_from_string(data)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == opset
    (expected,) = onnxruntime_outputs(data, {"input": image})
    start = time.perf_counter()
    imported = fo.load(data)
    actual = imported(image)
    assert_close(actual, expected, RTOL, what=f"{name} at opset {opset}")
    assert time.perf_counter() - start < 60  # catches a pathological slow path, not a slow CI
    if opset == CURRENT:  # and torch agrees: the export itself is faithful
        with torch.no_grad():
            assert_close(model(torch.from_numpy(image)).numpy(), expected, RTOL, what=name)


@pytest.mark.parametrize("name", ["shufflenet_v2", "inception_v1", "densenet121"])
def test_imported_architecture_gradients_equal_torch_autograd(name):
    """Fine-tuning an import: every parameter's gradient (Split, LRN, Concat, BatchNorm in its
    inference form...) equals torch autograd's on the same eval-mode model."""
    torch.manual_seed(3)
    model = zoo.randomise_batchnorm(ARCHITECTURES[name](), 2)
    imported = fo.load(export(torch, model, (3, 96, 96), CURRENT, fold=False))
    x = np.random.default_rng(1).standard_normal((2, 3, 96, 96)).astype(np.float32)
    weights = np.random.default_rng(2).standard_normal((2, 100)).astype(np.float32)
    imported.train()  # the graph computes the inference form in train() too
    imported.zero_grad()
    imported(x)
    imported.backward(weights)
    model.zero_grad()
    (model(torch.from_numpy(x)) * torch.from_numpy(weights)).sum().backward()
    torch_params = dict(model.named_parameters())
    params = list(imported.named_parameters())
    assert len(params) == len(torch_params)
    for key, param in params:
        assert_close(param.grad, torch_params[key].grad.numpy(), RTOL, what=key)
