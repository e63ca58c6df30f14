"""Convolution memory stays bounded: the im2col workspace does not grow with the batch.

Workspaces are cached per thread (threading.local), so each measured call runs in a fresh
thread: its workspace is allocated inside the trace, and a workspace that grew with the batch
would show in the peak (a warm-up call in the measuring thread would hide it)."""

import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import fastconv as fc


def _peak_above_output(run) -> int:
    """Peak bytes NumPy allocated during run() in a fresh thread, beyond what run() returns."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with ThreadPoolExecutor(1) as pool:  # a new thread: no cached workspace
            out = pool.submit(run).result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    results = out if isinstance(out, tuple) else (out,)
    return peak - sum(r.nbytes for r in results if r is not None)


def test_conv_forward_workspace_is_bounded_for_a_large_batch():
    # issue 4: x (256, 64, 32, 32), w (64, 64, 3, 3), padding 1 must peak under 64 MB above
    # its inputs and output; a whole-batch im2col would need 600 MB.
    x = np.ones((256, 64, 32, 32), dtype=np.float32)
    w = np.ones((64, 64, 3, 3), dtype=np.float32)
    extra = _peak_above_output(lambda: fc.conv2d(x, w, padding=1))
    assert extra < 64 * 2**20, f"conv2d used {extra / 2**20:.0f} MB beyond its output"


def test_conv_backward_workspace_does_not_grow_with_the_batch():
    w = np.ones((32, 16, 3, 3), dtype=np.float32)
    extras = []
    for n in (8, 64):
        x = np.ones((n, 16, 32, 32), dtype=np.float32)
        grad = np.ones((n, 32, 32, 32), dtype=np.float32)
        extras.append(
            _peak_above_output(lambda g=grad, x=x: fc.conv2d_backward(g, x, w, padding=1))
        )
    # The measurement sees the workspace: at least one sample's im2col (16*9 rows x 32*32).
    one_sample_im2col = 16 * 9 * 32 * 32 * 4
    assert extras[0] >= one_sample_im2col, extras
    # 8x the batch: the workspace is per thread, so the extra memory stays the same
    assert extras[1] < extras[0] + 2**20, extras
