"""How sure the evaluation numbers are: bootstrap intervals, per-image predictions, paired comparisons.

A 0.4-point accuracy difference between two runs on 1,500 test images is within resampling noise;
these statistics let a reviewer tell such noise from a real change. Accuracy, macro-F1 and ECE get a
percentile bootstrap over the test images. Per-class recall and precision get Wilson score intervals
from their counts: a bootstrap of a class with 144 of 144 right resamples only right images and
claims [1, 1], while Wilson's interval stays honest at 0/n and n/n. The image indices are drawn once per block of resamples and each
resample's confusion counts come from one `np.bincount`, so 1,000 resamples cost a few vectorised
passes instead of 1,000 scikit-learn calls. A paired comparison applies the same resampled images to
both models, so the noise they share cancels.

`reports/predictions.csv` (one row per test image: path, label, predicted, confidence, and a `p:<class>`
probability column per class) is written and read here; the PR report pairs the base commit's file
with the working tree's.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from headstart.files import atomic_write_text

LEVEL = 0.95
PROBABILITY_PREFIX = "p:"  # + the class name verbatim, so any class name makes a distinct column
PREDICTION_COLUMNS = ("path", "label", "predicted", "confidence")
BLOCK_CELLS = 1 << 22  # image indices drawn at once (32 MiB of int64): memory stays flat for any test set


class PredictionsError(ValueError):
    """A predictions file that cannot be used; the message names the file, the problem and what to do."""


# --- bootstrap --------------------------------------------------------------------------------------


def index_blocks(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of `n` images as (block, n) index arrays; the same seed gives the same draws."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one image")
    rng = np.random.default_rng(seed)
    block = max(1, min(resamples, BLOCK_CELLS // n))
    for start in range(0, resamples, block):
        yield rng.integers(0, n, size=(min(block, resamples - start), n))


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int, indices: np.ndarray) -> np.ndarray:
    """(resamples, actual, predicted) confusion counts of the images each row of `indices` draws."""
    cells = num_classes * num_classes
    codes = labels[indices] * num_classes + predicted[indices] + np.arange(len(indices))[:, None] * cells
    return np.bincount(codes.ravel(), minlength=len(indices) * cells).reshape(len(indices), num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (an undefined score, not a zero one)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro-F1 (resamples,), per-class recall and F1 (resamples, classes) from confusion counts.

    A class's recall is NaN in a resample without images of it, its F1 when it is neither there nor
    predicted (nothing to score; intervals skip those resamples). Macro-F1 counts such a class as 0, as
    scikit-learn's `f1_score(..., labels=all classes, zero_division=0)` behind the point estimate does.
    """
    hits = np.diagonal(counts, axis1=1, axis2=2)
    actual, chosen = counts.sum(axis=2), counts.sum(axis=1)
    f1 = _ratio(2 * hits, actual + chosen)
    return {"accuracy": hits.sum(axis=1) / counts.sum(axis=(1, 2)), "macro_f1": np.nan_to_num(f1).mean(axis=1),
            "recall": _ratio(hits, actual), "f1": f1}


def percentile_interval(samples: np.ndarray) -> np.ndarray:
    """The central LEVEL percentile interval along the resample axis: (2, ...) = low, high; NaN if never defined."""
    tail = 100 * (1 - LEVEL) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slice: a class no resample could score
        return np.nanpercentile(samples, [tail, 100 - tail], axis=0)


def _bootstrap(labels: np.ndarray, predictions: list[np.ndarray], num_classes: int, resamples: int,
               seed: int) -> list[dict[str, np.ndarray]]:
    """Per-resample scores of each model in `predictions`, all on the same resampled images."""
    labels = np.asarray(labels, dtype=np.int64)
    blocks: list[list[dict[str, np.ndarray]]] = [[] for _ in predictions]
    for indices in index_blocks(len(labels), resamples, seed):
        for found, predicted in zip(blocks, predictions, strict=True):
            found.append(scores(confusion_counts(labels, np.asarray(predicted, np.int64), num_classes, indices)))
    return [{key: np.concatenate([block[key] for block in found]) for key in found[0]} for found in blocks]


@dataclass(frozen=True)
class Intervals:
    """LEVEL bootstrap intervals of one model's scores on one split."""

    accuracy: tuple[float, float]
    macro_f1: tuple[float, float]

    def as_metrics(self) -> dict[str, dict[str, float]]:
        """metrics.json's `ci95` entry: flat numbers under stable keys (`ci95.accuracy.low`, ...)."""
        return {name: {"low": low, "high": high} for name, (low, high) in
                (("accuracy", self.accuracy), ("macro_f1", self.macro_f1))}


def bootstrap_intervals(labels: np.ndarray, predicted: np.ndarray, num_classes: int, resamples: int,
                        seed: int) -> Intervals:
    """Percentile intervals of accuracy and macro-F1 over `resamples` bootstrap draws."""
    found = _bootstrap(labels, [predicted], num_classes, resamples, seed)[0]
    (acc_low, acc_high), (f1_low, f1_high) = (percentile_interval(found[key]) for key in ("accuracy", "macro_f1"))
    return Intervals(accuracy=(float(acc_low), float(acc_high)), macro_f1=(float(f1_low), float(f1_high)))


def wilson_interval(successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """(K, 2) LEVEL Wilson score intervals of successes/trials; NaN where trials is 0 (nothing to estimate)."""
    return np.array([binomtest(int(k), int(n)).proportion_ci(LEVEL, method="wilson") if n else (np.nan, np.nan)
                     for k, n in zip(successes, trials, strict=True)], dtype=np.float64).reshape(-1, 2)


def per_class_intervals(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> pd.DataFrame:
    """Wilson intervals of each class's recall (hits / its images) and precision (hits / images predicted as it)."""
    counts = confusion_counts(np.asarray(labels, np.int64), np.asarray(predicted, np.int64), num_classes,
                              np.arange(len(labels))[None])[0]
    hits = np.diagonal(counts)
    recall, precision = wilson_interval(hits, counts.sum(axis=1)), wilson_interval(hits, counts.sum(axis=0))
    return pd.DataFrame({"recall_low": recall[:, 0], "recall_high": recall[:, 1],
                         "precision_low": precision[:, 0], "precision_high": precision[:, 1]})


def format_interval(low: float, high: float) -> str:
    return f"[{low:.4f}, {high:.4f}]"


# --- per-image predictions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """reports/predictions.csv, typed: `frame` holds path, label, predicted (text) and confidence."""

    frame: pd.DataFrame
    classes: list[str]
    probabilities: np.ndarray  # (images, classes), columns in `classes` order


def write_predictions(target: Path, paths: list[str], labels: list[str], probs: np.ndarray, classes: list[str]) -> None:
    """One row per image: its path, true and predicted class, the top probability and every class's."""
    frame = pd.DataFrame({"path": paths, "label": labels, "predicted": [classes[i] for i in probs.argmax(axis=1)],
                          "confidence": probs.max(axis=1)})
    by_class = pd.DataFrame(probs, columns=[PROBABILITY_PREFIX + name for name in classes])
    text = pd.concat([frame, by_class], axis=1).to_csv(index=False, float_format="%.6g")
    atomic_write_text(target, text)


def parse_predictions(text: str, origin: str) -> Predictions:
    """Predictions from a predictions.csv's text (a file, or `git show` of one); `origin` names it in errors."""
    fix = "rerun `headstart evaluate`"
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PredictionsError(f"{origin}: not a readable CSV ({exc}); {fix}") from None
    absent = [c for c in PREDICTION_COLUMNS if c not in table.columns]
    columns = [c for c in table.columns if c.startswith(PROBABILITY_PREFIX)]
    if absent:
        raise PredictionsError(f"{origin}: missing column(s) {', '.join(absent)}; {fix}")
    if not columns:
        raise PredictionsError(f"{origin}: no {PROBABILITY_PREFIX}<class> probability column; {fix}")
    classes = [c[len(PROBABILITY_PREFIX):] for c in columns]
    for column in ("path", "label"):
        if (table[column] == "").any():
            raise PredictionsError(f"{origin}: line {int((table[column] == '').argmax()) + 2} has an empty {column}; {fix}")
    for column in ("predicted", "label"):
        unknown = sorted(set(table[column]) - set(classes))
        if unknown:
            raise PredictionsError(f"{origin}: {column} {unknown[:5]} not among its {PROBABILITY_PREFIX}<class> columns; {fix}")
    repeated = table["path"][table["path"].duplicated()]
    if not repeated.empty:
        raise PredictionsError(f"{origin}: path {repeated.iloc[0]!r} appears more than once; {fix}")
    try:
        numbers = table[["confidence", *columns]].astype(np.float64)
    except ValueError as exc:
        raise PredictionsError(f"{origin}: confidence and {PROBABILITY_PREFIX}<class> must be numbers ({exc}); {fix}") from None
    frame = table[list(PREDICTION_COLUMNS)].assign(confidence=numbers["confidence"])
    return Predictions(frame=frame, classes=classes, probabilities=numbers[columns].to_numpy())


def read_predictions(path: Path) -> Predictions:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `headstart evaluate` first")
    return parse_predictions(path.read_text(encoding="utf-8"), str(path))


# --- two models on the same images ----------------------------------------------------------------


@dataclass(frozen=True)
class PairedComparison:
    """The head model against the base model on the test images both predicted, with the same labels."""

    images: int
    only_base: list[str]  # paths (or a relabelled image) the head's predictions lack
    only_head: list[str]
    base_accuracy: float
    head_accuracy: float
    base_only_right: int  # discordant pairs: McNemar's b and c
    head_only_right: int
    mcnemar_p: float
    accuracy_change: tuple[float, float, float]  # change, low, high
    per_class: pd.DataFrame  # class, base_f1, head_f1, f1_change, low, high, dropped


def compare_predictions(base: Predictions, head: Predictions, resamples: int, seed: int) -> PairedComparison:
    """McNemar's exact test and paired-bootstrap changes of accuracy and per-class F1, head minus base.

    Images pair on path and label (a relabelled image is in neither pairing). A class is `dropped`
    when the whole LEVEL interval of its F1 change lies below 0: a loss larger than the resampling noise.
    """
    paired = base.frame.merge(head.frame, on=["path", "label"], suffixes=("_base", "_head"))
    if paired.empty:
        raise PredictionsError("the two predictions files share no test image (same path and label): nothing to compare")
    classes = list(dict.fromkeys([*head.classes, *base.classes]))
    index = {name: i for i, name in enumerate(classes)}
    labels, base_pred, head_pred = (paired[c].map(index).to_numpy() for c in ("label", "predicted_base", "predicted_head"))
    base_right, head_right = base_pred == labels, head_pred == labels
    b, c = int((base_right & ~head_right).sum()), int((~base_right & head_right).sum())
    mcnemar_p = float(binomtest(c, b + c, 0.5).pvalue) if b + c else 1.0
    point = [scores(confusion_counts(labels, p, len(classes), np.arange(len(labels))[None])) for p in (base_pred, head_pred)]
    drawn = _bootstrap(labels, [base_pred, head_pred], len(classes), resamples, seed)
    accuracy_low, accuracy_high = percentile_interval(drawn[1]["accuracy"] - drawn[0]["accuracy"])
    f1_low, f1_high = percentile_interval(drawn[1]["f1"] - drawn[0]["f1"])
    base_f1, head_f1 = point[0]["f1"][0], point[1]["f1"][0]
    per_class = pd.DataFrame({"class": classes, "base_f1": base_f1, "head_f1": head_f1, "f1_change": head_f1 - base_f1,
                              "low": f1_low, "high": f1_high, "dropped": f1_high < 0})
    # a row per class the shared test images hold: a class only one commit knows has no image to score
    per_class = per_class[per_class["class"].isin(set(paired["label"]))].reset_index(drop=True)
    base_accuracy, head_accuracy = float(point[0]["accuracy"][0]), float(point[1]["accuracy"][0])
    base_keys, head_keys = (set(zip(f["path"], f["label"], strict=True)) for f in (base.frame, head.frame))
    return PairedComparison(
        images=len(paired), only_base=sorted(path for path, _ in base_keys - head_keys),
        only_head=sorted(path for path, _ in head_keys - base_keys), base_accuracy=base_accuracy,
        head_accuracy=head_accuracy, base_only_right=b, head_only_right=c, mcnemar_p=mcnemar_p,
        accuracy_change=(head_accuracy - base_accuracy, float(accuracy_low), float(accuracy_high)), per_class=per_class)
