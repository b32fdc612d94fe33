"""The restricted legacy-torch reader: reads the real packaged checkpoints, refuses anything else."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from headstart.backbones.registry import REGISTRY, packaged_checkpoint
from headstart.backbones.torch_checkpoint import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    CheckpointError,
    load_legacy_checkpoint,
    load_state_dict,
)

CHECKPOINT = packaged_checkpoint(REGISTRY["mobilenet_v2_tv"])
HEADER = pickle.dumps(MAGIC_NUMBER) + pickle.dumps(PROTOCOL_VERSION) + pickle.dumps({"little_endian": True})


def test_reads_torchvision_mobilenet_v2_checkpoint() -> None:
    state = load_state_dict(CHECKPOINT)
    assert len(state) == 314
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.0.0.weight"].dtype == np.float32
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert state["features.0.1.num_batches_tracked"].shape == ()
    float_params = sum(v.size for k, v in state.items() if v.dtype == np.float32 and "running" not in k)
    assert float_params == 3_504_872  # torchvision's documented MobileNetV2 parameter count
    assert np.all(state["features.0.1.running_var"] > 0)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("position", ["payload", "magic"])
def test_refuses_a_pickle_that_names_os_system(tmp_path: Path, position: str) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_RunsShell(marker))
    path = tmp_path / "evil.pth"
    path.write_bytes(HEADER + evil if position == "payload" else evil)
    with pytest.raises(CheckpointError, match=r"refusing to load global (posix|os)\.system"):
        load_legacy_checkpoint(path)
    assert not marker.exists()


def test_refuses_other_globals(tmp_path: Path) -> None:
    path = tmp_path / "eval.pth"
    path.write_bytes(HEADER + pickle.dumps(pickle.loads))  # a global that is not a tensor part
    with pytest.raises(CheckpointError, match=r"refusing to load global _pickle\.loads"):
        load_legacy_checkpoint(path)


def test_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    data = CHECKPOINT.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: truncated inside storage"):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04rest-of-a-zip", "zip-format"),
        (pickle.dumps(12345), "bad magic number"),
        (pickle.dumps(MAGIC_NUMBER) + pickle.dumps(999), "unsupported torch protocol version 999"),
        (b"", "empty or truncated"),
    ],
)
def test_not_a_legacy_checkpoint(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "other.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_legacy_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_legacy_checkpoint(tmp_path / "absent.pth")


def test_a_checkpoint_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    path.write_bytes(HEADER + pickle.dumps([1, 2, 3]) + pickle.dumps([]))
    with pytest.raises(CheckpointError, match="expected a state dict of tensors, got list"):
        load_state_dict(path)
