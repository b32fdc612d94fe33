"""The source's fingerprint: a record that changes exactly when the data `download` would read changes.

- folder (class folders, or IDX files): each file's path relative to the folder and its sha256, for the
  files download reads (images by name, nothing hidden; every visible file of an IDX folder);
- archive: the file's sha256;
- URL: the sha256 of what the URL serves now. With `download.sha256` set that is the given digest
  (no request). Otherwise a HEAD request's validators (ETag, Last-Modified, Content-Length) say
  whether the copy in the download cache is current, and it is fetched again only when not
  (headstart/data/sources/fetch.py), so the download stage then finds it in the cache;
- preset: its name and `version` in presets.yaml;
- `download.labels`: the file's sha256 (one inside an archive is covered by the archive's).

Hashes come through a (path, size, mtime_ns, ctime_ns) cache, so an unchanged folder is stat'ed, not
read, and touching a file changes nothing. No time or path outside the source enters the record:
it is byte-identical as long as the data is, which is what lets DVC and Prefect skip download.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from headstart.data.images import is_image_name
from headstart.data.sources.candidates import DownloadError
from headstart.data.sources.fetch import fetch_current, url_cache_path
from headstart.data.sources.folders import is_source_image
from headstart.data.sources.labels import find_labels_file
from headstart.data.sources.presets import load_presets
from headstart.data.sources.resolve import source_kind
from headstart.hash_cache import HashCache
from headstart.layout import Layout
from headstart.params import DownloadParams


def source_fingerprint(params: DownloadParams, layout: Layout, cache: HashCache) -> dict[str, Any]:
    """{kind, source, digest, ...}: `digest` is the sha256 of everything but `source` (content, not place)."""
    presets = load_presets()
    kind = source_kind(params.source, presets, layout)
    path = Path(params.source).expanduser()
    content: dict[str, Any] = {"kind": kind}
    if kind == "preset":
        preset = presets[params.source]
        content["preset"] = {"name": params.source, "version": preset["version"]}
    elif kind == "url":
        content["sha256"] = params.sha256 or _url_digest(params, layout, cache)
    elif kind == "archive":
        content["sha256"] = _digest(path, cache)
    else:
        content["files"] = folder_hashes(path, cache, "labelled" if kind == "folder" and params.labels else kind)
    if params.labels is not None and kind not in ("preset", "idx"):
        content["labels"] = _labels_digest(params.labels, layout, path if kind == "folder" else None, cache)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {**content, "source": params.source, "digest": hashlib.sha256(canonical.encode()).hexdigest()}


def folder_hashes(folder: Path, cache: HashCache, kind: str = "folder") -> dict[str, str]:
    """relative path -> sha256 of every file download would read under `folder`, sorted by path.

    kind "folder": images outside hidden and __MACOSX folders (folders.is_source_image); "labelled": any
    image by name (a labels file may name one anywhere); "idx": every visible file. Strings and
    os.scandir, not pathlib: this runs per file on every check.
    """
    keep = {"folder": is_source_image, "labelled": lambda relative: is_image_name(relative.rsplit("/", 1)[-1]),
            "idx": lambda relative: not relative.rsplit("/", 1)[-1].startswith(".")}[kind]
    root = os.path.abspath(folder)
    cache.preload(Path(root))
    found: dict[str, str] = {}
    pending = [("", root)]
    while pending:
        prefix, directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise _unreadable(directory, exc) from None
        for entry in entries:
            relative = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):  # as rglob: links to folders are not followed
                if kind == "labelled" or not (entry.name.startswith(".") or entry.name == "__MACOSX"):
                    pending.append((relative + "/", entry.path))
            elif keep(relative) and entry.is_file():  # is_file follows links; a dangling one is skipped
                found[relative] = _digest(entry.path, cache, entry)
    return dict(sorted(found.items()))


def render(record: dict[str, Any]) -> str:
    """The record as written: sorted keys, one file per line (diffs read well), C-speed json."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",\n", ": ")) + "\n"


def _digest(path: Path | str, cache: HashCache, entry: os.DirEntry | None = None) -> str:
    try:
        return cache.digest(path, entry.stat() if entry else None)
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path | str, exc: OSError) -> DownloadError:
    return DownloadError(
        f"{path}: cannot read it ({exc.strerror or exc}); make it readable or move it out of download.source"
    )


def _url_digest(params: DownloadParams, layout: Layout, cache: HashCache) -> str:
    dest = fetch_current(params.source, url_cache_path(layout.downloads_dir, params.source), params.timeout_s,
                         params.retries)
    return _digest(dest, cache)


def _labels_digest(value: str, layout: Layout, folder: Path | None, cache: HashCache) -> str | None:
    """The labels file's sha256; None when it is not beside the project but inside an archive source."""
    if folder is not None:
        return _digest(find_labels_file(value, layout.root, folder), cache)
    given = Path(value).expanduser()
    place = given if given.is_absolute() else layout.root / given
    return _digest(place, cache) if place.is_file() else None
