"""Training-mode BatchNormalization on TensorFlow's fused kernel, as an opt-in for fine-tuning.

Keras 3 computes training-mode BatchNormalization unfused on TensorFlow (moments, then arithmetic:
keras-team/keras-core#225), which costs most when every layer trains. `fuse` routes each
BatchNormalization layer's training call through `tf.raw_ops.FusedBatchNormV3` on the same variables,
with Keras' momentum semantics (moving = momentum * moving + (1 - momentum) * batch statistic, the batch
variance without Bessel's correction, which the kernel applies to the variance it returns and which is
undone here). Only the instance's `call` changes: the class, the config and the weights stay Keras' own,
so a saved model holds standard layers and loads without this module. Inference mode, and any layer the
kernel cannot take (not 4-D NHWC float32, another axis), run Keras' own code.
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf


def _fused_call(self: keras.layers.BatchNormalization, inputs: tf.Tensor, training: bool | None = None,
                mask: tf.Tensor | None = None) -> tf.Tensor:
    if (not (training and self.trainable) or inputs.shape.rank != 4 or self.axis not in (-1, 3)
            or inputs.dtype != tf.float32):
        return keras.layers.BatchNormalization.call(self, inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    scale = self.gamma if self.scale else tf.ones([channels])
    offset = self.beta if self.center else tf.zeros([channels])
    empty = tf.constant([], tf.float32)
    y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=self.epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    n = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
    variance = variance * (n - 1.0) / n
    m = self.momentum
    self.moving_mean.assign(self.moving_mean * m + tf.stop_gradient(mean) * (1.0 - m))
    self.moving_variance.assign(self.moving_variance * m + tf.stop_gradient(variance) * (1.0 - m))
    return y


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)]


def fuse_layer(layer: keras.layers.BatchNormalization) -> None:
    layer.call = types.MethodType(_fused_call, layer)


def fuse(model: keras.Model) -> int:
    """Run every BatchNormalization layer of `model` (nested models included) on the fused kernel in
    training mode; returns how many. Call before compiling: the train function traces the calls."""
    layers = batch_norm_layers(model)
    for layer in layers:
        fuse_layer(layer)
    return len(layers)
