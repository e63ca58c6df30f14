"""fastconv.nn: every backward against finite differences, and parity with torch.nn."""

import io
import json

import numpy as np
import pytest

import fastconv.functional
from fastconv import nn


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is needed for the parity tests")


# -- finite differences -------------------------------------------------------------------------


def numeric_grad(f, array, eps=1e-6):
    """Central differences of the scalar f() w.r.t. every element of array (changed in place)."""
    grad = np.zeros_like(array)
    flat, grad_flat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        plus = f()
        flat[i] = saved - eps
        minus = f()
        flat[i] = saved
        grad_flat[i] = (plus - minus) / (2 * eps)
    return grad


def check_gradients(make_layer, x, seed=0):
    """backward's input and parameter gradients equal central differences of sum(out * g).

    make_layer() builds a float64 layer (so differences are accurate), the same function each
    time it is called.
    """
    layer = make_layer()
    out = layer(x)
    g = np.random.default_rng(seed).standard_normal(out.shape)
    layer.zero_grad()
    grad_x = layer.backward(g)

    def objective():
        # Dropout draws a new mask on every call: a fresh layer with the same seed repeats it
        current = make_layer() if isinstance(layer, nn.Dropout) else layer
        return float(np.sum(current(x) * g))

    np.testing.assert_allclose(grad_x, numeric_grad(objective, x), rtol=1e-6, atol=1e-8)
    for name, param in layer.named_parameters():
        expected = numeric_grad(objective, param.data)
        np.testing.assert_allclose(param.grad, expected, rtol=1e-6, atol=1e-8, err_msg=name)
    return grad_x


def away_from_zero(shape, seed=1):
    """Random values with |x| >= 0.1: kinks (ReLU at 0) stay out of the difference stencil."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return x + np.sign(x) * 0.1


F64 = {"dtype": np.float64}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"stride": 2, "padding": 1},
        {"padding": (1, 2), "dilation": (2, 1), "bias": False},
        {"groups": 2, "stride": (1, 2)},
        {"padding": "same"},
    ],
)
def test_conv2d_gradients(kwargs):
    x = np.random.default_rng(2).standard_normal((2, 4, 6, 5))
    check_gradients(lambda: nn.Conv2d(4, 4, 3, **kwargs, **F64, rng=3), x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 2},
        {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
        {"kernel_size": (2, 3), "stride": 1, "dilation": (1, 2)},
    ],
)
def test_max_pool2d_gradients(kwargs):
    # distinct values: no ties, so the maximum is differentiable at x
    x = np.random.default_rng(4).permutation(2 * 3 * 7 * 7).reshape(2, 3, 7, 7) / 10.0
    check_gradients(lambda: nn.MaxPool2d(**kwargs), x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 2},
        {
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "ceil_mode": True,
            "count_include_pad": False,
        },
        {"kernel_size": (3, 2), "stride": (1, 2), "padding": (1, 0)},
    ],
)
def test_avg_pool2d_gradients(kwargs):
    x = np.random.default_rng(5).standard_normal((2, 3, 7, 6))
    check_gradients(lambda: nn.AvgPool2d(**kwargs), x)


@pytest.mark.parametrize(
    "make_layer",
    [
        nn.ReLU,
        nn.LeakyReLU,
        lambda: nn.LeakyReLU(0.2),
        lambda: nn.LeakyReLU(1.5),
        lambda: nn.LeakyReLU(-0.3),
        nn.Flatten,
        lambda: nn.Flatten(2, 3),
        lambda: nn.Flatten(0, -2),
    ],
)
def test_elementwise_and_reshape_gradients(make_layer):
    check_gradients(make_layer, away_from_zero((2, 3, 4, 5)))


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(shape, bias):
    x = np.random.default_rng(6).standard_normal(shape)
    check_gradients(lambda: nn.Linear(6, 5, bias, **F64, rng=7), x)


def test_dropout_gradients():
    x = away_from_zero((3, 4, 5))
    grad_x = check_gradients(lambda: nn.Dropout(0.4, rng=8), x)
    assert 0 < np.count_nonzero(grad_x == 0) < x.size


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"affine": False},
        {"track_running_stats": False},
        {"momentum": None},
        {"bias": False},
    ],
)
def test_batchnorm2d_gradients(training, kwargs):
    def make():
        layer = nn.BatchNorm2d(3, **kwargs, **F64)
        if layer.affine:  # not the trivial 1 and 0
            layer.weight.data = np.array([0.5, -1.5, 2.0])
        if layer.bias is not None:
            layer.bias.data = np.array([0.1, 0.2, -0.3])
        if layer.track_running_stats:
            layer.running_mean[:] = [0.3, -0.2, 0.1]
            layer.running_var[:] = [0.5, 2.0, 1.5]
        return layer.train(training)

    check_gradients(make, np.random.default_rng(9).standard_normal((3, 3, 4, 2)))


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2)])
def test_batchnorm1d_gradients(shape):
    x = np.random.default_rng(10).standard_normal(shape)
    check_gradients(lambda: nn.BatchNorm1d(3, **F64), x)


def test_sequential_gradients():
    def make():
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, **F64, rng=1),
            nn.BatchNorm2d(3, **F64),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 2, **F64, rng=2),
            nn.AvgPool2d(2, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 3, **F64, rng=3),
            nn.ReLU(),
            nn.Linear(3, 2, **F64, rng=4),
            needs_input_grad=True,
        )

    check_gradients(make, np.random.default_rng(11).standard_normal((2, 2, 8, 8)))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_gradient(label_smoothing):
    logits = np.random.default_rng(12).standard_normal((5, 4)) * 3
    target = np.array([0, 3, 1, 1, 2])
    criterion = nn.CrossEntropyLoss(label_smoothing)
    criterion(logits, target)
    grad = criterion.backward()
    expected = numeric_grad(lambda: criterion(logits, target), logits)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-9)


def test_cross_entropy_is_stable_and_checks_targets():
    criterion = nn.CrossEntropyLoss()
    logits = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    assert criterion(logits, np.array([0])) == 0.0
    assert criterion(logits, np.array([2])) == pytest.approx(2000.0)
    assert np.all(np.isfinite(criterion.backward()))
    with pytest.raises(RuntimeError):
        criterion.backward()
    with pytest.raises(ValueError, match="class indices"):
        criterion(logits, np.array([3]))
    with pytest.raises(ValueError, match="target"):
        criterion(logits, np.array([0, 1]))


# -- module behaviour ----------------------------------------------------------------------------


def small_model(dtype=np.float32, seed=0):
    """LeNet-like, on (N, 1, 16, 16) inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, dtype=dtype, rng=seed),
        nn.BatchNorm2d(6, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, dtype=dtype, rng=seed + 1),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Dropout(0.3, rng=seed),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 16, dtype=dtype, rng=seed + 2),
        nn.ReLU(),
        nn.Linear(16, 10, dtype=dtype, rng=seed + 3),
    )


def test_float32_stays_float32():
    model = small_model()
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    for layer in model:
        x = layer(x)
        assert x.dtype == np.float32, layer
    criterion(x, np.array([1, 2, 3, 4]))
    grad = criterion.backward()
    assert grad.dtype == np.float32
    for layer in reversed(model.layers[1:]):
        grad = layer.backward(grad)
        assert grad.dtype == np.float32, layer
    assert model[0].backward(grad) is None  # the first layer skips its input gradient
    for name, param in model.named_parameters():
        assert param.data.dtype == param.grad.dtype == np.float32, name
    assert all(b.dtype in (np.float32, np.int64) for _, b in model.named_buffers())


def test_mixed_dtypes_are_refused():
    x64 = np.zeros((2, 4))
    with pytest.raises(TypeError, match="dtype"):
        nn.Linear(4, 3)(x64)
    with pytest.raises(TypeError, match="dtype"):
        nn.BatchNorm1d(4)(x64)
    with pytest.raises(TypeError):
        nn.Conv2d(1, 2, 3)(np.zeros((1, 1, 5, 5)))
    model = small_model().to(np.float64)
    assert model(np.zeros((2, 1, 16, 16))).dtype == np.float64
    assert all(p.dtype == np.float64 for p in model.parameters())


def test_default_initialisation_is_torch_distribution_and_seeded():
    conv = nn.Conv2d(8, 64, 5, groups=2, rng=0)
    bound = 1 / np.sqrt(4 * 5 * 5)
    for array in (conv.weight.data, conv.bias.data):
        assert np.abs(array).max() <= bound
    assert np.abs(conv.weight.data).max() > 0.95 * bound
    assert abs(conv.weight.data.mean()) < 0.05 * bound
    assert np.array_equal(conv.weight.data, nn.Conv2d(8, 64, 5, groups=2, rng=0).weight.data)
    linear = nn.Linear(100, 50, rng=np.random.default_rng(1))
    assert np.abs(linear.weight.data).max() <= 0.1 and np.abs(linear.bias.data).max() <= 0.1
    assert np.array_equal(linear.weight.data, nn.Linear(100, 50, rng=1).weight.data)
    assert not np.array_equal(nn.Linear(3, 3).weight.data, nn.Linear(3, 3).weight.data)


def test_dropout_modes():
    x = np.ones((100, 100), dtype=np.float32)
    layer = nn.Dropout(0.25, rng=3)
    out = layer(x)
    assert out.dtype == np.float32
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
    assert abs(np.mean(out == 0) - 0.25) < 0.02
    np.testing.assert_array_equal(layer.backward(x), out)
    assert np.array_equal(nn.Dropout(0.25, rng=3)(x), out)
    layer.eval()
    assert layer(x) is x and layer.backward(x) is x
    assert np.all(nn.Dropout(1.0)(x) == 0)


def test_train_eval_and_zero_grad_and_accumulation():
    model = small_model()
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    model[7].eval()  # dropout off: the two passes below are the same function
    x = np.random.default_rng(1).standard_normal((3, 1, 16, 16)).astype(np.float32)
    g = np.ones((3, 10), dtype=np.float32)
    model(x)
    model.backward(g)
    first = [p.grad.copy() for p in model.parameters()]
    model(x)
    model.backward(g)
    for once, param in zip(first, model.parameters()):
        np.testing.assert_allclose(param.grad, 2 * once, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model(x)
    model.backward(g)
    model.zero_grad(set_to_none=False)
    assert all(np.all(p.grad == 0) for p in model.parameters())


def test_sequential_skips_its_input_gradient(monkeypatch):
    calls = []
    original = fastconv.functional.conv2d_backward

    def spy(*args, output_mask=(True, True, True), **kwargs):
        calls.append(tuple(output_mask))
        return original(*args, output_mask=output_mask, **kwargs)

    monkeypatch.setattr(fastconv.functional, "conv2d_backward", spy)
    model = small_model()
    x = np.zeros((2, 1, 16, 16), dtype=np.float32)
    model(x)
    assert model.backward(np.ones((2, 10), dtype=np.float32)) is None
    assert calls == [(True, True, True), (False, True, True)]
    assert model[0].weight.grad is not None
    model.needs_input_grad = True
    model(x)
    assert model.backward(np.ones((2, 10), dtype=np.float32)).shape == x.shape
    # slicing and nesting keep every inner layer's gradient
    model.needs_input_grad = False
    tail = model[4:]
    assert tail.needs_input_grad and not model.needs_input_grad
    outer = nn.Sequential(nn.Flatten(0, 0), nn.Sequential(nn.ReLU()))
    assert outer[1].needs_input_grad and not outer[0].needs_input_grad
    assert len(model) == 12 and isinstance(model[-1], nn.Linear) and len(list(model)) == 12


def test_state_dict_keys_and_copies():
    model = small_model()
    state = model.state_dict()
    assert list(state) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "4.weight",
        "4.bias",
        "9.weight",
        "9.bias",
        "11.weight",
        "11.bias",
    ]
    tracked = state["1.num_batches_tracked"]
    assert tracked.dtype == np.int64 and tracked.shape == ()
    state["0.weight"][...] = 0
    assert np.any(model[0].weight.data != 0)
    assert [name for name, _ in model.named_parameters()] == [
        k for k in state if "running" not in k and "num_batches" not in k
    ]


def test_load_state_dict_validates_before_writing():
    model, other = small_model(seed=0), small_model(seed=10)
    before = model.state_dict()
    bad = other.state_dict()
    bad["9.weight"] = np.zeros((16, 71), dtype=np.float32)  # one wrong among many good ones
    with pytest.raises(ValueError, match=r"9\.weight.*\(16, 71\).*\(16, 72\)"):
        model.load_state_dict(bad)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)

    wrong_kind = other.state_dict()
    wrong_kind["0.bias"] = np.zeros(6, dtype=np.int64)
    with pytest.raises(ValueError, match="0.bias"):
        model.load_state_dict(wrong_kind)
    missing = other.state_dict()
    del missing["1.running_var"]
    missing["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['1.running_var'\].*unexpected.*'extra'"):
        model.load_state_dict(missing)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)

    result = model.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["1.running_var"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(model[0].weight.data, other[0].weight.data)
    float64_state = {
        k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in other.state_dict().items()
    }
    model.load_state_dict(float64_state)
    assert model[0].weight.dtype == np.float32


def test_config_round_trip_gives_identical_outputs():
    model = nn.Sequential(
        small_model(),
        nn.BatchNorm1d(10, momentum=None, affine=False),
        nn.Linear(10, 3, bias=False, rng=1),
        nn.Dropout(0.1),
        nn.LeakyReLU(0.3),
    )
    model.train()
    x = np.random.default_rng(2).standard_normal((4, 1, 16, 16)).astype(np.float32)
    model(x)  # moves the running statistics away from their initial values
    config = json.loads(json.dumps(nn.to_config(model)))
    assert config["type"] == "Sequential" and config["layers"][0]["type"] == "Sequential"
    copy = nn.from_config(config)
    copy.load_state_dict(model.state_dict())
    model.eval(), copy.eval()
    np.testing.assert_array_equal(copy(x), model(x))
    assert repr(copy) == repr(model)

    conv = nn.Conv2d(
        2, 4, (1, 3), padding="same", dilation=(1, 2), groups=2, bias=False, dtype=np.float64
    )
    rebuilt = nn.from_config(nn.to_config(conv))
    assert rebuilt.config() == conv.config() and rebuilt.weight.dtype == np.float64
    for layer in (
        nn.MaxPool2d((2, 3), (1, 2), 1, 1, ceil_mode=True),
        nn.Flatten(1, 2),
        nn.AvgPool2d(3, 2, 1, True, False),
        nn.CrossEntropyLoss(0.1),
        nn.BatchNorm2d(3, 1e-3, 0.2, False, False),
        nn.BatchNorm2d(2, bias=False),
    ):
        config = json.loads(json.dumps(nn.to_config(layer)))
        assert nn.from_config(config).config() == layer.config()


def test_from_config_errors():
    with pytest.raises(ValueError, match="Conv3d"):
        nn.from_config({"type": "Conv3d", "config": {}})
    with pytest.raises(ValueError, match="Linear"):
        nn.from_config({"type": "Linear", "config": {"in_features": 3, "bogus": 1}})
    with pytest.raises(ValueError):
        nn.from_config(["Linear"])

    class Custom(nn.Module):
        pass

    with pytest.raises(ValueError, match="Custom"):
        nn.to_config(Custom())


def test_state_dict_saves_to_npz_without_pickle():
    model = small_model()
    buffer = io.BytesIO()
    np.savez(buffer, **model.state_dict())
    buffer.seek(0)
    copy = small_model(seed=5)
    with np.load(buffer, allow_pickle=False) as data:
        copy.load_state_dict(dict(data))
    model.eval(), copy.eval()
    x = np.ones((1, 1, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(copy(x), model(x))


# -- parity with torch.nn ------------------------------------------------------------------------


def torch_model(torch, dtype):
    tnn = torch.nn
    return tnn.Sequential(
        tnn.Conv2d(1, 6, 3, padding=1),
        tnn.BatchNorm2d(6),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Conv2d(6, 8, 3),
        tnn.LeakyReLU(0.1),
        tnn.AvgPool2d(2),
        tnn.Dropout(0.3),
        tnn.Flatten(),
        tnn.Linear(8 * 3 * 3, 16),
        tnn.ReLU(),
        tnn.Linear(16, 10),
    ).to(dtype)


def to_torch(torch, state):
    return {key: torch.from_numpy(value.copy()) for key, value in state.items()}


def to_numpy(state):
    return {key: value.detach().numpy() for key, value in state.items()}


TOLERANCES = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [False, True])
def test_forward_backward_parity_with_torch(torch, dtype, training):
    tol = TOLERANCES[dtype]
    ours = small_model(dtype, seed=3)
    ours.needs_input_grad = True
    theirs = torch_model(torch, getattr(torch, np.dtype(dtype).name))
    theirs.load_state_dict(to_torch(torch, ours.state_dict()))  # ours -> torch
    with torch.no_grad():  # non-trivial BatchNorm parameters and statistics
        theirs[1].weight.uniform_(0.5, 1.5)
        theirs[1].bias.uniform_(-0.5, 0.5)
        theirs[1].running_mean.uniform_(-0.5, 0.5)
        theirs[1].running_var.uniform_(0.5, 2)
    ours.load_state_dict(to_numpy(theirs.state_dict()))  # torch -> ours
    ours.train(training), theirs.train(training)
    ours[7].eval(), theirs[7].eval()  # dropout: different random streams

    x = np.random.default_rng(4).standard_normal((5, 1, 16, 16)).astype(dtype)
    y = np.array([0, 3, 9, 3, 5])
    for smoothing in (0.0, 0.1):
        ours.zero_grad(), theirs.zero_grad()
        x_torch = torch.from_numpy(x.copy()).requires_grad_()
        logits_torch = theirs(x_torch)
        loss_torch = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(
            logits_torch, torch.from_numpy(y)
        )
        loss_torch.backward()
        criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)
        logits = ours(x)
        assert logits.dtype == dtype
        np.testing.assert_allclose(logits, logits_torch.detach().numpy(), rtol=tol, atol=tol)
        assert criterion(logits, y) == pytest.approx(loss_torch.item(), rel=tol, abs=tol)
        grad_x = ours.backward(criterion.backward())
        np.testing.assert_allclose(grad_x, x_torch.grad.numpy(), rtol=tol, atol=tol)
        torch_grads = {name: p.grad.numpy() for name, p in theirs.named_parameters()}
        assert [name for name, _ in ours.named_parameters()] == list(torch_grads)
        for name, param in ours.named_parameters():
            np.testing.assert_allclose(
                param.grad, torch_grads[name], rtol=tol, atol=tol, err_msg=name
            )
    for key, value in theirs.state_dict().items():  # running statistics after two train passes
        np.testing.assert_allclose(
            ours.state_dict()[key], value.numpy(), rtol=tol, atol=tol, err_msg=key
        )


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_running_stats_match_torch(torch, momentum):
    ours = nn.BatchNorm2d(4, momentum=momentum)
    theirs = torch.nn.BatchNorm2d(4, momentum=momentum)
    rng = np.random.default_rng(5)
    for step in range(4):
        x = (rng.standard_normal((6, 4, 5, 3)) * (step + 1) + step).astype(np.float32)
        np.testing.assert_allclose(ours(x), theirs(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    for key, value in theirs.state_dict().items():
        np.testing.assert_allclose(
            ours.state_dict()[key], value.numpy(), rtol=1e-6, atol=1e-6, err_msg=key
        )
    assert ours.state_dict()["num_batches_tracked"] == 4


def test_cross_entropy_matches_torch(torch):
    rng = np.random.default_rng(6)
    for dtype, tol in TOLERANCES.items():
        logits = (rng.standard_normal((8, 10)) * 4).astype(dtype)
        y = rng.integers(0, 10, 8)
        for smoothing in (0.0, 0.05, 1.0):
            t_logits = torch.from_numpy(logits.copy()).requires_grad_()
            loss = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(
                t_logits, torch.from_numpy(y)
            )
            loss.backward()
            criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)
            assert criterion(logits, y) == pytest.approx(loss.item(), rel=tol, abs=tol)
            grad = criterion.backward()
            assert grad.dtype == dtype
            np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=tol, atol=tol)


def test_repr_matches_torch(torch):
    tnn = torch.nn
    pairs = [
        (nn.Conv2d(1, 32, 3, padding=1), tnn.Conv2d(1, 32, 3, padding=1)),
        (nn.Conv2d(4, 8, (3, 5), 2, 0, 2, 4, False), tnn.Conv2d(4, 8, (3, 5), 2, 0, 2, 4, False)),
        (nn.Conv2d(1, 2, 3, padding="same"), tnn.Conv2d(1, 2, 3, padding="same")),
        (nn.MaxPool2d(2), tnn.MaxPool2d(2)),
        (
            nn.MaxPool2d((3, 2), 1, 1, 2, ceil_mode=True),
            tnn.MaxPool2d((3, 2), 1, 1, 2, ceil_mode=True),
        ),
        (nn.AvgPool2d(2), tnn.AvgPool2d(2)),
        (nn.AvgPool2d(3, 1, 1), tnn.AvgPool2d(3, 1, 1)),
        (nn.ReLU(), tnn.ReLU()),
        (nn.LeakyReLU(0.2), tnn.LeakyReLU(0.2)),
        (nn.Flatten(), tnn.Flatten()),
        (nn.Linear(3, 4, False), tnn.Linear(3, 4, False)),
        (nn.BatchNorm2d(8, momentum=None), tnn.BatchNorm2d(8, momentum=None)),
        (nn.BatchNorm1d(8, affine=False), tnn.BatchNorm1d(8, affine=False)),
        (nn.BatchNorm2d(8, bias=False), tnn.BatchNorm2d(8, bias=False)),
        (nn.CrossEntropyLoss(), tnn.CrossEntropyLoss()),
    ]
    for ours, theirs in pairs:
        assert repr(ours) == repr(theirs)
    assert repr(small_model()).replace("Dropout(p=0.3)", "Dropout(p=0.3, inplace=False)") == repr(
        torch_model(torch, torch.float32)
    )


def test_no_grad_gives_the_same_outputs():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, rng=0),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, rng=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8, 3, rng=2),
    )
    model.eval()
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    x[0, 0, 2, 2] = np.nan
    expected = model(x)
    assert nn.is_grad_enabled()
    with nn.no_grad():
        assert not nn.is_grad_enabled()
        got = model(x)
    assert nn.is_grad_enabled()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_conv_relu_max_pool_matches_torch(dtype):
    """Sequential pools a convolution's output in the same pass (Conv2d.forward_pooled) and runs
    the ReLU after the pool: values and every gradient must still be torch's."""
    torch = pytest.importorskip("torch", reason="torch not installed: fused parity not checked")
    ours = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, rng=0, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, rng=1, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 3, rng=2, dtype=dtype),
    )
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(2, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 8, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2, stride=1),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 3 * 3, 3),
    ).to(tdtype)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    ours.needs_input_grad = True
    x = np.random.default_rng(3).standard_normal((5, 2, 12, 12)).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    out, tout = ours(x), theirs(tx)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=tol, atol=tol)
    grad = np.random.default_rng(4).standard_normal(out.shape).astype(dtype)
    tout.backward(torch.tensor(grad))
    np.testing.assert_allclose(ours.backward(grad), tx.grad.numpy(), rtol=tol * 10, atol=tol * 10)
    for (name, p), (_, tp) in zip(ours.named_parameters(), theirs.named_parameters()):
        np.testing.assert_allclose(
            p.grad, tp.grad.numpy(), rtol=tol * 10, atol=tol * 10, err_msg=name
        )
    with nn.no_grad():  # the values-only fused path
        np.testing.assert_array_equal(ours(x), out)
