"""fastconv.linear and nn.Linear's products on the kernels' thread team, against torch."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv as fc
from fastconv import _conv, nn
from fastconv import functional as F
from fastconv import reference as ref


@settings(max_examples=40, deadline=None)
@given(
    batch=st.lists(st.integers(0, 6), min_size=0, max_size=2),
    in_features=st.integers(0, 70),
    out_features=st.integers(1, 40),
    bias=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    threads=st.sampled_from([1, 2]),
)
def test_linear_matches_torch_and_the_reference(
    batch, in_features, out_features, bias, dtype, threads
):
    rng = np.random.default_rng(in_features * 100 + out_features)
    x = rng.standard_normal((*batch, in_features)).astype(dtype)
    w = rng.standard_normal((out_features, in_features)).astype(dtype)
    b = rng.standard_normal(out_features).astype(dtype) if bias else None
    previous = fc.get_num_threads()
    fc.set_num_threads(threads)
    try:
        got = fc.linear(x, w, b)
    finally:
        fc.set_num_threads(previous)
    expected = torch.nn.functional.linear(
        torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b)
    ).numpy()
    assert got.shape == expected.shape and got.dtype == dtype
    tol = (3e-5 if dtype == np.float32 else 1e-12) * max(1.0, np.abs(expected).max(initial=0))
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)
    np.testing.assert_allclose(ref.linear(x, w, b), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("m", [1, 2, 3, 64, 129])
def test_team_matmul_of_every_orientation(trans_a, trans_b, m):
    rng = np.random.default_rng(m)
    a = rng.standard_normal((37, m) if trans_a else (m, 37)).astype(np.float32)
    b = rng.standard_normal((11, 37) if trans_b else (37, 11)).astype(np.float32)
    expected = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
    np.testing.assert_allclose(F._matmul(a, b, trans_a, trans_b), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("micro_kernel", [True, False])
@pytest.mark.parametrize(
    "trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)]
)
@pytest.mark.parametrize(
    "m, n, k", [(1, 16, 1), (9, 48, 37), (64, 128, 300), (5, 176, 129), (3, 32, 17)]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_team_matmul_on_both_kernels(monkeypatch, micro_kernel, trans_a, trans_b, m, n, k, threads):
    """n a multiple of 16: the micro-kernel (on AVX-512), each thread a block of columns; or BLAS.
    k past 128: the micro-kernel's blocks of the reduction added up. A spy records the path."""
    paths = []
    team_gemm = _conv.team_gemm
    monkeypatch.setattr(_conv, "team_gemm", lambda *args: paths.append(team_gemm(*args)))
    rng = np.random.default_rng(m * n + k)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    expected = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
    previous = fc.get_num_threads()
    fc.set_num_threads(threads)
    _conv.use_dense_microkernel(micro_kernel)
    try:
        got = F._matmul(a, b, trans_a, trans_b)
    finally:
        _conv.use_dense_microkernel(True)
        fc.set_num_threads(previous)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    on_avx512 = _conv.has_shifted_weight_grad  # the same CPU check as the dense kernel's
    assert paths == ["micro-kernel" if micro_kernel and on_avx512 else "BLAS"]


def test_linear_layer_gradients_match_torch():
    rng = np.random.default_rng(3)
    layer = nn.Linear(300, 20, rng=1)
    t_layer = torch.nn.Linear(300, 20)
    t_layer.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in layer.state_dict().items()}
    )
    x = rng.standard_normal((4, 5, 300)).astype(np.float32)
    g = rng.standard_normal((4, 5, 20)).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_()
    out = t_layer(tx)
    out.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer(x), out.detach().numpy(), atol=2e-5)
    layer.needs_input_grad = True
    grad_x = layer.backward(g)
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), atol=2e-5)
    np.testing.assert_allclose(layer.weight.grad, t_layer.weight.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(layer.bias.grad, t_layer.bias.grad.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "x_shape,w_shape,b_shape,error,names",
    [
        ((3, 5), (4, 6), None, ValueError, "in_features"),
        ((3, 5), (4, 5, 1), None, ValueError, "weight"),
        ((), (4, 5), None, ValueError, "input"),
        ((3, 5), (4, 5), (3,), ValueError, "bias"),
    ],
)
def test_linear_refuses_bad_shapes(x_shape, w_shape, b_shape, error, names):
    args = [np.ones(x_shape, np.float32), np.ones(w_shape, np.float32)]
    args.append(None if b_shape is None else np.ones(b_shape, np.float32))
    with pytest.raises(error, match=names):
        fc.linear(*args)


def test_linear_refuses_mixed_dtypes():
    with pytest.raises(TypeError, match="float64"):
        fc.linear(np.ones((2, 3)), np.ones((4, 3), np.float32))
