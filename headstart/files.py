"""Small file helpers every stage shares: content hashes and atomic writes.

Outputs are written to a temporary name in the same directory and renamed into place, so an
interrupted stage never leaves a half-written file that a later stage would read as valid.
Temporary names are `.<output name>.tmp-<16 hex digits><suffix>` (a folder retired by a swap:
`.<name>.old-<hex>`), so a later run can recognise what a killed run left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

STALE_TEMP_S = 3600  # a temp file this old was left by a killed run, not by a live concurrent one


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _temp_name(target: Path, kind: str, suffix: str = "") -> Path:
    return target.with_name(f".{target.name}.{kind}-{secrets.token_hex(8)}{suffix}")


@contextmanager
def _naming_disk_errors(target: Path) -> Iterator[None]:
    """A write that fails for lack of space or a read-only disk raises OSError without a file name;
    name the output being written, so the error says where to look."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    The file is created with mode 0o666 so the process umask applies, as for any file the user's
    tools write (mkstemp would make it 0o600 and unreadable to a worker running as another user).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temp_name(target, "tmp", suffix or ".tmp")
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with _naming_disk_errors(target):
            yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | Path, payload: Any) -> None:
    atomic_write_text(target, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in whole when the block succeeds.

    Folders are made with mode 0o777 so the process umask applies (mkdtemp would make them 0o700).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_name(target, "tmp")
    staging.mkdir(0o777)
    try:
        with _naming_disk_errors(target):
            yield staging
        if target.exists():
            retired = _temp_name(target, "old")
            os.replace(target, retired)
            try:
                os.replace(staging, target)
            except OSError:  # keep the previous output rather than none
                os.replace(retired, target)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold `lock_path` for the block; a second run waits for the first, and says so."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("%s: another run in this project holds %s; waiting for it to finish", what, lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def remove_stale_temps(*outputs: Path, older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Remove the temporary files and folders a killed run left beside `outputs`; returns what went.

    A stage calls this first for its own outputs. An output's name may hold `*` (e.g.
    `checkpoints/*`). Only entries older than `older_than_s` go, so a concurrent run keeps its own.
    """
    removed = []
    for output in outputs:
        name = re.escape(output.name).replace(r"\*", ".*")
        pattern = re.compile(rf"\.{name}\.(?:tmp|old)-[0-9a-f]{{16}}(?:\..+)?")
        if not output.parent.is_dir():
            continue
        for entry in output.parent.iterdir():
            if not pattern.fullmatch(entry.name):
                continue
            try:
                if time.time() - entry.lstat().st_mtime < older_than_s:
                    continue
            except FileNotFoundError:  # its run finished and renamed it since the listing
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted run", entry)
            removed.append(entry)
    return removed
