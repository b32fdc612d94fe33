"""Reports for people: Markdown tables, the evaluation figures, the lr_find plot and the Prefect run summary.

Figures use matplotlib's object API (no pyplot state, no display) and are written atomically.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.text import Text
from sklearn.metrics import ConfusionMatrixDisplay

from headstart.data.images import load_rgb
from headstart.files import atomic_path
from headstart.layout import Layout

_NO_GLYPH = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # control characters but the line break titles use


def _drawable(text: str) -> str:
    return _NO_GLYPH.sub(" ", text)


def save_figure(figure: Figure, target: Path) -> None:
    """Write a PNG atomically; class names' tabs and other control characters are drawn as spaces (no font
    has a glyph for them, and matplotlib would warn once per character)."""
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            labels = [label.get_text() for label in axis.get_ticklabels()]
            if any(_NO_GLYPH.search(label) for label in labels):  # redrawn from its formatter: set them anew
                axis.set_ticks(axis.get_ticklocs(), labels=[_drawable(label) for label in labels])
    for text in figure.findobj(Text):
        text.set_text(_drawable(text.get_text()))
    with atomic_path(target, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table; floats to 4 decimals, every other cell as written (class names like `007` stay text)."""
    cells = frame.apply(lambda column: column.map(lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)))
    return cells.to_markdown(index=False, disable_numparse=True)


def plot_confusion(matrix: np.ndarray, classes: list[str], target: Path) -> None:
    """Heat map coloured by row-normalised recall, annotated with the counts (up to 30 classes)."""
    size = max(4.0, 0.6 * len(classes) + 2)
    figure = Figure(figsize=(size + 1, size))
    axis = figure.subplots()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    display = ConfusionMatrixDisplay(rates, display_labels=classes)
    display.plot(ax=axis, cmap="Blues", include_values=len(classes) <= 30, xticks_rotation=45,
                 im_kw={"vmin": 0, "vmax": 1}, colorbar=True)
    if display.text_ is not None:
        for (row, col), count in np.ndenumerate(matrix):
            display.text_[row, col].set(text=str(count), fontsize=8)
    display.im_.colorbar.set_label("share of the actual class")
    for label in axis.get_xticklabels():
        label.set_horizontalalignment("right")
    axis.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (test split, final model)")
    save_figure(figure, target)


def plot_training_curves(histories: dict[str, Path], target: Path) -> int:
    """Loss and accuracy per epoch, train and val, one row per stage, from each stage's history.csv (the
    stages' declared outputs, so evaluate depends on nothing it does not declare); returns the panel count."""
    frames = {stage: pd.read_csv(path) for stage, path in histories.items() if path.exists()}
    metrics = ("loss", "accuracy")
    figure = Figure(figsize=(4.5 * len(metrics), 3.2 * max(1, len(frames))))
    axes = figure.subplots(max(1, len(frames)), len(metrics), squeeze=False)
    for row, (stage, frame) in enumerate(frames.items()):
        for col, metric in enumerate(metrics):
            axis = axes[row][col]
            for column, series in ((metric, "train"), (f"val_{metric}", "val")):
                if column in frame:
                    axis.plot(frame["epoch"], frame[column], marker="o", markersize=3, label=series)
            axis.set(title=f"{stage}: {metric}", xlabel="epoch")
            axis.legend(fontsize=8)
    if not frames:
        axes[0][0].text(0.5, 0.5, f"no training history ({', '.join(map(str, histories.values()))})",
                        ha="center", va="center")
    figure.tight_layout()
    save_figure(figure, target)
    return len(frames) * len(metrics)


def scored_rows(rows: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """`rows` (with `y`, the class index) plus each image's predicted class index and its probability."""
    return rows.assign(predicted=probs.argmax(axis=1), confidence=probs.max(axis=1))


def most_confident_mistakes(rows: pd.DataFrame, probs: np.ndarray, count: int) -> pd.DataFrame:
    """The `count` wrongly predicted images with the highest confidence, most confident first."""
    scored = scored_rows(rows, probs)
    wrong = scored[scored["predicted"] != scored["y"]]
    return wrong.sort_values("confidence", ascending=False, kind="stable").head(count)


def image_grid(count: int, columns: int, cell: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure of `count` axes (at least one) in rows of up to `columns`, each `cell` inches, axes hidden."""
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(cell[0] * columns, cell[1] * rows), layout="constrained")  # room for the suptitle
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    return figure, axes


def plot_misclassified(rows: pd.DataFrame, probs: np.ndarray, classes: list[str], root: Path, count: int,
                       target: Path) -> pd.DataFrame:
    """Gallery of the most confidently wrong test images; returns the rows it shows."""
    worst = most_confident_mistakes(rows, probs, count)
    figure, axes = image_grid(len(worst), 4, (2.6, 3.2))
    for axis, row in zip(axes.flat, worst.itertuples(), strict=False):
        axis.imshow(load_rgb(root / row.path))
        axis.set_title(f"true: {row.label}\npred: {classes[row.predicted]} ({row.confidence:.2f})", fontsize=8)
    if worst.empty:
        axes[0][0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    figure.suptitle("Most confident mistakes (test split, final model)", fontsize=10)
    save_figure(figure, target)
    return worst


def plot_lr_curve(curve: pd.DataFrame, found: dict[str, float], current: float, target: Path) -> None:
    """The learning-rate range test: batch and smoothed loss, the suggestion and the current rate."""
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    axis.plot(curve["learning_rate"], curve["loss"], alpha=0.3, label="batch loss")
    axis.plot(curve["learning_rate"], curve["smoothed_loss"], label="smoothed")
    axis.axvline(found["suggested_learning_rate"], color="green", linestyle="--",
                 label=f"suggested {found['suggested_learning_rate']:.2g}")
    axis.axvline(current, color="grey", linestyle=":", label=f"finetune.learning_rate {current:.2g}")
    axis.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="Learning-rate range test")
    finite = curve["smoothed_loss"][np.isfinite(curve["smoothed_loss"])]
    batch = curve["loss"][np.isfinite(curve["loss"])]
    axis.set_ylim(bottom=0.9 * float(batch.min()), top=float(finite.min() + 2 * (finite.iloc[0] - finite.min()) + 1e-3))
    axis.legend(fontsize=8)
    save_figure(figure, target)


def _metrics_rows(metrics: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(metrics, dict):
        return [row for key, value in metrics.items() for row in _metrics_rows(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), metrics)]


def run_report(layout: Layout, outcomes: list[dict[str, Any]]) -> str:
    """Markdown for the run's artifact: what ran or was cached, the metrics, and where the figures are."""
    stages = pd.DataFrame([{"stage": o["stage"], "status": o["status"], "seconds": f"{o['seconds']:.1f}",
                            "content key": f"`{o['key'][-16:]}`"} for o in outcomes],
                          columns=["stage", "status", "seconds", "content key"])
    lines = ["# headstart run", "", markdown_table(stages), "", "## Metrics", ""]
    if layout.metrics_file.exists():
        rows = _metrics_rows(json.loads(layout.metrics_file.read_text()))
        lines.append(markdown_table(pd.DataFrame(rows, columns=["metric", "value"], dtype=object)))
    else:
        lines.append(f"No `{layout.metrics_file}` yet: the evaluate stage has not run.")
    figures = sorted(layout.reports_dir.glob("**/*confusion*"))
    lines += ["", "## Confusion matrix", ""]
    lines += [f"- `{path.resolve()}`" for path in figures] or ["Not produced yet: the evaluate stage has not run."]
    lines += ["", *promotion_sections(layout)]
    return "\n".join(lines) + "\n"


def promotion_sections(layout: Layout) -> list[str]:
    """The promote stage's data diff and gate decision (reports/*.md), for the run artifact and the PR report."""
    written = [path for path in (layout.data_diff_md, layout.promotion_md) if path.exists()]
    if not written:
        return ["## Promotion gate", "", "Not run yet: the promote stage writes the data diff and the decision."]
    return [path.read_text(encoding="utf-8").rstrip() + "\n" for path in written]
