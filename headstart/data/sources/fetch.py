"""Fetching a URL into the download cache: retries with backoff (urllib3's `Retry` on a requests session),
resume of a partial file, sha256 checks, trust-on-first-use pins, and the server's validators (ETag,
Last-Modified, Content-Length) that tell whether a cached copy is still what the URL serves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import urlparse

import requests
import urllib3
from filelock import FileLock
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from headstart.data.sources.candidates import DownloadError, TransientDownloadError
from headstart.files import atomic_write_json, atomic_write_text, sha256_bytes, sha256_file
from headstart.progress import download_progress
from headstart.web import URL_SCHEMES, disallowed_scheme

log = logging.getLogger(__name__)

_CUT_SHORT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              urllib3.exceptions.HTTPError)


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


VALIDATORS = {"etag": "ETag", "last_modified": "Last-Modified", "content_length": "Content-Length"}
_NO_HEAD = (405, 501)  # servers that do not answer HEAD: they tell nothing, which is not an error


def validators_file(dest: Path) -> Path:
    """The server's validators when `dest` was fetched."""
    return dest.with_name(dest.name + ".validators.json")


def remote_validators(url: str, timeout_s: float = 60.0, retries: int = 4) -> dict[str, str | None]:
    """ETag, Last-Modified and Content-Length of a HEAD request (None for each one the server omits)."""
    if disallowed_scheme(url) is not None:
        raise DownloadError(f"{url}: only http and https URLs are supported")
    with _session(retries, final=_NO_HEAD) as session:
        try:
            response = session.head(url, allow_redirects=True, timeout=timeout_s)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError) as exc:
            raise _failed(url, None, retries + 1, exc) from None
    if response.status_code >= 500 and response.status_code not in _NO_HEAD:
        raise _failed(url, None, retries + 1, f"HTTP {response.status_code}")
    if response.status_code >= 400 and response.status_code not in _NO_HEAD:
        raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason}")
    known = response.status_code < 400
    return {key: response.headers.get(header) if known else None for key, header in VALIDATORS.items()}


def _same_version(recorded: dict[str, str | None], current: dict[str, str | None]) -> bool | None:
    """Whether two sets of validators name the same file: None when they share none to compare."""
    shared = [key for key in VALIDATORS if recorded.get(key) is not None and current.get(key) is not None]
    return all(recorded[key] == current[key] for key in shared) if shared else None


def fetch_current(url: str, dest: Path, timeout_s: float = 60.0, retries: int = 4) -> Path:
    """`fetch_url` for a URL without a known sha256, fetched again when the cached copy may be out of date.

    A HEAD request's validators are compared with those recorded when the copy was fetched. When the
    server announces a new version (a validator differs), the old trust-on-first-use pin goes with the
    old copy and the download stage pins the new one once it has extracted. When there is nothing to
    compare (a server that sends no validators), the URL is fetched again and must match its pin.
    """
    current = remote_validators(url, timeout_s, retries)
    recorded_file = validators_file(dest)
    recorded = json.loads(recorded_file.read_text()) if recorded_file.exists() else {}
    same = _same_version(recorded, current)
    if dest.exists() and not same:
        with FileLock(dest.with_name(dest.name + ".lock")):
            dest.unlink(missing_ok=True)
            if same is False:
                log.warning("%s changed on the server (%s -> %s): fetching the new version; its sha256 is "
                            "pinned again once it has extracted", url, recorded, current)
                pin_file(dest).unlink(missing_ok=True)
            else:
                log.warning("%s sends no ETag, Last-Modified or Content-Length to compare: fetching it again "
                            "to see whether it changed", url)
    fetched = fetch_url(url, dest, None, timeout_s, retries)
    if current != recorded:
        atomic_write_json(recorded_file, current)
    return fetched


def fetch_url(url: str, dest: Path, sha256: str | None, timeout_s: float = 60.0, retries: int = 4) -> Path:
    """Stream `url` to `dest`, resuming a partial `.part` file, retrying with backoff, checking sha256.

    When `sha256` is None and `pin_first_use` pinned an earlier download, the new one must match that
    pin. A lock beside `dest` makes concurrent fetches of one URL wait for each other instead of
    writing the same `.part` file.
    """
    if disallowed_scheme(url) is not None:
        raise DownloadError(f"{url}: only http and https URLs are supported")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.with_name(dest.name + ".lock")):
        pinned = sha256 is None and pin_file(dest).exists()
        expected = pin_file(dest).read_text().strip() if pinned else sha256
        if not (dest.exists() and (expected is None or sha256_file(dest) == expected)):
            _fetch_verified(url, dest, expected, pinned, timeout_s, retries)
    return dest


def _session(retries: int, final: tuple[int, ...] = ()) -> requests.Session:
    """Connection failures and 5xx answers (but the `final` ones) are retried by urllib3, backing off
    0, 1, 2, 4 ... 30 s."""
    retry = Retry(total=retries, backoff_factor=0.5, backoff_max=30, raise_on_status=False,
                  status_forcelist=[status for status in range(500, 600) if status not in final])
    session = requests.Session()
    for scheme in URL_SCHEMES:
        session.mount(f"{scheme}://", HTTPAdapter(max_retries=retry))
    return session


def _failed(url: str, part: Path | None, attempts: int, reason: object) -> TransientDownloadError:
    kept = f" The partial file {part} is kept and the next run resumes from it." if part else ""
    return TransientDownloadError(f"{url}: download failed after {attempts} attempts ({reason}).{kept}")


def _fetch_verified(
    url: str, dest: Path, expected: str | None, pinned: bool, timeout_s: float, retries: int
) -> None:
    part = dest.with_name(dest.name + ".part")
    with _session(retries) as session:
        # Retry covers a request that fails before its body; a body cut short is resumed here with a
        # Range request from the bytes already in `part`, which Retry cannot do
        for attempt in range(retries + 1):
            try:
                _stream_to(session, url, part, timeout_s, retries)
                break
            except _CUT_SHORT as exc:
                if attempt == retries:
                    raise _failed(url, part, retries + 1, exc) from None
                log.warning("download of %s interrupted (%s); resuming", url, exc)
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


def _get(session: requests.Session, url: str, part: Path, offset: int, timeout_s: float,
         retries: int) -> requests.Response:
    """The response once urllib3 has retried what failed before the body began."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        return session.get(url, headers=headers, stream=True, timeout=timeout_s)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError) as exc:
        raise _failed(url, part, retries + 1, exc) from None
    except requests.TooManyRedirects as exc:
        raise DownloadError(f"{url}: redirect loop ({exc}); check the URL in a browser") from None


def _stream_to(session: requests.Session, url: str, part: Path, timeout_s: float, retries: int) -> None:
    offset = part.stat().st_size if part.exists() else 0
    with _get(session, url, part, offset, timeout_s, retries) as response:
        if response.status_code == 416:  # already complete
            return
        if response.status_code >= 500:
            raise _failed(url, part, retries + 1, f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason}")
        if response.status_code != 206:
            offset = 0  # server ignored the range: start over
        total = response.headers.get("Content-Length")
        total_bytes = int(total) + offset if total is not None else None
        with open(part, "ab" if offset else "wb") as handle, download_progress() as bar:
            task = bar.add_task(f"download {Path(urlparse(url).path).name}", total=total_bytes, completed=offset)
            # read1 returns whatever has arrived, so a dropped connection loses none of it
            while chunk := response.raw.read1(1 << 16):
                handle.write(chunk)
                bar.advance(task, len(chunk))
        if total_bytes is not None and part.stat().st_size < total_bytes:
            raise requests.exceptions.ChunkedEncodingError(
                f"connection closed at {part.stat().st_size} of {total_bytes} bytes"
            )
