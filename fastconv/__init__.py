"""fastconv: a small-CNN engine for the CPU with torch.nn.functional's semantics.

`import fastconv as fc` gives the functional operations; `fastconv.nn`, `fastconv.optim`,
`fastconv.reference` and the other submodules load on first use, so importing stays light.
"""

import importlib

from . import _runtime

_runtime.configure()  # before the kernels load: see fastconv/_runtime.py

try:
    from . import _conv  # noqa: F401  (the compiled kernels)
except ImportError:
    # Run from a checkout that was never built in place, Python finds this source tree first
    # and no compiled kernels in it (as NumPy does, say so in one sentence).
    raise ImportError(
        f"fastconv's compiled kernels are missing from {__path__[0]}: this is a source tree "
        "that was not built in place; run Python from outside it to use the installed fastconv, "
        "or build it here with `pip install -e .` (the contributor setup)"
    ) from None

from .functional import (
    avg_pool2d,
    avg_pool2d_backward,
    batch_norm,
    batch_norm_backward,
    conv2d,
    conv2d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    fold,
    get_conv_algorithm,
    linear,
    max_pool2d,
    max_pool2d_backward,
    relu,
    relu_backward,
    set_conv_algorithm,
    set_workspace_limit,
    unfold,
    workspace_limit,
)
from .threads import _from_environment, get_num_threads, set_num_threads

_from_environment()

from ._version import __version__ as __version__

__all__ = [
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "unfold",
    "fold",
    "batch_norm",
    "batch_norm_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "linear",
    "relu",
    "relu_backward",
    "set_num_threads",
    "get_num_threads",
    "set_workspace_limit",
    "workspace_limit",
    "set_conv_algorithm",
    "get_conv_algorithm",
]

_SUBMODULES = {
    "reference",
    "functional",
    "nn",
    "optim",
    "train",
    "datasets",
    "preprocess",
    "io",
    "onnx",
    "plots",
    "serve",
    "distributed",
    "cli",
    "threads",
    "models",
    "bench",
    "inference",
    "recipe",
    "data_parallel",
    "dask_inference",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastconv' has no attribute {name!r}")
