"""Calibration: whether a top-class probability of 0.8 is right 80% of the time, and temperature scaling.

Expected calibration error (ECE) is top-label over equal-width confidence bins (lo, hi]: the
image-weighted mean gap between each bin's accuracy and its mean confidence (Guo et al. 2017).
Temperature scaling divides the classifier's logits by one T > 0 fitted on the val split's log loss;
it never changes a single-pass model's top-1. The model's logits are not needed: its probabilities
are p = softmax(z), so log p = z - logsumexp(z) and softmax(log p / T) == softmax(z / T) exactly.
With flip TTA the served probabilities are the mean of each pass's softmax(z / T), so T is fitted on
the passes, not on their mean. Export bakes T into the final softmax Dense layer (kernel and bias
divided by T), so every exported format serves the probabilities evaluate scored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.optimize import minimize_scalar
from scipy.special import softmax
from sklearn.metrics import log_loss

from headstart.data.artifacts import ArtifactError, read_metrics
from headstart.files import atomic_write_text
from headstart.layout import Layout
from headstart.model import all_layers
from headstart.reporting import markdown_table, save_figure

log = logging.getLogger(__name__)

OUTPUT_LAYER = "probabilities"  # the head's softmax Dense layer (headstart.model.build_head)
TEMPERATURE_BOUNDS = (0.05, 20.0)
# the smallest normal float32: a float32 softmax output below it is 0 or denormal, its log meaningless
_TINY = float(np.finfo(np.float32).tiny)


class CalibrationRecord(BaseModel):
    """metrics.json's `calibration` section: what export needs to serve the probabilities evaluate scored."""

    model_config = ConfigDict(extra="allow", frozen=True)

    temperature: float = Field(gt=0)
    fitted: bool
    bins: int = Field(ge=1)


def reliability_table(labels: np.ndarray, probs: np.ndarray, bins: int) -> pd.DataFrame:
    """Per non-empty equal-width bin (lo, hi] of top-class probability: mean confidence, accuracy, count."""
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    used = count > 0
    return pd.DataFrame({
        "bin": np.arange(bins)[used],
        "confidence": np.bincount(index, confidence, bins)[used] / count[used],
        "accuracy": np.bincount(index, correct, bins)[used] / count[used],
        "count": count[used],
    })


def _ece(table: pd.DataFrame) -> float:
    return float((table["count"] * (table["accuracy"] - table["confidence"]).abs()).sum() / table["count"].sum())


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int) -> float:
    return _ece(reliability_table(labels, probs, bins))


def served_probabilities(passes: np.ndarray, temperature: float) -> np.ndarray:
    """What the model scaled by `temperature` serves: the mean over passes (P, N, C) of softmax(log p / T)."""
    logits = np.log(np.maximum(passes.astype(np.float64), _TINY))
    return softmax(logits / temperature, axis=-1).mean(axis=0)


def _nll(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], _TINY)).mean())


def fit_temperature(labels: np.ndarray, passes: np.ndarray) -> float:
    """The T in TEMPERATURE_BOUNDS that minimises the log loss of the served probabilities (search on log T)."""
    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: _nll(labels, served_probabilities(passes, np.exp(log_t))),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    temperature = float(np.exp(result.x))
    if min(abs(result.x - low), abs(result.x - high)) < 1e-3:
        log.warning("calibration: the fitted temperature %.4g is at the edge of %s", temperature, TEMPERATURE_BOUNDS)
    return temperature


def split_scores(labels: np.ndarray, passes: np.ndarray, temperature: float, bins: int) -> dict[str, float]:
    """ECE of the served probabilities, and ECE and log loss before scaling (T = 1), for metrics.json."""
    uncalibrated = served_probabilities(passes, 1.0)
    return {"ece": expected_calibration_error(labels, served_probabilities(passes, temperature), bins),
            "ece_uncalibrated": expected_calibration_error(labels, uncalibrated, bins),
            "log_loss_uncalibrated": float(log_loss(labels, uncalibrated, labels=np.arange(passes.shape[-1])))}


def calibrate(labels: dict[str, np.ndarray], passes: dict[str, np.ndarray], enabled: bool, bins: int
              ) -> tuple[dict[str, Any], str]:
    """The calibration record for metrics.json and a sentence for the report saying where T came from."""
    if not enabled:
        temperature, why = 1.0, "not fitted (evaluate.temperature_scaling: false); probabilities are the model's own."
    elif "val" not in passes:
        temperature, why = 1.0, ("not fitted: there is no val split to fit it on (split.val is 0), so T = 1 and "
                                 "probabilities are the model's own. Set split.val > 0 to calibrate them.")
    else:
        temperature = fit_temperature(labels["val"], passes["val"])
        why = (f"fitted on the val split ({len(labels['val'])} images) by minimising its log loss. Every final-model "
               "number above and everything export serves uses the scaled probabilities.")
    record = {"temperature": temperature, "fitted": enabled and "val" in passes, "bins": bins}
    return record, f"Temperature T = {temperature:.4f}: {why}"


def read_calibration(layout: Layout) -> CalibrationRecord:
    """The temperature evaluate fitted, from metrics.json (export serves what evaluate scored)."""
    section = read_metrics(layout).get("calibration")
    try:
        return CalibrationRecord.model_validate(section)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(["calibration", *(str(part) for part in problem["loc"])])
        raise ArtifactError(f"{layout.metrics_file}: {where}: {problem['msg']}; rerun `headstart evaluate`") from None


def apply_temperature(classifier: keras.Model, temperature: float) -> None:
    """Divide the final softmax Dense layer's kernel and bias by T in place: softmax((Wx + b) / T).

    Built-in layers only, so the model still loads in safe mode and converts to TFLite unchanged.
    """
    found = [layer for layer in all_layers(classifier) if layer.name == OUTPUT_LAYER]
    if len(found) != 1 or not isinstance(found[0], keras.layers.Dense) or \
            found[0].get_config()["activation"] != "softmax" or not found[0].use_bias:
        raise ValueError(f"model {classifier.name!r} needs exactly one softmax Dense layer named {OUTPUT_LAYER!r} "
                         "with a bias to carry the temperature: rerun train_head and finetune")
    layer = found[0]
    layer.kernel.assign(layer.kernel / temperature)
    layer.bias.assign(layer.bias / temperature)


def write_reliability(labels: np.ndarray, passes: np.ndarray, temperature: float, bins: int, csv: Path,
                      figure_path: Path) -> pd.DataFrame:
    """reports/calibration.csv (DVC plot data, one row per scaling and bin) and the before/after diagram."""
    tables = {scaling: reliability_table(labels, served_probabilities(passes, t), bins)
              for scaling, t in (("before", 1.0), ("after", temperature))}
    frame = pd.concat([table.assign(scaling=scaling) for scaling, table in tables.items()], ignore_index=True)
    frame = frame[["scaling", "bin", "confidence", "accuracy", "count"]]
    csv.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(csv, frame.to_csv(index=False))
    _plot_reliability(tables, len(labels), temperature, bins, figure_path)
    return frame


def _plot_reliability(tables: dict[str, pd.DataFrame], images: int, temperature: float, bins: int,
                      target: Path) -> None:
    """Accuracy per confidence bin (bars) against the diagonal of perfect calibration, before and after."""
    figure = Figure(figsize=(11, 4.8))
    width = 1.0 / bins
    for axis, (scaling, table) in zip(figure.subplots(1, 2, sharey=True), tables.items(), strict=True):
        centers = (table["bin"] + 0.5) * width
        bars = axis.bar(centers, table["accuracy"], width=width * 0.9, color="tab:blue", label="accuracy (images)")
        axis.bar_label(bars, labels=[str(n) for n in table["count"]], fontsize=7)
        axis.scatter(table["confidence"], table["accuracy"], color="tab:red", s=14, zorder=3,
                     label="(mean confidence, accuracy)")
        axis.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
        t = 1.0 if scaling == "before" else temperature
        axis.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="top-class probability",
                 title=f"{scaling} scaling: T = {t:.3f}, ECE {_ece(table):.4f}")
    figure.axes[0].set_ylabel("accuracy")
    figure.axes[0].legend(loc="upper left", fontsize=8, framealpha=0.6)
    figure.suptitle(f"Reliability diagram (test split, final model, {images} images, {bins} bins)")
    save_figure(figure, target)


def report_lines(metrics: dict[str, Any], splits: tuple[str, ...], how: str) -> list[str]:
    """The evaluation report's calibration section: ECE and log loss before and after scaling, the diagram."""
    rows = [{"split": split, "images": metrics[split]["images"], "ECE before": metrics[split]["ece_uncalibrated"],
             "ECE after": metrics[split]["ece"], "log loss before": metrics[split]["log_loss_uncalibrated"],
             "log loss after": metrics[split]["log_loss"]} for split in splits if split in metrics]
    return [
        "## Calibration",
        "",
        f"{how} ECE: top-label expected calibration error over {metrics['calibration']['bins']} equal-width "
        "confidence bins (0 = a probability of 0.8 is right 80% of the time).",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
        "![Reliability diagram](figures/reliability.png)",
        "",
    ]
