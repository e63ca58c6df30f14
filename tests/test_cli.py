"""The `fastconv` command run as a user runs it (subprocesses): train, evaluate, predict on PNG files,
info, --help, error messages, and a training run killed (SIGKILL, Ctrl-C) and resumed bit-for-bit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastconv import datasets, io

DATA_DIR = Path(
    os.environ.get("FASTCONV_DATA_DIR") or Path(__file__).parents[2] / "shared" / "data"
)
FASTCONV = [sys.executable, "-m", "fastconv"]
# A small run: 3,000 digits, 2 epochs of 47 steps, one thread so that runs are comparable bit-for-bit.
SMALL_RUN = [
    "--limit",
    "3000",
    "--epochs",
    "2",
    "--val-size",
    "500",
    "--threads",
    "1",
    "--no-test",
    "--no-download",
    "--seed",
    "3",
    "--quiet",
]


def env(tmp_path):
    variables = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), COLUMNS="100")
    variables.pop("FASTCONV_DATA_DIR", None)
    variables.pop("FASTCONV_NUM_THREADS", None)
    return variables


def run(*args, tmp_path, check=True, timeout=600):
    result = subprocess.run(
        [*FASTCONV, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(tmp_path),
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def assert_one_line_error(result, status=1, contains=""):
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert contains in lines[0], lines[0]


def same_weights(path_a, path_b):
    a, _ = io.load_model(path_a)
    b, _ = io.load_model(path_b)
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def mnist_dir():
    try:
        datasets.mnist("test", data_dir=DATA_DIR, download=False)
    except FileNotFoundError:
        pytest.skip(f"MNIST not found under {DATA_DIR} (set FASTCONV_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def model(mnist_dir, workdir):
    """A model trained by the command line on 5,000 digits for one epoch."""
    run(
        "train",
        "--data-dir",
        mnist_dir,
        "--limit",
        "5000",
        "--epochs",
        "1",
        "--val-size",
        "1000",
        "--no-test",
        "--no-download",
        "--threads",
        "2",
        "--out",
        "digits.npz",
        tmp_path=workdir,
    )
    return workdir / "digits.npz"


@pytest.fixture(scope="module")
def reference_run(mnist_dir, workdir):
    """The uninterrupted small run whose final weights interrupted runs must reproduce."""
    run("train", "--data-dir", mnist_dir, *SMALL_RUN, "--out", "reference.npz", tmp_path=workdir)
    return workdir / "reference.npz"


# -- help and info ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["train", "evaluate", "predict", "info"]),
        (
            ["train"],
            [
                "--dataset",
                "--epochs",
                "--batch-size",
                "--lr",
                "--optimizer",
                "--seed",
                "--data-dir",
                "--out",
                "--resume",
                "--checkpoint",
                "--checkpoint-every",
                "--threads",
                "--limit",
                "--quiet",
                "--patience",
                "--augment",
            ],
        ),
        (["evaluate"], ["MODEL", "--dataset", "--data-dir", "--threads", "--json"]),
        (["predict"], ["MODEL", "IMAGE", "--top", "--json", "--threads"]),
        (["info"], ["--json"]),
    ],
)
def test_help_is_complete(tmp_path, command, expected):
    result = run(*command, "--help", tmp_path=tmp_path)
    for option in expected:
        assert option in result.stdout


def test_info(tmp_path):
    text = run("info", tmp_path=tmp_path).stdout
    for word in ("fastconv 0.", "OpenMP:", "threads:", "compiler flags:", "BLAS"):
        assert word in text
    info = json.loads(run("info", "--json", tmp_path=tmp_path).stdout)
    assert isinstance(info["openmp"], bool) and info["threads"] >= 1
    assert any(pool["user_api"] == "blas" for pool in info["thread_pools"])


def test_console_script_is_installed(tmp_path):
    script = shutil.which("fastconv")
    if script is None:
        pytest.skip("the fastconv console script is not on PATH")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("fastconv ")


# -- train, evaluate, predict -----------------------------------------------------------------------


def test_trained_model_file(model):
    _, meta = io.load_model(model)
    assert meta["dataset"] == "mnist" and meta["classes"] == [str(i) for i in range(10)]
    assert meta["input_shape"] == [1, 28, 28]
    assert meta["training"]["limit"] == 5000 and len(meta["history"]["epoch"]) == 1
    assert meta["history"]["val_acc"][0] > 0.8


def test_evaluate(model, mnist_dir, workdir):
    result = run(
        "evaluate",
        model,
        "--data-dir",
        mnist_dir,
        "--limit",
        "1000",
        "--no-download",
        tmp_path=workdir,
    )
    assert "accuracy" in result.stdout and "confusion matrix" in result.stdout
    assert result.stdout.count(" images)\n") == 10  # one per-class line per digit
    data = json.loads(
        run(
            "evaluate",
            model,
            "--data-dir",
            mnist_dir,
            "--limit",
            "1000",
            "--json",
            "--no-download",
            tmp_path=workdir,
        ).stdout
    )
    confusion = np.array(data["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == data["count"] == 1000
    assert data["accuracy"] == pytest.approx(np.trace(confusion) / 1000)
    assert data["accuracy"] > 0.85


@pytest.fixture(scope="module")
def digit_pngs(mnist_dir, workdir):
    """The first ten test digits as PNG files: five as stored (light on black, 28x28), five as a
    user would draw them (dark on white, 100x100, RGB)."""
    from PIL import Image

    images = datasets.read_idx(next(mnist_dir.glob("mnist/t10k-images*")))
    labels = datasets.read_idx(next(mnist_dir.glob("mnist/t10k-labels*")))
    folder = workdir / "pngs"
    folder.mkdir()
    for i in range(10):
        image = Image.fromarray(images[i])
        if i >= 5:
            image = Image.fromarray(255 - images[i]).resize((100, 100)).convert("RGB")
        image.save(folder / f"digit{i}_{labels[i]}.png")
    return folder, [int(v) for v in labels[:10]]


def test_predict_files_and_folders(model, digit_pngs, workdir):
    folder, labels = digit_pngs
    result = run("predict", model, folder, tmp_path=workdir)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 10
    correct = 0
    for line, label in zip(lines, labels):
        name, ranked = line.split(": ", 1)
        assert name.endswith(f"_{label}.png")
        guesses = ranked.split("  ")
        assert len(guesses) == 3  # --top default
        probabilities = [float(g.split("(")[1].rstrip(")")) for g in guesses]
        assert probabilities == sorted(probabilities, reverse=True)
        correct += guesses[0].startswith(f"{label} (")
    assert correct >= 8, result.stdout

    one = run("predict", model, folder / "digit0_7.png", "--top", "10", "--json", tmp_path=workdir)
    [entry] = json.loads(one.stdout)
    assert entry["file"].endswith("digit0_7.png") and len(entry["top"]) == 10
    assert sum(t["probability"] for t in entry["top"]) == pytest.approx(1, abs=1e-6)
    assert {t["label"] for t in entry["top"]} == {str(i) for i in range(10)}


def test_predict_reports_bad_images_and_goes_on(model, digit_pngs, workdir, tmp_path):
    folder, _ = digit_pngs
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = run("predict", model, bad, folder / "digit0_7.png", tmp_path=workdir, check=False)
    assert_one_line_error(result, 1, "notes.png")
    assert "cannot decode" in result.stderr
    assert result.stdout.startswith(str(folder / "digit0_7.png") + ": 7 (")


# -- user mistakes: one line, no traceback ----------------------------------------------------------


def test_missing_model_file(tmp_path):
    for command in (["evaluate", "absent.npz"], ["predict", "absent.npz", "x.png"]):
        result = run(*command, tmp_path=tmp_path, check=False)
        assert_one_line_error(result, 1, "absent.npz: no such file")


def test_corrupted_model_file(model, tmp_path, digit_pngs):
    folder, _ = digit_pngs
    bad = tmp_path / "bad.npz"
    bad.write_bytes(model.read_bytes()[:100_000])
    result = run("predict", bad, folder, tmp_path=tmp_path, check=False)
    assert_one_line_error(result, 1, "bad.npz: not a fastconv .npz file")


def test_missing_image(model, tmp_path):
    result = run("predict", model, "nowhere.png", tmp_path=tmp_path, check=False)
    assert_one_line_error(result, 1, "nowhere.png: no such file or folder")


def test_missing_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("train", "--data-dir", "empty", "--no-download", tmp_path=tmp_path, check=False)
    assert_one_line_error(result, 1, "MNIST data not found")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epochs", "0"], "--epochs: expected a positive integer"),
        (["train", "--lr", "-1"], "--lr: expected a positive number"),
        (["train", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["train", "--threads", "two"], "--threads: expected a positive integer"),
        (["predict", "model.npz"], "the following arguments are required: IMAGE"),
        (["evaluate", "m.npz", "--top", "3"], "unrecognized arguments: --top 3"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, args, message):
    result = run(*args, tmp_path=tmp_path, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_unusable_paths(tmp_path):
    result = run("train", "--out", "no/such/folder/m.npz", tmp_path=tmp_path, check=False)
    assert_one_line_error(result, 1, "folder no/such/folder does not exist")
    result = run("train", "--resume", "absent.ckpt.npz", tmp_path=tmp_path, check=False)
    assert_one_line_error(result, 1, "absent.ckpt.npz: no such file")
    result = run("train", "--arch", "resnet", tmp_path=tmp_path, check=False)
    assert_one_line_error(result, 1, "unknown architecture 'resnet'")


# -- interrupted runs -------------------------------------------------------------------------------


def start_small_run(mnist_dir, workdir, name):
    return subprocess.Popen(
        [
            *FASTCONV,
            "train",
            "--data-dir",
            str(mnist_dir),
            *SMALL_RUN,
            "--checkpoint-every",
            "5",
            "--out",
            f"{name}.npz",
        ],
        cwd=workdir,
        env=env(workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(process, path, min_step, timeout=300):
    """Wait until the run's checkpoint is at step >= min_step of its first epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended first: {process.communicate()}"
        if path.exists():
            ckpt = io.load_checkpoint(path)  # atomic writes: always a whole file
            if ckpt.epoch == 0 and ckpt.step >= min_step:
                return ckpt
            assert ckpt.epoch == 0, "the run got past its first epoch before being interrupted"
        time.sleep(0.02)
    process.kill()
    raise AssertionError("no checkpoint in time")


def test_kill_and_resume_is_bit_for_bit(mnist_dir, workdir, reference_run):
    process = start_small_run(mnist_dir, workdir, "killed")
    checkpoint = workdir / "killed.ckpt.npz"
    ckpt = wait_for_checkpoint(process, checkpoint, min_step=10)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (workdir / "killed.npz").exists()
    assert 0 < ckpt.step < 47  # mid-epoch

    result = run("train", "--resume", checkpoint, "--threads", "1", "--quiet", tmp_path=workdir)
    assert result.stderr == ""
    assert same_weights(workdir / "killed.npz", reference_run)
    _, meta = io.load_model(workdir / "killed.npz")
    _, reference_meta = io.load_model(reference_run)
    for column in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert meta["history"][column] == reference_meta["history"][column]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(mnist_dir, workdir, reference_run):
    process = start_small_run(mnist_dir, workdir, "interrupted")
    checkpoint = workdir / "interrupted.ckpt.npz"
    wait_for_checkpoint(process, checkpoint, min_step=5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"checkpoint saved to {checkpoint.name}" in stderr
    assert f"resume with: fastconv train --resume {checkpoint.name}" in stderr
    ckpt = io.load_checkpoint(checkpoint)
    assert ckpt.epoch == 0 and ckpt.step >= 5

    # --resume without a path finds the checkpoint next to --out, and continues bit-for-bit.
    run("train", "--resume", "--out", "interrupted.npz", "--threads", "1", tmp_path=workdir)
    assert same_weights(workdir / "interrupted.npz", reference_run)


def test_resume_refuses_changed_settings(mnist_dir, workdir, reference_run):
    checkpoint = workdir / "reference.ckpt.npz"
    result = run("train", "--resume", checkpoint, "--lr", "0.1", tmp_path=workdir, check=False)
    assert_one_line_error(result, 1, "--lr 0.1 differs from the checkpoint's 0.002")


def test_predict_and_evaluate_take_an_onnx_file(model, digit_pngs, mnist_dir, workdir):
    pytest.importorskip("onnx", reason="onnx not installed: fastconv[onnx] not tested")
    from fastconv import onnx

    exported = workdir / "model.onnx"
    loaded, meta = io.load_model(model)
    onnx.save(loaded, exported, meta=meta)
    folder, _ = digit_pngs
    answers = [
        json.loads(run("predict", path, folder, "--top", "10", "--json", tmp_path=workdir).stdout)
        for path in (model, exported)
    ]
    for ours, theirs in zip(*answers):
        assert [t["label"] for t in ours["top"]] == [t["label"] for t in theirs["top"]]
        for a, b in zip(ours["top"], theirs["top"]):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    scores = [
        json.loads(
            run(
                "evaluate",
                path,
                "--data-dir",
                mnist_dir,
                "--limit",
                "500",
                "--no-download",
                "--json",
                tmp_path=workdir,
            ).stdout
        )
        for path in (model, exported)
    ]
    assert scores[0]["accuracy"] == pytest.approx(scores[1]["accuracy"], abs=1e-9)


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512dq", "avx512vl", "fma"} <= set(flags)


def test_info_names_the_micro_kernels_the_cpu_runs(tmp_path):
    info = json.loads(run("info", "--json", tmp_path=tmp_path).stdout)
    expected = "AVX-512" if _cpu_has_avx512() else "vector extensions"
    assert info["microkernels"].startswith(expected), info["microkernels"]
