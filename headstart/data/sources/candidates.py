"""A labelled image before validation, and the error every source raises."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

from headstart.files import sha256_bytes, sha256_file


class DownloadError(ValueError):
    """A source that cannot be fetched, verified or unpacked; the message names it and what to do."""


class TransientDownloadError(DownloadError):
    """A transfer that failed after its retries (network trouble); the partial file is kept for a rerun."""


MAX_LABEL_BYTES = 255  # a class becomes a folder name: most file systems allow 255 bytes
ALLOWED_LABELS = ("a class name may hold letters, digits, spaces, tabs and punctuation in any script, but no line "
                  "break or other control character, no / or \\, is not . or .., and is at most "
                  f"{MAX_LABEL_BYTES} bytes in UTF-8")


def label_problem(label: str) -> str:
    """Why `label` cannot name a class ('' when it can): it becomes a folder name and a line of labels.txt."""
    if not label:
        return "empty label"
    if any(char in "/\\" or (unicodedata.category(char) in ("Cc", "Zl", "Zp") and char != "\t") for char in label):
        return f"class name {label!r} holds a line break, control character, / or \\ ({ALLOWED_LABELS})"
    if label in (".", ".."):
        return f"class name {label!r} cannot be a folder name ({ALLOWED_LABELS})"
    size = len(label.encode("utf-8"))
    if size > MAX_LABEL_BYTES:
        return (f"class name {label[:40]!r}... is {size} bytes in UTF-8, over the {MAX_LABEL_BYTES}-byte limit of a "
                "folder name: shorten it")
    return ""


@dataclass
class Candidate:
    """One labelled image before validation: either a file on disk or encoded bytes."""

    label: str
    name: str
    origin: str
    path: Path | None = None
    data: bytes | None = None
    source_split: str = ""

    def __post_init__(self) -> None:
        # one spelling per class: "café" typed as é or as e + combining accent is one class
        self.label = unicodedata.normalize("NFC", self.label)

    def content_hash(self) -> str:
        return sha256_bytes(self.data) if self.data is not None else sha256_file(self.source_file)

    @property
    def source_file(self) -> Path:
        """The file a candidate without bytes of its own reads from."""
        if self.path is None:
            raise ValueError(f"{self.origin}: a candidate needs a path or bytes")
        return self.path


def one_class(label: str) -> str:
    return (f"only one class found: {label}; a classifier needs at least two "
            "(one sub-folder of images per class)")
