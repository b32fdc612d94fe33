"""Reports for people: Markdown tables, the evaluation figures, the lr_find plot and the Prefect run summary.

Figures use matplotlib's object API (no pyplot state, no display) and are written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from headstart.data.images import load_rgb
from headstart.files import atomic_path
from headstart.layout import Layout


def save_figure(figure: Figure, target: Path) -> None:
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


def plot_training_curves(live_root: Path, target: Path) -> int:
    """One panel per stage and metric from dvclive's per-step TSV files; returns the panel count."""
    panels: dict[tuple[str, str], list[tuple[str, pd.DataFrame]]] = {}
    for tsv in sorted(live_root.glob("*/plots/metrics/**/*.tsv")):
        stage = tsv.relative_to(live_root).parts[0]
        series = tsv.parent.name if tsv.parent.name != "metrics" else ""
        panels.setdefault((stage, tsv.stem), []).append((series, pd.read_csv(tsv, sep="\t")))
    columns = max(1, len({metric for _, metric in panels}))
    stages = sorted({stage for stage, _ in panels}) or ["(none)"]
    figure = Figure(figsize=(4.5 * columns, 3.2 * len(stages)))
    axes = figure.subplots(len(stages), columns, squeeze=False)
    metrics = sorted({metric for _, metric in panels})
    for row, stage in enumerate(stages):
        for col in range(columns):
            axis = axes[row][col]
            curves = panels.get((stage, metrics[col]), []) if metrics else []
            if not curves:
                axis.axis("off")
                continue
            for series, frame in curves:
                axis.plot(frame["step"], frame[frame.columns[-1]], marker="o", markersize=3, label=series or metrics[col])
            axis.set(title=f"{stage}: {metrics[col]}", xlabel="step (epoch)")
            axis.legend(fontsize=8)
    if not panels:
        axes[0][0].text(0.5, 0.5, f"no dvclive curves under {live_root}", ha="center", va="center")
    figure.tight_layout()
    save_figure(figure, target)
    return len(panels)


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
