"""split stage: assign every image to train/val/test per class, by content, without moving files.

Within a class, images are ordered by sha256(salt + content hash) and dealt one at a time to the
split furthest below its requested share. This keeps every class within one image of the requested
fractions, sends identical content to one split, and does not depend on file names, paths or
machines. Images already assigned in the previous manifest (same salt and fractions) keep their
split, and only new images are dealt, so adding images never moves an existing one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.files import atomic_path, atomic_write_json
from tasks.layout import Layout
from tasks.params import Params, SplitParams

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "label", "split", "sha256", "width", "height"]


class SplitError(ValueError):
    pass


def _order_key(salt: str, sha256: str) -> str:
    return hashlib.sha256(f"{salt}:{sha256}".encode()).hexdigest()


def deal(new_hashes: list[str], fractions: dict[str, float], counts: dict[str, int], salt: str) -> dict[str, str]:
    """Assign `new_hashes` (one class) to splits, continuing from the existing `counts`.

    Each image goes to the split with the largest deficit `n * fraction - count` (ties: train, val,
    test order), which keeps every |n * fraction - count| below one image when starting from a
    balanced state.
    """
    counts = dict(counts)
    total = sum(counts.values())
    assignment = {}
    for sha in sorted(set(new_hashes), key=lambda h: _order_key(salt, h)):
        total += 1
        target = max(fractions, key=lambda s: (total * fractions[s] - counts.get(s, 0), -SPLITS.index(s)))
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
    previous = pd.read_csv(layout.split_manifest, dtype=str)
    return {(row.label, row.sha256): row.split for row in previous.itertuples()}


def _settings(params: SplitParams) -> dict[str, Any]:
    return {"salt": params.salt, "train": params.train, "val": params.val, "test": params.test,
            "respect_existing_split": params.respect_existing_split}


def assign_splits(raw: pd.DataFrame, params: SplitParams, previous: dict[tuple[str, str], str]) -> pd.Series:
    """The split of every row of the raw manifest."""
    fractions = {"train": params.train, "val": params.val, "test": params.test}
    split = pd.Series("", index=raw.index, dtype=object)
    for label, group in raw.groupby("label", sort=True):
        kept = {i: previous[(label, sha)] for i, sha in group["sha256"].items() if (label, sha) in previous}
        for i, value in kept.items():
            split[i] = value
        fresh = group.loc[[i for i in group.index if i not in kept]]
        shipped_test = fresh["source_split"].eq("test") if params.respect_existing_split else pd.Series(False, index=fresh.index)
        split[fresh.index[shipped_test.to_numpy()]] = "test"
        dealt_rows = fresh[~shipped_test.to_numpy()]
        counts = {s: int((split[group.index] == s).sum()) for s in SPLITS}
        active = fractions
        if params.respect_existing_split:
            # test comes from the shipped split; train and val share the rest in their ratio
            active = {"train": params.train / (params.train + params.val), "val": params.val / (params.train + params.val)}
            counts.pop("test")
        assignment = deal(dealt_rows["sha256"].tolist(), active, counts, params.salt)
        split[dealt_rows.index] = dealt_rows["sha256"].map(assignment)
    return split


def summarize(manifest: pd.DataFrame, params: SplitParams) -> dict[str, Any]:
    per_class = {
        label: {s: int((group["split"] == s).sum()) for s in SPLITS} for label, group in manifest.groupby("label")
    }
    totals = {s: int((manifest["split"] == s).sum()) for s in SPLITS}
    return {"settings": _settings(params), "images": len(manifest), "classes": len(per_class),
            "total": totals, "per_class": per_class}


def run(params: Params, layout: Layout) -> dict[str, Any]:
    if not layout.raw_manifest.exists():
        raise SplitError(f"{layout.raw_manifest} not found: run the download stage first (headstart download)")
    raw = pd.read_csv(layout.raw_manifest, dtype={"sha256": str, "label": str, "source_split": str}, keep_default_na=False)
    missing = [c for c in ("path", "label", "sha256", "width", "height") if c not in raw.columns]
    if missing:
        raise SplitError(f"{layout.raw_manifest}: missing column(s) {missing}; rerun the download stage")
    if raw["sha256"].duplicated().any():
        duplicated = raw.loc[raw["sha256"].duplicated(keep=False), "path"].tolist()[:5]
        raise SplitError(f"{layout.raw_manifest}: identical content listed twice ({duplicated}); rerun download")
    manifest = raw.assign(split=assign_splits(raw, params.split, _previous_assignment(layout, params.split)))
    manifest = manifest[MANIFEST_COLUMNS].sort_values(["split", "label", "path"], kind="stable")
    with atomic_path(layout.split_manifest) as tmp:
        manifest.to_csv(tmp, index=False)
    summary = summarize(manifest, params.split)
    atomic_write_json(layout.split_summary, summary)
    log.info("split: %s", summary["total"])
    return summary
