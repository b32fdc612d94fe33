"""split stage: assign every image to train/val/test per class, by content, without moving files.

Within a class, images are ordered by sha256(salt + content hash) and dealt one at a time to the
split furthest below its requested share, except that a split with a non-zero fraction and no image
yet comes first: every class gets at least one val and one test image (3 images: one of each).
This keeps every class close to the requested fractions, sends identical content to one split, and
does not depend on file names, paths or machines. Images already assigned in the previous manifest
(same salt and fractions) keep their split, and only new images are dealt, so adding images never
moves an existing one.

A source may ship its own split (train/ val/ test/ folders, a labels file's split column, Fashion-MNIST's
t10k test set). With split.respect_existing_split auto (the default) or true, its val and test images
stay there, and its train part is dealt among train and the splits it does not ship, in proportion to
their fractions (train/ and test/ only: val is carved from train/ at val / (train + val)).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import pandas as pd

from headstart.data.manifest import RAW_COLUMNS, SPLIT_COLUMNS, SPLITS
from headstart.files import atomic_path, atomic_write_json, remove_stale_temps
from headstart.layout import Layout
from headstart.params import Params, SplitParams

log = logging.getLogger(__name__)



class SplitError(ValueError):
    pass


def _order_key(salt: str, sha256: str) -> str:
    return hashlib.sha256(f"{salt}:{sha256}".encode()).hexdigest()


def deal(new_hashes: list[str], fractions: dict[str, float], counts: dict[str, int], salt: str) -> dict[str, str]:
    """Assign `new_hashes` (one class) to splits, continuing from the existing `counts`.

    Each image goes to the split with the largest deficit `n * fraction - count` (ties: train, val,
    test order), choosing among the still empty splits while there are any, so that a small class
    has an image in every split it can fill. That minimum can leave train up to two images short in
    a class of fewer than 1 / (2 * smallest fraction) images; from there on, starting from a balanced
    state, every |n * fraction - count| stays below one image.
    """
    counts = dict(counts)
    total = sum(counts.values())
    assignment = {}
    for sha in sorted(set(new_hashes), key=lambda h: _order_key(salt, h)):
        total += 1
        empty = [s for s in fractions if fractions[s] > 0 and not counts.get(s)]
        target = max(empty or fractions,
                     key=lambda s: (total * fractions[s] - counts.get(s, 0), -SPLITS.index(s)))
        counts[target] = counts.get(target, 0) + 1
        assignment[sha] = target
    return assignment


def _previous_assignment(layout: Layout, params: SplitParams) -> dict[tuple[str, str], str]:
    """(label, sha256) -> split from the last manifest, when it was made with the same salt and fractions."""
    if not (layout.split_manifest.exists() and layout.split_summary.exists()):
        return {}
    settings = json.loads(layout.split_summary.read_text()).get("settings", {})
    if settings != _settings(params):
        log.info("split settings changed (%s -> %s): assigning every image afresh", settings, _settings(params))
        return {}
    previous = pd.read_csv(layout.split_manifest, dtype=str, keep_default_na=False)
    return {(row.label, row.sha256): row.split for row in previous.itertuples()}


def _settings(params: SplitParams) -> dict[str, Any]:
    return {"salt": params.salt, "train": params.train, "val": params.val, "test": params.test,
            "respect_existing_split": params.respect_existing_split}


def kept_source_splits(raw: pd.DataFrame, params: SplitParams) -> list[str]:
    """The val/test splits the source ships and split.respect_existing_split keeps (train is the rest).

    An image the source leaves unassigned counts as part of its train part (Fashion-MNIST's IDX train file).
    """
    shipped = set(raw["source_split"]) if "source_split" in raw.columns else set()
    if params.respect_existing_split is True and not shipped - {""}:
        raise SplitError(
            "split.respect_existing_split=true keeps the split the source ships, but it ships none (no train/ "
            "val/ test/ folders, no split column in download.labels, no official test set): set it to auto or false"
        )
    return [s for s in SPLITS[1:] if s in shipped] if params.respect_existing_split else []


def assign_splits(raw: pd.DataFrame, params: SplitParams, previous: dict[tuple[str, str], str]) -> pd.Series:
    """The split of every row of the raw manifest.

    Images in a kept source split stay there; the others (the source's train part) are dealt among train
    and the splits the source does not ship, in proportion to their fractions.
    """
    fractions = {"train": params.train, "val": params.val, "test": params.test}
    required = {s for s, fraction in fractions.items() if fraction > 0}
    kept_splits = kept_source_splits(raw, params)
    active = {s: f for s, f in fractions.items() if s not in kept_splits}
    active = {s: f / sum(active.values()) for s, f in active.items()}
    split = pd.Series("", index=raw.index, dtype=object)
    for label, group in raw.groupby("label", sort=True):
        kept = {i: previous[(label, sha)] for i, sha in group["sha256"].items() if (label, sha) in previous}
        if kept and not required <= set(kept.values()):
            log.info("class %r: the previous split left %s empty; dealing the class afresh",
                     label, sorted(required - set(kept.values())))
            kept = {}
        for i, value in kept.items():
            split[i] = value
        fresh = group.loc[[i for i in group.index if i not in kept]]
        shipped = fresh["source_split"].isin(kept_splits).to_numpy() if kept_splits else np.zeros(len(fresh), bool)
        split[fresh.index[shipped]] = fresh["source_split"][shipped]
        dealt_rows = fresh[~shipped]
        counts = {s: int((split[group.index] == s).sum()) for s in active}
        assignment = deal(dealt_rows["sha256"].tolist(), active, counts, params.salt)
        split[dealt_rows.index] = dealt_rows["sha256"].map(assignment)
    return split


def _check_every_split_filled(manifest: pd.DataFrame, params: SplitParams, kept_splits: list[str]) -> None:
    """Stop, naming the class, when a split with a non-zero fraction got none of a class's images."""
    required = [s for s in SPLITS if getattr(params, s) > 0]
    for label, group in manifest.groupby("label"):
        empty = [s for s in required if not group["split"].eq(s).any()]
        shipped_empty = [s for s in empty if s in kept_splits]
        if shipped_empty:
            raise SplitError(
                f"class {label!r} has no image in the {' or '.join(shipped_empty)} split the source ships, and "
                f"split.respect_existing_split={str(params.respect_existing_split).lower()} takes {shipped_empty[0]} images only "
                f"from there: add {shipped_empty[0]} images for it to the source, or set "
                "split.respect_existing_split=false."
            )
        if not empty:
            continue
        raise SplitError(
            f"class {label!r} has {len(group)} image(s), none for {' or '.join(empty)}: with split.val="
            f"{params.val:g} and split.test={params.test:g} every class needs at least {len(required)} "
            "images, one per split. Add images to it, or remove it from download.source"
            + (" (or set split.test=0 and raise split.train to match)." if empty == ["test"] else ".")
        )


def summarize(manifest: pd.DataFrame, params: SplitParams) -> dict[str, Any]:
    per_class = {
        label: {s: int((group["split"] == s).sum()) for s in SPLITS} for label, group in manifest.groupby("label")
    }
    totals = {s: int((manifest["split"] == s).sum()) for s in SPLITS}
    return {"settings": _settings(params), "images": len(manifest), "classes": len(per_class),
            "total": totals, "per_class": per_class}


def run(params: Params, layout: Layout) -> dict[str, Any]:
    remove_stale_temps(layout.split_manifest, layout.split_summary)
    if not layout.raw_manifest.exists():
        raise SplitError(f"{layout.raw_manifest} not found: run the download stage first (headstart download)")
    raw = pd.read_csv(layout.raw_manifest, dtype={"sha256": str, "label": str, "source_split": str}, keep_default_na=False)
    missing = [c for c in RAW_COLUMNS if c in SPLIT_COLUMNS and c not in raw.columns]
    if missing:
        raise SplitError(f"{layout.raw_manifest}: missing column(s) {missing}; rerun the download stage")
    if raw["sha256"].duplicated().any():
        duplicated = raw.loc[raw["sha256"].duplicated(keep=False), "path"].tolist()[:5]
        raise SplitError(f"{layout.raw_manifest}: identical content listed twice ({duplicated}); rerun download")
    kept_splits = kept_source_splits(raw, params.split)
    if kept_splits:
        log.info("split: keeping the source's %s split; the rest is dealt to %s", " and ".join(kept_splits),
                 " and ".join(s for s in SPLITS if s not in kept_splits))
    manifest = raw.assign(split=assign_splits(raw, params.split, _previous_assignment(layout, params.split)))
    _check_every_split_filled(manifest, params.split, kept_splits)
    manifest = manifest[list(SPLIT_COLUMNS)].sort_values(["split", "label", "path"], kind="stable")
    with atomic_path(layout.split_manifest) as tmp:
        manifest.to_csv(tmp, index=False)
    summary = summarize(manifest, params.split)
    atomic_write_json(layout.split_summary, summary)
    log.info("split: %s", summary["total"])
    return summary
