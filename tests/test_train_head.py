"""train_head on real cached features (Fashion-MNIST through the packaged MobileNetV2 at 32 px)."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from headstart.data.artifacts import ArtifactError, class_weights
from headstart.layout import Layout
from headstart.model import RandomWeightsError
from tasks import features, train_head
from tests.stage_inputs import build_feature_tree, copy_tree, make_params


@pytest.fixture(scope="module")
def tree(tmp_path_factory, fashion_arrays) -> Path:
    return build_feature_tree(tmp_path_factory.mktemp("features"), *fashion_arrays)


@pytest.fixture
def layout(tree: Path, tmp_path: Path) -> Layout:
    return copy_tree(tree, tmp_path / "project")


def _val(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    with np.load(layout.features_dir / "val.npz") as data:
        return data["features"], data["labels"]


@pytest.mark.slow
def test_head_learns_real_features_and_writes_its_contract(layout: Layout) -> None:
    result = train_head.run(make_params(layout.root), layout)

    head = keras.saving.load_model(layout.head_dir / "head.keras", safe_mode=True)
    info = json.loads((layout.head_dir / "info.json").read_text())
    x_val, y_val = _val(layout)
    probabilities = head.predict(x_val, verbose=0)
    assert head.input_shape == (None, info["feature_dim"]) == (None, x_val.shape[1])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # the recorded metric is the saved head's, and it is far above chance (1/3) on real images
    assert info["val_accuracy"] == pytest.approx(float((probabilities.argmax(1) == y_val).mean()))
    assert info["val_accuracy"] >= 0.6
    assert info["classes"] == sorted(info["classes"]) and len(info["classes"]) == 3
    assert info["tf_version"] and info["device"] and info["seed"] == 42 and info["params"]["units"] == 32
    assert result["val_accuracy"] == info["val_accuracy"]

    history = pd.read_csv(layout.head_dir / "history.csv")
    assert list(history["epoch"]) == list(range(1, info["epochs_run"] + 1))
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.columns)
    assert info["best_epoch"] == int(history["val_loss"].idxmin()) + 1  # best weights restored

    live = layout.root / "live" / "train_head"
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["restored_best"]["val_accuracy"] == info["val_accuracy"]
    curve = pd.read_csv(live / "plots" / "metrics" / "eval" / "accuracy.tsv", sep="\t")
    assert len(curve) == info["epochs_run"]


@pytest.mark.slow
def test_same_params_and_data_give_the_same_weights(layout: Layout, tree: Path, tmp_path: Path) -> None:
    other = copy_tree(tree, tmp_path / "other")
    reseeded = copy_tree(tree, tmp_path / "reseeded")
    params = make_params(layout.root, train_head={"epochs": 4, "early_stopping_patience": 0})
    train_head.run(params, layout)
    train_head.run(params, other)
    train_head.run(params.model_copy(update={"train_head": params.train_head.model_copy(update={"seed": 7})}), reseeded)

    def weights(project: Layout) -> list[np.ndarray]:
        return keras.saving.load_model(project.head_dir / "head.keras").get_weights()

    for a, b in zip(weights(layout), weights(other), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(weights(layout), weights(reseeded), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "layer_types"),
    [
        ({"hidden_layers": 0, "dropout": 0.2, "optimizer": "sgd", "lr_schedule": "cosine", "learning_rate": 0.05},
         ["InputLayer", "Dropout", "Dense"]),
        ({"hidden_layers": 2, "batch_norm": True, "optimizer": "rmsprop", "lr_schedule": "exponential",
          "label_smoothing": 0.1, "l2": 0.0, "dropout": 0.0},
         ["InputLayer", "Dense", "BatchNormalization", "Activation", "Dense", "BatchNormalization", "Activation", "Dense"]),
    ],
)
def test_head_variants_from_params(layout: Layout, settings: dict, layer_types: list[str]) -> None:
    info = train_head.run(make_params(layout.root, train_head={"epochs": 4, **settings}), layout)
    head = keras.saving.load_model(layout.head_dir / "head.keras", safe_mode=True)
    assert [type(layer).__name__ for layer in head.layers] == layer_types
    assert info["val_accuracy"] > 0.5


@pytest.mark.slow
def test_cached_augmented_views_join_the_training_rows(layout: Layout) -> None:
    params = make_params(layout.root, features={"augmented_views": 1}, train_head={"epochs": 2})
    features.run(params, layout)
    with np.load(layout.features_dir / "train.npz") as data:
        rows = len(data["labels"])
    assert train_head.run(params, layout)["train_rows"] == 2 * rows
    off = params.model_copy(update={"train_head": params.train_head.model_copy(update={"use_augmented_views": False})})
    assert train_head.run(off, layout)["train_rows"] == rows


def test_balanced_class_weights_equalise_each_class_total() -> None:
    labels = np.array([0] * 30 + [1] * 10 + [2] * 5)
    weights = class_weights("balanced", labels, ["a", "b", "c"])
    totals = [weights[c] * int((labels == c).sum()) for c in range(3)]
    assert totals == pytest.approx([len(labels) / 3] * 3)
    assert class_weights("none", labels, ["a", "b", "c"]) is None
    assert class_weights({"c": 4.0}, labels, ["a", "b", "c"]) == {0: 1.0, 1: 1.0, 2: 4.0}


@pytest.mark.parametrize(
    ("spec", "labels", "message"),
    [
        ({"sneakers": 2.0}, [0, 1, 2], r"unknown class\(es\) \['sneakers'\]; the classes are \['a', 'b', 'c'\]"),
        ({"a": 0.0}, [0, 1, 2], "weights must be > 0"),
        ("balanced", [0, 0, 1], r"none for \['c'\]"),
    ],
)
def test_bad_class_weights_are_refused(spec, labels: list[int], message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        class_weights(spec, np.array(labels), ["a", "b", "c"])


@pytest.mark.slow
def test_unknown_class_weight_name_stops_the_stage(layout: Layout) -> None:
    with pytest.raises(ArtifactError, match="unknown class.*'coat'"):
        train_head.run(make_params(layout.root, train_head={"class_weight": {"coat": 2.0}}), layout)
    assert not layout.head_dir.exists()


@pytest.mark.slow
def test_random_backbone_weights_are_refused(layout: Layout) -> None:
    with pytest.raises(RandomWeightsError, match="allow_random_weights"):
        train_head.run(make_params(layout.root, features={"weights": "none"}), layout)


@pytest.mark.slow
def test_missing_or_mismatched_features_name_the_file(tmp_path: Path, layout: Layout) -> None:
    with pytest.raises(FileNotFoundError, match=r"info.json not found: run `headstart features` first"):
        train_head.run(make_params(tmp_path), Layout(tmp_path))
    info_path = layout.features_dir / "info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "feature_dim": 7}))
    with pytest.raises(ArtifactError, match=r"train.npz: features \(\d+, 1280\).*feature_dim=7"):
        train_head.run(make_params(layout.root), layout)
