"""Ready-made architectures, built from fastconv.nn layers and seeded.

``digit_cnn()`` is the default model of ``fastconv train``: two 3x3 conv blocks with BatchNorm,
then two dense layers, LeNet-class in cost (about 0.4 M parameters, 4 M multiply-adds per image)
and above 99% on MNIST after 3 epochs. ``create(name, **options)`` builds any architecture of
:data:`ARCHITECTURES` by name, as the command line does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import nn

__all__ = ["ARCHITECTURES", "DEFAULT_ARCHITECTURE", "create", "digit_cnn", "lenet5"]


def _streams(seed: int | None):
    """Two independent generators from one seed: weight initialisation and dropout."""
    init, dropout = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(init), np.random.default_rng(dropout)


def digit_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    *,
    width: int = 32,
    hidden: int = 128,
    dropout: float = 0.25,
    seed: int | None = 0,
):
    """Conv(3x3, width)-BN-ReLU-MaxPool2 -> Conv(3x3, 2*width)-BN-ReLU-MaxPool2 -> Flatten ->
    Linear(hidden)-ReLU-Dropout -> Linear(num_classes), for inputs ``(N, in_channels,
    input_size, input_size)``; ``input_size`` must be divisible by 4. Initialised as torch's
    layers are, from ``seed`` (which also seeds the dropout masks)."""
    if input_size % 4:
        raise ValueError(f"input_size must be divisible by 4, got {input_size}")
    init, drop = _streams(seed)
    features = 2 * width * (input_size // 4) ** 2
    # The convolutions' biases would be cancelled by BatchNorm's mean subtraction: leave them out.
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False, rng=init),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False, rng=init),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(features, hidden, rng=init),
        nn.ReLU(),
        nn.Dropout(dropout, rng=drop),
        nn.Linear(hidden, num_classes, rng=init),
    )


def lenet5(num_classes: int = 10, in_channels: int = 1, *, seed: int | None = 0):
    """LeCun et al.'s LeNet-5 in its common modern form (ReLU, max pooling), for 28x28 inputs:
    Conv(5x5, 6, pad 2)-ReLU-MaxPool2 -> Conv(5x5, 16)-ReLU-MaxPool2 -> 120 -> 84 -> classes."""
    init, _ = _streams(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2, rng=init),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, rng=init),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120, rng=init),
        nn.ReLU(),
        nn.Linear(120, 84, rng=init),
        nn.ReLU(),
        nn.Linear(84, num_classes, rng=init),
    )


ARCHITECTURES: dict[str, Callable] = {"digit-cnn": digit_cnn, "lenet5": lenet5}
DEFAULT_ARCHITECTURE = "digit-cnn"


def create(name: str = DEFAULT_ARCHITECTURE, **options):
    """The architecture registered as ``name`` in :data:`ARCHITECTURES`, built with ``options``."""
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return factory(**options)
