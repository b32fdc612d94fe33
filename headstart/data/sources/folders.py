"""Labelled candidates from a folder of class sub-folders (or a preset's file-name labelling)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from headstart.data.images import is_candidate_image
from headstart.data.sources.candidates import Candidate, DownloadError, one_class


def _dataset_root(folder: Path) -> Path:
    """Descend through wrapper folders (an archive's single top folder) to the class folders."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) == 1 and not any(p.is_file() and is_candidate_image(p) for p in entries):
            folder = dirs[0]
        else:
            return folder


def folder_candidates(folder: Path, preset: dict[str, Any] | None = None) -> tuple[list[Candidate], int]:
    """Labelled candidates under `folder` and the number of files skipped (hidden or not images)."""
    preset = preset or {}
    label_from = preset.get("label_from", "folder")
    excluded = set(preset.get("exclude_classes", []))
    root = _dataset_root(folder)
    if label_from == "folder":
        _refuse_presplit(root)
    candidates, skipped = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") or part == "__MACOSX" for part in relative.parts) or not is_candidate_image(path):
            skipped += 1
            continue
        label = _label_for(relative, label_from, preset)
        if label is None or label in excluded:
            skipped += 1
            continue
        candidates.append(Candidate(label=label, name=path.name, origin=str(path), path=path))
    if not candidates:
        if root != folder and any(is_candidate_image(p) for p in root.iterdir() if p.is_file()):
            raise DownloadError(f"{folder}: {one_class(root.name)}")  # the wrapper folders led into a class
        raise DownloadError(
            f"{folder}: no labelled images found. Expected class sub-folders of images "
            f"(e.g. {folder / 'cat' / '1.jpg'}), an archive, or IDX files."
        )
    return candidates, skipped


PRESPLIT_NAMES = {"train", "test", "val", "valid", "validation"}


def _refuse_presplit(root: Path) -> None:
    """A tree of train/<class>, test/<class>... would give classes named train and test; refuse it."""
    splits = [p for p in root.iterdir() if p.is_dir() and p.name.lower() in PRESPLIT_NAMES]
    if len(splits) >= 2 and any(child.is_dir() for split in splits for child in split.iterdir()):
        names = ", ".join(sorted(f"{p.name}/" for p in splits))
        raise DownloadError(
            f"{root}: looks split already ({names} hold class folders), and headstart makes its own split. "
            f"Merge them into one folder per class (e.g. {root / 'cat'} with the cat images of every split) "
            "and point download.source at the merged folder."
        )


def _label_for(relative: Path, label_from: str, preset: dict[str, Any]) -> str | None:
    if label_from == "folder":
        return relative.parts[0] if len(relative.parts) > 1 else None
    if label_from == "index":
        match = re.search(preset["index_regex"], relative.as_posix())
        if not match:
            return None
        index = (int(match.group(1)) - 1) // int(preset["images_per_class"])
        classes = preset["classes"]
        return classes[index] if 0 <= index < len(classes) else None
    if label_from == "regex":
        match = re.search(preset["label_regex"], relative.as_posix())
        return match.group(1).lower() if match else None
    raise DownloadError(f"presets.yaml: unknown label_from {label_from!r} (use folder, index or regex)")
