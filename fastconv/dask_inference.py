"""Batch inference on a Dask cluster.

:func:`predict_dask` spreads the chunks of an array, a ``dask.array`` or a list of image files
over a Dask cluster. The model travels once per worker as the result of a task whose spec holds
the model file's bytes: if a worker dies, Dask reruns that task elsewhere (a copy scattered
with ``client.scatter`` could die with its worker and not come back). Each worker thread builds
the model once (a cache keyed by the file's SHA-256) and predicts its chunks with the GIL-free
kernels through :mod:`fastconv.inference`, as ``fastconv predict`` does; results come back in
input order.

dask is imported inside the functions that need it (an optional extra:
``pip install "fastconv[dask]"``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import inference, io
from .threads import available_cores, set_num_threads

__all__ = ["FilePredictions", "dask_client", "predict_dask", "predict_files_dask"]


class FilePredictions(NamedTuple):
    """What :func:`predict_files_dask` returns: one row per path (NaN where the image could
    not be read) and, for those, ``errors[index] = message``."""

    probabilities: np.ndarray
    errors: dict[int, str]


def predict_dask(model_or_path, images, client=None, batch_size: int = 256) -> np.ndarray:
    """Class probabilities ``(N, classes)`` of ``images``, computed on a Dask cluster.

    ``model_or_path``: a model file (``fastconv.io.save_model``) or a ``fastconv.nn`` model.
    ``images``: a NumPy array ``(N, C, H, W)`` already normalised as the model expects, a
    ``dask.array`` of that shape, or image files (a list of paths, or a folder) which the
    workers read and frame as ``fastconv predict`` does (:mod:`fastconv.preprocess`, with the
    model file's normalisation). The paths must be readable by the workers; an unreadable
    image raises ``ValueError`` (see :func:`predict_files_dask` to get the others anyway).
    ``client``: a ``distributed.Client``; default: the current one, else a temporary
    ``LocalCluster`` with one single-threaded worker per core. Each task predicts
    ``batch_size`` images, running fastconv single-threaded (a worker's threads are its
    parallelism) unless ``FASTCONV_NUM_THREADS`` is set on the workers. Results come back in
    input order and equal, bit for bit, ``fastconv.inference.predict_proba(model, x, batch_size)``
    in one process at the same thread count, also when a worker dies during the run (its tasks
    run again elsewhere). (BLAS may round the dense layers' sums differently at another thread
    count or batch size: differences near 1e-7.)
    """
    if _are_paths(images):
        result = predict_files_dask(model_or_path, images, client, batch_size)
        if result.errors:
            shown = "; ".join(result.errors[i] for i in sorted(result.errors)[:3])
            more = len(result.errors) - 3
            raise ValueError(
                f"{len(result.errors)} image(s) unreadable: {shown}"
                + (f" (and {more} more)" if more > 0 else "")
            )
        return result.probabilities
    _check_batch_size(batch_size)
    if np.ndim(images) != 4 and getattr(images, "ndim", None) != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {np.shape(images)}")
    model = _ModelBlob.of(model_or_path, list(images.shape[1:]))
    blocks = _array_blocks(images, batch_size)
    with _client_or_local(client) as active, warnings.catch_warnings():
        # The array's chunks travel inside the graph on purpose: the scheduler keeps them, so a
        # task lost with its worker can run again (data scattered to workers could die too).
        warnings.filterwarnings("ignore", "Sending large graph", UserWarning)
        tasks = _tasks(_predict_block, model, blocks, batch_size, "fastconv-predict")
        parts = active.gather(active.compute(tasks))
    if not parts:
        return np.zeros((0, model.classes), dtype=np.float64)
    return np.concatenate(parts)


def predict_files_dask(model_or_path, paths, client=None, batch_size: int = 256) -> FilePredictions:
    """:func:`predict_dask` for image files, keeping going past unreadable ones: their rows are
    NaN and ``errors`` maps their index to a one-line reason naming the file. ``paths``: a list
    of files or a folder (its images, sorted by name). Relative paths are resolved here, so
    workers started elsewhere find the same files (on a shared file system)."""
    _check_batch_size(batch_size)
    files = _image_paths(paths)
    model = _ModelBlob.of(model_or_path)
    inference.ImageInput.of(
        model.meta, use="predicting image files"
    )  # refused here, not on workers
    absolute = [os.path.abspath(f) for f in files]
    chunks = [absolute[i : i + batch_size] for i in range(0, len(files), batch_size)]
    with _client_or_local(client) as active:
        tasks = _tasks(_predict_files, model, chunks, batch_size, "fastconv-files")
        parts = active.gather(active.compute(tasks))
    probabilities = np.full((len(files), model.classes), np.nan)
    errors: dict[int, str] = {}
    for start, (probs, failed) in zip(range(0, len(files), batch_size), parts):
        if probs.shape[1]:
            probabilities[start : start + len(probs)] = probs
        for index, reason in failed.items():
            name = files[start + index]
            errors[start + index] = inference.naming(name, reason)
    return FilePredictions(probabilities, errors)


def _are_paths(images) -> bool:
    if isinstance(images, (str, os.PathLike)):
        return True
    return (
        isinstance(images, (list, tuple))
        and bool(images)
        and all(isinstance(item, (str, os.PathLike)) for item in images)
    )


def _tasks(function, model, chunks, batch_size, prefix) -> list:
    """One delayed call per chunk, all depending on the one model task."""
    from dask.base import tokenize

    delayed = _delayed()
    model_task = delayed(_model_payload, pure=True)(
        model.digest, model.blob, model.meta, dask_key_name=f"fastconv-model-{model.digest[:16]}"
    )
    return [
        delayed(function, pure=True)(
            model_task,
            chunk,
            batch_size,
            dask_key_name=f"{prefix}-{index}-{tokenize(model.digest, chunk, batch_size)}",
        )
        for index, chunk in enumerate(chunks)
    ]


@contextmanager
def dask_client(address: str):
    """A ``distributed.Client`` for ``address``: a scheduler (``tcp://host:8786``) or
    ``local:N``, a ``LocalCluster`` of N single-threaded worker processes closed on exit."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ImportError("Dask is not installed: pip install 'fastconv[dask]'") from None
    if address.startswith("local:"):
        count = address[len("local:") :]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--dask {address}: expected local:N with N >= 1 workers")
        with (
            LocalCluster(
                n_workers=int(count), threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(address, timeout=30)
    except OSError as err:
        raise OSError(f"--dask {address}: cannot reach the scheduler: {err}") from None
    with client:
        yield client


class _ModelBlob:
    """A model file's bytes, its SHA-256, metadata and number of classes."""

    def __init__(self, blob: bytes, meta: dict, classes: int):
        self.blob, self.meta, self.classes = blob, meta, classes
        self.digest = hashlib.sha256(blob).hexdigest()

    @classmethod
    def of(cls, model_or_path, shape: list[int] | None = None) -> _ModelBlob:
        """Read (and check) a model file, or write a model to bytes; ``shape`` (C, H, W) of the
        inputs, default the file's ``input_shape``, is used to count the classes."""
        if isinstance(model_or_path, (str, os.PathLike)):
            model, meta = inference.load_any_model(model_or_path)  # a bad file fails here, clearly
            blob = Path(model_or_path).read_bytes()
        else:
            model, meta = model_or_path, {}
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.npz"
                io.save_model(model, path)
                blob = path.read_bytes()
        shape = list(shape or meta.get("input_shape") or inference.DEFAULT_INPUT_SHAPE)
        dtype = next(iter(model.state_dict().values())).dtype
        classes = inference.predict_proba(model, np.zeros((1, *shape), dtype=dtype)).shape[1]
        return cls(blob, meta, classes)


def _model_payload(digest, blob, meta):
    return digest, blob, meta


_worker_models = threading.local()
models_built = 0  # in this process, by _worker_model: a worker builds each model once per thread


def _worker_model(payload):
    """The model of ``payload``, built once per worker thread (layers keep per-call state, so
    threads don't share one); fastconv runs single-threaded in tasks unless
    ``FASTCONV_NUM_THREADS`` says otherwise: a worker's threads are its parallelism."""
    digest, blob, _ = payload
    cache = getattr(_worker_models, "cache", None)
    if cache is None:
        cache = _worker_models.cache = {}
        if not os.environ.get("FASTCONV_NUM_THREADS"):
            set_num_threads(1)
    model = cache.get(digest)
    if model is None:
        global models_built
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{digest}.model"  # .npz or ONNX: told by content
            path.write_bytes(blob)
            model = inference.load_any_model(path).model
        cache.clear()  # one model at a time per thread
        cache[digest] = model
        models_built += 1
    return model


def _predict_block(payload, block, batch_size):
    return inference.predict_proba(_worker_model(payload), np.asarray(block), batch_size)


def _predict_files(payload, paths, batch_size):
    model = _worker_model(payload)
    inputs, kept, errors = inference.frame_files(paths, inference.ImageInput.of(payload[2]))
    probabilities = np.full((len(paths), 0), np.nan)
    if inputs is not None:
        found = inference.predict_proba(model, inputs, batch_size)
        probabilities = np.full((len(paths), found.shape[1]), np.nan)
        probabilities[kept] = found
    return probabilities, errors


def _array_blocks(images, batch_size) -> list:
    """NumPy slices of ``batch_size`` images, or the blocks of a dask.array rechunked so."""
    if hasattr(images, "to_delayed") and hasattr(images, "rechunk"):
        return list(images.rechunk((batch_size, -1, -1, -1)).to_delayed().reshape(-1))
    array = np.asarray(images)
    return [array[i : i + batch_size] for i in range(0, len(array), batch_size)]


def _image_paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        if not Path(paths).is_dir():
            raise ValueError(f"{paths}: expected a folder of images or a list of paths")
        return [str(p) for p in inference.image_files([paths])]
    return [os.fspath(p) for p in paths]


def _delayed():
    try:
        from dask import delayed
    except ImportError:
        raise ImportError("Dask is not installed: pip install 'fastconv[dask]'") from None
    return delayed


@contextmanager
def _client_or_local(client):
    """``client``, else the current client of this process, else a temporary local cluster."""
    if client is None:
        try:
            from distributed import get_client
        except ImportError:
            raise ImportError("Dask is not installed: pip install 'fastconv[dask]'") from None
        try:
            client = get_client()
        except ValueError:  # no client in this process
            client = None
    if client is not None:
        yield client
        return
    with dask_client(f"local:{available_cores()}") as local:
        yield local


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
