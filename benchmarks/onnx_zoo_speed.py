"""Images/s of fastconv and onnxruntime on model-zoo CNNs read from ONNX, 224x224, float32.

    python benchmarks/onnx_zoo_speed.py                      # SqueezeNet 1.1, ResNet-18; batch 1, 16
    python benchmarks/onnx_zoo_speed.py --repeats 30 --threads 2 --json speed.json

1. a child process builds SqueezeNet 1.1 and ResNet-18 at their published sizes with torch.nn
   (tests/zoo_architectures.py) and exports them with torch.onnx.export (opset 17, dynamic
   batch), so torch's threads never run in the timed process;
2. for each model and batch size, each engine is timed in its own block (warm-up runs, then
   `--repeats` timed runs; onnxruntime's pool spins after each run and would slow an engine
   interleaved with it): `fastconv.onnx.load(...)` under fastconv.nn.no_grad, and an
   onnxruntime InferenceSession; both with `--threads` threads (fastconv.set_num_threads;
   intra_op_num_threads, one inter-op thread), on the same random input;
3. prints the median images/s of each and their ratio, and checks that the two outputs agree
   (1e-4 relative to the largest logit), exit status 1 otherwise.

OpenBLAS tuning variables (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE) are removed from the environment
first (the script re-executes itself without them) so that OpenBLAS picks its kernels for this
CPU, as in onnx_parity.py.
"""

from __future__ import annotations

import os
import sys

_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(name in os.environ for name in _UNSET):  # before NumPy loads OpenBLAS
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

MODELS = ("squeezenet1.1", "resnet18")
TESTS = Path(__file__).resolve().parents[1] / "tests"


def export_models(folder: Path, names) -> None:
    """In the child process: build and export each model to folder/NAME.onnx."""
    sys.path.insert(0, str(TESTS))
    import torch
    import zoo_architectures as zoo
    from test_onnx import export

    builders = {
        "squeezenet1.1": lambda: zoo.squeezenet("1.1"),
        "resnet18": lambda: zoo.resnet((2, 2, 2, 2)),
    }
    for name in names:
        torch.manual_seed(0)
        model = zoo.randomise_batchnorm(builders[name](), 1)
        (folder / f"{name}.onnx").write_bytes(export(torch, model, (3, 224, 224), 17))


def timed(run, repeats: int, warmup: int) -> float:
    """Median seconds of `repeats` calls of run(), after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(path: Path, batch: int, threads: int, repeats: int, warmup: int) -> dict:
    import onnxruntime as ort

    import fastconv
    import fastconv.onnx as fo
    from fastconv import nn

    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    fastconv.set_num_threads(threads)
    model = fo.load(path)
    outputs = {}

    def fastconv_run():
        with nn.no_grad():
            outputs["fastconv"] = model(x)

    seconds_fastconv = timed(fastconv_run, repeats, warmup)

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def onnxruntime_run():
        outputs["onnxruntime"] = session.run(None, {name: x})[0]

    seconds_ort = timed(onnxruntime_run, repeats, warmup)
    scale = float(np.abs(outputs["onnxruntime"]).max())
    error = float(np.abs(outputs["fastconv"] - outputs["onnxruntime"]).max())
    return {
        "batch": batch,
        "fastconv_images_per_s": batch / seconds_fastconv,
        "onnxruntime_images_per_s": batch / seconds_ort,
        "relative_difference": error / max(scale, 1e-30),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per engine")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--export", metavar="DIR", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.export:
        export_models(Path(args.export), args.models)
        return 0
    results, ok = [], True
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, __file__, "--export", folder, "--models", *args.models], check=True
        )
        print(f"224x224 float32, {args.threads} threads each, median of {args.repeats} runs")
        print(
            f"{'model':<15}{'batch':>6}{'fastconv img/s':>16}{'onnxruntime img/s':>19}{'ratio':>8}"
        )
        for name in args.models:
            for batch in args.batches:
                row = measure(
                    Path(folder) / f"{name}.onnx", batch, args.threads, args.repeats, args.warmup
                )
                row["model"] = name
                results.append(row)
                ok &= row["relative_difference"] <= 1e-4
                ratio = row["fastconv_images_per_s"] / row["onnxruntime_images_per_s"]
                print(
                    f"{name:<15}{batch:>6}{row['fastconv_images_per_s']:>16.1f}"
                    f"{row['onnxruntime_images_per_s']:>19.1f}{ratio:>7.2f}x"
                )
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "results": results}))
    if not ok:
        print("outputs differ from onnxruntime's by more than 1e-4 relative", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
