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
import stat
from pathlib import Path
from typing import Any

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
    kind = source_kind(params.source, presets)
    path = Path(params.source).expanduser()
    content: dict[str, Any] = {"kind": kind}
    if kind == "preset":
        preset = presets[params.source]
        if "version" not in preset:
            raise DownloadError(f"preset {params.source!r} in presets.yaml has no version: add `version: 1`")
        content["preset"] = {"name": params.source, "version": preset["version"]}
    elif kind == "url":
        content["sha256"] = params.sha256 or _url_digest(params, layout, cache)
    elif kind == "archive":
        content["sha256"] = _digest(path, cache)
    else:
        content["files"] = folder_hashes(path, cache, images_only=kind == "folder")
    if params.labels is not None and kind not in ("preset", "idx"):
        content["labels"] = _labels_digest(params.labels, layout, path if kind == "folder" else None, cache)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {**content, "source": params.source, "digest": hashlib.sha256(canonical.encode()).hexdigest()}


def folder_hashes(folder: Path, cache: HashCache, images_only: bool = True) -> dict[str, str]:
    """relative path -> sha256 of every file download would read under `folder`, sorted by path."""
    cache.preload(folder)
    found: dict[str, str] = {}
    for top, dirs, files in os.walk(folder, onerror=_walk_error):
        dirs[:] = [name for name in dirs if not name.startswith(".") and name != "__MACOSX"]
        for name in files:
            path = Path(top, name)
            relative = path.relative_to(folder)
            if (images_only and not is_source_image(relative)) or name.startswith("."):
                continue
            try:
                info = path.stat()
            except FileNotFoundError:  # a dangling link, which download skips too
                continue
            if stat.S_ISREG(info.st_mode):
                found[relative.as_posix()] = _digest(path, cache, info)
    return dict(sorted(found.items()))


def _digest(path: Path, cache: HashCache, info: os.stat_result | None = None) -> str:
    try:
        return cache.digest(path, info)
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _walk_error(exc: OSError) -> None:
    raise _unreadable(exc.filename, exc) from None


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
