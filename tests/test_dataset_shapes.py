"""The whole pipeline on real images for each dataset shape users bring: one run per shape in the matrix below.

Each shape is a small folder tree of real Fashion-MNIST images, written in the shape's file format,
that goes through download, split, features, train_head, finetune, evaluate and export at 32 px
once per module. The tests check what a user relies on: class names stay the folder names (as
text) in the reports, the exported labels and predict's answers, and every class is evaluated.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from headstart import predict
from headstart.data.manifest import ManifestError, read_split_manifest
from headstart.layout import Layout
from headstart.serving import load_predictor
from headstart.uncertainty import read_predictions
from tasks import download, evaluate, export, features, finetune, split, train_head
from tests.stage_inputs import make_params

FORMATS = {"keras": "model.keras", "tflite_float32": "model_float32.tflite"}


@dataclass(frozen=True)
class Shape:
    """Class folder name -> (Fashion-MNIST label, image count), the files' mode, and params overrides."""

    classes: dict[str, tuple[int, int]]
    mode: str = "RGB"
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


SHAPES = {
    "two_classes": Shape({"ankle-boot": (9, 12), "bag": (8, 12)}),
    "two_classes_9_to_1": Shape({"ok": (1, 45), "defective": (0, 5)}),
    "two_classes_named_0_and_1": Shape({"0": (4, 12), "1": (2, 12)}),  # coat vs pullover, labels as digits
    "digit_NA_and_unicode_names": Shape({"0": (0, 10), "1": (1, 10), "NA": (7, 10), "café au lait": (3, 10)}),
    "three_images_in_a_class": Shape({"trouser": (1, 12), "sneaker": (7, 12), "bag": (8, 3)},
                                     params={"download": {"min_images_per_class": 3}}),
    "grayscale_only": Shape({"t-shirt": (0, 12), "trouser": (1, 12)}, mode="L"),
    "rgba_only": Shape({"sandal": (5, 12), "sneaker": (7, 12)}, mode="RGBA"),
}


def _save(pixels: np.ndarray, target: Path, mode: str) -> None:
    """RGB and RGBA (a cut-out: the dark background transparent) as PNG, grayscale as JPEG."""
    gray = Image.fromarray(pixels)
    if mode == "L":
        gray.save(target.with_suffix(".jpg"), quality=95)
    elif mode == "RGBA":
        alpha = gray.point(lambda v: 255 if v > 10 else 0)
        Image.merge("RGBA", (gray, gray, gray, alpha)).save(target.with_suffix(".png"))
    else:
        gray.convert("RGB").save(target.with_suffix(".png"))


def write_shape(source: Path, shape: Shape, images: np.ndarray, labels: np.ndarray) -> None:
    for folder, (label, count) in shape.classes.items():
        (source / folder).mkdir(parents=True)
        for number, pixels in enumerate(images[labels == label][:count]):
            _save(pixels, source / folder / f"{number:03d}", shape.mode)


@pytest.fixture(scope="module", params=list(SHAPES))
def tree(request, tmp_path_factory, fashion_arrays) -> tuple[str, Layout]:
    """One shape through every stage (built once per shape; the tests only read it)."""
    shape = SHAPES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    write_shape(root / "source", shape, *fashion_arrays)
    params = make_params(root, train_head={"epochs": 5}, export={"formats": list(FORMATS)}, **shape.params)
    layout = Layout(root)
    for stage in (download, split, features, train_head, finetune, evaluate, export):
        stage.run(params, layout)
    return request.param, layout


def _text_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.mark.slow
def test_reports_name_every_class_by_its_folder(tree):
    name, layout = tree
    folders = sorted(SHAPES[name].classes)
    test = json.loads(layout.metrics_file.read_text())["test"]
    assert test["images"] == len(read_split_manifest(layout.split_manifest).query("split == 'test'"))
    assert 0.0 <= test["accuracy"] <= test["top_k_accuracy"] <= 1.0
    assert json.loads((layout.finetune_dir / "info.json").read_text())["classes"] == folders
    assert list(_text_csv(layout.reports_dir / "classification_report.csv")["class"]) == folders
    assert set(_text_csv(layout.reports_dir / "confusion.csv")["actual"]) <= set(folders)
    predictions = read_predictions(layout.predictions_file)
    assert predictions.classes == folders and set(predictions.frame["label"]) <= set(folders)
    report = (layout.reports_dir / "evaluation.md").read_text()
    assert all(re.search(rf"^\| {re.escape(folder)} +\|", report, re.MULTILINE) for folder in folders)


@pytest.mark.slow
def test_exported_labels_are_the_folder_names(tree):
    name, layout = tree
    folders = sorted(SHAPES[name].classes)
    assert (layout.export_dir / "labels.txt").read_text(encoding="utf-8").splitlines() == folders
    assert json.loads((layout.export_dir / "model_card.json").read_text())["classes"] == folders


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_predict_answers_with_the_folder_names_as_evaluate_did(tree, fmt):
    """predict on the test images gives evaluate's top-1 answers, spelled as the folders are."""
    name, layout = tree
    folders = sorted(SHAPES[name].classes)
    test = read_split_manifest(layout.split_manifest).query("split == 'test'")
    out, err = io.StringIO(), io.StringIO()
    model = load_predictor(layout.export_dir / FORMATS[fmt])
    paths = [str(layout.root / p) for p in test["path"]]
    failures = predict.predict_inputs(model, paths, len(folders), "jsonl", out, err)
    assert failures == 0, err.getvalue()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all(sorted(p["label"] for p in row["predictions"]) == folders for row in rows)
    top1 = [row["predictions"][0]["label"] for row in rows]
    assert top1 == list(_text_csv(layout.reports_dir / "confusion.csv")["predicted"])
    out = io.StringIO()
    assert predict.predict_inputs(model, paths[:2], len(folders), "csv", out, err) == 0
    as_csv = pd.read_csv(io.StringIO(out.getvalue()), dtype=str, keep_default_na=False)
    assert sorted(as_csv["label"]) == sorted(folders * 2)


@pytest.mark.slow
def test_every_class_is_in_val_and_test(tree):
    name, layout = tree
    per_class = json.loads(layout.split_summary.read_text())["per_class"]
    assert sorted(per_class) == sorted(SHAPES[name].classes)
    assert all(counts["val"] >= 1 and counts["test"] >= 1 for counts in per_class.values()), per_class
    report = _text_csv(layout.reports_dir / "classification_report.csv")
    assert (report["support"].astype(int) >= 1).all(), report


# ---------------------------------------------------------------- the manifest reader


def _manifest_rows(labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "path": [f"data/raw/{label}/{n}.png" for n, label in enumerate(labels)],
        "label": labels,
        "split": ["train"] * len(labels),
        "sha256": [f"{n:064x}" for n in range(len(labels))],
        "width": 28, "height": 28,
    })


def test_manifest_reader_keeps_class_names_as_written(tmp_path):
    labels = ["0", "1", "NA", "007", "nan", "None", "1e3", "true"]
    path = tmp_path / "manifest.csv"
    _manifest_rows(labels).to_csv(path, index=False)
    assert list(pd.read_csv(path)["label"]) != labels  # what pandas' guessing does to these folder names
    manifest = read_split_manifest(path)
    assert list(manifest["label"]) == labels
    assert list(manifest["sha256"]) == [f"{n:064x}" for n in range(len(labels))]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m.drop(columns=["split"]), r"\.csv: missing column\(s\) split; rerun `headstart split`"),
        (lambda m: m.assign(split=["train", "holdout"]), r"line 3 \(data/raw/b/1\.png\) has split 'holdout'"),
        (lambda m: m.assign(sha256=["ab", "cd"]), r"line 2 \(data/raw/a/0\.png\) has sha256 'ab', not 64"),
        (lambda m: m.assign(label=["a", ""]), r"line 3 \(data/raw/b/1\.png\) has an empty label"),
        (lambda m: m.iloc[:0], r"manifest\.csv: no rows; rerun `headstart download` and `headstart split`"),
    ],
)
def test_manifest_reader_names_the_file_the_line_and_the_fix(tmp_path, damage, message):
    path = tmp_path / "manifest.csv"
    damage(_manifest_rows(["a", "b"])).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=message):
        read_split_manifest(path)


def test_manifest_reader_missing_file_says_to_run_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.csv not found; run `headstart split` first"):
        read_split_manifest(tmp_path / "absent.csv")
