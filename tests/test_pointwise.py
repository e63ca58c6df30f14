"""The element-wise kernels (relu, its backward, bias sums, the finiteness check) against torch
and the NumPy reference, at sizes around the threads' block-aligned shares."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv as fc
from fastconv import functional as F
from fastconv import nn
from fastconv import reference as ref

SIZES = [0, 1, 15, 16, 63, 64, 65, 127, 129, 1000, 100_003]


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = fc.get_num_threads()
    fc.set_num_threads(request.param)
    yield request.param
    fc.set_num_threads(before)


def with_specials(n, dtype, seed):
    """Random values with NaN, +-inf and -0.0 sprinkled in (when there is room)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(dtype)
    for value in (np.nan, np.inf, -np.inf, -0.0, 0.0):
        if n:
            x[rng.integers(n)] = value
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
def test_relu_and_its_gradient_match_torch(n, dtype, threads):
    x = with_specials(n, dtype, n)
    grad = np.random.default_rng(n + 1).standard_normal(n).astype(dtype)
    out = F.relu(x)
    tx = torch.from_numpy(x).requires_grad_()
    ty = torch.relu(tx)
    ty.backward(torch.from_numpy(grad))
    np.testing.assert_array_equal(out, ty.detach().numpy())
    np.testing.assert_array_equal(out, ref.relu(x))
    grad_input = F.relu_backward(grad, out)
    np.testing.assert_array_equal(grad_input, tx.grad.numpy())
    np.testing.assert_array_equal(grad_input, ref.relu_backward(grad, out))
    assert out.dtype == grad_input.dtype == dtype


def test_relu_keeps_shape_takes_views_and_integers():
    x = np.arange(-12, 12, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(F.relu(x[:, ::2, 1:]), np.maximum(x[:, ::2, 1:], 0))
    ints = np.arange(-3, 3)
    np.testing.assert_array_equal(F.relu(ints), torch.relu(torch.from_numpy(ints)).numpy())


def test_relu_backward_refuses_mismatched_arguments():
    out = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"grad_output: expected shape \(2, 3\)"):
        F.relu_backward(np.ones((3, 2), np.float32), out)
    with pytest.raises(TypeError, match="grad_output: dtype float64"):
        F.relu_backward(np.ones((2, 3)), out)
    with pytest.raises(TypeError, match="output: expected a float32 or float64"):
        F.relu_backward(np.ones((2, 3), np.float32), np.ones((2, 3), np.int32))


@pytest.mark.parametrize("n", [n for n in SIZES if n])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_finiteness_check_finds_one_bad_value_anywhere(n, value, threads):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert F._all_finite(x, x.astype(np.float64))
    for at in sorted({0, n // 2, n - 1, min(n - 1, 64), min(n - 1, (n + 1) // 2)}):
        bad = x.copy()
        bad[at] = value
        assert not F._all_finite(bad)
        assert not F._all_finite(x, bad.astype(np.float64))


def test_finiteness_check_accepts_the_largest_floats():
    big = np.full(1000, np.finfo(np.float32).max, np.float32)  # x - x stays 0: no overflow
    assert F._all_finite(big, -big)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 5), st.integers(1, 40), st.integers(0, 300)),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_bias_sums_match_the_float64_sum(shape, dtype):
    grad = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)
    sums = F._channel_sums(grad)
    assert sums.dtype == dtype and sums.shape == (shape[1],)
    expected = grad.astype(np.float64).sum(axis=(0, 2))
    np.testing.assert_allclose(sums, expected, rtol=1e-6, atol=1e-6 * max(1, shape[0] * shape[2]))


def test_relu_layer_trains_as_torchs():
    """A ReLU inside a model: its output and the gradients through it, against torch."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    model = nn.Sequential(nn.Linear(10, 8, rng=1), nn.ReLU(), nn.Linear(8, 3, rng=2))
    t_model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for i in (0, 2):
            t_model[i].weight.copy_(torch.from_numpy(model.layers[i].weight.data))
            t_model[i].bias.copy_(torch.from_numpy(model.layers[i].bias.data))
    y = model(x)
    t_y = t_model(torch.from_numpy(x))
    np.testing.assert_allclose(y, t_y.detach().numpy(), rtol=1e-5, atol=1e-6)
    grad = rng.standard_normal(y.shape).astype(np.float32)
    model.backward(grad)
    t_y.backward(torch.from_numpy(grad))
    np.testing.assert_allclose(
        model.layers[0].weight.grad, t_model[0].weight.grad.numpy(), rtol=1e-5, atol=1e-6
    )
