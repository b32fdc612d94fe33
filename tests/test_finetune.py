"""finetune on real Fashion-MNIST images with the packaged MobileNetV2 at 32 px, after a real train_head."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from headstart.backbones.loading import load_backbone
from headstart.data.artifacts import ArtifactError
from headstart.data.datasets import cached_images, image_dataset
from headstart.layout import Layout
from headstart.model import RandomWeightsError, all_layers, build_augmentation
from headstart.params import AugmentationParams
from headstart.training import EpochData
from tasks import finetune, train_head
from tasks.finetune import FinetuneError
from tests.conftest import REPO_ROOT
from tests.stage_inputs import build_feature_tree, copy_tree, make_params

pytestmark = pytest.mark.slow  # fine-tunes a backbone

EVERY_AUGMENTATION = {"rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.1}  # flip is on by default
# the recipe of the old Keras guides: top block only, BatchNorm frozen, SGD at a low constant rate
CLASSIC = {"top_blocks": 1, "batch_norm": "frozen", "optimizer": "sgd", "learning_rate": 1e-4, "schedule": "constant",
           "label_smoothing": 0.0, "weight_decay": 0.0}


@pytest.fixture(scope="module")
def tree(tmp_path_factory, fashion_arrays) -> Path:
    root = build_feature_tree(tmp_path_factory.mktemp("head"), *fashion_arrays)
    train_head.run(make_params(root), Layout(root))
    return root


@pytest.fixture
def layout(tree: Path, tmp_path: Path) -> Layout:
    return copy_tree(tree, tmp_path / "project")


def _info(layout: Layout) -> dict:
    return json.loads((layout.finetune_dir / "info.json").read_text())


def _val_images(layout: Layout) -> tuple[list[str], np.ndarray]:
    with np.load(layout.features_dir / "val.npz") as data:
        return [str(layout.root / p) for p in data["path"]], data["labels"]


def _sublayer(model: keras.Model, name: str) -> keras.Layer:
    return next(layer for layer in all_layers(model) if layer.name == name)


def test_warm_start_keeps_head_accuracy_and_trains_only_the_top(layout: Layout) -> None:
    info = finetune.run(make_params(layout.root, finetune=CLASSIC), layout)

    history = pd.read_csv(layout.finetune_dir / "history.csv")
    paths, labels = _val_images(layout)
    one_image = 1.0 / len(labels)
    # Epoch 0 is the assembled model before training: same pixels, preprocessing and weights as the
    # cached features, so it reproduces the head's accuracy; float summation order may flip one
    # borderline image. One epoch at lr 1e-4 moves the weights very little: the same one-image slack.
    assert info["initial_val_accuracy"] == pytest.approx(info["head_val_accuracy"], abs=one_image + 1e-6)
    assert history.loc[1, "val_accuracy"] >= info["head_val_accuracy"] - one_image - 1e-6
    assert info["head_val_accuracy"] >= 0.6  # a real head, so the check above means something

    model = keras.saving.load_model(layout.finetune_dir / "model.keras", safe_mode=True)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)
    kinds = {type(layer).__name__ for layer in all_layers(model)}
    assert not any(kind.startswith("Random") or kind == "Lambda" for kind in kinds)  # inference path is clean
    predicted = model.predict(image_dataset(paths, None, 32, 16), verbose=0).argmax(axis=1)
    assert (predicted == labels).mean() == pytest.approx(info["best_val_accuracy"])

    original = load_backbone("mobilenet_v2_tv", "packaged", 32, layout.backbone_dir).base
    batch_norms = [layer for layer in all_layers(original) if isinstance(layer, keras.layers.BatchNormalization)]
    assert info["frozen_batch_norm_layers"] == len(batch_norms) and info["first_trainable_name"] == "top_conv"
    for layer in batch_norms:  # moving statistics and affine weights untouched
        for before, after in zip(layer.get_weights(), _sublayer(model, layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(before, after)
    if info["fine_tuned"]:  # the unfrozen conv moved, a frozen one did not
        assert not np.array_equal(original.get_layer("top_conv").get_weights()[0],
                                  _sublayer(model, "top_conv").get_weights()[0])
    np.testing.assert_array_equal(original.get_layer("block_16_project_conv").get_weights()[0],
                                  _sublayer(model, "block_16_project_conv").get_weights()[0])

    assert info["epochs_run"] == 1 and info["replicas"] == 1 and info["tf_version"] and info["device"]
    assert {"fine_tuned", "classes", "image_size", "backbone", "weights_id", "interpolation",
            "best_val_accuracy", "head_val_accuracy"} <= set(info)
    live = layout.root / "live" / "finetune"
    assert len(pd.read_csv(live / "plots" / "metrics" / "eval" / "accuracy.tsv", sep="\t")) == 2  # head + epoch 1
    assert json.loads((live / "metrics.json").read_text())["restored_best"]["val_accuracy"] == info["best_val_accuracy"]


def test_default_recipe_trains_every_layer_and_batch_norm_statistics(layout: Layout) -> None:
    info = finetune.run(make_params(layout.root, finetune={"top_blocks": "all", "epochs": 2}), layout)

    assert info["first_trainable_layer"] == 0 and info["frozen_batch_norm_layers"] == 0
    assert info["params"]["optimizer"] == "adamw" and info["params"]["schedule"] == "one_cycle"
    # The last epoch's checkpoint, loaded into the saved classifier, whatever epoch was kept
    # (on this 32 px set the head-only model often stays best).
    state_file = next(layout.checkpoint_dir.glob("*/state.json"))
    state = json.loads(state_file.read_text())
    model = keras.saving.load_model(layout.finetune_dir / "model.keras", safe_mode=True)
    model.load_weights(state_file.parent / state["last"])
    original = load_backbone("mobilenet_v2_tv", "packaged", 32, layout.backbone_dir).base
    for name in ("stem_conv", "block_8_expand_conv", "top_conv"):  # bottom, middle and top convolutions all moved
        assert not np.array_equal(original.get_layer(name).get_weights()[0], _sublayer(model, name).get_weights()[0])
    before, after = original.get_layer("stem_bn").get_weights(), _sublayer(model, "stem_bn").get_weights()
    assert not np.array_equal(before[2], after[2])  # the moving mean followed the new images
    history = pd.read_csv(layout.finetune_dir / "history.csv")
    assert len(history) == 3 and history["val_loss"].notna().all() and state["epochs_done"] == 2


def test_resumed_run_equals_uninterrupted_run(layout: Layout, tree: Path, tmp_path: Path) -> None:
    """A run stopped after epoch 1 and started again ends with the same weights as one that never stopped."""
    # every augmentation layer on, so the resumed run must also replay their random state
    # constant rate: a schedule is stretched over the planned epochs, so only then does epochs=1 then 2 resume
    settings = {"epochs": 2, "schedule": "constant", "learning_rate": 0.01, "augmentation": EVERY_AUGMENTATION}
    finetune.run(make_params(layout.root, finetune=settings), layout)

    interrupted = copy_tree(tree, tmp_path / "interrupted")
    # a checkpoint from other settings is never resumed
    stale = finetune.run(make_params(interrupted.root, finetune={**settings, "epochs": 1, "learning_rate": 0.02}), interrupted)
    first = finetune.run(make_params(interrupted.root, finetune={**settings, "epochs": 1}), interrupted)
    resumed = finetune.run(make_params(interrupted.root, finetune=settings), interrupted)
    assert (stale["resumed_from_epoch"], first["resumed_from_epoch"], resumed["resumed_from_epoch"]) == (0, 0, 1)
    assert stale["checkpoint_key"] != first["checkpoint_key"] == resumed["checkpoint_key"]

    def weights(project: Layout, key: str) -> list[np.ndarray]:
        """The last epoch's weights (BatchNorm statistics included), whichever epoch the stage kept."""
        state = json.loads((project.checkpoint_dir / key / "state.json").read_text())
        model = keras.saving.load_model(project.finetune_dir / "model.keras")
        model.load_weights(project.checkpoint_dir / key / state["last"])
        return model.get_weights()

    uninterrupted = weights(layout, resumed["checkpoint_key"])
    assert not all(np.array_equal(a, b) for a, b in zip(uninterrupted, weights(interrupted, stale["checkpoint_key"]),
                                                         strict=True))  # a different run does differ
    for a, b in zip(uninterrupted, weights(interrupted, resumed["checkpoint_key"]), strict=True):
        np.testing.assert_array_equal(a, b)
    columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    pd.testing.assert_frame_equal(pd.read_csv(layout.finetune_dir / "history.csv")[columns],
                                  pd.read_csv(interrupted.finetune_dir / "history.csv")[columns])


def test_disabled_stage_exports_the_head_only_model(layout: Layout) -> None:
    info = finetune.run(make_params(layout.root, finetune={"enabled": False}), layout)

    assert not info["fine_tuned"] and info["epochs_run"] == 0 and not layout.checkpoint_dir.exists()
    model = keras.saving.load_model(layout.finetune_dir / "model.keras", safe_mode=True)
    head = keras.saving.load_model(layout.head_dir / "head.keras", safe_mode=True)
    paths, _ = _val_images(layout)
    with np.load(layout.features_dir / "val.npz") as data:
        from_features = head.predict(data["features"], verbose=0)
    from_images = model.predict(image_dataset(paths, None, 32, 16), verbose=0)
    np.testing.assert_allclose(from_images, from_features, atol=1e-4)
    assert (layout.root / "live" / "finetune" / "metrics.json").exists()


MIRRORED = """
import json, sys
from pathlib import Path
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tasks import finetune
from headstart.layout import Layout
from tests.stage_inputs import make_params
root = Path(sys.argv[1])
info = finetune.run(make_params(root, finetune={"distribution": "mirrored"}), Layout(root))
print("INFO=" + json.dumps(info))
"""


def test_same_code_runs_mirrored_over_two_logical_cpus(layout: Layout) -> None:
    # logical devices must be configured before TF initialises: a fresh interpreter
    done = subprocess.run([sys.executable, "-c", MIRRORED, str(layout.root)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.split("INFO=", 1)[1])
    assert info["replicas"] == 2 and info["epochs_run"] == 1
    assert info["initial_val_accuracy"] == pytest.approx(info["head_val_accuracy"], abs=1.0 / 18 + 1e-6)
    keras.saving.load_model(layout.finetune_dir / "model.keras", safe_mode=True)


def test_augmentation_is_seeded_per_epoch_and_each_layer_can_be_off(layout: Layout) -> None:
    assert build_augmentation(AugmentationParams(flip="none", rotation=0, zoom=0, translation=0, contrast=0), 0) is None
    assert [type(layer).__name__ for layer in build_augmentation(AugmentationParams(), 0).layers] == ["RandomFlip"]
    every = AugmentationParams(**EVERY_AUGMENTATION)
    no_flip = build_augmentation(every.model_copy(update={"flip": "none"}), 0)
    assert [type(layer).__name__ for layer in no_flip.layers] == [
        "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast"]

    params = make_params(layout.root)
    paths, labels = _val_images(layout)
    with np.load(layout.features_dir / "val.npz") as data:
        keys = list(data["sha256"])
    images = cached_images(paths, keys, 32, "bilinear", layout.image_cache_dir)
    # the cache holds what the evaluation pipeline decodes and resizes, unrounded
    decoded = np.concatenate([batch.numpy() for batch in image_dataset(paths, None, 32, 16)])
    np.testing.assert_array_equal(images, decoded)

    def first_batch(epoch: int, augmentation: AugmentationParams = every) -> np.ndarray:
        ft = params.finetune.model_copy(update={"augmentation": augmentation})
        data = EpochData(images, labels, len(labels) - 2, 3, ft)
        data.start_epoch(epoch)
        return next(iter(data.train))[0].numpy()

    np.testing.assert_array_equal(first_batch(0), first_batch(0))
    assert not np.array_equal(first_batch(0), first_batch(1))
    plain = AugmentationParams(flip="none", rotation=0, zoom=0, translation=0, contrast=0)
    assert not np.array_equal(first_batch(0), first_batch(0, plain))  # same order, augmented pixels


def test_bad_inputs_are_named(layout: Layout, tmp_path: Path) -> None:
    with pytest.raises(RandomWeightsError, match="allow_random_weights"):
        finetune.run(make_params(layout.root, features={"weights": "none"}), layout)
    with pytest.raises(ArtifactError, match="unknown class"):
        finetune.run(make_params(layout.root, train_head={"class_weight": {"jacket": 2.0}}), layout)
    with pytest.raises(FileNotFoundError, match="run `headstart train_head`"):
        finetune.run(make_params(tmp_path), Layout(tmp_path))

    info_path = layout.head_dir / "info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "classes": ["a", "b", "c"]}))
    with pytest.raises(FinetuneError, match=r"models/head/info.json lists classes \['a', 'b', 'c'\]"):
        finetune.run(make_params(layout.root), layout)
    info_path.write_text(json.dumps(info))
    features_info = layout.features_dir / "info.json"
    recorded = json.loads(features_info.read_text())
    features_info.write_text(json.dumps({**recorded, "weights_id": "other-weights"}))
    try:
        with pytest.raises(ValueError, match="computed with weights other-weights, features.weights now loads"):
            finetune.run(make_params(layout.root), layout)
    finally:
        features_info.write_text(json.dumps(recorded))


def test_later_stages_load_the_backbone_at_the_size_features_recorded(layout: Layout) -> None:
    """features resolves `image_size` (auto included) once and records it; a changed setting does not
    reach the head's backbone before features has run again."""
    from headstart.training import assemble

    model, backbone = assemble(make_params(layout.root, features={"image_size": 40}), layout)
    recorded = json.loads((layout.features_dir / "info.json").read_text())["image_size"]
    assert backbone.image_size == recorded == model.input_shape[1] != 40


def test_lr_find_writes_a_curve_and_a_suggestion_without_touching_models(layout: Layout) -> None:
    from headstart.files import sha256_file
    from tasks import lr_find

    head_before = sha256_file(layout.head_dir / "head.keras")
    found = lr_find.run(make_params(layout.root, lr_find={"steps": 30, "start_lr": 1e-6, "end_lr": 10.0}), layout)

    curve = pd.read_csv(layout.reports_dir / "lr_find.csv")
    assert 5 <= len(curve) <= 30 and list(curve["step"]) == list(range(len(curve)))
    ratios = curve["learning_rate"].iloc[1:].to_numpy() / curve["learning_rate"].iloc[:-1].to_numpy()
    np.testing.assert_allclose(ratios, (10.0 / 1e-6) ** (1 / 29), rtol=1e-6)  # geometric growth
    assert curve["smoothed_loss"].iloc[-1] > curve["smoothed_loss"].min()  # it ran into the divergence
    saved = json.loads((layout.reports_dir / "lr_find.json").read_text())
    assert saved["suggested_learning_rate"] == pytest.approx(found["suggested_learning_rate"])
    assert saved["suggested_learning_rate"] == pytest.approx(saved["min_loss_learning_rate"] / 10)
    assert 1e-7 <= saved["suggested_learning_rate"] < 1.0
    assert layout.lr_find_plot.stat().st_size > 1000 and layout.lr_find_plot.parent != layout.figures_dir
    assert sha256_file(layout.head_dir / "head.keras") == head_before and not layout.finetune_dir.exists()


def test_damaged_checkpoint_is_named_and_the_run_starts_from_the_head(layout: Layout, caplog) -> None:
    settings = {"epochs": 1, "schedule": "constant"}
    first = finetune.run(make_params(layout.root, finetune=settings), layout)
    state = layout.checkpoint_dir / first["checkpoint_key"] / "state.json"
    state.write_text('{"epochs_done": 1, "last": ')  # a write cut short
    with caplog.at_level(logging.WARNING):
        again = finetune.run(make_params(layout.root, finetune=settings), layout)
    assert again["resumed_from_epoch"] == 0 and again["epochs_run"] == 1
    assert f"checkpoint {state.parent} is damaged" in caplog.text
    assert json.loads(state.read_text())["epochs_done"] == 1  # written afresh
