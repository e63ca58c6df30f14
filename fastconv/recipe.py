"""The training recipe of ``fastconv train``: its defaults, and the optimiser, schedule and loss
they choose. The :class:`fastconv.train.Trainer` runs whatever it is given; this is what the
command gives it.
"""

from __future__ import annotations

from typing import Any

from . import models, nn, optim

# Training settings that define a run: a resumed run must keep them (a checkpoint stores them).
RUN_DEFAULTS = {
    "dataset": "mnist",
    "arch": "digit-cnn",
    "epochs": 3,
    "batch_size": 64,
    "optimizer": "adamw",
    "lr": None,
    "weight_decay": None,
    "momentum": 0.9,
    "schedule": "cosine",
    "augment": None,
    "label_smoothing": 0.0,
    "seed": 0,
    "limit": None,
    "val_size": 5000,
    "patience": None,
}
DEFAULT_LR = {"sgd": 0.05, "adam": 2e-3, "adamw": 2e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adam": 0.0, "adamw": 1e-2}


def fresh_config(given: dict) -> dict:
    """The settings of a new run: ``given`` (None where not given) completed by the defaults.

    Raises ``ValueError`` for an unknown architecture."""
    config: dict[str, Any] = {name: given.get(name) for name in RUN_DEFAULTS}
    for name, default in RUN_DEFAULTS.items():
        if config[name] is None:
            config[name] = default
    if config["arch"] not in models.ARCHITECTURES:
        raise ValueError(
            f"--arch: unknown architecture {config['arch']!r}; "
            f"choose from {', '.join(sorted(models.ARCHITECTURES))}"
        )
    if config["lr"] is None:
        config["lr"] = DEFAULT_LR[config["optimizer"]]
    if config["weight_decay"] is None:
        config["weight_decay"] = DEFAULT_WEIGHT_DECAY[config["optimizer"]]
    if config["augment"] is None:
        config["augment"] = config["dataset"] == "mnist"
    return config


def make_optimizer(model, config: dict) -> optim.Optimizer:
    params, lr, decay = model.parameters(), config["lr"], config["weight_decay"]
    if config["optimizer"] == "sgd":
        return optim.SGD(
            params,
            lr=lr,
            momentum=config["momentum"],
            nesterov=config["momentum"] > 0,
            weight_decay=decay,
        )
    if config["optimizer"] == "adam":
        return optim.Adam(params, lr=lr, weight_decay=decay)
    return optim.AdamW(params, lr=lr, weight_decay=decay)


def make_scheduler(optimizer, config: dict, steps_per_epoch: int):
    """The learning-rate schedule, stepped after every optimiser step (None: constant)."""
    total = config["epochs"] * steps_per_epoch
    if config["schedule"] == "cosine":
        return optim.CosineAnnealingLR(optimizer, T_max=total)
    if config["schedule"] == "step":
        return optim.StepLR(optimizer, step_size=max(1, total // 3), gamma=0.1)
    return None


def make_loss(config: dict) -> nn.CrossEntropyLoss:
    return nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
