"""Every refusal: the promised exception type, raised before any kernel runs, with a message that
starts with the name of the argument at fault ("x: ...", "stride: ...").

Both fastconv and fastconv.reference are checked: they share the validation, so they must refuse
the same inputs the same way.
"""

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastconv as fc
from fastconv import _args
from fastconv import reference as ref

F64, F32 = np.float64, np.float32


def arr(*shape, dtype=F64):
    return np.ones(shape, dtype=dtype)


X = arr(2, 4, 6, 6)  # conv input
W = arr(6, 2, 3, 3)  # groups=2 weight for X
G = arr(2, 6, 4, 4)  # conv2d(X, W, groups=2)'s output shape
P = arr(2, 4, 3, 3)  # max/avg_pool2d(X, 2)'s output shape
COLS = arr(2, 4 * 4, 25)  # unfold(X, 2)'s output shape

# (id, function name, args, kwargs, exception, argument named)
CASES = [
    # --- conv2d: shapes -------------------------------------------------------------------
    ("x 2-D", "conv2d", (arr(6, 6), W), dict(groups=2), ValueError, "x"),
    ("x 5-D", "conv2d", (arr(1, 2, 4, 6, 6), W), dict(groups=2), ValueError, "x"),
    ("weight 3-D", "conv2d", (X, arr(6, 4, 3)), {}, ValueError, "weight"),
    ("channel mismatch", "conv2d", (arr(2, 3, 6, 6), arr(6, 2, 3, 3)), {}, ValueError, "x"),
    ("groups mismatch", "conv2d", (X, W), {}, ValueError, "x"),
    (
        "groups not dividing C_out",
        "conv2d",
        (X, arr(5, 2, 3, 3)),
        dict(groups=2),
        ValueError,
        "groups",
    ),
    (
        "groups not dividing C_in",
        "conv2d",
        (arr(2, 5, 6, 6), arr(6, 2, 3, 3)),
        dict(groups=2),
        ValueError,
        "x",
    ),
    ("groups 0", "conv2d", (X, W), dict(groups=0), ValueError, "groups"),
    ("groups float", "conv2d", (X, W), dict(groups=2.0), TypeError, "groups"),
    ("groups bool", "conv2d", (X, arr(6, 4, 3, 3)), dict(groups=True), TypeError, "groups"),
    (
        "kernel > padded input",
        "conv2d",
        (arr(1, 1, 2, 2), arr(1, 1, 5, 5)),
        dict(padding=1),
        ValueError,
        "x",
    ),
    (
        "dilated kernel > input",
        "conv2d",
        (arr(1, 1, 5, 5), arr(1, 1, 3, 3)),
        dict(dilation=3),
        ValueError,
        "x",
    ),
    ("C_in 0", "conv2d", (arr(2, 0, 6, 6), arr(6, 0, 3, 3)), {}, ValueError, "weight"),
    ("H 0", "conv2d", (arr(2, 4, 0, 6), W), dict(groups=2), ValueError, "x"),
    ("W 0", "conv2d", (arr(2, 4, 6, 0), W), dict(groups=2), ValueError, "x"),
    ("C_out 0", "conv2d", (X, arr(0, 2, 3, 3)), dict(groups=2), ValueError, "weight"),
    ("kernel 0", "conv2d", (X, arr(6, 2, 0, 3)), dict(groups=2), ValueError, "weight"),
    # --- conv2d: numbers ------------------------------------------------------------------
    ("stride 0", "conv2d", (X, W), dict(groups=2, stride=0), ValueError, "stride"),
    ("stride negative", "conv2d", (X, W), dict(groups=2, stride=(1, -1)), ValueError, "stride"),
    ("stride float", "conv2d", (X, W), dict(groups=2, stride=2.0), TypeError, "stride"),
    ("stride str", "conv2d", (X, W), dict(groups=2, stride="2"), TypeError, "stride"),
    ("stride triple", "conv2d", (X, W), dict(groups=2, stride=(1, 1, 1)), TypeError, "stride"),
    ("stride None", "conv2d", (X, W), dict(groups=2, stride=None), TypeError, "stride"),
    ("stride bool", "conv2d", (X, W), dict(groups=2, stride=True), TypeError, "stride"),
    ("stride 2**31", "conv2d", (X, W), dict(groups=2, stride=2**31), ValueError, "stride"),
    ("stride 2**64", "conv2d", (X, W), dict(groups=2, stride=2**64), ValueError, "stride"),
    ("dilation 0", "conv2d", (X, W), dict(groups=2, dilation=0), ValueError, "dilation"),
    (
        "dilation 2**70",
        "conv2d",
        (X, arr(6, 2, 1, 1)),
        dict(groups=2, dilation=2**70),
        ValueError,
        "dilation",
    ),
    ("padding negative", "conv2d", (X, W), dict(groups=2, padding=-1), ValueError, "padding"),
    (
        "padding pair negative",
        "conv2d",
        (X, W),
        dict(groups=2, padding=(0, -2)),
        ValueError,
        "padding",
    ),
    ("padding float", "conv2d", (X, W), dict(groups=2, padding=1.5), TypeError, "padding"),
    ("padding triple", "conv2d", (X, W), dict(groups=2, padding=(1, 1, 1)), TypeError, "padding"),
    ("padding 'full'", "conv2d", (X, W), dict(groups=2, padding="full"), ValueError, "padding"),
    ("padding 'SAME'", "conv2d", (X, W), dict(groups=2, padding="SAME"), ValueError, "padding"),
    (
        "padding 'same' strided",
        "conv2d",
        (X, W),
        dict(groups=2, padding="same", stride=2),
        ValueError,
        "padding",
    ),
    ("padding 2**40", "conv2d", (X, W), dict(groups=2, padding=2**40), ValueError, "padding"),
    # --- conv2d: dtypes -------------------------------------------------------------------
    ("x int32", "conv2d", (arr(2, 4, 6, 6, dtype=np.int32), W), dict(groups=2), TypeError, "x"),
    ("x int64", "conv2d", (arr(2, 4, 6, 6, dtype=np.int64), W), dict(groups=2), TypeError, "x"),
    ("x bool", "conv2d", (arr(2, 4, 6, 6, dtype=bool), W), dict(groups=2), TypeError, "x"),
    (
        "x complex",
        "conv2d",
        (arr(2, 4, 6, 6, dtype=np.complex128), W),
        dict(groups=2),
        TypeError,
        "x",
    ),
    ("x float16", "conv2d", (arr(2, 4, 6, 6, dtype=np.float16), W), dict(groups=2), TypeError, "x"),
    ("x big-endian", "conv2d", (arr(2, 4, 6, 6, dtype=">f8"), W), dict(groups=2), TypeError, "x"),
    ("x strings", "conv2d", ([["a"]], W), {}, TypeError, "x"),
    ("x ragged list", "conv2d", ([[1.0], [1.0, 2.0]], W), {}, TypeError, "x"),
    ("x None", "conv2d", (None, W), {}, TypeError, "x"),
    (
        "weight int",
        "conv2d",
        (X, arr(6, 2, 3, 3, dtype=np.int64)),
        dict(groups=2),
        TypeError,
        "weight",
    ),
    (
        "weight float32, x float64",
        "conv2d",
        (X, arr(6, 2, 3, 3, dtype=F32)),
        dict(groups=2),
        TypeError,
        "weight",
    ),
    (
        "weight float64, x float32",
        "conv2d",
        (arr(2, 4, 6, 6, dtype=F32), W),
        dict(groups=2),
        TypeError,
        "weight",
    ),
    ("bias float32", "conv2d", (X, W, arr(6, dtype=F32)), dict(groups=2), TypeError, "bias"),
    ("bias int", "conv2d", (X, W, arr(6, dtype=np.int32)), dict(groups=2), TypeError, "bias"),
    ("bias wrong length", "conv2d", (X, W, arr(5)), dict(groups=2), ValueError, "bias"),
    ("bias 2-D", "conv2d", (X, W, arr(6, 1)), dict(groups=2), ValueError, "bias"),
    # --- conv2d_backward ------------------------------------------------------------------
    (
        "grad_output shape",
        "conv2d_backward",
        (arr(2, 6, 4, 5), X, W),
        dict(groups=2),
        ValueError,
        "grad_output",
    ),
    (
        "grad_output 3-D for 4-D x",
        "conv2d_backward",
        (G[0], X, W),
        dict(groups=2),
        ValueError,
        "grad_output",
    ),
    (
        "grad_output 4-D for 3-D x",
        "conv2d_backward",
        (G[:1], X[0], W),
        dict(groups=2),
        ValueError,
        "grad_output",
    ),
    (
        "grad_output float32",
        "conv2d_backward",
        (G.astype(F32), X, W),
        dict(groups=2),
        TypeError,
        "grad_output",
    ),
    (
        "grad_output int",
        "conv2d_backward",
        (G.astype(np.int64), X, W),
        dict(groups=2),
        TypeError,
        "grad_output",
    ),
    (
        "backward channel mismatch",
        "conv2d_backward",
        (G, arr(2, 3, 6, 6), W),
        dict(groups=2),
        ValueError,
        "x",
    ),
    (
        "backward stride 0",
        "conv2d_backward",
        (G, X, W),
        dict(groups=2, stride=0),
        ValueError,
        "stride",
    ),
    # --- max_pool2d -----------------------------------------------------------------------
    ("pool x 2-D", "max_pool2d", (arr(6, 6), 2), {}, ValueError, "x"),
    ("pool x 5-D", "max_pool2d", (arr(1, 2, 4, 6, 6), 2), {}, ValueError, "x"),
    ("pool C 0", "max_pool2d", (arr(2, 0, 6, 6), 2), {}, ValueError, "x"),
    ("pool H 0", "max_pool2d", (arr(2, 4, 0, 6), 2), {}, ValueError, "x"),
    ("pool unbatched W 0", "max_pool2d", (arr(4, 6, 0), 2), {}, ValueError, "x"),
    ("pool int", "max_pool2d", (arr(2, 4, 6, 6, dtype=np.int32), 2), {}, TypeError, "x"),
    ("pool bool", "max_pool2d", (arr(2, 4, 6, 6, dtype=bool), 2), {}, TypeError, "x"),
    ("pool complex", "max_pool2d", (arr(2, 4, 6, 6, dtype=np.complex64), 2), {}, TypeError, "x"),
    ("kernel_size 0", "max_pool2d", (X, 0), {}, ValueError, "kernel_size"),
    ("kernel_size (2, 0)", "max_pool2d", (X, (2, 0)), {}, ValueError, "kernel_size"),
    ("kernel_size float", "max_pool2d", (X, 2.0), {}, TypeError, "kernel_size"),
    ("kernel_size triple", "max_pool2d", (X, (2, 2, 2)), {}, TypeError, "kernel_size"),
    ("kernel_size None", "max_pool2d", (X, None), {}, TypeError, "kernel_size"),
    ("kernel_size 2**31", "max_pool2d", (X, 2**31), dict(padding=2**30), ValueError, "kernel_size"),
    ("pool stride 0", "max_pool2d", (X, 2), dict(stride=0), ValueError, "stride"),
    ("pool stride float", "max_pool2d", (X, 2), dict(stride=1.5), TypeError, "stride"),
    ("pool padding > kernel/2", "max_pool2d", (X, 3), dict(padding=2), ValueError, "padding"),
    (
        "pool padding > kernel/2 in w",
        "max_pool2d",
        (X, (4, 2)),
        dict(padding=(2, 2)),
        ValueError,
        "padding",
    ),
    ("pool padding negative", "max_pool2d", (X, 2), dict(padding=-1), ValueError, "padding"),
    ("pool padding 'same'", "max_pool2d", (X, 3), dict(padding="same"), TypeError, "padding"),
    ("pool dilation 0", "max_pool2d", (X, 2), dict(dilation=0), ValueError, "dilation"),
    ("pool output too small", "max_pool2d", (arr(1, 1, 2, 2), 3), {}, ValueError, "x"),
    (
        "pool dilated output too small",
        "max_pool2d",
        (arr(1, 1, 4, 4), 2),
        dict(dilation=4),
        ValueError,
        "x",
    ),
    (
        "pool output too small, ceil",
        "max_pool2d",
        (arr(1, 1, 1, 1), 3),
        dict(stride=1, ceil_mode=True),
        ValueError,
        "x",
    ),
    # --- max_pool2d_backward --------------------------------------------------------------
    (
        "pool grad_output shape",
        "max_pool2d_backward",
        (arr(2, 4, 3, 2), X, 2),
        {},
        ValueError,
        "grad_output",
    ),
    (
        "pool grad_output float32",
        "max_pool2d_backward",
        (P.astype(F32), X, 2),
        {},
        TypeError,
        "grad_output",
    ),
    ("indices float", "max_pool2d_backward", (P, X, 2), dict(indices=P), TypeError, "indices"),
    (
        "indices bool",
        "max_pool2d_backward",
        (P, X, 2),
        dict(indices=P.astype(bool)),
        TypeError,
        "indices",
    ),
    (
        "indices shape",
        "max_pool2d_backward",
        (P, X, 2),
        dict(indices=np.zeros((2, 4, 3), np.int64)),
        ValueError,
        "indices",
    ),
    (
        "indices too large",
        "max_pool2d_backward",
        (P, X, 2),
        dict(indices=np.full(P.shape, 36)),
        ValueError,
        "indices",
    ),
    (
        "indices below -1",
        "max_pool2d_backward",
        (P, X, 2),
        dict(indices=np.full(P.shape, -2)),
        ValueError,
        "indices",
    ),
    (
        "max backward padding > kernel/2",
        "max_pool2d_backward",
        (P, X, 2),
        dict(padding=2),
        ValueError,
        "padding",
    ),
    # --- avg_pool2d(_backward) ------------------------------------------------------------
    ("avg padding > kernel/2", "avg_pool2d", (X, 2), dict(padding=2), ValueError, "padding"),
    ("avg kernel_size 0", "avg_pool2d", (X, 0), {}, ValueError, "kernel_size"),
    ("avg stride negative", "avg_pool2d", (X, 2), dict(stride=-2), ValueError, "stride"),
    ("avg int", "avg_pool2d", (arr(2, 4, 6, 6, dtype=np.uint8), 2), {}, TypeError, "x"),
    ("avg output too small", "avg_pool2d", (arr(1, 1, 2, 5), 3), {}, ValueError, "x"),
    ("avg x 2-D", "avg_pool2d", (arr(6, 6), 2), {}, ValueError, "x"),
    (
        "avg grad_output shape",
        "avg_pool2d_backward",
        (arr(2, 4, 3, 4), X, 2),
        {},
        ValueError,
        "grad_output",
    ),
    (
        "avg grad_output float32",
        "avg_pool2d_backward",
        (P.astype(F32), X, 2),
        {},
        TypeError,
        "grad_output",
    ),
    (
        "avg grad_output complex",
        "avg_pool2d_backward",
        (P.astype(complex), X, 2),
        {},
        TypeError,
        "grad_output",
    ),
    # --- unfold ---------------------------------------------------------------------------
    ("unfold x 2-D", "unfold", (arr(6, 6), 2), {}, ValueError, "x"),
    ("unfold C 0", "unfold", (arr(2, 0, 6, 6), 2), {}, ValueError, "x"),
    ("unfold int", "unfold", (arr(2, 4, 6, 6, dtype=np.int16), 2), {}, TypeError, "x"),
    ("unfold kernel > padded input", "unfold", (X, 9), dict(padding=1), ValueError, "x"),
    ("unfold kernel_size 0", "unfold", (X, 0), {}, ValueError, "kernel_size"),
    ("unfold stride 0", "unfold", (X, 2), dict(stride=0), ValueError, "stride"),
    ("unfold dilation 0", "unfold", (X, 2), dict(dilation=0), ValueError, "dilation"),
    ("unfold padding negative", "unfold", (X, 2), dict(padding=-1), ValueError, "padding"),
    ("unfold padding str", "unfold", (X, 2), dict(padding="same"), TypeError, "padding"),
    # --- fold -----------------------------------------------------------------------------
    ("fold input 4-D", "fold", (X, (6, 6), 2), {}, ValueError, "input"),
    ("fold input 1-D", "fold", (arr(16), (6, 6), 2), {}, ValueError, "input"),
    ("fold wrong L", "fold", (arr(2, 16, 24), (6, 6), 2), {}, ValueError, "input"),
    ("fold L for another stride", "fold", (COLS, (6, 6), 2), dict(stride=2), ValueError, "input"),
    (
        "fold rows not a multiple of k*k",
        "fold",
        (arr(2, 15, 25), (6, 6), 2),
        {},
        ValueError,
        "input",
    ),
    ("fold rows 0", "fold", (arr(2, 0, 25), (6, 6), 2), {}, ValueError, "input"),
    ("fold int", "fold", (COLS.astype(np.int32), (6, 6), 2), {}, TypeError, "input"),
    ("fold output_size 0", "fold", (COLS, (0, 6), 2), {}, ValueError, "output_size"),
    ("fold output_size triple", "fold", (COLS, (6, 6, 6), 2), {}, TypeError, "output_size"),
    (
        "fold output_size < kernel",
        "fold",
        (arr(2, 4 * 16, 1), (3, 3), 4),
        {},
        ValueError,
        "output_size",
    ),
    ("fold kernel_size 0", "fold", (COLS, (6, 6), 0), {}, ValueError, "kernel_size"),
    ("fold stride 0", "fold", (COLS, (6, 6), 2), dict(stride=0), ValueError, "stride"),
    ("fold padding negative", "fold", (COLS, (6, 6), 2), dict(padding=-1), ValueError, "padding"),
]


@pytest.mark.parametrize("module", [fc, ref], ids=["fastconv", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_invalid_arguments_are_refused_naming_the_argument(case, module):
    _, name, args, kwargs, error, argument = case
    with pytest.raises(error) as info:
        getattr(module, name)(*args, **kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert re.match(rf"{argument}: ", str(info.value)), (
        f"message does not start with '{argument}: ': {info.value}"
    )


def test_valid_counterparts_of_the_refused_cases_are_accepted():
    """The boundaries just inside every rule above (so the rules are not simply too strict)."""
    assert fc.conv2d(arr(1, 1, 2, 2), arr(1, 1, 4, 4), padding=1).shape == (1, 1, 1, 1)
    assert fc.conv2d(X, W, groups=2, stride=2**31 - 1).shape == (2, 6, 1, 1)
    assert fc.conv2d(X, W, groups=2, padding="same").shape == (2, 6, 6, 6)
    assert fc.conv2d(X, W, groups=2, padding="valid", stride=2).shape == (2, 6, 2, 2)
    assert fc.conv2d(X, W, groups=np.int64(2), stride=np.array([1, 2])).shape == (2, 6, 4, 2)
    assert fc.conv2d(arr(0, 4, 6, 6), W, groups=2).shape == (0, 6, 4, 4)
    assert fc.max_pool2d(X, 4, padding=2).shape == (2, 4, 2, 2)
    assert fc.max_pool2d(X, (3, 2), stride=[]).shape == (2, 4, 2, 3)
    assert fc.max_pool2d(arr(1, 1, 1, 1), 2, ceil_mode=True).shape == (1, 1, 1, 1)
    assert fc.max_pool2d_backward(P, X, 2, indices=np.full(P.shape, 35, np.uint16)).shape == X.shape
    assert fc.fold(arr(2, 4 * 16, 1), (4, 4), 4).shape == (2, 4, 4, 4)


# --- sizes that cannot fit: MemoryError with the bytes, before allocating ----------------------

HUGE = np.broadcast_to(np.float32(1), (1, 1, 10**6, 10**6))  # 4 * 10**12 bytes if copied
HUGE_GRAD = np.broadcast_to(np.float32(1), (1, 1, 10**6 - 2, 10**6 - 2))
HUGE_CALLS = [
    ("conv2d", (HUGE, arr(1, 1, 3, 3, dtype=F32)), {}),
    ("conv2d_backward", (HUGE_GRAD, HUGE, arr(1, 1, 3, 3, dtype=F32)), {}),
    ("max_pool2d", (HUGE, 2), {}),
    ("max_pool2d_backward", (HUGE_GRAD, HUGE, 3), dict(stride=1)),
    ("avg_pool2d", (HUGE, 2), {}),
    ("avg_pool2d_backward", (HUGE_GRAD, HUGE, 3), dict(stride=1)),
    ("unfold", (HUGE, 2), {}),
]


@pytest.mark.parametrize("module", [fc, ref], ids=["fastconv", "reference"])
@pytest.mark.parametrize("call", HUGE_CALLS, ids=[c[0] for c in HUGE_CALLS])
def test_a_million_by_a_million_image_is_a_memory_error_naming_the_bytes(call, module):
    name, args, kwargs = call
    with pytest.raises(MemoryError, match=r"^x: .*needs 4,000,000,000,000 bytes"):
        getattr(module, name)(*args, **kwargs)


@pytest.mark.parametrize("module", [fc, ref], ids=["fastconv", "reference"])
def test_fold_to_a_huge_image_is_a_memory_error_before_allocating(module):
    cols = arr(1, 1, 1, dtype=F32)  # one block, stride 10**6: output (1, 1, 10**6, 10**6)
    with pytest.raises(MemoryError, match=r"^output: .*needs 4,000,000,000,000 bytes"):
        module.fold(cols, (10**6, 10**6), 1, stride=10**6)


@pytest.fixture
def one_mebibyte_machine(monkeypatch):
    monkeypatch.setattr(_args, "physical_memory", lambda: 2**20)


@pytest.mark.parametrize("module", [fc, ref], ids=["fastconv", "reference"])
def test_an_output_larger_than_memory_is_refused_with_its_size(one_mebibyte_machine, module):
    x = arr(1, 1, 64, 64)  # 32 KiB; unfold with an 8 x 8 kernel: 64 * 57 * 57 * 8 bytes out
    with pytest.raises(MemoryError, match=r"^output: .*needs 1,663,488 bytes"):
        module.unfold(x, 8)
    with pytest.raises(MemoryError, match=r"^output: .*needs 1,663,488 bytes"):
        module.conv2d(arr(1, 1, 64, 64), arr(64, 1, 8, 8))


def test_a_workspace_larger_than_memory_is_refused_before_allocating(one_mebibyte_machine):
    """Small input and output, but one sample's patch matrix (64*9 x 32*32 doubles) is 4.5 MiB.
    Run in a fresh thread: its workspace cache is empty, so the workspace must be allocated."""
    x, weight = arr(1, 64, 32, 32), arr(1, 64, 3, 3)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fc.conv2d, x, weight, padding=1)
        with pytest.raises(MemoryError, match=r"^workspace: .*needs [\d,]+ bytes"):
            future.result()
