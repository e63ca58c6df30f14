"""Sequential, its rewrites, and the JSON description of a model built of registered layers.

Sequential runs its layers in order, with two rewrites that change no result: a ReLU/LeakyReLU
feeding a MaxPool2d runs after the pool (they commute), and a Conv2d followed by a MaxPool2d
runs as one fused kernel (:meth:`Conv2d.forward_pooled`) where that kernel applies.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .layers import Conv2d, LeakyReLU, MaxPool2d, ReLU
from .module import _LAYER_TYPES, Module


class Sequential(Module):
    """Layers applied in order; indexable, sized and iterable as torch's.

    `needs_input_grad` (default False) is the first layer's flag: a model's backward then skips
    the gradient w.r.t. its input and returns None. Set it True to get that gradient.
    """

    def __init__(self, *layers: Module, needs_input_grad: bool = False):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layer {i} is not a Module: {layer!r}")
        self.layers = list(layers)
        for layer in self.layers[1:]:
            layer.needs_input_grad = True  # every inner gradient is needed
        self._needs_input_grad = False
        self.needs_input_grad = needs_input_grad

    @property
    def needs_input_grad(self) -> bool:
        return self.layers[0].needs_input_grad if self.layers else self._needs_input_grad

    @needs_input_grad.setter
    def needs_input_grad(self, value: bool) -> None:
        self._needs_input_grad = bool(value)
        if self.layers:
            self.layers[0].needs_input_grad = bool(value)

    def append(self, layer: Module) -> Sequential:
        layer.needs_input_grad = True if self.layers else self._needs_input_grad
        self.layers.append(layer)
        return self

    def named_children(self) -> Iterator[tuple[str, Module]]:
        return ((str(i), layer) for i, layer in enumerate(self.layers))

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._order = order = self._execution_order()
        i = 0
        while i < len(order):
            layer, after = order[i], order[i + 1] if i + 1 < len(order) else None
            if type(layer) is Conv2d and type(after) is MaxPool2d:
                pooled = layer.forward_pooled(x, after)  # None where fusing does not apply
                if pooled is not None:
                    x, i = pooled, i + 2
                    continue
            x = layer(x)
            i += 1
        return x

    def backward(self, grad_output: np.ndarray) -> np.ndarray | None:
        grad: np.ndarray | None = grad_output
        for layer in reversed(self._order):
            # None comes only from the first layer (the others all need their input's gradient)
            assert grad is not None
            grad = layer.backward(grad)
        return grad

    def _execution_order(self) -> list[Module]:
        """The layers, with each ReLU/LeakyReLU that feeds a MaxPool2d run after the pool instead.

        A monotonic activation commutes with max pooling, values and gradients alike, and on the
        pooled output it touches a quarter of the elements (forward and backward).
        """
        order = list(self.layers)
        for i in range(1, len(order) - 1):  # never the first: it carries needs_input_grad
            if isinstance(order[i], (ReLU, LeakyReLU)) and type(order[i + 1]) is MaxPool2d:
                order[i], order[i + 1] = order[i + 1], order[i]
        return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            part = self.layers[index]
            return Sequential(*part, needs_input_grad=part[0].needs_input_grad if part else False)
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)


def to_config(module: Module) -> dict[str, Any]:
    """{"type": "Conv2d", "config": {...}}, or {"type": "Sequential", "layers": [...]}."""
    if isinstance(module, Sequential):
        return {"type": "Sequential", "layers": [to_config(layer) for layer in module]}
    name = type(module).__name__
    if _LAYER_TYPES.get(name) is not type(module):
        raise ValueError(
            f"to_config: {name} is not a registered layer type (see fastconv.nn.register)"
        )
    return {"type": name, "config": module.config()}


def from_config(config: dict[str, Any]) -> Module:
    """The inverse of to_config: a freshly initialised module of that architecture."""
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise ValueError(f"from_config: expected a dict with a 'type' string, got {config!r}")
    name = config["type"]
    if name == "Sequential":
        layers = config.get("layers", [])
        if not isinstance(layers, list):
            raise ValueError(f"from_config: Sequential 'layers' must be a list, got {layers!r}")
        return Sequential(*(from_config(layer) for layer in layers))
    cls = _LAYER_TYPES.get(name)
    if cls is None:
        raise ValueError(f"from_config: unknown layer type {name!r}; known: {sorted(_LAYER_TYPES)}")
    kwargs = config.get("config", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"from_config: {name} 'config' must be a dict, got {kwargs!r}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"from_config: bad arguments for {name}: {err}") from None
