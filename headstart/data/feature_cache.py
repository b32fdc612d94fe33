"""The content-addressed feature cache: shards of (key, vector) rows under one namespace each.

A namespace holds uniquely named shards written to a temporary name and renamed into place, each
carrying a sha256 of its own contents that is checked before use: a killed run loses at most the
shard it was filling, a damaged shard is dropped and its images computed again, and concurrent
runs never write the same file. `index.json` (which keys live in which shard) only saves opening
every shard; it is rebuilt from the shards whenever it is missing or out of date.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headstart.files import STALE_TEMP_S, atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

GATHER_ROWS = 2048  # rows assembled and written at a time
OPEN_SHARDS = 8  # shards kept in memory while assembling


class CorruptShard(ValueError):
    pass


def _digest(keys: np.ndarray, features: np.ndarray) -> str:
    digest = hashlib.sha256("\n".join(keys.tolist()).encode("utf-8"))
    digest.update(repr(features.shape).encode())
    digest.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
    return digest.hexdigest()


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys and features of a shard, or CorruptShard when it is truncated or its checksum fails."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, features, digest = data["keys"], data["features"], str(data["digest"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise CorruptShard(f"{path.name}: unreadable ({exc})") from None
    if features.ndim != 2 or keys.shape != (len(features),):
        raise CorruptShard(f"{path.name}: {len(keys)} keys for features of shape {features.shape}")
    if _digest(keys, features) != digest:
        raise CorruptShard(f"{path.name}: checksum mismatch")
    return keys, features


def _stat(path: Path, field: str, missing: float) -> float:
    """A stat field, or `missing` when a concurrent run removed or renamed the file since it was listed."""
    try:
        return getattr(path.stat(), field)
    except FileNotFoundError:
        return missing


class ShardCache:
    """One namespace of the content-addressed feature cache."""

    def __init__(self, root: Path, namespace: str) -> None:
        self.namespace = namespace
        self.dir = root / hashlib.sha256(namespace.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "namespace.txt").exists():
            atomic_write_text(self.dir / "namespace.txt", namespace + "\n")  # for people browsing the cache
        self.shards: dict[str, dict[str, Any]] = {}  # shard file name -> {"size", "keys"}
        self.location: dict[str, tuple[str, int]] = {}  # key -> (shard, row)
        self.dropped = 0
        self._scan()

    @property
    def _index(self) -> Path:
        return self.dir / "index.json"

    def _scan(self) -> None:
        """Read the index, then open only the shards it does not describe (new, or changed in size)."""
        try:
            known = json.loads(self._index.read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            known = {}
        changed = False
        for leftover in self.dir.glob(".*.tmp"):  # from killed runs; a live writer renames its file within seconds
            if time.time() - _stat(leftover, "st_mtime", time.time()) > STALE_TEMP_S:
                leftover.unlink(missing_ok=True)
        for path in sorted(self.dir.glob("*.npz")):
            size = _stat(path, "st_size", -1)
            if size < 0:  # dropped by a concurrent run since the listing
                continue
            entry = known.get(path.name)
            if not (isinstance(entry, dict) and entry.get("size") == size and isinstance(entry.get("keys"), list)):
                try:
                    keys, _ = read_shard(path)
                except CorruptShard as exc:
                    self._drop(path, exc)
                    continue
                entry, changed = {"size": size, "keys": keys.tolist()}, True
            self._add(path.name, entry)
        if changed or set(known) != set(self.shards):
            self.save_index()

    def _add(self, name: str, entry: dict[str, Any]) -> None:
        self.shards[name] = entry
        for row, key in enumerate(entry["keys"]):
            self.location.setdefault(key, (name, row))

    def _drop(self, path: Path, reason: Exception) -> None:
        log.warning("feature cache: dropping damaged shard %s (%s); its images are computed again", path, reason)
        path.unlink(missing_ok=True)
        self.dropped += 1
        entry = self.shards.pop(path.name, None)
        if entry is not None:
            self.location = {k: v for k, v in self.location.items() if v[0] != path.name}
            for name, other in self.shards.items():  # keys the dropped shard shadowed may live elsewhere
                for row, key in enumerate(other["keys"]):
                    self.location.setdefault(key, (name, row))

    def save_index(self) -> None:
        atomic_write_json(self._index, {"namespace": self.namespace, "shards": self.shards})

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self.location]

    def verify(self, keys: Iterable[str]) -> None:
        """Checksum every shard holding one of `keys`, dropping damaged ones before they are used."""
        for name in sorted({self.location[k][0] for k in keys if k in self.location}):
            try:
                read_shard(self.dir / name)
            except CorruptShard as exc:
                self._drop(self.dir / name, exc)

    def write(self, keys: Sequence[str], features: np.ndarray) -> None:
        """Write one shard under a fresh unique name: temp file, fsync, rename."""
        keys_array = np.asarray(keys, dtype=str)
        features = np.ascontiguousarray(features, dtype=np.float32)
        name = f"{uuid.uuid4().hex}.npz"
        with atomic_path(self.dir / name) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=keys_array, features=features, digest=np.asarray(_digest(keys_array, features)))
                handle.flush()
                os.fsync(handle.fileno())
        self._add(name, {"size": (self.dir / name).stat().st_size, "keys": keys_array.tolist()})

    def gather(self, keys: Sequence[str], dim: int) -> Iterator[np.ndarray]:
        """Feature rows for `keys`, in order, a chunk at a time (a few shards open at once)."""
        open_shards: OrderedDict[str, np.ndarray] = OrderedDict()
        for start in range(0, len(keys), GATHER_ROWS):
            chunk = keys[start : start + GATHER_ROWS]
            out = np.empty((len(chunk), dim), dtype=np.float32)
            for i, key in enumerate(chunk):
                name, row = self.location[key]
                if name not in open_shards:
                    open_shards[name] = read_shard(self.dir / name)[1]
                    if len(open_shards) > OPEN_SHARDS:
                        open_shards.popitem(last=False)
                open_shards.move_to_end(name)
                out[i] = open_shards[name][row]
            yield out


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    return {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}


def write_npz_streaming(target: Path, rows: int, dim: int, chunks: Iterable[np.ndarray], **small: np.ndarray) -> None:
    """An .npz that np.load reads, whose `features` (rows, dim) arrive in chunks, never all in memory."""
    written = 0
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("features.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_2_0(out, _npy_header((rows, dim), np.dtype("<f4")))
            for chunk in chunks:
                out.write(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
                written += len(chunk)
        for name, array in small.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)
    if written != rows:
        raise RuntimeError(f"{target}: wrote {written} feature rows, expected {rows}")
