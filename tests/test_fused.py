"""The fused Conv2d + MaxPool2d path (functional._conv2d_max_pool2d, used by nn.Sequential): random
cases against reference.max_pool2d(reference.conv2d(...)) for values, indices and gradients, and
a spy proving Sequential took the fused path (and that the spy notices when it did not)."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
from conftest import assert_close, conv_cases, random_array
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastconv import _blas, functional, nn
from fastconv import reference as ref

EXAMPLES = min(int(os.environ.get("FASTCONV_FUZZ_EXAMPLES", "300")), 1000)
# Gradients pass through sums of many products: a looser tolerance than for the values.
GRAD_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


@st.composite
def fused_cases(draw):
    """(conv case, pool arguments); with padding 0 and floor mode every window is interior."""
    case = draw(conv_cases(bias=None).filter(lambda c: c.args[0].shape[0] >= 1))
    out_h, out_w = ref.conv2d(*case.args, **case.kwargs).shape[2:]
    kh, kw = draw(st.integers(1, min(3, out_h))), draw(st.integers(1, min(3, out_w)))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    interior = draw(st.booleans())
    ph, pw = (0, 0) if interior else (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    assume(dh * (kh - 1) + 1 <= out_h + 2 * ph and dw * (kw - 1) + 1 <= out_w + 2 * pw)
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pool = ((kh, kw), stride, (ph, pw), (dh, dw), False if interior else draw(st.booleans()))
    return case, pool


def _conv_layer(case):
    x, weight, bias = case.args
    k = case.kwargs
    layer = nn.Conv2d(
        x.shape[1],
        weight.shape[0],
        weight.shape[2:],
        k["stride"],
        k["padding"],
        k["dilation"],
        k["groups"],
        bias=bias is not None,
        dtype=x.dtype,
    )
    layer.weight.data[...] = weight
    if bias is not None:
        layer.bias.data[...] = bias
    return layer


@contextmanager
def fused_spy():
    """Counts the fused calls and how many of them ran (returned a result, not None). Looks the
    function up on fastconv.functional at call time, as the layers do."""
    counts = {"calls": 0, "fused": 0}
    real = functional._conv2d_max_pool2d

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        counts["calls"] += 1
        counts["fused"] += result is not None
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(functional, "_conv2d_max_pool2d", spy)
        yield counts


def fuses() -> bool:
    """Where the fusion applies at all (batched input, BLAS called from the kernels)."""
    return _blas.kernels_call_blas()


@settings(max_examples=EXAMPLES)
@given(fused_cases())
def test_fused_values_and_indices_match_the_reference(drawn):
    case, pool = drawn
    x, weight, bias = case.args
    k = case.kwargs
    result = functional._conv2d_max_pool2d(
        x,
        weight,
        bias,
        k["stride"],
        k["padding"],
        k["dilation"],
        k["groups"],
        pool,
        with_indices=True,
    )
    interior = pool[2] == (0, 0) and not pool[4]
    if result is None:
        assert not (interior and fuses()), "the fusion declined an interior case"
        return
    conv = ref.conv2d(*case.args, **k)
    expected, indices = ref.max_pool2d(conv, *pool, return_indices=True)
    out, got_indices, conv_shape = result
    assert conv_shape == conv.shape
    assert_close(out, expected, what="values")
    np.testing.assert_array_equal(got_indices, indices)
    values_only = functional._conv2d_max_pool2d(
        x,
        weight,
        bias,
        k["stride"],
        k["padding"],
        k["dilation"],
        k["groups"],
        pool,
        with_indices=False,
    )
    assert values_only[1] is None
    np.testing.assert_array_equal(values_only[0], out)


@settings(max_examples=EXAMPLES)
@given(fused_cases(), st.integers(0, 2**32 - 1))
def test_sequential_gradients_through_the_fused_path_match_the_reference(drawn, seed):
    case, pool = drawn
    x, weight, _ = case.args
    k = case.kwargs
    conv_layer = _conv_layer(case)
    model = nn.Sequential(
        conv_layer, nn.MaxPool2d(*pool[:4], ceil_mode=pool[4]), needs_input_grad=True
    )
    with fused_spy() as counts:
        out = model(x)
    interior = pool[2] == (0, 0) and not pool[4]
    assert counts["calls"] == 1
    if interior and fuses():
        assert counts["fused"] == 1, "Sequential did not take the fused path"
    conv = ref.conv2d(*case.args, **k)
    assert_close(out, ref.max_pool2d(conv, *pool), what="values")
    grad = random_array(seed, out.shape, out.dtype)
    grad_input = model.backward(grad)
    grad_conv = ref.max_pool2d_backward(grad, conv, *pool)
    expected = ref.conv2d_backward(grad_conv, x, weight, **k)
    rtol = GRAD_RTOL[x.dtype]
    assert_close(grad_input, expected[0], rtol, what="grad input")
    assert_close(conv_layer.weight.grad, expected[1], rtol, what="grad weight")
    if conv_layer.bias is not None:
        assert_close(conv_layer.bias.grad, expected[2], rtol, what="grad bias")


def lenet_block():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, rng=0),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, rng=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    return model, np.random.default_rng(0).standard_normal((3, 2, 12, 12), dtype=np.float32)


def assert_sequential_fuses(model, x):
    """Both Conv2d + MaxPool2d pairs ran fused, in training and under no_grad."""
    for grad_mode in (nullcontext, nn.no_grad):
        with fused_spy() as counts, grad_mode():
            model(x)
        assert counts == {"calls": 2, "fused": 2}, counts


@pytest.mark.skipif(not fuses(), reason="no BLAS found for the kernels: the fusion never applies")
def test_sequential_uses_the_fused_path():
    assert_sequential_fuses(*lenet_block())


def test_a_declining_fusion_is_noticed_and_falls_back_to_the_same_answer(monkeypatch):
    model, x = lenet_block()
    expected = model(x)
    monkeypatch.setattr(functional, "_conv2d_max_pool2d", lambda *args, **kwargs: None)
    with pytest.raises(AssertionError, match="'fused': 0"):
        assert_sequential_fuses(model, x)  # the spy wraps the declining function
    np.testing.assert_allclose(model(x), expected, rtol=0, atol=1e-5)
