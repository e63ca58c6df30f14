"""Parity with torch.nn.functional: forward values, autograd gradients, and the same refusals.

Runs where torch is importable (CI installs torch==2.13.0 CPU); skipped, with the reason, elsewhere.
"""

import re

import numpy as np
import pytest
from conftest import (
    assert_close,
    conv_cases,
    fold_cases,
    pool_cases,
    random_array,
    unfold_cases,
)
from hypothesis import given, settings

import fastconv as fc
from fastconv import reference as ref

torch = pytest.importorskip(
    "torch", reason="torch not installed: parity with torch.nn.functional not checked"
)
F = torch.nn.functional

EXAMPLES = 50
# torch's float32 kernels (oneDNN, its own blocking) sum in another order than our BLAS does.
RTOL = {np.dtype(np.float32): 3e-5, np.dtype(np.float64): 1e-12}


def tensor(a, grad=False):
    return torch.from_numpy(np.array(a, copy=True)).requires_grad_(grad)


def numpy(t):
    return t.detach().numpy()


def close(actual, expected_tensor, what=""):
    expected = numpy(expected_tensor)
    assert_close(actual, expected, rtol=RTOL[expected.dtype], what=what)


# --- forward and backward on random cases ----------------------------------------------------


@settings(max_examples=EXAMPLES)
@given(conv_cases(bias=True))
def test_conv2d(case):
    x, weight, bias = case.args
    tx, tw, tb = tensor(x, True), tensor(weight, True), tensor(bias, True)
    out = F.conv2d(tx, tw, tb, **case.kwargs)
    close(fc.conv2d(x, weight, bias, **case.kwargs), out, "output")
    grad = random_array(5, out.shape, x.dtype)
    out.backward(tensor(grad))
    grad_x, grad_w, grad_b = fc.conv2d_backward(grad, x, weight, **case.kwargs)
    close(grad_x, tx.grad, "grad_input")
    close(grad_w, tw.grad, "grad_weight")
    close(grad_b, tb.grad, "grad_bias")


@settings(max_examples=EXAMPLES)
@given(pool_cases("max", empty_windows=False))
def test_max_pool2d(case):
    (x,) = case.args
    tx = tensor(x, True)
    out, indices = F.max_pool2d(tx, **case.kwargs, return_indices=True)
    got, got_indices = fc.max_pool2d(x, **case.kwargs, return_indices=True)
    close(got, out)
    np.testing.assert_array_equal(got_indices, numpy(indices))
    grad = random_array(5, out.shape, x.dtype)
    out.backward(tensor(grad))
    close(fc.max_pool2d_backward(grad, x, **case.kwargs), tx.grad, "grad_input")


@settings(max_examples=EXAMPLES)
@given(pool_cases("avg"))
def test_avg_pool2d(case):
    (x,) = case.args
    tx = tensor(x, True)
    out = F.avg_pool2d(tx, **case.kwargs)
    close(fc.avg_pool2d(x, **case.kwargs), out)
    grad = random_array(5, out.shape, x.dtype)
    out.backward(tensor(grad))
    close(fc.avg_pool2d_backward(grad, x, **case.kwargs), tx.grad, "grad_input")


@settings(max_examples=EXAMPLES)
@given(unfold_cases())
def test_unfold_and_its_gradient_fold(case):
    (x,) = case.args
    tx = tensor(x, True)
    out = F.unfold(tx, **case.kwargs)
    close(fc.unfold(x, **case.kwargs), out)
    grad = random_array(5, out.shape, x.dtype)
    out.backward(tensor(grad))
    close(fc.fold(grad, x.shape[2:], **case.kwargs), tx.grad, "grad of unfold = fold")


@settings(max_examples=EXAMPLES)
@given(fold_cases())
def test_fold_and_its_gradient_unfold(case):
    cols, output_size = case.args
    tc = tensor(cols, True)
    out = F.fold(tc, tuple(output_size), **case.kwargs)
    close(fc.fold(cols, output_size, **case.kwargs), out)
    grad = random_array(5, out.shape, cols.dtype)
    out.backward(tensor(grad))
    close(fc.unfold(grad, **case.kwargs), tc.grad, "grad of fold = unfold")


# --- named cases -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding="same"),
        dict(padding="same", dilation=2),
        dict(padding="same", dilation=(3, 1)),
        dict(padding="valid", stride=2),
        dict(padding=(2, 1), stride=(1, 3), dilation=(2, 2)),
    ],
)
def test_conv2d_same_padding_with_even_kernels(kwargs, dtype):
    x, weight = random_array(0, (2, 3, 9, 8), dtype), random_array(1, (4, 3, 4, 2), dtype)
    tx, tw = tensor(x, True), tensor(weight, True)
    out = F.conv2d(tx, tw, **kwargs)
    close(fc.conv2d(x, weight, **kwargs), out)
    out.backward(torch.ones_like(out))
    grad_x, grad_w, _ = fc.conv2d_backward(np.ones(out.shape, dtype), x, weight, **kwargs)
    close(grad_x, tx.grad)
    close(grad_w, tw.grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depthwise_and_unbatched_conv2d(dtype):
    x, weight = random_array(0, (6, 7, 5), dtype), random_array(1, (12, 1, 3, 3), dtype)
    tx, tw = tensor(x, True), tensor(weight, True)
    out = F.conv2d(tx, tw, padding=1, groups=6)
    close(fc.conv2d(x, weight, padding=1, groups=6), out)
    out.backward(torch.ones_like(out))
    grad_x, grad_w, _ = fc.conv2d_backward(
        np.ones(out.shape, dtype), x, weight, padding=1, groups=6
    )
    close(grad_x, tx.grad)
    close(grad_w, tw.grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool2d_nan_and_inf(dtype):
    x = random_array(0, (2, 2, 6, 6), dtype)
    x[0, 0, 1, 1] = x[0, 0, 2, 2] = np.nan  # two NaNs in one window: the last one's index
    x[0, 1, :3, :3] = -np.inf  # a window of -inf only
    x[1, 0, 4, 4] = np.inf
    tx = tensor(x, True)
    out, indices = F.max_pool2d(tx, 3, stride=1, padding=1, return_indices=True)
    got, got_indices = fc.max_pool2d(x, 3, stride=1, padding=1, return_indices=True)
    close(got, out)
    np.testing.assert_array_equal(got_indices, numpy(indices))
    out.backward(torch.ones_like(out))
    close(fc.max_pool2d_backward(np.ones(out.shape, dtype), x, 3, stride=1, padding=1), tx.grad)


def test_max_pool2d_window_without_input_elements_is_minus_inf():
    """Forward values only: torch's index there points outside the plane (fastconv: -1), and
    torch's backward would write outside its buffer, so neither is compared."""
    x = random_array(0, (2, 3, 2, 5), np.float64)
    kwargs = dict(kernel_size=2, stride=2, padding=1, dilation=3)
    expected = numpy(F.max_pool2d(tensor(x), **kwargs))
    assert np.isneginf(expected).any()
    assert_close(ref.max_pool2d(x, **kwargs), expected)


def test_float32_conv_error_on_a_long_reduction_is_within_torchs():
    """C_in * kH * kW = 512 * 3 * 3 = 4608 products per output, against float64 truth."""
    x, weight = (
        random_array(0, (2, 512, 8, 8), np.float32),
        random_array(1, (16, 512, 3, 3), np.float32),
    )
    truth = ref.conv2d(x.astype(np.float64), weight.astype(np.float64), padding=1)
    ours = np.abs(fc.conv2d(x, weight, padding=1) - truth).max()
    theirs = np.abs(numpy(F.conv2d(tensor(x), tensor(weight), padding=1)) - truth).max()
    assert ours <= 2 * theirs, (ours, theirs)


# --- the same refusals, the same acceptances ----------------------------------------------------


def _x(*shape, dtype=np.float64):
    return random_array(0, shape, dtype)


INVALID = {
    "'same' with stride 2": (
        "conv2d",
        (_x(1, 2, 6, 6), _x(3, 2, 3, 3)),
        dict(padding="same", stride=2),
    ),
    "unknown padding string": ("conv2d", (_x(1, 2, 6, 6), _x(3, 2, 3, 3)), dict(padding="full")),
    "conv kernel > padded input": ("conv2d", (_x(1, 2, 3, 3), _x(3, 2, 6, 6)), dict(padding=1)),
    "conv dilated kernel > input": ("conv2d", (_x(1, 2, 5, 5), _x(3, 2, 3, 3)), dict(dilation=3)),
    "conv channel mismatch": ("conv2d", (_x(1, 3, 6, 6), _x(3, 2, 3, 3)), {}),
    "conv groups not dividing C_out": ("conv2d", (_x(1, 4, 6, 6), _x(3, 2, 3, 3)), dict(groups=2)),
    "conv negative padding": ("conv2d", (_x(1, 2, 6, 6), _x(3, 2, 3, 3)), dict(padding=-1)),
    "conv stride 0": ("conv2d", (_x(1, 2, 6, 6), _x(3, 2, 3, 3)), dict(stride=0)),
    "conv dilation 0": ("conv2d", (_x(1, 2, 6, 6), _x(3, 2, 3, 3)), dict(dilation=0)),
    "conv 2-D input": ("conv2d", (_x(6, 6), _x(3, 2, 3, 3)), {}),
    "conv float32 weight, float64 input": (
        "conv2d",
        (_x(1, 2, 6, 6), _x(3, 2, 3, 3, dtype=np.float32)),
        {},
    ),
    "max pool padding > kernel/2": ("max_pool2d", (_x(1, 2, 6, 6), 3), dict(padding=2)),
    "avg pool padding > kernel/2": ("avg_pool2d", (_x(1, 2, 6, 6), (2, 4)), dict(padding=(1, 3))),
    "max pool kernel > input": ("max_pool2d", (_x(1, 2, 2, 2), 3), {}),
    "avg pool kernel > input": ("avg_pool2d", (_x(1, 2, 2, 6), 3), {}),
    "max pool too small with ceil_mode": (
        "max_pool2d",
        (_x(1, 1, 1, 1), 3),
        dict(stride=1, ceil_mode=True),
    ),
    "avg pool too small with ceil_mode": (
        "avg_pool2d",
        (_x(1, 1, 2, 2), 4),
        dict(stride=2, ceil_mode=True),
    ),
    "max pool dilated window > input": ("max_pool2d", (_x(1, 1, 4, 4), 2), dict(dilation=4)),
    "max pool stride 0": ("max_pool2d", (_x(1, 2, 6, 6), 2), dict(stride=0)),
    "max pool kernel 0": ("max_pool2d", (_x(1, 2, 6, 6), 0), {}),
    "max pool empty channels": ("max_pool2d", (_x(1, 0, 6, 6), 2), {}),
    "max pool 2-D input": ("max_pool2d", (_x(6, 6), 2), {}),
    "unfold kernel > padded input": ("unfold", (_x(1, 2, 3, 3), 6), dict(padding=1)),
    "fold wrong L": ("fold", (_x(1, 8, 10), (4, 4), 2), {}),
    "fold rows not a multiple of k*k": ("fold", (_x(1, 7, 9), (4, 4), 2), {}),
    "fold output_size < kernel": ("fold", (_x(1, 8, 1), (1, 1), 2), {}),
}


# What both refusals must say (a case-insensitive regex matching torch's message and ours): the
# same argument or the same rule, so that refusing for another reason does not pass.
TOO_SMALL = r"output size.*too small"
THREE_OR_FOUR_D = r"3-?D.*4-?D"
KERNEL_TOO_BIG = r"kernel size can't be greater"
MESSAGE_KIND = {
    "'same' with stride 2": r"'same'.*strided",
    "unknown padding string": r"padding",
    "conv kernel > padded input": KERNEL_TOO_BIG,
    "conv dilated kernel > input": KERNEL_TOO_BIG,
    "conv channel mismatch": r"2 (input )?channels",
    "conv groups not dividing C_out": r"divisible by (groups=)?2",
    "conv negative padding": r"padding",
    "conv stride 0": r"stride",
    "conv dilation 0": r"dilation",
    "conv 2-D input": THREE_OR_FOUR_D,
    "conv float32 weight, float64 input": r"float",
    "max pool padding > kernel/2": r"at most half",
    "avg pool padding > kernel/2": r"at most half",
    "max pool kernel > input": TOO_SMALL,
    "avg pool kernel > input": TOO_SMALL,
    "max pool too small with ceil_mode": TOO_SMALL,
    "avg pool too small with ceil_mode": TOO_SMALL,
    "max pool dilated window > input": TOO_SMALL,
    "max pool stride 0": r"stride",
    # torch's stride defaults to the kernel size, so it names the stride; we name kernel_size
    "max pool kernel 0": r"kernel_size|stride",
    "max pool empty channels": r"1, 0, 6, 6",
    "max pool 2-D input": THREE_OR_FOUR_D,
    "unfold kernel > padded input": r"kernel[_ ]size.*\(6[ x,]+6\)",
    "fold wrong L": r"output_size=\(4, 4\)",
    "fold rows not a multiple of k*k": r"kernel_size",
    "fold output_size < kernel": r"output_size",
}


def _torch_call(name, args, kwargs):
    args = [tensor(a) if isinstance(a, np.ndarray) else a for a in args]
    return getattr(F, name)(*args, **kwargs)


@pytest.mark.parametrize("case", INVALID)
def test_torch_and_fastconv_refuse_the_same_configurations(case):
    name, args, kwargs = INVALID[case]
    with pytest.raises((RuntimeError, ValueError, TypeError, IndexError)) as theirs:
        _torch_call(name, args, kwargs)
    with pytest.raises((ValueError, TypeError)) as ours:
        getattr(fc, name)(*args, **kwargs)
    kind = MESSAGE_KIND[case]
    for who, info in (("torch", theirs), ("fastconv", ours)):
        assert re.search(kind, str(info.value), re.IGNORECASE | re.DOTALL), (
            f"{who}'s message does not match {kind!r}: {info.value}"
        )


VALID = {
    "conv kernel = padded input": ("conv2d", (_x(1, 2, 3, 3), _x(3, 2, 5, 5)), dict(padding=1)),
    "conv 'same', even dilated kernel": (
        "conv2d",
        (_x(1, 2, 5, 6), _x(3, 2, 2, 4)),
        dict(padding="same", dilation=3),
    ),
    "conv empty batch": ("conv2d", (_x(0, 2, 5, 6), _x(3, 2, 2, 2)), {}),
    "max pool padding = kernel/2": ("max_pool2d", (_x(1, 2, 5, 5), 4), dict(padding=2)),
    "avg pool padding = kernel/2": ("avg_pool2d", (_x(1, 2, 5, 5), (2, 4)), dict(padding=(1, 2))),
    "max pool ceil drops a last window in the padding": (
        "max_pool2d",
        (_x(1, 1, 5, 5), 2),
        dict(stride=2, padding=1, ceil_mode=True),
    ),
    "avg pool ceil drops a last window in the padding": (
        "avg_pool2d",
        (_x(1, 1, 5, 5), 2),
        dict(stride=2, padding=1, ceil_mode=True),
    ),
    "max pool ceil on a 1x1 input": ("max_pool2d", (_x(1, 1, 1, 1), 2), dict(ceil_mode=True)),
    "max pool empty batch": ("max_pool2d", (_x(0, 2, 4, 4), 2), {}),
    "avg pool empty batch": ("avg_pool2d", (_x(0, 2, 4, 4), 2), {}),
    "unfold empty batch": ("unfold", (_x(0, 2, 4, 4), 2), {}),
    "fold empty batch": ("fold", (_x(0, 8, 9), (4, 4), 2), {}),
    "fold unbatched": ("fold", (_x(8, 9), (4, 4), 2), {}),
}


@pytest.mark.parametrize("case", VALID)
def test_torch_and_fastconv_accept_the_same_boundary_configurations(case):
    name, args, kwargs = VALID[case]
    expected = _torch_call(name, args, kwargs)
    close(getattr(fc, name)(*args, **kwargs), expected)
