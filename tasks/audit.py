"""audit stage: near-duplicates of train images in val/test, and likely mislabelled train images.

Reads the raw images (near-duplicates are compared in pixel space, at 24 px) and the cached
features (the mislabel search), so it runs beside train_head and is not rerun when fine-tuning
changes. The methods are in headstart/audit.py.
Outputs: reports/leakage.csv, reports/suspect_labels.csv, reports/audit/{leakage,suspect_labels}.png
and the counts in reports/audit.json (a DVC metrics file).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from headstart.audit import (
    SplitRows,
    leakage_table,
    out_of_fold_probabilities,
    plot_leakage,
    plot_suspects,
    suspect_table,
)
from headstart.data.artifacts import load_split, load_split_paths, read_features_info
from headstart.data.manifest import SPLITS, read_split_manifest
from headstart.files import atomic_path, atomic_write_json, remove_stale_temps
from headstart.layout import Layout
from headstart.params import Params

log = logging.getLogger(__name__)


class AuditError(ValueError):
    """Cached features that do not match the split manifest; the message says what to rerun."""


def _rows(layout: Layout, split: str, classes: list[str], dim: int, manifest_paths: set[str]) -> SplitRows:
    npz = layout.features_dir / f"{split}.npz"
    features, labels = load_split(npz, len(classes), dim)
    paths = load_split_paths(npz)
    if set(paths) != manifest_paths:
        raise AuditError(f"{npz} does not hold the {split} split of {layout.split_manifest}: rerun the features stage")
    return SplitRows(split, features, labels, paths)


def run(params: Params, layout: Layout) -> dict[str, Any]:
    p = params.audit
    remove_stale_temps(*layout.outputs("audit"), layout.audit_figures_dir / "*")
    info = read_features_info(layout)
    manifest = read_split_manifest(layout.split_manifest)
    splits = {name: _rows(layout, name, info.classes, info.feature_dim,
                          set(manifest.loc[manifest["split"] == name, "path"])) for name in SPLITS}
    train = splits["train"]

    started = time.perf_counter()
    found = leakage_table([splits["val"], splits["test"]], train, info.classes, layout.root, p)
    leakage, leakage_seconds = found.table, time.perf_counter() - started

    started = time.perf_counter()
    probs, folds = out_of_fold_probabilities(train.features, train.labels, info.classes, params.train_head,
                                             p.folds, p.epochs, p.seed)
    suspects = suspect_table(probs, train, info.classes)
    suspect_seconds = time.perf_counter() - started

    layout.audit_figures_dir.mkdir(parents=True, exist_ok=True)
    for frame, target in ((leakage, layout.leakage_csv), (suspects, layout.suspect_labels_csv)):
        with atomic_path(target, suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False)
    plot_leakage(leakage.head(p.leakage_gallery_size), layout.root, layout.audit_figures_dir / "leakage.png")
    plot_suspects(suspects.head(p.suspect_gallery_size), layout.root, layout.audit_figures_dir / "suspect_labels.png")

    images = leakage.drop_duplicates(["split", "path"])["split"].value_counts()
    metrics: dict[str, dict[str, Any]] = {
        "near_duplicates": {
            # per class: its own neighbour similarity (params' percentile), and the pixel similarity a pair needed
            "reference": dict(zip(info.classes, map(float, found.reference), strict=True)),
            "threshold": dict(zip(info.classes, map(float, found.threshold), strict=True)),
            "count": int(images.sum()),  # val/test images with at least one train near-duplicate
            "pairs": len(leakage),
            **{split: int(images.get(split, 0)) for split in ("val", "test")},
        },
        "suspect_labels": {
            "below": p.suspect_below,
            "count": int((suspects["p_label"] < p.suspect_below).sum()),
            "scored": len(suspects),
            "folds": folds,
            "epochs": p.epochs,
        },
    }
    atomic_write_json(layout.audit_metrics, metrics)
    # timings are logged, not put in audit.json: `dvc metrics diff` would show them changing on every run
    log.info("audit: %d val/test image(s) nearly duplicate a train image (%.1f s); %d of %d train labels have "
             "out-of-fold probability < %g (%d folds, %.1f s)", metrics["near_duplicates"]["count"], leakage_seconds,
             metrics["suspect_labels"]["count"], len(suspects), p.suspect_below, folds, suspect_seconds)
    return metrics

