"""`download.source` resolved into candidates: a preset, a URL, an archive, an IDX folder or a class folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from headstart.data.sources.archives import archive_format, safe_extract
from headstart.data.sources.candidates import Candidate, DownloadError
from headstart.data.sources.fetch import fetch_url, pin_file, pin_first_use, url_cache_path
from headstart.data.sources.folders import folder_candidates
from headstart.data.sources.idx import find_idx, idx_candidates
from headstart.files import sha256_file
from headstart.layout import Layout
from headstart.params import DownloadParams

PRESETS_FILE = Path(__file__).parents[1] / "presets.yaml"


def load_presets() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(PRESETS_FILE.read_text())


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
    if find_idx(path, "train", "images") or find_idx(path, "t10k", "images"):
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
    root = extract_root(layout)
    folder = safe_extract(archive, root / sha256_file(archive)[:16], params.max_archive_bytes,
                          params.max_archive_members)
    inner = preset.get("inner_archive")
    if inner:
        folder = safe_extract(folder / inner, root / f"{sha256_file(folder / inner)[:16]}",
                              params.max_archive_bytes, params.max_archive_members)
    return folder


def extract_root(layout: Layout) -> Path:
    return layout.root / "data" / "cache" / "extract"
