"""Running a trained model: the one path from a model file and images to probabilities.

``fastconv predict``, ``evaluate`` and ``show``, the web page (:mod:`fastconv.serve`), batch
inference on Dask (:mod:`fastconv.dask_inference`), the plots and the Trainer's validation all
call this module, so what a model file's metadata means (input shape, normalisation, class
names) and what counts as an image file are decided here once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import io, nn, onnx, preprocess

# A model file without metadata takes what fastconv's own MNIST models take, unnormalised.
DEFAULT_INPUT_SHAPE = (1, 28, 28)
DEFAULT_MEAN, DEFAULT_STD = 0.0, 1.0
# What `predict` and Dask read from a folder (files given by name are always tried).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
)


def load_any_model(path) -> io.ModelFile:
    """``(model, meta)`` from a fastconv model file or an ONNX file (recognised by suffix or
    contents): the one loader behind predict, evaluate, show, serve and batch inference."""
    if not onnx.is_onnx(path):
        return io.load_model(path)
    try:
        return onnx.load_model(path)
    except ImportError as err:  # the onnx package is an optional extra
        raise ValueError(f"{path}: {err}") from None


@dataclass(frozen=True)
class ImageInput:
    """How a model wants its images: ``(channels, height, width)`` and the normalisation
    ``(pixel - mean) / std`` (one value, or one per channel), as its file's metadata declares
    them (defaults above). A one-channel square input is framed as MNIST frames digits
    (:func:`fastconv.preprocess.to_mnist_input`); with ``photo`` any other input is resized and
    centre-cropped in colour or grey (:func:`fastconv.preprocess.to_photo_input`)."""

    shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE
    mean: float | tuple[float, ...] = DEFAULT_MEAN
    std: float | tuple[float, ...] = DEFAULT_STD
    photo: bool = False

    @classmethod
    def of(
        cls,
        meta: dict,
        name: str = "model",
        use: str = "this command",
        *,
        photos: bool = False,
        mean=None,
        std=None,
    ) -> ImageInput:
        """From a model file's metadata, ``mean``/``std`` (a number or one per channel)
        replacing the file's. Refuses (``ValueError`` naming ``use``) a model whose input is
        not one-channel and square unless ``photos`` (the caller handles such inputs), and any
        input that is not (1 or 3, H, W)."""
        shape = tuple(int(d) for d in (meta.get("input_shape") or DEFAULT_INPUT_SHAPE))
        digit = len(shape) == 3 and shape[0] == 1 and shape[1] == shape[2]
        if not digit and not (photos and len(shape) == 3 and shape[0] in (1, 3)):
            wanted = "a (1 or 3, H, W) image input" if photos else "a one-channel square input"
            raise ValueError(f"{name}: {use} needs {wanted}, the model takes {list(shape)}")
        mean = meta.get("mean", DEFAULT_MEAN) if mean is None else mean
        std = meta.get("std", DEFAULT_STD) if std is None else std
        values = [np.asarray(v, np.float64).reshape(-1) for v in (mean, std)]
        for what, v in zip(("mean", "std"), values):
            if v.size not in (1, shape[0]):
                raise ValueError(
                    f"{name}: {what} has {v.size} values, the model's input has {shape[0]} "
                    "channel(s): give one value or one per channel"
                )
        m, sd = (float(v[0]) if v.size == 1 else tuple(float(x) for x in v) for v in values)
        return cls((shape[0], shape[1], shape[2]), m, sd, photos and not digit)

    def frame(self, image) -> np.ndarray:
        """One image (anything :func:`fastconv.preprocess.to_mnist_input` takes) as a model
        input ``(C, H, W)``."""
        if self.photo:
            return preprocess.to_photo_input(image, self.shape, self.mean, self.std)
        mean, std = (float(np.asarray(v).reshape(-1)[0]) for v in (self.mean, self.std))
        return preprocess.to_mnist_input(image, size=self.shape[1], mean=mean, std=std)

    def pixels(self, x: np.ndarray) -> np.ndarray:
        """Model inputs back to the pixels they were, for pictures."""
        if isinstance(self.mean, float) and isinstance(self.std, float):
            return x * self.std + self.mean
        mean, std = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in (self.mean, self.std))
        return x * std + mean  # (C, H, W) or (N, C, H, W)


def class_names(meta: dict, count: int) -> list[str]:
    """The model file's class names, else ``"0"``, ``"1"``, ... for ``count`` classes."""
    classes = meta.get("classes")
    return [str(c) for c in classes] if classes is not None else [str(i) for i in range(count)]


def with_input_size(model, meta: dict, size) -> dict:
    """``meta`` with input_shape ``[C, H, W]`` for ``size = (H, W)``: for a model whose file
    leaves its height and width open (an ONNX export with dynamic axes). C is the file's, else
    the channels of the model's declared input (an imported ONNX graph), else 1."""
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be two positive ints (H W), got {list(size)}")
    channels = (meta.get("input_shape") or [None])[0] or declared_channels(model)
    return {**meta, "input_shape": [int(channels or 1), height, width]}


def declared_channels(model) -> int | None:
    """The channel count of an imported ONNX graph's (N, C, H, W) input, when the file fixes it."""
    declared = getattr(model, "inputs", None)
    shape = declared[0].shape if declared else None
    return shape[1] if shape is not None and len(shape) == 4 else None


def read_labels(path) -> list[str]:
    """Class names from a text file, one per line (blank lines at the end ignored), as the
    model zoo ships them (e.g. ImageNet's synset words)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: no class names in this file")
    return [line.strip() for line in lines]


def image_files(arguments) -> list[Path]:
    """The image files named by ``arguments``: files as given, folders by their images (sorted).

    Raises ``ValueError`` for a missing path or a folder with no image file."""
    files = []
    for argument in [arguments] if isinstance(arguments, (str, os.PathLike)) else arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise ValueError(
                    f"{path}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return files


def frame_files(
    files, image_input: ImageInput
) -> tuple[np.ndarray | None, list[int], dict[int, str]]:
    """``(inputs, kept, errors)``: the framed inputs of the readable ``files`` (``None`` if
    none), their indices, and a one-line reason for each unreadable one (see :func:`naming`)."""
    inputs, kept, errors = [], [], {}
    for index, path in enumerate(files):
        try:
            inputs.append(image_input.frame(path))
            kept.append(index)
        except (OSError, ValueError, TypeError) as err:
            text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            errors[index] = " ".join(text.split()) or type(err).__name__
    return (np.stack(inputs) if inputs else None), kept, errors


def naming(path, reason: str) -> str:
    """``reason`` with the file's name in front, unless it already names it."""
    return reason if str(path) in reason else f"{path}: {reason}"


@dataclass
class Evaluation:
    """Scores of a model on labelled data; ``confusion[i, j]`` counts class i predicted as j."""

    accuracy: float
    loss: float
    per_class_accuracy: np.ndarray  # NaN for a class absent from the labels
    confusion: np.ndarray
    count: int

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "count": self.count,
            "per_class_accuracy": [
                None if math.isnan(a) else float(a) for a in self.per_class_accuracy
            ],
            "confusion": self.confusion.tolist(),
        }


def predict_proba(model, x, batch_size: int = 500) -> np.ndarray:
    """Class probabilities (softmax of the logits), ``(N, classes)``, computed in eval mode."""
    return _softmax(_logits(model, x, batch_size))


def predict(model, x, batch_size: int = 500) -> np.ndarray:
    """The most probable class of each sample, int64 ``(N,)``."""
    return np.argmax(_logits(model, x, batch_size), axis=1).astype(np.int64)


def evaluate(model, x, y, batch_size: int = 500, num_classes: int | None = None) -> Evaluation:
    """Accuracy, mean cross-entropy, per-class accuracy and confusion matrix on ``(x, y)``."""
    x, y = _check_data(x, y, "x", "y")
    logits = _logits(model, x, batch_size)
    classes = logits.shape[1] if num_classes is None else num_classes
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"y: labels must be in [0, {classes}), found {y.min()}..{y.max()}")
    log_probs = _log_softmax(logits.astype(np.float64))
    loss = float(-log_probs[np.arange(len(y)), y].mean()) if len(y) else float("nan")
    predicted = np.argmax(logits, axis=1)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)
    accuracy = float((predicted == y).mean()) if len(y) else float("nan")
    return Evaluation(accuracy, loss, per_class, confusion, len(y))


def _logits(model, x, batch_size):
    _check_positive_int("batch_size", batch_size)
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {x.shape}")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with nn.no_grad():
            parts = [np.asarray(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    finally:
        if was_training:
            model.train()
    if not parts:
        raise ValueError("x: no samples")
    return np.concatenate(parts)


def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _softmax(logits):
    return np.exp(_log_softmax(logits.astype(np.float64)))


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_data(x, y, x_name, y_name):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4:
        raise ValueError(f"{x_name}: expected (N, C, H, W), got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{y_name}: expected ({len(x)},) labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{y_name}: expected integer labels, got dtype {y.dtype}")
    if len(x) == 0:
        raise ValueError(f"{x_name}: no samples")
    return x, y.astype(np.int64, copy=False)
