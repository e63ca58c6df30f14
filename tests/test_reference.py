"""fastconv.reference, the oracle, against naive direct loops and against finite differences.

The naive functions below are written from the definitions in torch's documentation, one output
element at a time, sharing no code with the reference (not even the output-size arithmetic).
"""

import math

import numpy as np
import pytest
from conftest import assert_close, conv_cases, fold_cases, pool_cases, random_array, unfold_cases
from hypothesis import given, settings

from fastconv import reference as ref


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _batched(x):
    return (x[None], True) if x.ndim == 3 else (x, False)


def naive_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    x, unbatched = _batched(np.asarray(x))
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    n, c_in, h, w = x.shape
    c_out, c_group, kh, kw = weight.shape
    if padding == "valid":
        top = bottom = left = right = 0
    elif padding == "same":  # the odd extra row/column goes to the bottom/right, as torch
        top, left = dh * (kh - 1) // 2, dw * (kw - 1) // 2
        bottom, right = dh * (kh - 1) - top, dw * (kw - 1) - left
    else:
        (top, left) = _pair(padding)
        bottom, right = top, left
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, c_out, out_h, out_w), dtype=x.dtype)
    per_group = c_out // groups
    for b in range(n):
        for o in range(c_out):
            first_channel = (o // per_group) * c_group
            for oh in range(out_h):
                for ow in range(out_w):
                    total = 0.0 if bias is None else float(bias[o])
                    for c in range(c_group):
                        for i in range(kh):
                            for j in range(kw):
                                row, col = oh * sh - top + i * dh, ow * sw - left + j * dw
                                if 0 <= row < h and 0 <= col < w:
                                    pixel = float(x[b, first_channel + c, row, col])
                                    total += pixel * float(weight[o, c, i, j])
                    out[b, o, oh, ow] = total
    return out[0] if unbatched else out


def _pool_size(size, k, s, p, d, ceil_mode):
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input
        out -= 1
    return out


def _pool_windows(x, kernel_size, stride, padding, dilation, ceil_mode):
    """(out_h, out_w, window) with window(oh, ow) the (row, col) list of its positions in scan order."""
    (kh, kw), (ph, pw), (dh, dw) = _pair(kernel_size), _pair(padding), _pair(dilation)
    sh, sw = (kh, kw) if stride is None else _pair(stride)
    h, w = x.shape[2:]

    def window(oh, ow):
        return [
            (oh * sh - ph + i * dh, ow * sw - pw + j * dw) for i in range(kh) for j in range(kw)
        ]

    return (
        _pool_size(h, kh, sh, ph, dh, ceil_mode),
        _pool_size(w, kw, sw, pw, dw, ceil_mode),
        window,
    )


def naive_max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """torch's rule: start from -inf at the window's first input element; a larger value or any
    NaN takes over (so the last NaN wins); a window without input elements gives -inf, index -1."""
    x, unbatched = _batched(np.asarray(x))
    n, c, h, w = x.shape
    out_h, out_w, window = _pool_windows(x, kernel_size, stride, padding, dilation, ceil_mode)
    out = np.empty((n, c, out_h, out_w), dtype=x.dtype)
    indices = np.empty(out.shape, dtype=np.int64)
    for b, ch, oh, ow in np.ndindex(out.shape):
        best, best_index = -math.inf, -1
        for row, col in window(oh, ow):
            if 0 <= row < h and 0 <= col < w:
                value = x[b, ch, row, col]
                if best_index < 0:
                    best_index = row * w + col
                if value > best or math.isnan(value):
                    best, best_index = value, row * w + col
        out[b, ch, oh, ow], indices[b, ch, oh, ow] = best, best_index
    if unbatched:
        return out[0], indices[0]
    return out, indices


def naive_avg_pool2d(
    x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True
):
    """Sum of the window's input elements over the number of its elements inside the padded
    input (count_include_pad) or inside the input itself."""
    x, unbatched = _batched(np.asarray(x))
    n, c, h, w = x.shape
    ph, pw = _pair(padding)
    out_h, out_w, window = _pool_windows(x, kernel_size, stride, padding, 1, ceil_mode)
    out = np.empty((n, c, out_h, out_w), dtype=x.dtype)
    for b, ch, oh, ow in np.ndindex(out.shape):
        positions = window(oh, ow)
        inside = [(r, q) for r, q in positions if 0 <= r < h and 0 <= q < w]
        padded = [(r, q) for r, q in positions if -ph <= r < h + ph and -pw <= q < w + pw]
        total = sum(float(x[b, ch, r, q]) for r, q in inside)
        out[b, ch, oh, ow] = total / len(padded if count_include_pad else inside)
    return out[0] if unbatched else out


def naive_unfold(x, kernel_size, dilation=1, padding=0, stride=1):
    x, unbatched = _batched(np.asarray(x))
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(_pair, (kernel_size, dilation, padding, stride))
    n, c, h, w = x.shape
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = np.zeros((n, c * kh * kw, out_h * out_w), dtype=x.dtype)
    for b in range(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    for oh in range(out_h):
                        for ow in range(out_w):
                            row, col = oh * sh - ph + i * dh, ow * sw - pw + j * dw
                            if 0 <= row < h and 0 <= col < w:
                                cols[b, (ch * kh + i) * kw + j, oh * out_w + ow] = x[
                                    b, ch, row, col
                                ]
    return cols[0] if unbatched else cols


def naive_fold(cols, output_size, kernel_size, dilation=1, padding=0, stride=1):
    cols = np.asarray(cols)
    unbatched = cols.ndim == 2
    cols = cols[None] if unbatched else cols
    (h, w), (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(
        _pair, (output_size, kernel_size, dilation, padding, stride)
    )
    n, rows, _ = cols.shape
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, rows // (kh * kw), h, w), dtype=cols.dtype)
    for b in range(n):
        for r in range(rows):
            ch, i, j = r // (kh * kw), (r // kw) % kh, r % kw
            for position in range(cols.shape[2]):
                oh, ow = divmod(position, out_w)
                row, col = oh * sh - ph + i * dh, ow * sw - pw + j * dw
                if 0 <= row < h and 0 <= col < w:
                    out[b, ch, row, col] += cols[b, r, position]
    return out[0] if unbatched else out


# --- forward against the naive loops --------------------------------------------------------


@settings(max_examples=60)
@given(conv_cases(max_batch=2))
def test_conv2d_matches_naive_loops(case):
    assert_close(ref.conv2d(*case.args, **case.kwargs), naive_conv2d(*case.args, **case.kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1),
        dict(stride=(1, 3), padding=(2, 0), dilation=(2, 1)),
        dict(padding="same", dilation=2),  # even kernel: padding 1 top/left, 2 bottom/right
        dict(padding="same", dilation=(1, 3)),
        dict(padding="valid", stride=(2, 1)),
        dict(groups=2, padding=1),
        dict(groups=4, stride=2),  # depthwise: one input channel per group
    ],
)
def test_conv2d_named_cases_match_naive_loops(kwargs):
    x = random_array(0, (2, 4, 7, 6), np.float64)
    groups = kwargs.get("groups", 1)
    weight = random_array(1, (8, 4 // groups, 4, 3), np.float64)  # non-square, even kH
    bias = random_array(2, (8,), np.float64)
    assert_close(ref.conv2d(x, weight, bias, **kwargs), naive_conv2d(x, weight, bias, **kwargs))


def test_conv2d_unbatched_matches_batched():
    x, weight = random_array(0, (3, 5, 4), np.float64), random_array(1, (2, 3, 2, 2), np.float64)
    out = ref.conv2d(x, weight, padding=1)
    assert out.shape == (2, 6, 5)
    assert_close(out, naive_conv2d(x, weight, padding=1))


@settings(max_examples=60)
@given(pool_cases("max", max_batch=2))
def test_max_pool2d_matches_naive_loops(case):
    out, indices = ref.max_pool2d(*case.args, **case.kwargs, return_indices=True)
    expected_out, expected_indices = naive_max_pool2d(*case.args, **case.kwargs)
    assert_close(out, expected_out)
    np.testing.assert_array_equal(indices, expected_indices)


def test_max_pool2d_nan_wins_and_last_nan_gives_the_index():
    x = np.array([[[[1.0, np.nan, 5.0], [np.nan, 2.0, -np.inf]]]])
    out, indices = ref.max_pool2d(x, (2, 3), return_indices=True)
    assert np.isnan(out[0, 0, 0, 0]) and indices[0, 0, 0, 0] == 3  # scan order: row by row
    out, indices = ref.max_pool2d(x, (2, 1), stride=1, return_indices=True)
    np.testing.assert_array_equal(indices[0, 0, 0], [3, 1, 2])
    assert np.isnan(out[0, 0, 0, :2]).all() and out[0, 0, 0, 2] == 5.0


def test_max_pool2d_all_minus_inf_window_points_at_its_first_input_element():
    x = np.full((1, 1, 3, 3), -np.inf)
    out, indices = ref.max_pool2d(x, 2, stride=1, padding=1, return_indices=True)
    assert (out == -np.inf).all()
    # output (4, 4); window (oh, ow) covers rows oh-1, oh and columns ow-1, ow
    np.testing.assert_array_equal(
        indices[0, 0], [[0, 0, 1, 2], [0, 0, 1, 2], [3, 3, 4, 5], [6, 6, 7, 8]]
    )


def test_max_pool2d_window_without_input_elements():
    """Dilation 3 over a 2-row input with padding 1: the first window's rows are -1 and 2."""
    x = random_array(0, (1, 1, 2, 5), np.float64)
    kwargs = dict(kernel_size=2, stride=2, padding=1, dilation=3)
    out, indices = ref.max_pool2d(x, **kwargs, return_indices=True)
    expected_out, expected_indices = naive_max_pool2d(x, **kwargs)
    assert (out == -np.inf).all() and (indices == -1).all()
    assert_close(out, expected_out)
    np.testing.assert_array_equal(indices, expected_indices)
    grad = ref.max_pool2d_backward(np.ones_like(out), x, **kwargs)
    assert (grad == 0).all()  # no input element was used: no gradient anywhere


@settings(max_examples=60)
@given(pool_cases("avg", max_batch=2))
def test_avg_pool2d_matches_naive_loops(case):
    assert_close(
        ref.avg_pool2d(*case.args, **case.kwargs), naive_avg_pool2d(*case.args, **case.kwargs)
    )


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool2d_ceil_mode_divisor(count_include_pad):
    """5 wide, kernel 2, stride 2, padding 1, ceil: the last window hangs past the padding."""
    x = random_array(3, (1, 2, 5, 5), np.float64)
    kwargs = dict(
        kernel_size=2, stride=2, padding=1, ceil_mode=True, count_include_pad=count_include_pad
    )
    out = ref.avg_pool2d(x, **kwargs)
    assert out.shape == (1, 2, 3, 3)
    assert_close(out, naive_avg_pool2d(x, **kwargs))
    corner = x[:, :, 0, 0]  # window rows/cols {-1, 0}: one input element, 4 or 1 counted
    assert_close(out[:, :, 0, 0], corner / (4 if count_include_pad else 1))


@settings(max_examples=50)
@given(unfold_cases(max_batch=2))
def test_unfold_matches_naive_loops(case):
    assert_close(ref.unfold(*case.args, **case.kwargs), naive_unfold(*case.args, **case.kwargs))


@settings(max_examples=50)
@given(fold_cases(max_batch=2))
def test_fold_matches_naive_loops(case):
    assert_close(ref.fold(*case.args, **case.kwargs), naive_fold(*case.args, **case.kwargs))


def test_naive_loops_agree_with_hand_computed_values():
    """The naive oracle itself, on numbers small enough to check by hand."""
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    np.testing.assert_array_equal(naive_conv2d(x, np.ones((1, 1, 2, 2))), [[[[8, 12], [20, 24]]]])
    np.testing.assert_array_equal(naive_max_pool2d(x, 2, stride=1)[0], [[[[4, 5], [7, 8]]]])
    np.testing.assert_array_equal(naive_avg_pool2d(x, 2, padding=1), [[[[0, 0.75], [2.25, 6]]]])
    np.testing.assert_array_equal(naive_unfold(x, 2)[0, :, 0], [0, 1, 3, 4])
    overlaps = [[[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]]  # how many 2x2 blocks cover each pixel
    np.testing.assert_array_equal(naive_fold(np.ones((1, 4, 4)), (3, 3), 2), overlaps)


# --- backward against central finite differences (float64) ----------------------------------


def numeric_gradient(f, array, eps=1e-6):
    """d f / d array by central differences; f returns a scalar, array is perturbed in place."""
    grad = np.zeros_like(array)
    flat, grad_flat = array.reshape(-1), grad.reshape(-1)
    for k in range(flat.size):
        saved = flat[k]
        flat[k] = saved + eps
        up = f()
        flat[k] = saved - eps
        down = f()
        flat[k] = saved
        grad_flat[k] = (up - down) / (2 * eps)
    return grad


CONV_GRAD_CASES = [
    dict(),
    dict(stride=2, padding=1),
    dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    dict(padding="same", dilation=2),
    dict(groups=2, padding=1),
    dict(groups=4),
]


@pytest.mark.parametrize("kwargs", CONV_GRAD_CASES)
def test_conv2d_backward_matches_finite_differences(kwargs):
    groups = kwargs.get("groups", 1)
    x = random_array(0, (2, 4, 5, 6), np.float64)
    weight = random_array(1, (4, 4 // groups, 2, 3), np.float64)
    bias = random_array(2, (4,), np.float64)
    grad_out = random_array(3, ref.conv2d(x, weight, bias, **kwargs).shape, np.float64)

    def loss():
        return float((ref.conv2d(x, weight, bias, **kwargs) * grad_out).sum())

    grad_x, grad_w, grad_b = ref.conv2d_backward(grad_out, x, weight, **kwargs)
    assert_close(grad_x, numeric_gradient(loss, x), rtol=1e-7)
    assert_close(grad_w, numeric_gradient(loss, weight), rtol=1e-7)
    assert_close(grad_b, numeric_gradient(loss, bias), rtol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
        dict(kernel_size=(3, 2), stride=1, padding=(1, 0), count_include_pad=False),
        dict(kernel_size=2, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    ],
)
def test_avg_pool2d_backward_matches_finite_differences(kwargs):
    x = random_array(0, (2, 2, 5, 5), np.float64)
    grad_out = random_array(1, ref.avg_pool2d(x, **kwargs).shape, np.float64)
    grad = ref.avg_pool2d_backward(grad_out, x, **kwargs)
    numeric = numeric_gradient(lambda: float((ref.avg_pool2d(x, **kwargs) * grad_out).sum()), x)
    assert_close(grad, numeric, rtol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
        dict(kernel_size=(2, 3), stride=1, dilation=(2, 1)),
    ],
)
def test_max_pool2d_backward_matches_finite_differences(kwargs):
    # distinct values 0.01 apart: a 1e-6 step never changes which element is the maximum
    x = np.random.default_rng(0).permutation(2 * 2 * 6 * 6).reshape(2, 2, 6, 6) * 0.01
    grad_out = random_array(1, ref.max_pool2d(x, **kwargs).shape, np.float64)
    grad = ref.max_pool2d_backward(grad_out, x, **kwargs)
    numeric = numeric_gradient(lambda: float((ref.max_pool2d(x, **kwargs) * grad_out).sum()), x)
    assert_close(grad, numeric, rtol=1e-7)


@settings(max_examples=40)
@given(unfold_cases(max_batch=2))
def test_fold_is_the_adjoint_of_unfold(case):
    """<unfold(x), c> == <x, fold(c)> for every x and c: fold is unfold's transpose."""
    x = case.args[0].astype(np.float64)
    cols = random_array(7, ref.unfold(x, **case.kwargs).shape, np.float64)
    left = float((ref.unfold(x, **case.kwargs) * cols).sum())
    right = float((x * ref.fold(cols, x.shape[2:], **case.kwargs)).sum())
    assert abs(left - right) <= 1e-12 * max(1.0, abs(left), float(np.abs(cols).sum()))
