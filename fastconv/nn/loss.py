"""Cross-entropy: log-softmax and negative log-likelihood fused, as torch.nn.CrossEntropyLoss."""

from __future__ import annotations

from typing import Any

import numpy as np

from .module import Module, register


@register
class CrossEntropyLoss(Module):
    """Mean over the batch of -log softmax(logits)[target], with optional label smoothing.

    `loss = criterion(logits, target)` takes logits (N, C) and integer class indices (N,) and
    returns a Python float; `criterion.backward()` then returns d loss / d logits (N, C).
    """

    def __init__(self, label_smoothing: float = 0.0):
        if not 0 <= label_smoothing <= 1:
            raise ValueError(
                f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}"
            )
        self.label_smoothing = float(label_smoothing)
        self._probs: np.ndarray | None = None

    def forward(self, logits: np.ndarray, target: np.ndarray) -> float:
        target = np.asarray(target)
        if logits.ndim != 2 or target.shape != logits.shape[:1]:
            raise ValueError(
                f"CrossEntropyLoss: expected logits (N, C) and target (N,), "
                f"got {logits.shape} and {target.shape}"
            )
        n, classes = logits.shape
        if target.dtype.kind not in "iu" or (n and (target.min() < 0 or target.max() >= classes)):
            raise ValueError(f"CrossEntropyLoss: target must hold class indices in [0, {classes})")
        if n == 0:
            raise ValueError("CrossEntropyLoss: empty batch")
        shifted = logits - logits.max(axis=1, keepdims=True)  # exp never overflows
        exp = np.exp(shifted)
        sum_exp = exp.sum(axis=1, keepdims=True)
        log_probs_target = shifted[np.arange(n), target] - np.log(sum_exp[:, 0])
        loss = -log_probs_target.mean()
        if self.label_smoothing:
            # the uniform part: mean over classes of -log p = log(sum exp) - mean(shifted)
            uniform = np.log(sum_exp[:, 0]) - shifted.mean(axis=1)
            loss = (1 - self.label_smoothing) * loss + self.label_smoothing * uniform.mean()
        exp /= sum_exp
        self._probs, self._target = exp, target
        return float(loss)

    def backward(self, grad_output: float | np.ndarray = 1.0) -> np.ndarray:
        """d loss / d logits = (softmax - smoothed one-hot) / N, times grad_output (a float or a
        0-d array)."""
        if self._probs is None:
            raise RuntimeError(
                "CrossEntropyLoss.backward: call the loss first (one backward per forward)"
            )
        grad, self._probs = self._probs, None  # reuse the softmax array: backward runs once
        n, classes = grad.shape
        if self.label_smoothing:
            grad -= self.label_smoothing / classes
        grad[np.arange(n), self._target] -= 1 - self.label_smoothing
        grad *= grad_output / n
        return grad

    def config(self) -> dict[str, Any]:
        return {"label_smoothing": self.label_smoothing}

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
