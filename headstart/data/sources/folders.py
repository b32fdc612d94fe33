"""Labelled candidates from a folder of class sub-folders, possibly inside train/ val/ test/ split folders
(or a preset's file-name labelling)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from headstart.data.images import is_candidate_image, is_image_name
from headstart.data.sources.candidates import Candidate, DownloadError, label_problem, one_class


def dataset_root(folder: Path) -> Path:
    """Descend through wrapper folders (an archive's single top folder) to the class folders."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) == 1 and not any(p.is_file() and is_candidate_image(p) for p in entries):
            folder = dirs[0]
        else:
            return folder


def is_hidden(relative: str) -> bool:
    """A relative posix path under a hidden or __MACOSX folder, or a hidden file."""
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.split("/"))


def is_source_image(relative: str) -> bool:
    """A file the download stage reads (a relative posix path): an image by name, not hidden nor under a
    hidden or __MACOSX folder."""
    return not is_hidden(relative) and is_image_name(relative.rsplit("/", 1)[-1])


def folder_candidates(
    folder: Path, preset: dict[str, Any] | None = None, archive: str | None = None
) -> tuple[list[Candidate], int, list[dict[str, str]]]:
    """Labelled candidates under `folder`, the number of files skipped (hidden, not images or unlabelled)
    and the files quarantined (symbolic links leading outside `folder`, broken links). `archive`: the
    archive (path or URL) `folder` was extracted from, which messages name instead of the extraction cache.

    Class folders may sit inside split folders (train/, val/ or valid/ or validation/, test/): the split
    is kept as each candidate's `source_split`.
    """
    preset = preset or {}
    label_from = preset.get("label_from", "folder")
    excluded = set(preset.get("exclude_classes", []))
    root = dataset_root(folder)
    splits = _split_folders(root) if label_from == "folder" else {}
    candidates, quarantined, skipped = [], [], 0
    for path, problem in _walk(root, folder):
        relative = path.relative_to(root)
        posix = relative.as_posix()
        if is_hidden(posix) or (not problem and not is_source_image(posix)):
            skipped += 1
            continue
        source_split = splits.get(relative.parts[0], "")
        label = _label_for(Path(*relative.parts[1:]) if source_split else relative, label_from, preset)
        if label is None or label in excluded:
            skipped += 1
            continue
        if problem:
            quarantined.append({"origin": str(path), "label": label, "reason": problem})
            continue
        if label_problem(label):
            raise DownloadError(f"{path.parent}: {label_problem(label)}. Rename that class folder.")
        candidates.append(Candidate(label=label, name=path.name, origin=str(path), path=path, source_split=source_split))
    if not candidates:
        shown = archive or folder
        if root != folder and any(is_candidate_image(p) for p in root.iterdir() if p.is_file()):
            raise DownloadError(f"{shown}: {one_class(root.name)}")  # the wrapper folders led into a class
        example = "cat/1.jpg inside it" if archive else folder / "cat" / "1.jpg"
        raise DownloadError(
            f"{shown}: no labelled images found{' in the archive' if archive else ''}. Expected class "
            f"sub-folders of images (e.g. {example}), an archive, or IDX files."
        )
    if splits:
        _check_train_holds_every_class(root, splits, candidates)
    return candidates, skipped, quarantined


def _walk(root: Path, source: Path) -> list[tuple[Path, str]]:
    """Every file under `root`, sorted, with why it cannot be used ('' when it can).

    Symbolic links are followed while they stay inside `source`, the same rule `download.labels` applies:
    a file link leading outside is quarantined, a folder link leading outside stops the run naming it
    (a whole class would go missing otherwise).
    """
    inside = source.resolve()
    found: list[tuple[Path, str]] = []

    def visit(directory: Path, ancestors: frozenset[Path]) -> None:
        if directory.resolve() in ancestors:
            return  # a link back up the tree
        ancestors |= {directory.resolve()}
        for entry in sorted(directory.iterdir()):
            target = entry.resolve()
            if entry.is_symlink() and not entry.exists():
                found.append((entry, f"broken symbolic link to {target}"))
            elif entry.is_symlink() and not target.is_relative_to(inside):
                if entry.is_dir() and not entry.name.startswith((".", "__MACOSX")):
                    raise DownloadError(
                        f"{entry}: a symbolic link to the folder {target}, outside the source {source}. Links "
                        f"are followed only inside the source: copy that folder into {source}, or point "
                        "download.source at a folder that holds the images themselves."
                    )
                if entry.is_file():
                    found.append((entry, f"symbolic link to {target} leads outside the source folder {source}"))
            elif entry.is_dir():
                visit(entry, ancestors)
            elif entry.is_file():
                found.append((entry, ""))

    visit(root, frozenset())
    return found


SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def _split_folders(root: Path) -> dict[str, str]:
    """Folder name -> split for a tree of train/<class>, val/<class>, test/<class>; {} for class folders.

    A split name holding images rather than class folders is a class (e.g. a class called "test").
    """
    dirs = _visible_dirs(root)
    splits = {p.name: SPLIT_FOLDERS[p.name.lower()] for p in dirs
              if p.name.lower() in SPLIT_FOLDERS and _visible_dirs(p)}
    others = [f"{p.name}/" for p in dirs if p.name not in splits]
    if splits and others:
        raise DownloadError(
            f"{root}: split folders ({', '.join(f'{name}/' for name in splits)}) sit beside other folders "
            f"({', '.join(others)}). A pre-split source holds only train/, val/ (or valid/, validation/) and "
            f"test/, each with one folder per class (e.g. {root / 'train' / 'cat'}); a plain source holds only "
            f"class folders. Move {', '.join(others)} into the split folders, or out of {root}."
        )
    return splits


def _check_train_holds_every_class(root: Path, splits: dict[str, str], candidates: list[Candidate]) -> None:
    """A class met only in val/ or test/ could never be learned: name it rather than train without it."""
    trained = {c.label for c in candidates if c.source_split == "train"}
    folders = {split: name for name, split in splits.items()}
    for candidate in candidates:
        if candidate.label not in trained:
            where = Path(candidate.origin).relative_to(root).parts[0]
            train = folders.get("train", "train")
            raise DownloadError(
                f"{root}: class {candidate.label!r} has images in {where}/ but none in {train}/, so the model "
                f"could never learn it. Add its training images under {root / train / candidate.label}, or "
                f"remove {root / where / candidate.label}."
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
