"""The nine functional operations in plain NumPy: the oracle for tests, the baseline for benchmarks.

Written to be obviously correct: every sliding-window operation is a loop over the kH * kW kernel
offsets, each offset taking one strided slice of the zero-padded input. Arguments are checked by
the same code as the compiled path (fastconv._args), so both accept and refuse the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, overload

import numpy as np
import numpy.typing as npt

from . import _args

__all__ = [
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "unfold",
    "fold",
    "batch_norm",
    "batch_norm_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "relu",
    "relu_backward",
]


def _pad(
    x: np.ndarray, g: _args.ConvGeometry, value: float = 0.0, extra_h: int = 0, extra_w: int = 0
) -> np.ndarray:
    """Pad (N, C, H, W) by the geometry's pads, plus enough at the bottom/right for every window."""
    bottom = max(0, (g.out_h - 1) * g.stride[0] + g.dilation[0] * (g.kh - 1) + 1 - g.h - g.pad_top)
    right = max(0, (g.out_w - 1) * g.stride[1] + g.dilation[1] * (g.kw - 1) + 1 - g.w - g.pad_left)
    widths = ((0, 0), (0, 0), (g.pad_top, bottom + extra_h), (g.pad_left, right + extra_w))
    return np.pad(x, widths, constant_values=value)


def _window(padded: np.ndarray, g: _args.ConvGeometry, i: int, j: int) -> np.ndarray:
    """The (N, C, out_h, out_w) slice seen by kernel offset (i, j)."""
    top, left = i * g.dilation[0], j * g.dilation[1]
    return padded[
        :,
        :,
        top : top + (g.out_h - 1) * g.stride[0] + 1 : g.stride[0],
        left : left + (g.out_w - 1) * g.stride[1] + 1 : g.stride[1],
    ]


def _unpad(padded: np.ndarray, g: _args.ConvGeometry) -> np.ndarray:
    return padded[:, :, g.pad_top : g.pad_top + g.h, g.pad_left : g.pad_left + g.w]


def _finish(out: np.ndarray, unbatched: bool) -> np.ndarray:
    return out[0] if unbatched else out


def _grouped_windows(
    padded: np.ndarray, g: _args.ConvGeometry, groups: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (i, j, patch) with patch (N, groups, C_in / groups, out_h * out_w) for offset (i, j)."""
    for i in range(g.kh):
        for j in range(g.kw):
            patch = _window(padded, g, i, j)
            yield i, j, patch.reshape(g.n, groups, g.c_in // groups, g.out_h * g.out_w)


def conv2d(
    input: npt.ArrayLike,
    weight: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> np.ndarray:
    a = _args.conv_args(input, weight, stride, padding, dilation, groups)
    bias = _args.bias_array(bias, a.weight)
    g, c_out = a.geometry, a.weight.shape[0]
    wg = a.weight.reshape(groups, c_out // groups, *a.weight.shape[1:])
    out = np.zeros((g.n, groups, c_out // groups, g.out_h * g.out_w), dtype=a.weight.dtype)
    for i, j, patch in _grouped_windows(_pad(a.x, g), g, groups):
        # out[n, g, o, p] += sum_c w[g, o, c, i, j] * patch[n, g, c, p]
        out += wg[:, :, :, i, j] @ patch
    out = out.reshape(g.n, c_out, g.out_h, g.out_w)
    if bias is not None:
        out += bias[:, None, None]
    return _finish(out, a.unbatched)


def conv2d_backward(
    grad_output: npt.ArrayLike,
    input: npt.ArrayLike,
    weight: npt.ArrayLike,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = _args.conv_args(input, weight, stride, padding, dilation, groups)
    g, w = a.geometry, a.weight
    c_out = w.shape[0]
    grad = _args.grad_output_array(
        grad_output, (g.n, c_out, g.out_h, g.out_w), w.dtype, a.unbatched
    )
    grad_g = grad.reshape(g.n, groups, c_out // groups, g.out_h * g.out_w)
    wg = w.reshape(groups, c_out // groups, *w.shape[1:])
    padded = _pad(a.x, g)
    grad_padded = np.zeros_like(padded)
    grad_weight = np.zeros_like(wg)
    for i, j, patch in _grouped_windows(padded, g, groups):
        grad_weight[:, :, :, i, j] = (grad_g @ patch.transpose(0, 1, 3, 2)).sum(axis=0)
        grad_patch = wg[:, :, :, i, j].transpose(0, 2, 1) @ grad_g
        _window(grad_padded, g, i, j)[...] += grad_patch.reshape(g.n, g.c_in, g.out_h, g.out_w)
    grad_input = _finish(np.ascontiguousarray(_unpad(grad_padded, g)), a.unbatched)
    return grad_input, grad_weight.reshape(w.shape), grad.sum(axis=(0, 2, 3))


def _max_pool(a: _args.PoolArgs) -> tuple[np.ndarray, np.ndarray]:
    """Max value and torch-style flat index per window; NaN wins, the last NaN in scan order.

    A window that holds no input element (dilation can step over a small input) gives -inf and
    index -1.
    """
    g = a.geometry
    padded = _pad(a.x, g, value=-np.inf)
    flat = np.arange(g.h * g.w).reshape(1, 1, g.h, g.w)
    index = _pad(np.broadcast_to(flat, (1, 1, g.h, g.w)), g, value=-1)
    best = np.full((g.n, g.c_in, g.out_h, g.out_w), -np.inf, dtype=a.x.dtype)
    best_index = np.full(best.shape, -1, dtype=np.int64)
    for i in range(g.kh):
        for j in range(g.kw):
            value = _window(padded, g, i, j)
            where = _window(index, g, i, j)
            inside = where >= 0
            # torch starts each window at its first in-bounds element with -inf.
            first = (best_index < 0) & inside
            take = inside & ((value > best) | np.isnan(value) | first)
            best = np.where(take, value, best)
            best_index = np.where(take, where, best_index)
    return best, best_index


@overload
def max_pool2d(
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
    return_indices: Literal[False] = False,
) -> np.ndarray: ...
@overload
def max_pool2d(
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
    *,
    return_indices: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def max_pool2d(
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    ceil_mode: bool,
    return_indices: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def max_pool2d(
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...
def max_pool2d(
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    a = _args.pool_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    out, indices = _max_pool(a)
    if return_indices:
        return _finish(out, a.unbatched), _finish(indices, a.unbatched)
    return _finish(out, a.unbatched)


def max_pool2d_backward(
    grad_output: npt.ArrayLike,
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
    indices: npt.ArrayLike | None = None,
) -> np.ndarray:
    a = _args.pool_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    g = a.geometry
    shape = (g.n, g.c_in, g.out_h, g.out_w)
    grad = _args.grad_output_array(grad_output, shape, a.x.dtype, a.unbatched)
    if indices is None:
        indices = _max_pool(a)[1]
    else:
        indices = _args.pool_indices(indices, shape, g, a.unbatched)
        if indices.size and (indices.min() < -1 or indices.max() >= g.h * g.w):
            raise ValueError(
                f"indices: values must lie in [-1, {g.h * g.w}) for input planes of {g.h}x{g.w}"
            )
    grad_input = np.zeros((g.n * g.c_in, g.h * g.w), dtype=a.x.dtype)
    planes = np.repeat(np.arange(g.n * g.c_in), g.out_h * g.out_w)
    # index -1: a window that saw no input element (only padding) passes no gradient, as torch
    hit = indices.reshape(-1) >= 0
    np.add.at(grad_input, (planes[hit], indices.reshape(-1)[hit]), grad.reshape(-1)[hit])
    return _finish(grad_input.reshape(a.x.shape), a.unbatched)


def _avg_divisor(g: _args.ConvGeometry, count_include_pad: bool) -> np.ndarray:
    """torch's divisor per output position: the window clipped to the padded (or real) input."""
    divisor = np.empty((g.out_h, g.out_w))
    for oh in range(g.out_h):
        for ow in range(g.out_w):
            h0, w0 = oh * g.stride[0] - g.pad_top, ow * g.stride[1] - g.pad_left
            h1, w1 = min(h0 + g.kh, g.h + g.pad_top), min(w0 + g.kw, g.w + g.pad_left)
            if not count_include_pad:
                h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, g.h), min(w1, g.w)
            divisor[oh, ow] = (h1 - h0) * (w1 - w0)
    return divisor


def avg_pool2d(
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> np.ndarray:
    a = _args.pool_args(input, kernel_size, stride, padding, 1, ceil_mode)
    g = a.geometry
    padded = _pad(a.x, g)
    total = np.zeros((g.n, g.c_in, g.out_h, g.out_w), dtype=a.x.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            total += _window(padded, g, i, j)
    out = total / _avg_divisor(g, count_include_pad).astype(a.x.dtype)
    return _finish(out, a.unbatched)


def avg_pool2d_backward(
    grad_output: npt.ArrayLike,
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> np.ndarray:
    a = _args.pool_args(input, kernel_size, stride, padding, 1, ceil_mode)
    g = a.geometry
    grad = _args.grad_output_array(
        grad_output, (g.n, g.c_in, g.out_h, g.out_w), a.x.dtype, a.unbatched
    )
    share = grad / _avg_divisor(g, count_include_pad).astype(a.x.dtype)
    grad_padded = _pad(np.zeros_like(a.x), g)
    for i in range(g.kh):
        for j in range(g.kw):
            _window(grad_padded, g, i, j)[...] += share
    return _finish(np.ascontiguousarray(_unpad(grad_padded, g)), a.unbatched)


def unfold(
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    stride: int | tuple[int, int] = 1,
) -> np.ndarray:
    x4, g, unbatched = _args.unfold_args(input, kernel_size, dilation, padding, stride)
    padded = _pad(x4, g)
    blocks = [_window(padded, g, i, j) for i in range(g.kh) for j in range(g.kw)]
    # rows ordered (channel, kernel row, kernel column), as torch
    cols = np.stack(blocks, axis=2).reshape(g.n, g.patch_size, g.out_h * g.out_w)
    return _finish(cols, unbatched)


def fold(
    input: npt.ArrayLike,
    output_size: int | tuple[int, int],
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    stride: int | tuple[int, int] = 1,
) -> np.ndarray:
    cols, g, unbatched = _args.fold_args(input, output_size, kernel_size, dilation, padding, stride)
    blocks = cols.reshape(g.n, g.c_in, g.kh, g.kw, g.out_h, g.out_w)
    padded = _pad(np.zeros((g.n, g.c_in, g.h, g.w), dtype=cols.dtype), g)
    for i in range(g.kh):
        for j in range(g.kw):
            _window(padded, g, i, j)[...] += blocks[:, :, i, j]
    return _finish(np.ascontiguousarray(_unpad(padded, g)), unbatched)


def _channel_view(a: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """(N, C, ...) as (N, C, L), and the axes to reduce over to get one value per channel."""
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    return flat, (0, 2)


def batch_norm(
    input: npt.ArrayLike,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: npt.ArrayLike | None = None,
    bias: npt.ArrayLike | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> np.ndarray:
    a = _args.batch_norm_args(input, running_mean, running_var, weight, bias, training)
    x, axes = _channel_view(a.x)
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        if running_mean is not None and running_var is not None:  # both or neither
            count = x.size // x.shape[1]
            running_mean[...] = (1 - momentum) * running_mean + momentum * mean
            running_var[...] = (1 - momentum) * running_var + momentum * var * count / (count - 1)
    else:
        mean, var = running_mean, running_var
    out = (x - mean[:, None]) / np.sqrt(var[:, None] + eps)
    if a.weight.size:
        out = out * a.weight[:, None]
    if a.bias.size:
        out = out + a.bias[:, None]
    return out.astype(a.x.dtype).reshape(a.shape)


def batch_norm_backward(
    grad_output: npt.ArrayLike,
    input: npt.ArrayLike,
    weight: npt.ArrayLike | None = None,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    training: bool = False,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = _args.batch_norm_args(input, running_mean, running_var, weight, None, training)
    x, axes = _channel_view(a.x)
    grad = _args.float_array("grad_output", grad_output, a.x.dtype).reshape(x.shape)
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = running_mean, running_var
    invstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean[:, None]) * invstd[:, None]
    scale = invstd * (a.weight if a.weight.size else 1)
    grad_bias = grad.sum(axis=axes)
    grad_weight = (grad * xhat).sum(axis=axes)
    if training:  # the batch's mean and variance depend on x too
        count = x.size // x.shape[1]
        grad_x = scale[:, None] * (
            grad - grad_bias[:, None] / count - xhat * grad_weight[:, None] / count
        )
    else:
        grad_x = scale[:, None] * grad
    dtype = a.x.dtype
    return grad_x.astype(dtype).reshape(a.shape), grad_weight.astype(dtype), grad_bias.astype(dtype)


def _transposed_canvas(a: _args.ConvTransposeArgs) -> np.ndarray:
    """Zeros (N, C_out, rows, columns) holding the uncropped output: every tap's rows (the input
    spread by stride, shifted by dilation * tap) and the output's rows at offset padding."""
    sizes = [
        max((size - 1) * s + d * (k - 1) + 1, p + out)
        for size, s, d, k, p, out in zip(
            a.x.shape[2:],
            a.stride,
            a.dilation,
            a.weight.shape[2:],
            a.padding,
            (a.out_h, a.out_w),
        )
    ]
    return np.zeros((a.x.shape[0], a.out_channels, *sizes), dtype=a.x.dtype)


def _tap(canvas: np.ndarray, a: _args.ConvTransposeArgs, i: int, j: int) -> np.ndarray:
    """The (N, C_out, H, W) positions of the canvas that input pixel (h, w) reaches through kernel
    tap (i, j): (h * stride + i * dilation, w * stride + j * dilation)."""
    (h, w), (sh, sw), (dh, dw) = a.x.shape[2:], a.stride, a.dilation
    return canvas[
        :, :, i * dh : i * dh + (h - 1) * sh + 1 : sh, j * dw : j * dw + (w - 1) * sw + 1 : sw
    ]


def _crop(canvas: np.ndarray, a: _args.ConvTransposeArgs) -> np.ndarray:
    (ph, pw) = a.padding
    return canvas[:, :, ph : ph + a.out_h, pw : pw + a.out_w]


def _transposed_groups(a: _args.ConvTransposeArgs) -> tuple[np.ndarray, np.ndarray]:
    """x as (N, groups, C_in / groups, H * W), weight as (groups, C_in / groups, C_out / groups,
    kH, kW)."""
    n, c_in, h, w = a.x.shape
    xg = a.x.reshape(n, a.groups, c_in // a.groups, h * w)
    return xg, a.weight.reshape(a.groups, c_in // a.groups, *a.weight.shape[1:])


def conv_transpose2d(
    input: npt.ArrayLike,
    weight: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    output_padding: int | tuple[int, int] = 0,
    groups: int = 1,
    dilation: int | tuple[int, int] = 1,
) -> np.ndarray:
    """Each input pixel scatters weight[c, :, i, j] * x to its tap's output position."""
    a = _args.conv_transpose_args(input, weight, stride, padding, output_padding, groups, dilation)
    bias = _args.bias_array(bias, a.weight, a.out_channels)
    xg, wg = _transposed_groups(a)
    canvas = _transposed_canvas(a)
    for i in range(a.weight.shape[2]):
        for j in range(a.weight.shape[3]):
            # scattered[n, g, o, p] = sum_c w[g, c, o, i, j] * x[n, g, c, p]
            scattered = wg[:, :, :, i, j].transpose(0, 2, 1) @ xg
            _tap(canvas, a, i, j)[...] += scattered.reshape(
                a.x.shape[0], a.out_channels, *a.x.shape[2:]
            )
    out = np.ascontiguousarray(_crop(canvas, a))
    if bias is not None:
        out += bias[:, None, None]
    return _finish(out, a.unbatched)


def conv_transpose2d_backward(
    grad_output: npt.ArrayLike,
    input: npt.ArrayLike,
    weight: npt.ArrayLike,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    output_padding: int | tuple[int, int] = 0,
    groups: int = 1,
    dilation: int | tuple[int, int] = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each tap gathers back what it scattered: the gradient at its positions."""
    a = _args.conv_transpose_args(input, weight, stride, padding, output_padding, groups, dilation)
    grad = _args.grad_output_array(grad_output, a.output_shape, a.x.dtype, a.unbatched)
    xg, wg = _transposed_groups(a)
    canvas = _transposed_canvas(a)
    _crop(canvas, a)[...] = grad  # the cropped-off positions pass no gradient
    grad_x, grad_w = np.zeros_like(xg), np.zeros_like(wg)
    n, positions, per_group = a.x.shape[0], xg.shape[3], a.weight.shape[1]
    for i in range(a.weight.shape[2]):
        for j in range(a.weight.shape[3]):
            reached = _tap(canvas, a, i, j).reshape(n, a.groups, per_group, positions)
            grad_x += wg[:, :, :, i, j] @ reached
            grad_w[:, :, :, i, j] = (xg @ reached.transpose(0, 1, 3, 2)).sum(axis=0)
    grad_input = _finish(grad_x.reshape(a.x.shape), a.unbatched)
    return grad_input, grad_w.reshape(a.weight.shape), grad.sum(axis=(0, 2, 3))


def linear(input: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y[..., o] = sum_i input[..., i] weight[o, i] + bias[o]."""
    out = np.einsum("...i,oi->...o", input, weight)
    return out if bias is None else out + bias


def relu(input: np.ndarray) -> np.ndarray:
    """input where it is positive or NaN, else 0."""
    return np.where((input > 0) | np.isnan(input), input, 0).astype(input.dtype)


def relu_backward(grad_output: np.ndarray, output: np.ndarray) -> np.ndarray:
    """0 where relu's output is <= 0, else grad_output (a NaN output passes it, as torch's)."""
    return np.where(output <= 0, 0, grad_output).astype(grad_output.dtype)
