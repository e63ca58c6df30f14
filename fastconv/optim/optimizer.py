"""SGD, Adam and AdamW with torch.optim's update rules, updating Parameter.data in place.

State dicts are flat, {str: np.ndarray}, so that np.savez writes them without pickle:

    "param_groups.<g>.params"  int64 positions of group g's parameters in the optimizer's order
    "param_groups.<g>.<name>"  each hyperparameter: a 0-d array, or 1-d for a tuple (betas)
    "state.<i>.<name>"         parameter i's state: arrays of its shape, 0-d "step"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

if TYPE_CHECKING:
    from ..nn import Parameter


class Optimizer:
    """Holds param_groups (torch's: dicts of "params" and hyperparameters) and per-parameter state.

    Subclasses implement `_update(param, grad, state, group)` for one parameter.
    """

    def __init__(self, params: Iterable[Parameter] | Iterable[dict], defaults: dict[str, Any]):
        items: list[Any] = list(params)  # Parameters, or group dicts: the first one tells
        if not items:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        groups: list[dict] = items if isinstance(items[0], dict) else [{"params": items}]
        self.defaults = defaults
        self.param_groups = [
            {**defaults, **group, "params": list(group["params"])} for group in groups
        ]
        self.state: dict[Parameter, dict[str, Any]] = {}

    @property
    def lr(self) -> float:
        """The first group's learning rate; setting it sets every group's."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = value

    def _params(self) -> list[Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.fill(0)

    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self.state.setdefault(p, {}), group)

    def _update(self, p: Parameter, grad: np.ndarray, state: dict, group: dict) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        flat, index = {}, 0
        for g, group in enumerate(self.param_groups):
            count = len(group["params"])
            flat[f"param_groups.{g}.params"] = np.arange(index, index + count, dtype=np.int64)
            index += count
            for name, value in group.items():
                if name != "params":
                    flat[f"param_groups.{g}.{name}"] = np.array(value)
        for i, p in enumerate(self._params()):
            for name, value in self.state.get(p, {}).items():
                flat[f"state.{i}.{name}"] = np.array(value)  # a copy
        return flat

    def load_state_dict(self, flat: dict[str, Any]) -> None:
        """Restore a state_dict() (e.g. read back from .npz); all checked before anything changes.

        Hyperparameters come back as Python numbers (tuples for 1-d arrays), state arrays as
        copies in each parameter's dtype.
        """
        params = self._params()
        groups: list[dict[str, Any]] = [{} for _ in self.param_groups]
        states: dict[Parameter, dict[str, Any]] = {}
        for key, value in flat.items():
            kind, index, name = _split_key(key, len(groups), len(params))
            value = np.asarray(value)
            if kind == "param_groups":
                groups[index][name] = value.item() if value.ndim == 0 else tuple(value.tolist())
                continue
            param = params[index]
            if value.ndim and value.shape != param.shape:
                raise ValueError(
                    f"load_state_dict: {key}: shape {value.shape} in the state "
                    f"dict, {param.shape} for the parameter"
                )
            value = value.item() if value.ndim == 0 else value.astype(param.dtype)  # a copy
            states.setdefault(param, {})[name] = value
        for g, (group, saved) in enumerate(zip(self.param_groups, groups)):
            count = len(saved.pop("params", ()))
            if count != len(group["params"]):
                raise ValueError(
                    f"load_state_dict: group {g} has {len(group['params'])} "
                    f"parameters, the state dict {count}"
                )
        for group, saved in zip(self.param_groups, groups):
            group.update(saved)
        self.state = states

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for g, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {g}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join(lines + [")"])


def _split_key(key: str, groups: int, params: int) -> tuple[str, int, str]:
    """ "state.3.exp_avg" -> ("state", 3, "exp_avg"), checking the index exists."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] not in ("param_groups", "state") or not parts[1].isdigit():
        raise ValueError(f"load_state_dict: unexpected key {key!r}")
    limit = groups if parts[0] == "param_groups" else params
    if int(parts[1]) >= limit:
        raise ValueError(
            f"load_state_dict: {key}: the optimizer has {groups} groups of {params} parameters"
        )
    return parts[0], int(parts[1]), parts[2]


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"SGD: lr={lr}, momentum={momentum} and weight_decay={weight_decay} must be >= 0"
            )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum requires a momentum and zero dampening")
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                weight_decay=weight_decay,
            ),
        )

    def _update(self, p, grad, state, group):
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * p.data
        momentum = group["momentum"]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:  # the first step starts the buffer at the gradient, undamped
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= momentum
                buf += (1 - group["dampening"]) * grad
            grad = grad + momentum * buf if group["nesterov"] else buf
        p.data -= group["lr"] * grad


class Adam(Optimizer):
    """Adam with bias correction; weight_decay adds an L2 term to the gradient (as torch's Adam)."""

    _decoupled = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"{type(self).__name__}: invalid lr={lr}, betas={betas}, eps={eps} "
                f"or weight_decay={weight_decay}"
            )
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _update(self, p, grad, state, group):
        lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data))
        state["step"] += 1
        if weight_decay and self._decoupled:
            p.data *= 1 - lr * weight_decay
        elif weight_decay:
            grad = grad + weight_decay * p.data
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg += (1 - beta1) * (grad - exp_avg)  # torch's lerp
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        step_size = lr / (1 - beta1 ** state["step"])
        denom = np.sqrt(exp_avg_sq) / (1 - beta2 ** state["step"]) ** 0.5
        denom += group["eps"]
        p.data -= step_size * (exp_avg / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 - lr * weight_decay before the Adam step."""

    _decoupled = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, lr, betas, eps, weight_decay)
