"""Thread count: settable, from the environment, coordinated with BLAS."""

import subprocess
import sys

import pytest

import fastconv as fc
from fastconv import _blas


@pytest.fixture
def restore_threads():
    before = fc.get_num_threads()
    yield
    fc.set_num_threads(before)


def _blas_threads():
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_set_num_threads_sets_kernels_and_blas_together(restore_threads):
    fc.set_num_threads(2)
    assert fc.get_num_threads() == 2
    # the kernels parallelise over samples with single-threaded GEMMs: BLAS's own pool is idle
    expected = 1 if _blas.kernels_call_blas() else 2
    assert set(_blas_threads()) == {expected}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="n: expected a positive int"):
        fc.set_num_threads(bad)


def test_environment_variable(tmp_path):
    code = "import fastconv as fc; print(fc.get_num_threads())"
    run = lambda value: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"FASTCONV_NUM_THREADS": value, "PATH": ""},
    )
    assert run("1").stdout.strip() == "1"
    bad = run("many")
    assert bad.returncode != 0 and "FASTCONV_NUM_THREADS" in bad.stderr
