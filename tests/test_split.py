"""split stage invariants on real Fashion-MNIST images."""

from __future__ import annotations

import gzip
import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from headstart.layout import Layout
from headstart.params import ParamsError, SplitParams, load_params
from tasks import cli, download, split
from tests.conftest import write_class_folders


def _pipeline(
    tmp_path: Path, source: Path, layout: Layout, min_images: int = 5, **split_params
) -> pd.DataFrame:
    overrides = {"download.source": str(source), "download.max_images_per_class": None,
                 "download.min_images_per_class": min_images}
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
    (source / "coat").rename(source / "NA")  # a class name that pandas would read as missing
    before = _pipeline(tmp_path, source, layout)
    write_class_folders(tmp_path / "more", images[300:900], labels[300:900], per_class=15)
    (tmp_path / "more" / "coat").rename(tmp_path / "more" / "NA")
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


# ----------------------------------------------------- small classes: one image per split before any fraction


def _per_class(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {label: group["split"].value_counts().to_dict() for label, group in manifest.groupby("label")}


@pytest.fixture
def three_per_class(tmp_path, fashion_arrays) -> Path:
    images, labels = fashion_arrays
    return write_class_folders(tmp_path / "images", images[:100], labels[:100], per_class=3)


def test_three_images_per_class_give_one_image_to_every_split(tmp_path, three_per_class):
    manifest = _pipeline(tmp_path, three_per_class, Layout(tmp_path / "p"), min_images=3)
    one_each = {"train": 1, "val": 1, "test": 1}
    assert _per_class(manifest) == {label: one_each for label in manifest["label"].unique()}


def test_a_class_too_small_for_every_split_is_named(tmp_path, three_per_class):
    layout = Layout(tmp_path / "p")
    _pipeline(tmp_path, three_per_class, layout, min_images=3)
    raw = pd.read_csv(layout.raw_manifest, keep_default_na=False)
    pruned = raw.index[raw["label"] == "coat"][0]  # a user removes one coat image from data/raw by hand
    (layout.root / raw.loc[pruned, "path"]).unlink()
    raw.drop(index=pruned).to_csv(layout.raw_manifest, index=False)
    layout.split_manifest.unlink()
    message = r"class 'coat' has 2 image\(s\), none for (val|test).* at least 3 images"
    with pytest.raises(split.SplitError, match=message):
        split.run(load_params(tmp_path / "absent.yaml"), layout)


def test_a_previous_split_that_left_a_class_without_test_is_dealt_afresh(tmp_path, three_per_class):
    layout = Layout(tmp_path / "p")
    first = _pipeline(tmp_path, three_per_class, layout, min_images=3)
    coat_test = (first["label"] == "coat") & (first["split"] == "test")
    old = first.assign(split=first["split"].mask(coat_test, "train"))
    old.to_csv(layout.split_manifest, index=False)  # as a version without the minimum left it: 2 train, 1 val
    second = _pipeline(tmp_path, three_per_class, layout, min_images=3)
    assert _per_class(second)["coat"] == {"train": 1, "val": 1, "test": 1}
    assert first.set_index("sha256")["split"].to_dict() == second.set_index("sha256")["split"].to_dict()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_respect_existing_split_names_a_class_the_shipped_test_set_lacks(tmp_path, fashion_arrays):
    images, labels = fashion_arrays
    folder = tmp_path / "idx"
    folder.mkdir()
    train, test = np.isin(labels[:1000], [0, 1, 2]), np.isin(labels[1000:], [0, 1])
    _write_idx(folder / "train-images-idx3-ubyte.gz", images[:1000][train])
    _write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:1000][train])
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images[1000:][test])
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[1000:][test])
    overrides = {"download.source": str(folder), "download.max_images_per_class": 30,
                 "split.respect_existing_split": True}
    params = load_params(tmp_path / "absent.yaml", overrides)
    layout = Layout(tmp_path / "p")
    download.run(params, layout)
    with pytest.raises(split.SplitError, match="class '2' has no image in the test split the source ships"):
        split.run(params, layout)


def test_split_outputs_follow_the_umask(tmp_path, folder):
    previous = os.umask(0o022)
    try:
        _pipeline(tmp_path, folder, Layout(tmp_path / "p"))
    finally:
        os.umask(previous)
    for path in (tmp_path / "p" / "data" / "split").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# ------------------------------------------------------------------------ a raw image changed after download


@pytest.mark.slow
def test_changed_raw_image_advice_is_the_command_that_fixes_it(tmp_path, small_dataset, fashion_arrays):
    """features refuses an image whose content changed after download; the commands it names fix that."""
    from tasks import features
    from tasks.features import FeaturesError

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({
        "download": {"source": str(small_dataset), "max_images_per_class": None},
        "features": {"weights": "none", "allow_random_weights": True, "image_size": 32, "batch_size": 16},
    }))
    root = tmp_path / "p"
    stage = lambda name: cli.main([name, "--params", str(params_file), "--root", str(root)])  # noqa: E731
    assert stage("download") == 0 and stage("split") == 0
    layout = Layout(root)
    changed = layout.root / pd.read_csv(layout.split_manifest)["path"][0]
    Image.fromarray(fashion_arrays[0][1999]).save(changed)  # edited in place after download
    params = load_params(params_file)
    with pytest.raises(FeaturesError, match="rerun `headstart download` and `headstart split`"):
        features.run(params, layout)
    assert stage("split") == 0  # the old advice alone does not help
    with pytest.raises(FeaturesError, match="content changed"):
        features.run(params, layout)
    assert stage("download") == 0 and stage("split") == 0
    assert features.run(params, layout)["rows"]["train"] == 42
