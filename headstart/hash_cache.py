"""A persistent file -> sha256 cache keyed on (path, size, mtime_ns, ctime_ns), so checking an unchanged
folder stats every file but reads none.

It lives in one SQLite file (transactions make every write atomic, and concurrent processes wait for
each other's lock). ctime joins the key because a copy that keeps the mtime (`cp -p`, `rsync -t`) cannot
keep the ctime. A file modified less than `RACY_S` before the scan is hashed but not recorded: within
the file system's timestamp resolution a second write could leave size and times unchanged (git's
"racy" entries).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from types import TracebackType

from headstart.files import sha256_file

log = logging.getLogger(__name__)

RACY_S = 2.0
_SCHEMA = ("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
           "mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL) WITHOUT ROWID")


class HashCache:
    """`with HashCache(db) as cache: cache.digest(path)`; `misses` counts the files actually read."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.misses = 0
        self._known: dict[str, tuple[int, int, int, str]] = {}
        self._new: list[tuple[str, int, int, int, str]] = []
        self._connection: sqlite3.Connection | None = None
        self._racy_after_ns = 0

    def __enter__(self) -> HashCache:
        self.db.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connection = self._open()
        except sqlite3.DatabaseError as exc:  # damaged: it only saves reading, so start it afresh
            log.warning("%s is not a usable hash cache (%s); starting a new one", self.db, exc)
            self.db.unlink()
            self._connection = self._open()
        self._racy_after_ns = time.time_ns() - int(RACY_S * 1e9)
        return self

    def _open(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.db, timeout=60)
        try:
            connection.execute(_SCHEMA)
            connection.execute("SELECT COUNT(*) FROM hashes").fetchone()
        except sqlite3.DatabaseError:
            connection.close()
            raise
        return connection

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._connection is not None
        try:
            if self._new:
                with self._connection:  # one transaction: all of this scan's entries or none
                    self._connection.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", self._new)
        finally:
            self._connection.close()

    def preload(self, folder: Path) -> None:
        """Read every entry under `folder` in one query (a folder check then asks SQLite nothing per file)."""
        assert self._connection is not None
        prefix = os.path.join(os.path.abspath(folder), "")
        rows = self._connection.execute(
            "SELECT path, size, mtime_ns, ctime_ns, sha256 FROM hashes WHERE path >= ? AND path < ?",
            (prefix, prefix[:-1] + chr(ord(os.sep) + 1)),
        )
        self._known.update((path, (size, mtime, ctime, sha)) for path, size, mtime, ctime, sha in rows)

    def digest(self, path: Path | str, stat: os.stat_result | None = None) -> str:
        """The file's sha256, read only when its size or times differ from the recorded ones."""
        key = path if isinstance(path, str) and os.path.isabs(path) else os.path.abspath(path)
        stat = stat or os.stat(path)
        signature = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        known = self._known.get(key) or self._lookup(key)
        if known is not None and known[:3] == signature:
            return known[3]
        self.misses += 1
        sha = sha256_file(path)
        if stat.st_mtime_ns < self._racy_after_ns and stat.st_ctime_ns < self._racy_after_ns:
            self._new.append((key, *signature, sha))
        return sha

    def _lookup(self, key: str) -> tuple[int, int, int, str] | None:
        assert self._connection is not None
        row = self._connection.execute(
            "SELECT size, mtime_ns, ctime_ns, sha256 FROM hashes WHERE path = ?", (key,)
        ).fetchone()
        return tuple(row) if row else None
