"""download stage: bring a labelled image source into `data/raw/<class>/<image>` plus a manifest.

Sources (headstart/data/sources/): a preset from `presets.yaml`, a local folder of class sub-folders, an archive path or an
http(s) URL (zip or tar, plain or gzip/bz2/xz compressed; recognised by content, not by name), or a
folder of IDX files. Every image is decoded once with Pillow; unusable files are listed in
`data/quarantine.csv` with the reason instead of crashing later stages. The user's source files are
only ever read.
"""

from __future__ import annotations

import csv
import logging
import random
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headstart.data.images import ImageError, inspect_image
from headstart.data.manifest import RAW_COLUMNS
from headstart.data.sources.candidates import Candidate, DownloadError, one_class
from headstart.data.sources.presets import effective_settings
from headstart.data.sources.resolve import resolve_candidates
from headstart.files import atomic_directory, atomic_path, atomic_write_json, exclusive, remove_stale_temps
from headstart.layout import Layout
from headstart.params import Params

log = logging.getLogger(__name__)

QUARANTINE_COLUMNS = ("origin", "label", "reason")


@dataclass
class Accepted:
    candidate: Candidate
    sha256: str
    width: int
    height: int
    mode: str


def _validate(candidates: list[Candidate], max_pixels: int) -> tuple[list[Accepted], list[dict[str, str]]]:
    accepted, quarantined = [], []
    for candidate in candidates:
        try:
            info = inspect_image(candidate.data if candidate.data is not None else candidate.source_file, max_pixels)
        except ImageError as exc:
            quarantined.append({"origin": candidate.origin, "label": candidate.label, "reason": str(exc)})
            continue
        accepted.append(Accepted(candidate, candidate.content_hash(), info.width, info.height, info.mode))
    return accepted, quarantined


def _deduplicate(accepted: list[Accepted]) -> tuple[list[Accepted], list[dict[str, str]]]:
    """Keep one copy of identical content; content carrying two labels is a label conflict and is left out."""
    by_hash: dict[str, list[Accepted]] = defaultdict(list)
    for item in accepted:
        by_hash[item.sha256].append(item)
    kept, reported = [], []
    for copies in by_hash.values():
        labels = sorted({c.candidate.label for c in copies})
        if len(labels) > 1:
            others = ", ".join(c.candidate.origin for c in copies)
            for copy in copies:
                reported.append({"origin": copy.candidate.origin, "label": copy.candidate.label,
                                 "reason": f"label conflict: identical content labelled {' and '.join(labels)} ({others})"})
            continue
        kept.append(copies[0])
        for copy in copies[1:]:
            reported.append({"origin": copy.candidate.origin, "label": copy.candidate.label,
                             "reason": f"duplicate of {copies[0].candidate.origin}"})
    return kept, reported


def _sample(items: list[Accepted], per_class: int | None, seed: int) -> list[Accepted]:
    if per_class is None:
        return items
    by_label: dict[str, list[Accepted]] = defaultdict(list)
    for item in items:
        by_label[item.candidate.label].append(item)
    rng = random.Random(seed)
    sampled = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda item: item.sha256)
        sampled.extend(group if len(group) <= per_class else rng.sample(group, per_class))
    return sampled


def _check_classes(items: list[Accepted], minimum: int, layout: Layout,
                   duplicates: list[dict[str, str]]) -> Counter:
    """At least two classes, none too small (naming the copies left out), none named like the manifest."""
    counts = Counter(item.candidate.label for item in items)
    if not counts:
        raise DownloadError(f"no usable images: every one was quarantined (reasons in {layout.quarantine})")
    if len(counts) < 2:
        raise DownloadError(one_class(next(iter(counts))))
    for reserved in (layout.raw_manifest, layout.raw_sample):
        if reserved.name in counts:
            origin = next(item.candidate.origin for item in items if item.candidate.label == reserved.name)
            raise DownloadError(
                f"a class is named {reserved.name!r} (e.g. {origin}), which would collide with {reserved}: "
                "rename that class folder"
            )
    small = {label: n for label, n in sorted(counts.items()) if n < minimum}
    if small:
        copies = Counter(row["label"] for row in duplicates)
        listing = ", ".join(f"'{label}' has {n}" + (f" ({copies[label]} more were byte copies of these, listed "
                                                     f"in {layout.quarantine})" if copies[label] else "")
                            for label, n in small.items())
        raise DownloadError(
            f"too few valid images to split: {listing} (download.min_images_per_class={minimum}). "
            "Add images to these classes, remove them, or lower the threshold."
        )
    return counts


def _write_raw(items: list[Accepted], layout: Layout, sample: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    with atomic_directory(layout.raw_dir) as staging:
        taken: set[str] = set()
        for item in sorted(items, key=lambda i: (i.candidate.label, i.candidate.name, i.sha256)):
            candidate = item.candidate
            name = candidate.name
            if f"{candidate.label}/{name}" in taken:
                name = f"{Path(name).stem}-{item.sha256[:8]}{Path(name).suffix}"
            taken.add(f"{candidate.label}/{name}")
            dest = staging / candidate.label / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if candidate.data is not None:
                dest.write_bytes(candidate.data)
            else:
                shutil.copyfile(candidate.source_file, dest)
            rows.append({
                "path": (layout.raw_dir / candidate.label / name).relative_to(layout.root).as_posix(),
                "label": candidate.label, "sha256": item.sha256, "width": item.width, "height": item.height,
                "mode": item.mode, "source_split": candidate.source_split, "origin": candidate.origin,
            })
        _write_csv(staging / layout.raw_manifest.name, RAW_COLUMNS, rows)
        atomic_write_json(staging / layout.raw_sample.name, sample)
    return rows


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _sample_record(selected: list[Accepted], available: dict[str, int], per_class: int | None) -> dict[str, Any]:
    kept = Counter(item.candidate.label for item in selected)
    return {"max_images_per_class": per_class,
            "per_class": {label: {"kept": kept[label], "available": available.get(label, kept[label])}
                          for label in sorted(kept)}}


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """Fetch, validate, de-duplicate and (optionally) sample the source into data/raw, one run at a time."""
    with exclusive(layout.download_lock, "download"):
        return _download(params, layout)


def _download(params: Params, layout: Layout) -> dict[str, Any]:
    p = params.download
    per_class = effective_settings(params).max_images_per_class
    started = time.perf_counter()
    remove_stale_temps(layout.raw_dir, layout.quarantine, layout.extract_dir / "*")
    resolved = resolve_candidates(p, layout, per_class)
    accepted, quarantined = _validate(resolved.candidates, p.max_image_pixels)
    kept, duplicates = _deduplicate(accepted)
    quarantined = resolved.quarantined + quarantined + duplicates
    _write_csv(layout.quarantine, QUARANTINE_COLUMNS, quarantined)
    presampled = resolved.available is not None
    selected = kept if presampled else _sample(kept, per_class, p.sample_seed)
    counts = _check_classes(selected, p.min_images_per_class, layout, duplicates)
    sample = _sample_record(selected, resolved.available or Counter(item.candidate.label for item in kept), per_class)
    rows = _write_raw(selected, layout, sample)
    summary = {
        "images": len(rows), "classes": len(counts), "quarantined": len(quarantined), "skipped": resolved.skipped,
        "unlisted": resolved.unlisted, "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("download: %d images in %d classes; %d quarantined (see %s); %d non-image files skipped",
             len(rows), len(counts), len(quarantined), layout.quarantine, resolved.skipped)
    log.info("download: sampled per class (kept of available, download.max_images_per_class=%s): %s",
             per_class, ", ".join(f"{label} {n['kept']}/{n['available']}" for label, n in sample["per_class"].items()))
    if resolved.unlisted:
        log.info("download: %d images in the source are not listed in %s and were left out",
                 resolved.unlisted, p.labels)
    return summary
