"""Labels from a CSV or TSV file (`download.labels`) beside a folder or archive source.

The file has a header row naming `path` and `label` (and optionally `split`); each path is a file inside
the source. A row that cannot be used is quarantined with its line number and reason, never guessed at;
images the file does not list are left out.
"""

from __future__ import annotations

import csv
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from headstart.data.images import is_candidate_image
from headstart.data.sources.candidates import Candidate, DownloadError, label_problem
from headstart.data.sources.folders import SPLIT_FOLDERS, dataset_root

EXPECTED = ("Expected a CSV file (tab-separated when named .tsv or .tab) whose header row names the columns "
            "path and label, and optionally split (train, val or test).")


@dataclass
class LabelledImages:
    """What a labels file gives: the listed images, its unusable rows, and how many images it leaves out."""

    candidates: list[Candidate]
    quarantined: list[dict[str, str]]
    unlisted: int


def find_labels_file(value: str, project_root: Path, source: Path) -> Path:
    """`download.labels` as given (absolute), else relative to the project root, else inside the source."""
    given = Path(value).expanduser()
    places = [given] if given.is_absolute() else [project_root / given, source / given, dataset_root(source) / given]
    for place in dict.fromkeys(places):
        if place.is_file():
            return place
    looked = ", ".join(str(p) for p in dict.fromkeys(places))
    raise DownloadError(f"download.labels {value!r}: no such file (looked for {looked}). {EXPECTED}")


def _read_rows(labels_file: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, {column: stripped value}) for every non-blank row."""
    delimiter = "\t" if labels_file.suffix.lower() in (".tsv", ".tab") else ","
    try:
        with open(labels_file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = [name.strip().lower() for name in next(reader, [])]
            missing = [name for name in ("path", "label") if name not in header]
            if missing:
                raise DownloadError(
                    f"{labels_file}: its header row {header} lacks the column(s) {', '.join(missing)}. {EXPECTED}"
                )
            rows = []
            for fields in reader:
                if any(field.strip() for field in fields):
                    values = dict(zip(header, (field.strip() for field in fields), strict=False))
                    rows.append((reader.line_num, values))
            return rows
    except UnicodeDecodeError as exc:
        raise DownloadError(f"{labels_file}: not UTF-8 text ({exc}); save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DownloadError(f"{labels_file}: not a readable CSV/TSV file ({exc}). {EXPECTED}") from None


def _locate(text: str, bases: list[Path]) -> tuple[Path | None, str]:
    """The file a row names, or None and why not: it must lie inside the source (the first base)."""
    inside = bases[0].resolve()
    for base in bases:
        target = (base / text.replace("\\", "/")).resolve()
        if not target.is_relative_to(inside):
            return None, f"path leaves the source folder {bases[0]}"
        if target.is_file():
            return target, ""
    return None, f"no such file in the source {bases[0]}"


def _label_problem(values: dict[str, str]) -> str:
    label, split = values.get("label", ""), values.get("split", "")
    problem = label_problem(label)
    if problem:
        return problem
    if split and split.lower() not in SPLIT_FOLDERS:
        return f"split {split!r} is not train, val (valid, validation) or test, nor empty"
    return ""


def labelled_images(labels_file: Path, source: Path) -> LabelledImages:
    """The images `labels_file` lists inside `source` (a folder or an extracted archive)."""
    bases = list(dict.fromkeys([source, dataset_root(source)]))
    quarantined: list[dict[str, str]] = []
    named: set[Path] = set()
    listed: dict[Path, list[tuple[int, dict[str, str]]]] = defaultdict(list)
    rows = _read_rows(labels_file)
    for line, values in rows:
        target, problem = _locate(values["path"], bases) if values.get("path") else (None, "empty path")
        if target is not None:
            named.add(target)
            problem = _label_problem(values)
        if problem or target is None:
            quarantined.append(_quarantine(labels_file, line, values, problem))
        else:
            listed[target].append((line, values))
    candidates = []
    for target, rows in listed.items():
        meanings = {(unicodedata.normalize("NFC", v["label"]), SPLIT_FOLDERS.get(v.get("split", "").lower(), "")) for _, v in rows}
        if len(meanings) > 1:
            lines = ", ".join(str(line) for line, _ in rows)
            spelled = ", ".join(sorted(f"{label} ({split})" if split else label for label, split in meanings))
            quarantined += [_quarantine(labels_file, line, values,
                                        f"listed on lines {lines} with different labels or splits: {spelled}")
                            for line, values in rows]
            continue
        (label, split), = meanings
        candidates.append(Candidate(label=label, name=target.name, origin=str(target), path=target, source_split=split))
    if not candidates:
        reasons = "; ".join(f"{q['origin'].removeprefix(f'{labels_file} ')}: {q['reason']}" for q in quarantined[:3])
        raise DownloadError(
            f"{labels_file}: none of its {len(rows)} rows can be used"
            + (f" ({reasons}{'; ...' if len(quarantined) > 3 else ''})" if reasons else "")
            + f". {EXPECTED} Paths are relative to the source {source}."
        )
    images = {p.resolve() for p in source.rglob("*") if p.is_file() and is_candidate_image(p)}
    return LabelledImages(candidates, quarantined, len(images - named))


def _quarantine(labels_file: Path, line: int, values: dict[str, str], reason: str) -> dict[str, str]:
    return {"origin": f"{labels_file} line {line}: {values.get('path', '')}", "label": values.get("label", ""),
            "reason": reason}
