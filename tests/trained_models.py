"""Trained MNIST models and digit images shared by the plot, server and browser tests.

Models are trained with the ``fastconv train`` command itself (a subprocess), as a user would:

* :func:`small_model` -- 5,000 images, one epoch (about 95% on the test set), trained once per
  pytest session in its base temporary folder; good enough for pictures and API answers.
* :func:`good_model` -- the full training set, one epoch of the default recipe (about 98.5%),
  good enough to read digits drawn in a browser. It is cached across sessions in
  ``~/.cache/fastconv-test/`` (or ``$FASTCONV_TEST_CACHE``), keyed by the fastconv version;
  ``$FASTCONV_TEST_MODEL`` names a model file to use instead.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_ROOT

import fastconv

MNIST_DIR = DATA_ROOT / "mnist"


def need_mnist() -> Path:
    """The MNIST folder, or skip the test saying where the files were looked for."""
    if (
        not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()
        and not (MNIST_DIR / "t10k-images-idx3-ubyte").exists()
    ):
        pytest.skip(f"MNIST files not found in {MNIST_DIR} (set FASTCONV_DATA_DIR)")
    return MNIST_DIR


def fastconv_command(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m fastconv ARGS`` (the console script's code) and return the result."""
    return subprocess.run(
        [sys.executable, "-m", "fastconv", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def train_with_cli(out: Path, *options: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    result = fastconv_command(
        "train",
        "--data-dir",
        str(need_mnist()),
        "--no-download",
        "--quiet",
        "--out",
        str(out),
        *options,
    )
    assert result.returncode == 0, f"fastconv train failed:\n{result.stderr}"
    return out


def small_model(tmp_path_factory) -> Path:
    """A model trained on 5,000 images for one epoch, once per session."""
    path = tmp_path_factory.getbasetemp() / "trained" / "small.npz"
    if not path.exists():
        train_with_cli(
            path,
            "--limit",
            "5000",
            "--epochs",
            "1",
            "--val-size",
            "1000",
            "--no-test",
            "--checkpoint-every",
            "0",
        )
    return path


def good_model() -> Path:
    """A model that reads hand-drawn digits (>= 98% on MNIST), cached across sessions."""
    given = os.environ.get("FASTCONV_TEST_MODEL")
    if given:
        return Path(given)
    cache = Path(os.environ.get("FASTCONV_TEST_CACHE", Path.home() / ".cache" / "fastconv-test"))
    path = cache / f"mnist-1-epoch-{fastconv.__version__}.npz"
    if path.exists():
        try:
            fastconv.io.load_model(path)
            return path
        except ValueError:  # written by an older, incompatible format: train again
            path.unlink()
    train_with_cli(path, "--epochs", "1", "--checkpoint", str(path.with_suffix(".ckpt.npz")))
    path.with_suffix(".ckpt.npz").unlink(missing_ok=True)
    return path


def test_digits(count: int = 2000):
    """The first ``count`` MNIST test digits: pixels in [0, 1] ``(N, 1, 28, 28)`` and labels."""
    x, y = fastconv.datasets.mnist("test", data_dir=need_mnist(), download=False, normalize=False)
    return x[:count], y[:count]


test_digits.__test__ = False  # a helper, not a test


def png_bytes(pixels, scale: int = 1, invert: bool = False, fmt: str = "PNG") -> bytes:
    """One digit ``(1, H, W)`` or ``(H, W)`` in [0, 1] encoded as an image file's bytes;
    ``scale`` enlarges it, ``invert`` makes it dark ink on white paper."""
    from PIL import Image

    array = np.asarray(pixels, dtype=np.float32).reshape(np.shape(pixels)[-2:])
    if invert:
        array = 1 - array
    image = Image.fromarray(np.round(array * 255).astype(np.uint8))
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()
