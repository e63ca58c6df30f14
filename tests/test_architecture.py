"""What a user meets before any kernel runs: torch's keyword names, and a clear word from a
checkout that was never built."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastconv as fc

torch = pytest.importorskip("torch", reason="torch not installed: keyword parity not checked")
F = torch.nn.functional


def test_functional_api_takes_torchs_keyword_names():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
    cases = [
        (
            fc.conv2d,
            F.conv2d,
            dict(weight=w, bias=b, stride=1, padding=1),
            dict(weight=tw, bias=tb, stride=1, padding=1),
        ),
        (fc.max_pool2d, F.max_pool2d, dict(kernel_size=2, stride=2), dict(kernel_size=2, stride=2)),
        (
            fc.avg_pool2d,
            F.avg_pool2d,
            dict(kernel_size=3, stride=2, padding=1),
            dict(kernel_size=3, stride=2, padding=1),
        ),
        (fc.unfold, F.unfold, dict(kernel_size=2, stride=1), dict(kernel_size=2, stride=1)),
    ]
    for ours, theirs, kwargs, torch_kwargs in cases:
        got = ours(input=x, **kwargs)
        expected = theirs(input=tx, **torch_kwargs).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=ours.__name__)


def test_importing_an_unbuilt_checkout_says_what_to_run(tmp_path):
    package = Path(fc.__file__).parent
    shutil.copytree(package, tmp_path / "fastconv", ignore=shutil.ignore_patterns("*.so", "*.pyd"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # As `python -c "import fastconv"` in the checkout's root.
    script = "import fastconv; print(fastconv._conv.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode == 0 and not result.stdout.strip().startswith(str(tmp_path)):
        pytest.skip(
            "fastconv is an editable install: its finder added the built kernels "
            f"({result.stdout.strip()}) to the copy's package path"
        )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastconv's compiled kernels are missing"), last
    assert "pip install -e ." in last and "circular import" not in result.stderr
