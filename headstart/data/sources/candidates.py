"""A labelled image before validation, and the error every source raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headstart.files import sha256_bytes, sha256_file


class DownloadError(ValueError):
    """A source that cannot be fetched, verified or unpacked; the message names it and what to do."""



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


def one_class(label: str) -> str:
    return (f"only one class found: {label}; a classifier needs at least two "
            "(one sub-folder of images per class)")
