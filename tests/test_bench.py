"""fastconv.bench and `fastconv bench` on tiny selections: every timed result is checked against
the reference first (a kernel returning zeros fails), and the table and JSON have their rows."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fastconv import bench, functional


def _case(operation):
    return next(c for c in bench.cases() if c.operation == operation)


@pytest.mark.parametrize(
    "operation", ["conv forward", "max pool forward", "unfold", "LeNet inference"]
)
def test_check_passes_for_the_real_kernels(operation):
    case = _case(operation)
    bench.check(case, case.make("fastconv"))


@pytest.mark.parametrize(
    "operation, kernel",
    [
        ("conv forward", "conv2d"),
        ("conv backward", "conv2d_backward"),
        ("max pool forward", "max_pool2d"),
        ("unfold", "unfold"),
        ("LeNet inference", "_conv2d_max_pool2d"),  # Sequential fuses conv + pool there
    ],
)
def test_check_fails_for_a_kernel_returning_zeros(monkeypatch, operation, kernel):
    """What benchmarks/test_benchmarks.py runs before timing: it must catch a zeroing kernel."""
    real = getattr(functional, kernel)

    def zeros(*args, **kwargs):
        result = real(*args, **kwargs)
        if isinstance(result, tuple):
            return tuple(np.zeros_like(r) if isinstance(r, np.ndarray) else r for r in result)
        return np.zeros_like(result)

    monkeypatch.setattr(functional, kernel, zeros)
    case = _case(operation)
    with pytest.raises(AssertionError):
        bench.check(case, case.make("fastconv"))


def test_run_checks_each_row_before_timing(monkeypatch):
    monkeypatch.setattr(
        functional, "fold", lambda cols, *a, **k: np.zeros((64, 32, 14, 14), cols.dtype)
    )
    with pytest.raises(AssertionError, match="fold"):
        bench.run(budget=0.001, backends=("fastconv", "reference"), selected=["fold"])


def test_run_rows_and_ceiling():
    rows, ceiling = bench.run(budget=0.001, backends=("fastconv", "reference"), selected=["unfold"])
    assert ceiling > 0 and np.isfinite(ceiling)
    assert [r["operation"] for r in rows] == ["unfold"]
    row = rows[0]
    assert row["fastconv_ms"] > 0 and row["reference_ms"] > 0
    assert row["speedup_vs_reference"] == pytest.approx(row["reference_ms"] / row["fastconv_ms"])
    assert row["speedup_vs_torch"] is None and row["gflops"] is None  # no torch; not FLOP-bound
    table = bench.format_table(rows, ceiling).splitlines()
    assert table[0].split()[:2] == ["operation", "shape"] and table[2].startswith("unfold")
    assert f"{ceiling:.0f} GFLOP/s" in table[-1]


def test_bench_command_writes_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastconv",
            "bench",
            "--only",
            "unfold",
            "--budget",
            "0.001",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and data["sgemm_gflops"] > 0
    assert [r["operation"] for r in data["rows"]] == ["unfold"]
    assert data["rows"][0]["fastconv_ms"] > 0
    assert "unfold" in result.stdout and "sgemm ceiling" in result.stdout


def test_lenet_rows_name_the_fused_f2_path_not_f4():
    # conv2 (32->64 at 14x14) is fused with its pooling, which runs F(2x2) whatever the shape
    x = np.zeros((1, 1, 28, 28), np.float32)
    names = bench._model_algorithms(bench.fastconv_lenet(), x).split("+")
    assert names[0] == "direct" and names[1] in ("winograd", "direct")
