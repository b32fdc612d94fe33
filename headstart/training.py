"""Training on images, shared by finetune and lr_find: the model, its trainable part, optimizer, data, callbacks.

Keras' optimizers have one learning rate for every variable. Discriminative learning rates and
gradual unfreezing need one per group of variables, so `make_optimizer` returns the chosen Keras
optimizer extended by `_ScaledUpdates`: a per-variable multiplier (a variable, so a callback can
change it between epochs without recompiling) and decoupled weight decay that follows it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from headstart.backbones.cuts import cut_points, resolve_unfreeze_index
from headstart.backbones.loading import load_backbone
from headstart.backbones.registry import Backbone
from headstart.files import atomic_path, atomic_write_json
from headstart.layout import Layout
from headstart.model import build_augmentation, build_classifier, freeze_batch_norm, reseed
from headstart.params import FinetuneParams, Params

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]
ONE_CYCLE_START = 25.0  # one-cycle warm-up starts at peak / 25 (fastai's div)


def learning_rate_schedule(ft: FinetuneParams, total_steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """constant, cosine (optionally warmed up from 0) or one-cycle (warm up from peak/25, then cosine to 0)."""
    if ft.schedule == "constant":
        return ft.learning_rate
    warmup = int(round(ft.warmup_fraction * total_steps))
    start = ft.learning_rate / ONE_CYCLE_START if ft.schedule == "one_cycle" else 0.0
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(ft.learning_rate, max(1, total_steps))
    return keras.optimizers.schedules.CosineDecay(
        start, decay_steps=max(1, total_steps - warmup), warmup_target=ft.learning_rate, warmup_steps=warmup
    )


class _ScaledUpdates:
    """Mixin for a Keras optimizer: per-variable learning-rate multipliers and decoupled weight decay.

    The decay (AdamW's, Loshchilov & Hutter) is applied to kernels only, not to biases or BatchNorm
    scales, and is scaled like the update, so a variable whose multiplier is 0 does not move at all.
    """

    def __init__(self, *args: Any, weight_decay_rate: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.variable_scales: dict[Any, tf.Variable] = {}
        self._decay_rate = weight_decay_rate

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> Any:
        scale = self.variable_scales.get(self._var_key(variable))
        if scale is not None:
            learning_rate = learning_rate * keras.ops.cast(scale, learning_rate.dtype)
        if self._decay_rate and len(variable.shape) > 1:
            variable.assign_sub(variable * keras.ops.cast(self._decay_rate * learning_rate, variable.dtype))
        return super().update_step(gradient, variable, learning_rate)


class ScaledAdam(_ScaledUpdates, keras.optimizers.Adam):
    pass


class ScaledSGD(_ScaledUpdates, keras.optimizers.SGD):
    pass


def make_optimizer(
    ft: FinetuneParams, total_steps: int, scaled: list[tuple[keras.Variable, tf.Variable]]
) -> keras.optimizers.Optimizer:
    """adamw = Adam + decoupled decay; adam has no decay; sgd (momentum) takes the decay when set.

    `scaled` pairs variables with their learning-rate multiplier; the others train at the full rate.
    """
    lr = learning_rate_schedule(ft, total_steps)
    if ft.optimizer == "sgd":
        optimizer = ScaledSGD(lr, momentum=ft.momentum, weight_decay_rate=ft.weight_decay)
    else:
        optimizer = ScaledAdam(lr, weight_decay_rate=ft.weight_decay if ft.optimizer == "adamw" else 0.0)
    # keyed as the TF optimizer keys a variable inside update_step (distributed variables included)
    optimizer.variable_scales = {optimizer._var_key(variable.value): scale for variable, scale in scaled}
    return optimizer


def block_scales(blocks: int, unfreeze_epochs: int, multiplier: float) -> tuple[list[tf.Variable], Callable[[int], None]]:
    """One learning-rate multiplier per trained backbone block, and the function setting them for an epoch.

    Gradual unfreezing (ULMFiT): over the first `unfreeze_epochs` epochs the blocks are released
    top-down in equal steps; a block not yet released has multiplier 0. Released blocks train at
    `multiplier` x the learning rate (discriminative rates); the head is never scaled.
    """
    scales = [tf.Variable(multiplier, trainable=False, dtype=tf.float32) for _ in range(blocks)]

    def release(epoch: int) -> None:
        share = 1.0 if not unfreeze_epochs else min(1.0, (epoch + 1) / unfreeze_epochs)
        released = math.ceil(share * blocks)
        for index, scale in enumerate(scales):
            scale.assign(multiplier if index >= blocks - released else 0.0)

    return scales, release


class EpochCheckpoints(keras.callbacks.Callback):
    """What ModelCheckpoint and BackupAndRestore lack, for a resumable run that can keep the head only.

    Both Keras callbacks write their files in place, so a kill mid-write leaves a torn checkpoint,
    and neither knows the baseline (the head-only model, epoch 0). Here each epoch's weights (with
    the optimizer state) are written atomically, then `state.json` names them: a killed run resumes
    from the last complete epoch. `best` only moves when val loss beats every earlier epoch, the
    baseline included. The callback also prepares each epoch (`before_epoch`) so that data order,
    augmentation and dropout are pure functions of the epoch, and restores EarlyStopping's count.
    """

    def __init__(self, folder: Path, state: dict[str, Any], before_epoch: Callable[[int], None],
                 stopper: keras.callbacks.EarlyStopping | None) -> None:
        super().__init__()
        self.folder, self.state, self.before_epoch, self.stopper = folder, state, before_epoch, stopper

    @staticmethod
    def load(folder: Path) -> dict[str, Any] | None:
        path = folder / "state.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, improved: bool) -> None:
        epoch = self.state["epochs_done"]
        self.state["last"] = f"epoch-{epoch}.weights.h5"
        with atomic_path(self.folder / self.state["last"], suffix=".weights.h5") as tmp:
            self.model.save_weights(tmp)
        if improved:
            self.state["best"] = f"best-{epoch}.weights.h5"
            with atomic_path(self.folder / self.state["best"], suffix=".weights.h5") as tmp:
                tmp.write_bytes((self.folder / self.state["last"]).read_bytes())
        atomic_write_json(self.folder / "state.json", self.state)
        for old in self.folder.glob("*.weights.h5"):
            if old.name not in (self.state["last"], self.state["best"]):
                old.unlink()

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.stopper is not None:  # placed after EarlyStopping, whose on_train_begin resets its count
            self.stopper.best, self.stopper.wait = self.state["best_val_loss"], self.state["wait"]

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.before_epoch(epoch)
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        entry = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items() if k != "learning_rate"},
                 "seconds": time.perf_counter() - self.started}
        improved = entry["val_loss"] < self.state["best_val_loss"]
        self.state["history"].append(entry)
        self.state["epochs_done"] = epoch + 1
        self.state["wait"] = 0 if improved else self.state["wait"] + 1
        if improved:
            self.state["best_val_loss"], self.state["best_epoch"] = entry["val_loss"], epoch + 1
        self.save(improved)
        log.info("epoch %d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f (%.1f s)", epoch + 1, entry["loss"],
                 entry["accuracy"], entry["val_loss"], entry["val_accuracy"], entry["seconds"])


def array_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, order: Callable[[], np.ndarray]
) -> tf.data.Dataset:
    """Batches of (uint8 images, one-hot labels) from an in-memory or memory-mapped array.

    `order()` is called when an epoch's iterator starts (Keras creates one per epoch, after
    `on_epoch_begin`), so the order can depend on the epoch a callback has just set.
    """
    size, classes = images.shape[1], labels.shape[1]

    def generate() -> Any:
        index = order()
        for start in range(0, len(index), batch_size):
            chosen = index[start : start + batch_size]
            yield images[chosen], labels[chosen]

    signature = (tf.TensorSpec((None, size, size, 3), tf.uint8), tf.TensorSpec((None, classes), tf.float32))
    batches = math.ceil(len(images) / batch_size)
    return tf.data.Dataset.from_generator(generate, output_signature=signature).apply(
        tf.data.experimental.assert_cardinality(batches))


def one_hot(labels: Sequence[int], classes: int) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]


def image_rows(layout: Layout, manifest: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray, int]:
    """The manifest rows of the train then the val images, their class indices, and the train count."""
    rows = pd.concat([manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]])
    n_train = int((rows["split"] == "train").sum())
    if not n_train or n_train == len(rows):
        raise ValueError(f"{layout.split_manifest}: fine-tuning needs train and val images (split.val > 0)")
    labels = rows["label"].map({name: i for i, name in enumerate(classes)}).to_numpy(np.int32)
    return rows, labels, n_train


class EpochData:
    """Training and validation batches from the decoded-image cache; each epoch's order and augmentation
    are a pure function of (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, n_train: int, classes: int, ft: FinetuneParams):
        self.ft, self.n_train, self.epoch = ft, n_train, 0
        targets = one_hot(labels, classes)
        self.augment = build_augmentation(ft.augmentation, seed=ft.seed * 1000)
        augment = self.augment

        def train_map(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            images = tf.cast(images, tf.float32)
            return (images if augment is None else augment(images, training=True)), labels

        # sequential map: the augmentation layers' random state advances batch by batch, in order
        self.train = _distribution_options(
            array_batches(images[:n_train], targets[:n_train], ft.batch_size, self._order).map(train_map)
            .prefetch(tf.data.AUTOTUNE))
        self.val = _distribution_options(
            array_batches(images[n_train:], targets[n_train:], ft.batch_size, lambda: np.arange(len(labels) - n_train))
            .map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(tf.data.AUTOTUNE))

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.ft.seed, self.epoch]).permutation(self.n_train)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.augment is not None:
            reseed(self.augment, self.ft.seed * 1000 + epoch * 10)


def _distribution_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def configure_trainable(model: keras.Model, backbone: Backbone, ft: FinetuneParams) -> tuple[dict[str, Any], list[list]]:
    """Train base layers from the cut point on, and the head; preprocessing never trains.

    With `batch_norm: frozen` every BatchNormalization layer is set non-trainable, which in Keras 3
    also runs it in inference mode. Returns a description for info.json and the trained backbone
    variables grouped by block, top block last (for per-block learning rates).
    """
    layers = backbone.base.layers
    first = resolve_unfreeze_index(backbone, ft.unfreeze_from, ft.top_blocks) if ft.enabled else len(layers)
    backbone.base.trainable = True
    for index, layer in enumerate(layers):
        layer.trainable = index >= first
    backbone.preprocess.trainable = False
    frozen_bn = freeze_batch_norm(model) if ft.batch_norm == "frozen" else 0
    starts = sorted({first, *(i for i in cut_points(backbone).values() if i > first)}) if first < len(layers) else []
    blocks: list[list] = [[] for _ in starts]
    for index in range(first, len(layers)):
        blocks[int(np.searchsorted(starts, index, side="right")) - 1].extend(layers[index].trainable_weights)
    described = {
        "first_trainable_layer": first,
        "first_trainable_name": layers[first].name if first < len(layers) else None,
        "trained_blocks": len(blocks),
        "trainable_weights": len(model.trainable_weights),
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "frozen_batch_norm_layers": frozen_bn,
    }
    return described, blocks


def assemble(params: Params, layout: Layout) -> tuple[keras.Model, Backbone]:
    """The head-trained classifier: backbone (with its weights) composed with the saved head."""
    features = params.features
    backbone = load_backbone(features.backbone, features.weights, features.image_size, layout.backbone_dir,
                             allow_random=features.allow_random_weights)
    head = keras.saving.load_model(layout.head_dir / "head.keras", compile=False, safe_mode=True)
    return build_classifier(backbone, head), backbone


def compile_for_finetuning(model: keras.Model, blocks: list[list], ft: FinetuneParams,
                           steps_per_epoch: int) -> Any:
    """Compile (after changing `trainable`: compile captures the trainable variables) with the recipe's
    optimizer, schedule and loss; returns the function that sets each epoch's per-block rates."""
    scales, release = block_scales(len(blocks), ft.unfreeze_epochs, ft.backbone_lr_multiplier)
    scaled = [(variable, scales[b]) for b, block in enumerate(blocks) for variable in block]
    model.compile(optimizer=make_optimizer(ft, steps_per_epoch * ft.epochs, scaled),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=ft.label_smoothing),
                  metrics=["accuracy"], jit_compile=ft.jit_compile)
    model.optimizer.build(model.trainable_variables)
    return release
