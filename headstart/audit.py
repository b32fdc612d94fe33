"""Data audits on the cached features: near-duplicates across splits, and likely mislabelled train images.

Both work on the pooled backbone vectors the features stage cached, so they cost seconds, not a
backbone pass, and do not depend on fine-tuning.

- Near-duplicates: a val/test image whose feature vector has cosine similarity >= a threshold with
  a train image is almost surely a resized or re-encoded copy of it (download only removes
  byte-identical files), so its score measures memory, not generalisation.
- Suspect labels: each train image is scored by a head that never saw it (stratified k-fold
  out-of-fold probabilities). fastai's `ImageClassifierCleaner` ranks by in-sample loss, which a
  model that memorised a wrong label drives towards zero; out-of-fold probabilities are the honest
  version (the confident-learning idea of Northcutt et al.).

The default threshold and epochs per fold were chosen by measurement: docs/benchmarks.md, "Audit settings".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.model_selection import StratifiedKFold

from headstart.data.artifacts import class_weights
from headstart.data.images import load_rgb
from headstart.model import build_head
from headstart.optimizers import head_optimizer
from headstart.params import TrainHeadParams
from headstart.reporting import image_grid, save_figure
from headstart.runtime import fresh_models_expected, seed_everything

log = logging.getLogger(__name__)

LEAKAGE_COLUMNS = ["split", "path", "label", "train_path", "train_label", "similarity"]
SUSPECT_COLUMNS = ["rank", "path", "label", "p_label", "predicted", "p_predicted"]
BLOCK_ELEMENTS = 16 * 2**20  # similarity entries per chunk: 64 MB of float32, whatever the train size


def _unit_rows(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def near_duplicate_pairs(queries: np.ndarray, train: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (query row, train row, cosine similarity) at or above `threshold`, and each query's best similarity.

    The similarity matrix is computed `BLOCK_ELEMENTS // len(train)` query rows at a time, so memory
    stays bounded (10k x 60k is 2.4 GB as one float32 matrix).
    """
    train_unit = _unit_rows(train)
    chunk = max(1, BLOCK_ELEMENTS // max(1, len(train)))
    pairs, nearest = [], np.full(len(queries), np.nan, dtype=np.float32)
    for start in range(0, len(queries), chunk):
        block = _unit_rows(queries[start:start + chunk]) @ train_unit.T
        if not block.size:
            continue
        nearest[start:start + len(block)] = block.max(axis=1)
        rows, cols = np.nonzero(block >= threshold)
        pairs.append(np.column_stack([rows + start, cols, block[rows, cols]]))
    found = np.concatenate(pairs) if pairs else np.empty((0, 3))
    return found, nearest


@dataclass
class SplitRows:
    """One split's cached features with the manifest path and class name of each row."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray


def leakage_table(queries: list[SplitRows], train: SplitRows, classes: list[str], threshold: float) -> pd.DataFrame:
    """The near-duplicate pairs of every query split against train, most similar first."""
    frames = []
    for split in queries:
        pairs, nearest = near_duplicate_pairs(split.features, train.features, threshold)
        q, t = pairs[:, 0].astype(int), pairs[:, 1].astype(int)
        if len(nearest):
            log.info("audit: %s: %d pair(s) >= %.3f; nearest-train similarity median %.3f, max %.3f", split.name,
                     len(pairs), threshold, float(np.median(nearest)), float(nearest.max()))
        frames.append(pd.DataFrame({
            "split": split.name, "path": split.paths[q], "label": [classes[i] for i in split.labels[q]],
            "train_path": train.paths[t], "train_label": [classes[i] for i in train.labels[t]],
            "similarity": pairs[:, 2].round(6),
        }, columns=LEAKAGE_COLUMNS))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LEAKAGE_COLUMNS)
    return table.sort_values(["similarity", "split", "path", "train_path"], ascending=[False, True, True, True],
                             kind="stable", ignore_index=True)


def _fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_out: np.ndarray, num_classes: int, p: TrainHeadParams,
                 epochs: int, weights: dict[int, float] | None) -> np.ndarray:
    """train_head's head and optimiser, trained on one fold's complement for `epochs`; held-out probabilities."""
    eye = np.eye(num_classes, dtype=np.float32)
    fit_ds = (tf.data.Dataset.from_tensor_slices((x_fit, eye[y_fit]))
              .shuffle(len(y_fit), seed=p.seed, reshuffle_each_iteration=True).batch(p.batch_size))
    fold_params = p.model_copy(update={"epochs": epochs})  # a cosine schedule decays over these epochs
    head = build_head(x_fit.shape[1], num_classes, fold_params)
    head.compile(optimizer=head_optimizer(fold_params, math.ceil(len(y_fit) / p.batch_size)),
                 loss=keras.losses.CategoricalCrossentropy(label_smoothing=p.label_smoothing))
    head.fit(fit_ds, epochs=epochs, class_weight=weights, verbose=0, shuffle=False)
    # a tf.data input, as in train_head: Keras' NumPy adapter logs a spurious error under op determinism
    return head.predict(tf.data.Dataset.from_tensor_slices(x_out).batch(1024), verbose=0)


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, classes: list[str], p: TrainHeadParams,
                              folds: int, epochs: int, seed: int) -> tuple[np.ndarray, int]:
    """(N, C) probabilities, each row from a head trained without that image; NaN rows were not scored.

    A class with fewer than 2 train images cannot be held out and still be learnt, so its rows stay
    NaN; the fold count drops to the smallest remaining class's size (StratifiedKFold needs one image
    of each class per fold). Returns the probabilities and the folds used (0: nothing scored).
    """
    counts = np.bincount(labels, minlength=len(classes))
    tiny = [classes[i] for i in np.flatnonzero((counts > 0) & (counts < 2))]
    if tiny:
        log.warning("audit: class(es) %s have fewer than 2 train images: their images are not scored", tiny)
    scored = np.flatnonzero(counts[labels] >= 2)
    probs = np.full((len(labels), len(classes)), np.nan, dtype=np.float32)
    if len(np.unique(labels[scored])) < 2:
        log.warning("audit: fewer than 2 classes with 2+ train images: no suspect-label search")
        return probs, 0
    used = int(min(folds, counts[counts >= 2].min()))
    if used < folds:
        log.warning("audit: the smallest class has %d train images: %d folds instead of audit.folds=%d",
                    used, used, folds)
    splitter = StratifiedKFold(n_splits=used, shuffle=True, random_state=seed)
    with fresh_models_expected():  # a new head per fold
        for fold, (fit, out) in enumerate(splitter.split(features[scored], labels[scored]), start=1):
            fit, out = scored[fit], scored[out]
            seed_everything(seed + fold)
            weights = class_weights(p.class_weight, labels[fit], classes)
            probs[out] = _fit_predict(features[fit], labels[fit], features[out], len(classes), p, epochs, weights)
            log.info("audit: fold %d/%d: %d images scored", fold, used, len(out))
    return probs, used


def suspect_table(probs: np.ndarray, train: SplitRows, classes: list[str]) -> pd.DataFrame:
    """Every scored train image, the lowest out-of-fold probability of its given label first."""
    scored = np.flatnonzero(~np.isnan(probs[:, 0]))
    p_label = probs[scored, train.labels[scored]]
    predicted = probs[scored].argmax(axis=1)
    order = np.lexsort((train.paths[scored], p_label))  # ties by path, so the ranking is stable
    rows = scored[order]
    return pd.DataFrame({
        "rank": np.arange(1, len(rows) + 1),
        "path": train.paths[rows],
        "label": [classes[i] for i in train.labels[rows]],
        "p_label": p_label[order].round(6),
        "predicted": [classes[i] for i in predicted[order]],
        "p_predicted": probs[rows, predicted[order]].round(6),
    }, columns=SUSPECT_COLUMNS)


def plot_leakage(pairs: pd.DataFrame, root: Path, target: Path) -> None:
    """Each pair side by side: the val/test image, then the train image it nearly duplicates."""
    figure, axes = image_grid(2 * len(pairs), 4, (2.2, 2.6))
    for i, row in enumerate(pairs.itertuples()):
        left, right = axes.flat[2 * i], axes.flat[2 * i + 1]
        left.imshow(load_rgb(root / row.path))
        left.set_title(f"{row.split}: {row.label}\nsim {row.similarity:.3f}", fontsize=8)
        right.imshow(load_rgb(root / row.train_path))
        right.set_title(f"train: {row.train_label}\n{Path(row.train_path).name}", fontsize=8)
    if pairs.empty:
        axes[0][0].text(0.5, 0.5, "no near-duplicates across splits", ha="center", va="center")
    figure.suptitle("Near-duplicates of train images in val/test (most similar first)", fontsize=10)
    save_figure(figure, target)


def plot_suspects(suspects: pd.DataFrame, root: Path, target: Path) -> None:
    """The train images whose given label the out-of-fold head believes least."""
    figure, axes = image_grid(len(suspects), 4, (2.6, 3.2))
    for axis, row in zip(axes.flat, suspects.itertuples(), strict=False):
        axis.imshow(load_rgb(root / row.path))
        axis.set_title(f"#{row.rank} given: {row.label} ({row.p_label:.2f})\nlooks like: {row.predicted} "
                       f"({row.p_predicted:.2f})", fontsize=8)
    if suspects.empty:
        axes[0][0].text(0.5, 0.5, "no train images scored", ha="center", va="center")
    figure.suptitle("Likely mislabelled train images (out-of-fold probability of the given label)", fontsize=10)
    save_figure(figure, target)
