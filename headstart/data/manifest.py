"""The manifests' schema (the raw one download writes, the split one split writes) and the one reader of
the split manifest (`data/split/manifest.csv`) for every stage after split.

Every column is read as text with no missing-value guessing: pandas' defaults would turn class
folders named `0`/`1` into integers and a folder named `NA` into NaN, so a stage would no longer
recognise the class names the model was trained on.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

SPLITS = ("train", "val", "test")
RAW_COLUMNS = ("path", "label", "sha256", "width", "height", "mode", "source_split", "origin")  # data/raw/manifest.csv
SPLIT_COLUMNS = ("path", "label", "split", "sha256", "width", "height")  # data/split/manifest.csv
REQUIRED_COLUMNS = ("path", "label", "split", "sha256")  # what the stages after split read


class ManifestError(ValueError):
    """A split manifest that cannot be used; the message names the file, the row and what to do."""


def read_split_manifest(path: Path) -> pd.DataFrame:
    """The manifest as strings (path, label, split, sha256, ...), checked for the values stages rely on."""
    if not path.exists():
        raise FileNotFoundError(f"split manifest {path} not found; run `headstart split` first")
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    absent = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if absent:
        raise ManifestError(f"{path}: missing column(s) {', '.join(absent)}; rerun `headstart split`")
    if manifest.empty:
        raise ManifestError(f"{path}: no rows; rerun `headstart download` and `headstart split`")
    checks = [
        ("split", ~manifest["split"].isin(SPLITS), "split {!r}; expected one of " + str(SPLITS)),
        ("sha256", ~manifest["sha256"].str.fullmatch(r"[0-9a-f]{64}"), "sha256 {!r}, not 64 hex digits"),
        ("path", manifest["path"] == "", "an empty path"),
        ("label", manifest["label"] == "", "an empty label"),
    ]
    for column, bad, problem in checks:
        if bad.any():
            first = int(bad.to_numpy().argmax())  # line first + 2: the header is line 1
            row = manifest.iloc[first]
            raise ManifestError(
                f"{path}: line {first + 2} ({row['path'] or 'no path'}) has {problem.format(row[column])}; "
                "rerun `headstart split`"
            )
    return manifest
