"""The layers. Each keeps from its forward what its backward needs, and nothing more.

Convolution and pooling call fastconv.functional; the rest is a few NumPy operations that keep
the input's dtype (a float32 model on float32 data never computes in float64).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import functional as F
from .module import Module, Parameter, is_grad_enabled, register


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= minimum for v in pair):
        raise ValueError(f"{name}: expected an int or a pair of ints >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _tuple(value):
    """Lists (from JSON) become tuples, as torch stores pooling sizes; ints stay ints."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _json(value):
    """Tuples become lists, NumPy scalars Python ones: what json.dumps accepts."""
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _uniform(rng: np.random.Generator, bound: float, shape, dtype) -> np.ndarray:
    return rng.uniform(-bound, bound, shape).astype(dtype)


def _check_dtype(layer: Module, x: np.ndarray, dtype: np.dtype) -> None:
    if x.dtype != dtype:
        raise TypeError(
            f"{type(layer).__name__}: input dtype {x.dtype} differs from the layer's {dtype}; "
            "convert the input or the model (model.to(dtype))"
        )


class _Conv(Module):
    """What Conv2d and ConvTranspose2d share: channels, kernel, torch's initialisation
    (kaiming-uniform), the gradients' bookkeeping, config and repr. `_geometry_names` lists the
    other arguments in F's order, each with the default the repr leaves out (None: always shown).
    The repr lists them in torch's order.
    """

    _geometry_names: tuple[tuple[str, Any], ...]
    weight: Parameter
    bias: Parameter | None
    _x: np.ndarray

    def _init_parameters(
        self, in_channels, out_channels, kernel_size, groups, bias, dtype, rng, transposed
    ) -> None:
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{type(self).__name__}: in_channels={in_channels} and "
                f"out_channels={out_channels} must be divisible by groups={groups}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        rng = np.random.default_rng(rng)
        # torch's fan-in: weight.shape[1] * kH * kW, whichever channels that dimension holds
        shape = (
            (in_channels, out_channels // groups)
            if transposed
            else (out_channels, in_channels // groups)
        ) + self.kernel_size
        bound = 1 / math.sqrt(shape[1] * self.kernel_size[0] * self.kernel_size[1])
        self.weight = Parameter(_uniform(rng, bound, shape, dtype))
        self.bias = Parameter(_uniform(rng, bound, (out_channels,), dtype)) if bias else None

    def _geometry(self) -> tuple[Any, ...]:
        """The geometry arguments, in the order the functional op takes them."""
        return tuple(getattr(self, name) for name, _ in self._geometry_names)

    def _forward(self, op: Any, x: np.ndarray) -> np.ndarray:
        """Run F's op, keeping the input for backward."""
        self._x = np.ascontiguousarray(x)
        bias = None if self.bias is None else self.bias.data
        return op(self._x, self.weight.data, bias, *self._geometry())

    def _backward(self, backward: Any, grad_output: np.ndarray) -> np.ndarray | None:
        """Run F's backward for this layer, accumulate the parameters' gradients, return the
        input's (None unless needs_input_grad)."""
        grad_input, grad_weight, grad_bias = backward(
            grad_output,
            self._x,
            self.weight.data,
            *self._geometry(),
            output_mask=(self.needs_input_grad, True, self.bias is not None),
        )
        assert grad_weight is not None  # output_mask asks for it
        self.weight.accumulate(grad_weight)
        if self.bias is not None:
            assert grad_bias is not None  # output_mask asks for it when there is a bias
            self.bias.accumulate(grad_bias)
        return grad_input

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": _json(self.kernel_size),
            **{name: _json(getattr(self, name)) for name, _ in self._geometry_names},
            "bias": self.bias is not None,
            "dtype": str(self.weight.dtype),
        }

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        defaults = dict(self._geometry_names)
        for name in ("stride", "padding", "dilation", "output_padding", "groups"):  # torch's order
            if name not in defaults:
                continue
            default = defaults[name]
            if default is None or getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s + (", bias=False" if self.bias is None else "")


@register
class Conv2d(_Conv):
    """2-D convolution over (N, C_in, H, W); weights initialised as torch's (kaiming-uniform)."""

    _geometry_names = (("stride", None), ("padding", (0, 0)), ("dilation", (1, 1)), ("groups", 1))

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        *,
        dtype=np.float32,
        rng=None,
    ):
        self._init_parameters(
            in_channels, out_channels, kernel_size, groups, bias, dtype, rng, False
        )
        self.stride = _pair("stride", stride, 1)
        self.padding = padding if isinstance(padding, str) else _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self._forward(F.conv2d, x)

    def forward_pooled(self, x: np.ndarray, pool: MaxPool2d) -> np.ndarray | None:
        """pool(self(x)) in one pass (the output is pooled while in cache), or None where the
        fused kernel does not apply; `pool` keeps what its backward needs."""
        x = np.ascontiguousarray(x)
        bias = None if self.bias is None else self.bias.data
        fused = F._conv2d_max_pool2d(
            x,
            self.weight.data,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            pool.window(),
            with_indices=is_grad_enabled(),
        )
        if fused is None:
            return None
        self._x = x
        out, indices, pooled_shape = fused
        pool.keep_indices(indices, pooled_shape)
        return out

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        return self._backward(F.conv2d_backward, grad_output)


@register
class MaxPool2d(Module):
    """Max pooling; ceil_mode is keyword-only (torch's fifth positional is return_indices)."""

    # Kept for backward by forward, or by keep_indices when fused into the Conv2d before it
    # (then _x is None and _indices None under no_grad); forward under no_grad keeps nothing.
    _x: np.ndarray | None
    _indices: np.ndarray | None
    _input_shape: tuple[int, ...]

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, *, ceil_mode: bool = False):
        self.kernel_size = _tuple(kernel_size)
        self.stride = self.kernel_size if stride is None else _tuple(stride)
        self.padding, self.dilation = _tuple(padding), _tuple(dilation)
        self.ceil_mode = bool(ceil_mode)

    def window(self) -> tuple[Any, Any, Any, Any, bool]:
        """``(kernel_size, stride, padding, dilation, ceil_mode)``, as F.max_pool2d takes them."""
        return self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode

    _args = window

    def keep_indices(self, indices: np.ndarray | None, input_shape: tuple[int, ...]) -> None:
        """What backward needs when this pooling ran fused into the layer before it: the argmax
        indices of each window into an input of ``input_shape`` (which was not kept)."""
        self._x, self._indices, self._input_shape = None, indices, input_shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not is_grad_enabled():  # no backward to come: the values-only kernel is faster
            return F.max_pool2d(x, *self._args())
        self._x = np.ascontiguousarray(x)
        out, self._indices = F.max_pool2d(self._x, *self._args(), return_indices=True)
        return out

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        if not self.needs_input_grad:
            return None
        if self._x is None:  # fed by Conv2d.forward_pooled: only the indices were kept
            # forward_pooled keeps indices unless under no_grad, which no backward follows
            assert self._indices is not None
            return F._max_pool2d_backward_from_indices(
                grad_output, self._indices, self._input_shape
            )
        return F.max_pool2d_backward(grad_output, self._x, *self._args(), indices=self._indices)

    def config(self) -> dict[str, Any]:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        return {name: _json(value) for name, value in zip(names, self._args())}

    def extra_repr(self) -> str:
        return (
            ", ".join(f"{name}={value}" for name, value in self.config().items())
            .replace("[", "(")
            .replace("]", ")")
        )


@register
class AvgPool2d(Module):
    def __init__(
        self,
        kernel_size,
        stride=None,
        padding=0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
    ):
        self.kernel_size = _tuple(kernel_size)
        self.stride = self.kernel_size if stride is None else _tuple(stride)
        self.padding, self.ceil_mode = _tuple(padding), bool(ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def _args(self):
        return self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = np.ascontiguousarray(x)
        return F.avg_pool2d(self._x, *self._args())

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        if not self.needs_input_grad:
            return None
        return F.avg_pool2d_backward(grad_output, self._x, *self._args())

    def config(self) -> dict[str, Any]:
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        return {name: _json(value) for name, value in zip(names, self._args())}

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


@register
class ReLU(Module):
    def forward(self, x: np.ndarray) -> np.ndarray:
        out = F.relu(x)
        if is_grad_enabled():
            self._out = out  # backward needs only where it is <= 0 (torch keeps it too)
        return out

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        return F.relu_backward(grad_output, self._out) if self.needs_input_grad else None


@register
class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01):
        self.negative_slope = float(negative_slope)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._mask = x > 0
        out = x * self.negative_slope
        # max(x, a*x) when a <= 1, min(x, a*x) when a > 1: one pass, no temporary.
        (np.maximum if self.negative_slope <= 1 else np.minimum)(out, x, out=out)
        return out

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        if not self.needs_input_grad:
            return None
        grad_input = grad_output * self._mask  # exact: g where x > 0, g * slope elsewhere
        grad_input += (grad_output * self.negative_slope) * ~self._mask
        return grad_input

    def config(self) -> dict[str, Any]:
        return {"negative_slope": self.negative_slope}

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


@register
class Flatten(Module):
    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._shape = x.shape
        start, end = self.start_dim % x.ndim, self.end_dim % x.ndim
        if start >= end:
            return x
        return x.reshape(*x.shape[:start], math.prod(x.shape[start : end + 1]), *x.shape[end + 1 :])

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        return grad_output.reshape(self._shape) if self.needs_input_grad else None

    def config(self) -> dict[str, Any]:
        return {"start_dim": self.start_dim, "end_dim": self.end_dim}

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


@register
class Linear(Module):
    """y = x W^T + b over the last axis of x (..., in_features); torch's default initialisation."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, dtype=np.float32, rng=None
    ):
        self.in_features, self.out_features = in_features, out_features
        rng = np.random.default_rng(rng)
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(_uniform(rng, bound, (out_features, in_features), dtype))
        self.bias = Parameter(_uniform(rng, bound, (out_features,), dtype)) if bias else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        _check_dtype(self, x, self.weight.dtype)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear: expected input (..., {self.in_features}), got {x.shape}")
        self._x = x
        return F.linear(x, self.weight.data, None if self.bias is None else self.bias.data)

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        grad = grad_output.reshape(-1, self.out_features)
        self.weight.accumulate(F._matmul(grad, self._x.reshape(-1, self.in_features), trans_a=True))
        if self.bias is not None:
            self.bias.accumulate(grad.sum(axis=0))
        if not self.needs_input_grad:
            return None
        return F._matmul(grad, self.weight.data).reshape(*grad_output.shape[:-1], -1)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": str(self.weight.dtype),
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


@register
class Dropout(Module):
    """Zeroes each element with probability p in training, scaling the rest by 1 / (1 - p).

    The mask comes from `rng` (an int seed, a numpy Generator, or None for a fresh one);
    in eval mode Dropout is the identity.
    """

    def __init__(self, p: float = 0.5, *, rng=None):
        if not 0 <= p <= 1:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(rng)

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training or self.p == 0:
            self._mask = None
            return x
        keep = self.rng.random(x.shape, dtype=x.dtype) >= self.p
        self._mask = keep * x.dtype.type(0 if self.p == 1 else 1 / (1 - self.p))
        return x * self._mask

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        if not self.needs_input_grad:
            return None
        return grad_output if self._mask is None else grad_output * self._mask

    def config(self) -> dict[str, Any]:
        return {"p": self.p}

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _BatchNorm(Module):
    """Normalises each channel (axis 1) over every other axis, as torch's BatchNorm: batch
    statistics in training (biased variance to normalise, unbiased for running_var), running
    statistics in eval mode (unless track_running_stats=False)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        bias: bool = True,
        dtype=np.float32,
    ):
        self.num_features, self.eps, self.momentum = num_features, float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        self.weight = Parameter(np.ones(num_features, dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype)) if affine and bias else None
        self.running_mean = self.running_var = self.num_batches_tracked = None
        if track_running_stats:
            self.running_mean = np.zeros(num_features, dtype)
            self.running_var = np.ones(num_features, dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
            self._buffer_names = ("running_mean", "running_var", "num_batches_tracked")
        self._dtype = np.dtype(dtype)  # used only when there are neither weights nor statistics

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._check_input(x)
        if self.affine or self.track_running_stats:
            _check_dtype(self, x, self.dtype)
        self._batch_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        factor = 0.0
        if update:
            assert self.num_batches_tracked is not None  # track_running_stats
            self.num_batches_tracked += 1
            factor = 1 / int(self.num_batches_tracked) if self.momentum is None else self.momentum
        self._x = x
        out, self._mean, self._invstd = F._batch_norm(
            x,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            None if self.weight is None else self.weight.data,
            None if self.bias is None else self.bias.data,
            self._batch_stats,
            factor,
            self.eps,
        )
        return out

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        weight = None if self.weight is None else self.weight.data
        grad_input, grad_weight, grad_bias = F._batch_norm_backward(
            grad_output,
            (self._x, weight),
            self._mean,
            self._invstd,
            self._batch_stats,
            (self.needs_input_grad, self.affine, self.bias is not None),
        )
        if self.weight is not None:  # affine: output_mask asks for its gradient
            assert grad_weight is not None
            self.weight.accumulate(grad_weight)
        if self.bias is not None:  # output_mask asks for its gradient
            assert grad_bias is not None
            self.bias.accumulate(grad_bias)
        return grad_input

    @property
    def dtype(self) -> np.dtype:
        if self.weight is not None:  # affine
            return self.weight.dtype
        if self.running_mean is not None:  # track_running_stats
            return self.running_mean.dtype
        return self._dtype

    def config(self) -> dict[str, Any]:
        return {
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "bias": self.bias is not None,
            "dtype": str(self.dtype),
        }

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _check_input(self, x: np.ndarray) -> None:
        raise NotImplementedError


@register
class BatchNorm2d(_BatchNorm):
    def _check_input(self, x: np.ndarray) -> None:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm2d: expected input (N, {self.num_features}, H, W), got shape {x.shape}"
            )


@register
class BatchNorm1d(_BatchNorm):
    def _check_input(self, x: np.ndarray) -> None:
        if x.ndim not in (2, 3) or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm1d: expected input (N, {self.num_features}) or "
                f"(N, {self.num_features}, L), got shape {x.shape}"
            )


@register
class ConvTranspose2d(_Conv):
    """Transposed 2-D convolution over (N, C_in, H, W), weight (C_in, C_out / groups, kH, kW);
    initialised as torch's (kaiming-uniform: its fan-in is C_out / groups * kH * kW)."""

    _geometry_names = (
        ("stride", None),
        ("padding", (0, 0)),
        ("output_padding", (0, 0)),
        ("groups", 1),
        ("dilation", (1, 1)),
    )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        bias: bool = True,
        dilation=1,
        padding_mode: str = "zeros",
        *,
        dtype=np.float32,
        rng=None,
    ):
        if padding_mode != "zeros":
            raise ValueError(
                f"ConvTranspose2d: padding_mode must be 'zeros' (as torch's), got {padding_mode!r}"
            )
        self._init_parameters(
            in_channels, out_channels, kernel_size, groups, bias, dtype, rng, True
        )
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.output_padding = _pair("output_padding", output_padding, 0)
        self.dilation = _pair("dilation", dilation, 1)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self._forward(F.conv_transpose2d, x)

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        return self._backward(F.conv_transpose2d_backward, grad_output)
