"""Calibration: whether a top-class probability of 0.8 is right 80% of the time, and temperature scaling.

Expected calibration error (ECE) is top-label over equal-width confidence bins (lo, hi]: the
image-weighted mean gap between each bin's accuracy and its mean confidence (Guo et al. 2017).
The equal-mass (adaptive) ECE uses bins of equally many images instead. Temperature scaling divides
the classifier's logits by one T > 0 fitted on the val split's log loss; it never changes a
single-pass model's top-1. A T fitted on val is only served when it lowers the log loss of val images
it was not fitted on (k-fold cross-validation): a T fitted on a few hundred images can make new
images' probabilities worse, and on a tiny or mistake-free val split it runs to its bound. The model's logits are not needed: its probabilities
are p = softmax(z), so log p = z - logsumexp(z) and softmax(log p / T) == softmax(z / T) exactly.
With flip TTA the served probabilities are the mean of each pass's softmax(z / T), so T is fitted on
the passes, not on their mean. Export bakes T into the final softmax Dense layer (kernel and bias
divided by T), so every exported format serves the probabilities evaluate scored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.optimize import minimize_scalar
from scipy.special import softmax
from scipy.stats import norm
from sklearn.metrics import log_loss
from sklearn.model_selection import KFold

from headstart.data.artifacts import ArtifactError, read_metrics
from headstart.files import atomic_write_text
from headstart.layout import Layout
from headstart.model import all_layers
from headstart.params import EvaluateParams
from headstart.reporting import markdown_table, save_figure
from headstart.uncertainty import LEVEL, format_interval, index_blocks, percentile_interval

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
    decision: Literal["kept", "declined", "at_bound", "too_few_images", "no_val", "off"]
    reason: str


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
    return float(np.exp(result.x))


def adaptive_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """ECE over equal-mass bins: the images sorted by confidence and cut into `bins` groups of equal size.

    Equal-width bins over a few hundred confident images are mostly empty, and the one near 1 holds
    almost all of them; equal-mass bins give every bin the same number of images (Nixon et al. 2019).
    """
    return float(_adaptive_ece(probs.max(axis=1)[None], (probs.argmax(axis=1) == labels)[None], bins)[0])


def _adaptive_ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> np.ndarray:
    """(R,) equal-mass ECE of R rows of (confidence, correct), each row one set of N images."""
    rows, n = confidence.shape
    order = np.argsort(confidence, axis=1, kind="stable")
    confidence, correct = (np.take_along_axis(a, order, axis=1) for a in (confidence, correct.astype(np.float64)))
    index = (np.arange(n) * min(bins, n) // n)[None] + np.arange(rows)[:, None] * bins
    return _binned_gap(index, confidence, correct, rows, bins, n)


def _binned_gap(index: np.ndarray, confidence: np.ndarray, correct: np.ndarray, rows: int, bins: int,
                n: int) -> np.ndarray:
    """Sum over bins of |sum(correct) - sum(confidence)| / N per row; `index` holds row * bins + bin."""
    size = rows * bins
    gap = np.bincount(index.ravel(), correct.ravel(), size) - np.bincount(index.ravel(), confidence.ravel(), size)
    return np.abs(gap).reshape(rows, bins).sum(axis=1) / n


def ece_intervals(labels: np.ndarray, probs: np.ndarray, bins: int, resamples: int,
                  seed: int) -> dict[str, dict[str, float]]:
    """LEVEL percentile bootstrap intervals of the equal-width and the equal-mass ECE over the images."""
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    width_bin = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    width, mass = [], []
    for indices in index_blocks(len(labels), resamples, seed):
        rows = len(indices)
        offsets = np.arange(rows)[:, None] * bins
        width.append(_binned_gap(width_bin[indices] + offsets, confidence[indices], correct[indices], rows, bins,
                                 len(labels)))
        mass.append(_adaptive_ece(confidence[indices], correct[indices], bins))
    found = {"ece": np.concatenate(width), "ece_adaptive": np.concatenate(mass)}
    return {key: dict(zip(("low", "high"), map(float, percentile_interval(samples)), strict=True))
            for key, samples in found.items()}


def split_scores(labels: np.ndarray, passes: np.ndarray, temperature: float, bins: int) -> dict[str, float]:
    """ECE (equal-width and equal-mass bins) of the served probabilities and before scaling (T = 1), and the
    log loss before scaling, for metrics.json."""
    served, uncalibrated = served_probabilities(passes, temperature), served_probabilities(passes, 1.0)
    return {"ece": expected_calibration_error(labels, served, bins),
            "ece_uncalibrated": expected_calibration_error(labels, uncalibrated, bins),
            "ece_adaptive": adaptive_calibration_error(labels, served, bins),
            "ece_adaptive_uncalibrated": adaptive_calibration_error(labels, uncalibrated, bins),
            "log_loss_uncalibrated": float(log_loss(labels, uncalibrated, labels=np.arange(passes.shape[-1])))}


def cross_validated_log_loss(labels: np.ndarray, passes: np.ndarray, folds: int, seed: int
                             ) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Each val image's log loss unscaled and scaled by a T fitted on the other folds, and those Ts.

    Each fold's T is fitted on the remaining folds only, so the scaled loss is what T earns on images
    it was not fitted on: the evidence for keeping it.
    """
    unscaled, scaled = np.empty(len(labels)), np.empty(len(labels))
    temperatures = []
    for fit, held in KFold(folds, shuffle=True, random_state=seed).split(labels):
        temperature = fit_temperature(labels[fit], passes[:, fit])
        temperatures.append(temperature)
        for target, t in ((unscaled, 1.0), (scaled, temperature)):
            target[held] = -np.log(np.maximum(served_probabilities(passes[:, held], t)[np.arange(len(held)),
                                                                                       labels[held]], _TINY))
    return unscaled, scaled, temperatures


def _gain_bound(unscaled: np.ndarray, scaled: np.ndarray) -> float:
    """The one-sided LEVEL lower bound of the mean per-image log-loss gain (normal approximation)."""
    gain = unscaled - scaled
    return float(gain.mean() - norm.ppf(LEVEL) * gain.std(ddof=1) / np.sqrt(len(gain)))


def _at_bound(temperature: float) -> bool:
    return min(abs(np.log(temperature / bound)) for bound in TEMPERATURE_BOUNDS) < 1e-3


def calibrate(labels: dict[str, np.ndarray], passes: dict[str, np.ndarray], p: EvaluateParams) -> dict[str, Any]:
    """metrics.json's calibration record: the served T, the decision, its evidence and the `reason` (a sentence
    the report and the model card show)."""
    record, reason = _decide(labels, passes, p)
    return {**record, "reason": reason}


def _decide(labels: dict[str, np.ndarray], passes: dict[str, np.ndarray], p: EvaluateParams
            ) -> tuple[dict[str, Any], str]:
    """The record and the sentence on which T is served and why.

    A T fitted on val is kept only when it lowers the val log loss on folds it was not fitted on
    (`evaluate.calibration_folds`-fold cross-validation) by more than the noise: the one-sided 95%
    lower bound of the mean per-image gain must be above 0 (on 66 val images a T that gained 0.04 in
    cross-validation still made the test log loss worse). Otherwise, and on a val split too small to
    tell (< `evaluate.calibration_min_images`) or when the fit runs to a bound of TEMPERATURE_BOUNDS
    (e.g. a val split without mistakes: any T below 1 looks better), T = 1 is served.
    """
    record: dict[str, Any] = {"temperature": 1.0, "fitted": False, "bins": p.calibration_bins}
    val = len(labels.get("val", ()))
    if not p.temperature_scaling:
        record["decision"] = "off"
        return record, "T = 1: not fitted (evaluate.temperature_scaling: false); probabilities are the model's own."
    if not val:
        record["decision"] = "no_val"
        return record, ("T = 1: not fitted, there is no val split to fit it on (split.val is 0), so probabilities "
                        "are the model's own. Set split.val > 0 to calibrate them.")
    if val < p.calibration_min_images:
        record["decision"] = "too_few_images"
        return record, (f"T = 1: not fitted, the val split has {val} images, fewer than "
                        f"evaluate.calibration_min_images={p.calibration_min_images}: too few to tell whether a "
                        "temperature helps, so probabilities are the model's own.")
    candidate = fit_temperature(labels["val"], passes["val"])
    folds = min(p.calibration_folds, val)
    per_image = cross_validated_log_loss(labels["val"], passes["val"], folds, p.bootstrap_seed)
    unscaled, scaled, fold_ts = float(per_image[0].mean()), float(per_image[1].mean()), per_image[2]
    bound = _gain_bound(per_image[0], per_image[1])
    record.update({"fitted": True, "candidate_temperature": candidate, "folds": folds,
                   "heldout_log_loss_unscaled": unscaled, "heldout_log_loss_scaled": scaled,
                   "heldout_gain_low": bound})
    evidence = (f"T = {candidate:.4f} fitted on all {val} val images; in {folds}-fold cross-validation on val "
                f"(T fitted on {folds - 1} folds, scored on the held-out one; fold Ts {min(fold_ts):.3f} to "
                f"{max(fold_ts):.3f}) the held-out log loss is {unscaled:.4f} unscaled and {scaled:.4f} scaled")
    if _at_bound(candidate) or any(_at_bound(t) for t in fold_ts):
        record["decision"] = "at_bound"
        log.warning("calibration: the fitted temperature runs to a bound of %s: T = 1 is kept", TEMPERATURE_BOUNDS)
        return record, (f"T = 1 kept: {evidence}, but the fit runs to the bound {TEMPERATURE_BOUNDS} (a val split "
                        "with (almost) no mistakes rewards any overconfidence), so it says nothing about new images.")
    noise = (f"; the {LEVEL:.0%} lower bound of its per-image gain is {bound:.4f}")
    if bound <= 0:
        record["decision"] = "declined"
        return record, (f"T = 1 kept: {evidence}{noise}: scaling does not lower the log loss of images it was not "
                        "fitted on beyond the noise of this val split, so probabilities are the model's own.")
    record.update({"temperature": candidate, "decision": "kept"})
    return record, (f"Temperature T = {candidate:.4f} kept: {evidence}{noise}, so scaling lowers the log loss of "
                    "images it was not fitted on. Every final-model number above and everything export serves uses "
                    "the scaled probabilities.")


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


def _with_interval(scores: dict[str, Any], key: str) -> str:
    interval = scores.get("ci95", {}).get(key)
    return f"{scores[key]:.4f}" + (f" {format_interval(**interval)}" if interval else "")


def report_lines(metrics: dict[str, Any], splits: tuple[str, ...], how: str) -> list[str]:
    """The evaluation report's calibration section: the temperature decision, ECE (equal-width and equal-mass
    bins, with their 95% intervals) and log loss before and after scaling, the diagram."""
    rows = [{"split": split, "images": s["images"], "ECE before": s["ece_uncalibrated"],
             "ECE after": _with_interval(s, "ece"), "equal-mass ECE before": s["ece_adaptive_uncalibrated"],
             "equal-mass ECE after": _with_interval(s, "ece_adaptive"),
             "log loss before": s["log_loss_uncalibrated"], "log loss after": s["log_loss"]}
            for split, s in ((split, metrics[split]) for split in splits if split in metrics)]
    bins = metrics["calibration"]["bins"]
    return [
        "## Calibration",
        "",
        how,
        "",
        f"ECE: top-label expected calibration error over {bins} equal-width confidence bins (0 = a probability "
        f"of 0.8 is right 80% of the time); equal-mass ECE: over {bins} bins of equally many images, which "
        "a few hundred confident images cannot leave empty. After scaling: [95% bootstrap interval over the images]; "
        "noise only adds to an ECE, so the interval sits mostly above the estimate.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
        "![Reliability diagram](figures/reliability.png)",
        "",
    ]
