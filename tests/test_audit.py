"""The audit stage on real images: planted copies and label flips go through download, split, features, audit."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.datasets import PLANT_KINDS, build, plant_copies, planted_copy
from headstart.audit import (
    LEAKAGE_COLUMNS,
    SUSPECT_COLUMNS,
    SplitRows,
    Thumbnails,
    leakage_table,
    near_duplicate_pairs,
    near_duplicate_threshold,
    out_of_fold_probabilities,
    pixel_signatures,
)
from headstart.data.artifacts import load_split, load_split_paths, read_features_info
from headstart.data.manifest import read_split_manifest
from headstart.layout import Layout
from headstart.params import AuditParams, ParamsError, validate_params
from tasks import audit, download, features, split
from tasks.cli import main
from tests.conftest import FASHION_CLASSES, write_class_folders
from tests.stage_inputs import CLASS_IDS, make_params

COPIES = 12  # resized or JPEG re-encoded copies of real images; the content-keyed split scatters them
FLIPS = 4  # t-shirts moved into the trouser folder


def _plant(source: Path) -> tuple[dict[str, str], list[str]]:
    """Copies of the first images of each class (in turn a 2x bicubic upscale as PNG, the same size as JPEG
    quality 95), and label flips."""
    copies = {}
    for class_id in CLASS_IDS:
        folder = source / FASHION_CLASSES[class_id]
        for i, original in enumerate(sorted(folder.glob("*.png"))[: COPIES // len(CLASS_IDS)]):
            with Image.open(original) as image:
                if i % 2:
                    name = f"copy-{original.stem}.jpg"
                    image.convert("RGB").save(folder / name, quality=95)
                else:
                    name = f"copy-{original.stem}.png"
                    image.resize((image.width * 2, image.height * 2), Image.BICUBIC).save(folder / name)
            copies[f"{folder.name}/{name}"] = f"{folder.name}/{original.name}"
    flips = []
    for moved in sorted((source / "t-shirt").glob("0003*.png"))[:FLIPS]:  # not among the copied originals
        shutil.move(moved, source / "trouser" / f"flip-{moved.name}")
        flips.append(f"trouser/flip-{moved.name}")
    return copies, flips


@pytest.fixture(scope="module")
def audited(tmp_path_factory, fashion_arrays) -> tuple[Layout, dict[str, str], list[str]]:
    root = tmp_path_factory.mktemp("audit")
    images, labels = fashion_arrays
    keep = np.isin(labels, CLASS_IDS)
    write_class_folders(root / "source", images[keep], labels[keep], per_class=40)
    copies, flips = _plant(root / "source")
    params, layout = make_params(root), Layout(root)
    for stage in (download, split, features, audit):
        stage.run(params, layout)
    return layout, copies, flips


def _split_of(layout: Layout) -> dict[str, str]:
    manifest = read_split_manifest(layout.split_manifest)
    return dict(zip(manifest["path"].str.removeprefix("data/raw/"), manifest["split"], strict=True))


@pytest.mark.slow
def test_planted_copies_across_splits_are_found(audited) -> None:
    layout, copies, _ = audited
    splits = _split_of(layout)
    leaking = {(c, o) for c, o in copies.items() if (splits[c] == "train") != (splits[o] == "train")}
    assert leaking, "the split put no planted copy on the other side of train: plant more copies"
    found = pd.read_csv(layout.leakage_csv, dtype=str, keep_default_na=False)
    assert list(found.columns) == LEAKAGE_COLUMNS
    pairs = {frozenset((p.removeprefix("data/raw/"), t.removeprefix("data/raw/")))
             for p, t in zip(found["path"], found["train_path"], strict=True)}
    assert {frozenset(pair) for pair in leaking} <= pairs
    assert set(found["split"]) <= {"val", "test"}
    similarity = found["pixel_similarity"].astype(float)
    report = json.loads(layout.audit_metrics.read_text())["near_duplicates"]
    needed = found["train_label"].map(report["threshold"])
    assert similarity.is_monotonic_decreasing and (similarity >= needed).all()
    p = AuditParams()
    reference = np.array(list(report["reference"].values()))
    np.testing.assert_allclose(list(report["threshold"].values()), near_duplicate_threshold(
        reference, p.near_duplicate_margin, p.near_duplicate_min_similarity))
    assert (np.array(list(report["threshold"].values())) > reference).all()
    assert (found["feature_similarity"].astype(float) > 0.5).all()
    assert report["count"] == found.drop_duplicates(["split", "path"]).shape[0] >= len(leaking)
    assert report["val"] + report["test"] == report["count"]
    assert (layout.audit_figures_dir / "leakage.png").stat().st_size > 10_000


@pytest.mark.slow
def test_planted_label_flips_rank_at_the_top(audited) -> None:
    layout, _, flips = audited
    splits = _split_of(layout)
    in_train = [f"data/raw/{flip}" for flip in flips if splits[flip] == "train"]
    assert in_train, "the split put no flipped image in train: flip more"
    suspects = pd.read_csv(layout.suspect_labels_csv, dtype=str, keep_default_na=False)
    assert list(suspects.columns) == SUSPECT_COLUMNS
    ranks = suspects.set_index("path").loc[in_train, "rank"].astype(int)
    assert ranks.max() <= len(in_train) + 2, ranks.to_dict()
    assert (suspects.set_index("path").loc[in_train, "predicted"] == "t-shirt").all()
    assert len(suspects) == sum(s == "train" for s in splits.values())
    report = json.loads(layout.audit_metrics.read_text())["suspect_labels"]
    assert report["folds"] == 5 and report["scored"] == len(suspects)
    assert report["count"] == int((suspects["p_label"].astype(float) < report["below"]).sum()) >= 1
    assert (layout.audit_figures_dir / "suspect_labels.png").stat().st_size > 10_000


@pytest.mark.slow
def test_tiny_classes_get_fewer_folds_or_are_left_unscored(audited, caplog) -> None:
    layout, _, _ = audited
    info = read_features_info(layout)
    x, y = load_split(layout.features_dir / "train.npz", len(info.classes), info.feature_dim)
    tiny = np.concatenate([np.flatnonzero(y == 0)[:3], np.flatnonzero(y == 1), np.flatnonzero(y == 2)[:1]])
    params = make_params(layout.root).train_head.model_copy(update={"epochs": 2})
    with caplog.at_level(logging.INFO, logger="headstart.audit"):
        probs, folds = out_of_fold_probabilities(x[tiny], y[tiny], info.classes, params, 5, 2, 0)
    assert folds == 3
    assert np.isnan(probs[-1]).all() and not np.isnan(probs[:-1]).any()
    assert f"class(es) ['{info.classes[2]}'] have fewer than 2 train images" in caplog.text
    assert "3 folds instead of audit.folds=5" in caplog.text


@pytest.mark.parametrize(("key", "value"), [("folds", 1), ("near_duplicate_margin", 1.5), ("suspect_below", 0)])
def test_bad_audit_params_are_named(key: str, value: float, capsys) -> None:
    with pytest.raises(ParamsError, match=rf"key 'audit\.{key}' has value {value!r}"):
        validate_params({"audit": {key: value}})
    assert main(["audit", "--root", "/nonexistent", "--set", f"audit.{key}={value}"]) == 2
    assert f"key 'audit.{key}' has value {value!r}" in capsys.readouterr().err


@pytest.mark.slow
def test_chunked_search_matches_the_full_similarity_matrix(audited, monkeypatch) -> None:
    layout, _, _ = audited
    manifest = read_split_manifest(layout.split_manifest)
    train, test = (pixel_signatures([layout.root / p for p in manifest.loc[manifest["split"] == s, "path"]])
                   for s in ("train", "test"))
    full = np.maximum.reduce([test.vectors[a] @ train.vectors[b].T for a, b in ((0, 0), (0, 1), (1, 0))])
    threshold = float(np.quantile(full, 0.99))
    monkeypatch.setattr("headstart.audit.BLOCK_ELEMENTS", 3 * train.vectors.shape[1])  # 3 test rows per block
    monkeypatch.setattr("headstart.audit.CONTRAST_RATIO", np.inf)
    pairs, nearest = near_duplicate_pairs(test, train, threshold)
    np.testing.assert_allclose(nearest, full.max(axis=1), rtol=1e-5)
    assert sorted(map(tuple, pairs[:, :2].astype(int))) == sorted(zip(*np.nonzero(full >= threshold), strict=True))


def test_pixel_similarity_sees_through_copies_but_not_a_contrast_change(tmp_path, fashion_arrays) -> None:
    """A JPEG re-encode, a 2x upscale, a 5% crop and a brightness shift correlate with the original at
    >= 0.99; the same image at a third of its contrast correlates too, and the contrast guard refuses it."""
    image = Image.fromarray(fashion_arrays[0][1])
    (tmp_path / "a").mkdir()
    image.save(tmp_path / "a" / "original.png")
    paths = [tmp_path / "a" / "original.png"]
    for kind in PLANT_KINDS:
        copy, suffix = planted_copy(image, kind)
        paths.append(tmp_path / "a" / f"{kind}{suffix}")
        copy.save(paths[-1])
    Image.fromarray((np.asarray(image) // 3).astype(np.uint8)).save(tmp_path / "a" / "faint.png")
    paths.append(tmp_path / "a" / "faint.png")
    found = pixel_signatures(paths)
    original = Thumbnails(found.vectors[:, :1], found.contrast[:1])
    pairs, nearest = near_duplicate_pairs(Thumbnails(found.vectors[:, 1:], found.contrast[1:]), original, 0.99)
    assert (nearest >= 0.99).all(), nearest
    assert sorted(pairs[:, 0].astype(int)) == list(range(len(PLANT_KINDS)))  # every copy but the faint one


# every image of the two small sets; 150 per class of the digits, enough for each class's own reference
KEPT_PER_CLASS = {"digits": 150, "faces": 100, "coat_pullover": 200}


def _split_rows(layout: Layout) -> dict[str, SplitRows]:
    info = read_features_info(layout)
    rows = {}
    for name in ("train", "val", "test"):
        npz = layout.features_dir / f"{name}.npz"
        vectors, labels = load_split(npz, len(info.classes), info.feature_dim)
        rows[name] = SplitRows(name, vectors, labels, np.asarray(load_split_paths(npz)))
    return rows


@pytest.mark.parametrize("name", list(KEPT_PER_CLASS))
def test_planted_copies_are_found_and_clean_images_are_not_flagged(name, tmp_path_factory, tmp_path) -> None:
    """On look-alike digits and faces and on a look-alike pair of products: >= 90% of the planted copies
    that cross the split are found, and <= 1% of the val/test images of the data as it came are flagged."""
    store = tmp_path_factory.getbasetemp() / "bench-datasets"
    full = build(name, store)
    source = tmp_path / "source"
    for folder in sorted(p for p in full.iterdir() if p.is_dir()):
        (source / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[: KEPT_PER_CLASS[name]]:
            shutil.copy2(image, source / folder.name / image.name)
    plants = plant_copies(source, per_kind=10)
    params, layout = make_params(tmp_path), Layout(tmp_path)
    for stage in (download, split, features):
        stage.run(params, layout)
    rows = _split_rows(layout)
    info = read_features_info(layout)

    found = leakage_table([rows["val"], rows["test"]], rows["train"], info.classes, layout.root, params.audit)
    pairs = {frozenset(pair) for pair in zip(found.table["path"], found.table["train_path"], strict=True)}
    split_of = {path: s for s, r in rows.items() for path in r.paths}
    crossing = [frozenset((f"data/raw/{p['copy']}", f"data/raw/{p['original']}")) for p in plants
                if (split_of[f"data/raw/{p['copy']}"] == "train") != (split_of[f"data/raw/{p['original']}"] == "train")]
    assert len(crossing) >= 8, "too few planted copies crossed the split: plant more"
    assert sum(pair in pairs for pair in crossing) >= 0.9 * len(crossing), (found.threshold, found.table)

    def clean(r: SplitRows) -> SplitRows:
        keep = np.array(["/plant-" not in path for path in r.paths], dtype=bool)
        return SplitRows(r.name, r.features[keep], r.labels[keep], r.paths[keep])

    unplanted = {s: clean(r) for s, r in rows.items()}
    alarms = leakage_table([unplanted["val"], unplanted["test"]], unplanted["train"], info.classes, layout.root,
                           params.audit)
    queries = len(unplanted["val"].paths) + len(unplanted["test"].paths)
    assert alarms.table.drop_duplicates(["split", "path"]).shape[0] <= 0.01 * queries, (alarms.reference, alarms.table)
    assert (alarms.threshold > alarms.reference).all()  # the dataset's own neighbours set the bar
