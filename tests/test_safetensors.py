"""load/save_safetensors (fastconv.io): round trips, torch <-> fastconv weights, errors."""

from __future__ import annotations

import numpy as np
import pytest

safetensors_numpy = pytest.importorskip(
    "safetensors.numpy", reason="the safetensors package reads and writes the files"
)

from conftest import assert_close  # noqa: E402

import fastconv.io  # noqa: E402
from fastconv import models  # noqa: E402
from fastconv._safetensors import load_safetensors, save_safetensors  # noqa: E402


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is needed for the torch <-> fastconv cases")


def test_public_names():
    """fastconv.io re-exports them: a missing re-export is an AttributeError here."""
    assert fastconv.io.load_safetensors is load_safetensors
    assert fastconv.io.save_safetensors is save_safetensors
    assert {"load_safetensors", "save_safetensors"} <= set(fastconv.io.__all__)


def test_round_trip_keeps_keys_order_dtypes_and_values(tmp_path):
    model = models.digit_cnn(seed=3)
    state = model.state_dict()
    state["0.weight"] = state["0.weight"][:, :, ::-1]  # not contiguous: written as it reads
    path = tmp_path / "w.safetensors"
    save_safetensors(state, path, metadata={"format": "pt"})
    loaded = load_safetensors(path)
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        assert loaded[key].flags.writeable
    assert (
        loaded["1.num_batches_tracked"].shape == ()
        and loaded["1.num_batches_tracked"].dtype == np.int64
    )
    save_safetensors(model, tmp_path / "m.safetensors")  # a Module is accepted too
    model.load_state_dict(load_safetensors(tmp_path / "m.safetensors"))


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    save_safetensors({"a": np.arange(6, dtype=np.float32)}, good)
    data = good.read_bytes()
    for n, what in ((len(data) - 3, "truncated"), (20, "truncated header"), (3, "too short")):
        bad = tmp_path / f"{n}.safetensors"
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match=str(bad)):
            load_safetensors(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError):
        load_safetensors(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="dtype"):
        save_safetensors({"a": np.array(["text"])}, good)
    with pytest.raises(TypeError):
        save_safetensors({1: np.zeros(2)}, good)
    with pytest.raises(TypeError):
        save_safetensors({"a": np.zeros(2)}, good, metadata={"k": 1})
    np.testing.assert_array_equal(load_safetensors(good)["a"], np.arange(6))  # left intact
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_bfloat16_is_a_clear_error(torch, tmp_path):
    import safetensors.torch

    path = tmp_path / "bf16.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3, dtype=torch.bfloat16)}, str(path))
    with pytest.raises(ValueError, match="float32"):
        load_safetensors(path)


def torch_digit_cnn(torch):
    """torch.nn twin of fastconv.models.digit_cnn(): same layers, same state_dict keys."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, 10),
    )


def trained_a_little(torch, model):
    """A few training-mode passes so BatchNorm's statistics are not their initial values."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28) * 2 + 0.5)
    return model.eval()


def test_torch_weights_load_into_fastconv(torch, tmp_path):
    torch.manual_seed(4)
    theirs = trained_a_little(torch, torch_digit_cnn(torch))
    path = tmp_path / "torch.safetensors"
    # what a torch user writes, through the NumPy API: tensors converted to arrays
    safetensors_numpy.save_file(
        {k: v.detach().numpy() for k, v in theirs.state_dict().items()}, str(path)
    )
    ours = models.digit_cnn(seed=0).eval()
    ours.load_state_dict(load_safetensors(path))  # strict: every key matches
    x = np.random.default_rng(5).standard_normal((6, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    assert_close(ours(x), expected, 1e-4)


def test_fastconv_weights_load_into_torch(torch, tmp_path):
    import safetensors.torch

    ours = models.lenet5(seed=6).eval()
    path = tmp_path / "fastconv.safetensors"
    save_safetensors(ours.state_dict(), path)
    nn = torch.nn
    theirs = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    ).eval()
    theirs.load_state_dict(safetensors.torch.load_file(str(path)))  # strict
    x = np.random.default_rng(7).standard_normal((4, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    assert_close(ours(x), expected, 1e-4)
