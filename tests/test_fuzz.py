"""Fuzzing every public function: any input gives the reference's result or a clear exception.

hypothesis throws random shapes, strides, paddings, dilations, groups, dtypes (int, bool, complex,
float16, big-endian, object), memory layouts (Fortran order, strided and negative-stride views,
zero-stride broadcasts, read-only arrays, nested lists), zero-size and huge dimensions, and bad
parameter values at all eight functions. Each call must either

- return what fastconv.reference returns (same dtype, values within the dtype's tolerance), or
- raise ValueError, TypeError or MemoryError where the reference refuses, with a message that
  starts with the name of one of the function's arguments,

and leave its inputs unchanged. It runs in a subprocess (`python tests/test_fuzz.py --worker N`)
so that a segfault or a hang fails this test instead of killing the test run; the worker prints
each case before running it, so the last line printed names the case that crashed. The worker
caps its address space so that a request that slipped through validation fails fast instead of
exhausting the machine.

FASTCONV_FUZZ_EXAMPLES sets the number of random cases (default 1500; CI runs 10000).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np

DEFAULT_EXAMPLES = 1500
ALLOWED = (ValueError, TypeError, MemoryError)
FUNCTIONS = [
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "unfold",
    "fold",
]
SLOW_CASE_SECONDS = 5.0


def test_fuzz_every_public_function_in_a_subprocess():
    examples = int(os.environ.get("FASTCONV_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
    timeout = 120 + 0.1 * examples
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(examples)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        last = (err.stdout or b"").decode(errors="replace").strip().splitlines()[-3:]
        shown = "\n".join(last)
        raise AssertionError(
            f"fuzz worker hung (> {timeout:.0f} s); last cases started:\n{shown}"
        ) from None
    last_cases = "\n".join(proc.stdout.strip().splitlines()[-3:])
    assert proc.returncode == 0, (
        f"fuzz worker failed with return code {proc.returncode}"
        + (f" (killed by signal {-proc.returncode}: a crash)" if proc.returncode < 0 else "")
        + f"\nlast cases started:\n{last_cases}\nstderr:\n{proc.stderr[-6000:]}"
    )
    ran = re.search(r"^fuzz cases run: (\d+)$", proc.stdout, re.MULTILINE)
    assert ran, f"worker printed no case count:\n{proc.stdout[-2000:]}"
    assert int(ran.group(1)) >= examples, f"only {ran.group(1)} of {examples} cases ran"


# --- the worker -------------------------------------------------------------------------------


def worker(examples: int) -> None:
    import resource

    from conftest import assert_results_close, wall_clock_limit
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import fastconv as fc
    from fastconv import reference as ref

    limit = 6 * 2**30  # address space: far above what these small cases (and BLAS's buffers) need
    if "asan" not in os.environ.get("LD_PRELOAD", ""):  # AddressSanitizer reserves terabytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    counter = {"cases": 0}
    outcomes = {}  # (function, "result" or exception name) -> count
    timings = []  # (seconds in fastconv, case)
    slow = []

    def call(module, name, args, kwargs):
        try:
            return getattr(module, name)(*args, **kwargs), None
        except Exception as err:  # noqa: BLE001 - classified by the caller
            return None, err

    def check(case) -> None:
        name, args, kwargs, description = case
        counter["cases"] += 1
        print(f"{counter['cases']}: {description}", flush=True)
        snapshots = [
            (a, a.copy())
            for a in args
            if isinstance(a, np.ndarray) and a.dtype != object and a.size < 10**6
        ]
        ref_kwargs = {k: v for k, v in kwargs.items() if k != "output_mask"}
        expected, ref_error = call(ref, name, args, ref_kwargs)
        start = time.perf_counter()
        got, error = call(fc, name, args, kwargs)
        elapsed = time.perf_counter() - start
        timings.append((elapsed, description))
        if elapsed > wall_clock_limit(SLOW_CASE_SECONDS):
            slow.append(description)
        outcome = "result" if error is None else type(error).__name__
        outcomes[(name, outcome)] = outcomes.get((name, outcome), 0) + 1
        for array, before in snapshots:
            np.testing.assert_array_equal(array, before, err_msg=f"{name} wrote into its input")
        if error is not None and not isinstance(error, ALLOWED):
            raise AssertionError(f"{name} raised {type(error).__name__}: {error}") from error
        if ref_error is not None and not isinstance(ref_error, ALLOWED):
            what = f"{type(ref_error).__name__}: {ref_error}"
            raise AssertionError(f"reference.{name} raised {what}") from ref_error
        if ref_error is not None and not _from_validation(ref_error):
            # The reference pads by copying: with a huge padding NumPy refuses the copy
            # (MemoryError, or ValueError "array is too big"). No oracle; the kernels need none.
            if error is None:
                first = got[0] if isinstance(got, tuple) else got
                assert first.dtype == _dtype_of(args[1] if name.endswith("backward") else args[0])
            return
        if ref_error is not None:
            # The reference shares fastconv's checks (_args), so it only says "refuse"; what the
            # refusal says is checked against the function's own signature instead.
            assert error is not None, (
                f"{name} returned a result where the reference raised {ref_error!r}"
            )
            assert _names_an_argument(name, error), f"{name}: unclear refusal {error!r}"
            return
        assert error is None, f"{name} raised {error!r} where the reference returned a result"
        if name == "conv2d_backward":
            expected = tuple(
                e if wanted else None for e, wanted in zip(expected, kwargs["output_mask"])
            )
        assert_results_close(got, expected)

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(fuzz_cases(st))
    def fuzz(case):
        check(case)

    for name, args, kwargs in explicit_cases():
        check((name, args, kwargs, label(name, args, kwargs)))
    fuzz()
    if slow:
        raise AssertionError(f"{len(slow)} cases took over {SLOW_CASE_SECONDS} s, e.g. {slow[0]}")
    for seconds, case in sorted(timings, reverse=True)[:5]:
        print(f"slowest {seconds:.3f} s: {case}")
    for (name, outcome), count in sorted(outcomes.items()):
        print(f"outcome {name} {outcome}: {count}")
    print(f"fuzz cases run: {counter['cases']}", flush=True)


def _names_an_argument(function: str, error: BaseException) -> bool:
    """Whether the message starts with one of the function's arguments ("x" is the input; a
    size check names the workspace or the output it would need)."""
    import inspect

    import fastconv as fc

    found = re.match(r"([a-z_]+): ", str(error))
    allowed = set(inspect.signature(getattr(fc, function)).parameters) | {
        "x",
        "workspace",
        "output",
    }
    return found is not None and found.group(1) in allowed


def _from_validation(error: BaseException) -> bool:
    """Whether error is one of fastconv's refusals: they start with the argument's name."""
    return re.match(r"[a-z_]+: ", str(error)) is not None


def _dtype_of(array_like):
    return np.asarray(array_like).dtype


# --- what the worker throws ----------------------------------------------------------------

FLOATS = [np.float32, np.float64]
OTHER_DTYPES = [
    np.float16,
    np.int32,
    np.int64,
    np.uint8,
    bool,
    np.complex64,
    np.complex128,
    np.dtype(">f8"),
    np.dtype(">f4"),
    object,
]
BAD_PARAMETERS = [
    -1,
    0,
    1.5,
    2.0,
    None,
    "2",
    True,
    (1,),
    (1, 2, 3),
    (2, -1),
    [],
    2**31 - 1,
    2**31,
    2**40,
    2**63,
    2**64,
    10**30,
    np.float64(1.0),
]
GOOD_ODDITIES = [np.int64(2), [1, 2], (2, 1), np.array([1, 2]), np.uint8(1)]
HUGE_SHAPES = [
    (1, 1, 10**6, 10**6),
    (2**40, 1, 4, 4),
    (1, 2**30, 64, 64),
    (4, 2**35, 4, 4),
    (1, 3, 2**45, 1),
    (2**60, 1, 1, 1),
]


def label(name, args, kwargs) -> str:
    """A one-line description of a call: shapes, dtypes and strides, not values."""
    shown = []
    for a in args:
        if isinstance(a, np.ndarray):
            shown.append(
                f"array{a.shape}:{a.dtype}:strides{a.strides}"
                + ("" if a.flags.writeable else ":read-only")
            )
        elif isinstance(a, list):
            shown.append(f"list(shape {np.shape(a)})" if a and isinstance(a[0], list) else repr(a))
        else:
            shown.append(repr(a))
    return f"{name}({', '.join(shown)}, **{kwargs!r})"


def explicit_cases():
    """Cases every run starts with, whatever hypothesis draws: every function with a huge input,
    with every unsupported dtype, and the max-pool windows that hold no input element."""
    huge = np.broadcast_to(np.float32(1), (1, 1, 10**6, 10**6))
    huge_grad = np.broadcast_to(np.float32(1), (1, 1, 10**6 - 2, 10**6 - 2))
    weight = np.ones((1, 1, 3, 3), np.float32)
    yield "conv2d", (huge, weight, None), {}
    yield "conv2d_backward", (huge_grad, huge, weight), dict(output_mask=(True, True, True))
    yield "max_pool2d", (huge, 3), dict(stride=1)
    yield "max_pool2d_backward", (huge_grad, huge, 3), dict(stride=1)
    yield "avg_pool2d", (huge, 3), dict(stride=1)
    yield "avg_pool2d_backward", (huge_grad, huge, 3), dict(stride=1)
    yield "unfold", (huge, 3), {}
    yield "fold", (np.ones((1, 1, 1), np.float32), (10**6, 10**6), 1), dict(stride=10**6)

    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((4, 3, 3, 3))
    valid = {
        "conv2d": ((x, weight, None), dict(padding=1)),
        "conv2d_backward": (
            (np.ones((2, 4, 5, 5)), x, weight),
            dict(padding=1, output_mask=(1, 1, 1)),
        ),
        "max_pool2d": ((x,), dict(kernel_size=2, return_indices=True)),
        "max_pool2d_backward": ((np.ones((2, 3, 2, 2)), x), dict(kernel_size=2)),
        "avg_pool2d": ((x,), dict(kernel_size=2)),
        "avg_pool2d_backward": ((np.ones((2, 3, 2, 2)), x), dict(kernel_size=2)),
        "unfold": ((x,), dict(kernel_size=2)),
        "fold": ((np.ones((2, 12, 16)), (5, 5)), dict(kernel_size=2)),
    }
    for name, (args, kwargs) in valid.items():
        yield name, args, kwargs
        for dtype in OTHER_DTYPES:  # all arrays in the unsupported dtype
            cast = tuple(a.astype(dtype) if isinstance(a, np.ndarray) else a for a in args)
            yield name, cast, kwargs

    read_only = x.copy()
    read_only.flags.writeable = False
    for mask in [(False, True, True), (False, False, False)]:
        yield (
            "conv2d_backward",
            (np.ones((2, 4, 5, 5)), read_only, weight),
            dict(padding=1, output_mask=mask),
        )
    yield "max_pool2d_backward", (np.ones((0, 3, 2, 2)), np.ones((0, 3, 5, 5))), dict(kernel_size=2)

    empty_window = dict(kernel_size=2, stride=2, padding=1, dilation=3)  # rows {-1, 2} of 2
    x = rng.standard_normal((2, 3, 2, 5))
    yield "max_pool2d", (x,), dict(empty_window, return_indices=True)
    yield "max_pool2d_backward", (np.ones((2, 3, 1, 2)), x), empty_window
    none_seen = np.full((2, 3, 1, 2), -1)
    yield "max_pool2d_backward", (np.ones((2, 3, 1, 2)), x), dict(empty_window, indices=none_seen)


def fuzz_cases(st):
    """The strategy (hypothesis passed in so this module imports without it).

    Every choice's simplest draw (what hypothesis shrinks towards) is the ordinary one; each odd
    or bad variation is rare on its own, so that about half of all calls are valid and compared
    with the reference, the rest refused. The helpers take hypothesis's `draw` and build no
    strategies of their own: generating a case costs about as much as running it.
    """
    from functools import lru_cache

    ints = lru_cache(maxsize=None)(st.integers)

    def pick(draw, options):
        return options[draw(ints(0, len(options) - 1))]

    def rare(draw, one_in):
        return draw(ints(0, one_in - 1)) == one_in - 1

    def parameter(draw, low, high, extra=()):
        """Mostly a valid int or pair; sometimes an odd-but-valid form, a bad value, a huge one."""
        kind = draw(ints(0, 99))
        if kind < 90:
            a = draw(ints(low, high))
            return (a, draw(ints(low, high))) if draw(ints(0, 1)) else a
        if kind < 93:
            return pick(draw, GOOD_ODDITIES)
        return pick(draw, BAD_PARAMETERS + list(extra))

    def extent(draw, window):
        """An input size: usually the window plus a little, sometimes anything from 0 to 7."""
        if rare(draw, 10):
            return draw(ints(0, 7))
        return max(window, 1) + draw(ints(0, 4))

    def values(draw, shape, special=False):
        rng = np.random.default_rng(draw(ints(0, 2**32 - 1)))
        a = rng.standard_normal(shape)
        if special and a.size and rare(draw, 5):
            a.reshape(-1)[rng.integers(0, a.size, 3)] = [np.nan, np.inf, -np.inf]
        return a

    def arrange(draw, a, dtype):
        """a as dtype (rarely another one), in one of the layouts an array can come in."""
        if rare(draw, 40):
            dtype = pick(draw, OTHER_DTYPES + FLOATS)
        a = a.astype(object) if dtype is object else a.astype(dtype)
        layout = pick(
            draw,
            ["c", "c", "c", "f", "strided", "negative", "broadcast", "list", "read-only", "0-d"],
        )
        if layout == "f":
            return np.asfortranarray(a)
        if layout == "strided" and a.ndim:
            big = np.zeros(tuple(2 * s + 1 for s in a.shape), dtype=a.dtype)
            view = big[tuple(slice(1, None, 2) for _ in a.shape)]
            view[...] = a
            return view
        if layout == "negative" and a.ndim:
            return a[tuple(slice(None, None, -1) for _ in a.shape)]
        if layout == "broadcast" and a.ndim and a.shape[-1] > 0:
            return np.broadcast_to(a[..., :1], a.shape)  # zero strides along the last axis
        if layout == "list" and a.size < 2000 and dtype is not object:
            return a.tolist()
        if layout == "read-only":
            a = a.copy()
            a.flags.writeable = False
            return a
        if layout == "0-d" and a.size and rare(draw, 10):
            return a.reshape(-1)[:1].reshape(())
        return a

    def batch_shape(draw, channels, height, width):
        """(N, C, H, W) mostly, N possibly 0; unbatched (C, H, W) often; a wrong ndim rarely."""
        if rare(draw, 25):
            return pick(draw, [(height, width), (1, 1, channels, height, width), (channels,)])
        if rare(draw, 4):
            return (channels, height, width)
        return (pick(draw, [1, 2, 3, 0]), channels, height, width)

    def input_array(draw, dtype, channels, height, width, special=True):
        if rare(draw, 50):  # a zero-stride view far larger than memory
            return np.broadcast_to(np.float32(1), pick(draw, HUGE_SHAPES))
        if rare(draw, 25):
            channels = 0
        shape = batch_shape(draw, channels, height, width)
        return arrange(draw, values(draw, shape, special), dtype)

    def forward(fn, *args, **kwargs):
        """The reference forward's result (to build backward inputs from), or None if invalid."""
        from fastconv import reference as ref

        try:
            return getattr(ref, fn)(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an invalid case: the backward gets random inputs
            return None

    def gradient(draw, output, dtype, fallback):
        """A grad_output: the forward output's shape mostly, else a wrong one."""
        shape = fallback if output is None or rare(draw, 20) else output.shape
        if len(shape) and rare(draw, 20):
            shape = tuple(shape[:-1]) + (shape[-1] + 1,)
        return arrange(draw, values(draw, shape), dtype)

    def small(value, default, high=3):
        """value if it is a small valid int, else default: for sizing inputs to fit a window."""
        ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= high
        return value if ok else default

    def pair(value):
        if isinstance(value, (tuple, list, np.ndarray)) and len(value) == 2:
            return tuple(value)
        return (value, value)

    def conv(draw, name, dtype):
        groups = draw(ints(1, 3)) if not rare(draw, 20) else pick(draw, [0, -1, 2.0, True, 2**40])
        g = small(groups, 1)
        per_group = draw(ints(1, 3)) if not rare(draw, 30) else 0
        c_in = g * per_group + rare(draw, 20)
        c_out = g * draw(ints(1, 3)) + rare(draw, 20)
        kernel = (draw(ints(1, 4)), draw(ints(1, 4)))
        dilation = parameter(draw, 1, 3)
        d = [small(v, 1) for v in pair(dilation)]
        x = input_array(
            draw,
            dtype,
            c_in,
            extent(draw, d[0] * (kernel[0] - 1) + 1),
            extent(draw, d[1] * (kernel[1] - 1) + 1),
        )
        weight = arrange(draw, values(draw, (c_out, per_group) + kernel), dtype)
        padding = (
            pick(draw, ["same", "valid"])
            if rare(draw, 4)
            else parameter(draw, 0, 2, ("bogus", "SAME"))
        )
        same = isinstance(padding, str) and padding == "same"
        stride = 1 if same and not rare(draw, 5) else parameter(draw, 1, 3)
        kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        if name == "conv2d":
            if draw(ints(0, 1)):
                return (x, weight, None), kwargs
            bias = values(draw, (c_out + rare(draw, 20),))
            return (x, weight, arrange(draw, bias, dtype)), kwargs
        grad = gradient(draw, forward("conv2d", x, weight, **kwargs), dtype, (1, c_out, 2, 2))
        kwargs["output_mask"] = tuple(bool(draw(ints(0, 1))) for _ in range(3))
        return (grad, x, weight), kwargs

    def pool(draw, name, dtype):
        kernel_size = parameter(draw, 1, 4)
        k = [small(v, 4, high=4) for v in pair(kernel_size)]
        padding = (draw(ints(0, k[0] // 2)), draw(ints(0, k[1] // 2)))
        if rare(draw, 10):
            padding = parameter(draw, 0, 3)
        stride = None if draw(ints(0, 1)) else parameter(draw, 1, 3)
        kwargs = dict(
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            ceil_mode=bool(draw(ints(0, 1))),
        )
        is_max = name.startswith("max")
        d = (1, 1)
        if is_max:
            kwargs["dilation"] = parameter(draw, 1, 3)
            d = [small(v, 1) for v in pair(kwargs["dilation"])]
        else:
            kwargs["count_include_pad"] = bool(draw(ints(0, 1)))
        x = input_array(
            draw,
            dtype,
            draw(ints(1, 3)),
            extent(draw, d[0] * (k[0] - 1) + 1),
            extent(draw, d[1] * (k[1] - 1) + 1),
        )
        if rare(draw, 40):  # the largest kernel accepted, made valid by padding half of it
            kwargs.update(
                kernel_size=2**31 - 1, padding=2**30 - 1, stride=pick(draw, [2**31 - 1, 1])
            )
        if not name.endswith("backward"):
            if is_max:
                kwargs["return_indices"] = bool(draw(ints(0, 1)))
            return (x,), kwargs
        forward_kwargs = dict(kwargs, return_indices=True) if is_max else kwargs
        result = forward(name.replace("_backward", ""), x, **forward_kwargs)
        out = result[0] if is_max and result is not None else result
        grad = gradient(draw, out, dtype, (1, 1, 2, 2))
        if is_max and draw(ints(0, 1)):
            indices = result[1] if result is not None else np.zeros((1, 1, 2, 2), np.int64)
            change = pick(
                draw,
                [
                    "none",
                    "none",
                    "none",
                    "too large",
                    "minus two",
                    "float",
                    "uint8",
                    "shape",
                    "list",
                    "minus one",
                ],
            )
            if change == "too large":
                indices = indices + 10**6
            elif change in ("minus two", "minus one"):
                indices = np.full_like(indices, -2 if change == "minus two" else -1)
            elif change == "float":
                indices = indices.astype(np.float64)
            elif change == "uint8":
                indices = indices.astype(np.uint8)
            elif change == "shape" and indices.ndim:
                indices = indices[..., :-1]
            elif change == "list":
                indices = indices.tolist()
            kwargs["indices"] = indices
        return (grad, x), kwargs

    def sliding(draw, name, dtype):
        kwargs = dict(
            kernel_size=parameter(draw, 1, 3),
            dilation=parameter(draw, 1, 2),
            padding=parameter(draw, 0, 2),
            stride=parameter(draw, 1, 3),
        )
        k = [small(v, 3) for v in pair(kwargs["kernel_size"])]
        d = [small(v, 1) for v in pair(kwargs["dilation"])]
        sizes = [extent(draw, d[i] * (k[i] - 1) + 1) for i in (0, 1)]
        if name == "unfold":
            return (input_array(draw, dtype, draw(ints(1, 3)), *sizes),), kwargs
        if rare(draw, 40):  # a huge image from one block
            return (np.ones((1, 1, 1), np.float32), (10**6, 10**6)), dict(
                kernel_size=1, stride=10**6
            )
        output_size = tuple(sizes) if not rare(draw, 10) else parameter(draw, 0, 7)
        channels = draw(ints(1, 3))
        blocks = forward("unfold", np.zeros((1, channels, *sizes)), **kwargs)
        shape = (channels * k[0] * k[1], blocks.shape[-1]) if blocks is not None else (channels, 4)
        if rare(draw, 10):
            shape = (shape[0] + 1, shape[1]) if draw(ints(0, 1)) else (shape[0], shape[1] + 1)
        shape = shape if rare(draw, 5) else (pick(draw, [1, 2, 0]),) + shape
        return (arrange(draw, values(draw, shape), dtype), output_size), kwargs

    @st.composite
    def cases(draw):
        name = pick(draw, FUNCTIONS)
        dtype = pick(draw, FLOATS)
        if name.startswith("conv2d"):
            args, kwargs = conv(draw, name, dtype)
        elif name in ("unfold", "fold"):
            args, kwargs = sliding(draw, name, dtype)
        else:
            args, kwargs = pool(draw, name, dtype)
        return name, args, kwargs, label(name, args, kwargs)

    return cases()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]))
    else:
        sys.exit("usage: python tests/test_fuzz.py --worker N")
