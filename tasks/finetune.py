"""finetune stage: train the top of the backbone together with the trained head, on images.

The model is the head-trained classifier (warm start): preprocessing -> base(training=False) ->
pooling -> head. Layers from the cut point up are unfrozen except BatchNormalization, the model is
recompiled, and it trains at a low learning rate on streamed, augmented image batches. Each
epoch is checkpointed (weights + optimizer + early-stopping state) under a key of every input, so
a killed run resumes where it stopped and reaches the same weights as an uninterrupted one. The
model before the first epoch is the baseline: if no epoch beats its validation loss, the head-only
model is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from dvclive import Live
from dvclive.utils import standardize_metric_name

from tasks.backbones import Backbone, load_backbone, resolve_unfreeze_index
from tasks.datasets import image_dataset
from tasks.files import atomic_directory, atomic_path, atomic_write_json, sha256_file
from tasks.layout import Layout
from tasks.model import (
    build_augmentation,
    build_classifier,
    freeze_batch_norm,
    require_trained_weights,
    reseed,
    runtime_info,
    seed_everything,
)
from tasks.params import FinetuneParams, Params
from tasks.train_head import class_weights, live_dir, read_features_info

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]


class FinetuneError(ValueError):
    """Inputs fine-tuning cannot use; the message names the file or key."""


# ---------------------------------------------------------------- distribution


def choose_strategy(kind: str) -> tf.distribute.Strategy:
    """auto: several workers in TF_CONFIG -> multi-worker, several GPUs -> mirrored, else the default.

    `mirrored` without GPUs mirrors over the logical CPU devices (how the tests run it on CPU).
    """
    workers = len(json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", []))
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "multi_worker" or (kind == "auto" and workers > 1):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if kind == "auto" and len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes outputs; other multi-worker replicas write to a scratch folder."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


@contextmanager
def precision(mixed: bool) -> Iterator[None]:
    """mixed_float16 while the model is built and trained; the global policy is restored after."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


# ---------------------------------------------------------------- inputs


def _read_json(path: Path, stage: str) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the {stage} stage first (headstart {stage})")
    return json.loads(path.read_text())


def read_manifest(layout: Layout) -> pd.DataFrame:
    path = layout.split_manifest
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the split stage first (headstart split)")
    manifest = pd.read_csv(path, dtype={"label": str, "split": str, "path": str}, keep_default_na=False)
    missing = {"path", "label", "split"} - set(manifest.columns)
    if missing:
        raise FinetuneError(f"{path}: missing column(s) {sorted(missing)}; rerun the split stage")
    return manifest


def _rows(manifest: pd.DataFrame, split: str, classes: list[str], layout: Layout) -> tuple[list[str], np.ndarray]:
    rows = manifest[manifest["split"] == split]
    index = {name: i for i, name in enumerate(classes)}
    return [str(layout.root / p) for p in rows["path"]], rows["label"].map(index).to_numpy(np.int32)


def checkpoint_key(params: Params, layout: Layout, weights_id: str) -> str:
    """Hash of everything the fine-tuned weights depend on; a checkpoint under another key is never resumed.

    `epochs` is left out: the weights after epoch k do not depend on how many epochs were planned,
    so raising finetune.epochs continues a finished run instead of starting again.
    """
    inputs = {
        "finetune": params.finetune.model_dump(exclude={"enabled", "epochs"}),
        "features": params.features.model_dump(include={"backbone", "weights", "image_size"}),
        "class_weight": params.train_head.class_weight,
        "weights_id": weights_id,
        "head": sha256_file(layout.head_dir / "head.keras"),
        "manifest": sha256_file(layout.split_manifest),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def training_dataset(
    paths: Sequence[str], labels: np.ndarray, epoch: int, backbone: Backbone, ft: FinetuneParams
) -> tf.data.Dataset:
    """One epoch of shuffled, augmented image batches, a pure function of (seed, epoch).

    Images are streamed from disk; the order and the augmentation layers' seeds derive from the
    epoch, so a resumed run sees exactly the batches an uninterrupted one would.
    """
    order = np.random.default_rng([ft.seed, epoch]).permutation(len(paths))
    ds = image_dataset([paths[i] for i in order], labels[order], backbone.image_size, ft.batch_size,
                       backbone.spec.interpolation)
    augment = build_augmentation(ft.augmentation, seed=ft.seed * 1000 + epoch * 10)
    if augment is None:
        return ds

    def augmented(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return augment(images, training=True), labels

    # sequential map: the layers' random state advances batch by batch, in order
    return ds.map(augmented).prefetch(tf.data.AUTOTUNE)


def _distribution_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


# ---------------------------------------------------------------- model


def make_optimizer(ft: FinetuneParams) -> keras.optimizers.Optimizer:
    if ft.optimizer == "adam":
        return keras.optimizers.Adam(ft.learning_rate)
    return keras.optimizers.SGD(ft.learning_rate, momentum=ft.momentum)


def unfreeze(model: keras.Model, backbone: Backbone, first_trainable: int) -> dict[str, int]:
    """Train base layers from `first_trainable` on and the head; BatchNorm and preprocessing stay frozen."""
    backbone.base.trainable = True
    for index, layer in enumerate(backbone.base.layers):
        layer.trainable = index >= first_trainable
    backbone.preprocess.trainable = False
    frozen_bn = freeze_batch_norm(model)
    return {
        "first_trainable_layer": first_trainable,
        "first_trainable_name": backbone.base.layers[first_trainable].name if first_trainable < len(backbone.base.layers) else None,
        "trainable_weights": len(model.trainable_weights),
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "frozen_batch_norm_layers": frozen_bn,
    }


def assemble(params: Params, layout: Layout) -> tuple[keras.Model, Backbone]:
    """The head-trained classifier: backbone (with its weights) composed with the saved head."""
    features = params.features
    backbone = load_backbone(features.backbone, features.weights, features.image_size, layout.backbone_dir,
                             allow_random=features.allow_random_weights)
    head = keras.saving.load_model(layout.head_dir / "head.keras", compile=False, safe_mode=True)
    return build_classifier(backbone, head), backbone


# ---------------------------------------------------------------- checkpoints


class Checkpoints:
    """Per-epoch weights (with optimizer state) plus a state.json naming them, written in that order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.state_path = folder / "state.json"

    def load(self) -> dict[str, Any] | None:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else None

    def save(self, model: keras.Model, state: dict[str, Any], best_improved: bool) -> None:
        epoch = state["epochs_done"]
        state["last"] = f"epoch-{epoch}.weights.h5"
        with atomic_path(self.folder / state["last"], suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
        if best_improved:
            state["best"] = f"best-{epoch}.weights.h5"
            shutil.copyfile(self.folder / state["last"], self.folder / state["best"])
        atomic_write_json(self.state_path, state)
        for old in self.folder.glob("*.weights.h5"):
            if old.name not in (state["last"], state["best"]):
                old.unlink()

    def restore(self, model: keras.Model, name: str) -> None:
        model.load_weights(self.folder / name)


# ---------------------------------------------------------------- stage


def _evaluate(model: keras.Model, val_ds: tf.data.Dataset) -> dict[str, float]:
    loss, accuracy = model.evaluate(val_ds, verbose=0)
    return {"val_loss": float(loss), "val_accuracy": float(accuracy)}


def _write_outputs(target: Path, model: keras.Model, info: dict[str, Any], history: list[dict[str, Any]]) -> None:
    with atomic_directory(target) as staging:
        model.save(staging / "model.keras")
        pd.DataFrame(history, columns=HISTORY_COLUMNS).to_csv(staging / "history.csv", index=False)
        (staging / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def _log_live(live: Live, history: list[dict[str, Any]]) -> None:
    """dvclive step 0 is the head-only model, step k the k-th fine-tuning epoch (names as dvclive's Keras callback)."""
    for entry in history:
        for name, value in entry.items():
            if name not in ("epoch", "seconds"):
                live.log_metric(standardize_metric_name(name, "dvclive.keras"), value)
        live.next_step()


def train_epochs(
    model: keras.Model,
    backbone: Backbone,
    ft: FinetuneParams,
    state: dict[str, Any],
    checkpoints: Checkpoints,
    live: Live,
    train: tuple[list[str], np.ndarray],
    val_ds: tf.data.Dataset,
    weights: dict[int, float] | None,
) -> None:
    """Train from the state's next epoch, checkpointing each one; early stopping on validation loss."""
    for epoch in range(state["epochs_done"], ft.epochs):
        if state["stopped"]:
            break
        reseed(model, ft.seed * 1000 + epoch)
        train_ds = _distribution_options(training_dataset(*train, epoch, backbone, ft))
        started = time.perf_counter()
        fit = model.fit(train_ds, validation_data=val_ds, initial_epoch=epoch, epochs=epoch + 1,
                        class_weight=weights, shuffle=False, verbose=0)
        entry = {"epoch": epoch + 1, **{k: float(v[-1]) for k, v in fit.history.items()},
                 "seconds": time.perf_counter() - started}
        improved = entry["val_loss"] < state["best_val_loss"]
        state["history"].append(entry)
        state["epochs_done"] = epoch + 1
        state["wait"] = 0 if improved else state["wait"] + 1
        if improved:
            state["best_val_loss"], state["best_epoch"] = entry["val_loss"], epoch + 1
        state["stopped"] = 0 < ft.early_stopping_patience <= state["wait"]  # patience 0: never stop early
        checkpoints.save(model, state, best_improved=improved)
        _log_live(live, [entry])
        log.info("finetune: epoch %d/%d loss %.4f acc %.4f val_loss %.4f val_acc %.4f (%.1f s)", epoch + 1,
                 ft.epochs, entry["loss"], entry["accuracy"], entry["val_loss"], entry["val_accuracy"], entry["seconds"])


def run(params: Params, layout: Layout) -> dict[str, Any]:
    ft = params.finetune
    require_trained_weights(params.features)
    head_info = _read_json(layout.head_dir / "info.json", "train_head")
    features_info = read_features_info(layout)
    manifest = read_manifest(layout)
    classes = sorted(manifest["label"].unique())
    for source, listed in (("models/head/info.json", head_info["classes"]), ("data/features/info.json", features_info["classes"])):
        if list(listed) != classes:
            raise FinetuneError(
                f"{source} lists classes {list(listed)} but {layout.split_manifest} has {classes}: rerun features and train_head"
            )
    train_paths, train_labels = _rows(manifest, "train", classes, layout)
    val_paths, val_labels = _rows(manifest, "val", classes, layout)
    if not len(val_paths) or not len(train_paths):
        raise FinetuneError(f"{layout.split_manifest}: fine-tuning needs train and val images (split.val > 0)")
    weights = class_weights(params.train_head.class_weight, train_labels, classes)

    strategy = choose_strategy(ft.distribution if ft.enabled else "none")
    chief = is_chief(strategy)
    seed_everything(ft.seed, ft.deterministic)
    with precision(ft.mixed_precision and ft.enabled), strategy.scope():
        model, backbone = assemble(params, layout)
        if features_info.get("weights_id") != backbone.weights_id or int(features_info["image_size"]) != backbone.image_size:
            raise FinetuneError(
                f"data/features/info.json was computed with weights {features_info.get('weights_id')} at "
                f"{features_info['image_size']} px, the backbone now loads {backbone.weights_id} at {backbone.image_size} px: "
                "rerun features and train_head"
            )
        cut = resolve_unfreeze_index(backbone, ft.unfreeze_from, ft.top_blocks) if ft.enabled else len(backbone.base.layers)
        trainable = unfreeze(model, backbone, cut)
        # recompile after changing `trainable`: compile captures the trainable variables
        model.compile(optimizer=make_optimizer(ft), loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=["accuracy"], jit_compile=ft.jit_compile)
        model.optimizer.build(model.trainable_variables)

    val_ds = _distribution_options(image_dataset(val_paths, val_labels, backbone.image_size, ft.batch_size,
                                                 backbone.spec.interpolation))
    scratch = None if chief else Path(tempfile.mkdtemp(prefix="headstart-worker-"))
    key = checkpoint_key(params, layout, backbone.weights_id)
    checkpoints = Checkpoints((scratch or layout.checkpoint_dir) / key)
    state = checkpoints.load() if ft.enabled else None
    if state is not None and state["epochs_done"] > ft.epochs:
        log.info("finetune: checkpoint %s ran %d epochs, more than the %d asked: starting again", checkpoints.folder,
                 state["epochs_done"], ft.epochs)
        state = None
    resumed_from = state["epochs_done"] if state else 0
    if state is None:
        baseline = {"epoch": 0, **_evaluate(model, val_ds)}
        state = {"epochs_done": 0, "history": [baseline], "best_val_loss": baseline["val_loss"], "best_epoch": 0,
                 "wait": 0, "stopped": False}
        if ft.enabled:
            checkpoints.save(model, state, best_improved=True)
    else:
        log.info("finetune: resuming from %s after epoch %d", checkpoints.folder, state["epochs_done"])
        checkpoints.restore(model, state["last"])
    initial = state["history"][0]
    if abs(initial["val_accuracy"] - head_info["val_accuracy"]) > 1.0 / len(val_labels) + 1e-6:
        log.warning("finetune: the assembled model's val accuracy %.4f differs from the head's %.4f on cached "
                    "features: check that features were computed with the same backbone and preprocessing",
                    initial["val_accuracy"], head_info["val_accuracy"])

    live = Live(str(live_dir(layout, "finetune") if chief else scratch / "live"), dvcyaml=None, save_dvc_exp=False)
    _log_live(live, state["history"])
    if ft.enabled:
        train_epochs(model, backbone, ft, state, checkpoints, live, (train_paths, train_labels), val_ds, weights)
        checkpoints.restore(model, state["best"])

    history = state["history"]
    best = history[state["best_epoch"]]
    epoch_seconds = [h["seconds"] for h in history[1:]]
    info = {
        # false when disabled, or when no epoch beat the head-only model (which is then what is saved)
        "fine_tuned": bool(ft.enabled and state["best_epoch"] > 0),
        "classes": classes,
        "image_size": backbone.image_size,
        "backbone": backbone.spec.name,
        "weights_id": backbone.weights_id,
        "interpolation": backbone.spec.interpolation,
        "preprocessing_id": backbone.spec.preprocessing_id,
        "epochs_run": state["epochs_done"],
        "resumed_from_epoch": resumed_from,
        "best_epoch": state["best_epoch"],
        "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"],
        "initial_val_accuracy": initial["val_accuracy"],
        "head_val_accuracy": head_info["val_accuracy"],
        "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
        "replicas": strategy.num_replicas_in_sync,
        "class_weight": weights,
        "checkpoint_key": key,
        "params": ft.model_dump(),
        **trainable,
        **runtime_info(),
    }
    live.summary["restored_best"] = {"val_accuracy": info["best_val_accuracy"], "val_loss": info["best_val_loss"],
                                     "best_epoch": info["best_epoch"]}
    live.summary["seconds_per_epoch"] = info["seconds_per_epoch"]
    live.end()
    _write_outputs(scratch or layout.finetune_dir, model, info, history)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("finetune: best epoch %d, val accuracy %.4f (head %.4f)", info["best_epoch"], info["best_val_accuracy"],
             info["head_val_accuracy"])
    return info
