"""A model that is a graph of operations, not only a chain: what an imported ONNX model becomes.

    graph = Graph(nodes, inputs, outputs, parameters={...}, buffers={...}, constants={...})
    y = graph(x)                  # runs the nodes in order (they are topologically sorted)
    graph.backward(grad_y)        # runs them in reverse; a value read by several nodes
                                  # gets the sum of their gradients

Each node holds an `Op`: `forward(*inputs)` returns the node's output and keeps what
`backward(grad_output, needs)` needs; backward returns one gradient (or None) per input,
computing only those `needs` asks for. A multi-output op (Split) returns a tuple of outputs, and
its backward gets a list of their gradients (None for an output nothing used). Inputs are values by name: the graph's inputs, the
outputs of earlier nodes, parameters (trained: their gradients accumulate in `.grad`), buffers
(saved in the state dict, never trained) and constants. Convolution and pooling go through
fastconv.functional (1-D ones as 2-D with a height of 1) and ReLU/LeakyReLU through
fastconv.nn; the rest is a few NumPy lines each that keep the input's dtype.

The ops compute the inference form of every operation, in train() as in eval():
BatchNormalization normalises with its stored statistics, Dropout passes its input through.
Fine-tuning an imported model therefore trains every parameter, BatchNorm's scale and bias
included, with the statistics frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import functional as F
from ..nn import LeakyReLU, ReLU
from ..nn.module import Module, Parameter, is_grad_enabled

__all__ = ["Graph", "Node", "ValueInfo", "Op"]


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum grad over the axes along which an array of `shape` was broadcast to grad's shape."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, size in enumerate(shape) if size == 1 and grad.shape[extra + i] != 1
    )
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


class Op:
    """One node's computation. `differentiable` lists the inputs a gradient flows to (None: all)."""

    differentiable: tuple[int, ...] | None = (0,)

    def forward(self, *inputs: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad: np.ndarray, needs: Sequence[bool]) -> Sequence[np.ndarray | None]:
        raise NotImplementedError

    def is_differentiable(self, position: int) -> bool:
        return self.differentiable is None or position in self.differentiable

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# -- sliding windows ------------------------------------------------------------------------------


def same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    """ONNX's auto_pad SAME_UPPER / SAME_LOWER: output ceil(size / stride), the odd pad at the
    end (upper) or at the beginning (lower)."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + dilation * (kernel - 1) + 1 - size)
    return (total // 2, total - total // 2) if upper else (total - total // 2, total // 2)


class _Windows:
    """Shared by Conv and the pools: pads as (top, bottom, left, right) for an input size."""

    def __init__(self, kernel, strides, dilations, pads, auto_pad: str):
        self.kernel, self.strides, self.dilations = tuple(kernel), tuple(strides), tuple(dilations)
        self.pads = tuple(pads)  # ONNX's order: (top, left, bottom, right)
        self.auto_pad = auto_pad

    def _pads(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            upper = self.auto_pad == "SAME_UPPER"
            (t, b), (lft, r) = (
                same_pads(size[i], self.kernel[i], self.strides[i], self.dilations[i], upper)
                for i in range(2)
            )
            return t, b, lft, r
        if self.auto_pad == "VALID":
            return 0, 0, 0, 0
        t, lft, b, r = self.pads
        return t, b, lft, r


def _check_4d(what: str, x: np.ndarray) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what}: expected a 4-D input (N, C, H, W), got shape {x.shape}")


class Conv(_Windows, Op):
    """2-D convolution; asymmetric pads beyond the symmetric part conv2d takes are zero-padded."""

    differentiable = (0, 1, 2)

    def __init__(self, kernel, strides, dilations, pads, auto_pad, group: int):
        super().__init__(kernel, strides, dilations, pads, auto_pad)
        self.group = group

    def forward(self, x, weight, bias=None):
        _check_4d("Conv", x)
        t, b, lft, r = self._pads(x.shape[2:])
        self._sym = (min(t, b), min(lft, r))
        self._extra = (t - self._sym[0], b - self._sym[0], lft - self._sym[1], r - self._sym[1])
        if any(self._extra):
            e = self._extra
            x = np.pad(x, ((0, 0), (0, 0), (e[0], e[1]), (e[2], e[3])))
        self._x, self._weight, self._has_bias = x, weight, bias is not None
        return F.conv2d(x, weight, bias, self.strides, self._sym, self.dilations, self.group)

    def backward(self, grad, needs):
        mask = (needs[0], needs[1], len(needs) > 2 and needs[2] and self._has_bias)
        gx, gw, gb = F.conv2d_backward(
            grad,
            self._x,
            self._weight,
            self.strides,
            self._sym,
            self.dilations,
            self.group,
            output_mask=mask,
        )
        if gx is not None and any(self._extra):
            e = self._extra
            gx = gx[:, :, e[0] : gx.shape[2] - e[1], e[2] : gx.shape[3] - e[3]]
        return gx, gw, gb


class ConvTranspose(Op):
    """2-D transposed convolution (fastconv.functional.conv_transpose2d). Asymmetric pads run as
    the symmetric part, then the extra rows/columns are cropped off the output."""

    differentiable = (0, 1, 2)

    def __init__(self, strides, dilations, pads, output_padding, group: int):
        self.strides, self.dilations = tuple(strides), tuple(dilations)
        self.pads, self.output_padding, self.group = tuple(pads), tuple(output_padding), group

    def forward(self, x, weight, bias=None):
        _check_4d("ConvTranspose", x)
        t, lft, b, r = self.pads
        self._sym = (min(t, b), min(lft, r))
        self._extra = (t - self._sym[0], b - self._sym[0], lft - self._sym[1], r - self._sym[1])
        self._x, self._weight, self._has_bias = x, weight, bias is not None
        out = F.conv_transpose2d(
            x,
            weight,
            bias,
            self.strides,
            self._sym,
            self.output_padding,
            self.group,
            self.dilations,
        )
        e = self._extra
        return out[:, :, e[0] : out.shape[2] - e[1], e[2] : out.shape[3] - e[3]] if any(e) else out

    def backward(self, grad, needs):
        if any(self._extra):
            e = self._extra
            grad = np.pad(grad, ((0, 0), (0, 0), (e[0], e[1]), (e[2], e[3])))
        mask = (needs[0], needs[1], len(needs) > 2 and needs[2] and self._has_bias)
        return F.conv_transpose2d_backward(
            grad,
            self._x,
            self._weight,
            self.strides,
            self._sym,
            self.output_padding,
            self.group,
            self.dilations,
            output_mask=mask,
        )


def pool_output_size(size, kernel, stride, dilation, begin, end, ceil_mode) -> int:
    """onnxruntime's rule (torch's too): with ceil_mode the last window starts inside the input
    or its leading pad."""
    span = size + begin + end - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + begin:
        out -= 1
    return out


class Pool(_Windows, Op):
    """MaxPool / AveragePool. Symmetric pads of at most half the kernel go straight to
    fastconv.functional; any other padding is applied explicitly (-inf or 0), the pools then
    run unpadded, and an average divides by the count of the positions ONNX counts."""

    def __init__(
        self,
        kind: str,
        kernel,
        strides,
        dilations,
        pads,
        auto_pad,
        ceil_mode: bool,
        count_include_pad: bool = False,
    ):
        super().__init__(kernel, strides, dilations, pads, auto_pad)
        self.kind, self.ceil_mode, self.count_include_pad = kind, ceil_mode, count_include_pad

    def forward(self, x):
        _check_4d(f"{self.kind}Pool", x)
        t, b, lft, r = self._pads(x.shape[2:])
        ceil = self.ceil_mode and self.auto_pad in ("NOTSET", "VALID")
        k, s, d = self.kernel, self.strides, self.dilations
        self._x = x
        if t == b <= k[0] // 2 and lft == r <= k[1] // 2:
            self._direct = ((t, lft), ceil)
            if self.kind == "Max":
                if not is_grad_enabled():  # inference: the values-only kernel
                    return F.max_pool2d(x, k, s, (t, lft), d, ceil)
                out, self._indices = F.max_pool2d(x, k, s, (t, lft), d, ceil, return_indices=True)
                return out
            return F.avg_pool2d(x, k, s, (t, lft), ceil, self.count_include_pad)
        self._direct = None
        out = [
            pool_output_size(x.shape[2 + i], k[i], s[i], d[i], *pads, ceil)
            for i, pads in enumerate(((t, b), (lft, r)))
        ]
        extent = [(o - 1) * s[i] + d[i] * (k[i] - 1) + 1 for i, o in enumerate(out)]
        # rows/columns of x that fall inside the padded extent (a ceil_mode-free cut may crop)
        self._begin = (t, lft)
        self._kept = (min(x.shape[2], extent[0] - t), min(x.shape[3], extent[1] - lft))
        xp = np.full((*x.shape[:2], *extent), -np.inf if self.kind == "Max" else 0, x.dtype)
        xp[:, :, t : t + self._kept[0], lft : lft + self._kept[1]] = x[
            :, :, : self._kept[0], : self._kept[1]
        ]
        self._xp = xp
        if self.kind == "Max":
            out, self._indices = F.max_pool2d(xp, k, s, 0, d, False, return_indices=True)
            return out
        counted = np.zeros((1, 1, *extent), x.dtype)
        if self.count_include_pad:  # the input and its declared pads, not the ceil_mode overhang
            counted[:, :, : t + x.shape[2] + b, : lft + x.shape[3] + r] = 1
        else:
            counted[:, :, t : t + self._kept[0], lft : lft + self._kept[1]] = 1
        self._count = F.avg_pool2d(counted, k, s, 0, False, True)  # (count / window area)
        return F.avg_pool2d(xp, k, s, 0, False, True) / self._count

    def backward(self, grad, needs):
        k, s, d = self.kernel, self.strides, self.dilations
        if self._direct is not None:
            pad, ceil = self._direct
            if self.kind == "Max":
                return (
                    F.max_pool2d_backward(grad, self._x, k, s, pad, d, ceil, indices=self._indices),
                )
            return (F.avg_pool2d_backward(grad, self._x, k, s, pad, ceil, self.count_include_pad),)
        if self.kind == "Max":
            gp = F.max_pool2d_backward(grad, self._xp, k, s, 0, d, False, indices=self._indices)
        else:
            gp = F.avg_pool2d_backward(grad / self._count, self._xp, k, s, 0, False, True)
        (t, lft), (h, w) = self._begin, self._kept
        gx = np.zeros_like(self._x)
        gx[:, :, :h, :w] = gp[:, :, t : t + h, lft : lft + w]
        return (gx,)


class GlobalPool(Op):
    def __init__(self, kind: str):
        self.kind = kind

    def forward(self, x):
        if x.ndim < 3:
            raise ValueError(
                f"Global{self.kind}Pool: expected (N, C, ...) with spatial axes, "
                f"got shape {x.shape}"
            )
        self._shape = x.shape
        flat = x.reshape(*x.shape[:2], -1)
        if self.kind == "Max":
            self._index = flat.argmax(axis=2)[:, :, None]
            out = np.take_along_axis(flat, self._index, axis=2)
        else:
            out = flat.mean(axis=2, keepdims=True, dtype=x.dtype)
        return out.reshape(*x.shape[:2], *(1,) * (x.ndim - 2))

    def backward(self, grad, needs):
        n, c = self._shape[:2]
        count = math.prod(self._shape[2:])
        flat = np.zeros((n, c, count), grad.dtype)
        if self.kind == "Max":
            np.put_along_axis(flat, self._index, grad.reshape(n, c, 1), axis=2)
        else:
            flat[...] = grad.reshape(n, c, 1) / grad.dtype.type(count)
        return (flat.reshape(self._shape),)


# -- element-wise ---------------------------------------------------------------------------------


class Layer(Op):
    """A one-input fastconv.nn layer (ReLU, LeakyReLU) as an op."""

    def __init__(self, layer: Module):
        self.layer = layer
        layer.needs_input_grad = True

    def forward(self, x):
        return self.layer(x)

    def backward(self, grad, needs):
        return (self.layer.backward(grad),)

    def __repr__(self) -> str:
        return repr(self.layer)


def relu() -> Layer:
    return Layer(ReLU())


def leaky_relu(alpha: float) -> Layer:
    return Layer(LeakyReLU(alpha))


class Unary(Op):
    """One of the element-wise functions in UNARY, with its attributes (Elu's alpha...)."""

    def __init__(self, kind: str, **attrs: float):
        self.kind, self.attrs = kind, attrs

    def forward(self, x):
        fn, _ = UNARY[self.kind]
        self._x = x
        self._y = np.asarray(fn(x, **{k: x.dtype.type(v) for k, v in self.attrs.items()}), x.dtype)
        return self._y

    def backward(self, grad, needs):
        _, derivative = UNARY[self.kind]
        x = self._x
        return (
            grad * derivative(x, self._y, **{k: x.dtype.type(v) for k, v in self.attrs.items()}),
        )


def _sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _elu(x, alpha):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


# name: (f(x, **attrs), f'(x, f(x), **attrs)), torch's conventions at the kinks
UNARY: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "Neg": (np.negative, lambda x, y: -np.ones_like(x)),
    "Abs": (np.abs, lambda x, y: np.sign(x)),
    "Sqrt": (np.sqrt, lambda x, y: 0.5 / y),
    "Exp": (np.exp, lambda x, y: y),
    "Log": (np.log, lambda x, y: 1 / x),
    "Reciprocal": (np.reciprocal, lambda x, y: -y * y),
    "Sigmoid": (_sigmoid, lambda x, y: y * (1 - y)),
    "Tanh": (np.tanh, lambda x, y: 1 - y * y),
    "Elu": (_elu, lambda x, y, alpha: np.where(x > 0, 1, y + alpha)),
    "Selu": (
        lambda x, alpha, gamma: gamma * _elu(x, alpha),
        lambda x, y, alpha, gamma: np.where(x > 0, gamma, y + gamma * alpha),
    ),
    "Softplus": (lambda x: np.logaddexp(0, x), lambda x, y: _sigmoid(x)),
    "Softsign": (lambda x: x / (1 + np.abs(x)), lambda x, y: 1 / np.square(1 + np.abs(x))),
    "HardSigmoid": (
        lambda x, alpha, beta: np.clip(alpha * x + beta, 0, 1),
        lambda x, y, alpha, beta: np.where((y > 0) & (y < 1), alpha, 0),
    ),
    "HardSwish": (
        lambda x: x * np.clip(x + 3, 0, 6) / 6,
        lambda x, y: np.where(x < -3, 0, np.where(x > 3, 1, (2 * x + 3) / 6)),
    ),
}


class Cast(Op):
    """To another dtype; a gradient flows back between floating-point dtypes only."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)

    def forward(self, x):
        self._dtype = x.dtype
        return x.astype(self.dtype)

    def backward(self, grad, needs):
        return (grad.astype(self._dtype) if self._dtype.kind == "f" else None,)


class PRelu(Op):
    """x where x >= 0, slope * x below; the slope broadcasts to x (per channel: (C, 1, 1))."""

    differentiable = (0, 1)

    def forward(self, x, slope):
        self._x, self._slope = x, slope
        return np.where(x < 0, slope * x, x)

    def backward(self, grad, needs):
        negative = self._x < 0
        gx = grad * np.where(negative, self._slope, 1).astype(grad.dtype) if needs[0] else None
        gs = unbroadcast(grad * self._x * negative, self._slope.shape) if needs[1] else None
        return gx, gs


class Pow(Op):
    """a ** b, broadcasting; the result has a's dtype (ONNX's rule, b may be an integer)."""

    differentiable = (0, 1)

    def forward(self, a, b):
        self._a, self._b = a, b
        self._y = np.power(a, b.astype(a.dtype) if a.dtype.kind == "f" else b).astype(a.dtype)
        return self._y

    def backward(self, grad, needs):
        a, b = self._a, self._b.astype(self._a.dtype)
        ga = gb = None
        if needs[0]:
            ga = unbroadcast(grad * b * np.power(a, b - 1), a.shape)
        if needs[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                log_a = np.where(a > 0, np.log(np.where(a > 0, a, 1)), 0)
            gb = unbroadcast(grad * self._y * log_a, self._b.shape).astype(self._b.dtype)
        return ga, gb


class Variadic(Op):
    """Sum, Mean, Max, Min of any number of inputs, broadcasting. Max/Min split the gradient
    evenly between inputs that tie, as torch.maximum does."""

    differentiable = None

    def __init__(self, kind: str):
        self.kind = kind

    def forward(self, *xs):
        self._shapes = [x.shape for x in xs]
        if self.kind in ("Sum", "Mean"):
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out / out.dtype.type(len(xs)) if self.kind == "Mean" else out + 0
        reduce = np.maximum if self.kind == "Max" else np.minimum
        out = xs[0]
        for x in xs[1:]:
            out = reduce(out, x)
        self._winners = [x == out for x in xs]
        return out + 0  # a copy: never the input itself

    def backward(self, grad, needs):
        if self.kind == "Sum":
            return [unbroadcast(grad, s) if need else None for s, need in zip(self._shapes, needs)]
        if self.kind == "Mean":
            g = grad / grad.dtype.type(len(self._shapes))
            return [unbroadcast(g, s) if need else None for s, need in zip(self._shapes, needs)]
        ties = sum(w.astype(grad.dtype) for w in self._winners)
        share = grad / ties
        return [
            unbroadcast(share * w, s) if need else None
            for w, s, need in zip(self._winners, self._shapes, needs)
        ]


class Clip(Op):
    """min(max(x, low), high); bounds from attributes (opset < 11) or the optional inputs."""

    def __init__(self, low: float | None = None, high: float | None = None):
        self.low, self.high = low, high

    def forward(self, x, low=None, high=None):
        low = self.low if low is None else low
        high = self.high if high is None else high
        out, mask = x, None
        if low is not None:
            mask = x >= low
            out = np.maximum(out, np.asarray(low, x.dtype))
        if high is not None:
            below = x <= high
            mask = below if mask is None else mask & below
            out = np.minimum(out, np.asarray(high, x.dtype))
        self._mask = mask
        return out if out is not x else x.copy()

    def backward(self, grad, needs):
        return (grad if self._mask is None else grad * self._mask,)


class Arithmetic(Op):
    """Add, Sub, Mul, Div with NumPy (multidirectional) broadcasting; integer Div truncates."""

    differentiable = (0, 1)

    def __init__(self, kind: str):
        self.kind = kind

    def forward(self, a, b):
        self._a, self._b = a, b
        if self.kind == "Add":
            return np.add(a, b)
        if self.kind == "Sub":
            return np.subtract(a, b)
        if self.kind == "Mul":
            return np.multiply(a, b)
        if a.dtype.kind in "iu" and b.dtype.kind in "iu":  # C's truncation, as ONNX
            q = np.abs(a) // np.abs(b)
            return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))
        self._out = np.divide(a, b)
        return self._out

    def backward(self, grad, needs):
        a, b = self._a, self._b
        ga = gb = None
        if self.kind in ("Add", "Sub"):
            ga = grad if needs[0] else None
            gb = (grad if self.kind == "Add" else -grad) if needs[1] else None
        elif self.kind == "Mul":
            ga = grad * b if needs[0] else None
            gb = grad * a if needs[1] else None
        else:
            over_b = grad / b
            ga = over_b if needs[0] else None
            gb = -over_b * self._out if needs[1] else None
        return (
            None if ga is None else unbroadcast(ga, a.shape),
            None if gb is None else unbroadcast(gb, b.shape),
        )


# -- linear algebra -------------------------------------------------------------------------------


class MatMul(Op):
    """np.matmul's semantics: 1-D operands promoted, batch axes broadcast."""

    differentiable = (0, 1)

    def forward(self, a, b):
        self._a, self._b = a, b
        return np.matmul(a, b)

    def backward(self, grad, needs):
        a, b = self._a, self._b
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        g = grad[..., None, :] if a.ndim == 1 else grad
        g = g[..., None] if b.ndim == 1 else g
        ga = unbroadcast(g @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape) if needs[0] else None
        gb = unbroadcast(a2.swapaxes(-1, -2) @ g, b2.shape).reshape(b.shape) if needs[1] else None
        return ga, gb


class Gemm(Op):
    """alpha * A' B' + beta * C, A' = A or A^T (transA), B' = B or B^T (transB)."""

    differentiable = (0, 1, 2)

    def __init__(
        self, alpha: float = 1.0, beta: float = 1.0, trans_a: bool = False, trans_b: bool = False
    ):
        self.alpha, self.beta, self.trans_a, self.trans_b = alpha, beta, trans_a, trans_b

    def forward(self, a, b, c=None):
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"Gemm: expected 2-D A and B, got shapes {a.shape} and {b.shape}")
        self._a = a.T if self.trans_a else a
        self._b = b.T if self.trans_b else b
        self._c_shape = None if c is None else c.shape
        out = self._a @ self._b
        if self.alpha != 1:
            out *= out.dtype.type(self.alpha)
        if c is not None:
            out += c if self.beta == 1 else c * c.dtype.type(self.beta)
        return out

    def backward(self, grad, needs):
        g = grad if self.alpha == 1 else grad * grad.dtype.type(self.alpha)
        ga = gb = gc = None
        if needs[0]:
            ga = g @ self._b.T
            ga = ga.T if self.trans_a else ga
        if needs[1]:
            gb = self._a.T @ g
            gb = gb.T if self.trans_b else gb
        if len(needs) > 2 and needs[2] and self._c_shape is not None:
            gc = unbroadcast(
                grad if self.beta == 1 else grad * grad.dtype.type(self.beta), self._c_shape
            )
        return ga, gb, gc


class BatchNorm(Op):
    """Inference form: (x - mean) / sqrt(var + epsilon) * scale + bias, per channel (axis 1)."""

    differentiable = (0, 1, 2)

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def forward(self, x, scale, bias, mean, var):
        if x.ndim < 2 or any(p.shape != (x.shape[1],) for p in (scale, bias, mean, var)):
            raise ValueError(
                f"BatchNormalization: expected scale, bias, mean and var of shape "
                f"({x.shape[1] if x.ndim > 1 else 'C'},) for input {x.shape}"
            )
        shape = (1, -1) + (1,) * (x.ndim - 2)
        invstd = 1 / np.sqrt(var + var.dtype.type(self.epsilon))
        self._xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
        self._scale = (scale * invstd).reshape(shape)
        return self._xhat * scale.reshape(shape) + bias.reshape(shape)

    def backward(self, grad, needs):
        axes = (0, *range(2, grad.ndim))
        gx = grad * self._scale if needs[0] else None
        n, c = grad.shape[:2]
        gscale = (
            np.einsum("ncl,ncl->c", grad.reshape(n, c, -1), self._xhat.reshape(n, c, -1))
            if needs[1]
            else None
        )
        gbias = grad.sum(axis=axes) if needs[2] else None
        return gx, gscale, gbias, None, None


def _channel_window_sum(a: np.ndarray, before: int, after: int) -> np.ndarray:
    """out[:, c] = sum of a[:, c - before : c + after + 1] (clipped to the channels)."""
    c = a.shape[1]
    padded = np.zeros((a.shape[0], c + before + after + 1, *a.shape[2:]), a.dtype)
    np.cumsum(a, axis=1, out=padded[:, before + 1 : before + 1 + c])
    padded[:, before + 1 + c :] = padded[:, before + c : before + c + 1]
    return padded[:, before + after + 1 :] - padded[:, :c]


class LRN(Op):
    """Local response normalisation across channels (AlexNet, GoogLeNet):
    y = x / (bias + alpha / size * sum over the window of x^2) ** beta."""

    def __init__(self, size: int, alpha: float, beta: float, bias: float):
        self.size, self.alpha, self.beta, self.bias = size, alpha, beta, bias

    def _window(self) -> tuple[int, int]:
        return (self.size - 1) // 2, self.size // 2  # ONNX: floor below, ceil above

    def forward(self, x):
        if x.ndim < 3:
            raise ValueError(f"LRN: expected (N, C, ...) with spatial axes, got shape {x.shape}")
        t = x.dtype.type
        below, above = self._window()
        self._x = x
        self._s = t(self.bias) + t(self.alpha / self.size) * _channel_window_sum(
            x * x, below, above
        )
        self._y = x * self._s ** t(-self.beta)
        return self._y

    def backward(self, grad, needs):
        t = grad.dtype.type
        below, above = self._window()
        inner = grad * self._y / self._s  # g_i x_i s_i^(-beta-1)
        spread = _channel_window_sum(inner, above, below)  # the windows that contain channel j
        gx = grad * self._s ** t(-self.beta) - t(2 * self.alpha * self.beta / self.size) * (
            self._x * spread
        )
        return (gx,)


class InstanceNorm(Op):
    """Each (sample, channel) normalised over its spatial axes, then scale * x + bias."""

    differentiable = (0, 1, 2)

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def forward(self, x, scale, bias):
        if x.ndim < 3 or scale.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
            raise ValueError(
                f"InstanceNormalization: scale {scale.shape} and bias {bias.shape} do not fit "
                f"input {x.shape}"
            )
        axes = tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        centred = x - x.mean(axis=axes, keepdims=True)
        self._invstd = 1 / np.sqrt(
            (centred * centred).mean(axis=axes, keepdims=True) + x.dtype.type(self.epsilon)
        )
        self._xhat, self._scale, self._axes = centred * self._invstd, scale.reshape(shape), axes
        return self._xhat * self._scale + bias.reshape(shape)

    def backward(self, grad, needs):
        axes, xhat = self._axes, self._xhat
        gx = None
        if needs[0]:
            g = grad * self._scale
            gx = self._invstd * (
                g
                - g.mean(axis=axes, keepdims=True)
                - xhat * (g * xhat).mean(axis=axes, keepdims=True)
            )
        gscale = (grad * xhat).sum(axis=(0, *axes)) if needs[1] else None
        gbias = grad.sum(axis=(0, *axes)) if needs[2] else None
        return gx, gscale, gbias


class OneD(Op):
    """A 1-D Conv or pool (N, C, L) run as the 2-D op on (N, C, 1, L): the x and Conv's weight
    get a height of 1, the output and gradients lose it."""

    def __init__(self, inner: Op):
        self.inner = inner
        self.differentiable = inner.differentiable

    def forward(self, x, *rest):
        if x.ndim != 3:
            raise ValueError(f"expected a 3-D input (N, C, L), got shape {x.shape}")
        rest = tuple(r[:, :, None, :] if i == 0 else r for i, r in enumerate(rest))  # Conv's weight
        return self.inner.forward(x[:, :, None, :], *rest)[:, :, 0, :]

    def backward(self, grad, needs):
        grads = self.inner.backward(grad[:, :, None, :], needs)
        return [g if g is None or g.ndim != 4 else g[:, :, 0, :] for g in grads]


# -- shapes ---------------------------------------------------------------------------------------


class Identity(Op):
    """Also Dropout's inference form, which ignores its ratio and training_mode inputs."""

    def forward(self, x, *_):
        return x

    def backward(self, grad, needs):
        return (grad,)


class _Reshaping(Op):
    """Ops whose gradient is the output gradient reshaped back to the input's shape."""

    def backward(self, grad, needs):
        return (grad.reshape(self._shape),)


class Flatten(_Reshaping):
    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, x):
        self._shape = x.shape
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        if not 0 <= axis <= x.ndim:
            raise ValueError(f"Flatten: axis {self.axis} out of range for input of shape {x.shape}")
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


class Reshape(_Reshaping):
    """Target shape from the second input: 0 copies the input's size (unless allowzero), -1
    infers one."""

    def __init__(self, allowzero: bool = False):
        self.allowzero = allowzero

    def forward(self, x, shape):
        self._shape = x.shape
        target = [int(s) for s in np.asarray(shape).reshape(-1)]
        if not self.allowzero:
            for i, s in enumerate(target):
                if s == 0:
                    if i >= x.ndim:
                        raise ValueError(
                            f"Reshape: 0 at position {i} copies no axis of input {x.shape}"
                        )
                    target[i] = x.shape[i]
        try:
            return x.reshape(target)
        except ValueError:
            raise ValueError(
                f"Reshape: cannot reshape input of shape {x.shape} to {target}"
            ) from None


class Squeeze(_Reshaping):
    """Axes from the attribute (opset < 13), the optional input, or every axis of size 1."""

    def __init__(self, axes: tuple[int, ...] | None = None):
        self.axes = axes

    def forward(self, x, axes=None):
        self._shape = x.shape
        axes = self.axes if axes is None else tuple(int(a) for a in np.asarray(axes).reshape(-1))
        if axes is None:
            return x.reshape([s for s in x.shape if s != 1])
        axes = {a + x.ndim if a < 0 else a for a in axes}
        if any(not 0 <= a < x.ndim or x.shape[a] != 1 for a in axes):
            raise ValueError(
                f"Squeeze: axes {sorted(axes)} are not all of size 1 in shape {x.shape}"
            )
        return x.reshape([s for i, s in enumerate(x.shape) if i not in axes])


class Unsqueeze(_Reshaping):
    """Axes (of the output) from the attribute (opset < 13) or the second input."""

    def __init__(self, axes: tuple[int, ...] | None = None):
        self.axes = axes

    def forward(self, x, axes=None):
        self._shape = x.shape
        axes = self.axes if axes is None else tuple(int(a) for a in np.asarray(axes).reshape(-1))
        try:
            return np.expand_dims(x, axes)
        except (ValueError, np.exceptions.AxisError) as err:
            raise ValueError(
                f"Unsqueeze: axes {axes} for input of shape {x.shape}: {err}"
            ) from None


class Transpose(Op):
    def __init__(self, perm: tuple[int, ...] | None = None):
        self.perm = perm

    def forward(self, x):
        self._perm = tuple(reversed(range(x.ndim))) if self.perm is None else self.perm
        return np.transpose(x, self._perm)

    def backward(self, grad, needs):
        return (np.transpose(grad, np.argsort(self._perm)),)


class Concat(Op):
    differentiable = None

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, *xs):
        self._sizes = [x.shape[self.axis] for x in xs]
        return np.concatenate(xs, axis=self.axis)

    def backward(self, grad, needs):
        parts = np.split(grad, np.cumsum(self._sizes)[:-1], axis=self.axis)
        return [p if need else None for p, need in zip(parts, needs)]


class Shape(Op):
    differentiable = ()

    def __init__(self, start: int = 0, end: int | None = None):
        self.start, self.end = start, end

    def forward(self, x):
        return np.array(x.shape[self.start : self.end], dtype=np.int64)


class Gather(Op):
    """np.take along axis; the gradient scatters back (adding where indices repeat)."""

    def __init__(self, axis: int = 0):
        self.axis = axis

    def forward(self, data, indices):
        axis = self.axis + data.ndim if self.axis < 0 else self.axis
        size = data.shape[axis]
        if indices.size and (indices.min() < -size or indices.max() >= size):
            raise ValueError(
                f"Gather: indices out of range [-{size}, {size - 1}] for axis {self.axis}"
            )
        self._shape, self._indices, self._axis = data.shape, indices, axis
        return np.take(data, indices, axis=axis)

    def backward(self, grad, needs):
        out = np.zeros(self._shape, grad.dtype)
        k = self._indices.ndim
        moved = np.moveaxis(grad, list(range(self._axis, self._axis + k)), list(range(k)))
        np.add.at(np.moveaxis(out, self._axis, 0), self._indices, moved)
        return out, None


class Softmax(Op):
    """Softmax / LogSoftmax over `axis`. legacy (opset < 13): over all axes from `axis` on, as if
    the input were flattened to 2-D there."""

    def __init__(self, axis: int, log: bool = False, legacy: bool = False):
        self.axis, self.log, self.legacy = axis, log, legacy

    def _view(self, x):
        if not self.legacy:
            return x, self.axis
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        return x.reshape(math.prod(x.shape[:axis]), -1), 1

    def forward(self, x):
        x2, axis = self._view(x)
        shifted = x2 - x2.max(axis=axis, keepdims=True)
        if self.log:
            out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        else:
            out = np.exp(shifted)
            out /= out.sum(axis=axis, keepdims=True)
        self._out = out.reshape(x.shape)
        return self._out

    def backward(self, grad, needs):
        g, axis = self._view(grad)
        y, _ = self._view(self._out)
        if self.log:
            gx = g - np.exp(y) * g.sum(axis=axis, keepdims=True)
        else:
            gx = y * (g - (g * y).sum(axis=axis, keepdims=True))
        return (gx.reshape(grad.shape),)


def _pad_indices(size: int, before: int, after: int, mode: str) -> np.ndarray:
    """For each output position along one axis, the input index it reads (-1: the constant).
    Negative pads crop."""
    p = np.arange(-before, size + after)
    if mode == "constant":
        return np.where((p >= 0) & (p < size), p, -1)
    if mode == "edge":
        return np.clip(p, 0, size - 1)
    period = 2 * (size - 1)  # reflect: ... 2 1 | 0 1 2 ... n-1 | n-2 ...
    q = np.mod(p, period)
    return np.where(q < size, q, period - q)


class Pad(Op):
    """constant / reflect / edge padding (pads as ONNX's [x1_begin, x2_begin, ..., x1_end, ...],
    from the attribute before opset 11, else the input); backward adds each output position's
    gradient to the input position it copies."""

    def __init__(self, mode: str = "constant", pads=None, value: float = 0.0):
        self.mode, self.pads, self.value = mode, None if pads is None else tuple(pads), value

    def forward(self, x, pads=None, value=None, axes=None):
        pads = self.pads if pads is None else tuple(int(p) for p in np.asarray(pads).reshape(-1))
        value = self.value if value is None else np.asarray(value).reshape(-1)[0]
        rank = x.ndim
        axes = range(rank) if axes is None else [int(a) % rank for a in np.asarray(axes)]
        axes = list(axes)
        if pads is None or len(pads) != 2 * len(axes):
            raise ValueError(f"Pad: pads {pads} do not fit {len(axes)} axes of input {x.shape}")
        self._shape, self._steps = x.shape, []
        out = x
        for i, axis in enumerate(axes):
            before, after = pads[i], pads[i + len(axes)]
            if before == after == 0:
                continue
            if self.mode == "reflect" and max(before, after) >= x.shape[axis]:  # as torch, ORT
                raise ValueError(f"Pad: reflect pads {pads} reach past input {x.shape}")
            if x.shape[axis] + before + after < 0 or (
                self.mode != "constant" and x.shape[axis] == 0
            ):
                raise ValueError(f"Pad: pads {pads} do not fit input {x.shape}")
            index = _pad_indices(out.shape[axis], before, after, self.mode)
            inside = index >= 0
            out = np.take(out, np.where(inside, index, 0), axis=axis)
            if not inside.all():
                where = [slice(None)] * rank
                where[axis] = ~inside
                out[tuple(where)] = value
            self._steps.append((axis, index, inside))
        return out if self._steps else x.copy()

    def backward(self, grad, needs):
        shape = list(grad.shape)
        for axis, index, inside in reversed(self._steps):
            shape[axis] = self._shape[axis]
            gx = np.zeros(shape, grad.dtype)
            np.add.at(np.moveaxis(gx, axis, 0), index[inside], np.moveaxis(grad, axis, 0)[inside])
            grad = gx
        return (grad,)


class Slice(Op):
    """Python slicing per axis (ONNX clamps starts and ends as Python does); attributes before
    opset 10, else the inputs starts, ends, axes, steps."""

    def __init__(self, starts=None, ends=None, axes=None):
        self.starts, self.ends, self.axes = starts, ends, axes

    def forward(self, x, starts=None, ends=None, axes=None, steps=None):
        def ints(v, default):
            return default if v is None else [int(i) for i in np.asarray(v).reshape(-1)]

        starts, ends = ints(starts, self.starts), ints(ends, self.ends)
        axes = ints(axes, self.axes) or list(range(len(starts)))
        steps = ints(steps, [1] * len(starts))
        if not len(starts) == len(ends) == len(axes) == len(steps) or 0 in steps:
            raise ValueError(
                f"Slice: starts {starts}, ends {ends}, axes {axes}, steps {steps} do not match"
            )
        where = [slice(None)] * x.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if not -x.ndim <= axis < x.ndim:
                raise ValueError(f"Slice: axis {axis} out of range for input {x.shape}")
            where[axis] = slice(start, end, step)
        self._shape, self._where = x.shape, tuple(where)
        return x[self._where].copy()

    def backward(self, grad, needs):
        gx = np.zeros(self._shape, grad.dtype)
        gx[self._where] = grad
        return (gx,)


class Split(Op):
    """Along `axis` into parts of the given sizes (attribute before opset 13, else the input),
    or `outputs` equal parts (the last one smaller when the size does not divide)."""

    def __init__(self, axis: int, outputs: int, split=None):
        self.axis, self.outputs, self.split = axis, outputs, split

    def forward(self, x, split=None):
        size = x.shape[self.axis]
        sizes = self.split if split is None else [int(s) for s in np.asarray(split).reshape(-1)]
        if sizes is None:
            part = -(-size // self.outputs)
            sizes = [min(part, size - i * part) for i in range(self.outputs)]
        if len(sizes) != self.outputs or sum(sizes) != size or min(sizes) < 0:
            raise ValueError(
                f"Split: sizes {list(sizes)} do not split axis {self.axis} of input {x.shape} "
                f"into {self.outputs} parts"
            )
        self._shape, self._sizes = x.shape, sizes
        return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=self.axis))

    def backward(self, grads, needs):
        parts = []
        for g, s in zip(grads, self._sizes):
            if g is None:
                shape = list(self._shape)
                shape[self.axis] = s
                g = np.zeros(shape, next(g for g in grads if g is not None).dtype)
            parts.append(g)
        return (np.concatenate(parts, axis=self.axis),)


class Tile(Op):
    def forward(self, x, repeats):
        self._shape, self._repeats = x.shape, [int(r) for r in np.asarray(repeats).reshape(-1)]
        if len(self._repeats) != x.ndim or min(self._repeats, default=0) < 0:
            raise ValueError(f"Tile: repeats {self._repeats} do not fit input {x.shape}")
        return np.tile(x, self._repeats)

    def backward(self, grad, needs):
        split = [d for r, s in zip(self._repeats, self._shape) for d in (r, s)]
        return (grad.reshape(split).sum(axis=tuple(range(0, len(split), 2))),)


class Expand(Op):
    """np.broadcast_to the shape input, broadcasting both ways (as ONNX)."""

    def forward(self, x, shape):
        self._shape = x.shape
        target = [int(s) for s in np.asarray(shape).reshape(-1)]
        try:
            out_shape = np.broadcast_shapes(x.shape, tuple(target))
        except ValueError:
            raise ValueError(f"Expand: input {x.shape} does not broadcast to {target}") from None
        return np.broadcast_to(x, out_shape).copy()

    def backward(self, grad, needs):
        return (unbroadcast(grad, self._shape),)


class ConstantOfShape(Op):
    differentiable = ()

    def __init__(self, value: np.ndarray):
        self.value = value

    def forward(self, shape):
        return np.full([int(s) for s in np.asarray(shape).reshape(-1)], self.value.reshape(-1)[0])


class Reduce(Op):
    """ReduceSum / ReduceMean / ReduceMax over `axes` (attribute or input by opset; none: all
    axes, or none at all with noop_with_empty_axes). Max splits the gradient between ties."""

    def __init__(self, kind: str, keepdims: bool, axes=None, noop: bool = False):
        self.kind, self.keepdims, self.axes, self.noop = kind, keepdims, axes, noop

    def forward(self, x, axes=None):
        axes = self.axes if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
        if not axes:
            if self.noop:
                self._axes = ()
                return x.copy()
            axes = list(range(x.ndim))
        if any(not -x.ndim <= a < x.ndim for a in axes):
            raise ValueError(f"{self.kind}: axes {list(axes)} out of range for input {x.shape}")
        self._axes, self._x = tuple(sorted(a % x.ndim for a in axes)), x
        fn = {"ReduceSum": np.sum, "ReduceMean": np.mean, "ReduceMax": np.max}[self.kind]
        self._y = fn(x, axis=self._axes, keepdims=True)
        return (
            self._y
            if self.keepdims
            else self._y.reshape([s for i, s in enumerate(x.shape) if i not in self._axes])
        )

    def backward(self, grad, needs):
        if not self._axes:
            return (grad,)
        x = self._x
        g = grad.reshape(self._y.shape)
        if self.kind == "ReduceSum":
            return (np.broadcast_to(g, x.shape).copy(),)
        if self.kind == "ReduceMean":
            count = math.prod(x.shape[a] for a in self._axes)
            return (np.broadcast_to(g / g.dtype.type(count), x.shape).copy(),)
        winners = (x == self._y).astype(grad.dtype)
        return (winners * (g / winners.sum(axis=self._axes, keepdims=True)),)


class DepthToSpace(Op):
    """DepthToSpace (DCR or CRD order) and SpaceToDepth: a reshape, a transpose, a reshape."""

    def __init__(self, blocksize: int, mode: str = "DCR", inverse: bool = False):
        self.blocksize, self.mode, self.inverse = blocksize, mode, inverse

    def forward(self, x):
        _check_4d("SpaceToDepth" if self.inverse else "DepthToSpace", x)
        n, c, h, w = x.shape
        b = self.blocksize
        if self.inverse:
            if h % b or w % b:
                raise ValueError(f"SpaceToDepth: blocksize {b} does not divide {h}x{w}")
            split, perm = (n, c, h // b, b, w // b, b), (0, 3, 5, 1, 2, 4)
            out = (n, c * b * b, h // b, w // b)
        else:
            if c % (b * b):
                raise ValueError(f"DepthToSpace: {c} channels not divisible by blocksize {b}^2")
            if self.mode == "DCR":
                split, perm = (n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2)
            else:
                split, perm = (n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3)
            out = (n, c // (b * b), h * b, w * b)
        self._shape, self._split, self._perm = x.shape, split, perm
        return x.reshape(split).transpose(perm).reshape(out)

    def backward(self, grad, needs):
        moved = tuple(self._split[p] for p in self._perm)
        back = grad.reshape(moved).transpose(np.argsort(self._perm))
        return (back.reshape(self._shape),)


# -- the graph ------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    op_type: str
    op: Op
    inputs: tuple[str, ...]  # "" marks an optional input left out
    output: str
    more_outputs: tuple[str, ...] = ()  # a multi-output op's (Split's) others

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.output, *self.more_outputs)


@dataclass
class ValueInfo:
    """A graph input: its name, dtype and shape (None for a size that may vary, e.g. the batch)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name} ({self.dtype})"
        dims = ", ".join("?" if s is None else str(s) for s in self.shape)
        return f"{self.name} ({dims}) {self.dtype}"


class Graph(Module):
    """Nodes run in topological order; parameters, buffers and constants are named values.

    `named_parameters()` and `state_dict()` use the value names (an ONNX model's initializer
    names; a torch export's are torch's state_dict keys). `needs_input_grad` (default False, as
    Sequential's) makes backward return the gradient w.r.t. the input(s).
    """

    def __init__(
        self,
        nodes: list[Node],
        inputs: list[ValueInfo],
        outputs: list[str],
        *,
        parameters: dict[str, np.ndarray] | None = None,
        buffers: dict[str, np.ndarray] | None = None,
        constants: dict[str, np.ndarray] | None = None,
        needs_input_grad: bool = False,
    ):
        self.nodes, self.inputs, self.outputs = list(nodes), list(inputs), list(outputs)
        self._params = {k: Parameter(v) for k, v in (parameters or {}).items()}
        self._buffers = dict(buffers or {})
        self._constants = dict(constants or {})
        self.needs_input_grad = needs_input_grad
        self.meta: dict = {}  # what the model file says about its inputs and outputs (classes...)
        self.source: Any = None  # set by fastconv.onnx.load: what fastconv.onnx.save writes back
        self._check()

    def _check(self) -> None:
        known = set(self._params) | set(self._buffers) | set(self._constants)
        known |= {i.name for i in self.inputs}
        for node in self.nodes:
            missing = [n for n in node.inputs if n and n not in known]
            if missing:
                raise ValueError(
                    f"node {node.name!r} ({node.op_type}): input(s) {missing} are not "
                    "graph inputs, parameters, buffers, constants or earlier outputs"
                )
            known.update(node.outputs)
        missing = [n for n in self.outputs if n not in known]
        if missing:
            raise ValueError(f"graph output(s) {missing} are computed by no node")

    # -- running -----------------------------------------------------------------------------
    def forward(self, *inputs: np.ndarray):
        if len(inputs) != len(self.inputs):
            raise TypeError(
                f"Graph: expected {len(self.inputs)} input(s) "
                f"({', '.join(i.describe() for i in self.inputs)}), got {len(inputs)}"
            )
        values: dict[str, Any] = dict(self._constants)
        values.update(self._buffers)
        values.update((k, p.data) for k, p in self._params.items())
        for info, x in zip(self.inputs, inputs):
            values[info.name] = self._check_input(info, x)
        for node in self.nodes:
            args = [values[n] if n else None for n in node.inputs]
            while args and args[-1] is None:  # trailing optional inputs left out
                args.pop()
            try:
                result = node.op.forward(*args)
                if node.more_outputs:
                    values.update(zip(node.outputs, map(np.asarray, result)))
                else:
                    values[node.output] = np.asarray(result)
            except (ValueError, TypeError) as err:
                kind = TypeError if isinstance(err, TypeError) else ValueError
                raise kind(f"node {node.name!r} ({node.op_type}): {err}") from err
        results = tuple(values[n] for n in self.outputs)
        return results[0] if len(results) == 1 else results

    def _check_input(self, info: ValueInfo, x) -> np.ndarray:
        x = np.asarray(x)
        if info.dtype.kind == "f" and x.dtype != info.dtype:
            raise TypeError(
                f"Graph: input {info.name!r} has dtype {x.dtype}, the model takes "
                f"{info.dtype}; convert the input or the model (model.to(dtype))"
            )
        if info.shape is not None and (
            x.ndim != len(info.shape)
            or any(s is not None and s != d for s, d in zip(info.shape, x.shape))
        ):
            raise ValueError(f"Graph: input {info.describe()} got shape {x.shape}")
        return x

    def _requiring_grad(self) -> set[str]:
        """The values whose gradient backward must compute."""
        needed = set(self._params)
        if self.needs_input_grad:
            needed.update(i.name for i in self.inputs if i.dtype.kind == "f")
        for node in self.nodes:
            if any(n in needed and node.op.is_differentiable(i) for i, n in enumerate(node.inputs)):
                needed.update(node.outputs)
        return needed

    def backward(self, *grad_outputs: np.ndarray | None):
        """Gradients of the outputs in, parameters' .grad accumulated; returns the input
        gradient(s) when needs_input_grad, else None."""
        if len(grad_outputs) != len(self.outputs):
            raise TypeError(
                f"Graph.backward: expected {len(self.outputs)} gradient(s), got {len(grad_outputs)}"
            )
        needed = self._requiring_grad()
        grads: dict[str, np.ndarray] = {}
        for name, given in zip(self.outputs, grad_outputs):
            if given is not None and name in needed:
                _add(grads, name, np.asarray(given))
        for node in reversed(self.nodes):
            out_grads = [grads.pop(n, None) for n in node.outputs]
            if all(g is None for g in out_grads):
                continue
            grad: Any = out_grads if node.more_outputs else out_grads[0]  # multi-output: the list
            needs = [
                bool(n) and n in needed and node.op.is_differentiable(i)
                for i, n in enumerate(node.inputs)
            ]
            if not any(needs):
                continue
            for name, need, g in zip(node.inputs, needs, node.op.backward(grad, needs)):
                if need and g is not None:
                    _add(grads, name, g)
        for name, param in self._params.items():
            grad = grads.pop(name, None)
            if grad is not None:  # .grad keeps the array: never one shared with anything else
                param.accumulate(grad.copy() if param.grad is None else grad)
        if not self.needs_input_grad:
            return None
        result = tuple(grads.get(i.name) for i in self.inputs)
        return result[0] if len(result) == 1 else result

    # -- parameters, buffers, constants ------------------------------------------------------
    def _own_parameters(self) -> Iterator[tuple[str, Parameter]]:
        return iter(self._params.items())

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        return ((prefix + k, v) for k, v in self._buffers.items())

    def _state_arrays(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for name, param in self._params.items():
            yield prefix + name, param.data
        yield from self.named_buffers(prefix)

    @property
    def constants(self) -> dict[str, np.ndarray]:
        """Values that are neither trained nor saved: reshape targets, axes, clip bounds..."""
        return self._constants

    def to(self, dtype) -> Graph:
        dtype = np.dtype(dtype)
        for param in self._params.values():
            if param.data.dtype.kind == "f":
                param.data, param.grad = param.data.astype(dtype), None
        for table in (self._buffers, self._constants):
            for k, v in table.items():
                if v.dtype.kind == "f":
                    table[k] = v.astype(dtype)
        for info in self.inputs:
            if info.dtype.kind == "f":
                info.dtype = dtype
        return self

    # -- description ---------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return (
            f"inputs=[{', '.join(i.describe() for i in self.inputs)}], "
            f"outputs={self.outputs}, {len(self.nodes)} nodes, {len(self._params)} parameters"
        )

    def __repr__(self) -> str:
        lines = [
            f"{n.name or '?'} ({n.op_type}): {', '.join(i or '-' for i in n.inputs)} "
            f"-> {', '.join(n.outputs)}"
            for n in self.nodes
        ]
        return f"Graph({self.extra_repr()}\n  " + "\n  ".join(lines) + "\n)"


def _add(grads: dict[str, np.ndarray], name: str, grad: np.ndarray) -> None:
    """Sum the gradients of a value read by several nodes (never in place: arrays may be shared)."""
    grads[name] = grad if name not in grads else grads[name] + grad
