"""fastconv.plots: every picture is a PNG that decodes, has the expected size, is not blank, and
shows the numbers the computation produced (the confusion matrix equals evaluate()'s)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image
from trained_models import fastconv_command, need_mnist, png_bytes, small_model, test_digits

from fastconv import io, plots, train

pytest.importorskip("matplotlib", reason='plots need matplotlib: pip install "fastconv[viz]"')

TRAIN_BLUE, VAL_RED = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)


def check_png(path, width=(300, 2500), height=(200, 2500)) -> np.ndarray:
    """The file is a PNG of a plausible size with something drawn on it; returns its RGB pixels."""
    assert path.exists(), f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    assert width[0] <= w <= width[1] and height[0] <= h <= height[1], f"{path}: {w}x{h}"
    gray = rgb.mean(axis=2)
    assert gray.std() > 10, f"{path} looks blank (pixel std {gray.std():.1f})"
    assert (gray < 200).mean() > 0.01, f"{path} has almost nothing drawn"
    return rgb


def has_colour(rgb, colour, tolerance=12, minimum=50) -> bool:
    close = np.abs(rgb.astype(int) - np.array(colour)).max(axis=2) <= tolerance
    return int(close.sum()) >= minimum


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    return small_model(tmp_path_factory)


@pytest.fixture(scope="session")
def model(model_file):
    return io.load_model(model_file)


@pytest.fixture(scope="session")
def digits():
    pixels, labels = test_digits(2000)
    return pixels, (pixels - 0.1307) / 0.3081, labels


# -- curves ------------------------------------------------------------------------------------


def history(validation=True):
    h = train.History()
    for epoch in range(1, 6):
        h.append(
            epoch=epoch,
            train_loss=1 / epoch,
            train_acc=1 - 0.1 / epoch,
            val_loss=1.1 / epoch if validation else None,
            val_acc=1 - 0.12 / epoch if validation else None,
            lr=0.01,
            time=1.0,
        )
    return h


def test_history_curves(tmp_path):
    path = plots.plot_history(history(), tmp_path / "curves.png")
    rgb = check_png(path, (900, 1100), (350, 450))
    assert has_colour(rgb, TRAIN_BLUE) and has_colour(rgb, VAL_RED)


def test_history_without_validation_draws_only_training(tmp_path):
    rgb = check_png(plots.plot_history(history(validation=False), tmp_path / "curves.png"))
    assert has_colour(rgb, TRAIN_BLUE) and not has_colour(rgb, VAL_RED)


@pytest.mark.parametrize("form", ["columns", "rows"])
def test_history_from_plain_data(tmp_path, form):
    data = history().to_dict() if form == "columns" else history().rows
    check_png(plots.plot_history(data, tmp_path / "sub" / "curves.png"))


def test_history_plots_itself(tmp_path):
    h = history()
    h.plot(tmp_path / "curves.png")
    check_png(tmp_path / "curves.png")


def test_history_stored_in_a_trained_model(model, tmp_path):
    _, meta = model
    check_png(plots.plot_history(meta["history"], tmp_path / "curves.png"))


# -- evaluation report --------------------------------------------------------------------------


def test_report_numbers_by_hand():
    probabilities = np.array([
        [0.9, 0.1, 0.0],  # 0 -> 0
        [0.2, 0.8, 0.0],  # 0 -> 1, p 0.8
        [0.1, 0.3, 0.6],  # 1 -> 2, p 0.6
        [0.0, 1.0, 0.0],  # 1 -> 1
        [0.05, 0.9, 0.05],  # 2 -> 1, p 0.9
    ])  # fmt: skip
    labels = np.array([0, 0, 1, 1, 2])
    report = plots.evaluation_report(probabilities, labels, classes=["a", "b", "c"], mistakes=2)
    np.testing.assert_array_equal(report.confusion, [[1, 1, 0], [0, 1, 1], [0, 1, 0]])
    np.testing.assert_allclose(report.per_class_accuracy, [0.5, 0.5, 0.0])
    assert report.accuracy == pytest.approx(0.4) and report.count == 5
    assert [(m.index, m.true, m.predicted) for m in report.mistakes] == [(4, 2, 1), (1, 0, 1)]
    assert report.mistakes[0].probability == pytest.approx(0.9)


def test_report_marks_absent_classes():
    report = plots.evaluation_report(np.eye(3)[[0, 0, 1]], np.array([0, 0, 1]))
    assert np.isnan(report.per_class_accuracy[2]) and report.mistakes == []


@pytest.mark.parametrize("probabilities, labels", [
    (np.zeros((3, 2)), np.array([0, 1])),
    (np.zeros((2, 2)), np.array([0, 2])),
    (np.zeros(4), np.zeros(4, dtype=int)),
])  # fmt: skip
def test_report_rejects_bad_input(probabilities, labels):
    with pytest.raises(ValueError):
        plots.evaluation_report(probabilities, labels)


def test_evaluation_report_draws_what_evaluate_computes(model, digits, tmp_path):
    net, meta = model
    pixels, x, y = digits
    report = plots.plot_evaluation(
        net, x, y, tmp_path / "report.png", images=pixels, classes=meta["classes"]
    )
    expected = train.evaluate(net, x, y)
    np.testing.assert_array_equal(report.confusion, expected.confusion)
    np.testing.assert_array_equal(report.per_class_accuracy, expected.per_class_accuracy)
    assert report.accuracy == expected.accuracy and report.count == expected.count == len(y)
    # the mistakes shown are wrong, and the most confident wrong answers, in order
    probabilities = train.predict_proba(net, x)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y)
    assert len(report.mistakes) == min(16, len(wrong)) > 0
    shown = [m.probability for m in report.mistakes]
    assert shown == sorted(shown, reverse=True)
    assert shown[-1] >= np.sort(probabilities[wrong, predicted[wrong]])[-len(shown)]
    for m in report.mistakes:
        assert y[m.index] == m.true != m.predicted == predicted[m.index]
    rgb = check_png(tmp_path / "report.png", (1000, 1600), (800, 1300))
    assert has_colour(rgb, (0x2C, 0xA0, 0x2C), tolerance=20)  # the per-class bars


# -- what the model learned ---------------------------------------------------------------------


def test_filters_show_the_first_conv_weights(model, tmp_path):
    net, _ = model
    kernels = plots.plot_filters(net, tmp_path / "filters.png")
    first = next(m for m in net.modules() if type(m).__name__ == "Conv2d")
    np.testing.assert_allclose(kernels, first.weight.data.mean(axis=1), rtol=1e-6)
    check_png(tmp_path / "filters.png", (500, 1200), (200, 1000))


def test_feature_maps_are_each_conv_blocks_output(model, digits, tmp_path):
    net, _ = model
    pixels, x, _ = digits
    layers = plots.plot_feature_maps(net, x[0], tmp_path / "maps.png", image=pixels[0])
    conv_indices = [i for i, layer in enumerate(net) if type(layer).__name__ == "Conv2d"]
    assert [name for name, _ in layers] == [str(i) for i in conv_indices]
    for (name, maps), start in zip(layers, conv_indices):
        end = start + 1  # the conv, then the BatchNorm and activation right after it
        while end < len(net) and type(net[end]).__name__ in ("BatchNorm2d", "ReLU", "LeakyReLU"):
            end += 1
        expected = net[:end](x[:1])[0]
        np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)
    check_png(tmp_path / "maps.png", (700, 1300), (500, 3000))


def test_feature_maps_need_a_conv_layer(tmp_path):
    from fastconv import nn

    with pytest.raises(ValueError, match="no Conv2d"):
        plots.plot_feature_maps(
            nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),
            np.zeros((1, 2, 2), np.float32),
            tmp_path / "x.png",
        )
    with pytest.raises(ValueError, match="no Conv2d"):
        plots.plot_filters(nn.Sequential(nn.Flatten()), tmp_path / "x.png")


# -- benchmarks ---------------------------------------------------------------------------------


def test_benchmark_bars(tmp_path):
    rows = [
        {
            "operation": "conv2d",
            "shape": (64, 32, 28, 28),
            "speedup_vs_reference": 35.0,
            "speedup_vs_torch": 0.8,
        },
        {
            "operation": "max_pool2d",
            "shape": "64x32x28x28",
            "speedup_vs_reference": 120.0,
            "speedup_vs_torch": None,
        },
        {"operation": "conv2d backward", "speedup_vs_torch": 1.4},
    ]
    rgb = check_png(plots.plot_benchmark(rows, tmp_path / "bench.png"))
    assert has_colour(rgb, (0x2C, 0xA0, 0x2C)) and has_colour(rgb, (0xFF, 0x7F, 0x0E))


def test_benchmark_needs_numbers(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_benchmark([], tmp_path / "b.png")
    with pytest.raises(ValueError):
        plots.plot_benchmark([{"operation": "x", "speedup_vs_torch": None}], tmp_path / "b.png")


# -- without matplotlib -------------------------------------------------------------------------


def test_without_matplotlib_the_error_says_how_to_install(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError) as caught:
        plots.plot_history(history(), tmp_path / "c.png")
    message = str(caught.value)
    assert 'pip install "fastconv[viz]"' in message and "\n" not in message
    with pytest.raises(plots.MissingMatplotlib):
        plots.plot_benchmark([{"operation": "x", "speedup_vs_torch": 2}], tmp_path / "b.png")
    assert not (tmp_path / "c.png").exists()


# -- the command line ---------------------------------------------------------------------------


def test_cli_evaluate_plot(model_file, tmp_path):
    out = tmp_path / "report"
    result = fastconv_command(
        "evaluate",
        str(model_file),
        "--data-dir",
        str(need_mnist()),
        "--no-download",
        "--limit",
        "1000",
        "--json",
        "--plot",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    pngs = sorted(out.glob("*.png"))
    assert pngs, "no picture written"
    for png in pngs:
        check_png(png)
    # the matrix drawn is the matrix printed
    net, meta = io.load_model(model_file)
    pixels, labels = test_digits(1000)
    x = (pixels - meta["mean"]) / meta["std"]
    report = plots.evaluation_report(train.predict_proba(net, x), labels)
    np.testing.assert_array_equal(report.confusion, scores["confusion"])


def test_cli_show(model_file, digits, tmp_path):
    pixels, _, _ = digits
    image = tmp_path / "digit.png"
    image.write_bytes(png_bytes(pixels[0], scale=4, invert=True))
    out = tmp_path / "show"
    result = fastconv_command("show", str(model_file), str(image), "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("filters.png", "feature-maps.png"):
        check_png(out / name)


def test_cli_train_plot(tmp_path):
    out = tmp_path / "model.npz"
    result = fastconv_command(
        "train",
        "--data-dir",
        str(need_mnist()),
        "--no-download",
        "--quiet",
        "--out",
        str(out),
        "--limit",
        "600",
        "--val-size",
        "200",
        "--epochs",
        "2",
        "--no-test",
        "--plot",
    )
    assert result.returncode == 0, result.stderr
    rgb = check_png(tmp_path / "curves.png")
    assert has_colour(rgb, TRAIN_BLUE) and has_colour(rgb, VAL_RED)
