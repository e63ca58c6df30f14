"""Each `fastconv train` / `evaluate` option has its effect, on tiny runs in this process
(cli.main: the same code the command runs): 64 training images, 2 epochs of 2 steps."""

import json
import math

import numpy as np
import pytest
from conftest import DATA_ROOT

from fastconv import cli, datasets, get_num_threads, io, models, set_num_threads
from fastconv.train import Trainer, evaluate

TINY = [
    "--limit",
    "64",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--val-size",
    "32",
    "--no-test",
    "--no-download",
    "--quiet",
    "--checkpoint-every",
    "0",
    "--seed",
    "1",
]


@pytest.fixture(scope="module")
def data_dir():
    for name in ("mnist", "fashion-mnist"):
        if not (DATA_ROOT / name).is_dir():
            pytest.skip(f"{name} not found under {DATA_ROOT} (set FASTCONV_DATA_DIR)")
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _keep_threads():
    before = get_num_threads()
    yield
    set_num_threads(before)


def train(tmp_path, data_dir, *options, name="model.npz"):
    """Runs `fastconv train` with TINY and options; returns (model, meta) of the file written."""
    out = tmp_path / name
    status = cli.main(["train", "--data-dir", str(data_dir), *TINY, "--out", str(out), *options])
    assert status == 0
    return io.load_model(out)


def weights(model):
    return np.concatenate(
        [v.ravel() for v in model.state_dict().values() if np.asarray(v).dtype.kind == "f"]
    )


def test_dataset_fashion_mnist(tmp_path, data_dir):
    _, meta = train(tmp_path, data_dir, "--dataset", "fashion-mnist")
    assert meta["dataset"] == "fashion-mnist" and meta["classes"] == cli.FASHION_CLASSES
    assert (meta["mean"], meta["std"]) == (datasets.FASHION_MNIST_MEAN, datasets.FASHION_MNIST_STD)
    assert meta["training"]["augment"] is False  # shifted clothes are not clothes: off by default


def test_arch_builds_that_architecture(tmp_path, data_dir):
    model, meta = train(tmp_path, data_dir, "--arch", "lenet5")
    expected = models.create("lenet5", num_classes=10).state_dict()
    got = model.state_dict()
    assert meta["architecture"] == "lenet5"
    assert {k: np.shape(v) for k, v in got.items()} == {k: np.shape(v) for k, v in expected.items()}
    default = models.create(cli.RUN_DEFAULTS["arch"], num_classes=10).state_dict()
    assert {k: np.shape(v) for k, v in default.items()} != {k: np.shape(v) for k, v in got.items()}


def test_optimizer_changes_the_update(tmp_path, data_dir):
    runs = {
        name: train(
            tmp_path, data_dir, "--optimizer", name, "--schedule", "constant", name=f"{name}.npz"
        )
        for name in ("sgd", "adamw")
    }
    for name, (_, meta) in runs.items():
        assert meta["training"]["optimizer"] == name
        assert meta["training"]["lr"] == cli.DEFAULT_LR[name]
    assert not np.allclose(weights(runs["sgd"][0]), weights(runs["adamw"][0]))


@pytest.mark.parametrize(
    "schedule, factor",
    [
        ("constant", 1.0),
        ("cosine", (1 + math.cos(math.pi * 2 / 4)) / 2),  # after 2 of 4 steps
        ("step", 0.1**2),  # step_size = max(1, 4 // 3) = 1: two decays of 0.1 after 2 steps
    ],
)
def test_schedule_sets_the_learning_rate_of_each_epoch(tmp_path, data_dir, schedule, factor):
    _, meta = train(tmp_path, data_dir, "--schedule", schedule, "--augment")
    lr = meta["history"]["lr"]
    assert lr[0] == pytest.approx(cli.DEFAULT_LR["adamw"])
    assert lr[1] == pytest.approx(lr[0] * factor)


def test_patience_reaches_the_trainer(tmp_path, data_dir, monkeypatch):
    seen = []
    real_fit = Trainer.fit

    def fit(self, x, y, epochs, validation=None, patience=None, **kwargs):
        seen.append(patience)
        return real_fit(self, x, y, epochs, validation, patience, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    _, meta = train(tmp_path, data_dir, "--patience", "1")
    assert seen == [1] and meta["training"]["patience"] == 1
    # early stopping itself: tests/test_train.py::test_early_stopping
    assert (
        cli.main(
            [
                "train",
                "--data-dir",
                str(data_dir),
                *TINY,
                "--out",
                str(tmp_path / "n.npz"),
                "--patience",
                "1",
                "--val-size",
                "0",
            ]
        )
        == cli.EXIT_ERROR
    )  # needs validation


def test_label_smoothing_changes_the_loss(tmp_path, data_dir):
    plain = train(tmp_path, data_dir, name="plain.npz")[1]
    smooth = train(tmp_path, data_dir, "--label-smoothing", "0.2", name="smooth.npz")[1]
    assert smooth["training"]["label_smoothing"] == 0.2
    # same data, same seed, same steps: only the loss function differs
    assert smooth["history"]["train_loss"][0] != plain["history"]["train_loss"][0]


def test_no_augment_turns_off_the_shifts(tmp_path, data_dir, monkeypatch):
    augments = []
    real_init = Trainer.__init__

    def init(self, *args, **kwargs):
        augments.append(kwargs.get("augment"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", init)
    shifted = train(tmp_path, data_dir, "--augment", name="shifted.npz")
    plain = train(tmp_path, data_dir, "--no-augment", name="plain.npz")
    assert augments[0] is not None and augments[1] is None
    assert plain[1]["training"]["augment"] is False
    assert not np.allclose(weights(shifted[0]), weights(plain[0]))


def test_evaluate_dataset_scores_that_test_set(tmp_path, data_dir, capsys):
    train(tmp_path, data_dir)
    capsys.readouterr()
    path = tmp_path / "model.npz"
    assert (
        cli.main(
            [
                "evaluate",
                str(path),
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                str(data_dir),
                "--no-download",
                "--limit",
                "200",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "fashion-mnist" and result["count"] == 200
    model, _ = io.load_model(path)
    x, y = datasets.fashion_mnist("test", data_dir=data_dir, download=False)
    expected = evaluate(model, x[:200], y[:200], batch_size=500)
    np.testing.assert_array_equal(result["confusion"], expected.confusion)
