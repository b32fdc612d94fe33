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
from headstart.callbacks import HISTORY_COLUMNS, FinetuneState
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
from headstart.files import atomic_directory, remove_stale_temps, sha256_file
from headstart.layout import Layout
from headstart.model import require_trained_weights
from headstart.params import FinetuneParams, Params
from headstart.runtime import choose_strategy, is_chief, mixed_precision, runtime_info, seed_everything
from headstart.training import (
    EpochData,
    assemble,
    compile_for_finetuning,
    configure_trainable,
    fit_epochs,
    image_rows,
    start_state,
)

log = logging.getLogger(__name__)


class FinetuneError(ValueError):
    """Inputs fine-tuning cannot use; the message names the file or key."""


# ---------------------------------------------------------------- inputs


def checkpoint_key(params: Params, layout: Layout, features: FeaturesInfo) -> str:
    """Hash of everything the fine-tuned weights depend on; a checkpoint under another key is never resumed.

    With a constant learning rate `epochs` is left out: the weights after epoch k do not depend on
    how many epochs were planned, so raising finetune.epochs continues a finished run. Any other
    schedule is stretched over all the epochs, so there it is part of the key.
    """
    exclude = {"enabled", "epochs"} if params.finetune.schedule == "constant" else {"enabled"}
    inputs = {
        "finetune": params.finetune.model_dump(exclude=exclude),
        "features": features.model_dump(include={"backbone", "weights_id", "image_size", "preprocessing_id"}),
        "class_weight": params.train_head.class_weight,
        "head": sha256_file(layout.head_model),
        "manifest": sha256_file(layout.split_manifest),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------- stage


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


def _info(ft: FinetuneParams, inputs: _Inputs, backbone: Backbone, state: FinetuneState, resumed_from: int,
          strategy: tf.distribute.Strategy, key: str, trainable: dict[str, Any]) -> dict[str, Any]:
    history = state.history
    best, initial = history[state.best_epoch], history[0]
    epoch_seconds = [h["seconds"] for h in history[1:]]
    return {
        # false when disabled, or when no epoch beat the head-only model (which is then what is saved)
        "fine_tuned": bool(ft.enabled and state.best_epoch > 0),
        "classes": inputs.classes,
        "image_size": backbone.image_size,
        "backbone": backbone.spec.name,
        "weights_id": backbone.weights_id,
        "interpolation": backbone.spec.interpolation,
        "preprocessing_id": backbone.spec.preprocessing_id,
        "epochs_run": state.epochs_done,
        "resumed_from_epoch": resumed_from,
        "best_epoch": state.best_epoch,
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
        if ft.fused_batch_norm:  # the saved model keeps Keras' own layer (headstart/batchnorm.py)
            log.info("finetune: %d BatchNorm layers train on the fused kernel", fuse(model))
        trainable, blocks = configure_trainable(model, backbone, ft)
        release = compile_for_finetuning(model, blocks, ft, steps_per_epoch)

    images = cached_images([str(layout.root / p) for p in inputs.rows["path"]], list(inputs.rows["sha256"]),
                           backbone.image_size, backbone.spec.interpolation, layout.image_cache_dir)
    data = EpochData(images, inputs.labels, inputs.n_train, len(inputs.classes), ft)
    scratch = None if chief else Path(tempfile.mkdtemp(prefix="headstart-worker-"))
    key = checkpoint_key(params, layout, inputs.features_info)
    folder = (scratch or layout.checkpoint_dir) / key
    state = start_state(model, data, folder, ft)
    resumed_from = state.epochs_done

    live = Live(str(layout.live_dir("finetune") if scratch is None else scratch / "live"), dvcyaml=None,
                save_dvc_exp=False)
    _log_live(live, state.history)
    if ft.enabled:
        fit_epochs(model, data, ft, state, folder, release, [DVCLiveCallback(live=live)], inputs.weights)

    info = _info(ft, inputs, backbone, state, resumed_from, strategy, key, trainable)
    _end_live(live, info)
    _write_outputs(scratch or layout.finetune_dir, model, info, state.history)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("finetune: best epoch %d, val accuracy %.4f (head %.4f)", info["best_epoch"], info["best_val_accuracy"],
             info["head_val_accuracy"])
    return info
