"""Data audits: near-duplicates across splits, and likely mislabelled train images.

- Near-duplicates: a val/test image that is a resized, re-encoded, lightly cropped or brightened copy
  of a train image (download only removes byte-identical files) measures memory, not generalisation.
  Each image is compared in pixel space, as a small grayscale copy (normalised correlation, so
  brightness and contrast shifts do not matter). What counts as "nearly identical" depends on the
  dataset: two different handwritten 1s or two parts under one camera correlate at 0.98, two photos
  far less. So the threshold is set by the dataset's own neighbours: a pair must be at most
  `audit.near_duplicate_margin` of the distance from identical at which different train images of
  the train image's class sit (the `near_duplicate_percentile` of their second-nearest neighbour's).
- Suspect labels: each train image is scored by a head that never saw it (stratified k-fold
  out-of-fold probabilities, on the cached features). fastai's `ImageClassifierCleaner` ranks by
  in-sample loss, which a model that memorised a wrong label drives towards zero; out-of-fold
  probabilities are the honest version (the confident-learning idea of Northcutt et al.).

The recall of planted copies, the false alarms and the ranks of planted label flips on five datasets
are in docs/benchmarks.md ("Trust checks on five datasets", bench/audit_bench.py).
The audit settings' history is in docs/benchmarks.md, "Audit settings".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image
from sklearn.model_selection import StratifiedKFold

from headstart.data.artifacts import class_weights
from headstart.data.images import load_rgb
from headstart.model import compiled_head, head_batches
from headstart.params import AuditParams, TrainHeadParams
from headstart.reporting import image_grid, save_figure
from headstart.runtime import fresh_models_expected, seed_everything

log = logging.getLogger(__name__)

LEAKAGE_COLUMNS = ["split", "path", "label", "train_path", "train_label", "pixel_similarity", "feature_similarity"]
SUSPECT_COLUMNS = ["rank", "path", "label", "p_label", "predicted", "p_predicted"]
BLOCK_ELEMENTS = 16 * 2**20  # similarity entries per chunk: 64 MB of float32, whatever the train size
THUMBNAIL = 24  # side of the grayscale copies compared in pixel space
TRIM = 0.05  # each image is also compared with 5% trimmed off every border: a lightly cropped copy lines up
CONTRAST_RATIO = 1.5  # a pair whose gray-level spreads differ more than this is not a copy
REFERENCE_SAMPLE = 4000  # train images whose neighbours set the dataset's reference similarity


def _unit_rows(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class Thumbnails:
    """Small grayscale copies of N images, as compared in pixel space."""

    vectors: np.ndarray  # (2, N, THUMBNAIL**2) zero-mean unit vectors: whole image, then TRIM cut off each border
    contrast: np.ndarray  # (N,) standard deviation of the whole copy's gray levels


def pixel_signatures(paths: list[Path]) -> Thumbnails:
    """Each image as a zero-mean unit vector of a THUMBNAIL-px grayscale copy, whole and with TRIM cut off
    each border, so a dot product is their normalised correlation; and its contrast.

    Images are decoded as training decodes them (upright, JPEG draft) and reduced with Lanczos, whose
    low-pass makes a 2x upscale and its original agree; normalised correlation ignores brightness and
    contrast shifts.
    """
    out = np.empty((2, len(paths), THUMBNAIL * THUMBNAIL), dtype=np.float32)
    for i, path in enumerate(paths):
        gray = Image.fromarray(load_rgb(path, target_size=4 * THUMBNAIL)).convert("L")
        w, h = gray.size
        for t, trim in enumerate((0.0, TRIM)):
            box = (round(trim * w), round(trim * h), w - round(trim * w), h - round(trim * h))
            out[t, i] = np.asarray(gray.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS, box=box),
                                   dtype=np.float32).ravel()
    out -= out.mean(axis=2, keepdims=True)
    norms = np.linalg.norm(out, axis=2, keepdims=True)
    out /= np.maximum(norms, 1e-6)
    return Thumbnails(out, norms[0, :, 0] / THUMBNAIL)


def _pixel_block(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Pixel similarity of every (query, train) pair: the best of whole-whole, whole-trimmed, trimmed-whole."""
    return np.maximum.reduce([queries[0] @ train[0].T, queries[0] @ train[1].T, queries[1] @ train[0].T])


def _blocks(queries: np.ndarray, train: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, pixel similarity block) over the queries, `BLOCK_ELEMENTS // len(train)` rows at a time, so memory
    stays bounded (10k x 60k is 2.4 GB as one float32 matrix)."""
    chunk = max(1, BLOCK_ELEMENTS // max(1, train.shape[1]))
    for start in range(0, queries.shape[1], chunk):
        yield start, _pixel_block(queries[:, start:start + chunk], train)


def reference_similarity(train: np.ndarray, labels: np.ndarray, num_classes: int, percentile: float,
                         seed: int) -> np.ndarray:
    """(classes,) per class: the `percentile` of its train images' second-nearest pixel similarity to the other
    train images of that class.

    It says how alike two different images of this class can be: two handwritten 1s or one product
    under one camera reach 0.98, varied photos far less, and a look-alike class needs a higher bar
    than the rest of its dataset. The second neighbour, not the first, so that copies inside train (a
    copy and its original are each other's first neighbour) do not raise it, however many there are.
    With few images per class the second neighbour is far and the reference low (0.92 with 28 coats,
    0.97 with 700): `audit.near_duplicate_min_similarity` keeps look-alikes out there. A class with
    under 3 train images gets the median of the others (NaN when none has 3).
    """
    rng = np.random.default_rng(seed)
    found = np.full(num_classes, np.nan)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < 3:
            continue
        rows = np.sort(rng.choice(len(members), min(len(members), REFERENCE_SAMPLE), replace=False))
        second = []
        for start, block in _blocks(train[:, members[rows]], train[:, members]):
            block[np.arange(len(block)), rows[start:start + len(block)]] = -np.inf  # not itself
            second.append(np.partition(block, -2, axis=1)[:, -2])
        found[c] = np.percentile(np.concatenate(second), percentile)
    known = found[~np.isnan(found)]
    return np.where(np.isnan(found), np.median(known) if len(known) else np.nan, found)


def near_duplicate_threshold(reference: np.ndarray, margin: float, floor: float) -> np.ndarray:
    """The pixel similarity a pair needs: its distance to identical (1 - similarity) at most `margin` times the
    reference's, and at least `floor` (a NaN reference, with no class of 3 train images: the floor alone)."""
    return np.maximum(floor, np.nan_to_num(1 - margin * (1 - np.asarray(reference, dtype=np.float64)), nan=floor))


def near_duplicate_pairs(queries: Thumbnails, train: Thumbnails, threshold: float | np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Every (query row, train row, pixel similarity) at or above `threshold` (one value, or one per train row)
    whose contrasts are within CONTRAST_RATIO of each other, and each query's best similarity.

    Normalised correlation cannot tell a black-to-white edge from a black-to-gray one; a copy keeps
    its contrast (a brightness shift of +40 levels, clipped, changes it by under 20%).
    """
    pairs, nearest = [], np.full(queries.vectors.shape[1], np.nan, dtype=np.float32)
    for start, block in _blocks(queries.vectors, train.vectors):
        if not block.size:
            continue
        nearest[start:start + len(block)] = block.max(axis=1)
        rows, cols = np.nonzero(block >= np.broadcast_to(threshold, block.shape[1:]))
        ratio = queries.contrast[rows + start] / np.maximum(train.contrast[cols], 1e-6)
        alike = (ratio <= CONTRAST_RATIO) & (ratio >= 1 / CONTRAST_RATIO)
        rows, cols = rows[alike], cols[alike]
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


@dataclass(frozen=True)
class Leakage:
    """The near-duplicate pairs and, per class, the reference similarity and the threshold that found them."""

    table: pd.DataFrame
    reference: np.ndarray  # (classes,)
    threshold: np.ndarray  # (classes,): the pixel similarity a pair with a train image of that class needed


def leakage_table(queries: list[SplitRows], train: SplitRows, classes: list[str], root: Path, p: AuditParams
                  ) -> Leakage:
    """The near-duplicate pairs of every query split against train, most similar first.

    A pair counts when its pixel similarity stands out from the dataset's own neighbour similarities
    (`near_duplicate_threshold`): pooled ImageNet features put every image of a look-alike dataset
    close together, and a JPEG re-encode of a 28-px digit further from its original (0.79) than two
    different digits usually are (0.93), so features alone can neither find nor rule out a copy. The
    feature cosine of each pair is reported beside it.
    """
    signatures = {split.name: pixel_signatures([root / path for path in split.paths]) for split in [train, *queries]}
    reference = reference_similarity(signatures[train.name].vectors, train.labels, len(classes),
                                     p.near_duplicate_percentile, p.seed)
    threshold = near_duplicate_threshold(reference, p.near_duplicate_margin, p.near_duplicate_min_similarity)
    train_unit = _unit_rows(train.features)
    frames = []
    for split in queries:
        pairs, nearest = near_duplicate_pairs(signatures[split.name], signatures[train.name], threshold[train.labels])
        q, t = pairs[:, 0].astype(int), pairs[:, 1].astype(int)
        if len(nearest):
            log.info("audit: %s: %d pair(s) at pixel similarity >= %.4f to %.4f (by class); nearest-train pixel "
                     "similarity median %.3f, max %.3f", split.name, len(pairs), threshold.min(), threshold.max(),
                     float(np.median(nearest)), float(nearest.max()))
        cosine = np.einsum("ij,ij->i", _unit_rows(split.features[q]), train_unit[t])
        frames.append(pd.DataFrame({
            "split": split.name, "path": split.paths[q], "label": [classes[i] for i in split.labels[q]],
            "train_path": train.paths[t], "train_label": [classes[i] for i in train.labels[t]],
            "pixel_similarity": pairs[:, 2].round(6), "feature_similarity": cosine.round(6),
        }, columns=LEAKAGE_COLUMNS))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LEAKAGE_COLUMNS)
    table = table.sort_values(["pixel_similarity", "split", "path", "train_path"], ascending=[False, True, True, True],
                              kind="stable", ignore_index=True)
    return Leakage(table, reference, threshold)


def _fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_out: np.ndarray, num_classes: int, p: TrainHeadParams,
                 epochs: int, weights: dict[int, float] | None) -> np.ndarray:
    """train_head's head recipe, trained on one fold's complement for `epochs`; held-out probabilities."""
    fold_params = p.model_copy(update={"epochs": epochs})  # a cosine schedule decays over these epochs
    head = compiled_head(x_fit.shape[1], num_classes, fold_params, len(y_fit))
    head.fit(head_batches(x_fit, y_fit, num_classes, fold_params), epochs=epochs, class_weight=weights, verbose=0,
             shuffle=False)
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
        left.set_title(f"{row.split}: {row.label}\npixel {row.pixel_similarity:.3f}, "
                       f"feature {row.feature_similarity:.3f}", fontsize=8)
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
