"""The benchmark scripts run on tiny sizes so that none can rot: onnx_parity.py's agreement check
(fastconv vs onnxruntime on the 10,000 MNIST test images, >= 99.9%), distributed.py and
profile_step.py. Their numbers mean nothing at these sizes; that they run and say it does."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("FASTCONV_DATA_DIR") or HERE.parents[1] / "shared" / "data")


def script(name, *args, timeout=900):
    result = subprocess.run(
        [sys.executable, str(HERE / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_profile_step_times_every_layer():
    out = script("profile_step.py", "--batch", "2", "--steps", "1", "--threads", "1")
    assert out.startswith("step: ")
    for layer in ("Conv2d", "MaxPool2d", "ReLU", "Linear"):
        assert f"{layer}.backward" in out
    # Sequential runs each Conv2d + MaxPool2d pair fused: its forward time is there
    assert "Conv2d.forward_pooled" in out and "ReLU.forward" in out and "Linear.forward" in out


def test_onnx_parity_agreement(tmp_path):
    for module in ("torch", "onnx", "onnxruntime"):
        pytest.importorskip(module, reason=f"onnx_parity.py needs {module}")
    if not (DATA / "mnist").is_dir():
        pytest.skip(f"MNIST not found under {DATA} (set FASTCONV_DATA_DIR)")
    out = tmp_path / "parity.json"
    script(
        "onnx_parity.py",
        "--data-dir",
        DATA / "mnist",
        "--epochs",
        "0.02",
        "--repeats",
        "1",
        "--batch",
        "16",
        "--threads",
        "1",
        "--json",
        out,
    )  # exits 1 below 99.9% agreement
    result = json.loads(out.read_text())
    assert result["test_images"] == 10000 and result["agreement"] >= 0.999
    assert result["accuracy_fastconv"] == pytest.approx(result["accuracy_onnxruntime"], abs=1e-3)


def test_distributed_worker_alone():
    out = script("distributed.py", "--worker", "--steps", "1", "--repeat", "1", "--threads", "1")
    run = json.loads(out.strip().splitlines()[-1])
    assert run["ranks"] == 1 and run["images_per_s"] > 0 and run["gradient_bytes"] > 0


def test_distributed_report_with_two_ranks():
    pytest.importorskip("mpi4py", reason='distributed.py needs mpi4py: pip install "fastconv[mpi]"')
    if shutil.which("mpiexec") is None and not (Path(sys.executable).parent / "mpiexec").exists():
        pytest.skip("distributed.py needs mpiexec")
    out = script("distributed.py", "--steps", "1", "--repeat", "1", timeout=1800)
    assert "2 ranks x 1 thread" in out and "K machines like this one" in out


def test_onnx_zoo_speed_runs_and_agrees(tmp_path):
    for module in ("torch", "onnx", "onnxruntime"):
        pytest.importorskip(module, reason=f"onnx_zoo_speed.py needs {module}")
    out = tmp_path / "speed.json"
    script(
        "onnx_zoo_speed.py",
        *("--models", "squeezenet1.1", "--batches", "1", "--repeats", "1", "--warmup", "0"),
        *("--threads", "1", "--json", out),
    )  # exits 1 when fastconv and onnxruntime disagree
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "squeezenet1.1" and row["fastconv_images_per_s"] > 0
    assert row["relative_difference"] <= 1e-4
