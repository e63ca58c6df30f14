"""Find the CBLAS GEMM of the BLAS library NumPy loaded, so the kernels can call it without the GIL.

Using NumPy's own BLAS keeps one BLAS (and one thread pool) in the process and adds no dependency.
NumPy's PyPI wheels bundle OpenBLAS with 64-bit integers and prefixed names; distribution builds
link a plain CBLAS. When no GEMM symbol is found, functional falls back to NumPy's matmul.
"""

from __future__ import annotations

import ctypes
import os

from . import _conv

# (sgemm symbol, dgemm symbol, 64-bit integers), most specific first
_CANDIDATES = [
    ("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", True),
    ("cblas_sgemm64_", "cblas_dgemm64_", True),
    ("cblas_sgemm", "cblas_dgemm", False),
]
_THREAD_SETTER = "openblas_set_num_threads_local"


def _loaded_libraries() -> list[str]:
    """Shared libraries mapped into this process whose name suggests a BLAS (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if any(k in p.lower() for k in ("blas", "mkl", "flexiblas")))


def find_gemm() -> tuple[int, int, bool, int, str] | None:
    """(sgemm address, dgemm address, ilp64, per-thread thread-count setter or 0, library path)."""
    import numpy  # noqa: F401  (makes sure NumPy's BLAS is loaded)

    for path in _loaded_libraries():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for sname, dname, ilp64 in _CANDIDATES:
            try:
                sgemm, dgemm = getattr(library, sname), getattr(library, dname)
            except AttributeError:
                continue
            sgemm_address = ctypes.cast(sgemm, ctypes.c_void_p).value
            dgemm_address = ctypes.cast(dgemm, ctypes.c_void_p).value
            if not sgemm_address or not dgemm_address:  # a symbol at NULL: no function to call
                continue
            setter = getattr(library, _THREAD_SETTER, None)
            address = ctypes.cast(setter, ctypes.c_void_p).value if setter is not None else 0
            return (sgemm_address, dgemm_address, ilp64, address or 0, path)
    return None


_kernels_call_blas: bool | None = None


def kernels_call_blas() -> bool:
    """Whether the kernels call BLAS themselves (else each batch chunk goes through np.matmul).

    Decided once, on first use: FASTCONV_BLAS=numpy forces the matmul path.
    """
    global _kernels_call_blas
    if _kernels_call_blas is None:
        found = None if os.environ.get("FASTCONV_BLAS") == "numpy" else find_gemm()
        if found is not None:
            _conv.use_blas(*found[:4])
        _kernels_call_blas = found is not None
    return _kernels_call_blas
