"""Every picture fastconv draws: training curves, the evaluation report, what a model learned
(its first layer's filters, the feature maps of one image) and the benchmark's speed-ups.

Each ``plot_*`` function writes one PNG and returns what it drew, so a test (or a caller) can
check the picture's numbers against the computation that produced them. Figures are built with
``matplotlib.figure.Figure`` and its Agg canvas, never through ``pyplot``: no global backend is
switched, no window opens, and plotting from several threads is safe.

matplotlib is an optional extra, imported inside each function: without it they raise
:class:`MissingMatplotlib` (an ``ImportError``) whose message says how to get it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import inference, nn

__all__ = [
    "MissingMatplotlib",
    "Mistake",
    "Report",
    "evaluation_report",
    "feature_maps",
    "plot_benchmark",
    "plot_evaluation",
    "plot_feature_maps",
    "plot_filters",
    "plot_history",
    "plot_report",
    "require_matplotlib",
]

INSTALL_HINT = 'plots need matplotlib: pip install "fastconv[viz]"'
DPI = 100
_TRAIN, _VAL = "#1f77b4", "#d62728"


class MissingMatplotlib(ImportError):
    """matplotlib is not installed; the message is one line saying how to install it."""


def require_matplotlib() -> None:
    """Raise :class:`MissingMatplotlib` now if plotting would fail later (commands check first)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingMatplotlib(INSTALL_HINT) from None


def _figure(width: float, height: float):
    """A new figure (inches) drawn by the Agg canvas, independent of pyplot's global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib(INSTALL_HINT) from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


# --------------------------------------------------------------------------------------------
# Training curves


def plot_history(history, path) -> Path:
    """Loss and accuracy per epoch, train and validation, side by side in one PNG.

    ``history``: a :class:`fastconv.train.History`, its ``to_dict()`` columns, or a list of rows
    (dicts with ``epoch``, ``train_loss``, ``train_acc`` and optionally ``val_loss``,
    ``val_acc``). Validation curves are drawn when present. Returns ``path``.
    """
    columns = _history_columns(history)
    fig = _figure(10, 4)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = columns["epoch"]
    for ax, name, title in ((loss_ax, "loss", "Loss"), (acc_ax, "acc", "Accuracy")):
        for split, colour in (("train", _TRAIN), ("val", _VAL)):
            values = columns.get(f"{split}_{name}", [])
            points = [(e, v) for e, v in zip(epochs, values) if v is not None]
            if points:
                xs, ys = zip(*points)
                if name == "acc":
                    ys = tuple(100 * v for v in ys)
                label = "train" if split == "train" else "validation"
                ax.plot(xs, ys, "o-", color=colour, label=label, markersize=4)
                ax.annotate(
                    f"{ys[-1]:.2f}%" if name == "acc" else f"{ys[-1]:.4f}",
                    (xs[-1], ys[-1]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    color=colour,
                    fontsize=8,
                )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("%" if name == "acc" else "cross-entropy")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xticks(_epoch_ticks(epochs))
            ax.set_xlim(min(epochs) - 0.25, max(epochs) + 0.25)
        if ax.lines:
            ax.legend()
    return _save(fig, path)


def _history_columns(history) -> dict[str, list]:
    if hasattr(history, "to_dict"):
        history = history.to_dict()
    if isinstance(history, (list, tuple)):
        keys = {key for row in history for key in row}
        history = {key: [row.get(key) for row in history] for key in keys}
    if not isinstance(history, dict):
        raise TypeError(
            f"history: expected a History, a dict of columns or a list of rows, "
            f"got {type(history).__name__}"
        )
    columns = {key: list(values) for key, values in history.items()}
    count = len(columns.get("train_loss", []))
    if columns.get("epoch") is None or any(e is None for e in columns["epoch"]):
        columns["epoch"] = list(range(1, count + 1))
    return columns


def _epoch_ticks(epochs: Sequence[int]) -> list[int]:
    first, last = min(epochs), max(epochs)
    step = max(1, math.ceil((last - first + 1) / 12))
    return list(range(first, last + 1, step))


# --------------------------------------------------------------------------------------------
# Evaluation report


@dataclass(frozen=True)
class Mistake:
    """One misclassified sample: its index in the data, true and predicted class, and the
    probability the model gave its (wrong) prediction."""

    index: int
    true: int
    predicted: int
    probability: float


@dataclass
class Report:
    """What the evaluation report draws: ``confusion[i, j]`` counts class i predicted as j."""

    confusion: np.ndarray
    per_class_accuracy: np.ndarray  # NaN for a class absent from the labels
    accuracy: float
    count: int
    mistakes: list[Mistake]  # the most confident ones first
    classes: list[str]


def evaluation_report(
    probabilities, labels, classes: Sequence[str] | None = None, mistakes: int = 16
) -> Report:
    """The numbers of the evaluation report from a model's class probabilities ``(N, K)`` (or
    logits: only their order matters) and the true ``labels`` ``(N,)``: confusion matrix,
    per-class accuracy and the ``mistakes`` misclassified samples predicted most confidently."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    if probabilities.ndim != 2 or labels.shape != (len(probabilities),):
        raise ValueError(
            f"expected probabilities (N, K) and labels (N,), got shapes "
            f"{probabilities.shape} and {labels.shape}"
        )
    k = probabilities.shape[1]
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must be in [0, {k}), found {labels.min()}..{labels.max()}")
    classes = [str(c) for c in (classes if classes is not None else range(k))]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for {k} classes")
    predicted = np.argmax(probabilities, axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    totals = confusion.sum(axis=1)
    per_class = np.full(k, np.nan)
    per_class[totals > 0] = np.diag(confusion)[totals > 0] / totals[totals > 0]
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    worst = wrong[np.argsort(-confidence, kind="stable")[:mistakes]]
    return Report(
        confusion=confusion,
        per_class_accuracy=per_class,
        accuracy=float((predicted == labels).mean()) if len(labels) else float("nan"),
        count=len(labels),
        mistakes=[
            Mistake(
                int(i), int(labels[i]), int(predicted[i]), float(probabilities[i, predicted[i]])
            )
            for i in worst
        ],
        classes=classes,
    )


def plot_report(report: Report, images, path, title: str | None = None) -> Path:
    """Draw ``report`` as one PNG: the confusion matrix (counts on every non-zero cell, the
    diagonal in its own colour so it stays readable beside the much smaller errors), per-class
    accuracy bars, and a grid of the most confident mistakes. ``images``: the evaluated samples
    ``(N, C, H, W)`` or ``(N, H, W)``, indexed by ``report.mistakes``; returns ``path``."""
    fig = _figure(13, 10.5)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.35, 1])
    cm_ax, bar_ax = top.subplots(1, 2, width_ratios=[1.15, 1])
    _draw_confusion(cm_ax, report.confusion, report.classes)
    _draw_per_class(bar_ax, report)
    _draw_mistakes(bottom, report, images)
    if title is None:
        title = f"{report.accuracy:.2%} of {report.count:,} correct"
    fig.suptitle(title, fontsize=14, fontweight="bold")
    return _save(fig, path)


def plot_evaluation(
    model,
    x,
    y,
    path,
    images=None,
    classes: Sequence[str] | None = None,
    mistakes: int = 16,
    batch_size: int = 500,
) -> Report:
    """Evaluate ``model`` on ``(x, y)`` and write the report (:func:`plot_report`) to ``path``.

    ``images`` are what the mistake grid shows (default ``x``; pass the un-normalised pixels to
    see the digits as they are). Returns the :class:`Report` that was drawn."""
    report = evaluation_report(inference.predict_proba(model, x, batch_size), y, classes, mistakes)
    plot_report(report, x if images is None else images, path)
    return report


def _draw_confusion(ax, confusion, classes):
    from matplotlib.colors import LogNorm

    k = len(classes)
    off = np.where(np.eye(k, dtype=bool), np.nan, confusion).astype(float)
    off[off == 0] = np.nan
    diag = np.where(np.eye(k, dtype=bool), confusion, np.nan).astype(float)
    # Errors are tens, hits are thousands: one colour scale cannot show both, so each has its own.
    norm = LogNorm(1, max(np.nanmax(off), 2) if np.isfinite(off).any() else 2)
    if np.isfinite(off).any():
        ax.imshow(off, cmap="Reds", norm=norm, interpolation="none")
    ax.imshow(diag, cmap="Greens", vmin=0, vmax=max(np.nanmax(diag), 1) * 1.6, interpolation="none")
    ax.set_facecolor("white")
    size = 9 if k <= 10 else max(5, int(90 / k))
    for i in range(k):
        for j in range(k):
            count = confusion[i, j]
            if count or i == j:
                dark = i != j and norm(count) > 0.6  # white stays readable on deep red
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=size,
                    fontweight="bold" if i == j else "normal",
                    color="white" if dark else "black" if i == j else "#600",
                )
    ax.set_xticks(range(k), classes, rotation=90 if max(map(len, classes)) > 2 else 0)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (counts)")
    ax.set_xticks(np.arange(-0.5, k), minor=True)
    ax.set_yticks(np.arange(-0.5, k), minor=True)
    ax.grid(which="minor", color="#ddd", linewidth=0.5)
    ax.tick_params(which="minor", length=0)


def _draw_per_class(ax, report):
    k = len(report.classes)
    values = np.nan_to_num(report.per_class_accuracy * 100, nan=0.0)
    bars = ax.barh(range(k), values, color="#2ca02c")
    lowest = float(np.nanmin(report.per_class_accuracy)) * 100 if k else 0
    left = max(0.0, min(90.0, math.floor(lowest / 5) * 5 - 5)) if np.isfinite(lowest) else 0
    ax.set_xlim(left, 100.5)
    for bar, value, acc in zip(bars, values, report.per_class_accuracy):
        text = "n/a" if np.isnan(acc) else f"{value:.1f}%"
        ax.text(
            max(value, left) - 0.3,
            bar.get_y() + bar.get_height() / 2,
            text,
            ha="right",
            va="center",
            color="white" if value - left > 8 else "black",
            fontsize=8,
        )
    ax.axvline(
        report.accuracy * 100,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"overall {report.accuracy:.2%}",
    )
    ax.set_yticks(range(k), report.classes)
    ax.invert_yaxis()
    ax.set_xlabel("% correct")
    ax.set_title("Accuracy per class")
    ax.legend(loc="lower left", fontsize=8)


def _draw_mistakes(subfig, report, images):
    shown = report.mistakes
    columns = 8
    rows = max(1, math.ceil(len(shown) / columns))
    axes = np.atleast_1d(subfig.subplots(rows, columns)).reshape(-1)
    subfig.suptitle("Most confident mistakes: true → predicted (probability)", fontsize=11)
    images = np.asarray(images) if images is not None else None
    for ax in axes:
        ax.set_axis_off()
    if not shown:
        axes[0].text(0, 0.5, "no mistakes", fontsize=12, transform=axes[0].transAxes)
    for ax, mistake in zip(axes, shown):
        if images is not None:
            ax.imshow(_as_picture(images[mistake.index]), cmap="gray", interpolation="nearest")
        names = report.classes
        ax.set_title(
            f"{names[mistake.true]} → {names[mistake.predicted]} ({mistake.probability:.0%})",
            fontsize=9,
            color="#a00",
        )


def _as_picture(image):
    """One sample (C, H, W), (H, W) or (H, W, C) as something imshow draws."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[2] == 3:
        lo, hi = image.min(), image.max()
        return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return image


# --------------------------------------------------------------------------------------------
# What a model learned


def plot_filters(model, path, max_filters: int = 64) -> np.ndarray:
    """The first Conv2d layer's kernels as a grid of small images (blue negative, red positive,
    one symmetric scale for all, so strengths compare). A kernel over several input channels is
    shown as their mean. Returns the ``(F, kh, kw)`` array drawn."""
    conv = next(_conv_layers(model), None)
    if conv is None:
        raise ValueError("the model has no Conv2d layer")
    weight = np.asarray(conv.weight.data, dtype=np.float64)
    kernels = weight.mean(axis=1)[:max_filters]
    count = len(kernels)
    columns = min(count, 8)
    rows = math.ceil(count / columns)
    fig = _figure(1.1 * columns + 0.8, 1.1 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, columns)).reshape(-1)
    limit = float(np.abs(kernels).max()) or 1.0
    image = None
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < count:
            image = ax.imshow(
                kernels[i], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
            )
            ax.set_title(str(i), fontsize=7)
    kh, kw = kernels.shape[1:]
    mean = f" (mean over {weight.shape[1]} input channels)" if weight.shape[1] > 1 else ""
    fig.suptitle(f"First conv layer: {weight.shape[0]} filters of {kh}x{kw}{mean}")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    _save(fig, path)
    return kernels


def feature_maps(model, x) -> list[tuple[str, np.ndarray]]:
    """Run one input ``x`` ``(C, H, W)`` through ``model`` (a Sequential, nested ones flattened)
    in eval mode and return ``(name, maps)`` for each Conv2d layer: its output ``(C_out, H, W)``
    after the BatchNorm and activation that directly follow it, if any."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"x: expected one input (C, H, W), got shape {x.shape}")
    dtype = next((p.data.dtype for p in model.parameters()), np.float32)
    out, maps, current = x[np.newaxis].astype(dtype), [], None
    follow = (nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for name, layer in _flat_layers(model):
            if current is not None and not isinstance(layer, follow):
                maps.append(current)
                current = None
            out = layer(out)
            if isinstance(layer, nn.Conv2d):
                current = (name, out)
            elif current is not None:
                current = (current[0], out)
        if current is not None:
            maps.append(current)
    finally:
        if was_training:
            model.train()
    return [(name, np.asarray(value[0])) for name, value in maps]


def plot_feature_maps(
    model, x, path, max_maps: int = 32, image=None
) -> list[tuple[str, np.ndarray]]:
    """The input and the activations of each conv layer (see :func:`feature_maps`) for one input
    ``x`` ``(C, H, W)``, one block of small images per layer (each map on its own scale).
    ``image`` is what the input panel shows (default ``x``). Returns what :func:`feature_maps`
    returned."""
    layers = feature_maps(model, x)
    if not layers:
        raise ValueError("the model has no Conv2d layer")
    columns = 8
    heights = [1.0] + [math.ceil(min(len(m), max_maps) / columns) for _, m in layers]
    fig = _figure(1.25 * columns, 1.35 * sum(heights) + 0.5)
    blocks = fig.subfigures(len(heights), 1, height_ratios=heights)
    first = blocks[0].subplots(1, columns)
    for ax in first:
        ax.set_axis_off()
    first[0].imshow(
        _as_picture(x if image is None else image), cmap="gray", interpolation="nearest"
    )
    first[0].set_title("input", fontsize=9)
    for block, (name, maps) in zip(blocks[1:], layers):
        count = min(len(maps), max_maps)
        rows = math.ceil(count / columns)
        axes = np.atleast_1d(block.subplots(rows, columns)).reshape(-1)
        for i, ax in enumerate(axes):
            ax.set_axis_off()
            if i < count:
                ax.imshow(maps[i], cmap="magma", interpolation="nearest")
        shown = f"first {count} of {len(maps)}" if count < len(maps) else f"{len(maps)}"
        block.suptitle(
            f"layer {name} (Conv2d): {shown} maps of {maps.shape[1]}x{maps.shape[2]}", fontsize=10
        )
    _save(fig, path)
    return layers


def _flat_layers(model, prefix: str = ""):
    if isinstance(model, nn.Sequential):
        for name, child in model.named_children():
            yield from _flat_layers(child, f"{prefix}{name}.")
    else:
        yield prefix.rstrip("."), model


def _conv_layers(model):
    return (m for m in model.modules() if isinstance(m, nn.Conv2d))


# --------------------------------------------------------------------------------------------
# Benchmarks


_SPEEDUPS = (
    ("speedup_vs_reference", "vs NumPy reference", "#2ca02c"),
    ("speedup_vs_torch", "vs PyTorch", "#ff7f0e"),
)


def plot_benchmark(rows: Sequence[dict[str, Any]], path, title: str = "fastconv speed-ups") -> Path:
    """Horizontal bars of speed-ups, one group per benchmark row, on a log scale with the 1x
    line marked (right of it fastconv is faster). ``rows``: dicts with ``operation``, ``shape``
    (any printable) and ``speedup_vs_reference`` and/or ``speedup_vs_torch`` (None or absent
    when not measured). Returns ``path``."""
    rows = list(rows)
    fig = _figure(10, 1.2 + 0.42 * max(len(rows), 1) * 2)  # fails first if matplotlib is missing
    from matplotlib.ticker import FuncFormatter

    if not rows:
        raise ValueError("no benchmark rows to plot")
    present = [s for s in _SPEEDUPS if any(_number(row.get(s[0])) for row in rows)]
    if not present:
        raise ValueError("benchmark rows have no speedup_vs_reference or speedup_vs_torch values")
    labels = [_row_label(row) for row in rows]
    fig.set_figheight(1.2 + 0.42 * len(rows) * len(present))
    ax = fig.subplots()
    height = 0.8 / len(present)
    values_all = []
    for k, (key, legend, colour) in enumerate(present):
        positions = np.arange(len(rows)) + (k - (len(present) - 1) / 2) * height
        values = [_number(row.get(key)) for row in rows]
        shown = [v if v else np.nan for v in values]
        ax.barh(positions, shown, height=height * 0.9, color=colour, label=legend)
        for y, v in zip(positions, values):
            if v:
                ax.text(v, y, f" {v:.2f}x" if v < 10 else f" {v:.0f}x", va="center", fontsize=8)
                values_all.append(v)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    lo, hi = min(values_all + [1.0]), max(values_all + [1.0])
    ax.set_xlim(lo / 1.6, hi * 2.2)
    ax.axvline(1, color="black", linewidth=1)
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up (times faster; log scale, 1x = same speed)")
    ax.set_title(title)
    ax.grid(axis="x", which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _row_label(row) -> str:
    operation = str(row.get("operation", row.get("name", "?")))
    shape = row.get("shape")
    if shape is None:
        return operation
    if isinstance(shape, (list, tuple)):
        shape = "x".join(str(s) for s in shape)
    return f"{operation} {shape}"


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None
