"""The benchmark suite: the cases of fastconv.bench, timed by pytest-benchmark.

    pytest benchmarks/ --benchmark-only --benchmark-json=results.json
    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:case   # side by side

OPENBLAS_CORETYPE pinned to an older core makes NumPy's sgemm several times slower: unset it
(and OPENBLAS_L2_SIZE) when measuring.
"""
