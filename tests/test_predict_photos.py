"""`fastconv predict` on models whose input is not a 28x28 digit: an ONNX classifier of RGB
(or grey) photos of any declared size, `--mean/--std/--imagenet`, `--labels`. The expected
probabilities come from onnxruntime on inputs prepared here with Pillow and NumPy."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the models are ONNX files")
pytest.importorskip("onnxruntime", reason="onnxruntime is the reference for the outputs")
torch = pytest.importorskip("torch", reason="torch builds and exports the models")
from PIL import Image  # noqa: E402
from test_onnx import export, onnxruntime_outputs  # noqa: E402

from fastconv import cli, inference, preprocess  # noqa: E402


def classifier(tmp_path, shape, classes=5):
    torch.manual_seed(0)
    c = shape[0]
    model = torch.nn.Sequential(
        torch.nn.Conv2d(c, 6, 3, 2, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, 2, 1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * -(-shape[1] // 4) * -(-shape[2] // 4), classes),
    ).eval()
    data = export(torch, model, shape)
    path = tmp_path / "photos.onnx"
    path.write_bytes(data)
    return path, data


def picture(tmp_path, name, height, width, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict(capsys, *args):
    code = cli.main(["predict", *map(str, args), "--json", "--top", "5", "--threads", "1"])
    captured = capsys.readouterr()
    return code, captured


def test_rgb_photos_are_cropped_to_the_declared_size_and_normalised(tmp_path, capsys):
    path, data = classifier(tmp_path, (3, 32, 40))
    # 32 x 60 covers 32 x 40 at scale 1: the centre 40 columns, no resampling
    wide = picture(tmp_path, "wide.png", 32, 60, 1)
    exact = picture(tmp_path, "exact.png", 32, 40, 2)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    code, out = predict(capsys, path, wide, exact, "--mean", *mean, "--std", *std)
    assert code == 0, out.err
    results = json.loads(out.out)
    crops = [np.asarray(Image.open(wide))[:, 10:50], np.asarray(Image.open(exact))]
    x = np.stack([(c / 255 - mean) / std for c in crops]).transpose(0, 3, 1, 2)
    expected = softmax(onnxruntime_outputs(data, {"input": x.astype(np.float32)})[0])
    for result, probs in zip(results, expected):
        got = {t["class"]: t["probability"] for t in result["top"]}
        assert got == pytest.approx(dict(enumerate(probs)), rel=1e-4, abs=1e-6)
        assert result["top"][0]["class"] == int(np.argmax(probs))


def test_imagenet_normalisation_labels_and_grey_models(tmp_path, capsys):
    path, data = classifier(tmp_path, (1, 24, 16), classes=3)
    tall = picture(tmp_path, "tall.png", 36, 16, 3)  # covers 24 x 16 at scale 1: rows 6..30
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n\n")
    code, out = predict(capsys, path, tall, "--labels", labels, "--mean", 0.5, "--std", 0.25)
    assert code == 0, out.err
    grey = np.asarray(Image.open(tall).convert("L"), np.float64)[6:30] / 255
    x = ((grey - 0.5) / 0.25)[None, None].astype(np.float32)
    expected = softmax(onnxruntime_outputs(data, {"input": x})[0])[0]
    (result,) = json.loads(out.out)
    assert [t["label"] for t in result["top"]] == [
        ["cat", "dog", "bird"][i] for i in np.argsort(-expected, kind="stable")
    ]
    assert result["top"][0]["probability"] == pytest.approx(expected.max(), rel=1e-4)

    rgb_path, rgb_data = classifier(tmp_path, (3, 8, 8))
    small = picture(tmp_path, "small.png", 8, 8, 4)
    code, out = predict(capsys, rgb_path, small, "--imagenet")
    assert code == 0, out.err
    mean, std = np.array(preprocess.IMAGENET_MEAN), np.array(preprocess.IMAGENET_STD)
    x = ((np.asarray(Image.open(small)) / 255 - mean) / std).transpose(2, 0, 1)[None]
    expected = softmax(onnxruntime_outputs(rgb_data, {"input": x.astype(np.float32)})[0])[0]
    (result,) = json.loads(out.out)
    assert result["top"][0]["probability"] == pytest.approx(expected.max(), rel=1e-4)


def test_resampling_follows_pillow(tmp_path):
    """An image larger than the input is scaled (bilinear) to cover it, then centre-cropped."""
    image = picture(tmp_path, "big.png", 90, 64, 5)
    framed = inference.ImageInput((3, 20, 16), 0.0, 1.0, photo=True).frame(image)
    resized = Image.open(image).resize((16, round(90 * 16 / 64)), Image.Resampling.BILINEAR)
    top = (resized.height - 20) // 2
    expected = np.asarray(resized, np.float32)[top : top + 20].transpose(2, 0, 1) / 255
    np.testing.assert_allclose(framed, expected, atol=1e-6)


def test_refusals(tmp_path, capsys):
    path, _ = classifier(tmp_path, (3, 8, 8), classes=4)
    small = picture(tmp_path, "small.png", 8, 8, 6)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    cases = [
        (["--labels", labels], "2 names for a model of 4 classes"),
        (["--mean", 0.1, 0.2], "mean has 2 values, the model's input has 3 channel"),
        (["--imagenet", "--std", 0.5], "--imagenet sets --mean and --std"),
    ]
    for extra, message in cases:
        code, out = predict(capsys, path, small, *extra)
        assert code != 0 and message in out.err, out.err


def test_size_for_a_model_with_open_height_and_width(tmp_path, capsys):
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    path = tmp_path / "open.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 16, 16),),
            str(path),
            dynamo=False,
            input_names=["input"],
            dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}},
        )
    image = picture(tmp_path, "p.png", 12, 30, 7)
    code, out = predict(capsys, path, image)
    assert code != 0 and "leaves its height and width open: give --size H W" in out.err
    code, out = predict(capsys, path, image, "--size", 12, 20)
    assert code == 0, out.err
    x = (np.asarray(Image.open(image))[:, 5:25] / 255).transpose(2, 0, 1)[None]
    expected = softmax(onnxruntime_outputs(path.read_bytes(), {"input": x.astype(np.float32)})[0])
    (result,) = json.loads(out.out)
    assert result["top"][0]["probability"] == pytest.approx(expected.max(), rel=1e-4)
