"""Argument checking and output-shape arithmetic shared by `functional` and `reference`.

Everything a kernel trusts is established here: dtypes, ndim, contiguity, and the geometry
(output sizes, paddings) computed with Python integers, so nothing overflows and nothing
reaches compiled code unchecked. The rules and messages follow torch.nn.functional.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(name: str, value: npt.ArrayLike, dtype: np.dtype | None = None) -> np.ndarray:
    """C-contiguous float32/float64 array, copied only when it has to be."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as err:
            raise TypeError(f"{name}: expected an array of floats ({err})") from None
    if array.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {array.dtype}")
    if dtype is not None and array.dtype != dtype:
        raise TypeError(
            f"{name}: dtype {array.dtype} does not match the input's dtype {dtype}; "
            "convert one of them (mixing float32 and float64 is not allowed)"
        )
    if not array.flags.c_contiguous:  # the copy below must fit too (a broadcast view may not)
        check_fits(name, array.shape, array.itemsize)
    return np.ascontiguousarray(array)


def batched(name: str, array: np.ndarray, what: str = "(C, H, W)") -> tuple[np.ndarray, bool]:
    """Accept (N, C, H, W) or unbatched (C, H, W) as torch does; returns (4-D array, unbatched)."""
    if array.ndim == 3:
        return array[np.newaxis], True
    if array.ndim != 4:
        raise ValueError(
            f"{name}: expected a 3-D {what} or 4-D (N, {what[1:]} array, got shape {array.shape}"
        )
    return array, False


# The kernels' 64-bit index arithmetic (sums and products of these) stays far from overflow;
# torch's pooling has the same limit (its kernels take C ints).
MAX_PARAMETER = 2**31 - 1


def pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each in [minimum, MAX_PARAMETER]."""
    values = (
        (value, value) if isinstance(value, Integral) else tuple(value) if _is_seq(value) else None
    )
    if (
        values is None
        or len(values) != 2
        or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values)
    ):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value!r}")
    if max(values) > MAX_PARAMETER:
        raise ValueError(f"{name}: must be at most {MAX_PARAMETER} (2**31 - 1), got {value!r}")
    return int(values[0]), int(values[1])


def _is_seq(value: object) -> TypeGuard[Sequence[Any] | np.ndarray]:
    return isinstance(value, (tuple, list)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def check_nonempty(name: str, shape: tuple[int, ...], from_axis: int = 1) -> None:
    """Batch may be empty (as in torch); channels and spatial sizes may not."""
    if any(s == 0 for s in shape[from_axis:]):
        raise ValueError(
            f"{name}: channel and spatial dimensions must be non-zero, got shape {shape}"
        )


def check_fits(name: str, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse, before allocating, an array larger than this machine's memory."""
    needed = itemsize
    for s in shape:
        needed *= int(s)
    if needed > physical_memory():
        raise MemoryError(
            f"{name}: an array of shape {tuple(shape)} needs {needed:,} bytes, more than this "
            f"machine's {physical_memory():,} bytes of memory"
        )


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 46


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one 2-D sliding-window operation; pads may be asymmetric ('same')."""

    n: int
    c_in: int
    h: int
    w: int
    kh: int
    kw: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad_top: int
    pad_left: int
    out_h: int
    out_w: int

    @property
    def patch_size(self) -> int:
        return self.c_in * self.kh * self.kw

    @property
    def kernel_args(self) -> tuple[int, ...]:
        """The scalar arguments every im2col-style kernel takes, in its order."""
        return self.pool_args + (self.out_h, self.out_w)

    @property
    def pool_args(self) -> tuple[int, ...]:
        """(kh, kw, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w)."""
        return (
            self.kh,
            self.kw,
            self.stride[0],
            self.stride[1],
            self.pad_top,
            self.pad_left,
            self.dilation[0],
            self.dilation[1],
        )


def sliding_geometry(
    name: str,
    shape: tuple[int, ...],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, ...],
    dilation: tuple[int, int],
) -> ConvGeometry:
    """Geometry for conv/unfold/fold: padding is an int pair or (top, bottom, left, right)."""
    n, c, h, w = shape
    kh, kw = kernel
    if len(padding) == 2:
        padding = (padding[0], padding[0], padding[1], padding[1])
    top, bottom, left, right = padding
    eff_h = dilation[0] * (kh - 1) + 1
    eff_w = dilation[1] * (kw - 1) + 1
    padded_h, padded_w = h + top + bottom, w + left + right
    if eff_h > padded_h or eff_w > padded_w:
        raise ValueError(
            f"{name}: calculated padded input size per channel: ({padded_h} x {padded_w}); "
            f"kernel size (dilated): ({eff_h} x {eff_w}). Kernel size can't be greater than "
            "the padded input size"
        )
    out_h = (padded_h - eff_h) // stride[0] + 1
    out_w = (padded_w - eff_w) // stride[1] + 1
    return ConvGeometry(n, c, h, w, kh, kw, stride, dilation, top, left, out_h, out_w)


def conv_padding(
    padding: int | tuple[int, int] | str,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from an int, a pair, 'valid' or 'same' (torch's rules)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding: 'same' is not supported for strided convolutions")
            # torch puts the odd extra row/column at the bottom/right.
            total_h = dilation[0] * (kernel[0] - 1)
            total_w = dilation[1] * (kernel[1] - 1)
            return (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        raise ValueError(f"padding: expected 'valid', 'same', an int or a pair, got {padding!r}")
    ph, pw = pair("padding", padding, 0)
    return (ph, ph, pw, pw)


@dataclass(frozen=True)
class ConvArgs:
    x: np.ndarray  # 4-D, contiguous
    weight: np.ndarray
    geometry: ConvGeometry
    groups: int
    unbatched: bool


def conv_args(
    x: npt.ArrayLike,
    weight: npt.ArrayLike,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: int | tuple[int, int],
    groups: int,
) -> ConvArgs:
    """Validate conv2d's arguments the way torch.nn.functional.conv2d does."""
    x4, weight, groups, unbatched = conv_operands(
        "x", x, weight, groups, "(C_out, C_in / groups, kH, kW)"
    )
    c_out, c_per_group, kh, kw = weight.shape
    if x4.shape[1] != c_per_group * groups:
        raise ValueError(
            f"x: expected {c_per_group * groups} input channels (weight {weight.shape}, "
            f"groups={groups}), got x of shape {x4.shape[1 if unbatched else 0 :]}"
        )
    stride = pair("stride", stride, 1)
    dilation = pair("dilation", dilation, 1)
    pads = conv_padding(padding, (kh, kw), stride, dilation)
    geometry = sliding_geometry("x", x4.shape, (kh, kw), stride, pads, dilation)
    check_fits("output", (x4.shape[0], c_out, geometry.out_h, geometry.out_w), weight.itemsize)
    return ConvArgs(x4, weight, geometry, groups, unbatched)


def conv_operands(
    name: str, x: npt.ArrayLike, weight: npt.ArrayLike, groups: object, layout: str
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """(4-D x, weight, groups, unbatched) for a convolution: float arrays of one dtype, x 3-D or
    4-D, weight 4-D as ``layout`` says with dimension 0 divisible by groups, and no channel or
    spatial size zero. ``name`` is the input's name in messages."""
    x = float_array(name, x)
    weight = float_array("weight", weight, x.dtype)
    x4, unbatched = batched(name, x)
    if weight.ndim != 4:
        raise ValueError(f"weight: expected a 4-D array {layout}, got shape {weight.shape}")
    groups = check_groups(groups)
    check_nonempty("weight", weight.shape, 0)
    check_nonempty(name, x4.shape)
    if weight.shape[0] % groups:
        raise ValueError(
            f"groups: {layout[1:].split(',')[0]} = {weight.shape[0]} (weight {weight.shape}) is "
            f"not divisible by groups={groups}"
        )
    return x4, weight, groups, unbatched


def check_groups(groups: object) -> int:
    if not isinstance(groups, Integral) or isinstance(groups, bool):
        raise TypeError(f"groups: expected an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups: must be >= 1, got {groups}")
    return int(groups)


def bias_array(
    bias: npt.ArrayLike | None, weight: np.ndarray, out_channels: int | None = None
) -> np.ndarray | None:
    """bias of shape (C_out,): weight.shape[0] unless given (a transposed convolution's is
    weight.shape[1] * groups)."""
    if bias is None:
        return None
    bias = float_array("bias", bias, weight.dtype)
    channels = weight.shape[0] if out_channels is None else out_channels
    if bias.shape != (channels,):
        raise ValueError(
            f"bias: expected shape ({channels},) for weight {weight.shape}, got {bias.shape}"
        )
    return bias


def grad_output_array(
    grad_output: npt.ArrayLike, expected_shape: tuple[int, ...], dtype: np.dtype, unbatched: bool
) -> np.ndarray:
    """grad_output must have exactly the forward output's shape (batched as the input was)."""
    grad = float_array("grad_output", grad_output, dtype)
    shown = expected_shape[1:] if unbatched else expected_shape
    if grad.shape != tuple(shown):
        raise ValueError(
            f"grad_output: expected shape {tuple(shown)} (the forward output), got {grad.shape}"
        )
    return grad[np.newaxis] if unbatched else grad


@dataclass(frozen=True)
class PoolArgs:
    x: np.ndarray
    geometry: ConvGeometry
    ceil_mode: bool
    unbatched: bool


def pool_args(
    x: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    ceil_mode: bool,
) -> PoolArgs:
    """Validate pooling arguments as torch's pool2d_shape_check does."""
    x = float_array("x", x)
    x4, unbatched = batched("x", x)
    geometry = pool_geometry(
        x4.shape, x.itemsize, kernel_size, stride, padding, dilation, ceil_mode
    )
    return PoolArgs(x4, geometry, bool(ceil_mode), unbatched)


def pool_geometry(
    shape: tuple[int, ...],
    itemsize: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    ceil_mode: bool,
) -> ConvGeometry:
    """The pooling window geometry over an input of this (N, C, H, W) shape."""
    check_nonempty("x", shape)
    kernel = pair("kernel_size", kernel_size, 1)
    stride = (
        kernel
        if stride is None or (_is_seq(stride) and len(stride) == 0)
        else pair("stride", stride, 1)
    )
    pad = pair("padding", padding, 0)
    dilation = pair("dilation", dilation, 1)
    if pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
        raise ValueError(
            f"padding: should be at most half of kernel_size, got padding={pad} for kernel_size={kernel}"
        )
    n, c, h, w = shape
    out = [
        pool_output_size(size, k, s, p, d, ceil_mode)
        for size, k, s, p, d in zip((h, w), kernel, stride, pad, dilation)
    ]
    if min(out) < 1:
        raise ValueError(
            f"x: given input size ({shape[1]}x{h}x{w}), calculated output size "
            f"({shape[1]}x{out[0]}x{out[1]}) is too small for kernel_size={kernel}, "
            f"stride={stride}, padding={pad}, dilation={dilation}"
        )
    check_fits("output", (shape[0], shape[1], out[0], out[1]), itemsize)
    return ConvGeometry(n, c, h, w, *kernel, stride, dilation, pad[0], pad[1], out[0], out[1])


def pool_output_size(
    size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool
) -> int:
    numerator = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    # torch: the last window must start inside the (left-padded) input.
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def unfold_args(
    x: npt.ArrayLike,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int],
    padding: int | tuple[int, int],
    stride: int | tuple[int, int],
) -> tuple[np.ndarray, ConvGeometry, bool]:
    x = float_array("x", x)
    x4, unbatched = batched("x", x)
    check_nonempty("x", x4.shape)
    geometry = sliding_geometry(
        "x",
        x4.shape,
        pair("kernel_size", kernel_size, 1),
        pair("stride", stride, 1),
        pair("padding", padding, 0),
        pair("dilation", dilation, 1),
    )
    check_fits(
        "output", (x4.shape[0], geometry.patch_size, geometry.out_h * geometry.out_w), x.itemsize
    )
    return x4, geometry, unbatched


def fold_args(
    cols: npt.ArrayLike,
    output_size: int | tuple[int, int],
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int],
    padding: int | tuple[int, int],
    stride: int | tuple[int, int],
) -> tuple[np.ndarray, ConvGeometry, bool]:
    """Validate fold (col2im): cols (N, C * kH * kW, L) or unbatched (C * kH * kW, L)."""
    cols = float_array("input", cols)
    unbatched = cols.ndim == 2
    if cols.ndim not in (2, 3):
        raise ValueError(
            f"input: expected a 2-D (C * kH * kW, L) or 3-D (N, C * kH * kW, L) array, got shape {cols.shape}"
        )
    cols3 = cols[np.newaxis] if unbatched else cols
    kernel = pair("kernel_size", kernel_size, 1)
    out_h, out_w = pair("output_size", output_size, 1)
    n, rows, length = cols3.shape
    if rows == 0 or rows % (kernel[0] * kernel[1]):
        raise ValueError(
            f"input: size of dimension 1 ({rows}) must be a non-zero multiple of "
            f"kernel_size[0] * kernel_size[1] = {kernel[0] * kernel[1]}"
        )
    c = rows // (kernel[0] * kernel[1])
    check_fits("output", (n, c, out_h, out_w), cols.itemsize)
    geometry = sliding_geometry(
        "output_size",
        (n, c, out_h, out_w),
        kernel,
        pair("stride", stride, 1),
        pair("padding", padding, 0),
        pair("dilation", dilation, 1),
    )
    if geometry.out_h * geometry.out_w != length:
        raise ValueError(
            f"input: expected {geometry.out_h * geometry.out_w} sliding blocks in dimension "
            f"{cols.ndim - 1} for output_size={(out_h, out_w)}, kernel_size={kernel}, "
            f"got shape {cols.shape}"
        )
    return cols3, geometry, unbatched


def pool_indices(
    indices: npt.ArrayLike, shape: tuple[int, ...], g: ConvGeometry, unbatched: bool
) -> np.ndarray:
    """max_pool2d's indices: int64, the output's shape, each a flat position inside its plane."""
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"indices: expected an integer array, got dtype {indices.dtype}")
    shown = shape[1:] if unbatched else shape
    if indices.shape != tuple(shown):
        raise ValueError(
            f"indices: expected shape {tuple(shown)} (the pooled output), got {indices.shape}"
        )
    # Each value's range is checked by the kernel as it reads it (-1 marks a window that held no
    # input element): a separate pass here would read them all twice.
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    return indices[np.newaxis] if unbatched else indices


@dataclass(frozen=True)
class NormArgs:
    x: np.ndarray  # (N, C, L): every axis after the channel flattened
    weight: np.ndarray  # length C, or 0 for none
    bias: np.ndarray
    shape: tuple[int, ...]  # the input's own shape


def batch_norm_args(
    x: npt.ArrayLike,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: npt.ArrayLike | None,
    bias: npt.ArrayLike | None,
    training: bool,
    statistics_given: bool = False,
) -> NormArgs:
    """Validate batch_norm's arguments as torch.nn.functional.batch_norm does.

    statistics_given: the caller holds the forward's mean and 1/std (a backward pass), so eval
    mode needs no running statistics here.
    """
    x = float_array("input", x)
    if x.ndim < 2:
        raise ValueError(f"input: expected at least 2 dimensions (N, C, ...), got shape {x.shape}")
    channels = x.shape[1]
    vectors: dict[str, np.ndarray] = {}
    for name, value in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if value is None:
            vectors[name] = np.empty(0, dtype=x.dtype)
            continue
        array = value if name.startswith("running") else float_array(name, value, x.dtype)
        if not isinstance(array, np.ndarray) or array.shape != (channels,):
            raise ValueError(
                f"{name}: expected shape ({channels},) for input {x.shape}, "
                f"got {getattr(array, 'shape', type(array).__name__)}"
            )
        vectors[name] = array
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: give both or neither")
    if not training and running_mean is None and not statistics_given:
        raise ValueError("running_mean: needed when training=False")
    count = x.size // channels if channels else 0
    if training and count < 2:
        raise ValueError(
            f"input: expected more than 1 value per channel when training, got shape {x.shape}"
        )
    flat = x.reshape(x.shape[0], channels, -1) if x.size else x.reshape(x.shape[0], channels, 0)
    return NormArgs(flat, vectors["weight"], vectors["bias"], x.shape)


@dataclass(frozen=True)
class ConvTransposeArgs:
    """conv_transpose2d's checked arguments; pairs are (height, width)."""

    x: np.ndarray  # 4-D (N, C_in, H, W), contiguous
    weight: np.ndarray  # (C_in, C_out / groups, kH, kW)
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    out_h: int
    out_w: int
    unbatched: bool

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """(N, C_out, H_out, W_out), batched."""
        return (self.x.shape[0], self.out_channels, self.out_h, self.out_w)


def conv_transpose_args(
    input: npt.ArrayLike,
    weight: npt.ArrayLike,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    output_padding: int | tuple[int, int],
    groups: int,
    dilation: int | tuple[int, int],
) -> ConvTransposeArgs:
    """Validate conv_transpose2d's arguments the way torch.nn.functional.conv_transpose2d does.

    H_out = (H - 1) * stride - 2 * padding + dilation * (kH - 1) + output_padding + 1, which must
    be >= 1; output_padding must be smaller than stride or dilation (torch's rule).
    """
    layout = "(C_in, C_out / groups, kH, kW)"
    x4, weight, groups, unbatched = conv_operands("input", input, weight, groups, layout)
    c_in, _, kh, kw = weight.shape
    if x4.shape[1] != c_in:
        raise ValueError(
            f"input: expected {c_in} channels (weight {weight.shape} is {layout}), got input of "
            f"shape {x4.shape[1 if unbatched else 0 :]}"
        )
    stride = pair("stride", stride, 1)
    pads = pair("padding", padding, 0)
    extra = pair("output_padding", output_padding, 0)
    dilation = pair("dilation", dilation, 1)
    if any(e >= max(s, d) for e, s, d in zip(extra, stride, dilation)):
        raise ValueError(
            f"output_padding: must be smaller than either stride or dilation, got "
            f"output_padding={extra}, stride={stride}, dilation={dilation}"
        )
    out_h, out_w = (
        (size - 1) * s - 2 * p + d * (k - 1) + e + 1
        for size, s, p, d, k, e in zip(x4.shape[2:], stride, pads, dilation, (kh, kw), extra)
    )
    if min(out_h, out_w) < 1:
        raise ValueError(
            f"input: given input size per channel ({x4.shape[2]} x {x4.shape[3]}), the "
            f"calculated output size per channel ({out_h} x {out_w}) is too small (kernel "
            f"{(kh, kw)}, stride={stride}, padding={pads}, output_padding={extra}, "
            f"dilation={dilation})"
        )
    check_fits("output", (x4.shape[0], weight.shape[1] * groups, out_h, out_w), weight.itemsize)
    return ConvTransposeArgs(
        x4, weight, stride, pads, extra, dilation, groups, out_h, out_w, unbatched
    )
