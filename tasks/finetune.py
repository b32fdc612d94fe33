"""finetune stage: train the backbone together with the trained head, on images.

The model is the head-trained classifier (warm start): preprocessing -> base -> pooling -> head.
The layers from the cut point up train (by default the top 14 blocks, BatchNorm statistics
included), recompiled with AdamW under a one-cycle schedule and label smoothing: the recipe
measured in docs/benchmarks.md. Images are decoded and resized once into a cache of the
exact pixels evaluate and the exported model see; epochs stream batches
from it through `model.fit`. Each epoch is checkpointed (weights + optimizer state) under a key of
every input, so a killed run resumes where it stopped and reaches the same weights as an
uninterrupted one. The model before the first epoch is the baseline: if no epoch beats its
validation loss, the head-only model is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback
from dvclive.utils import standardize_metric_name

from headstart.backbones.registry import Backbone
from headstart.batchnorm import fuse
from headstart.callbacks import HISTORY_COLUMNS, EpochCheckpoints, TimeCap
from headstart.data.artifacts import (
    FeaturesInfo,
    HeadInfo,
    ModelInfo,
    class_weights,
    read_features_info,
    read_head_info,
    write_info,
)
from headstart.data.datasets import cached_images
from headstart.data.manifest import read_split_manifest
from headstart.data.sources.presets import effective_settings
from headstart.files import atomic_directory, remove_stale_temps, sha256_file
from headstart.layout import Layout
from headstart.model import require_trained_weights, reseed
from headstart.params import FinetuneParams, Params
from headstart.runtime import choose_strategy, is_chief, mixed_precision, runtime_info, seed_everything
from headstart.training import EpochData, assemble, compile_for_finetuning, configure_trainable, image_rows

log = logging.getLogger(__name__)


class FinetuneError(ValueError):
    """Inputs fine-tuning cannot use; the message names the file or key."""


# ---------------------------------------------------------------- inputs


def checkpoint_key(params: Params, layout: Layout, weights_id: str) -> str:
    """Hash of everything the fine-tuned weights depend on; a checkpoint under another key is never resumed.

    With a constant learning rate `epochs` is left out: the weights after epoch k do not depend on
    how many epochs were planned, so raising finetune.epochs continues a finished run. Any other
    schedule is stretched over all the epochs, so there it is part of the key.
    """
    exclude = {"enabled", "epochs"} if params.finetune.schedule == "constant" else {"enabled"}
    inputs = {
        "finetune": params.finetune.model_dump(exclude=exclude),
        "features": {**params.features.model_dump(include={"backbone", "weights"}),
                     "image_size": effective_settings(params).image_size},
        "class_weight": params.train_head.class_weight,
        "weights_id": weights_id,
        "head": sha256_file(layout.head_model),
        "manifest": sha256_file(layout.split_manifest),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------- stage


def _evaluate(model: keras.Model, val_ds: tf.data.Dataset) -> dict[str, float]:
    loss, accuracy = model.evaluate(val_ds, verbose=0)
    return {"val_loss": float(loss), "val_accuracy": float(accuracy)}


def _write_outputs(target: Path, model: keras.Model, info: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """The classifier without its optimizer (a functional copy sharing the layers): inference needs none."""
    with atomic_directory(target) as staging:
        keras.Model(model.inputs, model.outputs, name=model.name).save(staging / "model.keras")
        pd.DataFrame(history, columns=HISTORY_COLUMNS).to_csv(staging / "history.csv", index=False)
        write_info(staging / "info.json", info, ModelInfo)


def _log_live(live: Live, history: list[dict[str, Any]]) -> None:
    """Replay finished epochs (step 0 is the head-only model) as dvclive's Keras callback names them."""
    for entry in history:
        for name, value in entry.items():
            if name not in ("epoch", "seconds"):
                live.log_metric(standardize_metric_name(name, "dvclive.keras"), value)
        live.next_step()


def _check_inputs(classes: list[str], head_info: HeadInfo, features_info: FeaturesInfo, layout: Layout) -> None:
    for source, listed in (("models/head/info.json", head_info.classes), ("data/features/info.json", features_info.classes)):
        if listed != classes:
            raise FinetuneError(f"{source} lists classes {listed} but {layout.split_manifest} has {classes}: "
                                "rerun features and train_head")


def _fit(model: keras.Model, data: EpochData, ft: FinetuneParams, checkpoints: EpochCheckpoints, live: Live,
         weights: dict[int, float] | None) -> None:
    """`model.fit` from the checkpoint's next epoch; EarlyStopping on val loss when a patience is set."""
    state = checkpoints.state
    if state["stopped"] or state["epochs_done"] >= ft.epochs:
        return
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.TerminateOnNaN()]
    if ft.early_stopping_patience:
        checkpoints.stopper = keras.callbacks.EarlyStopping("val_loss", patience=ft.early_stopping_patience)
        callbacks.append(checkpoints.stopper)
    callbacks += [checkpoints, DVCLiveCallback(live=live)]
    if ft.max_minutes is not None:
        callbacks.append(TimeCap(ft.max_minutes))  # after the checkpoint: a capped epoch is kept
    model.fit(data.train, validation_data=data.val, initial_epoch=state["epochs_done"], epochs=ft.epochs,
              class_weight=weights, shuffle=False, verbose=0, callbacks=callbacks)
    state["stopped"] = bool(model.stop_training)


@dataclass
class _Inputs:
    """What fine-tuning reads from earlier stages, checked against each other."""

    head_info: HeadInfo
    features_info: FeaturesInfo
    classes: list[str]
    rows: pd.DataFrame
    labels: np.ndarray
    n_train: int
    weights: dict[int, float] | None


def _read_inputs(params: Params, layout: Layout) -> _Inputs:
    head_info = read_head_info(layout)
    features_info = read_features_info(layout)
    manifest = read_split_manifest(layout.split_manifest)
    classes = sorted(manifest["label"].unique())
    _check_inputs(classes, head_info, features_info, layout)
    rows, labels, n_train = image_rows(layout, manifest, classes)
    weights = class_weights(params.train_head.class_weight, labels[:n_train], classes)
    return _Inputs(head_info, features_info, classes, rows, labels, n_train, weights)


def _check_backbone(features_info: FeaturesInfo, backbone: Backbone) -> None:
    if features_info.weights_id != backbone.weights_id or features_info.image_size != backbone.image_size:
        raise FinetuneError(
            f"data/features/info.json was computed with weights {features_info.weights_id} at "
            f"{features_info.image_size} px, the backbone now loads {backbone.weights_id} at {backbone.image_size} px: "
            "rerun features and train_head"
        )


def _load_state(folder: Path, ft: FinetuneParams) -> dict[str, Any] | None:
    """The checkpoint state to resume from, or None to start from the head-only model."""
    state = EpochCheckpoints.load(folder) if ft.enabled else None
    if state is not None and state["epochs_done"] > ft.epochs:
        log.info("finetune: checkpoint %s ran %d epochs, more than the %d asked: starting again", folder,
                 state["epochs_done"], ft.epochs)
        state = None
    return state


def _start(checkpoints: EpochCheckpoints, model: keras.Model, data: EpochData, state: dict[str, Any] | None,
           folder: Path, ft: FinetuneParams) -> None:
    """A fresh run's baseline (the head-only model, epoch 0), or the weights of the epoch it stopped after."""
    if state is None:
        baseline = {"epoch": 0, **_evaluate(model, data.val)}
        checkpoints.state = {"epochs_done": 0, "history": [baseline], "best_val_loss": baseline["val_loss"],
                             "best_epoch": 0, "wait": 0, "stopped": False}
        if ft.enabled:
            checkpoints.save(improved=True)
    else:
        log.info("finetune: resuming from %s after epoch %d", folder, state["epochs_done"])
        model.load_weights(folder / state["last"])


def _info(ft: FinetuneParams, inputs: _Inputs, backbone: Backbone, state: dict[str, Any], resumed_from: int,
          strategy: tf.distribute.Strategy, key: str, trainable: dict[str, Any]) -> dict[str, Any]:
    history = state["history"]
    best, initial = history[state["best_epoch"]], history[0]
    epoch_seconds = [h["seconds"] for h in history[1:]]
    return {
        # false when disabled, or when no epoch beat the head-only model (which is then what is saved)
        "fine_tuned": bool(ft.enabled and state["best_epoch"] > 0),
        "classes": inputs.classes,
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
        "head_val_accuracy": inputs.head_info.val_accuracy,
        "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
        "train_images_per_second": inputs.n_train / float(np.mean(epoch_seconds)) if epoch_seconds else None,
        "replicas": strategy.num_replicas_in_sync,
        "class_weight": inputs.weights,
        "checkpoint_key": key,
        "params": ft.model_dump(),
        **trainable,
        **runtime_info(),
    }


def _end_live(live: Live, info: dict[str, Any]) -> None:
    live.summary["restored_best"] = {"val_accuracy": info["best_val_accuracy"], "val_loss": info["best_val_loss"],
                                     "best_epoch": info["best_epoch"]}
    live.summary["seconds_per_epoch"] = info["seconds_per_epoch"]
    live.end()


def run(params: Params, layout: Layout) -> dict[str, Any]:
    require_trained_weights(params.features)
    checkpoints_of_each_key = [folder / "*" for folder in layout.checkpoint_dir.glob("*") if folder.is_dir()]
    remove_stale_temps(layout.finetune_dir, layout.image_cache_dir / "*", *checkpoints_of_each_key)
    inputs = _read_inputs(params, layout)
    steps_per_epoch = math.ceil(inputs.n_train / params.finetune.batch_size)
    ft = params.finetune.model_copy(update={"epochs": params.finetune.epochs_for(steps_per_epoch)})

    strategy = choose_strategy(ft.distribution if ft.enabled else "none")
    chief = is_chief(strategy)
    seed_everything(ft.seed, ft.deterministic)
    with mixed_precision(ft.mixed_precision and ft.enabled), strategy.scope():
        model, backbone = assemble(params, layout)
        _check_backbone(inputs.features_info, backbone)
        if ft.fused_batch_norm:  # the saved model keeps Keras' own layer (headstart/batchnorm.py)
            log.info("finetune: %d BatchNorm layers train on the fused kernel", fuse(model))
        trainable, blocks = configure_trainable(model, backbone, ft)
        release = compile_for_finetuning(model, blocks, ft, steps_per_epoch)

    images = cached_images([str(layout.root / p) for p in inputs.rows["path"]], list(inputs.rows["sha256"]),
                           backbone.image_size, backbone.spec.interpolation, layout.image_cache_dir)
    data = EpochData(images, inputs.labels, inputs.n_train, len(inputs.classes), ft)
    scratch = None if chief else Path(tempfile.mkdtemp(prefix="headstart-worker-"))
    key = checkpoint_key(params, layout, backbone.weights_id)
    folder = (scratch or layout.checkpoint_dir) / key
    state = _load_state(folder, ft)
    resumed_from = state["epochs_done"] if state else 0

    def before_epoch(epoch: int) -> None:
        reseed(model, ft.seed * 1000 + epoch)
        data.start_epoch(epoch)
        release(epoch)

    checkpoints = EpochCheckpoints(folder, state or {}, before_epoch, stopper=None)
    checkpoints.set_model(model)
    _start(checkpoints, model, data, state, folder, ft)
    state = checkpoints.state

    live = Live(str(layout.live_dir("finetune") if scratch is None else scratch / "live"), dvcyaml=None,
                save_dvc_exp=False)
    _log_live(live, state["history"])
    if ft.enabled:
        _fit(model, data, ft, checkpoints, live, inputs.weights)
        model.load_weights(folder / state["best"])

    info = _info(ft, inputs, backbone, state, resumed_from, strategy, key, trainable)
    _end_live(live, info)
    _write_outputs(scratch or layout.finetune_dir, model, info, state["history"])
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("finetune: best epoch %d, val accuracy %.4f (head %.4f)", info["best_epoch"], info["best_val_accuracy"],
             info["head_val_accuracy"])
    return info
