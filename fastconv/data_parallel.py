"""Data-parallel training over MPI (mpi4py), as PyTorch's DistributedDataParallel does it.

Every rank holds the whole model; each global mini-batch (the same seeded permutation on every
rank) is cut into one contiguous shard per rank; after backward, :func:`average_gradients`
averages the gradients of all parameters in one in-place ``Allreduce`` of a flat buffer, each
rank's gradient weighted by its share of the batch; then every rank takes the same optimiser
step, so the replicas stay bit-identical. :class:`DataParallel` is what
:class:`fastconv.train.Trainer` calls for that (``Trainer(..., parallel=DataParallel())``,
the same hooks as :class:`fastconv.train.SingleProcess`); it also averages BatchNorm running
statistics (batch statistics stay per rank, as DDP's default) before validation and before any
checkpoint, compares a checksum of the weights at each epoch end, shards validation, and makes
an exception in one rank abort the whole job instead of leaving the others waiting forever.

Started without an MPI launcher (no ``mpiexec``), :func:`get_comm` returns None and nothing here
needs mpi4py: one process is a plain run. mpi4py is imported inside the functions that need it
(an optional extra: ``pip install "fastconv[mpi]"``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, suppress

import numpy as np

from .inference import Evaluation, evaluate
from .threads import available_cores
from .train import TrainingInterrupted

__all__ = [
    "get_comm",
    "rank_and_size",
    "default_threads",
    "shard",
    "average_gradients",
    "average_buffers",
    "weights_checksum",
    "check_replicas",
    "ReplicasDiverged",
    "abort_on_error",
    "DataParallel",
]

# Variables that MPI launchers set in every process they start (Open MPI, MPICH/Hydra, PMIx,
# MVAPICH): without one of them this process was not started by a launcher.
_LAUNCHER_VARIABLES = (
    "OMPI_COMM_WORLD_SIZE",
    "PMIX_RANK",
    "PMI_SIZE",
    "PMI_RANK",
    "MV2_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
)
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
                    f"fastconv: rank {rank} of {size} failed; aborting the job\n{text}"
                )
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

    def reduce_step(
        self, model, local: int, total: int, loss_sum: float, correct: int, stop: bool
    ) -> tuple[float, int]:
        """Average the gradients (weight ``local / total``) and, in the same message, sum the
        step's loss and correct counts and agree on stopping (:attr:`stop_requested`: any rank
        was interrupted). Returns the global ``(loss_sum, correct)``."""
        started = time.perf_counter()
        params = model.parameters()
        loss, hits, stops = _allreduce_gradients(
            params, self.comm, local / total, (loss_sum, correct, float(bool(stop)))
        )
        self.reduce_seconds += time.perf_counter() - started
        self.reduce_calls += 1
        self.reduce_bytes += sum(p.grad.nbytes for p in params if p.grad is not None)
        self.stop_requested = stops > 0
        return float(loss), round(hits)

    def should_stop(self, interrupted: bool) -> bool:
        """Whether to stop now: only as agreed by :meth:`reduce_step`, all ranks together."""
        return self.stop_requested

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
        return Evaluation(
            float(np.trace(confusion) / count), float(loss / count), per_class, confusion, count
        )

    def guard(self):
        """:func:`abort_on_error` for this communicator."""
        return abort_on_error(self.comm)
