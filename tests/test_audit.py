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
from sklearn.metrics.pairwise import cosine_similarity

from headstart.audit import LEAKAGE_COLUMNS, SUSPECT_COLUMNS, near_duplicate_pairs, out_of_fold_probabilities
from headstart.data.artifacts import load_split, read_features_info
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
    similarity = found["similarity"].astype(float)
    assert similarity.is_monotonic_decreasing and (similarity >= AuditParams().near_duplicate_threshold).all()
    report = json.loads(layout.audit_metrics.read_text())["near_duplicates"]
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


@pytest.mark.parametrize(("key", "value"), [("folds", 1), ("near_duplicate_threshold", 1.5), ("suspect_below", 0)])
def test_bad_audit_params_are_named(key: str, value: float, capsys) -> None:
    with pytest.raises(ParamsError, match=rf"key 'audit\.{key}' has value {value!r}"):
        validate_params({"audit": {key: value}})
    assert main(["audit", "--root", "/nonexistent", "--set", f"audit.{key}={value}"]) == 2
    assert f"key 'audit.{key}' has value {value!r}" in capsys.readouterr().err


@pytest.mark.slow
def test_chunked_search_matches_the_full_similarity_matrix(audited, monkeypatch) -> None:
    layout, _, _ = audited
    info = read_features_info(layout)
    train, _ = load_split(layout.features_dir / "train.npz", len(info.classes), info.feature_dim)
    test, _ = load_split(layout.features_dir / "test.npz", len(info.classes), info.feature_dim)
    full = cosine_similarity(test, train)
    threshold = float(np.quantile(full, 0.99))
    monkeypatch.setattr("headstart.audit.BLOCK_ELEMENTS", 3 * len(train))  # 3 test rows per block
    pairs, nearest = near_duplicate_pairs(test, train, threshold)
    np.testing.assert_allclose(nearest, full.max(axis=1), rtol=1e-5)
    assert sorted(map(tuple, pairs[:, :2].astype(int))) == sorted(zip(*np.nonzero(full >= threshold), strict=True))
