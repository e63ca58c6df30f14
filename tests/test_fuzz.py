"""Fuzzing every public function: any input gives the reference's result or a clear exception.

hypothesis throws random shapes, strides, paddings, dilations, groups, dtypes (int, bool, complex,
float16, big-endian, object), memory layouts (Fortran order, strided and negative-stride views,
zero-stride broadcasts, read-only arrays, nested lists), zero-size and huge dimensions, and bad
parameter values at all eight functions. Each call must either

- return what fastconv.reference returns (same dtype, values within the dtype's tolerance), or
- raise ValueError, TypeError or MemoryError, of the same type as the reference,

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
FUNCTIONS = ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d",
             "avg_pool2d_backward", "unfold", "fold"]
SLOW_CASE_SECONDS = 5.0


def test_fuzz_every_public_function_in_a_subprocess():
    examples = int(os.environ.get("FASTCONV_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
    timeout = 120 + 0.1 * examples
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(examples)],
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        last = (err.stdout or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise AssertionError(f"fuzz worker hung (> {timeout:.0f} s); last cases started:\n" + "\n".join(last)) from None
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

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from conftest import assert_results_close

    import fastconv as fc
    from fastconv import reference as ref

    limit = 6 * 2**30  # address space: far above what these small cases need
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    counter = {"cases": 0}
    outcomes = {}  # (function, "result" or exception name) -> count
    slow = []

    def call(module, name, args, kwargs):
        try:
            return getattr(module, name)(*args, **kwargs), None
        except Exception as err:  # noqa: BLE001 - classified by the caller
            return None, err

    def check(case) -> None:
        name, args, kwargs, label = case
        counter["cases"] += 1
        print(f"{counter['cases']}: {label}", flush=True)
        snapshots = [(a, a.copy()) for a in args
                     if isinstance(a, np.ndarray) and a.dtype != object and a.size < 10**6]
        ref_kwargs = {k: v for k, v in kwargs.items() if k != "output_mask"}
        expected, ref_error = call(ref, name, args, ref_kwargs)
        start = time.perf_counter()
        got, error = call(fc, name, args, kwargs)
        outcome = "result" if error is None else type(error).__name__
        outcomes[(name, outcome)] = outcomes.get((name, outcome), 0) + 1
        if time.perf_counter() - start > SLOW_CASE_SECONDS:
            slow.append(label)
        for array, before in snapshots:
            np.testing.assert_array_equal(array, before, err_msg=f"{name} wrote into its input")
        if error is not None and not isinstance(error, ALLOWED):
            raise AssertionError(f"{name} raised {type(error).__name__}: {error}") from error
        if ref_error is not None and not isinstance(ref_error, ALLOWED):
            raise AssertionError(f"reference.{name} raised {type(ref_error).__name__}: {ref_error}") from ref_error
        if ref_error is not None and not _from_validation(ref_error):
            # The reference pads by copying: with a huge padding NumPy refuses the copy
            # (MemoryError, or ValueError "array is too big"). No oracle; the kernels need none.
            if error is None:
                first = got[0] if isinstance(got, tuple) else got
                assert first.dtype == _dtype_of(args[1] if name.endswith("backward") else args[0])
            return
        if ref_error is not None:
            assert error is not None, f"{name} returned a result where the reference raised {ref_error!r}"
            assert type(error) is type(ref_error), f"{name} raised {error!r}, the reference {ref_error!r}"
            return
        assert error is None, f"{name} raised {error!r} where the reference returned a result"
        if name == "conv2d_backward":
            expected = tuple(e if wanted else None for e, wanted in zip(expected, kwargs["output_mask"]))
        assert_results_close(got, expected)

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_cases(st))
    def fuzz(case):
        check(case)

    fuzz()
    if slow:
        raise AssertionError(f"{len(slow)} cases took over {SLOW_CASE_SECONDS} s, e.g. {slow[0]}")
    for (name, outcome), count in sorted(outcomes.items()):
        print(f"outcome {name} {outcome}: {count}")
    print(f"fuzz cases run: {counter['cases']}", flush=True)


def _from_validation(error: BaseException) -> bool:
    """Whether error was raised by fastconv's argument checks (fastconv/_args.py)."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.endswith(os.path.join("fastconv", "_args.py"))


def _dtype_of(array_like):
    return np.asarray(array_like).dtype


# --- what the worker throws ----------------------------------------------------------------

FLOATS = [np.float32, np.float64]
OTHER_DTYPES = [np.float16, np.int32, np.int64, np.uint8, bool, np.complex64, np.complex128,
                np.dtype(">f8"), np.dtype(">f4"), object]
BAD_PARAMETERS = [-1, 0, 1.5, 2.0, None, "2", True, (1,), (1, 2, 3), (2, -1), [], 2**31 - 1, 2**31,
                  2**40, 2**63, 2**64, 10**30, np.float64(1.0)]
GOOD_ODDITIES = [np.int64(2), [1, 2], (2, 1), np.array([1, 2]), np.uint8(1)]
HUGE_SHAPES = [(1, 1, 10**6, 10**6), (2**40, 1, 4, 4), (1, 2**30, 64, 64), (4, 2**35, 4, 4),
               (1, 3, 2**45, 1), (2**62, 1, 1, 1)]


def fuzz_cases(st):
    """The strategy (hypothesis passed in so this module imports without it)."""

    def small_int(low, high):
        return st.integers(low, high)

    @st.composite
    def parameter(draw, low, high, pair=True, extra=()):
        """Mostly a valid int or pair; sometimes an odd-but-valid form, a bad value, a huge one."""
        kind = draw(st.integers(0, 39))
        if kind < 30:
            a = draw(small_int(low, high))
            return (a, draw(small_int(low, high))) if pair and draw(st.booleans()) else a
        if kind < 33:
            return draw(st.sampled_from(GOOD_ODDITIES))
        return draw(st.sampled_from(BAD_PARAMETERS + list(extra)))

    @st.composite
    def size(draw):
        return draw(st.sampled_from([1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 0]))

    @st.composite
    def values(draw, shape, special=False):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        a = rng.standard_normal(shape)
        if special and a.size and draw(st.integers(0, 4)) == 0:
            a.reshape(-1)[rng.integers(0, a.size, 3)] = [np.nan, np.inf, -np.inf]
        return a

    @st.composite
    def arrange(draw, a, dtype):
        """a as dtype (sometimes another one), in one of the layouts an array can come in."""
        if draw(st.integers(0, 19)) == 0:
            dtype = draw(st.sampled_from(FLOATS + OTHER_DTYPES))
        a = a.astype(dtype) if dtype is not object else a.astype(object)
        layout = draw(st.sampled_from(["c"] * 5 + ["f", "strided", "negative", "broadcast", "list", "read-only", "scalar"]))
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
            return np.broadcast_to(a[..., :1], a.shape)
        if layout == "list" and a.size < 2000:
            return a.tolist()
        if layout == "read-only":
            a = a.copy()
            a.flags.writeable = False
            return a
        if layout == "scalar" and draw(st.integers(0, 3)) == 0:
            return a.reshape(-1)[:1].reshape(()) if a.size else a  # a 0-d array
        return a

    def huge():
        return st.sampled_from(HUGE_SHAPES).map(lambda s: np.broadcast_to(np.float32(1), s))

    @st.composite
    def batch_shape(draw, channels, height, width):
        """(N, C, H, W) mostly; unbatched (C, H, W) or a wrong ndim sometimes."""
        kind = draw(st.integers(0, 19))
        if kind < 14:
            return (draw(st.sampled_from([1, 2, 2, 3, 0])), channels, height, width)
        if kind < 18:
            return (channels, height, width)
        return draw(st.sampled_from([(height, width), (1, 1, channels, height, width), ()]))

    @st.composite
    def input_array(draw, dtype, channels, height, width, special=True):
        if draw(st.integers(0, 39)) == 0:
            return draw(huge())
        shape = draw(batch_shape(channels, height, width))
        return draw(arrange(draw(values(shape, special)), dtype))

    def label(name, args, kwargs):
        shown = []
        for a in args:
            if isinstance(a, np.ndarray):
                shown.append(f"array{a.shape}:{a.dtype}:strides{a.strides}")
            elif isinstance(a, list):
                shown.append(f"list(shape {np.shape(a)})" if a and isinstance(a[0], list) else repr(a))
            else:
                shown.append(repr(a))
        return f"{name}({', '.join(shown)}, **{kwargs!r})"

    def forward_shape(fn, *args, **kwargs):
        """The reference forward's output (and indices) for building backward inputs, or None."""
        from fastconv import reference as ref

        try:
            return getattr(ref, fn)(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an invalid case: the backward gets random inputs
            return None

    @st.composite
    def gradient(draw, output, dtype, fallback):
        """A grad_output: the forward output's shape mostly, else a wrong one."""
        shape = output.shape if output is not None and draw(st.integers(0, 9)) else fallback
        if draw(st.integers(0, 14)) == 0 and len(shape):
            shape = tuple(shape[:-1]) + (shape[-1] + 1,)
        return draw(arrange(draw(values(shape)), dtype))

    @st.composite
    def conv(draw, name, dtype):
        groups = draw(st.one_of(st.integers(1, 3), st.integers(1, 3), st.sampled_from([0, -1, 2.0, True, 2**40])))
        g = groups if isinstance(groups, int) and 1 <= groups <= 3 else 1
        per_group = draw(st.sampled_from([1, 2, 3, 0]))
        c_in = g * per_group + (1 if draw(st.integers(0, 14)) == 0 else 0)
        c_out = g * draw(st.sampled_from([1, 2, 3])) + (1 if draw(st.integers(0, 14)) == 0 else 0)
        kernel = (draw(size()), draw(size()))
        x = draw(input_array(dtype, c_in, draw(size()) + 2, draw(size()) + 2))
        weight = draw(arrange(draw(values((c_out, per_group) + kernel)), dtype))
        kwargs = dict(
            stride=draw(parameter(1, 3)),
            padding=draw(st.one_of(parameter(0, 2, extra=("bogus", "SAME")), st.sampled_from(["same", "valid"]))),
            dilation=draw(parameter(1, 3)),
            groups=groups,
        )
        if name == "conv2d":
            bias = draw(st.one_of(st.none(), st.just((c_out,)), st.just((c_out + 1,))))
            return (x, weight, None if bias is None else draw(arrange(draw(values(bias)), dtype))), kwargs
        out = forward_shape("conv2d", x, weight, **kwargs)
        grad = draw(gradient(out, dtype, (1, c_out, 2, 2)))
        kwargs["output_mask"] = tuple(draw(st.booleans()) for _ in range(3))
        return (grad, x, weight), kwargs

    @st.composite
    def pool(draw, name, dtype):
        x = draw(input_array(dtype, draw(size()), draw(size()), draw(size())))
        kwargs = dict(
            kernel_size=draw(parameter(1, 4)),
            stride=draw(st.one_of(st.none(), parameter(1, 3))),
            padding=draw(parameter(0, 2)),
            ceil_mode=draw(st.booleans()),
        )
        if name.startswith("max"):
            kwargs["dilation"] = draw(parameter(1, 3))
        else:
            kwargs["count_include_pad"] = draw(st.booleans())
        if draw(st.integers(0, 29)) == 0:  # a huge kernel, valid with padding of half of it
            kwargs.update(kernel_size=2**31 - 1, padding=2**30 - 1, stride=2**31 - 1)
        if not name.endswith("backward"):
            if name.startswith("max"):
                kwargs["return_indices"] = draw(st.booleans())
            return (x,), kwargs
        forward = name.replace("_backward", "")
        result = forward_shape(forward, x, **kwargs, **({"return_indices": True} if name.startswith("max") else {}))
        out = result[0] if isinstance(result, tuple) else result
        grad = draw(gradient(out, dtype, (1, 1, 2, 2)))
        if name.startswith("max") and draw(st.booleans()):
            indices = result[1] if result is not None else np.zeros((1, 1, 2, 2), np.int64)
            change = draw(st.sampled_from(["none", "none", "none", "too large", "minus two",
                                           "float", "uint8", "shape", "list", "minus one"]))
            if change == "too large" and indices.size:
                indices = indices + 10**6
            elif change == "minus two":
                indices = indices - 2 - indices
            elif change == "minus one":
                indices = indices - 1 - indices
            elif change == "float":
                indices = indices.astype(np.float64)
            elif change == "uint8":
                indices = indices.astype(np.uint8)
            elif change == "shape":
                indices = indices[..., :-1] if indices.ndim else indices
            elif change == "list":
                indices = indices.tolist()
            kwargs["indices"] = indices
        return (grad, x), kwargs

    @st.composite
    def sliding(draw, name, dtype):
        kwargs = dict(kernel_size=draw(parameter(1, 3)), dilation=draw(parameter(1, 2)),
                      padding=draw(parameter(0, 2)), stride=draw(parameter(1, 3)))
        if name == "unfold":
            return (draw(input_array(dtype, draw(size()), draw(size()) + 1, draw(size()) + 1)),), kwargs
        if draw(st.integers(0, 29)) == 0:  # a huge image from one block
            return (np.ones((1, 1, 1), np.float32), (10**6, 10**6)), dict(kernel_size=1, stride=10**6)
        output_size = draw(st.one_of(st.tuples(st.integers(1, 7), st.integers(1, 7)), parameter(1, 7)))
        c = draw(size())
        probe = forward_shape("unfold", np.zeros((1, max(c, 1)) + (tuple(output_size) if isinstance(output_size, tuple) else (3, 3))), **kwargs)
        shape = (draw(st.sampled_from([1, 2, 0])),) + (probe.shape[1:] if probe is not None else (c, 4))
        if draw(st.integers(0, 9)) == 0:
            shape = shape[1:] if draw(st.booleans()) else shape[:-1] + (shape[-1] + 1,)
        return (draw(arrange(draw(values(shape)), dtype)), output_size), kwargs

    @st.composite
    def cases(draw):
        name = draw(st.sampled_from(FUNCTIONS))
        dtype = draw(st.sampled_from(FLOATS))
        if name.startswith("conv2d"):
            args, kwargs = draw(conv(name, dtype))
        elif name in ("unfold", "fold"):
            args, kwargs = draw(sliding(name, dtype))
        else:
            args, kwargs = draw(pool(name, dtype))
        return name, args, kwargs, label(name, args, kwargs)

    return cases()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]))
    else:
        sys.exit("usage: python tests/test_fuzz.py --worker N")
