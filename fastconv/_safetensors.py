"""Weights as safetensors files, through the `safetensors` package's NumPy API (no torch).

    model.load_state_dict(fastconv.io.load_safetensors("torch_weights.safetensors"))
    fastconv.io.save_safetensors(model.state_dict(), "weights.safetensors")

The keys are the state_dict's: a fastconv.nn model and the torch.nn model of the same
architecture (e.g. two nn.Sequential with the same layers) share them, so each loads the
other's file unchanged. Requires `safetensors` (`pip install "fastconv[onnx]"`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ._files import atomic_write

__all__ = ["load_safetensors", "save_safetensors"]


def _numpy_api():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            'safetensors files need the safetensors package: pip install "fastconv[onnx]"'
        ) from None
    return safetensors.numpy


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of the file, by name, as writable NumPy arrays (in the file's order).

    Raises FileNotFoundError for a missing file and ValueError (starting with the path) for a
    file that is not safetensors, truncated or corrupted, or holds a dtype NumPy lacks (bfloat16,
    float8: convert those to float32 before saving).
    """
    api = _numpy_api()
    data = Path(os.fspath(path)).read_bytes()
    unknown = _dtypes_numpy_lacks(data)
    if unknown:
        raise ValueError(
            f"{path}: tensor(s) {', '.join(f'{k} ({v})' for k, v in unknown.items())} "
            "have a dtype NumPy lacks; save them as float32"
        )
    try:
        tensors = api.load(data)
    except Exception as err:  # safetensors' SafetensorError and whatever a corrupted file causes
        raise ValueError(
            f"{path}: not a safetensors file, or a truncated or corrupted one ({err})"
        ) from None
    return {name: np.array(array) for name, array in tensors.items()}


_NUMPY_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"}


def _dtypes_numpy_lacks(data: bytes) -> dict[str, str]:
    """{name: dtype} from the header (8-byte little-endian length, then JSON); {} when the
    header cannot be read (safetensors then says what is wrong)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size]) if 8 + size <= len(data) else {}
        return {
            k: v["dtype"]
            for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and v.get("dtype") not in _NUMPY_DTYPES
        }
    except (ValueError, TypeError, AttributeError, KeyError):
        return {}


def save_safetensors(state_dict, path, metadata: Mapping[str, str] | None = None) -> None:
    """Write `state_dict` ({name: array}, e.g. `model.state_dict()`; a Module is accepted too)
    to `path` as safetensors, atomically: a failure leaves any previous file intact.

    `metadata` is an optional {str: str} stored in the header, as safetensors allows.
    """
    api = _numpy_api()
    if hasattr(state_dict, "state_dict"):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"save_safetensors: expected a dict of arrays, got {type(state_dict).__name__}"
        )
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"save_safetensors: keys must be strings, got {name!r}")
        array = np.asarray(value)
        array = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d arrays 0-d
        if array.dtype.kind not in "fiub":
            raise ValueError(
                f"save_safetensors: {name!r} has dtype {array.dtype}, not a number type"
            )
        tensors[name] = array
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("save_safetensors: metadata must map strings to strings")
    data = api.save(tensors, metadata=dict(metadata) if metadata is not None else None)
    with atomic_write(path) as f:
        f.write(data)
