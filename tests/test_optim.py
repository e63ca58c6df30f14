"""fastconv.optim: update rules and learning-rate sequences equal torch.optim's."""

import io

import numpy as np
import pytest

from fastconv import optim
from fastconv.nn import Parameter


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is needed for the parity tests")


SHAPES = [(3, 4), (5,), (2, 1, 3, 3)]
TOLERANCES = {np.float32: 1e-6, np.float64: 1e-12}
OPTIMIZERS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-3}),
    ("Adam", {}),
    ("Adam", {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("AdamW", {}),
    ("AdamW", {"lr": 1e-2, "betas": (0.85, 0.995), "weight_decay": 0.3}),
]


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(shape).astype(dtype)) for shape in SHAPES]


def gradients(dtype, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape).astype(dtype) for shape in SHAPES] for _ in range(steps)]


SKIPPED = (2, 1)  # (step, parameter) without a gradient: the optimiser leaves it alone


def run(optimizer, params, grads):
    for k, step in enumerate(grads):
        for i, (param, grad) in enumerate(zip(params, step)):
            param.grad = None if (k, i) == SKIPPED else grad.copy()
        optimizer.step()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, kwargs", OPTIMIZERS)
def test_steps_match_torch(torch, dtype, name, kwargs):
    params = make_params(dtype)
    theirs = [torch.from_numpy(p.data.copy()).requires_grad_() for p in params]
    ours = getattr(optim, name)(params, **kwargs)
    torch_opt = getattr(torch.optim, name)(theirs, **kwargs)
    grads = gradients(dtype, 6)
    run(ours, params, grads)
    for k, step in enumerate(grads):
        for i, (tensor, grad) in enumerate(zip(theirs, step)):
            tensor.grad = None if (k, i) == SKIPPED else torch.from_numpy(grad.copy())
        torch_opt.step()
    tol = TOLERANCES[dtype]
    for param, tensor in zip(params, theirs):
        assert param.data.dtype == dtype
        np.testing.assert_allclose(param.data, tensor.detach().numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name, kwargs", OPTIMIZERS[1:3] + OPTIMIZERS[5:])
def test_state_dict_round_trip_through_npz(name, kwargs):
    grads = gradients(np.float32, 5)
    params, resumed = make_params(np.float32), make_params(np.float32)
    optimizer = getattr(optim, name)(params, **kwargs)
    run(optimizer, params, grads[:3])
    for p, q in zip(params, resumed):
        q.data[...] = p.data
    buffer = io.BytesIO()
    np.savez(buffer, **optimizer.state_dict())
    buffer.seek(0)
    other = getattr(optim, name)(resumed, lr=123.0)
    with np.load(buffer, allow_pickle=False) as data:
        other.load_state_dict(dict(data))
    assert other.lr == optimizer.lr
    assert other.param_groups[0].keys() == optimizer.param_groups[0].keys()
    run(optimizer, params, grads[3:])
    run(other, resumed, grads[3:])
    for p, q in zip(params, resumed):
        np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_is_flat_arrays_and_load_checks_first():
    params = make_params(np.float32)
    optimizer = optim.Adam(params, lr=0.01)
    run(optimizer, params, gradients(np.float32, 2))
    state = optimizer.state_dict()
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())
    assert state["state.0.step"] == 2 and state["param_groups.0.betas"].shape == (2,)
    np.testing.assert_array_equal(state["param_groups.0.params"], [0, 1, 2])
    before = optimizer.state_dict()
    bad = dict(state)
    bad["param_groups.0.lr"] = np.array(5.0)  # fine, but must not be applied: the next is wrong
    bad["state.2.exp_avg"] = np.zeros((2, 1, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"state\.2\.exp_avg.*\(2, 1, 3, 4\).*\(2, 1, 3, 3\)"):
        optimizer.load_state_dict(bad)
    with pytest.raises(ValueError, match="parameters"):
        optim.Adam(params[:2]).load_state_dict(state)
    with pytest.raises(ValueError, match="bogus"):
        optimizer.load_state_dict({"bogus": np.zeros(1)})
    assert optimizer.lr == 0.01
    for key, value in optimizer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_groups_lr_zero_grad_and_skipping():
    a, b = make_params(np.float32)[:2]
    optimizer = optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, momentum=0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.5] and optimizer.lr == 0.1
    a_before, b_before = a.data.copy(), b.data.copy()
    a.grad = np.ones_like(a.data)
    optimizer.step()
    np.testing.assert_allclose(a.data, a_before - np.float32(0.1), rtol=1e-6)
    np.testing.assert_array_equal(b.data, b_before)  # no gradient: untouched, no state
    assert b not in optimizer.state
    optimizer.lr = 0.01
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.01]
    optimizer.zero_grad()
    assert a.grad is None
    with pytest.raises(ValueError):
        optim.SGD([a], lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        optim.Adam([])


def test_float32_stays_float32():
    for optimizer_class in (optim.SGD, optim.Adam, optim.AdamW):
        params = make_params(np.float32)
        optimizer = optimizer_class(params, lr=0.1, weight_decay=0.1)
        run(optimizer, params, gradients(np.float32, 2))
        assert all(p.data.dtype == np.float32 for p in params)
        assert all(
            v.dtype == np.float32
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, np.ndarray)
        )


SCHEDULERS = [
    ("StepLR", {"step_size": 3}),
    ("StepLR", {"step_size": 2, "gamma": 0.5}),
    ("CosineAnnealingLR", {"T_max": 7}),
    ("CosineAnnealingLR", {"T_max": 5, "eta_min": 1e-4}),
]


@pytest.mark.parametrize("name, kwargs", SCHEDULERS)
def test_scheduler_sequence_matches_torch(torch, name, kwargs):
    params = make_params(np.float32)
    optimizer = optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.3}], lr=0.1)
    ours = getattr(optim, name)(optimizer, **kwargs)
    tensors = [torch.zeros(1, requires_grad=True) for _ in range(2)]
    torch_optimizer = torch.optim.SGD(
        [{"params": tensors[:1]}, {"params": tensors[1:], "lr": 0.3}], lr=0.1
    )
    theirs = getattr(torch.optim.lr_scheduler, name)(torch_optimizer, **kwargs)
    assert ours.get_last_lr() == theirs.get_last_lr()
    for _ in range(24):  # past T_max: the cosine continues periodically
        theirs.optimizer.step()
        ours.step(), theirs.step()
        assert ours.get_last_lr() == theirs.get_last_lr()
        assert [g["lr"] for g in ours.optimizer.param_groups] == ours.get_last_lr()


@pytest.mark.parametrize("name, kwargs", SCHEDULERS)
def test_scheduler_state_dict_resumes(name, kwargs):
    def make():
        optimizer = optim.Adam(make_params(np.float32), lr=0.01)
        return optimizer, getattr(optim, name)(optimizer, **kwargs)

    optimizer, scheduler = make()
    for _ in range(4):
        scheduler.step()
    buffer = io.BytesIO()
    np.savez(
        buffer,
        optimizer=0,
        **{f"sched.{k}": v for k, v in scheduler.state_dict().items()},
        **{f"opt.{k}": v for k, v in optimizer.state_dict().items()},
    )
    buffer.seek(0)
    optimizer2, scheduler2 = make()
    with np.load(buffer, allow_pickle=False) as data:
        optimizer2.load_state_dict({k[4:]: data[k] for k in data.files if k.startswith("opt.")})
        scheduler2.load_state_dict({k[6:]: data[k] for k in data.files if k.startswith("sched.")})
    for _ in range(10):
        scheduler.step(), scheduler2.step()
        assert scheduler2.get_last_lr() == scheduler.get_last_lr()
        assert optimizer2.lr == optimizer.lr
    with pytest.raises(ValueError):
        scheduler2.load_state_dict({"last_epoch": np.array(1)})
