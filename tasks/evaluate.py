"""evaluate stage: score the head-only and the final model on the held-out splits, and report.

The head is scored on the cached features (no backbone pass); the final classifier on the split's
images through the same decode-and-resize pipeline training used. Every number comes from
scikit-learn's metrics on those predictions. Outputs: `metrics.json` (stable dotted keys for
`dvc metrics show/diff`, with the final model's bootstrap 95% intervals), per-class CSV, confusion-matrix
plot data and figures, per-image test predictions (`reports/predictions.csv`, which the PR report
pairs across commits), and `reports/evaluation.md`. An optional accuracy floor turns the stage into a quality gate.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from headstart.calibration import (
    calibrate,
    ece_intervals,
    report_lines,
    served_probabilities,
    split_scores,
    write_reliability,
)
from headstart.conversion import CheckedRunner, runner
from headstart.data.artifacts import (
    FeaturesInfo,
    ModelInfo,
    load_model,
    load_split,
    load_split_paths,
    read_features_info,
    read_model_info,
)
from headstart.data.datasets import image_batches, prefetched
from headstart.data.manifest import read_split_manifest
from headstart.explain import GradCam, gradcam_examples, plot_gradcam
from headstart.files import atomic_write_json, atomic_write_text, remove_stale_temps
from headstart.layout import Layout
from headstart.metrics import classification_metrics, per_class_report
from headstart.model import flip_tta_passes, with_flip_tta
from headstart.params import EvaluateParams, Params
from headstart.reporting import markdown_table, plot_confusion, plot_misclassified, plot_training_curves
from headstart.runtimes import resolve
from headstart.serving import serving_model
from headstart.uncertainty import (
    Predictions,
    bootstrap_intervals,
    compare_predictions,
    format_interval,
    per_class_intervals,
    write_predictions,
)

log = logging.getLogger(__name__)

EVAL_SPLITS = ("test", "val")
SIGNIFICANT = 0.05  # McNemar p below which the report calls fine-tuning's change real


class EvaluateError(ValueError):
    """Inputs that cannot be evaluated; the message names the file and what to do."""


class QualityGateError(ValueError):
    """The final model's test accuracy is below `evaluate.assert_min_accuracy`."""


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


def predict_images(run: CheckedRunner, layout: Layout, rows: pd.DataFrame, info: ModelInfo,
                   batch_size: int) -> list[np.ndarray]:
    """Each output of the model `run` runs (conversion.runner), over the rows' images."""
    paths = [str(layout.root / path) for path in rows["path"]]
    batches = list(run.map(prefetched(image_batches(paths, info.image_size, batch_size, info.interpolation))))
    return [np.concatenate(output) for output in zip(*batches, strict=True)]


def write_report(target: Path, metrics: dict[str, Any], report: pd.DataFrame, confusions: pd.DataFrame,
                 worst: pd.DataFrame, info: ModelInfo, gate: str, calibration: str, gradcam: bool = False) -> None:
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
                summary[-1].update({f"{name} 95% CI": format_interval(**s["ci95"][key]) if "ci95" in s else None
                                    for name, key in (("accuracy", "accuracy"), ("macro F1", "macro_f1"))})
    tuned = "yes" if metrics["fine_tuned"] else "no (the final model is the head on the frozen backbone)"
    text = [
        "# Evaluation report",
        "",
        f"Backbone `{info.backbone}` (weights `{info.weights_id}`), {info.image_size} px, "
        f"{len(report)} classes; fine-tuned: {tuned}.",
        "",
        f"Quality gate: {gate}",
        "",
        "## Summary",
        "",
        markdown_table(pd.DataFrame(summary).dropna(axis=1, how="all").fillna("-")),
        "",
        "## Per class (final model, test split)",
        "",
        "`*_low`, `*_high`: 95% Wilson score intervals of recall (of the class's images) and precision (of the "
        "images predicted as it); they stay honest at 0% and 100%.",
        "",
        markdown_table(report),
        "",
        "## Most frequent confusions (test split)",
        "",
        markdown_table(confusions) if not confusions.empty else "No misclassified test images.",
        "",
        "## Most confident mistakes",
        "",
        markdown_table(worst[["path", "label", "predicted_label", "confidence"]]) if not worst.empty else "None.",
        "",
        *_gain_lines(metrics),
        *report_lines(metrics, EVAL_SPLITS, calibration),
        "## Figures",
        "",
        "![Confusion matrix](figures/confusion_matrix.png)",
        "",
        "![Training curves](figures/training_curves.png)",
        "",
        "![Misclassified test images](figures/misclassified.png)",
        "",
        *(["![Grad-CAM: where the model looked (mistakes, then correct examples per class)](figures/gradcam.png)",
           ""] if gradcam else []),
    ]
    atomic_write_text(target, "\n".join(text))


def _gain_lines(metrics: dict[str, Any]) -> list[str]:
    """The paired verdict on fine-tuning, in words: real gain, real loss, or within noise."""
    gain = metrics.get("finetune_gain")
    if gain is None:
        return []
    change = (f"Fine-tuning changed test accuracy by {100 * gain['delta']:+.2f} points over the head alone "
              f"(paired bootstrap 95% interval {100 * gain['low']:+.2f} to {100 * gain['high']:+.2f} points; "
              f"{gain['final_only_right']} images only the final model gets right, {gain['head_only_right']} only "
              f"the head; McNemar's exact test p = {gain['p_value']:.3g}).")
    if gain["p_value"] >= SIGNIFICANT:
        verdict = (f"That is within noise (p >= {SIGNIFICANT}): on these {gain['images']} test images the "
                   "fine-tuned model cannot be told from the head.")
    elif gain["delta"] > 0:
        verdict = "That gain is real: larger than the resampling noise of this test set."
    else:
        verdict = "That loss is real: the head alone is better on this test set."
    return ["## Did fine-tuning pay? (head vs final, same test images)", "", f"{change} {verdict}", ""]


def _finetune_gain(layout: Layout, features_info: FeaturesInfo, classes: list[str], test: pd.DataFrame,
                   final_probs: np.ndarray, p: EvaluateParams) -> dict[str, Any]:
    """Head (cached features) against final (images) on the same test images: McNemar and the paired Δ interval."""
    head = load_model(layout.head_model, "train_head")
    npz = layout.features_dir / "test.npz"
    features, labels = load_split(npz, len(classes), features_info.feature_dim)

    def predictions(paths: Any, truth: Any, probs: np.ndarray) -> Predictions:
        frame = pd.DataFrame({"path": list(paths), "label": [classes[i] for i in truth],
                              "predicted": [classes[i] for i in probs.argmax(axis=1)], "confidence": probs.max(axis=1)})
        return Predictions(frame=frame, classes=classes, probabilities=probs)

    # paired on path and label, so the features file's row order need not be the manifest's
    found = compare_predictions(predictions(load_split_paths(npz), labels, head.predict(features, verbose=0)),
                                predictions(test["path"], test["y"], final_probs), p.bootstrap_resamples,
                                p.bootstrap_seed)
    delta, low, high = found.accuracy_change
    return {"delta": delta, "low": low, "high": high, "p_value": found.mcnemar_p, "images": found.images,
            "head_only_right": found.base_only_right, "final_only_right": found.head_only_right}


def _check_classes(layout: Layout, classes: list[str], features_info: FeaturesInfo) -> None:
    if features_info.classes != classes:
        raise EvaluateError(
            f"{layout.features_dir / 'info.json'} lists classes {features_info.classes} but "
            f"{layout.finetune_dir / 'info.json'} lists {classes}: rerun train_head and finetune"
        )


def _score(params: Params, layout: Layout, info: ModelInfo, features_info: FeaturesInfo, plain: keras.Model,
           rows: dict[str, pd.DataFrame]) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """Metrics of the head (on cached features) and of the final model (on images), per evaluated split.

    The final model is scored as export serves it: each pass (two with flip TTA) temperature-scaled
    by the T fitted on val, then averaged. Returns the metrics, the served test/val probabilities and
    the report's sentence on the temperature.
    """
    p = params.evaluate
    classes = info.classes
    head = load_model(layout.head_model, "train_head")
    model = flip_tta_passes(with_flip_tta(plain)) if p.tta_flip else plain  # the passes export will serve
    run = runner(model, [None, info.image_size, info.image_size, 3], resolve(p.runtime, key="evaluate.runtime"),
                 what="evaluate", batch=params.features.batch_size)
    metrics: dict[str, Any] = {"top_k": min(p.top_k, len(classes)), "fine_tuned": info.fine_tuned,
                               "tta_flip": p.tta_flip, "head": {}}
    if p.tta_flip:
        metrics["without_tta"] = {}
    passes: dict[str, np.ndarray] = {}  # split -> (passes, N, classes) probabilities before scaling
    for split, frame in rows.items():
        npz = layout.features_dir / f"{split}.npz"
        features, labels = load_split(npz, len(classes), features_info.feature_dim)
        with np.load(npz, allow_pickle=False) as cached:
            if set(cached["sha256"]) != set(frame["sha256"]):
                raise EvaluateError(
                    f"{npz} does not hold the {split} split of {layout.split_manifest}: rerun the features stage"
                )
        metrics["head"][split] = classification_metrics(labels, head.predict(features, verbose=0), p.top_k)
        passes[split] = np.stack(predict_images(run, layout, frame, info, params.features.batch_size))
    truth = {split: frame["y"].to_numpy() for split, frame in rows.items()}
    metrics["calibration"] = calibrate(truth, passes, p)
    calibration = metrics["calibration"]["reason"]
    temperature = metrics["calibration"]["temperature"]
    write_reliability(truth["test"], passes["test"], temperature, p.calibration_bins,
                      layout.calibration_csv, layout.figures_dir / "reliability.png")
    final_probs: dict[str, np.ndarray] = {}
    for split, frame in rows.items():
        final_probs[split] = served_probabilities(passes[split], temperature)
        metrics[split] = (classification_metrics(truth[split], final_probs[split], p.top_k)
                          | split_scores(truth[split], passes[split], temperature, p.calibration_bins))
        if p.tta_flip:  # the image pass alone, at the same temperature
            metrics["without_tta"][split] = classification_metrics(
                truth[split], served_probabilities(passes[split][:1], temperature), p.top_k)
        log.info("evaluate: %s accuracy %.4f (head only %.4f) on %d images", split, metrics[split]["accuracy"],
                 metrics["head"][split]["accuracy"], len(frame))
    return metrics, final_probs, calibration


def _gate(metrics: dict[str, Any], floor: float | None) -> tuple[bool, str]:
    accuracy = metrics["test"]["accuracy"]
    passed = floor is None or accuracy >= floor
    gate = ("not set (evaluate.assert_min_accuracy: null)" if floor is None
            else f"{'passed' if passed else 'FAILED'}: test accuracy {accuracy:.4f} vs minimum {floor:.4f}")
    return passed, gate


def _write_test_reports(layout: Layout, p: EvaluateParams, test: pd.DataFrame, probs: np.ndarray,
                        classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The per-class, confusion and per-image CSVs and the figures; returns the tables the Markdown report shows."""
    predicted = probs.argmax(axis=1)
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    figures = layout.figures_dir
    report = pd.concat([per_class_report(test["y"].to_numpy(), predicted, classes),
                        per_class_intervals(test["y"].to_numpy(), predicted, len(classes))], axis=1)
    write_predictions(layout.predictions_file, list(test["path"]), list(test["label"]), probs, classes)
    atomic_write_text(layout.classification_report, report.to_csv(index=False))
    pairs = pd.DataFrame({"actual": test["label"], "predicted": [classes[i] for i in predicted]})
    atomic_write_text(layout.confusion_csv, pairs.to_csv(index=False))
    matrix = confusion_matrix(test["y"], predicted, labels=np.arange(len(classes)))
    plot_confusion(matrix, classes, figures / "confusion_matrix.png")
    plot_training_curves({"train_head": layout.head_history, "finetune": layout.finetune_history},
                         figures / "training_curves.png")
    worst = plot_misclassified(test, probs, classes, layout.root, p.gallery_size, figures / "misclassified.png")
    worst = worst.assign(predicted_label=[classes[i] for i in worst["predicted"]])
    confusions = (pairs[pairs["actual"] != pairs["predicted"]].value_counts().rename("count").reset_index().head(10))
    return report, confusions, worst


def _write_gradcam(params: Params, layout: Layout, info: ModelInfo, plain: keras.Model, test: pd.DataFrame,
                   probs: np.ndarray, worst: pd.DataFrame) -> bool:
    """reports/figures/gradcam.png for the model export serves (raw images in); False when turned off."""
    p = params.evaluate
    target = layout.figures_dir / "gradcam.png"
    if not p.gradcam_per_class:
        target.unlink(missing_ok=True)
        return False
    model = serving_model(with_flip_tta(plain) if p.tta_flip else plain, info.image_size, info.interpolation)
    examples = gradcam_examples(test, probs, worst, p.gradcam_per_class)
    explainer = GradCam(model, p.gradcam_layer, source=layout.finetune_model)
    plot_gradcam(explainer, examples, info.classes, layout.root, info.image_size, target)
    return True


def run(params: Params, layout: Layout) -> dict[str, Any]:
    p = params.evaluate
    remove_stale_temps(*layout.outputs("evaluate"), layout.figures_dir / "*")
    info = read_model_info(layout)
    classes = info.classes
    features_info = read_features_info(layout)
    _check_classes(layout, classes, features_info)
    rows = _split_rows(layout, classes)
    plain = load_model(layout.finetune_model, "finetune")  # the final model, before scaling
    metrics, final_probs, calibration = _score(params, layout, info, features_info, plain, rows)
    intervals = {split: bootstrap_intervals(frame["y"].to_numpy(), final_probs[split].argmax(axis=1), len(classes),
                                            p.bootstrap_resamples, p.bootstrap_seed)
                 for split, frame in rows.items() if p.bootstrap_resamples}
    for split, found in intervals.items():
        metrics[split]["ci95"] = found.as_metrics() | ece_intervals(
            rows[split]["y"].to_numpy(), final_probs[split], p.calibration_bins, p.bootstrap_resamples,
            p.bootstrap_seed)
    if p.bootstrap_resamples:
        metrics["finetune_gain"] = _finetune_gain(layout, features_info, classes, rows["test"], final_probs["test"], p)
    report, confusions, worst = _write_test_reports(layout, p, rows["test"], final_probs["test"], classes)
    gradcam = _write_gradcam(params, layout, info, plain, rows["test"], final_probs["test"], worst)
    passed, gate = _gate(metrics, p.assert_min_accuracy)
    write_report(layout.evaluation_report, metrics, report, confusions, worst, info, gate, calibration,
                 gradcam)
    atomic_write_json(layout.metrics_file, metrics)
    if not passed:
        raise QualityGateError(
            f"test accuracy {metrics['test']['accuracy']:.4f} is below evaluate.assert_min_accuracy="
            f"{p.assert_min_accuracy:g}: the model failed the quality "
            f"gate. See {layout.reports_dir / 'evaluation.md'}; lower the threshold or improve the model."
        )
    return metrics
