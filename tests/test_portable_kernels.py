"""The portable micro-kernels, transforms and pooling, run where the CPU would pick the AVX-512 ones:
FASTCONV_DISABLE_AVX512 is read once per process, so each check runs in a child process."""

import json
import os
import subprocess
import sys

import pytest

CHECK = r"""
import json, numpy as np, fastconv as fc
from fastconv import reference as ref
from fastconv import _conv
rng = np.random.default_rng(0)
errors = {}
for algo in ("winograd", "direct"):
    fc.set_conv_algorithm(algo)
    cases = [(2, 8, 9, 11, 20, 1, 1), (3, 16, 14, 14, 9, 0, 1), (1, 3, 6, 5, 33, 2, 1)]
    if algo == "direct":  # strides run on the shifted path too (phase planes)
        cases += [(2, 5, 13, 10, 12, 1, 2), (1, 4, 11, 12, 7, 0, 3)]
    for n, c, h, w, k, p, s in cases:
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        wt = rng.standard_normal((k, c, 3, 3), dtype=np.float32)
        y = fc.conv2d(x, wt, stride=s, padding=p)
        g = rng.standard_normal(y.shape, dtype=np.float32)
        gi, gw, _ = fc.conv2d_backward(g, x, wt, stride=s, padding=p)
        x64, w64, g64 = (a.astype(np.float64) for a in (x, wt, g))
        ey = ref.conv2d(x64, w64, stride=s, padding=p)
        egi, egw, _ = ref.conv2d_backward(g64, x64, w64, stride=s, padding=p)
        errors[f"{algo} {n, c, h, w, k, p, s}"] = max(
            float(np.abs(a - b).max() / np.abs(b).max()) for a, b in ((y, ey), (gi, egi), (gw, egw))
        )
mismatches = []  # max pooling 2x2 and relu: exact, NaNs included (torch's rules); avg 2x2 close
for n, c, h, w in [(2, 3, 8, 8), (1, 2, 7, 37), (3, 1, 5, 18), (1, 1, 2, 2), (1, 2, 9, 65)]:
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    x.reshape(-1)[rng.integers(x.size, size=3)] = np.nan
    x[..., 0, :2] = 1.5  # ties: the first in scan order wins
    out, idx = fc.max_pool2d(x, 2, return_indices=True)
    eout, eidx = ref.max_pool2d(x, 2, return_indices=True)
    values = fc.max_pool2d(x, 2)
    if not (np.array_equal(out, eout, equal_nan=True) and np.array_equal(idx, eidx)
            and np.array_equal(values, eout, equal_nan=True)):
        mismatches.append(f"max_pool2d {x.shape}")
    if not np.array_equal(fc.relu(x), ref.relu(x), equal_nan=True):
        mismatches.append(f"relu {x.shape}")
    finite = np.nan_to_num(x).astype(np.float32)
    out = fc.avg_pool2d(finite, 2)
    grad = rng.standard_normal(out.shape, dtype=np.float32)
    pairs = ((out, ref.avg_pool2d(finite.astype(np.float64), 2)),
             (fc.avg_pool2d_backward(grad, finite, 2),
              ref.avg_pool2d_backward(grad.astype(np.float64), finite.astype(np.float64), 2)))
    errors[f"avg_pool2d {x.shape}"] = max(
        float(np.abs(a - b).max() / np.abs(b).max()) for a, b in pairs
    )
print(json.dumps({"microkernels": _conv.microkernels, "errors": errors, "mismatches": mismatches}))
"""


@pytest.mark.parametrize("disable", [True, False])
def test_conv_matches_the_reference_on_both_kernel_sets(disable):
    env = dict(os.environ)
    env.pop("FASTCONV_DISABLE_AVX512", None)
    if disable:
        env["FASTCONV_DISABLE_AVX512"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if disable:
        assert not result["microkernels"].startswith("AVX-512"), result["microkernels"]
    assert result["mismatches"] == [], result["microkernels"]
    for case, error in result["errors"].items():
        assert error < 1e-5, f"{result['microkernels']}, {case}: error {error:.2e}"
