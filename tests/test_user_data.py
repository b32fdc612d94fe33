"""Data as users have it: pre-split folders, label files, and demo settings kept to the demo.

Every test reads real Fashion-MNIST images through the real download and split stages.
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from headstart.backbones.registry import get_spec, image_size_for
from headstart.data.sources.candidates import DownloadError
from headstart.data.sources.presets import EffectiveSettings, effective_settings
from headstart.layout import Layout
from headstart.params import ParamsError, load_params
from tasks import download, split
from tests.conftest import REPO_ROOT, write_class_folders


def _stages(tmp_path: Path, **overrides) -> tuple[pd.DataFrame, Layout]:
    """download + split with `overrides` (dotted keys); the split manifest with each image's source split."""
    params = load_params(tmp_path / "absent.yaml", {"download.min_images_per_class": 5, **overrides})
    layout = Layout(tmp_path / "project")
    download.run(params, layout)
    split.run(params, layout)
    raw = pd.read_csv(layout.raw_manifest, dtype=str, keep_default_na=False)
    manifest = pd.read_csv(layout.split_manifest, dtype=str, keep_default_na=False)
    return manifest.merge(raw[["sha256", "source_split", "origin"]], on="sha256"), layout


def _write_splits(root: Path, fashion_arrays, counts: dict[str, int]) -> Path:
    """root/my_dataset/<split folder>/<class>/*.png: 3 classes, `counts[split folder]` distinct images each."""
    images, labels = fashion_arrays
    keep = labels < 3
    images, labels = images[keep], labels[keep]
    start = 0
    for folder, per_class in counts.items():
        stop = start + 12 * per_class  # enough rows for `per_class` of each class
        write_class_folders(root / "my_dataset" / folder, images[start:stop], labels[start:stop], per_class)
        start = stop
    return root


def _folder_split(origin: str) -> str:
    """The split folder an image came from (val/, valid/ and validation/ all mean val)."""
    part = Path(origin).parts[Path(origin).parts.index("my_dataset") + 1]
    return {"valid": "val", "validation": "val"}.get(part, part)


# ---------------------------------------------------------------- pre-split folders


def test_presplit_folders_keep_their_split(tmp_path, fashion_arrays):
    source = _write_splits(tmp_path / "source", fashion_arrays, {"train": 20, "val": 5, "test": 5})
    manifest, _ = _stages(tmp_path, **{"download.source": str(source)})
    assert len(manifest) == 90 and sorted(manifest["label"].unique()) == ["pullover", "t-shirt", "trouser"]
    assert list(manifest["source_split"]) == [_folder_split(o) for o in manifest["origin"]]
    assert (manifest["split"] == manifest["source_split"]).all()
    assert manifest.groupby("split").size().to_dict() == {"test": 15, "train": 60, "val": 15}


def test_presplit_archive_keeps_its_split(tmp_path, fashion_arrays):
    tree = _write_splits(tmp_path / "tree", fashion_arrays, {"train": 15, "valid": 4, "test": 4})
    archive = tmp_path / "dataset.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(tree / "my_dataset", arcname="my_dataset")
    manifest, _ = _stages(tmp_path, **{"download.source": str(archive)})
    assert (manifest["split"] == [_folder_split(o) for o in manifest["origin"]]).all()
    assert set(manifest["split"]) == {"train", "val", "test"}


def test_a_split_not_shipped_is_carved_from_train_and_stays_put(tmp_path, fashion_arrays):
    """train/ and test/ only: val comes from train/ at 0.15 / 0.85; adding images moves none."""
    source = _write_splits(tmp_path / "source", fashion_arrays, {"train": 30, "test": 6})
    before, _ = _stages(tmp_path, **{"download.source": str(source)})
    shipped_test = before["source_split"] == "test"
    assert (before.loc[shipped_test, "split"] == "test").all()
    assert set(before.loc[~shipped_test, "split"]) == {"train", "val"}
    for _, group in before[~shipped_test].groupby("label"):
        assert abs((group["split"] == "val").sum() - len(group) * 0.15 / 0.85) < 1
    images, labels = fashion_arrays
    extra = write_class_folders(tmp_path / "extra", images[1200:][labels[1200:] < 3], labels[1200:][labels[1200:] < 3], 8)
    for path in extra.rglob("*.png"):
        path.rename(source / "my_dataset" / "train" / path.parent.name / f"new_{path.name}")
    after, _ = _stages(tmp_path, **{"download.source": str(source)})
    old = dict(zip(before["sha256"], before["split"], strict=True))
    assert len(after) > len(before)
    assert all(old[sha] == name for sha, name in zip(after["sha256"], after["split"], strict=True) if sha in old)


def test_respect_existing_split_false_deals_every_image(tmp_path, fashion_arrays):
    source = _write_splits(tmp_path / "source", fashion_arrays, {"train": 20, "val": 5, "test": 5})
    manifest, _ = _stages(tmp_path, **{"download.source": str(source), "split.respect_existing_split": False})
    assert (manifest["split"] != manifest["source_split"]).any()
    for _, group in manifest.groupby("label"):
        assert abs((group["split"] == "test").sum() - len(group) * 0.15) <= 1


def test_split_folders_beside_class_folders_are_one_clear_error(tmp_path, fashion_arrays):
    source = _write_splits(tmp_path / "source", fashion_arrays, {"train": 12, "test": 4})
    (source / "my_dataset" / "test" / "trouser").rename(source / "my_dataset" / "trouser")
    with pytest.raises(DownloadError, match=r"split folders \(test/, train/\) sit beside other folders \(trouser/\)"):
        _stages(tmp_path, **{"download.source": str(source)})


def test_a_class_only_in_test_is_named(tmp_path, fashion_arrays):
    source = _write_splits(tmp_path / "source", fashion_arrays, {"train": 12, "test": 4})
    (source / "my_dataset" / "train" / "pullover").rename(tmp_path / "elsewhere")
    with pytest.raises(DownloadError, match=r"class 'pullover' has images in test/ but none in train/"):
        _stages(tmp_path, **{"download.source": str(source)})


def test_respect_existing_split_true_needs_a_shipped_split(tmp_path, small_dataset):
    with pytest.raises(split.SplitError, match="ships none .* set it to auto or false"):
        _stages(tmp_path, **{"download.source": str(small_dataset), "split.respect_existing_split": True})


# ---------------------------------------------------------------- label files


def _flat_images(folder: Path, fashion_arrays, names: list[str]) -> list[str]:
    """One distinct real image per name, saved flat in `folder` (no class folders)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, pixels in zip(names, fashion_arrays[0], strict=False):
        Image.fromarray(pixels).save(folder / name)
    return names


def test_csv_labels_quarantine_each_bad_row_with_its_line_and_reason(tmp_path, fashion_arrays):
    source = tmp_path / "source"
    good = [f"img{n:03d}.png" for n in range(30)]
    _flat_images(source, fashion_arrays, [*good, "x0.png", "x1.png", "x2.png", "u0.png", "u1.png", "u2.png", "u3.png"])
    Image.fromarray(fashion_arrays[0][-1]).save(tmp_path / "outside.png")
    classes = ["0", "NA", "café au lait"]
    rows = [("path", "label", "split"), *((name, classes[n % 3]) for n, name in enumerate(good))]
    rows += [("missing.png", "0"), ("x0.png", ""), ("x1.png", "0"), ("x1.png", "NA"), ("../outside.png", "0"),
             ("x2.png", "0", "holdout")]
    with open(source / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    summary = download.run(load_params(tmp_path / "absent.yaml", {"download.source": str(source),
                                                                  "download.labels": "labels.csv"}),
                           layout := Layout(tmp_path / "project"))
    raw = pd.read_csv(layout.raw_manifest, dtype=str, keep_default_na=False)
    assert dict(zip(raw["origin"].map(lambda o: Path(o).name), raw["label"], strict=True)) == {
        name: classes[n % 3] for n, name in enumerate(good)}
    quarantine = pd.read_csv(layout.quarantine, dtype=str, keep_default_na=False)
    reasons = dict(zip(quarantine["origin"].str.extract(r"line (\d+)")[0].astype(int), quarantine["reason"], strict=True))
    assert sorted(reasons) == [32, 33, 34, 35, 36, 37]
    assert reasons[32].startswith("no such file in the source") and reasons[33] == "empty label"
    assert reasons[34] == reasons[35] == "listed on lines 34, 35 with different labels or splits: 0, NA"
    assert reasons[36].startswith("path leaves the source folder") and "'holdout' is not train" in reasons[37]
    assert summary["unlisted"] == 4  # u0-u3; x0-x2 are named by rows, quarantined instead


def test_tsv_labels_with_a_split_column_keep_the_split(tmp_path, fashion_arrays):
    source = tmp_path / "source"
    names = _flat_images(source / "pics", fashion_arrays, [f"{n}.png" for n in range(36)])
    shipped = ["train"] * 4 + ["Validation"] + ["TEST"]
    lines = ["Path\tLabel\tSplit"] + [f"pics/{name}\t{'ab'[n // 18]}\t{shipped[n % 6]}" for n, name in enumerate(names)]
    (tmp_path / "labels.tsv").write_text("\n".join(lines) + "\n")
    manifest, _ = _stages(tmp_path, **{"download.source": str(source), "download.labels": str(tmp_path / "labels.tsv")})
    expected = {f"{n}.png": {"Validation": "val", "TEST": "test"}.get(shipped[n % 6], "train") for n in range(36)}
    assert dict(zip(manifest["origin"].map(lambda o: Path(o).name), manifest["split"], strict=True)) == expected
    assert sorted(manifest["label"].unique()) == ["a", "b"]


def test_a_missing_labels_file_or_column_names_the_file_and_the_columns(tmp_path, small_dataset):
    with pytest.raises(DownloadError, match=r"download.labels 'nope.csv': no such file \(looked for .*nope.csv.*path and label"):
        _stages(tmp_path, **{"download.source": str(small_dataset), "download.labels": "nope.csv"})
    (tmp_path / "labels.csv").write_text("file,class\npullover/00001.png,pullover\n")
    with pytest.raises(DownloadError, match=r"labels.csv: its header row \['file', 'class'\] lacks the column\(s\) path, label"):
        _stages(tmp_path, **{"download.source": str(small_dataset), "download.labels": str(tmp_path / "labels.csv")})
    with pytest.raises(DownloadError, match="set download.labels to null"):
        _stages(tmp_path, **{"download.source": "fashion_mnist", "download.labels": str(tmp_path / "labels.csv")})


# ---------------------------------------------------------------- demo settings stay with the demo


def test_auto_sample_and_size_are_the_demo_only_for_the_preset(tmp_path, small_dataset):
    default = load_params(REPO_ROOT / "params.yaml")
    assert effective_settings(default) == EffectiveSettings(max_images_per_class=1000, image_size=96, demo=True)
    own = load_params(REPO_ROOT / "params.yaml", {"download.source": str(small_dataset)})
    assert effective_settings(own) == EffectiveSettings(max_images_per_class=None, image_size=None, demo=False)
    assert image_size_for(get_spec(own.features.backbone), effective_settings(own).image_size) == 224
    chosen = load_params(REPO_ROOT / "params.yaml", {"download.max_images_per_class": 12, "features.image_size": 64})
    assert effective_settings(chosen) == EffectiveSettings(max_images_per_class=12, image_size=64, demo=False)


def test_an_own_folder_keeps_every_image_by_default(tmp_path, fashion_arrays):
    images, _ = fashion_arrays
    source = tmp_path / "source"
    for name, pixels in (("many", images[:1010]), ("few", images[1010:1022])):
        (source / name).mkdir(parents=True)
        for n, picture in enumerate(pixels):
            Image.fromarray(picture).save(source / name / f"{n:04d}.png")
    unique = len({picture.tobytes() for picture in images[:1010]})
    params = load_params(tmp_path / "absent.yaml", {"download.source": str(source)})
    layout = Layout(tmp_path / "project")
    assert download.run(params, layout)["images"] == unique + 12
    sample = json.loads(layout.raw_sample.read_text())
    assert sample == {"max_images_per_class": None, "per_class": {"few": {"available": 12, "kept": 12},
                                                                  "many": {"available": unique, "kept": unique}}}


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("download.max_images_per_class", 0, "greater than or equal to 1"),
    ("features.image_size", "native", "'auto'"),
    ("split.respect_existing_split", "maybe", "True, False or 'auto'"),
])
def test_a_bad_auto_value_names_the_key(key, value, allowed):
    with pytest.raises(ParamsError, match=rf"key '{key}' has value {value!r}: Input should be (.*){re.escape(allowed)}"):
        load_params("absent.yaml", {key: value})
