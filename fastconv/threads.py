"""How many threads the kernels use, in one place, coordinated with BLAS.

The OpenMP kernels and the BLAS product run one after the other, never at once, so both may use
every core; what must not happen is several Python threads (or MPI ranks) each asking for all
cores. `set_num_threads` sets the count for both pools; `FASTCONV_NUM_THREADS` sets it at import.
"""

from __future__ import annotations

import os

from . import _blas

_num_threads: int | None = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def get_num_threads() -> int:
    return _num_threads if _num_threads is not None else available_cores()


def set_num_threads(n: int) -> None:
    """Use n threads in fastconv's kernels, and set the BLAS library NumPy calls to match.

    When the kernels call BLAS themselves (the usual case, see fastconv._blas) they parallelise
    over samples with single-threaded GEMMs, and the BLAS pool only serves NumPy's own products
    (dense layers): it is set to one thread, which measured faster than n on small layers (its
    idle threads compete with the kernels' for the same cores). Otherwise BLAS gets n threads.
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    _num_threads = n
    # threadpoolctl imports only when asked: 7 ms of `import fastconv` otherwise
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1 if _blas.kernels_call_blas() else n, user_api="blas")


def _from_environment() -> None:
    """Apply FASTCONV_NUM_THREADS (called by fastconv/__init__ once the kernels are loaded)."""
    value = os.environ.get("FASTCONV_NUM_THREADS")
    if not value:
        return
    try:
        set_num_threads(int(value))
    except ValueError:
        raise ValueError(
            f"FASTCONV_NUM_THREADS: expected a positive integer, got {value!r}"
        ) from None
