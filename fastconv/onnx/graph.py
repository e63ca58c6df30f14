"""A model that is a graph of operations, not only a chain: what an imported ONNX model becomes.

    graph = Graph(nodes, inputs, outputs, parameters={...}, buffers={...}, constants={...})
    y = graph(x)                  # runs the nodes in order (they are topologically sorted)
    graph.backward(grad_y)        # runs them in reverse; a value read by several nodes
                                  # gets the sum of their gradients

Each node holds an `Op`: `forward(*inputs)` returns the node's output and keeps what
`backward(grad_output, needs)` needs; backward returns one gradient (or None) per input,
computing only those `needs` asks for. Inputs are values by name: the graph's inputs, the
outputs of earlier nodes, parameters (trained: their gradients accumulate in `.grad`), buffers
(saved in the state dict, never trained) and constants. Convolution and pooling go through
fastconv.functional and ReLU/LeakyReLU through fastconv.nn; the rest is a few NumPy lines
each that keep the input's dtype.

The ops compute the inference form of every operation, in train() as in eval():
BatchNormalization normalises with its stored statistics, Dropout passes its input through.
Fine-tuning an imported model therefore trains every parameter, BatchNorm's scale and bias
included, with the statistics frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

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


class Sigmoid(Op):
    def forward(self, x):
        e = np.exp(-np.abs(x))  # never overflows
        self._y = np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        return self._y

    def backward(self, grad, needs):
        return (grad * (self._y * (1 - self._y)),)


class Tanh(Op):
    def forward(self, x):
        self._y = np.tanh(x)
        return self._y

    def backward(self, grad, needs):
        return (grad * (1 - self._y * self._y),)


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


# -- the graph ------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    op_type: str
    op: Op
    inputs: tuple[str, ...]  # "" marks an optional input left out
    output: str


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
        self.source = None  # set by fastconv.onnx.load: what fastconv.onnx.save writes back
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
            known.add(node.output)
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
                values[node.output] = np.asarray(node.op.forward(*args))
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
                needed.add(node.output)
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
        for name, grad in zip(self.outputs, grad_outputs):
            if grad is not None and name in needed:
                _add(grads, name, np.asarray(grad))
        for node in reversed(self.nodes):
            grad = grads.pop(node.output, None)
            if grad is None:
                continue
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
            f"{n.name or '?'} ({n.op_type}): {', '.join(i or '-' for i in n.inputs)} -> {n.output}"
            for n in self.nodes
        ]
        return f"Graph({self.extra_repr()}\n  " + "\n  ".join(lines) + "\n)"


def _add(grads: dict[str, np.ndarray], name: str, grad: np.ndarray) -> None:
    """Sum the gradients of a value read by several nodes (never in place: arrays may be shared)."""
    grads[name] = grad if name not in grads else grads[name] + grad
