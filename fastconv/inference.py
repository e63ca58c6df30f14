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
    ``(pixel - mean) / std``, as its file's metadata declares them (defaults above)."""

    shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE
    mean: float = DEFAULT_MEAN
    std: float = DEFAULT_STD

    @classmethod
    def of(cls, meta: dict, name: str = "model", use: str = "this command") -> ImageInput:
        """From a model file's metadata; refuses (``ValueError`` naming ``use``) a model whose
        input is not one-channel and square, the only images :mod:`fastconv.preprocess` frames."""
        shape = tuple(int(d) for d in (meta.get("input_shape") or DEFAULT_INPUT_SHAPE))
        if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]:
            raise ValueError(
                f"{name}: {use} needs a one-channel square input, the model takes {list(shape)}"
            )
        return cls(
            shape,
            float(meta.get("mean", DEFAULT_MEAN)),
            float(meta.get("std", DEFAULT_STD)),
        )

    def frame(self, image) -> np.ndarray:
        """One image (anything :func:`fastconv.preprocess.to_mnist_input` takes) as a model
        input ``(C, H, W)``."""
        return preprocess.to_mnist_input(image, size=self.shape[1], mean=self.mean, std=self.std)

    def pixels(self, x: np.ndarray) -> np.ndarray:
        """Model inputs back to the pixels they were, for pictures."""
        return x * self.std + self.mean


def class_names(meta: dict, count: int) -> list[str]:
    """The model file's class names, else ``"0"``, ``"1"``, ... for ``count`` classes."""
    classes = meta.get("classes")
    return [str(c) for c in classes] if classes is not None else [str(i) for i in range(count)]


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
