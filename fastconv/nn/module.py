"""Parameter, Module, Sequential, and the JSON description of a model (to_config/from_config).

There is no autograd: every module's `forward` keeps what its `backward` needs, and `backward`
returns the gradient w.r.t. the module's input while adding the gradients of its parameters
to their `.grad`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

import numpy as np

_state = threading.local()  # per thread: a server may predict while another thread trains


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextmanager
def no_grad():
    """Forward passes inside keep nothing for a backward pass (as torch.no_grad): layers may then
    take faster paths, e.g. max pooling without indices."""
    previous = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


class Parameter:
    """A trainable array: `.data` holds the values, `.grad` the accumulated gradient (or None)."""

    __slots__ = ("data", "grad")

    def __init__(self, data: np.ndarray):
        self.data = np.asarray(data)
        self.grad: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def accumulate(self, grad: np.ndarray) -> None:
        """grad += new gradient. The first one after zero_grad is stored, not copied: layers
        pass arrays they own and never touch again."""
        if grad.dtype != self.data.dtype:
            grad = grad.astype(self.data.dtype)
        if self.grad is None:
            self.grad = grad
        else:
            self.grad += grad

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class. Subclasses assign Parameters and sub-Modules as attributes; buffers (arrays saved
    in the state dict but not trained) are listed by name in `_buffer_names`.

    `needs_input_grad = False` lets `backward` skip the gradient w.r.t. the input (and return None):
    the first layer of a model never needs it.
    """

    training: bool = True
    needs_input_grad: bool = True
    _buffer_names: tuple[str, ...] = ()

    def __call__(self, *args):
        return self.forward(*args)

    # Any arguments, as torch.nn.Module's: a layer maps an array to an array, but a loss takes
    # (logits, target) and returns a float. Subclasses declare their own signatures.
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    # -- structure ---------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self) -> Iterator[Module]:
        return (child for _, child in self.named_children())

    def modules(self) -> Iterator[Module]:
        """This module and all its descendants, depth first."""
        yield self
        for child in self.children():
            yield from child.modules()

    def _own_parameters(self) -> Iterator[tuple[str, Parameter]]:
        return ((k, v) for k, v in vars(self).items() if isinstance(v, Parameter))

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, param in self._own_parameters():
            yield prefix + name, param
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self) -> list[Parameter]:
        return [param for _, param in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for name in self._buffer_names:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}{name}.")

    # -- modes and gradients -----------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            module.training = bool(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the accumulated gradients (None, as torch's default, or zero-filled arrays)."""
        for param in self.parameters():
            if set_to_none or param.grad is None:
                param.grad = None
            else:
                param.grad.fill(0)

    def to(self, dtype) -> Module:
        """Convert the parameters and floating-point buffers to dtype (in place; returns self)."""
        dtype = np.dtype(dtype)
        for module in self.modules():
            for _, param in module._own_parameters():
                param.data, param.grad = param.data.astype(dtype), None
            for name in module._buffer_names:
                if getattr(module, name).dtype.kind == "f":
                    setattr(module, name, getattr(module, name).astype(dtype))
        return self

    # -- state dict ----------------------------------------------------------------------------
    def _state_arrays(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        """torch's order: own parameters, own buffers, then each child's."""
        for name, param in self._own_parameters():
            yield prefix + name, param.data
        for name in self._buffer_names:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child._state_arrays(f"{prefix}{name}.")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters and buffers, under torch.nn's keys ("0.weight", ...)."""
        return {key: array.copy() for key, array in self._state_arrays()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy arrays (cast to each parameter's dtype) into the model, in place.

        Everything is checked before anything is written: a missing or unexpected key (when
        strict), a shape or a dtype kind that differs raises ValueError and leaves the model as
        it was. Accepts anything np.asarray converts (e.g. a torch state_dict's tensors).
        """
        targets = dict(self._state_arrays())
        missing = [key for key in targets if key not in state]
        unexpected = [key for key in state if key not in targets]
        problems = []
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
        values = {}
        for key, target in targets.items():
            if key not in state:
                continue
            value = np.asarray(state[key])
            if value.shape != target.shape:
                problems.append(
                    f"{key}: shape {value.shape} in the state dict, {target.shape} in the model"
                )
            elif value.dtype.kind not in ("f" if target.dtype.kind == "f" else "iu"):
                problems.append(
                    f"{key}: dtype {value.dtype} in the state dict, {target.dtype} in the model"
                )
            values[key] = value
        if problems:
            raise ValueError("load_state_dict: " + "; ".join(problems))
        for key, value in values.items():
            np.copyto(targets[key], value, casting="same_kind")
        return IncompatibleKeys(missing, unexpected)

    # -- description ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments, JSON-able: Cls(**m.config()) rebuilds m's shape."""
        return {}

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [
            f"({name}): " + repr(child).replace("\n", "\n  ")
            for name, child in self.named_children()
        ]
        if not lines:
            return f"{type(self).__name__}({self.extra_repr()})"
        extra = [self.extra_repr()] if self.extra_repr() else []
        return f"{type(self).__name__}(\n  " + "\n  ".join(extra + lines) + "\n)"


# -- JSON description ----------------------------------------------------------------------------
_LAYER_TYPES: dict[str, type[Module]] = {}


def register(cls: type[Module]) -> type[Module]:
    """Class decorator: make a Module subclass known to from_config by its class name."""
    _LAYER_TYPES[cls.__name__] = cls
    return cls
