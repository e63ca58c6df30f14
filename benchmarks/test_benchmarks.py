"""Every fastconv.bench case on every backend; grouped by case so each table is a side-by-side.

With --benchmark-disable (as CI runs it) each case runs once as a plain test, so none can rot.
Before it is timed, each case's result is checked against the NumPy reference (bench.check), so
a kernel that returns wrong numbers fails here even when nothing is timed.
"""

import pytest

from fastconv import bench

CASES = bench.cases()


@pytest.mark.parametrize("backend", bench.BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.operation} {c.shape}" for c in CASES])
def test_case(benchmark, case, backend):
    runner = case.make(backend)
    if runner is None:
        reason = "torch not installed" if backend == "torch" else f"no {backend} implementation"
        pytest.skip(reason)
    if backend != "reference":
        bench.check(case, runner)
    benchmark.group = f"{case.operation} {case.shape}"
    benchmark.extra_info.update(operation=case.operation, shape=case.shape, flops=case.flops)
    benchmark(runner)
