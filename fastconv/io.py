"""Model files and training checkpoints: one ``.npz`` each, written atomically, read without pickle.

A **model file** holds everything needed to use a trained network: its weights (the entries of
``model.state_dict()``, under the same keys), its architecture (``fastconv.nn.to_config``) and
metadata (class labels, input shape, normalisation, dataset), the last two as one JSON header
stored in the entry ``__fastconv__``. A **checkpoint** also holds the optimiser and scheduler
states, the random generators' states, the epoch and step reached, the history so far and
whatever the trainer needs to continue bit-for-bit.

Reading never unpickles (``allow_pickle=False``) and checks everything before anything is
built: a truncated, corrupted or mismatched file raises one ``ValueError`` naming the file and
what is wrong, never yields a half-loaded model. Writing goes to a temporary file in the same
folder, which is flushed, fsynced and renamed over the target (then the folder is fsynced), so
a crash, a full disk or a permission error leaves the previous file as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import nn
from ._files import atomic_write
from ._safetensors import load_safetensors, save_safetensors
from ._version import __version__

__all__ = [
    "HEADER_KEY",
    "Checkpoint",
    "ModelFile",
    "SaveError",
    "load_checkpoint",
    "load_model",
    "load_safetensors",
    "save_checkpoint",
    "save_model",
    "save_safetensors",
]

HEADER_KEY = "__fastconv__"
MODEL_FORMAT = "fastconv-model"
CHECKPOINT_FORMAT = "fastconv-checkpoint"
FORMAT_VERSION = 1
_MODEL_PREFIX = "model/"  # checkpoints keep weights under this prefix, beside optimizer/...
# A .npy member holds a header (at most a few hundred bytes for our arrays) before the data.
_NPY_HEADER_SLACK = 4096


class SaveError(OSError):
    """Writing a model file or checkpoint failed; the file previously at the path is intact."""


class ModelFile(NamedTuple):
    """What :func:`load_model` returns: ``model, meta = load_model(path)``."""

    model: Any
    meta: dict


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, as :func:`load_checkpoint` returns it."""

    architecture: dict
    model_state: dict[str, np.ndarray]
    optimizer_state: Any = None
    scheduler_state: Any = None
    rng_states: dict = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    history: dict | None = None
    extra: dict = field(default_factory=dict)

    def build_model(self):
        """A new model with this checkpoint's architecture and weights."""
        return _build(self.architecture, self.model_state, "checkpoint")


# --------------------------------------------------------------------------------------------
# Model files


def save_model(model, path, meta: dict | None = None) -> None:
    """Write ``model`` (weights + architecture) and ``meta`` to ``path`` as one ``.npz``, atomically.

    ``meta`` is any JSON-able dict; the keys fastconv itself reads are ``classes`` (label of each
    output, in order), ``input_shape`` (``[C, H, W]``), ``mean`` and ``std`` (the normalisation
    the model was trained with) and ``dataset``. Raises :class:`SaveError` if the file cannot be
    written (the previous file at ``path`` is then intact), ``ValueError`` if ``meta`` is not
    JSON-able or does not fit the model.
    """
    meta = dict(meta or {})
    _check_meta(meta, model)
    state = _state_arrays(model)
    header = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "fastconv_version": _version(),
        "architecture": nn.to_config(model),
        "meta": meta,
        "tensors": _describe(state),
    }
    _atomic_write(path, {HEADER_KEY: _json_bytes(header, "meta"), **state})


def load_model(path) -> ModelFile:
    """Read a model file written by :func:`save_model`: ``model, meta = load_model(path)``.

    The model comes back in eval mode. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` (message starting with the path) for anything wrong inside: not an ``.npz``,
    truncated or corrupted data, a pickled or object array, a checkpoint instead of a model, an
    unknown architecture, a missing, extra or misshapen tensor, metadata that does not fit.
    """
    with _open_npz(path) as npz:
        header = _read_header(npz, path, MODEL_FORMAT)
        architecture = _field(header, "architecture", dict, path)
        meta = _field(header, "meta", dict, path)
        tensors = _field(header, "tensors", dict, path)
        model = _build_from_file(npz, path, architecture, tensors, prefix="")
    try:
        _check_meta(meta, model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    model.eval()
    return ModelFile(model, meta)


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    path,
    *,
    model,
    optimizer=None,
    scheduler=None,
    rng_states: dict | None = None,
    epoch: int = 0,
    step: int = 0,
    history: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write a training checkpoint to ``path`` atomically (see :class:`Checkpoint` for the parts).

    ``rng_states`` maps names to ``numpy.random.Generator.bit_generator.state`` dicts; ``extra``
    is any JSON-able dict (the trainer's settings and running totals). Optimiser and scheduler
    states may nest dicts, lists, tuples, numbers, strings and NumPy arrays. Raises
    :class:`SaveError` if the file cannot be written; the previous checkpoint is then intact.
    """
    state = _state_arrays(model)
    arrays = {_MODEL_PREFIX + key: value for key, value in state.items()}
    header = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "fastconv_version": _version(),
        "architecture": nn.to_config(model),
        "tensors": _describe(state),
        "optimizer": _pack(optimizer.state_dict(), arrays, "optimizer/") if optimizer else None,
        "scheduler": _pack(scheduler.state_dict(), arrays, "scheduler/") if scheduler else None,
        "rng_states": rng_states or {},
        "epoch": int(epoch),
        "step": int(step),
        "history": history,
        "extra": extra or {},
    }
    _atomic_write(path, {HEADER_KEY: _json_bytes(header, "checkpoint"), **arrays})


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, checking every part first.

    The weights are checked against the architecture (a model is built and filled, so a
    mismatch is found here, not halfway through a resume). Errors as :func:`load_model`.
    """
    with _open_npz(path) as npz:
        header = _read_header(npz, path, CHECKPOINT_FORMAT)
        architecture = _field(header, "architecture", dict, path)
        tensors = _field(header, "tensors", dict, path)
        model = _build_from_file(npz, path, architecture, tensors, prefix=_MODEL_PREFIX)
        model_state = {key: np.array(value) for key, value in model.state_dict().items()}
        optimizer_state = _unpack(header.get("optimizer"), npz, path, "optimizer")
        scheduler_state = _unpack(header.get("scheduler"), npz, path, "scheduler")
    epoch, step = _field(header, "epoch", int, path), _field(header, "step", int, path)
    if epoch < 0 or step < 0:
        raise ValueError(f"{path}: negative epoch ({epoch}) or step ({step})")
    rng_states = _field(header, "rng_states", dict, path)
    history = header.get("history")
    if history is not None and not isinstance(history, dict):
        raise ValueError(f"{path}: 'history' must be an object, got {type(history).__name__}")
    return Checkpoint(
        architecture,
        model_state,
        optimizer_state,
        scheduler_state,
        rng_states,
        epoch,
        step,
        history,
        _field(header, "extra", dict, path),
    )


# --------------------------------------------------------------------------------------------
# Writing


def _atomic_write(path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed .npz, atomically (fastconv._files)."""
    path = Path(path)
    try:
        with atomic_write(path) as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key, value in arrays.items():
                    with zf.open(key + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, value, allow_pickle=False)
    except OSError as err:
        raise _save_error(path, err) from err


def _save_error(path, err: OSError) -> SaveError:
    reason = err.strerror or str(err)
    kept = "the previous file there is intact" if path.exists() else "no file was written"
    error = SaveError(f"cannot write {path}: {reason}; {kept}")
    error.errno = err.errno
    return error


def _json_bytes(header: dict, what: str) -> np.ndarray:
    try:
        text = json.dumps(header, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: not JSON-serialisable: {err}") from None
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _state_arrays(model) -> dict[str, np.ndarray]:
    state = {}
    for key, value in model.state_dict().items():
        if key == HEADER_KEY or key.startswith(("optimizer/", "scheduler/")):
            raise ValueError(f"state_dict key {key!r} is reserved by the file format")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise ValueError(f"state_dict entry {key!r} is an object array; only numbers are saved")
        state[key] = array
    return state


def _describe(state: dict[str, np.ndarray]) -> dict:
    return {
        key: {
            "shape": list(array.shape),
            "dtype": array.dtype.str,
            "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
        }
        for key, array in state.items()
    }


def _pack(obj, arrays: dict, prefix: str):
    """A nested state (dicts, lists, tuples, numbers, arrays) -> JSON, arrays moved to ``arrays``."""
    if isinstance(obj, (np.ndarray, np.generic)):
        key = f"{prefix}{len([k for k in arrays if k.startswith(prefix)])}"
        arrays[key] = np.asarray(obj)
        return {"__array__": key, "scalar": isinstance(obj, np.generic)}
    if isinstance(obj, dict):
        if (
            all(isinstance(k, str) for k in obj)
            and "__array__" not in obj
            and "__items__" not in obj
        ):
            return {k: _pack(v, arrays, prefix) for k, v in obj.items()}
        return {
            "__items__": [
                [_pack(k, arrays, prefix), _pack(v, arrays, prefix)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, arrays, prefix) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, arrays, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"cannot save {prefix.rstrip('/')} state: unsupported {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# Reading


class _open_npz:
    """``np.load(path, allow_pickle=False)`` as a context manager with clear errors."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        path = self.path
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path}: is a folder, not a model or checkpoint file")
        try:
            npz = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            if isinstance(err, PermissionError):
                raise PermissionError(f"{path}: permission denied") from None
            raise ValueError(
                f"{path}: not a fastconv .npz file (truncated, corrupted or another format): {err}"
            ) from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: a single .npy array, not a fastconv .npz file")
        self.npz = npz
        return npz

    def __exit__(self, *exc):
        self.npz.close()
        return False


def _read_member(npz, key: str, path, what: str, max_bytes: int | None = None) -> np.ndarray:
    if key not in npz.files:
        raise ValueError(f"{path}: {what} is missing")
    if max_bytes is not None:
        size = npz.zip.getinfo(key + ".npy").file_size
        if size > max_bytes + _NPY_HEADER_SLACK:
            raise ValueError(f"{path}: {what}: stored size {size} bytes does not fit its shape")
    try:
        return npz[key]
    except ValueError as err:
        if "allow_pickle" in str(err) or "pickle" in str(err).lower():
            raise ValueError(
                f"{path}: {what} is an object array (pickled Python data); fastconv never "
                "unpickles, so the file is refused"
            ) from None
        raise ValueError(f"{path}: {what} is unreadable: {err}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError) as err:
        raise ValueError(f"{path}: {what} is truncated or corrupted: {err}") from None


def _read_header(npz, path, expected_format: str) -> dict:
    if HEADER_KEY not in npz.files:
        raise ValueError(f"{path}: not a fastconv file (no '{HEADER_KEY}' header entry)")
    raw = _read_member(npz, HEADER_KEY, path, "the header", max_bytes=64 << 20)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{path}: the header is not UTF-8 JSON bytes")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    found = header.get("format")
    if found != expected_format:
        hints: dict[tuple[str, object], str] = {
            (MODEL_FORMAT, CHECKPOINT_FORMAT): "a training checkpoint, not a model file "
            "(resume it with `fastconv train --resume`, or use fastconv.io.load_checkpoint)",
            (CHECKPOINT_FORMAT, MODEL_FORMAT): "a model file, not a training checkpoint",
        }
        hint = hints.get(
            (expected_format, found), f"format {found!r}, expected {expected_format!r}"
        )
        raise ValueError(f"{path}: {hint}")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {version!r} is newer than this fastconv reads "
            f"({FORMAT_VERSION}); upgrade fastconv"
        )
    return header


def _field(header: dict, name: str, kind: type, path):
    value = header.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(
            f"{path}: header field '{name}' is missing or not {kind.__name__} "
            f"(got {type(value).__name__})"
        )
    return value


def _build_from_file(npz, path, architecture, tensors, prefix):
    """Build the architecture, then read and check each of its tensors, then fill the model."""
    model = _build(architecture, None, path)
    expected = model.state_dict()
    stored = {
        name[len(prefix) :] for name in npz.files if name.startswith(prefix) and name != HEADER_KEY
    }
    if prefix == "":
        stored = {name for name in stored if "/" not in name}
    missing = [key for key in expected if key not in stored]
    extra = sorted(stored - set(expected))
    if missing:
        raise ValueError(f"{path}: tensor(s) missing for this architecture: {', '.join(missing)}")
    if extra:
        raise ValueError(f"{path}: tensor(s) not in this architecture: {', '.join(extra)}")
    state = {}
    for key, current in expected.items():
        current = np.asarray(current)
        what = f"tensor '{key}'"
        array = _read_member(npz, prefix + key, path, what, max_bytes=current.nbytes)
        if array.shape != current.shape:
            raise ValueError(
                f"{path}: {what} has shape {array.shape}, the architecture needs {current.shape}"
            )
        if array.dtype != current.dtype:
            raise ValueError(
                f"{path}: {what} has dtype {array.dtype}, the architecture needs {current.dtype}"
            )
        described = tensors.get(key)
        if isinstance(described, dict) and "sha256" in described:
            digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
            if digest != described["sha256"]:
                raise ValueError(f"{path}: {what} is corrupted (SHA-256 does not match the header)")
        state[key] = array
    try:
        model.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: weights do not fit the architecture: {err}") from None
    return model


def _build(architecture, state, where):
    try:
        model = nn.from_config(architecture)
    except MemoryError:
        raise ValueError(f"{where}: the architecture is too large to build in memory") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{where}: invalid architecture: {err}") from None
    if state is not None:
        model.load_state_dict(state)
    return model


def _unpack(obj, npz, path, what):
    """Inverse of :func:`_pack`, reading the arrays from ``npz``."""
    if isinstance(obj, list):
        return [_unpack(v, npz, path, what) for v in obj]
    if isinstance(obj, dict):
        if "__array__" in obj:
            key = obj["__array__"]
            if not isinstance(key, str) or not key.startswith(what + "/"):
                raise ValueError(f"{path}: {what} state refers to a bad entry {key!r}")
            array = _read_member(npz, key, path, f"{what} state entry '{key}'")
            return array[()] if obj.get("scalar") else array
        if "__tuple__" in obj:
            return tuple(_unpack(v, npz, path, what) for v in obj["__tuple__"])
        if "__items__" in obj:
            items = obj["__items__"]
            if not isinstance(items, list) or not all(
                isinstance(i, list) and len(i) == 2 for i in items
            ):
                raise ValueError(f"{path}: {what} state is malformed")
            return {_unpack(k, npz, path, what): _unpack(v, npz, path, what) for k, v in items}
        return {k: _unpack(v, npz, path, what) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# Metadata


def _check_meta(meta: dict, model) -> None:
    """The keys fastconv reads must have the right types and agree with the model's shapes."""
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta is not JSON-serialisable: {err}") from None
    classes, shape = meta.get("classes"), meta.get("input_shape")
    if classes is not None and (
        not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
    ):
        raise ValueError("meta['classes'] must be a list of strings")
    for name in ("mean", "std"):
        value = meta.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"meta[{name!r}] must be a number")
    if meta.get("std") is not None and not meta["std"] > 0:
        raise ValueError("meta['std'] must be positive")
    if shape is None:
        return
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 4096 for d in shape)
    ):
        raise ValueError("meta['input_shape'] must be [C, H, W] of positive ints")
    if classes is not None:
        outputs = _output_width(model, shape)
        if outputs != len(classes):
            raise ValueError(
                f"meta names {len(classes)} classes but the model has {outputs} outputs "
                f"for an input of shape {shape}"
            )


def _output_width(model, shape) -> int:
    """Run one zero input through the model in eval mode (state unchanged) to see its outputs."""
    was_training = getattr(model, "training", True)
    params = next(iter(model.state_dict().values()), None)
    dtype = np.asarray(params).dtype if params is not None else np.float32
    dtype = dtype if dtype in (np.float32, np.float64) else np.float32
    model.eval()
    try:
        out = model(np.zeros((1, *shape), dtype=dtype))
    except (ValueError, TypeError) as err:
        raise ValueError(f"the model does not accept an input of shape {shape}: {err}") from None
    finally:
        if was_training:
            model.train()
    if np.ndim(out) != 2:
        raise ValueError(f"the model's output has shape {np.shape(out)}, expected (N, classes)")
    return int(np.shape(out)[1])


def _version() -> str:
    return __version__
