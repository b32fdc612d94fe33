"""lr_find tool: the learning-rate range test on the training images, before choosing finetune.learning_rate.

It trains the head-trained classifier exactly as fine-tuning would (same trainable layers, BatchNorm
mode, optimizer, loss, augmentation and cached images) for `lr_find.steps` batches while the rate
grows geometrically from `start_lr` to `end_lr`, and records the loss of each batch (Smith,
"Cyclical Learning Rates", 2015; fastai's `lr_find`). It stops once the smoothed loss diverges.
The suggestion is the rate of the lowest smoothed loss divided by 10 (fastai's `lr_min`); the
steepest descent is reported too. Nothing under models/ changes.

Outputs (not DVC outs, so a later `dvc repro` leaves them): reports/lr_find.csv (loss per step, for
`dvc plots show reports/lr_find.csv` or any plotting tool), reports/lr_find.json, reports/lr_find.png.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import pandas as pd

from headstart.data.datasets import cached_images
from headstart.data.manifest import read_split_manifest
from headstart.files import atomic_write_json, atomic_write_text
from headstart.layout import Layout
from headstart.model import require_trained_weights
from headstart.params import LrFindParams, Params
from headstart.reporting import plot_lr_curve
from headstart.runtime import seed_everything
from headstart.training import EpochData, assemble, compile_for_finetuning, configure_trainable, image_rows

log = logging.getLogger(__name__)


def range_test(model: keras.Model, batches: Iterator[Any], p: LrFindParams) -> pd.DataFrame:
    """One training step per rate; the loss of each batch, and its bias-corrected exponential average."""
    rates = p.start_lr * (p.end_lr / p.start_lr) ** (np.arange(p.steps) / (p.steps - 1))
    average, lowest, rows = 0.0, math.inf, []
    for step, (rate, (images, labels)) in enumerate(zip(rates, batches, strict=False)):
        model.optimizer.learning_rate.assign(rate)
        loss = float(model.train_on_batch(images, labels, return_dict=True)["loss"])
        average = p.smoothing * average + (1 - p.smoothing) * loss
        smoothed = average / (1 - p.smoothing ** (step + 1))
        rows.append({"step": step, "learning_rate": float(rate), "loss": loss, "smoothed_loss": smoothed})
        lowest = min(lowest, smoothed)
        if not math.isfinite(smoothed) or smoothed > p.divergence * lowest:
            break
    return pd.DataFrame(rows)


def suggest(curve: pd.DataFrame) -> dict[str, float]:
    """lr at the lowest smoothed loss / 10 (the suggestion), and the lr of the steepest descent."""
    finite = curve[np.isfinite(curve["smoothed_loss"])]
    lowest = float(finite.loc[finite["smoothed_loss"].idxmin(), "learning_rate"])
    # the first tenth is the average warming up on batch noise (the rate is too small to move anything)
    settled = finite.iloc[len(finite) // 10 :]
    slopes = np.gradient(settled["smoothed_loss"].to_numpy(), np.log10(settled["learning_rate"].to_numpy()))
    steepest = float(settled["learning_rate"].iloc[int(np.argmin(slopes))])
    return {"suggested_learning_rate": lowest / 10, "min_loss_learning_rate": lowest,
            "steepest_learning_rate": steepest}


def run(params: Params, layout: Layout) -> dict[str, Any]:
    p, ft = params.lr_find, params.finetune.model_copy(update={"schedule": "constant"})
    require_trained_weights(params.features)
    manifest = read_split_manifest(layout.split_manifest)
    classes = sorted(manifest["label"].unique())
    rows, labels, n_train = image_rows(layout, manifest, classes)
    seed_everything(ft.seed, ft.deterministic)
    model, backbone = assemble(params, layout)
    _, blocks = configure_trainable(model, backbone, ft.model_copy(update={"enabled": True}))
    # the same per-block rates as fine-tuning (backbone_lr_multiplier, gradual unfreezing)
    release = compile_for_finetuning(model, blocks, ft.model_copy(update={"learning_rate": p.start_lr}), 1)
    images = cached_images([str(layout.root / path) for path in rows["path"]], list(rows["sha256"]),
                           backbone.image_size, backbone.spec.interpolation, layout.image_cache_dir)
    data = EpochData(images, labels, n_train, len(classes), ft)

    def batches() -> Iterator[Any]:
        for epoch in itertools.count():
            data.start_epoch(epoch)
            release(epoch)
            yield from data.train

    curve = range_test(model, batches(), p)
    found = {**suggest(curve), "steps_run": len(curve), "finetune_learning_rate": params.finetune.learning_rate}
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.lr_find_curve, curve.to_csv(index=False))
    atomic_write_json(layout.lr_find_result, found)
    plot_lr_curve(curve, found, params.finetune.learning_rate, layout.lr_find_plot)
    log.info("lr_find: suggested learning rate %.2g (lowest loss at %.2g, steepest descent at %.2g); "
             "finetune.learning_rate is %.2g", found["suggested_learning_rate"], found["min_loss_learning_rate"],
             found["steepest_learning_rate"], params.finetune.learning_rate)
    return found
