"""Winograd F(2x2, 3x3) convolution against the float64 reference, and proof of which path ran.

Every test forces an algorithm with fastconv.set_conv_algorithm and spies on the compiled entry
points, so a Winograd test that silently ran the direct kernel (or the reverse) fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv as fc
from fastconv import _conv, reference
from fastconv import functional as F

EXAMPLES = int(os.environ.get("FASTCONV_FUZZ_EXAMPLES", "200")) // 4 or 1
# Of the largest |expected|, or, on random cases, of the largest sum of |terms| behind one
# output (the same computation on |inputs|): an output that cancels to near zero carries the
# rounding of its terms, not of itself, in every summation order, direct or Winograd.
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def restore_algorithm():
    before = fc.get_conv_algorithm()
    yield
    fc.set_conv_algorithm(before)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the compiled convolution entry points called during the test."""
    counts = {}
    for name in (
        "winograd_conv2d_forward",
        "winograd4_conv2d_forward",
        "winograd_conv2d_weight_grad",
        "conv2d_forward",
        "conv2d_backward",
    ):
        original = getattr(_conv, name)

        def spy(*args, _original=original, _name=name):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args)

        monkeypatch.setattr(_conv, name, spy)
    return counts


def relative_error(actual, expected, magnitude=None):
    """max |actual - expected| over max |magnitude| (``expected`` when not given)."""
    magnitude = expected if magnitude is None else magnitude
    scale = max(float(np.abs(magnitude).max()), 1e-30)
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


conv_cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 3),
        "c_in": st.integers(1, 20),
        "c_out": st.integers(1, 20),
        "h": st.integers(1, 13),
        "w": st.integers(1, 13),
        "padding": st.one_of(
            st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 3)), st.just("same")
        ),
        "bias": st.booleans(),
        "unbatched": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _padding_pair(padding):
    if padding == "same":
        return (1, 1)
    return (padding, padding) if isinstance(padding, int) else padding


@settings(max_examples=EXAMPLES, deadline=None)
@given(conv_cases)
def test_winograd_forward_and_gradients_match_the_float64_reference(case):
    ph, pw = _padding_pair(case["padding"])
    if case["h"] + 2 * ph < 3 or case["w"] + 2 * pw < 3:
        return  # no output: the argument check refuses it for every algorithm
    rng = np.random.default_rng(case["seed"])
    shape = (case["n"], case["c_in"], case["h"], case["w"])
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((case["c_out"], case["c_in"], 3, 3)).astype(np.float32)
    b = rng.standard_normal(case["c_out"]).astype(np.float32) if case["bias"] else None
    if case["unbatched"]:
        x = x[0]
    fc.set_conv_algorithm("winograd")
    counts = {}
    originals = {
        n: getattr(_conv, n) for n in ("winograd_conv2d_forward", "winograd4_conv2d_forward")
    }

    def spy(*args, _name):
        counts["forward"] = counts.get("forward", 0) + 1
        return originals[_name](*args)

    for name in originals:
        setattr(_conv, name, lambda *args, _name=name: spy(*args, _name=_name))
    try:
        y = fc.conv2d(x, w, b, padding=case["padding"])
        gy = rng.standard_normal(y.shape).astype(np.float32)
        gx, gw, gb = fc.conv2d_backward(gy, x, w, padding=case["padding"])
    finally:
        for name, original in originals.items():
            setattr(_conv, name, original)
    # the output and the input gradient both ran Winograd (F(2x2), or F(4x4) from 12x12 on)
    assert counts["forward"] == 2

    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    b64 = None if b is None else b.astype(np.float64)
    expected = reference.conv2d(x64, w64, b64, padding=case["padding"])
    egx, egw, egb = reference.conv2d_backward(gy64, x64, w64, padding=case["padding"])
    size = reference.conv2d(
        np.abs(x64), np.abs(w64), None if b64 is None else np.abs(b64), padding=case["padding"]
    )
    sgx, sgw, sgb = reference.conv2d_backward(
        np.abs(gy64), np.abs(x64), np.abs(w64), padding=case["padding"]
    )
    assert y.dtype == gx.dtype == gw.dtype == np.float32
    assert y.shape == expected.shape and gx.shape == x.shape and gw.shape == w.shape
    assert relative_error(y, expected, size) < TOLERANCE
    assert relative_error(gx, egx, sgx) < TOLERANCE
    assert relative_error(gw, egw, sgw) < TOLERANCE
    assert relative_error(gb, egb, sgb) < TOLERANCE


@pytest.mark.parametrize("shape", [(64, 32, 14, 14, 64), (8, 64, 32, 32, 64), (3, 17, 9, 31, 5)])
def test_winograd_on_benchmark_shapes(shape, calls):
    n, c_in, h, w_, c_out = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c_in, h, w_)).astype(np.float32)
    w = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)
    fc.set_conv_algorithm("winograd")
    y = fc.conv2d(x, w, padding=1)
    gx, gw, _ = fc.conv2d_backward(np.ones_like(y), x, w, padding=1)
    # F(4x4) where it pays (outputs of 16 or more, AVX-512), else F(2x2): Winograd either way
    f4 = 2 if F._winograd4_pays((1, 1, h, w_)) else 0
    expected_calls = {"winograd_conv2d_forward": 2 - f4, "winograd4_conv2d_forward": f4}
    assert calls == {"winograd_conv2d_weight_grad": 1} | {
        k: v for k, v in expected_calls.items() if v
    }
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    assert relative_error(y, reference.conv2d(x64, w64, padding=1)) < TOLERANCE
    egx, egw, _ = reference.conv2d_backward(np.ones(y.shape), x64, w64, padding=1)
    assert relative_error(gx, egx) < TOLERANCE
    assert relative_error(gw, egw) < TOLERANCE


def test_output_mask_skips_the_passes_not_asked_for(calls):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    fc.set_conv_algorithm("winograd")
    gy = np.ones((2, 16, 8, 8), np.float32)
    gx, gw, gb = fc.conv2d_backward(gy, x, w, padding=1, output_mask=(False, True, False))
    assert gx is None and gb is None and gw.shape == w.shape
    assert calls == {"winograd_conv2d_weight_grad": 1}


def test_direct_forced_never_runs_winograd(calls):
    x = np.ones((2, 32, 8, 8), np.float32)
    w = np.ones((32, 32, 3, 3), np.float32)
    fc.set_conv_algorithm("direct")
    y = fc.conv2d(x, w, padding=1)
    fc.conv2d_backward(np.ones_like(y), x, w, padding=1)
    assert calls == {"conv2d_forward": 1, "conv2d_backward": 1}


@pytest.mark.parametrize(
    "dtype, kwargs, weight_shape",
    [
        (np.float64, {"padding": 1}, (32, 32, 3, 3)),  # float64 stays direct
        (np.float32, {"stride": 2}, (32, 32, 3, 3)),
        (np.float32, {"dilation": 2}, (32, 32, 3, 3)),
        (np.float32, {"groups": 2}, (32, 16, 3, 3)),
        (np.float32, {}, (32, 32, 5, 5)),
    ],
)
def test_winograd_only_where_it_applies(dtype, kwargs, weight_shape, calls):
    x = np.random.default_rng(3).standard_normal((2, 32, 12, 12)).astype(dtype)
    w = np.random.default_rng(4).standard_normal(weight_shape).astype(dtype)
    fc.set_conv_algorithm("winograd")
    y = fc.conv2d(x, w, **kwargs)
    assert "winograd_conv2d_forward" not in calls and calls["conv2d_forward"] == 1
    np.testing.assert_allclose(y, reference.conv2d(x, w, **kwargs), rtol=1e-4, atol=1e-4)


def test_auto_runs_what_conv2d_algorithm_names(calls):
    rng = np.random.default_rng(5)
    fc.set_conv_algorithm("auto")
    for c_in in (1, 4, F.WINOGRAD_MIN_CHANNELS, 48, F.WINOGRAD_MAX_CHANNELS, 160):
        x = rng.standard_normal((2, c_in, 10, 10)).astype(np.float32)
        w = rng.standard_normal((32, c_in, 3, 3)).astype(np.float32)
        geometry = fc._args.conv_args(x, w, 1, 1, 1, 1).geometry
        expected = F.conv2d_algorithm(geometry, 32, 1, np.float32)
        calls.clear()
        fc.conv2d(x, w, padding=1)
        ran = "winograd" if "winograd_conv2d_forward" in calls else "direct"
        assert ran == expected
        pays = F.WINOGRAD_MIN_CHANNELS <= c_in <= F.WINOGRAD_MAX_CHANNELS
        assert expected == ("winograd" if pays else "direct")


def test_set_conv_algorithm_refuses_unknown_names():
    with pytest.raises(ValueError, match="algorithm: expected one of auto, direct, winograd"):
        fc.set_conv_algorithm("fft")
    assert fc.get_conv_algorithm() in F.CONV_ALGORITHMS


def test_environment_variable_chooses_the_algorithm_and_is_checked():
    code = "import fastconv; print(fastconv.get_conv_algorithm())"
    env = dict(os.environ, FASTCONV_CONV_ALGO="winograd")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "winograd", out.stderr
    env["FASTCONV_CONV_ALGO"] = "fastest"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FASTCONV_CONV_ALGO: expected one of" in out.stderr


def test_winograd_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 24, 11, 14)).astype(np.float32)
    w = rng.standard_normal((40, 24, 3, 3)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    fc.set_conv_algorithm("winograd")
    y = fc.conv2d(x, w, b, padding=(1, 2))
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx, gw, gb = fc.conv2d_backward(gy, x, w, padding=(1, 2))
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, padding=(1, 2))
    ty.backward(torch.from_numpy(gy))
    for ours, theirs in ((y, ty), (gx, tx.grad), (gw, tw.grad), (gb, tb.grad)):
        theirs = theirs.detach().numpy()
        assert relative_error(ours, theirs.astype(np.float64)) < TOLERANCE


def test_non_finite_inputs_take_the_direct_path_and_keep_torchs_infinities(calls):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    x[0, 3, 4, 4] = np.inf
    fc.set_conv_algorithm("winograd")
    y = fc.conv2d(x, w, padding=1)
    assert calls == {"conv2d_forward": 1}
    expected = reference.conv2d(x, w, padding=1)
    np.testing.assert_array_equal(np.isinf(y), np.isinf(expected))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))


pool_cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 3),
        "c_in": st.integers(1, 20),
        "c_out": st.integers(1, 20),
        "h": st.integers(2, 15),
        "w": st.integers(2, 15),
        "padding": st.integers(0, 2),
        "bias": st.booleans(),
        "with_indices": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(pool_cases)
def test_winograd_with_fused_max_pool_matches_the_reference(case):
    """The pooled output transform: values and torch's indices of max_pool2d(conv2d(x), 2)."""
    p = case["padding"]
    if min(case["h"], case["w"]) + 2 * p - 2 < 2:
        return  # no 2x2 window fits the convolution's output
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c_in"], case["h"], case["w"])).astype(np.float32)
    w = rng.standard_normal((case["c_out"], case["c_in"], 3, 3)).astype(np.float32)
    b = rng.standard_normal(case["c_out"]).astype(np.float32) if case["bias"] else None
    fc.set_conv_algorithm("winograd")
    counts = {}
    original = _conv.winograd_conv2d_forward

    def spy(*args):
        counts["pool mode"] = args[-2]
        return original(*args)

    _conv.winograd_conv2d_forward = spy
    try:
        result = F._conv2d_max_pool2d(
            x, w, b, 1, p, 1, 1, (2, 2, 0, 1, False), case["with_indices"]
        )
    finally:
        _conv.winograd_conv2d_forward = original
    assert result is not None and counts["pool mode"] == (2 if case["with_indices"] else 1)
    pooled, indices, conv_shape = result
    conv = reference.conv2d(
        x.astype(np.float64),
        w.astype(np.float64),
        None if b is None else b.astype(np.float64),
        padding=p,
    )
    expected, expected_indices = reference.max_pool2d(conv, 2, return_indices=True)
    size = reference.conv2d(
        np.abs(x.astype(np.float64)),
        np.abs(w.astype(np.float64)),
        None if b is None else np.abs(b.astype(np.float64)),
        padding=p,
    )
    assert conv_shape == conv.shape and pooled.shape == expected.shape
    assert relative_error(pooled, expected, size) < TOLERANCE
    if case["with_indices"]:
        # equal, except where two window entries tie within float32 rounding
        chosen = np.take_along_axis(
            conv.reshape(*conv.shape[:2], -1), indices.reshape(*indices.shape[:2], -1), axis=2
        )
        assert relative_error(chosen.reshape(expected.shape), expected, size) < TOLERANCE
        assert (indices == expected_indices).mean() > 0.99


def test_sequential_pools_inside_the_winograd_transform(calls):
    from fastconv import nn

    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, rng=0), nn.ReLU(), nn.MaxPool2d(2))
    x = np.random.default_rng(8).standard_normal((4, 16, 10, 10)).astype(np.float32)
    fc.set_conv_algorithm("winograd")
    y = model(x)
    assert calls == {"winograd_conv2d_forward": 1}
    w, b = (p.data.astype(np.float64) for p in (model.layers[0].weight, model.layers[0].bias))
    x64 = x.astype(np.float64)
    conv = reference.conv2d(x64, w, b, padding=1)
    expected = reference.max_pool2d(np.maximum(conv, 0), 2)
    assert relative_error(y, expected) < TOLERANCE
    model.zero_grad()
    model.backward(np.ones_like(y))  # the first layer: no input gradient
    assert calls == {"winograd_conv2d_forward": 1, "winograd_conv2d_weight_grad": 1}
    grad_conv = reference.max_pool2d_backward(np.ones(expected.shape), np.maximum(conv, 0), 2)
    expected_grad = reference.conv2d_backward(grad_conv * (conv > 0), x64, w, padding=1)[1]
    assert relative_error(model.layers[0].weight.grad, expected_grad) < TOLERANCE


@pytest.mark.parametrize("microkernels", [True, False])
@pytest.mark.parametrize("c_in, c_out", [(19, 21), (7, 3), (40, 13), (70, 9)])
def test_both_product_backends_match_the_reference(microkernels, c_in, c_out):
    """The micro-kernels and the portable BLAS path give the same answers. The channel counts
    reach every column block of the weight gradient's kernel (1, 2, 3 and 3 + 2 vectors of
    input channels) and each of its row blocks (8, 4, 1 output channels)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, c_in, 9, 12)).astype(np.float32)
    w = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)
    fc.set_conv_algorithm("winograd")
    before = _conv.winograd_products_backend()
    _conv.use_winograd_microkernels(microkernels)
    try:
        assert _conv.winograd_products_backend() == ("micro-kernel" if microkernels else "BLAS")
        y = fc.conv2d(x, w, padding=1)
        gx, gw, _ = fc.conv2d_backward(np.ones_like(y), x, w, padding=1)
    finally:
        _conv.use_winograd_microkernels(before == "micro-kernel")
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    assert relative_error(y, reference.conv2d(x64, w64, padding=1)) < TOLERANCE
    egx, egw, _ = reference.conv2d_backward(np.ones(y.shape), x64, w64, padding=1)
    assert relative_error(gx, egx) < TOLERANCE and relative_error(gw, egw) < TOLERANCE
