"""Training on images, shared by finetune and lr_find: the model, its trainable part, its compilation and
the epoch data from the decoded-image cache (optimizers and callbacks live beside it)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from headstart.backbones.cuts import cut_points, resolve_unfreeze_index
from headstart.backbones.loading import load_backbone
from headstart.backbones.registry import Backbone
from headstart.callbacks import EpochCheckpoints, FinetuneState, TimeCap
from headstart.data.artifacts import read_features_info
from headstart.layout import Layout
from headstart.model import build_augmentation, build_classifier, freeze_batch_norm, reseed
from headstart.optimizers import block_scales, make_optimizer
from headstart.params import FinetuneParams, Params

log = logging.getLogger(__name__)


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
    """The head-trained classifier: backbone (with its weights) composed with the saved head.

    The backbone loads at the image size the features stage resolved and recorded ("auto" is resolved
    there only), so the head meets the pixels its features were computed from.
    """
    features, recorded = params.features, read_features_info(layout)
    backbone = load_backbone(features.backbone, features.weights, recorded.image_size, layout.backbone_dir,
                             allow_random=features.allow_random_weights)
    if recorded.weights_id != backbone.weights_id:
        raise ValueError(f"{layout.features_dir / 'info.json'} was computed with weights {recorded.weights_id}, "
                         f"features.weights now loads {backbone.weights_id}: rerun features and train_head")
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


def evaluate_val(model: keras.Model, val: tf.data.Dataset) -> dict[str, float]:
    loss, accuracy = model.evaluate(val, verbose=0)
    return {"val_loss": float(loss), "val_accuracy": float(accuracy)}


def _planned_epochs(ft: FinetuneParams) -> int:
    if not isinstance(ft.epochs, int):
        raise ValueError("finetune.epochs is still 'auto': resolve it with FinetuneParams.epochs_for first")
    return ft.epochs


def start_state(model: keras.Model, data: EpochData, folder: Path, ft: FinetuneParams) -> FinetuneState:
    """The checkpoint's state with its last epoch's weights loaded, or a fresh state whose epoch 0 is the
    head-only model (saved, so that a run killed in its first epoch can still keep the head)."""
    state = FinetuneState.load(folder) if ft.enabled else None
    if state is not None and state.epochs_done > _planned_epochs(ft):
        log.info("finetune: checkpoint %s ran %d epochs, more than the %d asked: starting again", folder,
                 state.epochs_done, ft.epochs)
        state = None
    if state is not None:
        log.info("finetune: resuming from %s after epoch %d", folder, state.epochs_done)
        model.load_weights(folder / state.last)
        return state
    state = FinetuneState.fresh(evaluate_val(model, data.val))
    if ft.enabled:
        state.save(folder, model, improved=True)
    return state


def fit_epochs(model: keras.Model, data: EpochData, ft: FinetuneParams, state: FinetuneState, folder: Path,
               release: Callable[[int], None], callbacks: list[keras.callbacks.Callback],
               class_weight: dict[int, float] | None) -> None:
    """`model.fit` from the state's next epoch to `ft.epochs`, checkpointing every epoch into `folder`, then
    the best epoch's weights loaded. EarlyStopping on val loss when a patience is set, the time cap when
    `max_minutes` is; `callbacks` (logging) run after the checkpoint."""
    epochs = _planned_epochs(ft)
    if not state.stopped and state.epochs_done < epochs:
        def before_epoch(epoch: int) -> None:
            reseed(model, ft.seed * 1000 + epoch)
            data.start_epoch(epoch)
            release(epoch)

        stopper = (keras.callbacks.EarlyStopping("val_loss", patience=ft.early_stopping_patience)
                   if ft.early_stopping_patience else None)
        checkpoints = EpochCheckpoints(folder, state, before_epoch, stopper)
        cap = [] if ft.max_minutes is None else [TimeCap(ft.max_minutes)]  # after the checkpoint: a capped epoch is kept
        model.fit(data.train, validation_data=data.val, initial_epoch=state.epochs_done, epochs=epochs,
                  class_weight=class_weight, shuffle=False, verbose=0,
                  callbacks=[keras.callbacks.TerminateOnNaN(), *([stopper] if stopper else []), checkpoints,
                             *callbacks, *cap])
        state.stopped = bool(model.stop_training)
    model.load_weights(folder / state.best)
