"""split stage invariants on real Fashion-MNIST images."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks import download, split
from tasks.layout import Layout
from tasks.params import ParamsError, SplitParams, load_params
from tests.conftest import write_class_folders


def _pipeline(tmp_path: Path, source: Path, layout: Layout, **split_params) -> pd.DataFrame:
    overrides = {"download.source": str(source), "download.max_images_per_class": None, "download.min_images_per_class": 5}
    overrides.update({f"split.{k}": v for k, v in split_params.items()})
    params = load_params(tmp_path / "absent.yaml", overrides)
    download.run(params, layout)
    split.run(params, layout)
    return pd.read_csv(layout.split_manifest)


@pytest.fixture
def folder(tmp_path, fashion_arrays) -> Path:
    images, labels = fashion_arrays
    return write_class_folders(tmp_path / "images", images[:600], labels[:600], per_class=37)


def _within_one(manifest: pd.DataFrame, fractions: dict[str, float]) -> None:
    for label, group in manifest.groupby("label"):
        for name, fraction in fractions.items():
            count = int((group["split"] == name).sum())
            assert abs(count - len(group) * fraction) <= 1, (label, name, count, len(group))


def test_fractions_within_one_image_for_every_class(tmp_path, folder):
    manifest = _pipeline(tmp_path, folder, Layout(tmp_path / "p"))
    _within_one(manifest, {"train": 0.7, "val": 0.15, "test": 0.15})
    summary = json.loads((tmp_path / "p" / "data" / "split" / "summary.json").read_text())
    assert sum(summary["total"].values()) == len(manifest) == 370


def test_dealing_stays_within_one_image_at_every_size():
    fractions = {"train": 0.6, "val": 0.25, "test": 0.15}
    for n in range(1, 200):
        assignment = split.deal([f"{i:064x}" for i in range(n)], fractions, {}, salt="s")
        for name, fraction in fractions.items():
            assert abs(sum(v == name for v in assignment.values()) - n * fraction) < 1, (n, name)


def test_deterministic_across_runs_and_independent_of_paths(tmp_path, folder):
    first = _pipeline(tmp_path / "a", folder, Layout(tmp_path / "a"))
    renamed = tmp_path / "renamed"
    for path in folder.rglob("*.png"):
        target = renamed / path.parent.name / f"x_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    second = _pipeline(tmp_path / "b", renamed, Layout(tmp_path / "b"))
    by_hash = lambda m: dict(zip(m["sha256"], m["split"], strict=True))  # noqa: E731
    assert by_hash(first) == by_hash(second)


def test_adding_images_never_moves_an_existing_image(tmp_path, fashion_arrays):
    images, labels = fashion_arrays
    layout = Layout(tmp_path / "p")
    source = write_class_folders(tmp_path / "images", images[:300], labels[:300], per_class=20)
    before = _pipeline(tmp_path, source, layout)
    write_class_folders(tmp_path / "more", images[300:900], labels[300:900], per_class=15)
    for path in (tmp_path / "more").rglob("*.png"):
        path.rename(source / path.parent.name / f"new_{path.name}")
    after = _pipeline(tmp_path, source, layout)
    old = dict(zip(before["sha256"], before["split"], strict=True))
    moved = {sha for sha, name in zip(after["sha256"], after["split"], strict=True) if sha in old and old[sha] != name}
    assert len(after) > len(before) and not moved
    _within_one(after, {"train": 0.7, "val": 0.15, "test": 0.15})


def test_changing_the_salt_reassigns(tmp_path, folder):
    layout = Layout(tmp_path / "p")
    first = _pipeline(tmp_path, folder, layout)
    second = _pipeline(tmp_path, folder, layout, salt="another-salt")
    assert (first.set_index("sha256")["split"] != second.set_index("sha256").loc[first["sha256"], "split"].values).any()


def test_identical_content_never_lands_in_two_splits(tmp_path, folder):
    for path in list((folder / "coat").glob("*.png"))[:5]:
        (folder / "coat" / f"copy_{path.name}").write_bytes(path.read_bytes())
    manifest = _pipeline(tmp_path, folder, Layout(tmp_path / "p"))
    assert manifest.groupby("sha256")["split"].nunique().max() == 1
    assert not manifest["sha256"].duplicated().any()


def test_respect_existing_split_keeps_the_shipped_test_set(tmp_path):
    layout = Layout(tmp_path / "p")
    params = load_params(tmp_path / "absent.yaml", {
        "download.source": "fashion_mnist", "download.max_images_per_class": 40, "split.respect_existing_split": True})
    download.run(params, layout)
    split.run(params, layout)
    raw = pd.read_csv(layout.raw_manifest, keep_default_na=False).set_index("sha256")
    manifest = pd.read_csv(layout.split_manifest)
    shipped = raw.loc[manifest["sha256"], "source_split"].eq("test").to_numpy()
    assert (manifest.loc[shipped, "split"] == "test").all()
    assert (manifest.loc[~shipped, "split"] != "test").all()


def test_fractions_must_sum_to_one():
    with pytest.raises(ParamsError, match=r"split.*must be 1.0"):
        load_params("absent.yaml", {"split.train": 0.8})
    assert SplitParams().train == 0.7


def test_missing_raw_manifest_says_run_download(tmp_path):
    with pytest.raises(split.SplitError, match="run the download stage"):
        split.run(load_params(tmp_path / "absent.yaml"), Layout(tmp_path))
