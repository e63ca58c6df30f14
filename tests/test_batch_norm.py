"""batch_norm / batch_norm_backward: compiled kernels against the NumPy reference, the reference
against finite differences, and both against torch where it is installed."""

import numpy as np
import pytest

import fastconv as fc
from fastconv import reference as ref

SHAPES = [(8, 3, 5, 7), (4, 2, 9), (16, 6), (2, 4, 1, 1)]


def _case(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    c = shape[1]
    return x, rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype), rng


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_kernels_match_the_reference(shape, dtype, rtol, training, affine):
    x, w, b, rng = _case(shape, dtype)
    w, b = (w, b) if affine else (None, None)
    stats = [(rng.random(shape[1]) + 0.5).astype(dtype) for _ in range(2)]
    ours, theirs = [s.copy() for s in stats], [s.copy() for s in stats]
    out = fc.batch_norm(x, *ours, w, b, training, 0.1, 1e-5)
    expected = ref.batch_norm(x, *theirs, w, b, training, 0.1, 1e-5)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out, expected, atol=rtol * scale * 10, rtol=0)
    assert out.dtype == x.dtype
    for a, e in zip(ours, theirs):  # running statistics updated alike
        np.testing.assert_allclose(a, e, rtol=rtol * 10)
    grad = rng.standard_normal(shape).astype(dtype)
    got = fc.batch_norm_backward(grad, x, w, *stats, training, 1e-5)
    want = ref.batch_norm_backward(grad, x, w, *stats, training, 1e-5)
    # scaled by the terms, not the result: with two values per channel the result cancels to ~0
    terms = np.abs(grad).max() * (1 if w is None else max(1, np.abs(w).max()))
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, atol=rtol * 100 * (np.abs(e).max() + terms), rtol=0)


@pytest.mark.parametrize("training", [True, False])
def test_reference_backward_matches_finite_differences(training):
    x, w, b, rng = _case((3, 2, 4, 3), np.float64, seed=1)
    mean, var = rng.random(2), rng.random(2) + 0.5
    grad = rng.standard_normal(x.shape)

    def loss(x_, w_, b_):
        return float((ref.batch_norm(x_, mean.copy(), var.copy(), w_, b_, training) * grad).sum())

    got = ref.batch_norm_backward(grad, x, w, mean, var, training)
    for arg, analytic in zip((0, 1, 2), got):
        values = [x, w, b]
        numeric = np.zeros_like(values[arg])
        for i in np.ndindex(numeric.shape):
            for sign in (1, -1):
                shifted = [v.copy() for v in values]
                shifted[arg][i] += sign * 1e-6
                numeric[i] += sign * loss(*shifted) / 2e-6
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch(dtype, training):
    torch = pytest.importorskip(
        "torch", reason="torch not installed: batch_norm parity not checked"
    )
    x, w, b, rng = _case((8, 4, 6, 5), dtype, seed=2)
    stats = [rng.random(4).astype(dtype) + 0.5 for _ in range(2)]
    ours = [s.copy() for s in stats]
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    tstats = [torch.tensor(s) for s in stats]
    expected = torch.nn.functional.batch_norm(tx, *tstats, tw, tb, training, 0.1, 1e-5)
    grad = rng.standard_normal(x.shape).astype(dtype)
    expected.backward(torch.tensor(grad))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(
        fc.batch_norm(x, *ours, w, b, training, 0.1, 1e-5),
        expected.detach().numpy(),
        rtol=tol * 10,
        atol=tol * 10,
    )
    for a, e in zip(ours, tstats):
        np.testing.assert_allclose(a, e.numpy(), rtol=tol * 10)
    got = fc.batch_norm_backward(grad, x, w, *stats, training, 1e-5)
    for g, t in zip(got, (tx.grad, tw.grad, tb.grad)):
        np.testing.assert_allclose(g, t.numpy(), rtol=tol * 100, atol=tol * 100)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: fc.batch_norm(x, np.zeros(2), np.ones(2)), "running_mean: expected shape"),
        (lambda x: fc.batch_norm(x, None, None), "running_mean: needed"),
        (
            lambda x: fc.batch_norm(x[:1, :, :1, :1], None, None, training=True),
            "input: expected more than 1",
        ),
        (
            lambda x: fc.batch_norm(x, None, None, np.ones(3, np.float64), training=True),
            "weight: dtype",
        ),
        (
            lambda x: fc.batch_norm(x[0, 0, 0], None, None, training=True),
            "input: expected at least 2",
        ),
        (
            lambda x: fc.batch_norm_backward(np.ones((1, 3), np.float32), x, training=True),
            "grad_output",
        ),
    ],
)
def test_bad_arguments_are_named(call, match):
    x = np.ones((4, 3, 2, 2), dtype=np.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x)
