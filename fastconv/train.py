"""The training loop, its history and checkpoints.

A step reads as in PyTorch, with the backward pass explicit::

    logits = model(x); loss = criterion(logits, y)
    model.zero_grad(); model.backward(criterion.backward()); optimizer.step()

:class:`Trainer` wraps that in epochs of seeded mini-batches, with a progress bar, validation,
early stopping and checkpoints from which a run continues **bit-for-bit**: given the same seed
and thread count, a run interrupted anywhere (Ctrl-C, ``kill -9``, power loss) and resumed from
its last checkpoint ends with the same weights as an uninterrupted one. That holds because
nothing random carries hidden state across steps:

* epoch ``e`` visits the samples in the order ``default_rng([seed, 0, e]).permutation(n)``;
* the augmentation of step ``s`` of epoch ``e`` draws from ``default_rng([seed, 1, e, s])``;
* generators that live inside the model (Dropout's) are saved in each checkpoint by state.

So a checkpoint needs only the weights, the optimiser and scheduler states, those generator
states, the epoch and the step within it (plus running totals, so the epoch's reported loss is
the same too).
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from . import nn, plots
from .inference import (
    Evaluation,
    _check_data,
    _check_positive_int,
    evaluate,
    predict,
    predict_proba,
)
from .io import SaveError, load_checkpoint, save_checkpoint

__all__ = [
    "CheckpointWarning",
    "Evaluation",
    "History",
    "SingleProcess",
    "Trainer",
    "TrainingInterrupted",
    "evaluate",
    "fit",
    "predict",
    "predict_proba",
    "random_shift",
    "split_validation",
]

_SHUFFLE, _AUGMENT = 0, 1  # SeedSequence words keeping the two streams apart


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training at a step boundary; ``checkpoint`` is where it was saved
    (None if no checkpoint path was set or saving failed, then ``error`` says why)."""

    def __init__(self, checkpoint: Path | None, epoch: int, step: int, error: str | None = None):
        super().__init__(checkpoint, epoch, step, error)
        self.checkpoint, self.epoch, self.step, self.error = checkpoint, epoch, step, error


class CheckpointWarning(UserWarning):
    """A checkpoint could not be written; the previous one is intact and training continues."""


# --------------------------------------------------------------------------------------------
# History


class History:
    """Per-epoch records of a run: ``epoch``, ``train_loss``, ``train_acc``, ``val_loss``,
    ``val_acc`` (None without validation), ``lr`` (at the epoch's start) and ``time`` (seconds).

    ``history["val_acc"]`` is one column as a list; ``history.rows`` the records as dicts.
    ``to_dict()`` / ``from_dict()`` convert to and from JSON-able columns.
    """

    COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "time")

    def __init__(self, rows: list[dict] | None = None):
        self.rows: list[dict] = [dict(row) for row in rows or []]

    def append(self, **row) -> None:
        unknown = set(row) - set(self.COLUMNS)
        if unknown:
            raise ValueError(f"unknown history column(s): {', '.join(sorted(unknown))}")
        self.rows.append({name: row.get(name) for name in self.COLUMNS})

    def __getitem__(self, column: str) -> list:
        if column not in self.COLUMNS:
            raise KeyError(f"no history column {column!r}; columns: {', '.join(self.COLUMNS)}")
        return [row[column] for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"History({len(self)} epochs)"

    def to_dict(self) -> dict[str, list]:
        return {name: self[name] for name in self.COLUMNS}

    def plot(self, path) -> Path:
        """Loss and accuracy per epoch, train and validation, as one PNG (needs matplotlib)."""
        return plots.plot_history(self, path)

    @classmethod
    def from_dict(cls, data: dict) -> History:
        if not isinstance(data, dict):
            raise ValueError(f"history: expected a dict of columns, got {type(data).__name__}")
        lengths = {len(v) for v in data.values() if isinstance(v, list)}
        if len(lengths) > 1 or any(not isinstance(v, list) for v in data.values()):
            raise ValueError("history: columns must be lists of equal length")
        count = lengths.pop() if lengths else 0
        unknown = set(data) - set(cls.COLUMNS)
        if unknown:
            raise ValueError(f"history: unknown column(s): {', '.join(sorted(unknown))}")
        return cls(
            [
                {name: data.get(name, [None] * count)[i] for name in cls.COLUMNS}
                for i in range(count)
            ]
        )


# --------------------------------------------------------------------------------------------
# Trainer


class SingleProcess:
    """The data-parallel hooks of :class:`Trainer` for a run in one process: the whole batch is
    this process's shard and there is nothing to exchange. ``fastconv.data_parallel.DataParallel``
    implements the same hooks over MPI."""

    rank, size = 0, 1

    def local(self, count: int) -> slice:
        return slice(0, count)

    def seed_step(self, generators: dict, words: list[int]) -> None:
        """Alone, Dropout's generators keep their own streams (saved in each checkpoint)."""

    def reduce_step(self, model, local, total, loss_sum, correct, stop) -> tuple[float, int]:
        return loss_sum, correct

    def should_stop(self, interrupted: bool) -> bool:
        return interrupted

    def sync_buffers(self, model) -> None:
        pass

    def end_epoch(self, model, epoch: int) -> None:
        pass

    def evaluate(self, model, x, y, batch_size: int = 500) -> Evaluation:
        return evaluate(model, x, y, batch_size=batch_size)

    def broadcast(self, value):
        return value

    def guard(self):
        return nullcontext()


class Trainer:
    """Mini-batch training with seeded shuffling, validation, early stopping and checkpoints.

    ``model``: a ``fastconv.nn`` module; ``optimizer``: a ``fastconv.optim`` optimiser over its
    parameters; ``criterion``: the loss (default ``nn.CrossEntropyLoss()``); ``scheduler``: a
    learning-rate schedule stepped after every optimiser step (``scheduler_interval="step"``)
    or after every epoch (``"epoch"``). ``augment(x, rng) -> x`` transforms each training batch
    (e.g. :func:`random_shift`). ``checkpoint`` is the file written atomically at the end of
    every epoch, every ``checkpoint_every`` steps, and on Ctrl-C (then
    :class:`TrainingInterrupted` is raised). ``extra`` (JSON-able) is stored in checkpoints
    as is. ``progress``: a tqdm bar per epoch (shown only on a terminal); ``log(str)`` receives
    one line per epoch.

    A checkpoint that cannot be written (disk full, permissions) leaves the previous one intact;
    a :class:`CheckpointWarning` says so and training continues.

    ``parallel``: a :class:`fastconv.data_parallel.DataParallel` for data-parallel training over
    MPI (None, or one rank: this process alone). ``batch_size`` is then the global batch: each
    rank takes its shard of every batch (at least 2 samples, so a last batch smaller than twice
    the ranks is dropped), gradients are averaged after backward and every rank takes the same
    step; rank 0 alone shows progress, logs and writes checkpoints; validation is sharded.
    """

    def __init__(
        self,
        model,
        optimizer,
        criterion=None,
        *,
        scheduler=None,
        scheduler_interval: str = "step",
        batch_size: int = 64,
        seed: int = 0,
        augment: Callable | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int | None = None,
        extra: dict | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        handle_sigint: bool = True,
        parallel=None,
    ):
        if criterion is None:
            criterion = nn.CrossEntropyLoss()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        _check_positive_int("batch_size", batch_size)
        if checkpoint_every is not None:
            _check_positive_int("checkpoint_every", checkpoint_every)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every, self.extra = checkpoint_every, dict(extra or {})
        self.progress, self.log, self.handle_sigint = progress, log, handle_sigint
        self.history = History()
        # Where the run is: the next epoch and the next step within it, plus the epoch's totals.
        self.epoch, self.step = 0, 0
        self._totals = _fresh_totals()
        self.best_val_loss: float | None = None
        self.bad_epochs = 0
        self.stopped_early = False
        self._interrupted = False
        self._save_error: str | None = None
        self.parallel = parallel if parallel is not None and parallel.size > 1 else SingleProcess()
        if self.parallel.size > 1 and batch_size < 2 * self.parallel.size:
            raise ValueError(
                f"batch_size {batch_size} is too small for {self.parallel.size} "
                f"ranks: each rank needs at least 2 samples of every batch"
            )

    # -- the loop ----------------------------------------------------------------------------

    def fit(
        self,
        x,
        y,
        epochs: int,
        validation: tuple[Any, Any] | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
    ) -> History:
        """Train until ``epochs`` epochs are done (counting those of a resumed run), or until
        the validation loss has not improved by ``min_delta`` for ``patience`` epochs.

        ``x`` (N, C, H, W) float, ``y`` (N,) int labels; ``validation``: ``(x_val, y_val)``.
        Returns :attr:`history`. Raises :class:`TrainingInterrupted` on Ctrl-C.
        """
        x, y = _check_data(x, y, "x", "y")
        if validation is not None:
            validation = _check_data(*validation, "x_val", "y_val")
        _check_positive_int("epochs", epochs)
        if patience is not None:
            _check_positive_int("patience", patience)
        with (
            self._sigint_guard(),
            self.parallel.guard(),
        ):  # data-parallel: an error in one rank ends the job
            while self.epoch < epochs and not self.stopped_early:
                self._run_epoch(x, y, epochs, validation, patience, min_delta)
        return self.history

    def _run_epoch(self, x, y, epochs, validation, patience, min_delta):
        epoch, n, size = self.epoch, len(x), self.batch_size
        order = np.random.default_rng([self.seed, _SHUFFLE, epoch]).permutation(n)
        steps = math.ceil(n / size)
        last = n - (steps - 1) * size
        if last < 2 * self.parallel.size and last < size and steps > 1:
            steps -= 1  # a batch of one sample (per rank) breaks BatchNorm's statistics; drop it
        totals = self._totals
        if self.step == 0:
            totals.update(_fresh_totals(), lr=_current_lr(self.optimizer))
        started = time.perf_counter()
        bar = self._bar(epoch, epochs, min(steps * size, n), self.step * size)
        try:
            self.model.train()
            for step in range(self.step, steps):
                index = order[step * size : (step + 1) * size]
                xb, yb = x[index], y[index]
                if self.augment is not None:  # data-parallel too: of the global batch, as alone
                    xb = self.augment(xb, np.random.default_rng([self.seed, _AUGMENT, epoch, step]))
                part = self.parallel.local(len(index))  # this rank's shard of the batch
                xb, yb = xb[part], yb[part]
                self.parallel.seed_step(_generators(self.model), [self.seed, epoch, step])
                logits = self.model(xb)
                loss = float(self.criterion(logits, yb))
                self.model.zero_grad()
                self.model.backward(self.criterion.backward())
                loss_sum, correct = loss * len(yb), int((np.argmax(logits, axis=1) == yb).sum())
                loss_sum, correct = self.parallel.reduce_step(  # average gradients, sum counts
                    self.model, len(yb), len(index), loss_sum, correct, self._interrupted
                )
                self.optimizer.step()
                if self.scheduler is not None and self.scheduler_interval == "step":
                    self.scheduler.step()
                totals["loss"] += loss_sum
                totals["correct"] += correct
                totals["seen"] += len(index)
                self.step = step + 1
                if bar is not None:
                    bar.update(len(index))
                    bar.set_postfix(
                        {
                            "loss": f"{totals['loss'] / totals['seen']:.4f}",
                            "acc": f"{totals['correct'] / totals['seen']:.2%}",
                        },
                        refresh=False,
                    )
                if self._stopping():
                    totals["time"] += time.perf_counter() - started
                    self._stop(self.save_checkpoint())
                if (
                    self.checkpoint_every
                    and self.step % self.checkpoint_every == 0
                    and self.step < steps
                ):
                    totals["time"] += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        totals["time"] += time.perf_counter() - started
        self._end_epoch(validation, epochs, patience, min_delta)

    def _end_epoch(self, validation, epochs, patience, min_delta):
        totals = self._totals
        seen = max(totals["seen"], 1)
        row = {
            "epoch": self.epoch + 1,
            "train_loss": totals["loss"] / seen,
            "train_acc": totals["correct"] / seen,
            "lr": totals["lr"],
        }
        started = time.perf_counter()
        self.parallel.end_epoch(self.model, self.epoch + 1)
        if validation is not None:
            result = self.parallel.evaluate(
                self.model, *validation, batch_size=max(self.batch_size, 256)
            )
            row.update(val_loss=result.loss, val_acc=result.accuracy)
        row["time"] = totals["time"] + time.perf_counter() - started
        self.history.append(**row)
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        if validation is not None and patience is not None:
            if self.best_val_loss is None or row["val_loss"] < self.best_val_loss - min_delta:
                self.best_val_loss, self.bad_epochs = row["val_loss"], 0
            else:
                self.bad_epochs += 1
                self.stopped_early = self.bad_epochs >= patience
        self.epoch, self.step = self.epoch + 1, 0
        self._totals = _fresh_totals()
        if self.log is not None and self.parallel.rank == 0:
            self.log(_epoch_line(row, epochs, self.stopped_early))
        path = self.save_checkpoint()
        if self._stopping():
            self._stop(path)

    def _stopping(self) -> bool:
        """Ctrl-C seen: here, or in a data-parallel run on any rank (agreed at each step)."""
        return self.parallel.should_stop(self._interrupted)

    def _bar(self, epoch, epochs, total, initial):
        if not self.progress or self.parallel.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            unit="img",
            unit_scale=False,
            leave=False,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=None,
            dynamic_ncols=True,
        )

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Write the run's state to ``path`` (default: the ``checkpoint`` given at creation).

        Returns the path, or None if there is none or writing failed (a
        :class:`CheckpointWarning` then says why; the previous checkpoint is intact). In a
        data-parallel run every rank calls it: they average BatchNorm statistics, rank 0 writes.
        """
        path = Path(path) if path is not None else self.checkpoint
        self._save_error = None
        if path is None:
            return None
        self.parallel.sync_buffers(self.model)  # the same BatchNorm statistics on every rank
        saved = self._write_checkpoint(path) if self.parallel.rank == 0 else None
        # Everyone goes on once the file is in place (a rank may read it next, to resume).
        saved, self._save_error = self.parallel.broadcast((saved, self._save_error))
        return saved

    def _write_checkpoint(self, path: Path) -> Path | None:
        try:
            save_checkpoint(
                path,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                rng_states=_generator_states(self.model),
                epoch=self.epoch,
                step=self.step,
                history=self.history.to_dict(),
                extra={**self.extra, "trainer": self._state()},
            )
        except SaveError as err:
            self._save_error = str(err)
            warnings.warn(f"{err}; training continues", CheckpointWarning, stacklevel=2)
            return None
        return path

    def resume(self, checkpoint) -> None:
        """Continue from a checkpoint (a path or a loaded :class:`fastconv.io.Checkpoint`):
        restores weights, optimiser, scheduler, generator states, epoch, step and history.

        Everything is checked before anything changes: a checkpoint that does not fit this
        model raises ``ValueError`` and leaves the trainer and model as they were.
        """
        ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        state = ckpt.extra.get("trainer")
        if not isinstance(state, dict):
            raise ValueError("checkpoint: no trainer state (not written by fastconv.train.Trainer)")
        if state.get("seed") != self.seed or state.get("batch_size") != self.batch_size:
            raise ValueError(
                f"checkpoint: written with seed {state.get('seed')} and batch size "
                f"{state.get('batch_size')}, this trainer has {self.seed} and {self.batch_size}"
            )
        if (self.optimizer is None) != (ckpt.optimizer_state is None) or (
            self.scheduler is None
        ) != (ckpt.scheduler_state is None):
            raise ValueError("checkpoint: optimiser/scheduler presence differs from this trainer")
        current = self.model.state_dict()
        for key, value in current.items():
            stored = ckpt.model_state.get(key)
            if stored is None or stored.shape != np.shape(value):
                raise ValueError(f"checkpoint: weights do not fit this model (tensor {key!r})")
        if set(ckpt.model_state) != set(current):
            raise ValueError("checkpoint: its tensors differ from this model's")
        generators = _generators(self.model)
        if set(ckpt.rng_states) != set(generators):
            raise ValueError(
                f"checkpoint: random generators {sorted(ckpt.rng_states)} differ from the "
                f"model's {sorted(generators)}"
            )
        history = History.from_dict(ckpt.history or {})
        backup = self._restorable()
        try:
            self._restore(
                ckpt.model_state, ckpt.optimizer_state, ckpt.scheduler_state, ckpt.rng_states
            )
        except (ValueError, KeyError, TypeError) as err:
            self._restore(*backup)  # all or nothing
            raise ValueError(f"checkpoint: cannot restore: {err}") from None
        self.epoch, self.step, self.history = ckpt.epoch, ckpt.step, history
        totals = state.get("totals") or {}
        self._totals = {**_fresh_totals(), **totals}
        self.best_val_loss = state.get("best_val_loss")
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.stopped_early = bool(state.get("stopped_early", False))

    def _restorable(self):
        return (
            self.model.state_dict(),
            self.optimizer.state_dict() if self.optimizer is not None else None,
            self.scheduler.state_dict() if self.scheduler is not None else None,
            _generator_states(self.model),
        )

    def _restore(self, model_state, optimizer_state, scheduler_state, rng_states):
        self.model.load_state_dict(model_state)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(optimizer_state)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(scheduler_state)
        for name, generator in _generators(self.model).items():
            generator.bit_generator.state = rng_states[name]

    def _state(self) -> dict:
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "totals": dict(self._totals),
            "best_val_loss": self.best_val_loss,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
        }

    # -- Ctrl-C ------------------------------------------------------------------------------

    @contextmanager
    def _sigint_guard(self):
        """Turn the first Ctrl-C into a flag checked between steps; a second one stops at once."""
        if not self.handle_sigint or threading.current_thread() is not threading.main_thread():
            yield
            return
        self._interrupted = False

        def handler(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop(self, saved_path):
        error = self._save_error if self.checkpoint is not None else "no checkpoint path was set"
        raise TrainingInterrupted(saved_path, self.epoch, self.step, error)


def fit(
    model, optimizer, x, y, epochs: int, *, validation=None, patience=None, **options
) -> History:
    """One-call training: ``Trainer(model, optimizer, **options).fit(x, y, epochs, ...)``."""
    return Trainer(model, optimizer, **options).fit(x, y, epochs, validation, patience)


# --------------------------------------------------------------------------------------------
# Data helpers


def random_shift(x, rng, max_shift: int = 2, fill: float | None = None) -> np.ndarray:
    """Shift each image of ``x`` (N, C, H, W) by its own random whole-pixel offset in
    [-max_shift, max_shift] on both axes, filling with ``fill`` (default: the batch minimum,
    which is the background of normalised digits)."""
    x = np.asarray(x)
    n, _, h, w = x.shape
    k = max_shift
    fill = x.min() if fill is None else fill
    padded = np.full((n, x.shape[1], h + 2 * k, w + 2 * k), fill, dtype=x.dtype)
    padded[:, :, k : k + h, k : k + w] = x
    dy = rng.integers(-k, k + 1, size=n)
    dx = rng.integers(-k, k + 1, size=n)
    out = np.empty_like(x)
    for sy in range(-k, k + 1):
        for sx in range(-k, k + 1):
            chosen = np.flatnonzero((dy == sy) & (dx == sx))
            if len(chosen):
                out[chosen] = padded[chosen, :, k - sy : k - sy + h, k - sx : k - sx + w]
    return out


def split_validation(x, y, size: int):
    """``(x_train, y_train), (x_val, y_val)``: the last ``size`` samples are held out."""
    if not isinstance(size, int) or size < 0 or size >= len(x):
        raise ValueError(f"validation size must be in [0, {len(x)}), got {size!r}")
    cut = len(x) - size
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


# --------------------------------------------------------------------------------------------
# Internals


def _fresh_totals() -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0, "lr": None}


def _current_lr(optimizer):
    groups = getattr(optimizer, "param_groups", None)
    if groups:
        return float(groups[0]["lr"])
    lr = getattr(optimizer, "lr", None)
    return float(lr) if lr is not None else None


def _epoch_line(row, epochs, stopped_early) -> str:
    line = f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}"
    if row.get("val_loss") is not None:
        line += f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}"
    if row.get("lr") is not None:
        line += f" | lr {row['lr']:.3g}"
    line += f" | {row['time']:.1f} s"
    return line + (" | early stop" if stopped_early else "")


def _generators(model) -> dict[str, np.random.Generator]:
    """Every numpy Generator held by the model or its submodules (Dropout's), by attribute path."""
    found: dict[str, np.random.Generator] = {}

    def visit(module, prefix):
        for name, value in vars(module).items():
            if isinstance(value, np.random.Generator):
                found[prefix + name] = value
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    return found


def _generator_states(model) -> dict:
    return {name: g.bit_generator.state for name, g in _generators(model).items()}
