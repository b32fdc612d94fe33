"""features stage on real Fashion-MNIST PNGs: cache hits and misses, damage, kills, concurrency, alignment.

Random backbone weights (seeded) keep these fast; the cache logic does not depend on the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from headstart.backbones.loading import build_feature_extractor, load_backbone
from headstart.data.datasets import image_dataset
from headstart.data.feature_cache import read_shard
from headstart.data.manifest import SPLITS, ManifestError
from headstart.files import STALE_TEMP_S
from headstart.layout import Layout
from headstart.params import load_params
from tasks import cli, features
from tests.conftest import FASHION_CLASSES

pytestmark = pytest.mark.slow

SMALL = {
    "features.weights": "none",
    "features.allow_random_weights": True,
    "features.image_size": 32,
    "features.batch_size": 16,
    "features.shard_size": 8,
}
SPLIT_CYCLE = ("train", "train", "train", "val", "test")


def _params(tmp_path: Path, **extra):
    return load_params(tmp_path / "absent.yaml", {**SMALL, **{f"features.{k}": v for k, v in extra.items()}})


def _rows(root: Path, images: np.ndarray, labels: np.ndarray, start: int, count: int) -> list[dict]:
    """Write real images start..start+count as PNGs under root/data/raw and describe them as manifest rows."""
    rows = []
    for i in range(start, start + count):
        label = FASHION_CLASSES[int(labels[i])]
        path = root / "data" / "raw" / label / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(path)
        rows.append({"path": path.relative_to(root).as_posix(), "label": label, "split": SPLIT_CYCLE[i % 5],
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "width": 28, "height": 28})
    return rows


def _write_manifest(layout: Layout, rows: list[dict]) -> pd.DataFrame:
    layout.split_dir.mkdir(parents=True, exist_ok=True)
    manifest = pd.DataFrame(rows)
    manifest.to_csv(layout.split_manifest, index=False)
    return manifest


@pytest.fixture
def project(tmp_path, fashion_arrays):
    """A project root whose split manifest lists `count` real images; returns (layout, add_images)."""
    images, labels = fashion_arrays
    layout = Layout(tmp_path / "project")
    written: list[dict] = []

    def add(count: int) -> pd.DataFrame:
        written.extend(_rows(layout.root, images, labels, len(written), count))
        return _write_manifest(layout, written)

    return layout, add


def _load(layout: Layout, name: str) -> dict[str, np.ndarray]:
    with np.load(layout.features_dir / f"{name}.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _run(tmp_path: Path, layout: Layout, **extra) -> dict:
    keras.utils.set_random_seed(0)  # the same random weights on every run, so recomputed vectors are comparable
    return features.run(_params(tmp_path, **extra), layout)


def _assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float noise, relative to the vectors' scale (random-weight features are tiny)."""
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual / scale, expected / scale, rtol=0, atol=1e-4)


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) > 0.01 * float(np.abs(b).max())


def _shard_keys(layout: Layout) -> dict[Path, list[str]]:
    return {path: read_shard(path)[0].tolist() for path in sorted(layout.feature_cache_dir.glob("*/*.npz"))}


def test_outputs_line_up_with_manifest_rows(tmp_path, project):
    layout, add = project
    manifest = add(30)
    stats = _run(tmp_path, layout)
    assert (stats["computed"], stats["reused"]) == (30, 0)

    classes = sorted(manifest["label"].unique())
    info = json.loads((layout.features_dir / "info.json").read_text())
    assert info["classes"] == classes
    assert (info["image_size"], info["feature_dim"], info["augmented_views"]) == (32, 1280, 0)
    assert info["backbone"] == "mobilenet_v2_tv" and info["weights_id"] == "none"

    keras.utils.set_random_seed(0)
    extractor = build_feature_extractor(load_backbone("mobilenet_v2_tv", "none", 32, layout.backbone_dir))
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        data = _load(layout, split)
        assert data["path"].tolist() == rows["path"].tolist()
        assert data["sha256"].tolist() == rows["sha256"].tolist()
        assert data["labels"].tolist() == [classes.index(x) for x in rows["label"]]
        assert data["features"].dtype == np.float32 and data["features"].shape == (len(rows), 1280)
        # each row holds the vector of its own image, computed here independently
        direct = extractor.predict(image_dataset([str(layout.root / p) for p in rows["path"]], None, 32, 8), verbose=0)
        _assert_same(data["features"], direct)


def test_cache_counts_adding_renaming_and_resizing(tmp_path, project):
    layout, add = project
    add(30)
    assert _run(tmp_path, layout)["computed"] == 30
    before = _load(layout, "train")

    manifest = add(10)
    stats = _run(tmp_path, layout)
    assert (stats["computed"], stats["reused"]) == (10, 30)

    # move one file to another folder under a new name: nothing to compute, the output names the new path
    old = manifest.loc[0, "path"]
    new = "data/moved/renamed.png"
    (layout.root / new).parent.mkdir(parents=True)
    os.replace(layout.root / old, layout.root / new)
    manifest.loc[0, "path"] = new
    manifest.to_csv(layout.split_manifest, index=False)
    stats = _run(tmp_path, layout)
    assert (stats["computed"], stats["reused"]) == (0, 40)
    after = _load(layout, "train")
    assert after["path"][0] == new
    np.testing.assert_array_equal(after["features"][:len(before["features"])][1:], before["features"][1:])

    stats = _run(tmp_path, layout, image_size=40)
    assert (stats["computed"], stats["reused"]) == (40, 0)
    assert json.loads((layout.features_dir / "info.json").read_text())["image_size"] == 40


def test_damaged_shards_are_dropped_and_recomputed(tmp_path, project):
    layout, add = project
    add(30)
    _run(tmp_path, layout)
    reference = {split: _load(layout, split)["features"] for split in SPLITS}
    shards = _shard_keys(layout)
    assert len(shards) >= 2  # 30 images in shards of 8 to 16 (a shard closes on a batch boundary)
    (truncated, truncated_keys), (tampered, tampered_keys) = list(shards.items())[:2]

    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    # a well-formed shard of the same size whose vectors changed after its checksum was taken
    with np.load(tampered) as data:
        keys, vectors, digest = data["keys"], data["features"].copy(), data["digest"]
    vectors[0, 0] += 1.0
    with open(tampered, "wb") as handle:
        np.savez(handle, keys=keys, features=vectors, digest=digest)

    stats = _run(tmp_path, layout)
    assert stats["dropped_shards"] == 2
    assert stats["computed"] == len(truncated_keys) + len(tampered_keys)
    assert stats["reused"] == 30 - stats["computed"]
    for split in SPLITS:
        _assert_same(_load(layout, split)["features"], reference[split])


def _cli(layout: Layout, tmp_path: Path, shard_size: int) -> subprocess.Popen:
    params = tmp_path / "params.yaml"
    overrides = {**SMALL, "features.shard_size": shard_size}
    params.write_text(yaml.safe_dump({"features": {k.split(".")[1]: v for k, v in overrides.items()}}))
    command = [sys.executable, "-m", "tasks.cli", "features", "--params", str(params), "--root", str(layout.root)]
    return subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_killed_run_loses_nothing_and_resumes(tmp_path, project):
    layout, add = project
    add(600)
    process = _cli(layout, tmp_path, shard_size=16)
    deadline = time.monotonic() + 240
    while len(list(layout.feature_cache_dir.glob("*/*.npz"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()

    done = {key for keys in _shard_keys(layout).values() for key in keys}  # every shard left reads as valid
    assert 0 < len(done) < 600
    stats = _run(tmp_path, layout)
    assert (stats["reused"], stats["computed"]) == (len(done), 600 - len(done))
    assert stats["dropped_shards"] == 0


def test_two_concurrent_runs_share_the_cache(tmp_path, project):
    layout, add = project
    manifest = add(120)
    runs = [_cli(layout, tmp_path, shard_size=8) for _ in range(2)]
    for process in runs:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    assert all(_shard_keys(layout))  # every shard reads back with a valid checksum
    stats = _run(tmp_path, layout)
    assert (stats["computed"], stats["reused"], stats["dropped_shards"]) == (0, 120, 0)
    assert _load(layout, "train")["path"].tolist() == manifest.loc[manifest["split"] == "train", "path"].tolist()


def test_augmented_views_are_cached_and_seeded(tmp_path, project):
    layout, add = project
    manifest = add(10)
    train = manifest[manifest["split"] == "train"]
    stats = _run(tmp_path, layout, augmented_views=2)
    assert (stats["computed"], stats["views_computed"]) == (10, 2 * len(train))

    views = _load(layout, "train_views")
    base = _load(layout, "train")["features"]
    assert views["features"].shape == (2 * len(train), 1280)
    assert views["view"].tolist() == [0, 1] * len(train)
    assert views["sha256"].tolist() == np.repeat(train["sha256"].to_numpy(str), 2).tolist()
    assert views["labels"].tolist() == np.repeat(_load(layout, "train")["labels"], 2).tolist()
    first, second = views["features"][0::2], views["features"][1::2]
    assert _differ(first, second) and _differ(first, base)

    assert _run(tmp_path, layout, augmented_views=2)["views_computed"] == 0
    # the same seed gives the same views from scratch; another seed gives new views and reuses the base vectors
    for path in layout.feature_cache_dir.iterdir():
        if "views" in (path / "namespace.txt").read_text():
            for shard in path.glob("*.npz"):
                shard.unlink()
    stats = _run(tmp_path, layout, augmented_views=2)
    assert stats["views_computed"] == 2 * len(train)
    _assert_same(_load(layout, "train_views")["features"], views["features"])
    stats = _run(tmp_path, layout, augmented_views=2, augment_seed=1)
    assert (stats["computed"], stats["views_computed"]) == (0, 2 * len(train))
    assert _differ(_load(layout, "train_views")["features"], views["features"])


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    layout = Layout(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"manifest.csv not found; run `headstart split` first"):
        features.run(_params(tmp_path), layout)
    (tmp_path / "defaults.yaml").write_text("{}\n")  # a named --params file must exist; empty: all defaults
    assert cli.main(["features", "--params", str(tmp_path / "defaults.yaml"), "--root", str(layout.root)]) == 2
    assert "headstart split" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("split", "holdout", r"split 'holdout'; expected one of"),
        ("sha256", "abc", r"sha256 'abc', not 64 hex digits"),
        ("label", None, r"missing column\(s\) label"),
    ],
)
def test_bad_manifest_rows_are_named(tmp_path, project, column, value, message):
    layout, add = project
    manifest = add(5)
    if value is None:
        manifest = manifest.drop(columns=[column])
    else:
        manifest.loc[2, column] = value
    manifest.to_csv(layout.split_manifest, index=False)
    with pytest.raises(ManifestError, match=message):
        features.run(_params(tmp_path), layout)


def test_missing_or_changed_image_is_named(tmp_path, project, fashion_arrays):
    layout, add = project
    manifest = add(5)
    changed = layout.root / manifest.loc[1, "path"]
    Image.fromarray(fashion_arrays[0][100]).save(changed)
    with pytest.raises(features.FeaturesError, match=rf"{changed}: content changed since download recorded it"):
        features.run(_params(tmp_path), layout)
    changed.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{changed}: listed in the split manifest but missing"):
        features.run(_params(tmp_path), layout)


def test_index_is_rebuilt_from_shards_and_stale_temp_files_go(tmp_path, project):
    layout, add = project
    add(20)
    _run(tmp_path, layout)
    (namespace,) = [p for p in layout.feature_cache_dir.iterdir() if p.is_dir()]
    (namespace / "index.json").write_text("{not json")
    stale, fresh = namespace / ".a.npz.x1.tmp", namespace / ".b.npz.x2.tmp"
    stale.write_bytes(b"half a shard")
    fresh.write_bytes(b"a shard being written now")
    old = time.time() - 2 * STALE_TEMP_S
    os.utime(stale, (old, old))

    stats = _run(tmp_path, layout)
    assert (stats["computed"], stats["reused"]) == (0, 20)
    index = json.loads((namespace / "index.json").read_text())
    assert sorted(index["shards"]) == sorted(p.name for p in namespace.glob("*.npz"))
    assert not stale.exists() and fresh.exists()
