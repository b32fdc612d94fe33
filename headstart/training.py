"""Training on images, shared by finetune and lr_find: the model, its trainable part, its compilation and
the epoch data from the decoded-image cache (optimizers and callbacks live beside it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from headstart.backbones.cuts import cut_points, resolve_unfreeze_index
from headstart.backbones.loading import load_backbone
from headstart.backbones.registry import Backbone
from headstart.data.sources.presets import effective_settings
from headstart.layout import Layout
from headstart.model import build_augmentation, build_classifier, freeze_batch_norm, reseed
from headstart.optimizers import block_scales, make_optimizer
from headstart.params import FinetuneParams, Params


def array_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, order: Callable[[], np.ndarray]
) -> tf.data.Dataset:
    """Batches of (images, one-hot labels) from an in-memory or memory-mapped array, in its dtype.

    `order()` is called when an epoch's iterator starts (Keras creates one per epoch, after
    `on_epoch_begin`), so the order can depend on the epoch a callback has just set.
    """
    size, classes = images.shape[1], labels.shape[1]

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        index = order()
        for start in range(0, len(index), batch_size):
            chosen = index[start : start + batch_size]
            yield images[chosen], labels[chosen]

    signature = (tf.TensorSpec((None, size, size, 3), tf.as_dtype(images.dtype)), tf.TensorSpec((None, classes), tf.float32))
    batches = math.ceil(len(images) / batch_size)
    return tf.data.Dataset.from_generator(generate, output_signature=signature).apply(
        tf.data.experimental.assert_cardinality(batches))


def one_hot(labels: Sequence[int] | np.ndarray, classes: int) -> np.ndarray:
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
    backbone = load_backbone(features.backbone, features.weights, effective_settings(params).image_size,
                             layout.backbone_dir, allow_random=features.allow_random_weights)
    head = keras.saving.load_model(layout.head_model, compile=False, safe_mode=True)
    return build_classifier(backbone, head), backbone


def compile_for_finetuning(model: keras.Model, blocks: list[list], ft: FinetuneParams,
                           steps_per_epoch: int) -> Callable[[int], None]:
    """Compile (after changing `trainable`: compile captures the trainable variables) with the recipe's
    optimizer, schedule and loss; returns the function that sets each epoch's per-block rates."""
    scales, release = block_scales(len(blocks), ft.unfreeze_epochs, ft.backbone_lr_multiplier)
    scaled = [(variable, scales[b]) for b, block in enumerate(blocks) for variable in block]
    model.compile(optimizer=make_optimizer(ft, steps_per_epoch * ft.epochs_for(steps_per_epoch), scaled),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=ft.label_smoothing),
                  metrics=["accuracy"], jit_compile=ft.jit_compile)
    model.optimizer.build(model.trainable_variables)
    return release
