"""Layers, loss and model description with torch.nn's names, and an explicit backward pass.

    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 14 * 14, 10))
    criterion = nn.CrossEntropyLoss()
    loss = criterion(model(x), y)           # a float
    model.zero_grad()
    model.backward(criterion.backward())    # accumulates every parameter's .grad
    optimizer.step()

A Sequential skips its input's gradient by default (needs_input_grad=False; backward returns
None): a model's input needs none. `to_config`/`from_config` describe a model as JSON.
"""

from .layers import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
)
from .loss import CrossEntropyLoss
from .module import IncompatibleKeys, Module, Parameter, is_grad_enabled, no_grad, register
from .sequential import Sequential, from_config, to_config

__all__ = [
    "Module",
    "Parameter",
    "Sequential",
    "IncompatibleKeys",
    "Conv2d",
    "ConvTranspose2d",
    "MaxPool2d",
    "AvgPool2d",
    "ReLU",
    "LeakyReLU",
    "Flatten",
    "Linear",
    "Dropout",
    "BatchNorm1d",
    "BatchNorm2d",
    "CrossEntropyLoss",
    "to_config",
    "from_config",
    "register",
    "no_grad",
    "is_grad_enabled",
]
