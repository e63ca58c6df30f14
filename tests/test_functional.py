"""The compiled path (fastconv.functional) against the NumPy reference on many random cases.

Tolerances are relative to the largest magnitude of the expected output (conftest.RTOL): about
1e-5 in float32, 1e-12 in float64. Every result must also keep the input's dtype.
"""

import itertools
import subprocess
import textwrap

import numpy as np
import pytest
from conftest import (
    assert_close,
    assert_results_close,
    conv_cases,
    fold_cases,
    pool_cases,
    random_array,
    run_python,
    unfold_cases,
)
from hypothesis import given, settings

import fastconv as fc
from fastconv import _blas, functional
from fastconv import reference as ref

EXAMPLES = 80


def grad_like(output, seed=11):
    return random_array(seed, output.shape, output.dtype)


# --- random cases against the reference ------------------------------------------------------


@settings(max_examples=EXAMPLES)
@given(conv_cases())
def test_conv2d(case):
    assert_close(fc.conv2d(*case.args, **case.kwargs), ref.conv2d(*case.args, **case.kwargs))


@settings(max_examples=EXAMPLES)
@given(conv_cases(bias=False))
def test_conv2d_backward(case):
    x, weight, _ = case.args
    grad = grad_like(ref.conv2d(x, weight, **case.kwargs))
    assert_results_close(
        fc.conv2d_backward(grad, x, weight, **case.kwargs),
        ref.conv2d_backward(grad, x, weight, **case.kwargs),
    )


@settings(max_examples=EXAMPLES)
@given(pool_cases("max"))
def test_max_pool2d(case):
    out, indices = fc.max_pool2d(*case.args, **case.kwargs, return_indices=True)
    expected_out, expected_indices = ref.max_pool2d(*case.args, **case.kwargs, return_indices=True)
    assert_close(out, expected_out)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, expected_indices)
    assert_close(fc.max_pool2d(*case.args, **case.kwargs), expected_out)


# Windows holding no input element are tested in a subprocess below
# (test_max_pool_window_without_input_elements): a wrong index there makes the backward write
# outside its array, which would take this whole test run down.
@settings(max_examples=EXAMPLES)
@given(pool_cases("max", empty_windows=False))
def test_max_pool2d_backward(case):
    (x,) = case.args
    out, indices = ref.max_pool2d(x, **case.kwargs, return_indices=True)
    grad = grad_like(out)
    expected = ref.max_pool2d_backward(grad, x, **case.kwargs)
    assert_close(fc.max_pool2d_backward(grad, x, **case.kwargs), expected)
    # given indices (the compiled forward's, or the reference's) change nothing
    compiled_indices = fc.max_pool2d(x, **case.kwargs, return_indices=True)[1]
    assert_close(fc.max_pool2d_backward(grad, x, **case.kwargs, indices=compiled_indices), expected)
    assert_close(fc.max_pool2d_backward(grad, x, **case.kwargs, indices=indices), expected)


@settings(max_examples=EXAMPLES)
@given(pool_cases("avg"))
def test_avg_pool2d(case):
    assert_close(
        fc.avg_pool2d(*case.args, **case.kwargs), ref.avg_pool2d(*case.args, **case.kwargs)
    )


@settings(max_examples=EXAMPLES)
@given(pool_cases("avg"))
def test_avg_pool2d_backward(case):
    (x,) = case.args
    grad = grad_like(ref.avg_pool2d(x, **case.kwargs))
    expected = ref.avg_pool2d_backward(grad, x, **case.kwargs)
    assert_close(fc.avg_pool2d_backward(grad, x, **case.kwargs), expected)


# 2x2/2 windows inside the plane run on their own kernels (AVX-512 where the CPU has it: 16
# windows per step, so widths around 16 and 32 windows test the masked tails); odd heights
# and widths leave input rows and columns no window covers, whose gradient must be zero.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 33), (3, 1, 5, 65), (1, 1, 2, 2)])
def test_avg_pool2d_2x2(shape, dtype):
    x = random_array(3, shape, dtype)
    out = fc.avg_pool2d(x, 2)
    assert_close(out, ref.avg_pool2d(x, 2))
    grad = grad_like(out)
    grad_input = fc.avg_pool2d_backward(grad, x, 2)
    assert_close(grad_input, ref.avg_pool2d_backward(grad, x, 2))
    uncovered = np.ones(shape, dtype=bool)
    uncovered[..., : 2 * out.shape[2], : 2 * out.shape[3]] = False
    assert not grad_input[uncovered].any()


@settings(max_examples=EXAMPLES)
@given(unfold_cases())
def test_unfold(case):
    assert_close(fc.unfold(*case.args, **case.kwargs), ref.unfold(*case.args, **case.kwargs))


@settings(max_examples=EXAMPLES)
@given(fold_cases())
def test_fold(case):
    assert_close(fc.fold(*case.args, **case.kwargs), ref.fold(*case.args, **case.kwargs))


# --- named shapes that random draws might miss ---------------------------------------------

CONV_SHAPES = {
    # name: (x shape, weight shape, kwargs)
    "batch 1, 1 channel": ((1, 1, 7, 5), (1, 1, 3, 3), dict(padding=1)),
    "kernel = input": ((2, 3, 4, 5), (6, 3, 4, 5), dict()),
    "kernel = padded input": ((2, 3, 2, 3), (4, 3, 4, 5), dict(padding=1)),
    "empty batch": ((0, 3, 6, 6), (4, 3, 3, 3), dict(padding=1)),
    "depthwise": ((2, 8, 9, 7), (8, 1, 3, 3), dict(groups=8, padding=1)),
    "depthwise multiplier 2": ((2, 4, 6, 6), (8, 1, 3, 3), dict(groups=4, stride=2)),
    "same, even kernel": ((2, 3, 6, 7), (4, 3, 4, 2), dict(padding="same")),
    "same, even kernel, dilated": (
        (1, 2, 9, 8),
        (3, 2, 2, 4),
        dict(padding="same", dilation=(3, 2)),
    ),
    "valid, strided, non-square": (
        (3, 2, 11, 6),
        (5, 2, 3, 2),
        dict(padding="valid", stride=(3, 2)),
    ),
    "stride larger than kernel": ((2, 3, 10, 10), (4, 3, 2, 2), dict(stride=4, padding=(0, 1))),
    "1x1 kernel": ((2, 16, 5, 5), (8, 16, 1, 1), dict()),
    "long reduction": ((2, 64, 6, 6), (16, 64, 3, 3), dict(padding=1)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", CONV_SHAPES)
def test_conv2d_named_shapes(name, dtype):
    x_shape, w_shape, kwargs = CONV_SHAPES[name]
    x, weight = random_array(0, x_shape, dtype), random_array(1, w_shape, dtype)
    bias = random_array(2, (w_shape[0],), dtype)
    out = fc.conv2d(x, weight, bias, **kwargs)
    assert_close(out, ref.conv2d(x, weight, bias, **kwargs))
    grad = grad_like(out)
    assert_results_close(
        fc.conv2d_backward(grad, x, weight, **kwargs),
        ref.conv2d_backward(grad, x, weight, **kwargs),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooling_kernel_equal_to_input_and_empty_batch(dtype):
    for shape in [(2, 3, 4, 5), (0, 3, 4, 5)]:
        x = random_array(0, shape, dtype)
        assert_close(fc.max_pool2d(x, (4, 5)), ref.max_pool2d(x, (4, 5)))
        assert_close(fc.avg_pool2d(x, (4, 5)), ref.avg_pool2d(x, (4, 5)))
        assert fc.max_pool2d(x, (4, 5)).shape == shape[:2] + (1, 1)


# --- the ways an array can come in ------------------------------------------------------------


def _layouts():
    """name -> function turning a contiguous array into an equal array laid out differently."""

    def strided(a):  # every other element of a twice-as-large array
        big = np.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
        big[tuple(slice(None, None, 2) for _ in a.shape)] = a
        return big[tuple(slice(None, None, 2) for _ in a.shape)]

    def reversed_(a):  # negative strides on every axis, same values
        return np.ascontiguousarray(a[tuple(slice(None, None, -1) for _ in a.shape)])[
            tuple(slice(None, None, -1) for _ in a.shape)
        ]

    def read_only(a):
        a = a.copy()
        a.flags.writeable = False
        return a

    return {
        "contiguous": lambda a: a,
        "fortran": np.asfortranarray,
        "strided": strided,
        "negative strides": reversed_,
        "transposed view": lambda a: np.ascontiguousarray(a.T).T,
        "list": lambda a: a.tolist(),
        "read-only": read_only,
    }


LAYOUTS = _layouts()


def _calls(dtype):
    """name -> (function name, positional arrays, kwargs) covering every public function."""
    x = random_array(0, (2, 4, 6, 5), dtype)
    weight = random_array(1, (6, 2, 3, 2), dtype)
    bias = random_array(2, (6,), dtype)
    conv_kw = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    pool_kw = dict(kernel_size=(3, 2), stride=(2, 1), padding=1, ceil_mode=True)
    unfold_kw = dict(kernel_size=(2, 3), dilation=(2, 1), padding=1, stride=(1, 2))
    conv_out = ref.conv2d(x, weight, **conv_kw)
    max_out = ref.max_pool2d(x, **pool_kw)
    avg_out = ref.avg_pool2d(x, **pool_kw)
    cols = ref.unfold(x, **unfold_kw)
    return {
        "conv2d": ("conv2d", (x, weight, bias), conv_kw),
        "conv2d_backward": ("conv2d_backward", (grad_like(conv_out), x, weight), conv_kw),
        "max_pool2d": ("max_pool2d", (x,), dict(pool_kw, return_indices=True)),
        "max_pool2d_backward": ("max_pool2d_backward", (grad_like(max_out), x), pool_kw),
        "avg_pool2d": ("avg_pool2d", (x,), pool_kw),
        "avg_pool2d_backward": ("avg_pool2d_backward", (grad_like(avg_out), x), pool_kw),
        "unfold": ("unfold", (x,), unfold_kw),
        "fold": ("fold", (cols, (6, 5)), unfold_kw),
    }


CALLS = list(_calls(np.float64))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_layout_gives_the_contiguous_result(call, layout, dtype):
    name, arrays, kwargs = _calls(dtype)[call]
    arranged = [
        LAYOUTS[layout](a) if isinstance(a, np.ndarray) and a.ndim > 1 else a for a in arrays
    ]
    before = [np.array(a, copy=True) for a in arranged if isinstance(a, np.ndarray)]
    if layout == "list" and dtype == np.float32:
        # Python floats are float64: lists only make a float64 call; beside a float32 array
        # (conv2d's bias stays one) they are a dtype mix, refused as torch refuses it
        if any(isinstance(a, np.ndarray) and a.ndim == 1 for a in arrays):
            with pytest.raises(TypeError):
                getattr(fc, name)(*arranged, **kwargs)
            return
        arrays = [a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in arrays]
    result = getattr(fc, name)(*arranged, **kwargs)
    assert_results_close(result, getattr(ref, name)(*arrays, **kwargs))
    for kept, a in zip(before, [a for a in arranged if isinstance(a, np.ndarray)]):
        np.testing.assert_array_equal(a, kept)  # inputs are never written


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_result_keeps_the_input_dtype(call, dtype):
    name, arrays, kwargs = _calls(dtype)[call]
    result = getattr(fc, name)(*arrays, **kwargs)
    results = result if isinstance(result, tuple) else (result,)
    if name == "max_pool2d":  # (output, indices)
        assert results[1].dtype == np.int64
        results = results[:1]
    assert [r.dtype for r in results] == [np.dtype(dtype)] * len(results)


# which positional arguments carry the batch axis (the others: weight, bias, output_size)
BATCHED = {"conv2d": (0,), "conv2d_backward": (0, 1), "fold": (0,)}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unbatched_input_gives_the_batched_result_without_its_batch_axis(call, dtype):
    name, arrays, kwargs = _calls(dtype)[call]
    batched_at = BATCHED.get(name, range(len(arrays)))
    one = [a[:1] if i in batched_at else a for i, a in enumerate(arrays)]
    unbatched = [a[0] if i in batched_at else a for i, a in enumerate(arrays)]
    expected = getattr(ref, name)(*one, **kwargs)
    if name == "conv2d_backward":  # grad_weight and grad_bias have no batch axis
        expected = (expected[0][0], *expected[1:])
    elif isinstance(expected, tuple):
        expected = tuple(e[0] for e in expected)
    else:
        expected = expected[0]
    assert_results_close(getattr(fc, name)(*unbatched, **kwargs), expected)


# --- conv2d_backward's output_mask -------------------------------------------------------------


@pytest.mark.parametrize("mask", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("unbatched", [False, True])
def test_output_mask_skips_exactly_the_gradients_not_asked_for(mask, unbatched):
    x, weight = random_array(0, (3, 4, 6, 5), np.float64), random_array(1, (6, 2, 3, 3), np.float64)
    kwargs = dict(padding=1, stride=(1, 2), groups=2)
    if unbatched:
        x = x[0]
    grad = grad_like(ref.conv2d(x, weight, **kwargs))
    full = ref.conv2d_backward(grad, x, weight, **kwargs)
    expected = tuple(f if wanted else None for f, wanted in zip(full, mask))
    assert_results_close(fc.conv2d_backward(grad, x, weight, **kwargs, output_mask=mask), expected)


def test_output_mask_with_read_only_arrays():
    """Skipping grad_input must not need a writable x (an array from np.load(mmap_mode='r'))."""
    x, weight = random_array(0, (2, 3, 5, 5), np.float32), random_array(1, (4, 3, 3, 3), np.float32)
    grad = grad_like(ref.conv2d(x, weight))
    full = ref.conv2d_backward(grad, x, weight)
    for array in (x, weight, grad):
        array.flags.writeable = False
    for mask in [(False, True, True), (False, False, True), (True, False, False)]:
        expected = tuple(f if wanted else None for f, wanted in zip(full, mask))
        assert_results_close(fc.conv2d_backward(grad, x, weight, output_mask=mask), expected)


# --- NaN and inf, determinism ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_propagate_as_in_the_reference(dtype):
    x = random_array(0, (2, 3, 7, 6), dtype)
    x[0, 0, 2, 3], x[1, 2, 0, 0], x[1, 1, 5, 5] = np.nan, np.inf, -np.inf
    weight = random_array(1, (4, 3, 3, 3), dtype)
    for name, args, kwargs in [
        ("conv2d", (x, weight), dict(padding=1)),
        ("max_pool2d", (x,), dict(kernel_size=3, stride=1, padding=1, return_indices=True)),
        ("avg_pool2d", (x,), dict(kernel_size=2, padding=1, ceil_mode=True)),
        ("unfold", (x,), dict(kernel_size=2, padding=1)),
    ]:
        expected = getattr(ref, name)(*args, **kwargs)
        assert_results_close(getattr(fc, name)(*args, **kwargs), expected)
        first = expected[0] if isinstance(expected, tuple) else expected
        assert np.isnan(first).any(), f"{name}: the case should produce a NaN"


def test_repeated_calls_give_bitwise_identical_results():
    x, weight = (
        random_array(0, (8, 8, 10, 10), np.float32),
        random_array(1, (8, 8, 3, 3), np.float32),
    )
    grad = grad_like(fc.conv2d(x, weight, padding=1))
    first = fc.conv2d_backward(grad, x, weight, padding=1)
    for _ in range(3):
        for a, b in zip(fc.conv2d_backward(grad, x, weight, padding=1), first):
            np.testing.assert_array_equal(a, b)


# --- the workspace: bounded, and chunking changes nothing -----------------------------------


def test_workspace_does_not_grow_with_the_batch(workspace_limit):
    """Extra memory (beyond the output) of a conv2d is the same for a batch of 4 and of 64."""
    import tracemalloc

    workspace_limit(64 * 1024)
    weight = random_array(1, (16, 8, 3, 3), np.float64)
    full_im2col = 8 * 9 * 16 * 16 * 8  # one sample's patch matrix, bytes

    def extra_bytes(n):
        x = random_array(0, (n, 8, 16, 16), np.float64)
        fc.conv2d(x, weight, padding=1)  # warm-up: a reused workspace is allocated here
        tracemalloc.start()
        try:
            out = fc.conv2d(x, weight, padding=1)
            return tracemalloc.get_traced_memory()[1] - out.nbytes
        finally:
            tracemalloc.stop()

    small, large = extra_bytes(4), extra_bytes(64)
    # im2col of the whole batch would add 60 * full_im2col bytes
    assert large - small < 4 * full_im2col, (small, large)


@pytest.fixture
def numpy_matmul_path(monkeypatch):
    """Force the fallback that multiplies batch chunks with np.matmul (when BLAS is not found)."""
    monkeypatch.setattr(_blas, "_kernels_call_blas", False)


def test_small_workspace_limit_splits_the_batch_into_chunks(
    workspace_limit, numpy_matmul_path, monkeypatch
):
    x, weight = random_array(0, (7, 3, 6, 6), np.float64), random_array(1, (4, 3, 3, 3), np.float64)
    grad = grad_like(ref.conv2d(x, weight, padding=1))
    chunks = []
    im2col = functional._conv.im2col

    def counting_im2col(x_chunk, *rest):
        chunks.append(x_chunk.shape[0])
        return im2col(x_chunk, *rest)

    monkeypatch.setattr(functional._conv, "im2col", counting_im2col)
    one_sample = 3 * 9 * 36 * 8  # bytes of one sample's patch matrix
    workspace_limit(2 * one_sample)
    assert_close(fc.conv2d(x, weight, padding=1), ref.conv2d(x, weight, padding=1))
    assert chunks == [2, 2, 2, 1]
    chunks.clear()
    assert_results_close(
        fc.conv2d_backward(grad, x, weight, padding=1),
        ref.conv2d_backward(grad, x, weight, padding=1),
    )
    assert chunks == [2, 2, 2, 1]


@pytest.mark.parametrize("path", ["kernels", "numpy matmul"])
@pytest.mark.parametrize("limit", [1, 5000, 10**6])
def test_results_do_not_depend_on_the_workspace_limit(workspace_limit, monkeypatch, path, limit):
    if path == "numpy matmul":
        monkeypatch.setattr(_blas, "_kernels_call_blas", False)
    workspace_limit(limit)
    x, weight = random_array(0, (5, 4, 7, 6), np.float32), random_array(1, (6, 2, 3, 2), np.float32)
    kwargs = dict(padding=(1, 0), stride=(2, 1), dilation=(1, 2), groups=2)
    bias = random_array(2, (6,), np.float32)
    grad = grad_like(ref.conv2d(x, weight, **kwargs))
    assert_close(fc.conv2d(x, weight, bias, **kwargs), ref.conv2d(x, weight, bias, **kwargs))
    assert_results_close(
        fc.conv2d_backward(grad, x, weight, **kwargs),
        ref.conv2d_backward(grad, x, weight, **kwargs),
    )


# --- in a subprocess: cases that crash or hang a broken kernel -------------------------------


def _run_isolated(code, tmp_path, timeout=60):
    """Run code (which saves its results to `out.npz` in tmp_path); return the saved arrays."""
    path = tmp_path / "out.npz"
    try:
        proc = run_python(f"OUT = {str(path)!r}\n" + textwrap.dedent(code), timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: no result after {timeout} s")
    assert proc.returncode == 0, (
        f"subprocess failed with return code {proc.returncode} (negative: killed by signal "
        f"{-proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return dict(np.load(path))


def test_max_pool_window_without_input_elements(tmp_path):
    """Dilation 3 over 2 rows with padding 1: windows at rows {-1, 2} hold no input element.
    torch gives -inf there and no gradient; the index must not point outside the plane."""
    got = _run_isolated(
        """
        import numpy as np, fastconv as fc
        x = np.random.default_rng(0).standard_normal((2, 3, 2, 5))
        kw = dict(kernel_size=2, stride=2, padding=1, dilation=3)
        out, indices = fc.max_pool2d(x, **kw, return_indices=True)
        grad = np.ones_like(out)
        np.savez(OUT, out=out, indices=indices,
                 grad=fc.max_pool2d_backward(grad, x, **kw),
                 grad_given=fc.max_pool2d_backward(grad, x, **kw, indices=indices),
                 grad_unbatched=fc.max_pool2d_backward(grad[0], x[0], **kw))
    """,
        tmp_path,
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 5))
    kw = dict(kernel_size=2, stride=2, padding=1, dilation=3)
    out, indices = ref.max_pool2d(x, **kw, return_indices=True)
    assert_close(got["out"], out)
    np.testing.assert_array_equal(got["indices"], indices)  # -1: no element
    expected = ref.max_pool2d_backward(np.ones_like(out), x, **kw)
    assert_close(got["grad"], expected)
    assert_close(got["grad_given"], expected)
    assert_close(got["grad_unbatched"], expected[0])


def test_max_pool_minus_one_indices_pass_no_gradient(tmp_path):
    got = _run_isolated(
        """
        import numpy as np, fastconv as fc
        x = np.zeros((2, 1, 2, 2))
        indices = np.array([[[[-1]]], [[[3]]]])
        np.savez(OUT, grad=fc.max_pool2d_backward(np.ones((2, 1, 1, 1)), x, 2, indices=indices))
    """,
        tmp_path,
    )
    np.testing.assert_array_equal(got["grad"], [[[[0, 0], [0, 0]]], [[[0, 0], [0, 1]]]])


def test_pooling_with_a_huge_kernel_neither_hangs_nor_overflows(tmp_path):
    """Kernel 2**31 - 1 (the largest accepted) with padding 2**30 - 1, stride 1: every window
    covers the whole 16 x 16 input. The divisor with padding counted is (2**31 - 1) ** 2."""
    got = _run_isolated(
        """
        import numpy as np, fastconv as fc
        x = np.random.default_rng(0).standard_normal((1, 2, 16, 16))
        kw = dict(kernel_size=2**31 - 1, stride=1, padding=2**30 - 1)
        out, indices = fc.max_pool2d(x, **kw, return_indices=True)
        np.savez(OUT, out=out, indices=indices,
                 avg=fc.avg_pool2d(x, **kw), avg_real=fc.avg_pool2d(x, **kw, count_include_pad=False))
    """,
        tmp_path,
        timeout=20,
    )
    x = np.random.default_rng(0).standard_normal((1, 2, 16, 16))
    planes = x.reshape(2, -1)
    every = np.ones((1, 2, 16, 16))
    assert_close(got["out"], every * planes.max(axis=1)[None, :, None, None])
    np.testing.assert_array_equal(
        got["indices"], every * planes.argmax(axis=1)[None, :, None, None]
    )
    assert_close(
        got["avg"], every * (planes.sum(axis=1) / float(2**31 - 1) ** 2)[None, :, None, None]
    )
    assert_close(got["avg_real"], every * planes.mean(axis=1)[None, :, None, None])


def test_huge_padding_and_stride_are_index_bounds_not_a_padded_copy():
    """Padding 2**30 with stride 2**30: a 3 x 3 output whose only non-padding tap is x[0, 0]."""
    x = random_array(0, (1, 2, 4, 4), np.float64)
    weight = random_array(1, (3, 2, 1, 1), np.float64)
    out = fc.conv2d(x, weight, padding=2**30, stride=2**30)
    expected = np.zeros((1, 3, 3, 3))
    expected[0, :, 1, 1] = weight[:, :, 0, 0] @ x[0, :, 0, 0]
    assert_close(out, expected)
    cols = fc.unfold(x, 1, padding=2**30, stride=2**30)
    assert (
        cols.shape == (1, 2, 9)
        and (cols[0, :, 4] == x[0, :, 0, 0]).all()
        and (cols[0, :, :4] == 0).all()
    )
    back = fc.fold(cols, (4, 4), 1, padding=2**30, stride=2**30)
    assert back[0, :, 0, 0].tolist() == x[0, :, 0, 0].tolist() and np.count_nonzero(back) == 2


def test_threads_calling_at_once_get_the_sequential_results(tmp_path):
    """Four Python threads, from the process's first call on (so lazy set-up races too)."""
    got = _run_isolated(
        """
        from concurrent.futures import ThreadPoolExecutor
        import numpy as np, fastconv as fc

        def inputs(i):
            rng = np.random.default_rng(i)
            dtype = (np.float32, np.float64)[i % 2]
            x = rng.standard_normal((3 + i % 3, 8, 12 + i % 4, 12)).astype(dtype)
            w = rng.standard_normal((8, 8 // (1 + i % 2), 3, 3)).astype(dtype)
            return x, w, dict(padding=1, groups=1 + i % 2)

        def work(i):
            x, w, kw = inputs(i)
            out = fc.conv2d(x, w, **kw)
            grads = fc.conv2d_backward(np.ones_like(out), x, w, **kw)
            pooled, indices = fc.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
            return [out, *grads, pooled, indices]

        tasks = list(range(16)) * 3
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(work, tasks))
        sequential = [work(i) for i in tasks]
        np.savez(OUT, **{f"{k}_{j}_{kind}": a for k, (p, s) in enumerate(zip(parallel, sequential))
                        for kind, results in (("p", p), ("s", s)) for j, a in enumerate(results)})
    """,
        tmp_path,
        timeout=120,
    )
    keys = sorted({k.rsplit("_", 1)[0] for k in got})
    assert len(keys) == 48 * 6
    for key in keys:
        assert_close(got[key + "_p"], got[key + "_s"], what=key)
