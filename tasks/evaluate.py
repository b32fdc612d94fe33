"""evaluate stage: score the head-only and the final model on the held-out splits, and report.

The head is scored on the cached features (no backbone pass); the final classifier on the split's
images through the same decode-and-resize pipeline training used. Every number comes from
scikit-learn's metrics on those predictions. Outputs: `metrics.json` (stable dotted keys for
`dvc metrics show/diff`), per-class CSV, confusion-matrix plot data and figures, and
`reports/evaluation.md`. An optional accuracy floor turns the stage into a quality gate.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from headstart.data.artifacts import live_dir, load_model, load_split, read_features_info, read_json
from headstart.data.datasets import image_dataset
from headstart.data.images import load_rgb
from headstart.data.manifest import read_split_manifest
from headstart.files import atomic_write_json, atomic_write_text
from headstart.layout import Layout
from headstart.model import with_flip_tta
from headstart.params import Params
from headstart.reporting import save_figure

log = logging.getLogger(__name__)

EVAL_SPLITS = ("test", "val")


class EvaluateError(ValueError):
    """Inputs that cannot be evaluated; the message names the file and what to do."""


class QualityGateError(ValueError):
    """The final model's test accuracy is below `evaluate.assert_min_accuracy`."""


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of images whose class is among the `k` most probable, for any number of classes.

    With `k` >= the number of classes every image counts (1.0; scikit-learn only warns that this is
    meaningless). scikit-learn refuses two-column scores for two classes, so those pass the second
    class's probability, which ranks the two classes the same way (top-1 = probability above 0.5).
    """
    num_classes = probs.shape[1]
    if k >= num_classes:
        return 1.0
    scores = probs[:, 1] if num_classes == 2 else probs
    return float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(num_classes)))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, top_k: int) -> dict[str, float]:
    """Accuracy, top-k accuracy, macro/weighted precision-recall-F1 and log loss of one model on one split."""
    num_classes = probs.shape[1]
    everyone = np.arange(num_classes)
    predicted = probs.argmax(axis=1)
    # float32 softmax rows sum to 1 only within ~1e-7; log_loss wants exact probabilities
    probs64 = probs.astype(np.float64)
    probs64 /= probs64.sum(axis=1, keepdims=True)
    result = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "top_k_accuracy": top_k_accuracy(labels, probs64, top_k),
        "log_loss": float(log_loss(labels, probs64, labels=everyone)),
        "images": int(len(labels)),
    }
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predicted, labels=everyone, average=average, zero_division=0
        )
        result.update({f"{average}_precision": float(precision), f"{average}_recall": float(recall),
                       f"{average}_f1": float(f1)})
    return result


def per_class_report(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per class: precision, recall, F1 and support (scikit-learn's classification report)."""
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(len(classes)), zero_division=0
    )
    return pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1, "support": support})


def _split_rows(layout: Layout, classes: list[str]) -> dict[str, pd.DataFrame]:
    """The manifest rows of each evaluated split that has images, with `y` = class index."""
    manifest = read_split_manifest(layout.split_manifest)
    unknown = sorted(set(manifest["label"]) - set(classes))
    if unknown:
        raise EvaluateError(
            f"{layout.split_manifest} has labels {unknown} that the model does not know: "
            "rerun features, train_head and finetune"
        )
    manifest["y"] = manifest["label"].map(classes.index).astype(np.int32)
    rows = {split: manifest[manifest["split"] == split].reset_index(drop=True) for split in EVAL_SPLITS}
    if rows["test"].empty:
        raise EvaluateError(f"{layout.split_manifest} has no test images: set split.test > 0 and rerun split")
    return {split: frame for split, frame in rows.items() if not frame.empty}


def predict_images(model: keras.Model, layout: Layout, rows: pd.DataFrame, info: dict[str, Any],
                   batch_size: int) -> np.ndarray:
    paths = [str(layout.root / path) for path in rows["path"]]
    dataset = image_dataset(paths, None, int(info["image_size"]), batch_size, info.get("interpolation", "bilinear"))
    return model.predict(dataset, verbose=0)


def plot_confusion(matrix: np.ndarray, classes: list[str], target: Path) -> None:
    """Heat map coloured by row-normalised recall, annotated with the counts."""
    size = max(4.0, 0.6 * len(classes) + 2)
    figure = Figure(figsize=(size + 1, size))
    axis = figure.subplots()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, fraction=0.046, label="share of the actual class")
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="actual",
             title="Confusion matrix (test split, final model)")
    axis.set_xticklabels(classes, rotation=45, ha="right")
    axis.set_yticklabels(classes)
    if len(classes) <= 30:
        for (row, col), count in np.ndenumerate(matrix):
            axis.text(col, row, str(count), ha="center", va="center", fontsize=8,
                      color="white" if rates[row, col] > 0.5 else "black")
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


def plot_misclassified(rows: pd.DataFrame, probs: np.ndarray, classes: list[str], layout: Layout, count: int,
                       target: Path) -> pd.DataFrame:
    """Gallery of the most confidently wrong test images; returns the rows it shows."""
    predicted = probs.argmax(axis=1)
    wrong = rows.assign(predicted=predicted, confidence=probs.max(axis=1))[predicted != rows["y"].to_numpy()]
    worst = wrong.sort_values("confidence", ascending=False, kind="stable").head(count)
    columns = max(1, min(4, len(worst)))
    grid_rows = max(1, math.ceil(len(worst) / columns))
    figure = Figure(figsize=(2.6 * columns, 3.2 * grid_rows))
    axes = figure.subplots(grid_rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, row in zip(axes.flat, worst.itertuples(), strict=False):
        axis.imshow(load_rgb(layout.root / row.path))
        axis.set_title(f"true: {row.label}\npred: {classes[row.predicted]} ({row.confidence:.2f})", fontsize=8)
    if worst.empty:
        axes[0][0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    figure.suptitle("Most confident mistakes (test split, final model)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, target)
    return worst


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_report(target: Path, metrics: dict[str, Any], report: pd.DataFrame, confusions: pd.DataFrame,
                 worst: pd.DataFrame, info: dict[str, Any], gate: str) -> None:
    summary = []
    compared = [("final", metrics), ("final without flip TTA", metrics.get("without_tta", {})),
                ("head only", metrics["head"])]
    for model, scores in compared:
        for split in EVAL_SPLITS:
            if split in scores:
                s = scores[split]
                summary.append({"model": model, "split": split, "images": s["images"], "accuracy": s["accuracy"],
                                f"top-{metrics['top_k']}": s["top_k_accuracy"], "macro F1": s["macro_f1"],
                                "weighted F1": s["weighted_f1"], "log loss": s["log_loss"]})
    tuned = "yes" if metrics["fine_tuned"] else "no (the final model is the head on the frozen backbone)"
    text = [
        "# Evaluation report",
        "",
        f"Backbone `{info.get('backbone')}` (weights `{info.get('weights_id')}`), {info.get('image_size')} px, "
        f"{len(report)} classes; fine-tuned: {tuned}.",
        "",
        f"Quality gate: {gate}",
        "",
        "## Summary",
        "",
        _markdown_table(pd.DataFrame(summary)),
        "",
        "## Per class (final model, test split)",
        "",
        _markdown_table(report),
        "",
        "## Most frequent confusions (test split)",
        "",
        _markdown_table(confusions) if not confusions.empty else "No misclassified test images.",
        "",
        "## Most confident mistakes",
        "",
        _markdown_table(worst[["path", "label", "predicted_label", "confidence"]]) if not worst.empty else "None.",
        "",
        "## Figures",
        "",
        "![Confusion matrix](figures/confusion_matrix.png)",
        "",
        "![Training curves](figures/training_curves.png)",
        "",
        "![Misclassified test images](figures/misclassified.png)",
        "",
    ]
    atomic_write_text(target, "\n".join(text))


def run(params: Params, layout: Layout) -> dict[str, Any]:
    p = params.evaluate
    info = read_json(layout.finetune_dir / "info.json", "finetune")
    classes = list(info["classes"])
    features_info = read_features_info(layout)
    if list(features_info["classes"]) != classes:
        raise EvaluateError(
            f"{layout.features_dir / 'info.json'} lists classes {features_info['classes']} but "
            f"{layout.finetune_dir / 'info.json'} lists {classes}: rerun train_head and finetune"
        )
    head = load_model(layout.head_dir / "head.keras", "train_head")
    plain = load_model(layout.finetune_dir / "model.keras", "finetune")
    model = with_flip_tta(plain) if p.tta_flip else plain  # what export will serve
    rows = _split_rows(layout, classes)

    metrics: dict[str, Any] = {"top_k": min(p.top_k, len(classes)), "fine_tuned": bool(info.get("fine_tuned")),
                               "tta_flip": p.tta_flip, "head": {}}
    if p.tta_flip:
        metrics["without_tta"] = {}
    final_probs: dict[str, np.ndarray] = {}
    for split, frame in rows.items():
        npz = layout.features_dir / f"{split}.npz"
        features, labels = load_split(npz, len(classes), int(features_info["feature_dim"]))
        with np.load(npz, allow_pickle=False) as cached:
            if set(cached["sha256"]) != set(frame["sha256"]):
                raise EvaluateError(
                    f"{npz} does not hold the {split} split of {layout.split_manifest}: rerun the features stage"
                )
        metrics["head"][split] = classification_metrics(labels, head.predict(features, verbose=0), p.top_k)
        final_probs[split] = predict_images(model, layout, frame, info, params.features.batch_size)
        metrics[split] = classification_metrics(frame["y"].to_numpy(), final_probs[split], p.top_k)
        if p.tta_flip:
            plain_probs = predict_images(plain, layout, frame, info, params.features.batch_size)
            metrics["without_tta"][split] = classification_metrics(frame["y"].to_numpy(), plain_probs, p.top_k)
        log.info("evaluate: %s accuracy %.4f (head only %.4f) on %d images", split, metrics[split]["accuracy"],
                 metrics["head"][split]["accuracy"], len(frame))

    test, probs = rows["test"], final_probs["test"]
    predicted = probs.argmax(axis=1)
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    figures = layout.reports_dir / "figures"
    report = per_class_report(test["y"].to_numpy(), predicted, classes)
    atomic_write_text(layout.reports_dir / "classification_report.csv", report.to_csv(index=False))
    pairs = pd.DataFrame({"actual": test["label"], "predicted": [classes[i] for i in predicted]})
    atomic_write_text(layout.reports_dir / "confusion.csv", pairs.to_csv(index=False))
    matrix = confusion_matrix(test["y"], predicted, labels=np.arange(len(classes)))
    plot_confusion(matrix, classes, figures / "confusion_matrix.png")
    plot_training_curves(live_dir(layout, "train_head").parent, figures / "training_curves.png")
    worst = plot_misclassified(test, probs, classes, layout, p.gallery_size, figures / "misclassified.png")
    worst = worst.assign(predicted_label=[classes[i] for i in worst["predicted"]])
    confusions = (pairs[pairs["actual"] != pairs["predicted"]].value_counts().rename("count").reset_index().head(10))

    accuracy = metrics["test"]["accuracy"]
    floor = p.assert_min_accuracy
    passed = floor is None or accuracy >= floor
    gate = ("not set (evaluate.assert_min_accuracy: null)" if floor is None
            else f"{'passed' if passed else 'FAILED'}: test accuracy {accuracy:.4f} vs minimum {floor:.4f}")
    write_report(layout.reports_dir / "evaluation.md", metrics, report, confusions, worst, info, gate)
    atomic_write_json(layout.metrics_file, metrics)
    if not passed:
        raise QualityGateError(
            f"test accuracy {accuracy:.4f} is below evaluate.assert_min_accuracy={floor:g}: the model failed the quality "
            f"gate. See {layout.reports_dir / 'evaluation.md'}; lower the threshold or improve the model."
        )
    return metrics
