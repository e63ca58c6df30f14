"""fastconv.io: model files and checkpoints round-trip exactly, bad files are refused with a clear
ValueError (never a half-loaded model, never an unpickled object), failed writes keep the old file."""

import errno
import json
import os
import zipfile

import numpy as np
import pytest

from fastconv import io, models, nn, optim
from fastconv.train import History, Trainer

META = {
    "classes": [str(i) for i in range(10)],
    "input_shape": [1, 28, 28],
    "mean": 0.1307,
    "std": 0.3081,
    "dataset": "mnist",
}


def small_model(seed=0):
    return models.digit_cnn(width=4, hidden=16, seed=seed)


def trained_model(steps=3, seed=0):
    """A model whose weights and BatchNorm statistics have moved away from their initial values."""
    model = small_model(seed)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    loss = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((8, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, 8)
        loss(model(x), y)
        model.zero_grad()
        model.backward(loss.backward())
        opt.step()
    return model, opt


def inputs(n=5, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28), dtype=np.float32)


def rewrite(path, target, change):
    """Copy the .npz at path to target, with change(arrays, header) applied to its contents."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    header = json.loads(arrays.pop(io.HEADER_KEY).tobytes())
    change(arrays, header)
    data = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(target, **{io.HEADER_KEY: data}, **arrays)
    return target


@pytest.fixture
def saved(tmp_path):
    model, _ = trained_model()
    path = tmp_path / "model.npz"
    io.save_model(model, path, META)
    return model, path


# -- model files ------------------------------------------------------------------------------


def test_round_trip_reproduces_predictions_exactly(saved):
    model, path = saved
    loaded, meta = io.load_model(path)
    model.eval()
    x = inputs()
    assert np.array_equal(loaded(x), model(x))
    assert meta == META
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert np.array_equal(loaded.state_dict()[key], value)
        assert loaded.state_dict()[key].dtype == value.dtype


def test_file_is_a_plain_npz_with_torch_keys(saved):
    model, path = saved
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {io.HEADER_KEY, *model.state_dict()}
        header = json.loads(npz[io.HEADER_KEY].tobytes())
    assert header["format"] == "fastconv-model"
    assert header["architecture"] == nn.to_config(model)
    assert header["meta"] == META


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        io.load_model(tmp_path / "absent.npz")


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99])
def test_truncated_file_is_refused(saved, tmp_path, keep):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated.npz"):
        io.load_model(bad)


def test_corrupted_tensor_bytes_are_refused(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("9.weight.npy")  # the Linear layer's weights
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[offset] ^= 0xFF
    bad = tmp_path / "corrupted.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupted.npz: .*(9\.weight|CRC|corrupt)"):
        io.load_model(bad)


def test_tampered_tensor_fails_the_checksum(saved, tmp_path):
    _, path = saved

    def change(arrays, header):
        arrays["9.weight"] = arrays["9.weight"] + np.float32(1e-3)  # a valid zip, wrong values

    bad = rewrite(path, tmp_path / "tampered.npz", change)
    with pytest.raises(ValueError, match="tensor '9.weight' is corrupted"):
        io.load_model(bad)


@pytest.mark.parametrize(
    "contents", [b"", b"not a zip at all", b"\x93NUMPY garbage", os.urandom(2000)]
)
def test_other_bytes_are_refused(tmp_path, contents):
    bad = tmp_path / "junk.npz"
    bad.write_bytes(contents)
    with pytest.raises(ValueError, match="junk.npz"):
        io.load_model(bad)


def test_single_npy_array_is_refused(tmp_path):
    bad = tmp_path / "array.npz"
    with open(bad, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="single .npy array"):
        io.load_model(bad)


def test_npz_without_header_is_refused(tmp_path):
    bad = tmp_path / "weights.npz"
    np.savez(bad, **{k: v for k, v in small_model().state_dict().items()})
    with pytest.raises(ValueError, match="not a fastconv file"):
        io.load_model(bad)


class _Marker:
    """Unpickling this creates a folder: proof that code ran."""

    path = None

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_object_array_is_refused_without_running_it(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "pwned"
    _Marker.path = str(marker)
    evil = np.empty(1, dtype=object)
    evil[0] = _Marker()

    bad = tmp_path / "evil.npz"
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["9.weight"] = evil
    np.savez(bad, **arrays)  # np.savez pickles object arrays
    with pytest.raises(ValueError, match="object array.*refused"):
        io.load_model(bad)
    assert not marker.exists()


def test_pickled_header_is_refused(tmp_path):
    evil = np.empty(1, dtype=object)
    evil[0] = {"format": "fastconv-model"}
    bad = tmp_path / "evil.npz"
    np.savez(bad, **{io.HEADER_KEY: evil})
    with pytest.raises(ValueError, match="pickled"):
        io.load_model(bad)


def test_checkpoint_is_not_a_model(tmp_path):
    model, opt = trained_model()
    path = tmp_path / "run.ckpt.npz"
    io.save_checkpoint(path, model=model, optimizer=opt)
    with pytest.raises(ValueError, match="a training checkpoint, not a model file"):
        io.load_model(path)
    saved = tmp_path / "model.npz"
    io.save_model(model, saved, META)
    with pytest.raises(ValueError, match="a model file, not a training checkpoint"):
        io.load_checkpoint(saved)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda a, h: h["architecture"]["layers"][-1]["config"].update(out_features=12),
            r"tensor '12.weight' has shape \(10, 16\), the architecture needs \(12, 16\)",
        ),
        (lambda a, h: a.pop("1.running_var"), "missing for this architecture: 1.running_var"),
        (lambda a, h: a.update(extra=np.zeros(3)), "not in this architecture: extra"),
        (
            lambda a, h: a.update({"0.weight": a["0.weight"].astype(np.float64)}),
            "tensor '0.weight' has dtype float64",
        ),
        (
            lambda a, h: h["architecture"]["layers"].insert(0, {"type": "Nope"}),
            "invalid architecture: .*unknown layer type 'Nope'",
        ),
        (lambda a, h: h.update(architecture="Sequential"), "'architecture' is missing or not dict"),
        (lambda a, h: h.update(format_version=99), "format version 99 is newer"),
        (lambda a, h: h["meta"].update(classes=["a", "b"]), "names 2 classes but the model has 10"),
    ],
    ids=[
        "shape",
        "missing",
        "extra",
        "dtype",
        "unknown-layer",
        "bad-architecture",
        "version",
        "classes",
    ],
)
def test_mismatched_file_is_refused(saved, tmp_path, change, message):
    _, path = saved
    bad = rewrite(path, tmp_path / "mismatch.npz", change)
    with pytest.raises(ValueError, match=message):
        io.load_model(bad)


def test_meta_must_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match="names 3 classes"):
        io.save_model(small_model(), tmp_path / "m.npz", {**META, "classes": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="JSON"):
        io.save_model(small_model(), tmp_path / "m.npz", {"x": object()})
    assert not (tmp_path / "m.npz").exists()
    assert os.listdir(tmp_path) == []


# -- atomic writes ------------------------------------------------------------------------------


def test_failed_rename_keeps_the_previous_file(saved, tmp_path, monkeypatch):
    _, path = saved
    before = path.read_bytes()

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(
        io.SaveError, match="No space left on device; the previous file there is intact"
    ):
        io.save_model(small_model(seed=5), path, META)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]  # no temporary file left behind


def test_failed_write_keeps_the_previous_file(saved, tmp_path, monkeypatch):
    _, path = saved
    before = path.read_bytes()
    calls = []
    real = np.lib.format.write_array

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", fail_on_third)
    with pytest.raises(io.SaveError):
        io.save_model(small_model(seed=5), path, META)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]


def test_unwritable_folder_is_a_save_error(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(io.SaveError, match="cannot write .*Permission denied; no file was written"):
        io.save_model(small_model(), tmp_path / "m.npz", META)


def test_saved_file_gets_the_usual_permissions(saved):
    _, path = saved
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# -- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model, opt = trained_model()
    scheduler = optim.CosineAnnealingLR(opt, T_max=10)
    scheduler.step()
    rng = np.random.default_rng(3)
    rng.random(5)
    history = History()
    history.append(epoch=1, train_loss=0.5, train_acc=0.9, lr=0.01, time=1.5)
    path = tmp_path / "c.npz"
    io.save_checkpoint(
        path,
        model=model,
        optimizer=opt,
        scheduler=scheduler,
        rng_states={"r": rng.bit_generator.state},
        epoch=2,
        step=7,
        history=history.to_dict(),
        extra={"anything": [1, "two"]},
    )
    ckpt = io.load_checkpoint(path)
    assert (ckpt.epoch, ckpt.step, ckpt.extra) == (2, 7, {"anything": [1, "two"]})
    assert History.from_dict(ckpt.history).rows == history.rows
    assert ckpt.rng_states["r"] == rng.bit_generator.state
    for key, value in model.state_dict().items():
        assert np.array_equal(ckpt.model_state[key], value)
    saved_opt = opt.state_dict()
    assert set(ckpt.optimizer_state) == set(saved_opt)
    for key, value in saved_opt.items():
        assert np.array_equal(ckpt.optimizer_state[key], value)
    for key, value in scheduler.state_dict().items():
        assert np.array_equal(ckpt.scheduler_state[key], value)
    # and they load back into fresh objects
    fresh = ckpt.build_model()
    fresh_opt = optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(ckpt.optimizer_state)
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_nested_state_round_trips(tmp_path):
    class Holder:
        def __init__(self, state):
            self.state = state

        def state_dict(self):
            return self.state

    state = {"a": np.arange(3), 5: (1.5, np.float32(2)), "b": [None, True, "s", {"__array__": 1}]}
    path = tmp_path / "c.npz"
    io.save_checkpoint(path, model=small_model(), optimizer=Holder(state))
    loaded = io.load_checkpoint(path).optimizer_state
    assert np.array_equal(loaded["a"], state["a"])
    assert loaded[5] == (1.5, np.float32(2)) and isinstance(loaded[5][1], np.float32)
    assert loaded["b"] == [None, True, "s", {"__array__": 1}]


def test_truncated_checkpoint_is_refused(tmp_path):
    model, opt = trained_model()
    path = tmp_path / "c.npz"
    io.save_checkpoint(path, model=model, optimizer=opt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="c.npz"):
        io.load_checkpoint(path)


def test_checkpoint_of_another_model_leaves_the_trainer_untouched(tmp_path):
    model, opt = trained_model()
    trainer = Trainer(model, opt, checkpoint=tmp_path / "c.npz")
    trainer.save_checkpoint()
    other = models.digit_cnn(width=8, hidden=16, seed=1)
    before = other.state_dict()
    other_trainer = Trainer(other, optim.Adam(other.parameters()))
    with pytest.raises(ValueError, match="do not fit"):
        other_trainer.resume(tmp_path / "c.npz")
    after = other.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert (other_trainer.epoch, other_trainer.step) == (0, 0)
