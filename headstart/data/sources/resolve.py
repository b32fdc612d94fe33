"""`download.source` resolved into candidates: a preset, a URL, an archive, an IDX folder or a class folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headstart.data.sources.archives import archive_format, safe_extract
from headstart.data.sources.candidates import Candidate, DownloadError
from headstart.data.sources.fetch import fetch_url, pin_file, pin_first_use, url_cache_path
from headstart.data.sources.folders import folder_candidates
from headstart.data.sources.idx import find_idx, idx_candidates
from headstart.data.sources.labels import find_labels_file, labelled_images
from headstart.data.sources.presets import load_presets
from headstart.files import sha256_file
from headstart.layout import Layout
from headstart.params import DownloadParams
from headstart.web import is_url


@dataclass
class Resolved:
    """A source's candidates, the files skipped (hidden, not images, unlabelled), the per-class counts
    before sampling when the source sampled itself (IDX), label-file rows that cannot be used and the
    images a label file leaves out."""

    candidates: list[Candidate]
    skipped: int = 0
    available: dict[str, int] | None = None
    quarantined: list[dict[str, str]] = field(default_factory=list)
    unlisted: int = 0


def source_kind(source: str, presets: dict[str, dict[str, Any]], layout: Layout) -> str:
    """What `download.source` names: preset, url, archive, idx (a folder of IDX files) or folder."""
    if not source.strip():
        raise DownloadError(
            "download.source is empty: set it to a preset name, a folder of class sub-folders, an archive or "
            f"an http(s) URL. Presets: {', '.join(sorted(presets))}"
        )
    if source in presets:
        return "preset"
    if is_url(source):
        return "url"
    path = Path(source).expanduser()
    if not path.exists():
        raise DownloadError(
            f"download.source {source!r}: no such preset, folder or file. Presets: {', '.join(sorted(presets))}"
        )
    _check_outside_project(source, path, layout)
    if path.is_file():
        if archive_format(path) is None:
            raise DownloadError(f"download.source {source!r}: a file must be a zip or tar archive "
                                "(.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)")
        return "archive"
    return "idx" if _is_idx(path) else "folder"


def resolve_candidates(params: DownloadParams, layout: Layout, per_class: int | None) -> Resolved:
    """Candidates for `download.source`; `per_class` is the effective download.max_images_per_class."""
    presets = load_presets()
    source = params.source
    kind = source_kind(source, presets, layout)
    if params.labels is not None and kind in ("preset", "idx"):
        raise DownloadError(
            f"download.labels={params.labels!r} labels a folder or archive source, but download.source "
            f"{source!r} names its own labels: set download.labels to null"
        )
    if kind == "preset":
        preset = presets[source]
        if preset["kind"] == "idx":
            folder = _idx_folder(source, preset, params, layout)
            return Resolved(*idx_candidates(folder, preset.get("classes"), per_class, params.sample_seed))
        return _url_candidates(preset["url"], preset.get("sha256"), preset, params, layout)
    if kind == "url":
        return _url_candidates(source, params.sha256, {}, params, layout)
    path = Path(source).expanduser()
    if kind == "archive":
        if params.sha256 and sha256_file(path) != params.sha256:
            raise DownloadError(f"{path}: sha256 does not match download.sha256={params.sha256}")
        return _labelled(_extract(path, {}, params, layout), {}, params, layout, archive=str(path))
    if kind == "idx":
        return Resolved(*idx_candidates(path, None, per_class, params.sample_seed))
    return _labelled(path, {}, params, layout)


def _check_outside_project(source: str, path: Path, layout: Layout) -> None:
    """A source that is or holds the project would read the pipeline's own outputs as classes."""
    project = layout.root.resolve()
    if path.is_dir() and project.is_relative_to(path.resolve()):
        what = "the project folder" if path.resolve() == project else "a folder holding the project folder"
        raise DownloadError(
            f"download.source {source!r} is {what} {project}, whose data/, models/ and reports/ would be read "
            "as classes: point it at the folder of your images"
        )


def _is_idx(path: Path) -> bool:
    return path.is_dir() and bool(find_idx(path, "train", "images") or find_idx(path, "t10k", "images"))


def _labelled(folder: Path, preset: dict[str, Any], params: DownloadParams, layout: Layout,
              archive: str | None = None) -> Resolved:
    """Labels from download.labels when set, else from the class folders (of `archive`, when extracted)."""
    if params.labels is None:
        candidates, skipped, quarantined = folder_candidates(folder, preset, archive)
        return Resolved(candidates, skipped, quarantined=quarantined)
    found = labelled_images(find_labels_file(params.labels, layout.root, folder), folder)
    return Resolved(found.candidates, quarantined=found.quarantined, unlisted=found.unlisted)


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
) -> Resolved:
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
    return _labelled(folder, preset, params, layout, archive=url)


def _extract(archive: Path, preset: dict[str, Any], params: DownloadParams, layout: Layout) -> Path:
    root = layout.extract_dir
    folder = safe_extract(archive, root / sha256_file(archive)[:16], params.max_archive_bytes,
                          params.max_archive_members)
    inner = preset.get("inner_archive")
    if inner:
        folder = safe_extract(folder / inner, root / f"{sha256_file(folder / inner)[:16]}",
                              params.max_archive_bytes, params.max_archive_members)
    return folder
