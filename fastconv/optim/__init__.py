"""Optimisers and learning-rate schedules with torch.optim's names and update rules.

    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    scheduler = optim.CosineAnnealingLR(optimizer, T_max=epochs)
    ... optimizer.step() after each backward; scheduler.step() after each epoch

state_dict() of both is a flat {str: np.ndarray} (see fastconv.optim.optimizer), ready for np.savez.
"""

from .lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR
from .optimizer import SGD, Adam, AdamW, Optimizer

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LRScheduler", "StepLR", "CosineAnnealingLR"]
