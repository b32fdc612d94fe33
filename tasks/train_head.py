"""train_head stage: fit the classification head on cached backbone features.

The backbone never runs here: an epoch over a few thousand (N, D) feature rows takes milliseconds,
so the head can be tuned freely. Training is seeded with op determinism on, so the same params
and features give the same weights on CPU.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback
from sklearn.metrics import f1_score

from headstart.callbacks import EpochTimer
from headstart.data.artifacts import (
    HeadInfo,
    class_weights,
    load_split,
    read_features_info,
    write_info,
)
from headstart.files import atomic_directory, remove_stale_temps
from headstart.layout import Layout
from headstart.model import compiled_head, head_batches, require_trained_weights
from headstart.params import Params, TrainHeadParams
from headstart.runtime import runtime_info, seed_everything

log = logging.getLogger(__name__)


class TrainHeadError(ValueError):
    """Inputs the head cannot be trained on; the message names the file or key."""


def _training_data(layout: Layout, params: TrainHeadParams, num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    features, labels = load_split(layout.features_dir / "train.npz", num_classes, dim)
    views = layout.features_dir / "train_views.npz"
    if params.use_augmented_views and views.exists():
        extra_features, extra_labels = load_split(views, num_classes, dim)
        log.info("train_head: adding %d cached augmented views to %d training rows", len(extra_labels), len(labels))
        features, labels = np.concatenate([features, extra_features]), np.concatenate([labels, extra_labels])
    if not len(labels):
        raise TrainHeadError(f"{layout.features_dir / 'train.npz'} holds no training rows: check the split stage")
    return features, labels


def _datasets(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, classes: int,
              p: TrainHeadParams) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Shuffled training batches (seeded, reshuffled each epoch) and validation batches, one-hot labels."""
    eye = np.eye(classes, dtype=np.float32)
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, eye[y_val])).batch(max(p.batch_size, 256))
    return head_batches(x_train, y_train, classes, p), val_ds


def run(params: Params, layout: Layout) -> dict[str, Any]:
    p = params.train_head
    require_trained_weights(params.features)
    remove_stale_temps(layout.head_dir)
    info = read_features_info(layout)
    classes, dim = info.classes, info.feature_dim
    x_train, y_train = _training_data(layout, p, len(classes), dim)
    x_val, y_val = load_split(layout.features_dir / "val.npz", len(classes), dim)
    if not len(y_val):
        raise TrainHeadError("the validation split is empty: set split.val > 0 (early stopping and warm start need it)")
    weights = class_weights(p.class_weight, np.asarray(y_train), classes)

    seed_everything(p.seed)
    train_ds, val_ds = _datasets(x_train, y_train, x_val, y_val, len(classes), p)
    head = compiled_head(dim, len(classes), p, len(y_train), metrics=("accuracy",))
    timer = EpochTimer()
    live = Live(str(layout.live_dir("train_head")), dvcyaml=None, save_dvc_exp=False)
    # patience 0 disables stopping but still restores the weights of the best validation loss
    stopper = keras.callbacks.EarlyStopping("val_loss", patience=p.early_stopping_patience or p.epochs, restore_best_weights=True)
    history = head.fit(
        train_ds, validation_data=val_ds, epochs=p.epochs, class_weight=weights, verbose=0, shuffle=False,
        callbacks=[timer, stopper, DVCLiveCallback(live=live)],
    )
    val_loss, val_accuracy = head.evaluate(val_ds, verbose=0)
    # a tf.data input: Keras' NumPy adapter maps in parallel, which op determinism rewrites with a
    # spurious 'NodeDef mentions attribute use_unbounded_threadpool' error line (TF 2.21)
    predicted = head.predict(val_ds, verbose=0).argmax(axis=1)
    metrics = {
        "val_loss": float(val_loss),
        "val_accuracy": float(val_accuracy),
        "val_macro_f1": float(f1_score(y_val, predicted, average="macro", labels=np.arange(len(classes)), zero_division=0)),
        "best_epoch": int(np.argmin(history.history["val_loss"])) + 1,
        "epochs_run": len(history.history["loss"]),
        "seconds_per_epoch": float(np.mean(timer.seconds)),
    }
    # the per-epoch curves end at the last epoch; the summary also records the restored best weights
    live.summary["restored_best"] = {k: metrics[k] for k in ("val_loss", "val_accuracy", "val_macro_f1", "best_epoch")}
    live.summary["seconds_per_epoch"] = metrics["seconds_per_epoch"]
    live.make_summary()
    log.info("train_head: %d epochs, val accuracy %.4f, %.3f s/epoch", metrics["epochs_run"], val_accuracy,
             metrics["seconds_per_epoch"])

    result = {
        **metrics,
        "classes": classes,
        "feature_dim": dim,
        "train_rows": int(len(y_train)),
        "val_rows": int(len(y_val)),
        "class_weight": weights,
        "seed": p.seed,
        "params": p.model_dump(),
        "features": info.model_dump(include={"backbone", "weights_id", "image_size", "preprocessing_id", "cache_id"}),
        **runtime_info(),
    }
    _write_outputs(layout, head, history.history, result)
    return result


def _write_outputs(layout: Layout, head: keras.Model, history: dict[str, list[float]], result: dict[str, Any]) -> None:
    with atomic_directory(layout.head_dir) as staging:
        head.save(staging / layout.head_model.name)
        frame = pd.DataFrame(history)
        frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
        frame.to_csv(staging / layout.head_history.name, index=False)
        write_info(staging / "info.json", result, HeadInfo)
