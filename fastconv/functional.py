"""The public operations: check arguments (fastconv._args), then run the compiled kernels.

Same names, arguments and results as torch.nn.functional. Convolution is im2col + GEMM: the
kernels call the BLAS NumPy loaded, one sample per thread with a (C_in*kH*kW, H_out*W_out)
workspace each (fastconv._blas); without such a BLAS, batch chunks within `workspace_limit()`
bytes go through NumPy's matmul.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

# Absolute, not `from . import _conv`: fastconv/__init__ imports _conv from itself (to explain a
# missing build), and mypy then resolves `from . import _conv` to that unexported attribute.
import fastconv._conv as _conv

from . import _args, _blas, _norm, _pointwise, _pool
from .threads import get_num_threads

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
    "set_workspace_limit",
    "workspace_limit",
    "set_conv_algorithm",
    "get_conv_algorithm",
    "conv2d_algorithm",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "linear",
    "relu",
    "relu_backward",
]

_workspace_limit = int(float(os.environ.get("FASTCONV_WORKSPACE_MB", "32")) * 2**20)
_local = threading.local()  # one workspace per Python thread: concurrent calls never share one


def set_workspace_limit(nbytes: int) -> None:
    """Bound the im2col workspace (default 32 MiB, or $FASTCONV_WORKSPACE_MB)."""
    global _workspace_limit
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes: expected a positive int, got {nbytes!r}")
    _workspace_limit = nbytes


def workspace_limit() -> int:
    return _workspace_limit


def _workspace(dtype: npt.DTypeLike, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """Views of one reused buffer, 64-byte aligned each: no page faults on every call."""
    itemsize = np.dtype(dtype).itemsize
    sizes = [int(np.prod(s)) * itemsize for s in shapes]
    offsets = np.cumsum([0] + [-(-s // 64) * 64 for s in sizes])
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < offsets[-1] + 64:
        _args.check_fits("workspace", (int(offsets[-1]) + 64,), 1)
        buffer = np.empty(int(offsets[-1]) + 64, dtype=np.uint8)
        # Keep it for the next call unless it is an outsized one-off.
        if buffer.size <= 2 * _workspace_limit:
            _local.buffer = buffer
    start = -buffer.ctypes.data % 64
    return [
        buffer[start + o : start + o + s].view(dtype).reshape(shape)
        for o, s, shape in zip(offsets, sizes, shapes)
    ]


CONV_ALGORITHMS = ("auto", "direct", "winograd")


def _checked_algorithm(name: str, value: str) -> str:
    if value not in CONV_ALGORITHMS:
        raise ValueError(f"{name}: expected one of {', '.join(CONV_ALGORITHMS)}, got {value!r}")
    return value


_conv_algorithm = _checked_algorithm(
    "FASTCONV_CONV_ALGO", os.environ.get("FASTCONV_CONV_ALGO") or "auto"
)


def set_conv_algorithm(algorithm: str) -> None:
    """How convolutions run: "auto" (by shape, the default; or $FASTCONV_CONV_ALGO), "direct"
    (im2col + GEMM) or "winograd" (F(2x2, 3x3), or F(4x4, 3x3) for the forward and input
    gradient of outputs 12 or more wide and high, wherever it applies: 3x3 kernel, stride 1,
    dilation 1, one group, float32; direct elsewhere)."""
    global _conv_algorithm
    _conv_algorithm = _checked_algorithm("algorithm", algorithm)


def get_conv_algorithm() -> str:
    return _conv_algorithm


# Measured here, 2 threads: Winograd pays once both channel counts reach WINOGRAD_MIN_CHANNELS
# (below, the transforms cost more than the products they save). Past WINOGRAD_MAX_CHANNELS its
# float32 rounding grows past twice torch's on the long reductions (against float64: 1.0x torch's
# at 64 channels, 2.7x at 256), so auto keeps those on the direct path.
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MAX_CHANNELS = 128


def conv2d_algorithm(
    geometry: _args.ConvGeometry, out_channels: int, groups: int, dtype: npt.DTypeLike
) -> str:
    """ "winograd" or "direct": what conv2d and conv2d_backward run for this convolution."""
    g = geometry
    applies = (
        (g.kh, g.kw, g.stride, g.dilation, groups) == (3, 3, (1, 1), (1, 1), 1)
        and np.dtype(dtype) == np.float32
        and _blas_in_kernels()
    )
    if not applies or _conv_algorithm == "direct":
        return "direct"
    if _conv_algorithm == "winograd":
        return "winograd"
    channels = (g.c_in, out_channels)
    pays = min(channels) >= WINOGRAD_MIN_CHANNELS and max(channels) <= WINOGRAD_MAX_CHANNELS
    return "winograd" if pays else "direct"


def _all_finite(*arrays: np.ndarray) -> bool:
    """Winograd's transforms subtract inputs from each other, so an inf becomes inf - inf = NaN
    where the direct sum keeps torch's inf: such inputs take the direct path. One summing pass
    (one pass over each on the thread team)."""
    threads = get_num_threads()
    return all(_pointwise.all_finite(a.reshape(-1), threads) for a in arrays)


def _winograd_weight(weight: np.ndarray, flip: bool = False) -> np.ndarray:
    """(C_out, C_in, 3, 3) -> (16, C_out, C_in), point 4i + j of G w G^T; flip: (16, C_in, C_out)
    of the flipped, transposed filters (the input gradient's)."""
    c_out, c_in = weight.shape[:2]
    u = np.empty((16, c_in, c_out) if flip else (16, c_out, c_in), np.float32)
    _conv.winograd_weight(np.ascontiguousarray(weight), u, flip)
    return u


def _winograd_block(
    n: int, args: tuple[int, int, int, int], c_in: int, c_out: int, threads: int
) -> int:
    """Rows of tiles per block: a block's transformed input and products (~1 MiB) stay in L2,
    and the blocks split evenly between the threads."""
    out_h, out_w = args[2:]
    rows, slots_per_row = n * ((out_h + 1) // 2), (out_w + 1) // 2 + 1
    target = max(1, 16384 // ((c_in + c_out) * slots_per_row))
    blocks = _ceil_div(_ceil_div(max(rows, 1), target), threads) * threads
    return max(1, _ceil_div(rows, blocks))


def _winograd4_block(n: int, args: tuple[int, int, int, int], threads: int) -> int:
    """Rows of 4x4 tiles per block, split evenly between the threads: about 48 tiles (one
    register block of the products' columns) for rows of up to 4 tiles, 96 for longer ones
    (measured best at 14x14 and at 28x28 / 32x32 outputs: the 36 points' planes of a block
    then fill about L2)."""
    tiles_w, rows = _ceil_div(args[3], 4), n * _ceil_div(args[2], 4)
    target = max(1, round((48 if tiles_w <= 4 else 96) / tiles_w))
    blocks = _ceil_div(_ceil_div(rows, target), threads) * threads
    return max(1, _ceil_div(rows, blocks))


def _winograd4_weight(weight: np.ndarray, flip: bool) -> np.ndarray:
    """F(4x4)'s (36, C_out, C_in) transform of the filters (flip: (36, C_in, C_out))."""
    c_out, c_in = weight.shape[:2]
    u = np.empty((36, c_in, c_out) if flip else (36, c_out, c_in), np.float32)
    _conv.winograd4_weight(np.ascontiguousarray(weight), u, flip)
    return u


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _winograd4_pays(args: tuple[int, int, int, int]) -> bool:
    """Whether F(4x4, 3x3) runs: its AVX-512 transforms, outputs of 12 or more rows and
    columns. Measured against F(2x2), x(64,32,h,h) -> 64 (medians, one run each): 1.1-1.25x
    faster at 12x12 and 14x14, 1.3x at 28x28, 1.6x on x(64,64,32,32); level at 8x8, slower at
    10x10 (4x4 tiles overhang a 10-wide output by 2 columns and rows)."""
    return (
        _use_winograd4
        and _conv.has_winograd4
        and _conv.winograd_products_backend() == "micro-kernel"
        and min(args[2:]) >= 12
    )


_use_winograd4 = True  # tests and A/B runs switch F(4x4) off to compare


def _winograd_conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    out: np.ndarray,
    args: tuple[int, int, int, int],
    threads: int,
    indices: np.ndarray | None = None,
    pool: int = 0,
    flip: bool = False,
) -> None:
    """out = conv2d(x, weight) by Winograd; args: (pad_top, pad_left, out_h, out_w). flip: by the
    flipped, transposed weight instead (the input gradient's).

    pool 1 or 2: out = max_pool2d(conv2d(x), 2) instead (2: with its indices), on F(2x2)'s
    transforms, whose 2x2 tile is one pooling window; without pooling F(4x4) where it pays."""
    f4 = not pool and _winograd4_pays(args)
    u = _winograd4_weight(weight, flip) if f4 else _winograd_weight(weight, flip)
    c_in, c_out = x.shape[1], u.shape[1]
    if f4:
        block = _winograd4_block(x.shape[0], args, threads)
        size = _conv.winograd4_workspace_size(c_in, c_out, args, block)
    else:
        block = _winograd_block(x.shape[0], args, c_in, c_out, threads)
        size = _conv.winograd_workspace_size(c_in, c_out, args, block)
    (workspace,) = _workspace(np.float32, (threads, size))
    has_bias = bias is not None
    bias = bias if has_bias else np.zeros(1, np.float32)
    if f4:
        _conv.winograd4_conv2d_forward(x, u, bias, out, workspace, args, block, has_bias, threads)
        return
    _conv.winograd_conv2d_forward(
        x,
        u,
        bias,
        out,
        indices if indices is not None else np.empty((1, 1, 1, 1), np.int64),
        workspace,
        args,
        block,
        has_bias,
        pool,
        threads,
    )


def _shifted(g: _args.ConvGeometry, groups: int, dtype: npt.DTypeLike) -> bool:
    """Whether the direct path runs on the shifted-view micro-kernel (no im2col copy; strides
    through phase planes, see _conv.pyx)."""
    return (
        g.dilation == (1, 1)
        and groups == 1
        and np.dtype(dtype) == np.float32
        and _conv.winograd_products_backend() == "micro-kernel"
    )


def _direct_workspace(
    g: _args.ConvGeometry,
    c_out: int,
    groups: int,
    dtype: npt.DTypeLike,
    threads: int,
    *extra: tuple[int, ...],
) -> tuple[Any, ...]:
    """(shifts, shifted, workspace, *extra views) for conv2d_forward and the fused conv + pool."""
    if _shifted(g, groups, dtype):
        shifts = np.empty(g.patch_size, np.int64)
        _conv.shifts(g.c_in, g.kernel_args, shifts)
        size = _conv.shifted_workspace(g.c_in, c_out, g.kernel_args)
        return (shifts, True, *_workspace(dtype, (threads, 1, size), *extra))
    shifts = np.zeros(1, np.int64)
    return (shifts, False, *_workspace(dtype, (threads, g.patch_size, g.out_h * g.out_w), *extra))


def _finish(out: np.ndarray, unbatched: bool) -> np.ndarray:
    return out[0] if unbatched else out


_blas_in_kernels = _blas.kernels_call_blas


def _batch_chunks(n: int, per_sample: int, itemsize: int) -> list[tuple[int, int]]:
    """(start, count) pairs so that count samples' workspace fits the workspace limit."""
    chunk = max(1, min(n, _workspace_limit // max(per_sample * itemsize, 1)))
    return [(n0, min(chunk, n - n0)) for n0 in range(0, n, chunk)]


def conv2d(
    input: npt.ArrayLike,
    weight: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> np.ndarray:
    """2-D convolution (cross-correlation) of x (N, C_in, H, W) with weight (C_out, C_in/groups, kH, kW).

    Returns (N, C_out, H_out, W_out); padding may be an int, a pair, 'valid' or 'same'.
    """
    a = _args.conv_args(input, weight, stride, padding, dilation, groups)
    bias = _args.bias_array(bias, a.weight)
    g, w = a.geometry, a.weight
    c_out, rows, positions = w.shape[0], g.patch_size, g.out_h * g.out_w
    out = np.empty((g.n, c_out, g.out_h, g.out_w), dtype=w.dtype)
    flat_out = out.reshape(g.n, c_out, positions)
    weight_by_group = w.reshape(groups, c_out // groups, rows // groups)
    threads = get_num_threads()
    if conv2d_algorithm(g, c_out, groups, w.dtype) == "winograd" and _all_finite(a.x, w):
        args = (g.pad_top, g.pad_left, g.out_h, g.out_w)
        _winograd_conv2d(a.x, w, bias, out, args, threads)
        return _finish(out, a.unbatched)
    if _blas_in_kernels():
        shifts, shifted, workspace = _direct_workspace(g, c_out, groups, w.dtype, threads)
        has_bias = bias is not None
        _conv.conv2d_forward(
            a.x,
            weight_by_group,
            bias if has_bias else np.zeros(1, w.dtype),
            flat_out,
            workspace,
            g.kernel_args,
            has_bias,
            shifts,
            shifted,
            threads,
        )
        return _finish(out, a.unbatched)
    for n0, count in _batch_chunks(g.n, rows * positions, w.itemsize):
        (cols,) = _workspace(w.dtype, (count, groups, rows // groups, positions))
        _conv.im2col(
            a.x[n0 : n0 + count], cols.reshape(count, rows, positions), g.kernel_args, threads
        )
        np.matmul(
            weight_by_group,
            cols,
            out=flat_out[n0 : n0 + count].reshape(count, groups, -1, positions),
        )
    if bias is not None:
        out += bias[:, None, None]
    return _finish(out, a.unbatched)


def _conv2d_max_pool2d(
    input: npt.ArrayLike,
    weight: npt.ArrayLike,
    bias: npt.ArrayLike | None,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: int | tuple[int, int],
    groups: int,
    pool: tuple[Any, ...],
    with_indices: bool,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int]] | None:
    """max_pool2d(conv2d(x), *pool) in one pass, pooling each sample's output in cache.

    pool: (kernel_size, stride, padding, dilation, ceil_mode) as max_pool2d takes them. Returns
    (pooled, indices into the convolution's output planes, that output's shape), indices None
    unless with_indices; or None when some pooling window reaches outside the plane (the caller
    then runs the two steps).
    """
    a = _args.conv_args(input, weight, stride, padding, dilation, groups)
    bias = _args.bias_array(bias, a.weight)
    g, w = a.geometry, a.weight
    c_out, rows, positions = w.shape[0], g.patch_size, g.out_h * g.out_w
    conv_shape = (g.n, c_out, g.out_h, g.out_w)
    p = _args.pool_geometry(conv_shape, w.itemsize, *pool)
    if (
        a.unbatched
        or not _blas_in_kernels()
        or not _pool.interior((p.h, p.w, p.out_h, p.out_w), p.pool_args)
    ):
        return None
    threads = get_num_threads()
    if conv2d_algorithm(g, c_out, groups, w.dtype) == "winograd" and _all_finite(a.x, w):
        # A Winograd tile is exactly one 2x2 / 2 window: pool it as it leaves the transform.
        # Any other pooling runs after Winograd's convolution, which beats the fused direct one.
        window = (p.kh, p.kw, p.stride, p.pad_top, p.pad_left, p.dilation)
        if window != (2, 2, (2, 2), 0, 0, (1, 1)) or (p.out_h, p.out_w) != (
            g.out_h // 2,
            g.out_w // 2,
        ):
            return None
        out = np.empty((g.n, c_out, p.out_h, p.out_w), dtype=w.dtype)
        indices: np.ndarray | None = np.empty(out.shape, np.int64) if with_indices else None
        args = (g.pad_top, g.pad_left, g.out_h, g.out_w)
        _winograd_conv2d(a.x, w, bias, out, args, threads, indices, 2 if with_indices else 1)
        return out, indices, conv_shape
    out = np.empty((g.n, c_out, p.out_h, p.out_w), dtype=w.dtype)
    indices = np.empty(out.shape if with_indices else (1, 1, 1, 1), dtype=np.int64)
    shifts, shifted, workspace, scratch = _direct_workspace(
        g, c_out, groups, w.dtype, threads, (threads, c_out, positions)
    )
    has_bias = bias is not None
    _conv.conv2d_max_pool_forward(
        a.x,
        w.reshape(groups, c_out // groups, rows // groups),
        bias if has_bias else np.zeros(1, w.dtype),
        out,
        indices,
        workspace,
        scratch,
        g.kernel_args,
        p.pool_args,
        has_bias,
        with_indices,
        shifts,
        shifted,
        threads,
    )
    return out, (indices if with_indices else None), conv_shape


def conv2d_backward(
    grad_output: npt.ArrayLike,
    input: npt.ArrayLike,
    weight: npt.ArrayLike,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    output_mask: Sequence[bool] = (True, True, True),
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Gradients of conv2d w.r.t. (input, weight, bias), as torch autograd computes them.

    output_mask (keyword only, as torch's convolution_backward) skips the gradients not needed,
    returning None in their place: a first layer never needs its input's gradient.
    """
    a = _args.conv_args(input, weight, stride, padding, dilation, groups)
    g, w = a.geometry, a.weight
    c_out, rows, positions = w.shape[0], g.patch_size, g.out_h * g.out_w
    grad = _args.grad_output_array(
        grad_output, (g.n, c_out, g.out_h, g.out_w), w.dtype, a.unbatched
    ).reshape(g.n, c_out, positions)
    want_input, want_weight, want_bias = (bool(m) for m in output_mask)
    grad_input = np.empty_like(a.x) if want_input else None
    weight_by_group = w.reshape(groups, c_out // groups, rows // groups)
    threads = get_num_threads()
    if conv2d_algorithm(g, c_out, groups, w.dtype) == "winograd" and _all_finite(grad, a.x, w):
        grad_weight = _winograd_conv2d_backward(
            grad.reshape(g.n, c_out, g.out_h, g.out_w), a.x, w, g, grad_input, want_weight, threads
        )
    elif _blas_in_kernels():
        grad_weight = _direct_conv2d_backward(
            grad, a.x, w, weight_by_group, g, grad_input, want_weight, threads
        )
    else:
        grad_weight = np.zeros(weight_by_group.shape, dtype=w.dtype)
        for n0, count in _batch_chunks(g.n, rows * positions, w.itemsize):
            (cols,) = _workspace(w.dtype, (count, groups, rows // groups, positions))
            flat_cols = cols.reshape(count, rows, positions)
            grad_chunk = grad[n0 : n0 + count].reshape(count, groups, -1, positions)
            if want_weight:
                _conv.im2col(a.x[n0 : n0 + count], flat_cols, g.kernel_args, threads)
                grad_weight += np.matmul(grad_chunk, cols.transpose(0, 1, 3, 2)).sum(axis=0)
            if grad_input is not None:  # want_input
                np.matmul(weight_by_group.transpose(0, 2, 1), grad_chunk, out=cols)
                _conv.col2im(flat_cols, grad_input[n0 : n0 + count], g.kernel_args, threads)
    return (
        _finish(grad_input, a.unbatched) if grad_input is not None else None,  # want_input
        grad_weight.reshape(w.shape) if want_weight and grad_weight is not None else None,
        _channel_sums(grad) if want_bias else None,
    )


def _direct_conv2d_backward(
    grad: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    weight_by_group: np.ndarray,
    g: _args.ConvGeometry,
    grad_input: np.ndarray | None,
    want_weight: bool,
    threads: int,
) -> np.ndarray | None:
    """The direct path's gradients: the weight's on the shifted A B^T kernel where it pays, the
    rest by im2col + BLAS. Fills grad_input (unless None), returns the weight gradient (None
    unless want_weight).

    The input's gradient stays on BLAS: as the stride-1 convolution of the padded output gradient
    with the flipped filters on the shifted path, it measured 15% slower on the 5x5 layer (the
    padding's zeros are multiplied too)."""
    groups = weight_by_group.shape[0]
    grad_weight = None
    if want_weight and _shifted_weight_grad_pays(g, groups, weight.dtype):
        grad_weight = _shifted_weight_grad(grad, x, g, weight.shape[0], threads)
    blas_weight = want_weight and grad_weight is None
    if grad_input is not None or blas_weight:
        grad_weight_blas = _blas_conv2d_backward(
            grad, x, weight_by_group, g, grad_input, blas_weight, threads
        )
        if blas_weight:
            grad_weight = grad_weight_blas
    return grad_weight


def _blas_conv2d_backward(
    grad: np.ndarray,
    x: np.ndarray,
    weight_by_group: np.ndarray,
    g: _args.ConvGeometry,
    grad_input: np.ndarray | None,
    want_weight: bool,
    threads: int,
) -> np.ndarray:
    """im2col + BLAS per sample: fills grad_input (unless None), returns the weight gradient
    (zeros unless want_weight)."""
    dtype, rows, positions = weight_by_group.dtype, g.patch_size, g.out_h * g.out_w
    # one weight-gradient accumulator per thread, summed in a fixed order: reproducible
    partial, workspace = _workspace(
        dtype, (threads, *weight_by_group.shape), (threads, rows, positions)
    )
    partial[...] = 0
    unused = np.empty((1, 1, 1, 1), dtype)  # the kernel wants a writable array even if unused
    _conv.conv2d_backward(
        grad,
        x,
        weight_by_group,
        grad_input if grad_input is not None else unused,
        partial,
        workspace,
        g.kernel_args,
        grad_input is not None,
        want_weight,
        threads,
    )
    return partial.sum(axis=0)


def _shifted_weight_grad_pays(g: _args.ConvGeometry, groups: int, dtype: npt.DTypeLike) -> bool:
    """Where the shifted weight gradient runs: AVX-512, and 48 or more taps (three vectors of
    them; with the 9 taps of a 1-channel 3x3 filter it measured 2x slower than BLAS)."""
    return _shifted(g, groups, dtype) and _conv.has_shifted_weight_grad and g.patch_size >= 48


def _shifted_weight_grad(
    grad: np.ndarray, x: np.ndarray, g: _args.ConvGeometry, c_out: int, threads: int
) -> np.ndarray:
    """The weight gradient (C_out, taps) on the A B^T micro-kernel against shifted views of x's
    phase planes: no im2col, no BLAS packing (see _conv.conv2d_weight_grad_shifted)."""
    shifts = np.empty(g.patch_size, np.int64)
    _conv.shifts(g.c_in, g.kernel_args, shifts)
    size = _conv.shifted_weight_grad_workspace(g.c_in, c_out, g.kernel_args)
    stride = _conv.channel_stride(g.patch_size)
    partial, workspace = _workspace(np.float32, (threads, c_out, stride), (threads, size))
    partial[...] = 0
    _conv.conv2d_weight_grad_shifted(grad, x, partial, workspace, g.kernel_args, shifts, threads)
    return partial.sum(axis=0)[:, : g.patch_size]


def _channel_sums(grad: np.ndarray) -> np.ndarray:
    """grad (N, C, P) summed over N and P: a bias's gradient (one pass, in double)."""
    out = np.zeros(grad.shape[1], grad.dtype)
    if grad.size:
        _pointwise.channel_sums(grad, out, get_num_threads())
    return out


def _winograd_conv2d_backward(
    grad: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    g: _args.ConvGeometry,
    grad_input: np.ndarray | None,
    want_weight: bool,
    threads: int,
) -> np.ndarray | None:
    """conv2d_backward by Winograd: fills grad_input (unless None), returns the weight gradient.

    The weight gradient is the adjoint of the forward's products, point by point; the input
    gradient is the convolution of grad with the flipped, transposed filters, padded by 2 - pad
    (a negative pad crops), which is again 3x3 and stride 1.
    """
    c_out, c_in = weight.shape[:2]
    grad_weight = None
    if want_weight:
        args = (g.pad_top, g.pad_left, g.out_h, g.out_w)
        block = _winograd_block(g.n, args, c_in, c_out, threads)
        size = _conv.winograd_workspace_size(c_in, c_out, args, block)
        stride = _conv.channel_stride(c_in)
        partial, workspace = _workspace(np.float32, (threads, 16, c_out, stride), (threads, size))
        partial[...] = 0
        _conv.winograd_conv2d_weight_grad(grad, x, partial, workspace, args, block, threads)
        grad_weight = np.empty(weight.shape, np.float32)
        grad_u = np.ascontiguousarray(partial.sum(axis=0)[:, :, :c_in])
        _conv.winograd_weight_grad(grad_u, grad_weight)
    if grad_input is not None:
        args = (2 - g.pad_top, 2 - g.pad_left, g.h, g.w)
        _winograd_conv2d(grad, weight, None, grad_input, args, threads, flip=True)
    return grad_weight


def _planes(array: np.ndarray, g: _args.ConvGeometry) -> np.ndarray:
    return array.reshape(g.n * g.c_in, *array.shape[2:])


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
    """Max pooling of x (N, C, H, W); indices (if asked) are flat positions in each H * W plane."""
    a = _args.pool_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    g = a.geometry
    out = np.empty((g.n, g.c_in, g.out_h, g.out_w), dtype=a.x.dtype)
    if not return_indices and _pool.interior((g.h, g.w, g.out_h, g.out_w), g.pool_args):
        _pool.max_pool2d_values(_planes(a.x, g), _planes(out, g), g.pool_args, get_num_threads())
        return _finish(out, a.unbatched)
    indices = np.empty(out.shape, dtype=np.int64)
    _pool.max_pool2d_forward(
        _planes(a.x, g), _planes(out, g), _planes(indices, g), g.pool_args, get_num_threads()
    )
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
    """Gradient of max_pool2d w.r.t. x; recomputes the indices when they are not given."""
    a = _args.pool_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    g = a.geometry
    shape = (g.n, g.c_in, g.out_h, g.out_w)
    grad = _args.grad_output_array(grad_output, shape, a.x.dtype, a.unbatched)
    if indices is None:
        indices = max_pool2d(a.x, kernel_size, stride, padding, dilation, ceil_mode, True)[1]
    else:
        indices = _args.pool_indices(indices, shape, g, a.unbatched)
    grad_input = np.empty_like(a.x)
    planes, positions = g.n * g.c_in, g.out_h * g.out_w
    out_of_range = _pool.max_pool2d_backward(
        grad.reshape(planes, positions),
        indices.reshape(planes, positions),
        grad_input.reshape(planes, g.h * g.w),
        get_num_threads(),
    )
    if out_of_range:
        raise ValueError(
            f"indices: {out_of_range} values lie outside [-1, {g.h * g.w}) for input planes of "
            f"{g.h}x{g.w}"
        )
    return _finish(grad_input, a.unbatched)


def _max_pool2d_backward_from_indices(
    grad_output: npt.ArrayLike, indices: np.ndarray, input_shape: tuple[int, ...]
) -> np.ndarray:
    """max_pool2d_backward for layers that kept only the indices (the fused conv + pool)."""
    grad = _args.float_array("grad_output", grad_output)
    if (
        grad.shape != indices.shape
        or len(input_shape) != 4
        or indices.shape[:2] != tuple(input_shape[:2])
    ):
        raise ValueError(
            f"grad_output: expected shape {indices.shape} (the pooled output), got {grad.shape}"
        )
    n, c, h, w = input_shape
    grad_input = np.empty(input_shape, dtype=grad.dtype)
    planes = n * c
    out_of_range = _pool.max_pool2d_backward(
        grad.reshape(planes, -1 if planes else 0),
        indices.reshape(planes, -1 if planes else 0),
        grad_input.reshape(planes, h * w),
        get_num_threads(),
    )
    if out_of_range:
        raise ValueError(f"indices: {out_of_range} values lie outside [-1, {h * w})")
    return grad_input


def avg_pool2d(
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> np.ndarray:
    """Average pooling of x (N, C, H, W) with torch's divisor rules."""
    a = _args.pool_args(input, kernel_size, stride, padding, 1, ceil_mode)
    g = a.geometry
    out = np.empty((g.n, g.c_in, g.out_h, g.out_w), dtype=a.x.dtype)
    _pool.avg_pool2d_forward(
        _planes(a.x, g), _planes(out, g), g.pool_args, bool(count_include_pad), get_num_threads()
    )
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
    """Gradient of avg_pool2d w.r.t. x."""
    a = _args.pool_args(input, kernel_size, stride, padding, 1, ceil_mode)
    g = a.geometry
    shape = (g.n, g.c_in, g.out_h, g.out_w)
    grad = _args.grad_output_array(grad_output, shape, a.x.dtype, a.unbatched)
    grad_input = np.empty_like(a.x)
    _pool.avg_pool2d_backward(
        _planes(grad, g),
        _planes(grad_input, g),
        g.pool_args,
        bool(count_include_pad),
        get_num_threads(),
    )
    return _finish(grad_input, a.unbatched)


def unfold(
    input: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    stride: int | tuple[int, int] = 1,
) -> np.ndarray:
    """im2col: (N, C, H, W) -> (N, C * kH * kW, L) sliding blocks, as torch.nn.functional.unfold."""
    x4, g, unbatched = _args.unfold_args(input, kernel_size, dilation, padding, stride)
    cols = np.empty((g.n, g.patch_size, g.out_h * g.out_w), dtype=x4.dtype)
    _conv.im2col(x4, cols, g.kernel_args, get_num_threads())
    return _finish(cols, unbatched)


def fold(
    input: npt.ArrayLike,
    output_size: int | tuple[int, int],
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    stride: int | tuple[int, int] = 1,
) -> np.ndarray:
    """col2im: sums (N, C * kH * kW, L) blocks into (N, C, *output_size), as torch's fold."""
    cols, g, unbatched = _args.fold_args(input, output_size, kernel_size, dilation, padding, stride)
    out = np.empty((g.n, g.c_in, g.h, g.w), dtype=cols.dtype)
    _conv.col2im(cols, out, g.kernel_args, get_num_threads())
    return _finish(out, unbatched)


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
    """Batch normalisation over axis 1 of (N, C, ...), as torch.nn.functional.batch_norm.

    training=True normalises with the batch's statistics and, when running_mean/running_var are
    given, updates them in place (unbiased variance, weight `momentum`).
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)[0]


def _batch_norm(
    input: npt.ArrayLike,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: npt.ArrayLike | None,
    bias: npt.ArrayLike | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """batch_norm, also returning the (mean, invstd) that batch_norm_backward needs."""
    a = _args.batch_norm_args(input, running_mean, running_var, weight, bias, training)
    channels = a.x.shape[1]
    mean = np.zeros(channels) if training else np.asarray(running_mean, dtype=np.float64)
    var = np.zeros(channels) if training else np.asarray(running_var, dtype=np.float64)
    invstd = np.empty(channels)
    out = np.empty_like(a.x)
    _norm.batch_norm_forward(
        a.x, out, a.weight, a.bias, mean, var, invstd, bool(training), float(eps), get_num_threads()
    )
    if training and running_mean is not None and running_var is not None:  # both or neither
        count = a.x.size // channels
        running_mean *= 1 - momentum
        running_mean += (momentum * mean).astype(running_mean.dtype)
        running_var *= 1 - momentum
        running_var += (momentum * var * count / (count - 1)).astype(running_var.dtype)
    return out.reshape(a.shape), mean, invstd


def batch_norm_backward(
    grad_output: npt.ArrayLike,
    input: npt.ArrayLike,
    weight: npt.ArrayLike | None = None,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    training: bool = False,
    eps: float = 1e-5,
    *,
    output_mask: Sequence[bool] = (True, True, True),
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Gradients of batch_norm w.r.t. (input, weight, bias), as torch autograd gives them."""
    a = _args.batch_norm_args(input, running_mean, running_var, weight, None, training)
    if training:
        channels = a.x.shape[1]
        stats = [np.zeros(channels), np.zeros(channels), np.empty(channels)]
        _norm.batch_norm_forward(
            a.x, np.empty_like(a.x), a.weight, a.bias, *stats, True, float(eps), get_num_threads()
        )
        mean, invstd = stats[0], stats[2]
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        invstd = 1 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    return _batch_norm_backward(grad_output, a, mean, invstd, training, output_mask)


def _batch_norm_backward(
    grad_output: npt.ArrayLike,
    a: _args.NormArgs | tuple[npt.ArrayLike, npt.ArrayLike | None],
    mean: np.ndarray,
    invstd: np.ndarray,
    training: bool,
    output_mask: Sequence[bool],
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """batch_norm_backward given the forward's statistics; `a` is _args.NormArgs or (x, weight)."""
    if isinstance(a, tuple):
        a = _args.batch_norm_args(a[0], None, None, a[1], None, training, statistics_given=True)
    grad = _args.float_array("grad_output", grad_output, a.x.dtype)
    if grad.shape != a.shape:
        raise ValueError(f"grad_output: expected shape {a.shape} (the input's), got {grad.shape}")
    channels = a.x.shape[1]
    grad_weight, grad_bias = np.empty(channels), np.empty(channels)
    grad_input = np.empty_like(a.x) if output_mask[0] else np.empty((0, 0, 0), a.x.dtype)
    _norm.batch_norm_backward(
        grad.reshape(a.x.shape),
        a.x,
        a.weight,
        mean,
        invstd,
        grad_input,
        grad_weight,
        grad_bias,
        bool(training),
        bool(output_mask[0]),
        get_num_threads(),
    )
    dtype = a.x.dtype
    return (
        grad_input.reshape(a.shape) if output_mask[0] else None,
        grad_weight.astype(dtype) if output_mask[1] else None,
        grad_bias.astype(dtype) if output_mask[2] else None,
    )


def _matmul(
    a: np.ndarray, b: np.ndarray, trans_a: bool = False, trans_b: bool = False
) -> np.ndarray:
    """op(a) @ op(b) for 2-D arrays of one float dtype, on the kernels' thread team (see
    _conv.team_gemm: BLAS's own pool would spin against the convolutions); NumPy otherwise."""
    op_a, op_b = (a.T if trans_a else a), (b.T if trans_b else b)
    if op_a.shape[1] != op_b.shape[0]:
        raise ValueError(f"matmul: shapes {op_a.shape} and {op_b.shape} do not chain")
    m, k, n = op_a.shape[0], op_a.shape[1], op_b.shape[1]
    if not _blas_in_kernels() or k == 0 or a.dtype != b.dtype or a.dtype.kind != "f":
        return op_a @ op_b
    out = np.empty((m, n), a.dtype)
    if m and n:
        threads = get_num_threads()
        size = _conv.dense_workspace(trans_a, trans_b, m, n, k, threads)
        (workspace,) = _workspace(a.dtype, (threads, max(size, 1)))
        _conv.team_gemm(
            trans_a, trans_b, np.ascontiguousarray(a), np.ascontiguousarray(b), out, workspace,
            threads,
        )  # fmt: skip
    return out


def linear(
    input: npt.ArrayLike, weight: npt.ArrayLike, bias: npt.ArrayLike | None = None
) -> np.ndarray:
    """y = input @ weight^T + bias over the last axis: input (*, in_features), weight
    (out_features, in_features), bias (out_features,), as torch.nn.functional.linear."""
    x, w = np.asarray(input), np.asarray(weight)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"linear: expected input (*, in_features) and weight (out_features, in_features) "
            f"with the same in_features, got input {x.shape} and weight {w.shape}"
        )
    if x.dtype != w.dtype:
        raise TypeError(f"linear: input is {x.dtype} but weight is {w.dtype}")
    out = _matmul(x.reshape(int(np.prod(x.shape[:-1])), w.shape[1]), w, trans_b=True)
    if bias is not None:
        b = np.asarray(bias)
        if b.shape != (w.shape[0],):
            raise ValueError(f"linear: expected bias of shape ({w.shape[0]},), got {b.shape}")
        out += b
    return out.reshape(*x.shape[:-1], w.shape[0])


def relu(input: npt.ArrayLike) -> np.ndarray:
    """max(input, 0) element-wise, a NaN staying NaN (torch.nn.functional.relu)."""
    x = np.asarray(input)
    if x.dtype not in _args.FLOAT_DTYPES:  # integers, as torch takes them: no kernel needed
        return np.maximum(x, 0)
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _pointwise.relu(x.reshape(-1), out.reshape(-1), get_num_threads())
    return out


def relu_backward(grad_output: npt.ArrayLike, output: npt.ArrayLike) -> np.ndarray:
    """The gradient of relu from its output: 0 where output <= 0, else grad_output (torch's
    threshold_backward(grad_output, output, 0), which passes a NaN output's gradient)."""
    out = _args.float_array("output", output)
    grad = _args.float_array("grad_output", grad_output, out.dtype)
    if grad.shape != out.shape:
        raise ValueError(
            f"grad_output: expected shape {out.shape} (relu's output), got {grad.shape}"
        )
    grad_input = np.empty_like(grad)
    _pointwise.relu_backward(
        grad.reshape(-1), out.reshape(-1), grad_input.reshape(-1), get_num_threads()
    )
    return grad_input


def kernel_info() -> dict:
    """Which kernels this build and CPU run, for ``fastconv info``."""
    microkernel = _conv.winograd_products_backend() == "micro-kernel"
    return {
        "openmp": bool(_conv.openmp),
        "cflags": _conv.cflags,
        "conv_gemm": "BLAS called by the kernels, one thread each"
        if _blas.kernels_call_blas()
        else "NumPy matmul on batch chunks (no CBLAS symbol found, or FASTCONV_BLAS=numpy)",
        "winograd": f"F(2x2,3x3){' and F(4x4,3x3)' if _conv.has_winograd4 else ''}, products "
        f"on {'the micro-kernel' if microkernel else 'BLAS'}, "
        f"{_conv.winograd_kernels}",
        "microkernels": _conv.microkernels,
        "conv_algorithm": get_conv_algorithm(),
    }


# --- transposed convolution: the adjoint of conv2d, on conv2d's own paths ----------------------


def _adjoint_conv2d_backward(
    a: _args.ConvTransposeArgs, conv2d_input: np.ndarray, output_mask: tuple[bool, bool, bool]
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """conv2d_backward of the conv2d (weight, padding, stride, dilation, groups as given) from a
    (C_out, H_out, W_out) input, with x as its output's gradient.

    That conv2d has H + output_padding // stride output rows: more than x's H only when
    dilation > output_padding >= stride; x gets zero rows there (nothing reaches them).
    """
    extra_h, extra_w = (e // s for e, s in zip(a.output_padding, a.stride))
    x = a.x
    if extra_h or extra_w:
        x = np.pad(x, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)))
    return conv2d_backward(
        x,
        conv2d_input,
        a.weight,
        a.stride,
        a.padding,
        a.dilation,
        a.groups,
        output_mask=output_mask,
    )


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
    """Transposed 2-D convolution of x (N, C_in, H, W) with weight (C_in, C_out/groups, kH, kW).

    Returns (N, C_out, H_out, W_out), H_out = (H - 1) * stride - 2 * padding + dilation * (kH - 1)
    + output_padding + 1, as torch.nn.functional.conv_transpose2d. It is conv2d's input gradient
    for a conv2d of weight from a (C_out, H_out, W_out) input, with x as that gradient.
    """
    a = _args.conv_transpose_args(input, weight, stride, padding, output_padding, groups, dilation)
    bias = _args.bias_array(bias, a.weight, a.out_channels)
    # conv2d_backward reads its input only for the weight's gradient, not asked for here
    unused = np.zeros(a.output_shape, a.x.dtype)
    out, _, _ = _adjoint_conv2d_backward(a, unused, (True, False, False))
    assert out is not None  # output_mask asks for it
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
    *,
    output_mask: Sequence[bool] = (True, True, True),
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Gradients of conv_transpose2d w.r.t. (input, weight, bias), as torch autograd computes them.

    The input's is conv2d(grad_output, weight); the weight's is conv2d's weight gradient with
    grad_output as conv2d's input and x as its output gradient. output_mask (keyword only, as in
    conv2d_backward) skips the gradients not needed, returning None in their place.
    """
    a = _args.conv_transpose_args(input, weight, stride, padding, output_padding, groups, dilation)
    grad = _args.grad_output_array(grad_output, a.output_shape, a.x.dtype, a.unbatched)
    want_input, want_weight, want_bias = (bool(m) for m in output_mask)
    grad_input = None
    if want_input:
        full = conv2d(grad, a.weight, None, a.stride, a.padding, a.dilation, a.groups)
        h, w = a.x.shape[2:]
        if full.shape[2:] != (h, w):  # the rows _adjoint_conv2d_backward adds to x
            full = np.ascontiguousarray(full[:, :, :h, :w])
        grad_input = _finish(full, a.unbatched)
    grad_weight = None
    if want_weight:
        _, grad_weight, _ = _adjoint_conv2d_backward(a, grad, (False, True, False))
    return grad_input, grad_weight, grad.sum(axis=(0, 2, 3)) if want_bias else None
