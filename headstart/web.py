"""HTTP for every part that fetches a URL: which URLs are allowed, and a bounded in-memory fetch (predict).

The download stage's resumable, retrying transfer into its cache is `headstart.data.sources.fetch.fetch_url`,
built on the same scheme check.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from urllib.parse import urlparse, urlsplit

import requests

URL_SCHEMES = ("http", "https")


class FetchError(ValueError):
    """A URL that could not be downloaded within the limits; the message says why."""


def is_url(text: str) -> bool:
    """Anything with a scheme of two or more letters that is not an existing path (C:\\ stays a path)."""
    scheme = urlsplit(text).scheme
    return len(scheme) > 1 and not Path(text).exists()


def disallowed_scheme(url: str) -> str | None:
    """The URL's scheme unless it is http(s): `file://` and others would reach what a URL source should not."""
    scheme = urlparse(url).scheme.lower()
    return None if scheme in URL_SCHEMES else scheme


class _Transfer:
    """One URL download, run in a worker thread so that the caller can stop waiting at its deadline."""

    def __init__(self, url: str, max_bytes: int, timeout_s: float):
        self.url, self.max_bytes, self.timeout_s = url, max_bytes, timeout_s
        self.response: requests.Response | None = None
        self.body = b""
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.body = self._download()
        except Exception as exc:  # handed to the waiting thread by result()
            self.error = exc

    def _download(self) -> bytes:
        try:
            with requests.get(self.url, stream=True, timeout=self.timeout_s) as response:
                self.response = response
                if response.status_code != 200:
                    raise FetchError(f"HTTP {response.status_code} {response.reason}")
                declared = response.headers.get("Content-Length")
                limit = self.max_bytes
                if declared and declared.isdigit() and int(declared) > limit:
                    raise FetchError(f"{declared} bytes exceeds the {limit}-byte limit (--max-bytes)")
                body = bytearray()
                for chunk in response.iter_content(1 << 16):
                    body += chunk
                    if len(body) > limit:
                        raise FetchError(f"more than {limit} bytes (--max-bytes)")
        except requests.Timeout:  # one socket wait reached timeout_s, so the whole transfer did too
            raise _too_slow(self.timeout_s) from None
        except requests.RequestException as exc:
            raise FetchError(f"download failed: {exc}") from None
        return bytes(body)

    def abort(self) -> None:
        """End a body read in progress now (urllib3 shuts the socket down for exactly this)."""
        if self.response is not None:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                self.response.raw.shutdown()

    def result(self) -> bytes:
        if self.error is not None:
            raise self.error
        return self.body


def _too_slow(timeout_s: float) -> FetchError:
    return FetchError(f"took longer than {timeout_s:g} s (--timeout)")


def fetch_bytes(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """Download an http(s) URL into memory, refusing other schemes, oversize bodies and slow servers.

    `timeout_s` bounds the whole transfer. requests' own timeout bounds each socket wait only, so a
    server trickling a byte a second would never trip it: the transfer runs in a daemon thread that
    is given up at the deadline. Its socket is shut down when the body has started, which stops the
    thread at once; a server still trickling headers keeps it (not the caller) until it stops.
    """
    scheme = disallowed_scheme(url)
    if scheme is not None:
        raise FetchError(f"scheme '{scheme}' is not allowed; only http and https URLs are fetched")
    transfer = _Transfer(url, max_bytes, timeout_s)
    worker = threading.Thread(target=transfer.run, name=f"fetch {url}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        transfer.abort()
        raise _too_slow(timeout_s)
    return transfer.result()
