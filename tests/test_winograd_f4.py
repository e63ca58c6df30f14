"""Winograd F(4x4, 3x3) (AVX-512 transforms) against the float64 reference, and proof that it
ran: the forward and the input gradient of 3x3 stride-1 convolutions with outputs of 12 or more
rows and columns, and, called directly, the small and ragged shapes auto never gives it (rows
of up to 4 tiles go two to a vector, with an odd last row)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv as fc
from fastconv import _conv, reference
from fastconv import functional as F

pytestmark = pytest.mark.skipif(
    not F._winograd4_pays((1, 1, 16, 16)), reason="F(4x4, 3x3) needs the AVX-512 kernels"
)
EXAMPLES = int(os.environ.get("FASTCONV_FUZZ_EXAMPLES", "200")) // 4 or 1
TOLERANCE = 1e-5  # of the largest sum of |terms| behind one output, as in test_winograd.py


def error(actual, expected, magnitude):
    return float(np.abs(actual - expected).max()) / max(float(np.abs(magnitude).max()), 1e-30)


@pytest.fixture(autouse=True)
def winograd_forced():
    before = fc.get_conv_algorithm()
    fc.set_conv_algorithm("winograd")
    yield
    fc.set_conv_algorithm(before)


@pytest.fixture
def f4_calls(monkeypatch):
    count = []
    original = _conv.winograd4_conv2d_forward

    def spy(*args):
        count.append(1)
        return original(*args)

    monkeypatch.setattr(_conv, "winograd4_conv2d_forward", spy)
    return count


cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 3),
        "c_in": st.integers(1, 24),
        "c_out": st.integers(1, 24),
        "h": st.integers(10, 41),
        "w": st.integers(10, 41),
        "padding": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(cases)
def test_forward_and_input_gradient_match_the_float64_reference(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c_in"], case["h"], case["w"])).astype(np.float32)
    w = rng.standard_normal((case["c_out"], case["c_in"], 3, 3)).astype(np.float32)
    b = rng.standard_normal(case["c_out"]).astype(np.float32) if case["bias"] else None
    pad = case["padding"]
    count = []
    original = _conv.winograd4_conv2d_forward
    _conv.winograd4_conv2d_forward = lambda *a: count.append(1) or original(*a)
    try:
        y = fc.conv2d(x, w, b, padding=pad)
        gy = rng.standard_normal(y.shape).astype(np.float32)
        gx = fc.conv2d_backward(gy, x, w, padding=pad)[0]
    finally:
        _conv.winograd4_conv2d_forward = original
    # F(4x4) for every pass whose output is 12x12 or more (the input gradient's is x's size)
    assert len(count) == (min(y.shape[2:]) >= 12) + (min(x.shape[2:]) >= 12)
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    b64 = None if b is None else b.astype(np.float64)
    expected = reference.conv2d(x64, w64, b64, padding=pad)
    size = reference.conv2d(
        np.abs(x64), np.abs(w64), None if b is None else np.abs(b64), padding=pad
    )
    assert y.shape == expected.shape and y.dtype == np.float32
    assert error(y, expected, size) < TOLERANCE
    egx = reference.conv2d_backward(gy64, x64, w64, padding=pad)[0]
    sgx = reference.conv2d_backward(np.abs(gy64), np.abs(x64), np.abs(w64), padding=pad)[0]
    assert gx.shape == x.shape and error(gx, egx, sgx) < TOLERANCE


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(
    "shape",  # (n, c_in, c_out, h, w, pad): 1-4 tiles a row (paired rows), 5-9 (one step), 10+
    [
        (1, 3, 5, 1, 1, 1),
        (2, 4, 6, 5, 7, 1),
        (3, 8, 3, 9, 13, 2),
        (1, 2, 9, 20, 16, 1),
        (2, 5, 4, 7, 21, 0),
        (1, 6, 17, 11, 37, 3),
        (2, 40, 33, 6, 6, 1),
    ],
)
def test_small_and_ragged_shapes_called_directly(shape, flip, monkeypatch, f4_calls):
    n, c_in, c_out, h, w_, pad = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((n, c_in if not flip else c_out, h, w_)).astype(np.float32)
    w = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)
    b = None if flip else rng.standard_normal(c_out).astype(np.float32)
    out_h, out_w = h + 2 * pad - 2, w_ + 2 * pad - 2
    out = np.full((n, c_in if flip else c_out, out_h, out_w), np.nan, np.float32)
    monkeypatch.setattr(F, "_winograd4_pays", lambda args: True)  # auto: 12x12 and up only
    F._winograd_conv2d(x, w, b, out, (pad, pad, out_h, out_w), fc.get_num_threads(), flip=flip)
    assert f4_calls == [1]
    filters = np.flip(w, (2, 3)).transpose(1, 0, 2, 3) if flip else w
    x64, f64 = x.astype(np.float64), filters.astype(np.float64)
    expected = reference.conv2d(x64, f64, None if b is None else b.astype(np.float64), padding=pad)
    assert error(out, expected, reference.conv2d(np.abs(x64), np.abs(f64), padding=pad)) < TOLERANCE


def test_auto_and_forced_winograd_agree_with_f2(f4_calls):
    """The same convolution by F(4x4) and by F(2x2): both within float32 rounding of each other."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 32, 28, 28)).astype(np.float32)
    w = rng.standard_normal((48, 32, 3, 3)).astype(np.float32)
    y4 = fc.conv2d(x, w, padding=1)
    assert len(f4_calls) == 1
    F._use_winograd4 = False
    try:
        y2 = fc.conv2d(x, w, padding=1)
    finally:
        F._use_winograd4 = True
    assert len(f4_calls) == 1
    size = reference.conv2d(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)), padding=1)
    assert error(y4, y2, size) < TOLERANCE
