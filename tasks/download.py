"""download stage: bring a labelled image source into `data/raw/<class>/<image>` plus a manifest.

Sources: a preset from `presets.yaml`, a local folder of class sub-folders, an archive path or an
http(s) URL (zip or tar, plain or gzip/bz2/xz compressed; recognised by content, not by name), or a
folder of IDX files. Every image is decoded once with Pillow; unusable files are listed in
`data/quarantine.csv` with the reason instead of crashing later stages. The user's source files are
only ever read.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import lzma
import random
import re
import shutil
import tarfile
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests
import urllib3
import yaml
from filelock import FileLock
from PIL import Image
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from headstart.data.images import ImageError, inspect_image, is_candidate_image
from headstart.files import (
    atomic_directory,
    atomic_path,
    atomic_write_text,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
)
from headstart.layout import Layout
from headstart.params import DownloadParams, Params

log = logging.getLogger(__name__)

PRESETS_FILE = Path(__file__).parents[1] / "headstart" / "data" / "presets.yaml"
MANIFEST_COLUMNS = ("path", "label", "sha256", "width", "height", "mode", "source_split", "origin")
QUARANTINE_COLUMNS = ("origin", "label", "reason")


class DownloadError(ValueError):
    """A source that cannot be fetched, verified or unpacked; the message names it and what to do."""


# --------------------------------------------------------------------------- presets


def load_presets() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(PRESETS_FILE.read_text())


# --------------------------------------------------------------------------- fetching


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), transient=True,
    )


def url_cache_path(downloads_dir: Path, url: str) -> Path:
    """Where a URL's download is kept: keyed on the whole URL (query included), named for people."""
    name = Path(urlparse(url).path).name[:100] or "download"
    return downloads_dir / f"{sha256_bytes(url.encode())[:16]}-{name}"


def pin_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def pin_first_use(dest: Path) -> None:
    """Trust on first use: record the digest of a download that has proved to be a usable archive."""
    if not pin_file(dest).exists():
        digest = sha256_file(dest)
        atomic_write_text(pin_file(dest), digest + "\n")
        log.warning("%s has no pinned sha256; recorded %s in %s", dest, digest, pin_file(dest))


def fetch_url(url: str, dest: Path, sha256: str | None, timeout_s: float = 60.0, retries: int = 4) -> Path:
    """Stream `url` to `dest`, resuming a partial `.part` file, retrying with backoff, checking sha256.

    When `sha256` is None and `pin_first_use` pinned an earlier download, the new one must match that
    pin. A lock beside `dest` makes concurrent fetches of one URL wait for each other instead of
    writing the same `.part` file.
    """
    if urlparse(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http and https URLs are supported")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.with_name(dest.name + ".lock")):
        pinned = sha256 is None and pin_file(dest).exists()
        expected = pin_file(dest).read_text().strip() if pinned else sha256
        if not (dest.exists() and (expected is None or sha256_file(dest) == expected)):
            _fetch_verified(url, dest, expected, pinned, timeout_s, retries)
    return dest


def _fetch_verified(
    url: str, dest: Path, expected: str | None, pinned: bool, timeout_s: float, retries: int
) -> None:
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _stream_to(url, part, timeout_s)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError, _RetryableHTTP) as exc:
            if attempt == retries:
                raise DownloadError(
                    f"{url}: download failed after {retries + 1} attempts ({exc}). The partial file "
                    f"{part} is kept and the next run resumes from it."
                ) from None
            delay = min(2**attempt, 30)
            log.warning("download of %s interrupted (%s); retrying in %ss", url, exc, delay)
            time.sleep(delay)
    actual = sha256_file(part)
    if expected is not None and actual != expected:
        part.unlink()
        advice = (
            f"{pin_file(dest)} pinned the first download of this URL; if the file there changed on purpose, "
            f"delete {pin_file(dest)} (or set download.sha256) and rerun." if pinned
            else "Check the URL and the expected checksum (download.sha256 or the preset)."
        )
        raise DownloadError(
            f"{url}: sha256 mismatch: expected {expected}, got {actual}. The download was deleted. {advice}"
        )
    part.replace(dest)


class _RetryableHTTP(Exception):
    pass


def _stream_to(url: str, part: Path, timeout_s: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        if response.status_code == 416:  # already complete
            return
        if response.status_code >= 500:
            raise _RetryableHTTP(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason}")
        if response.status_code != 206:
            offset = 0  # server ignored the range: start over
        total = response.headers.get("Content-Length")
        total_bytes = int(total) + offset if total is not None else None
        with open(part, "ab" if offset else "wb") as handle, _progress() as bar:
            task = bar.add_task(f"download {Path(urlparse(url).path).name}", total=total_bytes, completed=offset)
            # read1 returns whatever has arrived, so a dropped connection loses none of it
            while chunk := response.raw.read1(1 << 16):
                handle.write(chunk)
                bar.advance(task, len(chunk))
        if total_bytes is not None and part.stat().st_size < total_bytes:
            raise requests.exceptions.ChunkedEncodingError(
                f"connection closed at {part.stat().st_size} of {total_bytes} bytes"
            )


# --------------------------------------------------------------------------- archives


def _check_member_path(archive: Path, name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in path.parts:
        raise DownloadError(f"{archive}: refusing member {name!r}: its path leaves the extraction folder")
    return path


def archive_format(path: Path) -> str | None:
    """"zip" or "tar" (plain or gzip/bz2/xz compressed) from the file's first bytes; None otherwise."""
    with open(path, "rb") as handle:
        head = handle.read(262)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip with members, an empty zip
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    return None


# what a damaged archive raises while it is read (and OSError without an errno: bad gzip or bz2 data)
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)


def safe_extract(archive: Path, target: Path, max_bytes: int, max_members: int) -> Path:
    """Extract into `target` (built atomically), refusing anything that could escape it or explode."""
    if (target / ".complete").exists():
        return target
    kind = archive_format(archive)
    if kind is None:
        with open(archive, "rb") as handle:
            head = handle.read(32)
        raise DownloadError(
            f"{archive}: not a zip or tar archive (it begins {head!r}); check that the source is the archive "
            "itself and not a web page about it"
        )
    try:
        with atomic_directory(target) as staging:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, staging, max_bytes, max_members)
            (staging / ".complete").touch()
    except _CORRUPT as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk (full, read-only), not the archive
        raise DownloadError(
            f"{archive}: truncated or corrupt {kind} archive ({type(exc).__name__}: {exc}); the file is "
            "damaged: download or copy it again"
        ) from None
    return target


def _budget(archive: Path, written: int, max_bytes: int) -> None:
    if written > max_bytes:
        raise DownloadError(
            f"{archive}: uncompressed size exceeds download.max_archive_bytes={max_bytes}; "
            "raise the limit if the archive is trusted"
        )


def _copy_limited(source: Any, dest: Path, archive: Path, written: int, max_bytes: int) -> int:
    with open(dest, "wb") as out:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            written += len(chunk)
            _budget(archive, written, max_bytes)
            out.write(chunk)
    return written


def _extract_zip(archive: Path, staging: Path, max_bytes: int, max_members: int) -> None:
    with zipfile.ZipFile(archive) as bundle:
        members = bundle.infolist()
        if len(members) > max_members:
            raise DownloadError(f"{archive}: {len(members)} members exceed download.max_archive_members={max_members}")
        written = 0
        for member in members:
            relative = _check_member_path(archive, member.filename)
            mode = member.external_attr >> 16
            if mode and (mode & 0o170000) == 0o120000:
                raise DownloadError(f"{archive}: refusing member {member.filename!r}: symbolic link")
            if member.is_dir():
                continue
            dest = staging / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            with bundle.open(member) as source:
                written = _copy_limited(source, dest, archive, written, max_bytes)


def _extract_tar(archive: Path, staging: Path, max_bytes: int, max_members: int) -> None:
    with tarfile.open(archive) as bundle:
        written, count = 0, 0
        for member in bundle:
            count += 1
            if count > max_members:
                raise DownloadError(f"{archive}: more members than download.max_archive_members={max_members}")
            relative = _check_member_path(archive, member.name)
            if member.issym() or member.islnk():
                link = PurePosixPath(member.linkname)
                resolved = link if member.islnk() else relative.parent / link
                if link.is_absolute() or ".." in PurePosixPath(*resolved.parts).parts:
                    raise DownloadError(
                        f"{archive}: refusing member {member.name!r}: link to {member.linkname!r} leaves the archive"
                    )
                continue  # links inside the archive are skipped: the target is extracted on its own
            if member.isdev() or member.isfifo():
                raise DownloadError(f"{archive}: refusing member {member.name!r}: device or fifo file")
            if member.isdir():
                continue
            if not member.isfile():
                continue
            dest = staging / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = bundle.extractfile(member)
            if source is not None:
                written = _copy_limited(source, dest, archive, written, max_bytes)


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One labelled image before validation: either a file on disk or encoded bytes."""

    label: str
    name: str
    origin: str
    path: Path | None = None
    data: bytes | None = None
    source_split: str = ""

    def content_hash(self) -> str:
        return sha256_bytes(self.data) if self.data is not None else sha256_file(self.path)


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
            raise DownloadError(f"{folder}: {_one_class(root.name)}")  # the wrapper folders led into a class
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


def _one_class(label: str) -> str:
    return (f"only one class found: {label}; a classifier needs at least two "
            "(one sub-folder of images per class)")


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


def read_idx(path: Path) -> np.ndarray:
    """Read an MNIST-format IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DownloadError(
            f"{path}: truncated or corrupt gzip file ({exc}); replace it with a complete copy"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DownloadError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DownloadError(f"{path}: IDX header says {shape} but the file holds {len(data) - offset} bytes; truncated?")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path | None:
    matches = sorted(folder.glob(f"{prefix}-{kind}-idx*-ubyte*"))
    return matches[0] if matches else None


def idx_candidates(
    folder: Path, classes: list[str] | None, per_class: int | None, seed: int
) -> list[Candidate]:
    """Images of `train-*` and `t10k-*` IDX pairs as PNG candidates; t10k marked as the shipped test split.

    Sampling happens before PNG encoding (ranked by a seeded hash of the pixels) so a small default
    run does not encode 70,000 images.
    """
    candidates: list[Candidate] = []
    pairs = [(prefix, split) for prefix, split in (("train", ""), ("t10k", "test")) if _find_idx(folder, prefix, "images")]
    if not pairs:
        raise DownloadError(f"{folder}: no IDX files found (expected train-images-idx3-ubyte[.gz] and labels)")
    pool: dict[int, list[tuple[str, np.ndarray, str, int]]] = defaultdict(list)
    for prefix, split in pairs:
        images_file, labels_file = _find_idx(folder, prefix, "images"), _find_idx(folder, prefix, "labels")
        if labels_file is None:
            raise DownloadError(f"{folder}: {images_file.name} has no matching {prefix}-labels-idx1-ubyte file")
        images, labels = read_idx(images_file), read_idx(labels_file)
        if len(images) != len(labels):
            raise DownloadError(f"{folder}: {len(images)} images but {len(labels)} labels in the {prefix} files")
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            rank = sha256_bytes(f"{seed}:".encode() + image.tobytes())
            pool[int(label)].append((rank, image, split, index))
    for label, items in sorted(pool.items()):
        if classes is not None and label >= len(classes):
            raise DownloadError(f"{folder}: label {label} has no class name in the preset ({len(classes)} names)")
        chosen = sorted(items, key=lambda item: item[0])[:per_class] if per_class else items
        name = classes[label] if classes else str(label)
        for _, image, split, index in chosen:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            prefix = "t10k" if split else "train"
            candidates.append(
                Candidate(label=name, name=f"{prefix}-{index:05d}.png", origin=f"{folder}/{prefix}#{index}",
                          data=buffer.getvalue(), source_split=split)
            )
    return candidates


# --------------------------------------------------------------------------- resolving a source


def _is_url(source: str) -> bool:
    return "://" in source


def resolve_candidates(params: DownloadParams, layout: Layout) -> tuple[list[Candidate], int, bool]:
    """Candidates for `download.source`, files skipped, and whether sampling already happened."""
    presets = load_presets()
    source = params.source
    if source in presets:
        preset = presets[source]
        if preset["kind"] == "idx":
            folder = _idx_folder(source, preset, params, layout)
            return idx_candidates(folder, preset.get("classes"), params.max_images_per_class, params.sample_seed), 0, True
        return (*_url_candidates(preset["url"], preset.get("sha256"), preset, params, layout), False)
    if _is_url(source):
        return (*_url_candidates(source, params.sha256, {}, params, layout), False)
    path = Path(source).expanduser()
    if not path.exists():
        raise DownloadError(
            f"download.source {source!r}: no such preset, folder or file. Presets: {', '.join(sorted(presets))}"
        )
    if path.is_file():
        if archive_format(path) is None:
            raise DownloadError(f"download.source {source!r}: a file must be a zip or tar archive "
                                "(.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)")
        if params.sha256 and sha256_file(path) != params.sha256:
            raise DownloadError(f"{path}: sha256 does not match download.sha256={params.sha256}")
        return (*folder_candidates(_extract(path, {}, params, layout)), False)
    if _find_idx(path, "train", "images") or _find_idx(path, "t10k", "images"):
        return idx_candidates(path, None, params.max_images_per_class, params.sample_seed), 0, True
    return (*folder_candidates(path), False)


def _idx_folder(name: str, preset: dict[str, Any], params: DownloadParams, layout: Layout) -> Path:
    local = preset.get("local_dir")
    if local and all((Path(local) / file).exists() for file in preset["files"]):
        return Path(local)
    folder = layout.downloads_dir / name
    for file, digest in preset["files"].items():
        fetch_url(preset["base_url"] + file, folder / file, digest, params.timeout_s, params.retries)
    return folder


def _url_candidates(
    url: str, sha256: str | None, preset: dict[str, Any], params: DownloadParams, layout: Layout
) -> tuple[list[Candidate], int]:
    """Fetch and extract an archive URL; a download without a known digest is pinned only once it has
    extracted, and deleted when it does not, so an error page never becomes the trusted file."""
    dest = url_cache_path(layout.downloads_dir, url)
    archive = fetch_url(url, dest, sha256, params.timeout_s, params.retries)
    trusted = sha256 is not None or pin_file(archive).exists()
    try:
        folder = _extract(archive, preset, params, layout)
    except DownloadError as exc:
        if trusted:
            raise
        archive.unlink(missing_ok=True)
        raise DownloadError(
            f"{exc}. The download from {url} was deleted, so the next run fetches it again."
        ) from None
    if not trusted:
        pin_first_use(archive)
    return folder_candidates(folder, preset)


def _extract(archive: Path, preset: dict[str, Any], params: DownloadParams, layout: Layout) -> Path:
    extract_root = _extract_root(layout)
    folder = safe_extract(archive, extract_root / sha256_file(archive)[:16], params.max_archive_bytes,
                          params.max_archive_members)
    inner = preset.get("inner_archive")
    if inner:
        folder = safe_extract(folder / inner, extract_root / f"{sha256_file(folder / inner)[:16]}",
                              params.max_archive_bytes, params.max_archive_members)
    return folder


def _extract_root(layout: Layout) -> Path:
    return layout.root / "data" / "cache" / "extract"


# --------------------------------------------------------------------------- validation and output


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
            info = inspect_image(candidate.path if candidate.path else candidate.data, max_pixels)
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


def _check_classes(items: list[Accepted], minimum: int, layout: Layout) -> Counter:
    """At least two classes, none too small, and none named like the manifest written beside them."""
    counts = Counter(item.candidate.label for item in items)
    if not counts:
        raise DownloadError(f"no usable images: every one was quarantined (reasons in {layout.quarantine})")
    if len(counts) < 2:
        raise DownloadError(_one_class(next(iter(counts))))
    reserved = layout.raw_manifest.name
    if reserved in counts:
        origin = next(item.candidate.origin for item in items if item.candidate.label == reserved)
        raise DownloadError(
            f"a class is named {reserved!r} (e.g. {origin}), which would collide with {layout.raw_manifest}: "
            "rename that class folder"
        )
    small = {label: n for label, n in sorted(counts.items()) if n < minimum}
    if small:
        listing = ", ".join(f"'{label}' has {n}" for label, n in small.items())
        raise DownloadError(
            f"too few valid images to split: {listing} (download.min_images_per_class={minimum}). "
            "Add images to these classes, remove them, or lower the threshold."
        )
    return counts


def _write_raw(items: list[Accepted], layout: Layout) -> list[dict[str, Any]]:
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
                shutil.copyfile(candidate.path, dest)
            rows.append({
                "path": (layout.raw_dir / candidate.label / name).relative_to(layout.root).as_posix(),
                "label": candidate.label, "sha256": item.sha256, "width": item.width, "height": item.height,
                "mode": item.mode, "source_split": candidate.source_split, "origin": candidate.origin,
            })
        _write_csv(staging / layout.raw_manifest.name, MANIFEST_COLUMNS, rows)
    return rows


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """Fetch, validate, de-duplicate and (optionally) sample the source into data/raw."""
    p = params.download
    started = time.perf_counter()
    remove_stale_temps(layout.raw_dir, layout.quarantine, _extract_root(layout) / "*")
    candidates, skipped, presampled = resolve_candidates(p, layout)
    accepted, quarantined = _validate(candidates, p.max_image_pixels)
    kept, duplicates = _deduplicate(accepted)
    quarantined += duplicates
    _write_csv(layout.quarantine, QUARANTINE_COLUMNS, quarantined)
    selected = kept if presampled else _sample(kept, p.max_images_per_class, p.sample_seed)
    counts = _check_classes(selected, p.min_images_per_class, layout)
    rows = _write_raw(selected, layout)
    summary = {
        "images": len(rows), "classes": len(counts), "quarantined": len(quarantined), "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("download: %d images in %d classes; %d quarantined (see %s); %d non-image files skipped",
             len(rows), len(counts), len(quarantined), layout.quarantine, skipped)
    return summary
