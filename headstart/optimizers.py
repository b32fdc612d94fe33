"""Optimizers and learning-rate schedules: the head's (plain Keras) and fine-tuning's.

Keras' optimizers have one learning rate for every variable. Discriminative learning rates and
gradual unfreezing need one per group of variables, so `make_optimizer` returns the chosen Keras
optimizer extended by `_ScaledUpdates`: a per-variable multiplier (a variable, so a callback can
change it between epochs without recompiling) and decoupled weight decay that follows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from headstart.params import FinetuneParams, TrainHeadParams

ONE_CYCLE_START = 25.0  # one-cycle warm-up starts at peak / 25 (fastai's div)


def head_optimizer(params: TrainHeadParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The head's optimizer: adam, sgd (momentum) or rmsprop, at a constant, cosine or exponential rate."""
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = params.learning_rate
    if params.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(params.learning_rate, params.epochs * steps_per_epoch)
    elif params.lr_schedule == "exponential":
        learning_rate = keras.optimizers.schedules.ExponentialDecay(
            params.learning_rate, decay_steps=steps_per_epoch, decay_rate=params.lr_decay_rate
        )
    if params.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=params.momentum)
    if params.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return keras.optimizers.Adam(learning_rate)


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
        scale = self.variable_scales.get(self._var_key(variable))  # type: ignore[attr-defined]  # a Keras mixin
        if scale is not None:
            learning_rate = learning_rate * keras.ops.cast(scale, learning_rate.dtype)
        if self._decay_rate and len(variable.shape) > 1:
            variable.assign_sub(variable * keras.ops.cast(self._decay_rate * learning_rate, variable.dtype))
        return super().update_step(gradient, variable, learning_rate)  # type: ignore[misc]


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
