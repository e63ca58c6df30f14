"""Past one machine: data-parallel training over MPI (mpi4py), batch inference on Dask.

**Training.** Synchronous data parallelism, as PyTorch's DistributedDataParallel does it: every
rank holds the whole model; each global mini-batch (the same seeded permutation on every rank)
is cut into one contiguous shard per rank; after backward, :func:`average_gradients` averages
the gradients of all parameters in one in-place ``Allreduce`` of a flat buffer, each rank's
gradient weighted by its share of the batch; then every rank takes the same optimiser step, so
the replicas stay bit-identical. :class:`DataParallel` is what :class:`fastconv.train.Trainer`
calls for that (``Trainer(..., parallel=DataParallel())``); it also averages BatchNorm running
statistics (batch statistics stay per rank, as DDP's default) before validation and before any
checkpoint, compares a checksum of the weights at each epoch end, shards validation, and makes
an exception in one rank abort the whole job instead of leaving the others waiting forever.

Started without an MPI launcher (no ``mpiexec``), :func:`get_comm` returns None and nothing here
needs mpi4py: one process is a plain run.

**Inference.** :func:`predict_dask` spreads the chunks of an array, a ``dask.array`` or a list
of image files over a Dask cluster. The model travels once per worker as the result of a task
whose spec holds the model file's bytes: if a worker dies, Dask reruns that task elsewhere
(a copy scattered with ``client.scatter`` could die with its worker and not come back). Each
worker thread builds the model once (a cache keyed by the file's SHA-256) and predicts its
chunks with the GIL-free kernels; results come back in input order.

mpi4py and dask are imported inside the functions that need them: ``pip install
"fastconv[mpi]"`` or ``"fastconv[dask]"``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "get_comm", "rank_and_size", "default_threads", "shard", "average_gradients",
    "average_buffers", "weights_checksum", "check_replicas", "ReplicasDiverged",
    "abort_on_error", "DataParallel", "predict_dask", "predict_files_dask", "FilePredictions",
    "dask_client",
]

# Variables that MPI launchers set in every process they start (Open MPI, MPICH/Hydra, PMIx,
# MVAPICH): without one of them this process was not started by a launcher.
_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK",
                       "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_DROPOUT = 2  # SeedSequence word of the per-step dropout streams (train.py uses 0 and 1)


# --------------------------------------------------------------------------------------------
# Ranks


def get_comm():
    """``MPI.COMM_WORLD`` when this process was started by an MPI launcher, else None.

    None means a single plain process: mpi4py is then not even imported. Raises ImportError
    when a launcher started this process but mpi4py is missing.
    """
    if not any(os.environ.get(name) for name in _LAUNCHER_VARIABLES):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError(
            "started by an MPI launcher, but mpi4py is not installed: pip install 'fastconv[mpi]'"
        ) from None
    return MPI.COMM_WORLD


def rank_and_size(comm=None) -> tuple[int, int]:
    """``(rank, size)`` of this process in ``comm`` (default :func:`get_comm`); ``(0, 1)`` alone."""
    comm = get_comm() if comm is None else comm
    return (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())


def default_threads(comm=None) -> int:
    """Threads for one rank: the cores this process may use, divided among the ranks on this
    node (counted with ``Split_type(COMM_TYPE_SHARED)``). A launcher that bound the rank to a
    subset of the cores has already divided them: then that subset is used."""
    from .threads import available_cores

    cores = available_cores()
    comm = get_comm() if comm is None else comm
    if comm is None or comm.Get_size() == 1:
        return cores
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        local = node.Get_size()
    finally:
        node.Free()
    if cores < (os.cpu_count() or cores):
        return cores
    return max(1, cores // local)


def shard(count: int, rank: int, size: int) -> slice:
    """The part of ``count`` items that ``rank`` of ``size`` takes: contiguous, disjoint, together
    covering all of them; sizes differ by at most one (the first ranks get the larger parts)."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


# --------------------------------------------------------------------------------------------
# Collective operations on a model


def average_gradients(model, comm=None, weight: float | None = None) -> None:
    """Average the gradients of ``model``'s parameters over the ranks of ``comm``, in place.

    ``weight`` is this rank's share of the global batch (its samples / all samples; the shares
    must sum to 1 over the ranks): each gradient is a mean over the rank's own samples, so the
    weighted sum is the gradient of the mean over the whole batch, also when the batch does not
    split evenly. Default: ``1 / size``. One ``Allreduce`` of a flat buffer per parameter dtype
    (one for an ordinary float32 model). Parameters without a gradient are left out; they must
    be the same on every rank (as they are for the same model and code). Without MPI (``comm``
    None and no launcher) or with one rank, a no-op.
    """
    comm = get_comm() if comm is None else comm
    if comm is None or comm.Get_size() == 1:
        return
    _allreduce_gradients(model.parameters(), comm, weight)


def _allreduce_gradients(params, comm, weight, extra=()) -> np.ndarray:
    """Weighted sum of the gradients in place; ``extra`` numbers ride along in the first buffer
    (summed unweighted, returned as float64), so per-step counts cost no second message."""
    from mpi4py import MPI

    if weight is None:
        weight = 1.0 / comm.Get_size()
    groups: dict[np.dtype, list] = {}
    for param in params:
        if param.grad is not None:
            groups.setdefault(param.grad.dtype, []).append(param)
    if not groups:
        groups[np.dtype(np.float64)] = []
    summed = np.zeros(0)
    for index, (dtype, members) in enumerate(groups.items()):
        riders = len(extra) if index == 0 else 0
        buffer = np.empty(sum(p.grad.size for p in members) + riders, dtype=dtype)
        offset = 0
        for param in members:
            part = buffer[offset : offset + param.grad.size]
            np.multiply(param.grad.reshape(-1), dtype.type(weight), out=part)
            offset += param.grad.size
        if riders:
            buffer[offset:] = extra
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        offset = 0
        for param in members:
            values = buffer[offset : offset + param.grad.size].reshape(param.grad.shape)
            if param.grad.flags.writeable:
                np.copyto(param.grad, values)
            else:
                param.grad = values
            offset += param.grad.size
        if riders:
            summed = buffer[offset:].astype(np.float64)
    return summed


def average_buffers(model, comm=None) -> None:
    """Replace every floating-point buffer (BatchNorm's ``running_mean``/``running_var``) by its
    mean over the ranks, identical on all of them afterwards. Call it before writing the model
    (:class:`DataParallel` does so before validation and checkpoints). Computed in float64, so
    averaging buffers that are already equal leaves them bit-for-bit unchanged."""
    comm = get_comm() if comm is None else comm
    if comm is None or comm.Get_size() == 1:
        return
    from mpi4py import MPI

    buffers = [b for _, b in model.named_buffers() if b is not None and b.dtype.kind == "f"]
    if not buffers:
        return
    flat = np.concatenate([b.reshape(-1).astype(np.float64) for b in buffers])
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    flat /= comm.Get_size()
    offset = 0
    for b in buffers:
        b[...] = flat[offset : offset + b.size].reshape(b.shape)
        offset += b.size


def weights_checksum(model) -> str:
    """A hex digest of every parameter and buffer of ``model`` (keys, dtypes, shapes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for key, array in model.state_dict().items():
        array = np.ascontiguousarray(array)
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class ReplicasDiverged(RuntimeError):
    """The ranks' copies of the model are no longer identical (raised on every rank at once)."""


def check_replicas(model, comm=None, where: str = "") -> str:
    """Compare :func:`weights_checksum` across the ranks; raise :class:`ReplicasDiverged` on
    every rank if any differs. Returns the checksum."""
    mine = weights_checksum(model)
    comm = get_comm() if comm is None else comm
    if comm is None or comm.Get_size() == 1:
        return mine
    sums = comm.allgather(mine)
    differing = [rank for rank, value in enumerate(sums) if value != sums[0]]
    if differing:
        ranks = ", ".join(map(str, differing))
        raise ReplicasDiverged(
            f"{where + ': ' if where else ''}the model replicas differ: the weights of rank(s) "
            f"{ranks} do not match rank 0's (checksums {sums[differing[0]]} vs {sums[0]}); the "
            "ranks must run the same fastconv and NumPy and take the same steps"
        )
    return mine


@contextmanager
def abort_on_error(comm=None, report: Callable[[BaseException, int, int], None] | None = None):
    """Turn an exception in one rank into the end of the whole MPI job (``comm.Abort``), so the
    other ranks do not wait forever in their next collective call. ``report(error, rank, size)``
    prints it first (default: the traceback, labelled with the rank). Exceptions every rank
    raises together (:class:`ReplicasDiverged`, Ctrl-C's ``TrainingInterrupted``) pass through,
    and so does everything when there is one rank."""
    from .train import TrainingInterrupted

    comm = get_comm() if comm is None else comm
    try:
        yield
    except (ReplicasDiverged, TrainingInterrupted):
        raise
    except BaseException as err:
        if comm is None or comm.Get_size() == 1:
            raise
        rank, size = comm.Get_rank(), comm.Get_size()
        with suppress(Exception):
            if report is not None:
                report(err, rank, size)
            else:
                text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
                sys.stderr.write(
                    f"fastconv: rank {rank} of {size} failed; aborting the job\n{text}")
            sys.stderr.flush()
        comm.Abort(1)
        raise  # not reached: Abort ends the process


class DataParallel:
    """The data-parallel side of one training run, for :class:`fastconv.train.Trainer`.

    ``DataParallel(comm=None)`` uses :func:`get_comm`; with one rank the trainer runs as a
    plain process. The trainer calls :meth:`local` to cut each global batch, :meth:`seed_step`
    before the forward pass, :meth:`reduce_step` after backward, :meth:`end_epoch`,
    :meth:`evaluate` and :meth:`sync_buffers` at epoch ends and before checkpoints (which rank 0
    writes, then :meth:`broadcast` says how it went), and runs under :meth:`guard`.
    ``reduce_seconds``, ``reduce_calls`` and ``reduce_bytes`` measure the gradient exchange.
    """

    def __init__(self, comm=None):
        self.comm = get_comm() if comm is None else comm
        self.rank, self.size = rank_and_size(self.comm)
        self.stop_requested = False
        self.reduce_seconds, self.reduce_calls, self.reduce_bytes = 0.0, 0, 0

    def local(self, count: int) -> slice:
        """This rank's contiguous part of a global batch of ``count`` samples."""
        return shard(count, self.rank, self.size)

    def seed_step(self, generators: dict, words: list[int]) -> None:
        """Give the model's generators (Dropout's) a stream of their own for this step and rank:
        different masks on different ranks, and no hidden state, so a run resumed from a
        checkpoint draws the same masks as an uninterrupted one. ``words``: seed, epoch, step."""
        seed, *where = words
        for index, name in enumerate(sorted(generators)):
            bit_generator = generators[name].bit_generator
            seeds = np.random.SeedSequence([seed, _DROPOUT, *where, self.rank, index])
            bit_generator.state = type(bit_generator)(seeds).state

    def reduce_step(self, model, local: int, total: int, loss_sum: float, correct: int,
                    stop: bool) -> tuple[float, int]:
        """Average the gradients (weight ``local / total``) and, in the same message, sum the
        step's loss and correct counts and agree on stopping (:attr:`stop_requested`: any rank
        was interrupted). Returns the global ``(loss_sum, correct)``."""
        started = time.perf_counter()
        params = model.parameters()
        loss, hits, stops = _allreduce_gradients(
            params, self.comm, local / total, (loss_sum, correct, float(bool(stop))))
        self.reduce_seconds += time.perf_counter() - started
        self.reduce_calls += 1
        self.reduce_bytes += sum(p.grad.nbytes for p in params if p.grad is not None)
        self.stop_requested = stops > 0
        return float(loss), round(hits)

    def sync_buffers(self, model) -> None:
        average_buffers(model, self.comm)

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object), returned on every rank."""
        return self.comm.bcast(value, root=0)

    def end_epoch(self, model, epoch: int) -> None:
        """Average the BatchNorm statistics, then check that the replicas are identical."""
        self.sync_buffers(model)
        check_replicas(model, self.comm, where=f"after epoch {epoch}")

    def evaluate(self, model, x, y, batch_size: int = 500):
        """:func:`fastconv.train.evaluate` with each rank scoring its shard and the counts summed;
        every rank gets the same :class:`fastconv.train.Evaluation`."""
        from mpi4py import MPI

        from .train import Evaluation, evaluate

        if len(x) < self.size:
            return evaluate(model, x, y, batch_size=batch_size)
        part = self.local(len(x))
        mine = evaluate(model, x[part], y[part], batch_size=batch_size)
        confusion = np.ascontiguousarray(mine.confusion, dtype=np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, confusion, op=MPI.SUM)
        loss = self.comm.allreduce(mine.loss * mine.count, op=MPI.SUM)
        count = int(confusion.sum())
        totals = confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)
        return Evaluation(float(np.trace(confusion) / count), float(loss / count), per_class,
                          confusion, count)

    def guard(self):
        """:func:`abort_on_error` for this communicator."""
        return abort_on_error(self.comm)


# --------------------------------------------------------------------------------------------
# Dask: batch inference


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
    input order and equal, bit for bit, ``fastconv.train.predict_proba(model, x, batch_size)``
    in one process at the same thread count, also when a worker dies during the run (its tasks
    run again elsewhere). (BLAS may round the dense layers' sums differently at another thread
    count or batch size: differences near 1e-7.)
    """
    if _are_paths(images):
        result = predict_files_dask(model_or_path, images, client, batch_size)
        if result.errors:
            shown = "; ".join(result.errors[i] for i in sorted(result.errors)[:3])
            more = len(result.errors) - 3
            raise ValueError(f"{len(result.errors)} image(s) unreadable: {shown}"
                             + (f" (and {more} more)" if more > 0 else ""))
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
            errors[start + index] = reason if name in reason else f"{name}: {reason}"
    return FilePredictions(probabilities, errors)


def _are_paths(images) -> bool:
    if isinstance(images, (str, os.PathLike)):
        return True
    return isinstance(images, (list, tuple)) and bool(images) and all(
        isinstance(item, (str, os.PathLike)) for item in images)


def _tasks(function, model, chunks, batch_size, prefix) -> list:
    """One delayed call per chunk, all depending on the one model task."""
    from dask.base import tokenize

    delayed = _delayed()
    model_task = delayed(_model_payload, pure=True)(
        model.digest, model.blob, model.meta, dask_key_name=f"fastconv-model-{model.digest[:16]}")
    return [
        delayed(function, pure=True)(
            model_task, chunk, batch_size,
            dask_key_name=f"{prefix}-{index}-{tokenize(model.digest, chunk, batch_size)}")
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
        count = address[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--dask {address}: expected local:N with N >= 1 workers")
        with LocalCluster(n_workers=int(count), threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
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
        from . import io
        from .train import predict_proba

        if isinstance(model_or_path, (str, os.PathLike)):
            model, meta = io.load_any_model(model_or_path)  # a bad file fails here, clearly
            blob = Path(model_or_path).read_bytes()
        else:
            model, meta = model_or_path, {}
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.npz"
                io.save_model(model, path)
                blob = path.read_bytes()
        shape = list(shape or meta.get("input_shape") or [1, 28, 28])
        dtype = next(iter(model.state_dict().values())).dtype
        classes = predict_proba(model, np.zeros((1, *shape), dtype=dtype)).shape[1]
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
            from .threads import set_num_threads

            set_num_threads(1)
    model = cache.get(digest)
    if model is None:
        global models_built
        from . import io

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{digest}.model"  # .npz or ONNX: told by content
            path.write_bytes(blob)
            model = io.load_any_model(path).model
        cache.clear()  # one model at a time per thread
        cache[digest] = model
        models_built += 1
    return model


def _predict_block(payload, block, batch_size):
    from .train import predict_proba

    return predict_proba(_worker_model(payload), np.asarray(block), batch_size)


def _predict_files(payload, paths, batch_size):
    from .preprocess import to_mnist_input
    from .train import predict_proba

    model = _worker_model(payload)
    meta = payload[2]
    shape = meta.get("input_shape") or [1, 28, 28]
    mean, std = meta.get("mean", 0.0), meta.get("std", 1.0)  # as `fastconv predict` reads them
    inputs, kept, errors = [], [], {}
    for index, path in enumerate(paths):
        try:
            inputs.append(to_mnist_input(path, size=shape[1], mean=mean, std=std))
            kept.append(index)
        except (OSError, ValueError, TypeError) as err:
            text = f"{err.strerror}" if isinstance(err, OSError) and err.strerror else str(err)
            errors[index] = " ".join(text.split()) or type(err).__name__
    probabilities = np.full((len(paths), 0), np.nan)
    if inputs:
        found = predict_proba(model, np.stack(inputs), batch_size)
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
        folder = Path(paths)
        if not folder.is_dir():
            raise ValueError(f"{folder}: expected a folder of images or a list of paths")
        from PIL import Image

        suffixes = set(Image.registered_extensions())
        found = sorted(str(p) for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in suffixes)
        if not found:
            raise ValueError(f"{folder}: no image files in this folder")
        return found
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
    from .threads import available_cores

    with dask_client(f"local:{available_cores()}") as local:
        yield local


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
