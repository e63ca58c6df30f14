"""Learning-rate schedules, stepped once per epoch, with torch.optim.lr_scheduler's recurrences
(so the sequence of learning rates is torch's to the last bit)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .optimizer import Optimizer


class LRScheduler:
    """Base: remembers each group's initial lr ("initial_lr", as torch) and the epoch count."""

    _hyperparameters: tuple[str, ...] = ()

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._last_lr = [group["lr"] for group in optimizer.param_groups]

    def _next_lr(self, lr: float, base_lr: float) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.last_epoch += 1
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self._next_lr(group["lr"], base_lr)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat and pickle-free, as the optimizers': every value a NumPy array."""
        state = {
            "last_epoch": np.array(self.last_epoch),
            "base_lrs": np.array(self.base_lrs, dtype=np.float64),
            "last_lr": np.array(self._last_lr, dtype=np.float64),
        }
        return state | {name: np.array(getattr(self, name)) for name in self._hyperparameters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"last_epoch", "base_lrs", "last_lr", *self._hyperparameters}
        if set(state) != expected:
            raise ValueError(
                f"load_state_dict: expected keys {sorted(expected)}, got {sorted(state)}"
            )
        groups = len(self.optimizer.param_groups)
        if any(np.asarray(state[k]).shape != (groups,) for k in ("base_lrs", "last_lr")):
            raise ValueError(f"load_state_dict: base_lrs and last_lr must hold {groups} values")
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = np.asarray(state["base_lrs"]).tolist()
        self._last_lr = np.asarray(state["last_lr"]).tolist()
        for name in self._hyperparameters:
            setattr(self, name, np.asarray(state[name]).item())


class StepLR(LRScheduler):
    """lr = initial_lr * gamma ** (epoch // step_size)."""

    _hyperparameters = ("step_size", "gamma")

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        self.step_size, self.gamma = int(step_size), gamma
        super().__init__(optimizer)

    def _next_lr(self, lr, base_lr):
        return lr * self.gamma if self.last_epoch % self.step_size == 0 else lr


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2, continued
    periodically past T_max as torch's."""

    _hyperparameters = ("T_max", "eta_min")

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):  # noqa: N803
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max}")
        self.T_max, self.eta_min = int(T_max), eta_min
        super().__init__(optimizer)

    def _next_lr(self, lr, base_lr):
        epoch, t_max, eta_min = self.last_epoch, self.T_max, self.eta_min
        if (epoch - 1 - t_max) % (2 * t_max) == 0:
            return lr + (base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        now, before = math.cos(math.pi * epoch / t_max), math.cos(math.pi * (epoch - 1) / t_max)
        return (1 + now) / (1 + before) * (lr - eta_min) + eta_min
