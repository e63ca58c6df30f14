"""Process settings that must be in place before the kernels' first call.

Both are defaults the user can override from the environment, and both were measured here:
- OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE): the kernels' threads and BLAS's take
  turns on the same cores, and threads spinning after a parallel region steal the cores BLAS
  needs next (conv forward 3-5x slower on 2 cores). Read when the OpenMP runtime loads, so this
  runs before the kernels are imported.
- glibc keeps freed memory for reuse (M_TRIM_THRESHOLD 256 MiB, M_MMAP_THRESHOLD 32 MiB) unless
  MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ are set: a training step frees and allocates
  several multi-MB arrays, and memory handed back to the system page-faults again on the next
  step (max-pool backward 1.0 -> 0.7 ms, a LeNet step 5% faster).
"""

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def configure() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(M_TRIM_THRESHOLD, 256 << 20)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
