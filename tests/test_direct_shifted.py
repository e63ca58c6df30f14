"""The direct path without im2col (shifted views of a padded image, or of its phase planes for
a stride, on the micro-kernel) against the float64 reference, with a spy proving which direct
variant ran."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv as fc
from fastconv import _conv, reference
from fastconv import functional as F

EXAMPLES = int(os.environ.get("FASTCONV_FUZZ_EXAMPLES", "200")) // 4 or 1


@pytest.fixture(autouse=True)
def direct_only():
    before = fc.get_conv_algorithm()
    fc.set_conv_algorithm("direct")
    yield
    fc.set_conv_algorithm(before)


def _spy_shifted(monkeypatch):
    """Records the `shifted` flag of every conv2d_forward / fused conv + pool call."""
    seen = []
    for name, flag_position in (("conv2d_forward", -2), ("conv2d_max_pool_forward", -2)):
        original = getattr(_conv, name)

        def spy(*args, _original=original, _at=flag_position):
            seen.append(bool(args[_at]))
            return _original(*args)

        monkeypatch.setattr(_conv, name, spy)
    return seen


cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 3),
        "c_in": st.integers(1, 12),
        "c_out": st.integers(1, 20),
        "h": st.integers(1, 16),
        "w": st.integers(1, 16),
        "k": st.integers(1, 6),
        "padding": st.integers(0, 3),
        "stride": st.sampled_from([(1, 1), (1, 1), (2, 2), (3, 3), (1, 2), (2, 1)]),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(cases)
def test_shifted_direct_convolution_matches_the_reference(case):
    p, k = case["padding"], case["k"]
    if case["h"] + 2 * p < k or case["w"] + 2 * p < k:
        return
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c_in"], case["h"], case["w"])).astype(np.float32)
    w = rng.standard_normal((case["c_out"], case["c_in"], k, k)).astype(np.float32)
    b = rng.standard_normal(case["c_out"]).astype(np.float32) if case["bias"] else None
    y = fc.conv2d(x, w, b, stride=case["stride"], padding=p)
    expected = reference.conv2d(
        x.astype(np.float64),
        w.astype(np.float64),
        None if b is None else b.astype(np.float64),
        stride=case["stride"],
        padding=p,
    )
    scale = max(np.abs(expected).max(), 1.0)
    assert y.shape == expected.shape
    assert np.abs(y - expected).max() <= 1e-5 * scale


@pytest.mark.parametrize(
    "kwargs, shifted",
    [
        ({"padding": 2}, True),
        ({"stride": 2}, True),  # strided: shifted views of the phase planes
        ({"stride": (3, 2), "padding": 1}, True),
        ({"dilation": 2}, False),
    ],
)
def test_shifted_path_runs_exactly_where_it_applies(monkeypatch, kwargs, shifted):
    seen = _spy_shifted(monkeypatch)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 14, 14)).astype(np.float32)
    w = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    y = fc.conv2d(x, w, **kwargs)
    assert seen == [shifted and _conv.winograd_products_backend() == "micro-kernel"]
    np.testing.assert_allclose(y, reference.conv2d(x, w, **kwargs), rtol=1e-4, atol=1e-4)


def test_fused_conv_and_pool_on_the_shifted_path(monkeypatch):
    seen = _spy_shifted(monkeypatch)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    w = rng.standard_normal((6, 1, 5, 5)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    pooled, indices, shape = F._conv2d_max_pool2d(x, w, b, 1, 2, 1, 1, (2, 2, 0, 1, False), True)
    assert seen == [_conv.winograd_products_backend() == "micro-kernel"]
    conv = reference.conv2d(
        x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=2
    )
    expected, expected_indices = reference.max_pool2d(conv, 2, return_indices=True)
    assert shape == conv.shape
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-5)
    assert (indices == expected_indices).mean() > 0.99  # ties within rounding may differ


def _spy_shifted_weight_grad(monkeypatch):
    """Counts the calls of the shifted weight-gradient kernel."""
    calls = []
    original = _conv.conv2d_weight_grad_shifted

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(_conv, "conv2d_weight_grad_shifted", spy)
    return calls


@settings(max_examples=EXAMPLES, deadline=None)
@given(cases)
def test_shifted_weight_gradient_matches_the_reference(case):
    p, k = case["padding"], case["k"]
    c_in = max(case["c_in"], -(-48 // (k * k)))  # 48 taps or more: the shifted kernel's range
    if case["h"] + 2 * p < k or case["w"] + 2 * p < k:
        return
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], c_in, case["h"], case["w"])).astype(np.float32)
    w = rng.standard_normal((case["c_out"], c_in, k, k)).astype(np.float32)
    y_shape = fc.conv2d(x, w, stride=case["stride"], padding=p).shape
    grad = rng.standard_normal(y_shape).astype(np.float32)
    grad_input, grad_weight, grad_bias = F.conv2d_backward(
        grad, x, w, stride=case["stride"], padding=p
    )
    expected = reference.conv2d_backward(
        grad.astype(np.float64),
        x.astype(np.float64),
        w.astype(np.float64),
        stride=case["stride"],
        padding=p,
    )
    for got, want in zip((grad_input, grad_weight, grad_bias), expected):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1.0)


@pytest.mark.parametrize(
    "c_in, k, kwargs, shifted",
    [
        (6, 5, {}, True),  # 150 taps
        (32, 3, {"stride": 2, "padding": 1}, True),  # strided: views of the phase planes
        (6, 3, {"padding": 1}, True),  # 54 taps
        (5, 3, {"padding": 1}, False),  # 45 taps: BLAS measured faster
        (1, 3, {"padding": 1}, False),
        (6, 5, {"dilation": 2}, False),
    ],
)
def test_shifted_weight_gradient_runs_exactly_where_it_applies(
    monkeypatch, c_in, k, kwargs, shifted
):
    calls = _spy_shifted_weight_grad(monkeypatch)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, c_in, 14, 14)).astype(np.float32)
    w = rng.standard_normal((10, c_in, k, k)).astype(np.float32)
    grad = rng.standard_normal(fc.conv2d(x, w, **kwargs).shape).astype(np.float32)
    _, grad_weight, _ = F.conv2d_backward(grad, x, w, **kwargs, output_mask=(False, True, False))
    runs_here = (
        _conv.has_shifted_weight_grad and _conv.winograd_products_backend() == "micro-kernel"
    )
    assert len(calls) == (1 if shifted and runs_here else 0)
    expected = reference.conv2d_backward(grad, x, w, **kwargs)[1]
    np.testing.assert_allclose(grad_weight, expected, rtol=1e-4, atol=1e-4)
