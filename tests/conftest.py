"""Shared test machinery: the hypothesis profile, tolerances, random cases for every operation.

The case strategies build *valid* arguments (every output size >= 1) from a few drawn integers
and one seed for the array values, so hypothesis explores geometry, not float bit patterns.
Test modules import them with `from conftest import ...` (tests/ is on sys.path under pytest's
default import mode, and for `python tests/test_fuzz.py`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import fastconv._conv
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import fastconv

# Real MNIST / Fashion-MNIST: $FASTCONV_DATA_DIR, else ../shared/data beside the checkout.
DATA_ROOT = Path(
    os.environ.get("FASTCONV_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


# The debug build (.ci/sanitize: bounds checks, ASan, UBSan) runs many times slower: no
# wall-clock limit applies there, and outside it the limits are generous (they catch a hang or
# an accidental Python loop, not a slow machine).
SANITIZED = "sanitize" in (getattr(fastconv._conv, "cflags", "") or "")


def wall_clock_limit(seconds: float) -> float:
    """`seconds`, or no limit (inf) under the sanitizer build."""
    return float("inf") if SANITIZED else seconds


@pytest.fixture(autouse=True, scope="session")
def _outside_the_checkout(tmp_path_factory):
    """`python -m fastconv` and `python -c` put the working directory first on sys.path: run
    every test (and so every subprocess) from elsewhere, so they import the installed package,
    not the uncompiled source tree of the checkout."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


# Under CI=true every test must run: a skip fails the run unless its reason matches one of these
# patterns, each skip that is by design even in CI, with why. (CI installs every extra, torch and
# Chromium, and has the datasets: a missing one is a broken CI, not a reason to skip.)
CI = os.environ.get("CI", "").lower() == "true"
EXPECTED_SKIPS: dict[str, str] = {
    # "pattern": "why this skip is right even in CI"
    "is an editable install": "the unbuilt-checkout test needs a regular install; CI has one "
    "(the release wheel, and pip install . under the sanitizer build)",
}


def _unexpected_skip(report) -> str | None:
    """The reason of a skip that CI must not accept, else None."""
    if not (CI and report.skipped) or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if any(re.search(pattern, reason) for pattern in EXPECTED_SKIPS):
        return None
    return reason


def _fail_unexpected_skip(report) -> None:
    reason = _unexpected_skip(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true: {reason}\n(CI runs every test; a skip that "
            "is by design goes into EXPECTED_SKIPS in tests/conftest.py)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level importorskip skips at collection: the same rule applies there."""
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


# Deterministic runs: the same examples every time, nothing written to .hypothesis/.
settings.register_profile(
    "fastconv",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("fastconv")

# Tolerance relative to the largest magnitude of the expected output.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_close(actual, expected, rtol: float | None = None, what: str = "") -> None:
    """Same shape and dtype; values equal within rtol * max|expected| (NaN and inf where expected)."""
    expected = np.asarray(expected)
    assert isinstance(actual, np.ndarray), f"{what}: expected an ndarray, got {type(actual)}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.dtype.kind != "f":
        np.testing.assert_array_equal(actual, expected, err_msg=what)
        return
    finite = expected[np.isfinite(expected)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    tol = (RTOL[expected.dtype] if rtol is None else rtol) * (scale if scale > 0 else 1.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol, equal_nan=True, err_msg=what)


def assert_results_close(actual, expected, rtol: float | None = None) -> None:
    """assert_close over a result that may be a tuple (with None for skipped gradients)."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected)
        for k, (a, e) in enumerate(zip(actual, expected)):
            if e is None:
                assert a is None, f"result {k}: expected None"
            else:
                assert_close(a, e, rtol, what=f"result {k}")
    else:
        assert_close(actual, expected, rtol)


def random_array(seed: int, shape, dtype) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter: a crash there fails one test instead of the whole run."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def workspace_limit():
    """Yields fastconv.set_workspace_limit; the previous limit comes back afterwards."""
    before = fastconv.workspace_limit()
    yield fastconv.set_workspace_limit
    fastconv.set_workspace_limit(before)


# --- random valid cases ----------------------------------------------------------------------


@dataclass
class Case:
    """A call's arguments: `fn(*args, **kwargs)`; `dtype` is the input's."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.args[0].dtype

    def __repr__(self) -> str:  # hypothesis prints this on failure: shapes, not values
        shown = [
            f"array{a.shape}:{a.dtype}" if isinstance(a, np.ndarray) else repr(a) for a in self.args
        ]
        return f"Case(args=({', '.join(shown)}), kwargs={self.kwargs})"


dtypes = st.sampled_from([np.float32, np.float64])


def _int_or_pair(draw, values):
    """Draw a (h, w) pair; pass it as an int when both agree and a coin says so, else a tuple."""
    h, w = draw(values), draw(values)
    return h if h == w and draw(st.booleans()) else (h, w)


def _as_pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _size(draw, needed: int, extra: int = 4) -> int:
    """An input size for which the (dilated) window fits: at least `needed`, at least 1."""
    return max(1, needed) + draw(st.integers(0, extra))


@st.composite
def conv_cases(draw, max_batch: int = 3, max_channels: int = 3, bias=None):
    dtype = draw(dtypes)
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, max_channels))
    c_out = groups * draw(st.integers(1, max_channels))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = _int_or_pair(draw, st.integers(1, 3))
    dh, dw = _as_pair(dilation)
    kind = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    if kind == "same":
        padding, stride, total = "same", 1, (dh * (kh - 1), dw * (kw - 1))
    else:
        stride = _int_or_pair(draw, st.integers(1, 3))
        if kind == "valid":
            padding, total = "valid", (0, 0)
        else:
            padding = (
                draw(st.integers(0, 2))
                if kind == "int"
                else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
            )
            total = tuple(2 * p for p in _as_pair(padding))
    h = _size(draw, dh * (kh - 1) + 1 - total[0])
    w = _size(draw, dw * (kw - 1) + 1 - total[1])
    n = draw(st.integers(0, max_batch))
    seed = draw(st.integers(0, 2**32 - 1))
    x = random_array(seed, (n, c_in, h, w), dtype)
    weight = random_array(seed + 1, (c_out, c_in // groups, kh, kw), dtype)
    with_bias = draw(st.booleans()) if bias is None else bias
    b = random_array(seed + 2, (c_out,), dtype) if with_bias else None
    return Case(
        (x, weight, b), dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    )


@st.composite
def pool_cases(
    draw, kind: str = "max", max_batch: int = 3, max_channels: int = 3, empty_windows: bool = True
):
    """max_pool2d / avg_pool2d arguments. With empty_windows=False no max window can lie in the
    padding only (that needs dilation larger than the input)."""
    dtype = draw(dtypes)
    kernel_size = _int_or_pair(draw, st.integers(1, 4))
    kh, kw = _as_pair(kernel_size)
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    stride = draw(
        st.one_of(st.none(), st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))
    )
    kwargs = dict(
        kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=draw(st.booleans())
    )
    dh = dw = 1
    if kind == "max":
        kwargs["dilation"] = _int_or_pair(draw, st.integers(1, 3))
        dh, dw = _as_pair(kwargs["dilation"])
    else:
        kwargs["count_include_pad"] = draw(st.booleans())
    h = _size(draw, max(dh * (kh - 1) + 1 - 2 * padding[0], 1 if empty_windows else dh))
    w = _size(draw, max(dw * (kw - 1) + 1 - 2 * padding[1], 1 if empty_windows else dw))
    n, c = draw(st.integers(0, max_batch)), draw(st.integers(1, max_channels))
    x = random_array(draw(st.integers(0, 2**32 - 1)), (n, c, h, w), dtype)
    if kind == "max" and draw(st.booleans()):  # NaN and inf, as torch handles them
        flat = x.reshape(-1)
        special = draw(st.lists(st.integers(0, max(flat.size - 1, 0)), max_size=4))
        for k, position in enumerate(special):
            if flat.size:
                flat[position] = (np.nan, np.inf, -np.inf)[k % 3]
    return Case((x,), kwargs)


@st.composite
def unfold_cases(draw, max_batch: int = 3):
    dtype = draw(dtypes)
    kernel_size = _int_or_pair(draw, st.integers(1, 4))
    dilation = _int_or_pair(draw, st.integers(1, 3))
    padding = _int_or_pair(draw, st.integers(0, 2))
    stride = _int_or_pair(draw, st.integers(1, 3))
    (kh, kw), (dh, dw), (ph, pw) = _as_pair(kernel_size), _as_pair(dilation), _as_pair(padding)
    h = _size(draw, dh * (kh - 1) + 1 - 2 * ph)
    w = _size(draw, dw * (kw - 1) + 1 - 2 * pw)
    n, c = draw(st.integers(0, max_batch)), draw(st.integers(1, 3))
    x = random_array(draw(st.integers(0, 2**32 - 1)), (n, c, h, w), dtype)
    return Case(
        (x,), dict(kernel_size=kernel_size, dilation=dilation, padding=padding, stride=stride)
    )


def blocks(size: int, kernel: int, dilation: int, padding: int, stride: int) -> int:
    """Number of sliding positions along one axis (torch's unfold/fold formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@st.composite
def fold_cases(draw, max_batch: int = 3):
    """fold's (input, output_size) plus kwargs; input has exactly the L that output_size implies."""
    case = draw(unfold_cases(max_batch))
    x = case.args[0]
    k, d, p, s = (
        _as_pair(case.kwargs[name]) for name in ("kernel_size", "dilation", "padding", "stride")
    )
    length = blocks(x.shape[2], k[0], d[0], p[0], s[0]) * blocks(x.shape[3], k[1], d[1], p[1], s[1])
    shape = (x.shape[0], x.shape[1] * k[0] * k[1], length)
    cols = random_array(draw(st.integers(0, 2**32 - 1)), shape, x.dtype)
    output_size = x.shape[2:] if draw(st.booleans()) else list(x.shape[2:])
    return Case((cols, output_size), dict(case.kwargs))
