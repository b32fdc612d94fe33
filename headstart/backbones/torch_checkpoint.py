"""Read a PyTorch checkpoint in torch's legacy (pre-1.6, non-zip) format with numpy alone.

The packaged ImageNet weights arrive as `.pth` files in that format. `torch.load` would unpickle
arbitrary classes from them (code execution from a data file) and would make torch a dependency.
This reader accepts only the few globals a state dict of tensors needs and refuses the rest.

Layout of the legacy format (torch/serialization.py, `_legacy_save`): a pickled magic number,
a pickled protocol version (1001), pickled system info, the pickled object whose tensors refer to
storages by persistent id, the pickled list of storage keys, then for each key an int64 element
count followed by the storage's raw little-endian bytes.
"""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class CheckpointError(ValueError):
    """A checkpoint this reader cannot or will not load; the message names the file and why."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> np.ndarray:
        if self.storage.data is None:
            raise CheckpointError(f"storage {self.storage.key} is referenced but was never written")
        if not self.shape:
            return np.array(self.storage.data[self.offset])
        if all(self.shape):
            last = self.offset + sum((dim - 1) * step for dim, step in zip(self.shape, self.stride, strict=True))
            if self.offset < 0 or last >= self.storage.numel:
                raise CheckpointError(f"tensor of shape {self.shape} runs past its storage {self.storage.key}")
        itemsize = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset :],
            shape=self.shape,
            strides=tuple(step * itemsize for step in self.stride),
            writeable=False,
        )
        return np.array(view)


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_ignored: Any) -> _TensorRef:
    """Stands in for torch._utils._rebuild_tensor(_v2); requires_grad and hooks are irrelevant here."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("a tensor refers to something that is not a storage")
    return _TensorRef(storage, int(offset), tuple(int(d) for d in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: _TensorRef, *_ignored: Any) -> _TensorRef:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals a tensor state dict needs."""

    def __init__(self, handle: IO[bytes], storages: dict[str, _Storage]) -> None:
        super().__init__(handle)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only tensor state dicts are accepted"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (pre-0.4 checkpoints) are not supported")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type.dtype, int(numel))
        return self._storages[key]


def _resolve(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, dict):
        resolved = type(obj)() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            resolved[key] = _resolve(value)
        return resolved
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(item) for item in obj)
    return obj


def _read_storages(handle: IO[bytes], keys: list[str], storages: dict[str, _Storage], path: Path) -> None:
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointError(f"{path}: storage {key} is written but never referenced")
        header = handle.read(8)
        if len(header) != 8:
            raise CheckpointError(f"{path}: truncated before storage {key}")
        (count,) = struct.unpack("<q", header)
        if count != storage.numel:
            raise CheckpointError(f"{path}: storage {key} holds {count} elements, expected {storage.numel}")
        raw = handle.read(count * storage.dtype.itemsize)
        if len(raw) != count * storage.dtype.itemsize:
            raise CheckpointError(f"{path}: truncated inside storage {key}")
        storage.data = np.frombuffer(raw, dtype=storage.dtype)


def load_legacy_checkpoint(path: str | Path) -> Any:
    """Load a legacy-format torch checkpoint, returning its object with tensors as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:
        if handle.read(2) == b"PK":
            raise CheckpointError(
                f"{path}: a zip-format (torch>=1.6) checkpoint; only the legacy format is supported here"
            )
        handle.seek(0)
        storages: dict[str, _Storage] = {}
        try:
            if RestrictedUnpickler(handle, storages).load() != MAGIC_NUMBER:
                raise CheckpointError(f"{path}: not a torch legacy checkpoint (bad magic number)")
            protocol = RestrictedUnpickler(handle, storages).load()
            if protocol != PROTOCOL_VERSION:
                raise CheckpointError(f"{path}: unsupported torch protocol version {protocol!r}")
            sys_info = RestrictedUnpickler(handle, storages).load()
            if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
                raise CheckpointError(f"{path}: only little-endian checkpoints are supported")
            result = RestrictedUnpickler(handle, storages).load()
            keys = RestrictedUnpickler(handle, storages).load()
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        except EOFError:
            raise CheckpointError(f"{path}: empty or truncated before its storages") from None
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: storage key list is missing")
        _read_storages(handle, keys, storages, path)
    return _resolve(result)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a checkpoint that must be a flat mapping of parameter names to tensors."""
    state = load_legacy_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)
