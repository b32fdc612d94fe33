"""The classifier's parts and how they fit together: head builder, augmentation, full model.

Shared by train_head (the head), finetune (head + backbone) and the export/evaluate stages (the
assembled model). Every layer is a built-in Keras layer, so saved `.keras` files load with
`safe_mode=True` and no custom objects.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from headstart.backbones.preprocessing import TORCH_MEAN
from headstart.optimizers import head_optimizer
from headstart.params import AugmentationParams, FeaturesParams, TrainHeadParams

if TYPE_CHECKING:  # for the annotation only: no runtime (nor dvc.yaml) dependency on the backbones
    from headstart.backbones.registry import Backbone


class RandomWeightsError(ValueError):
    """Training on a backbone with random weights, which would produce a meaningless model."""


def require_trained_weights(features: FeaturesParams) -> None:
    """Refuse to train on random backbone weights unless explicitly allowed (speed tests only)."""
    if features.weights == "none" and not features.allow_random_weights:
        raise RandomWeightsError(
            "features.weights is 'none' (random backbone weights): a classifier trained on them is useless. "
            "Use features.weights: packaged or imagenet, or set features.allow_random_weights: true for speed tests."
        )


def build_head(feature_dim: int, num_classes: int, params: TrainHeadParams) -> keras.Model:
    """Pooled features (D,) -> softmax over classes: a linear head or `hidden_layers` dense blocks.

    Each hidden block is Dense -> [BatchNorm] -> ReLU -> Dropout; a linear head drops out its input
    (as `make_image_classifier` does). The output stays float32 under mixed precision.
    """
    regularizer = keras.regularizers.L2(params.l2) if params.l2 else None
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    if params.hidden_layers == 0 and params.dropout:
        x = layers.Dropout(params.dropout, seed=params.seed, name="dropout_input")(x)
    for i in range(params.hidden_layers):
        x = layers.Dense(params.units, kernel_regularizer=regularizer, name=f"dense_{i}")(x)
        if params.batch_norm:
            x = layers.BatchNormalization(name=f"batch_norm_{i}")(x)
        x = layers.Activation("relu", name=f"relu_{i}")(x)
        if params.dropout:
            x = layers.Dropout(params.dropout, seed=params.seed + i, name=f"dropout_{i}")(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=regularizer, dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name="head")


def compiled_head(feature_dim: int, num_classes: int, params: TrainHeadParams, train_rows: int,
                  metrics: tuple[str, ...] = ()) -> keras.Model:
    """The head recipe train_head and the audit's out-of-fold heads share: `build_head`, compiled with the
    head optimizer (its schedule spans `params.epochs` epochs of `train_rows` rows) and the smoothed loss."""
    head = build_head(feature_dim, num_classes, params)
    head.compile(optimizer=head_optimizer(params, math.ceil(train_rows / params.batch_size)),
                 loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
                 metrics=list(metrics))
    return head


def head_batches(features: np.ndarray, labels: np.ndarray, num_classes: int, params: TrainHeadParams
                 ) -> tf.data.Dataset:
    """Training batches of (features, one-hot labels), shuffled with the head's seed and reshuffled each epoch."""
    targets = np.eye(num_classes, dtype=np.float32)[labels]
    return (tf.data.Dataset.from_tensor_slices((features, targets))
            .shuffle(len(labels), seed=params.seed, reshuffle_each_iteration=True).batch(params.batch_size))


def build_classifier(backbone: Backbone, head: keras.Model) -> keras.Model:
    """Image (S, S, 3) float RGB 0..255 -> preprocessing -> backbone -> pooling -> head.

    `training=False` on the base does not keep its BatchNorm in inference mode during `fit`: Keras 3
    replays a nested functional model with the outer call's `training`, so trainable BatchNorm layers
    follow the new images (`finetune.batch_norm: train`, the default recipe; tests/test_finetune.py
    checks the moving mean moves). `batch_norm: frozen` makes them non-trainable, which in Keras 3 runs
    them in inference mode (headstart.training.configure_trainable). The head is the trained model
    itself, so its weights are shared.
    """
    size = backbone.image_size
    feature_dim = head.input_shape[-1]
    if feature_dim != backbone.feature_dim:
        raise ValueError(
            f"the head expects {feature_dim} features but backbone {backbone.spec.name!r} gives {backbone.feature_dim}: "
            "retrain the head (headstart train_head) on features from this backbone"
        )
    inputs = keras.Input((size, size, 3), dtype="float32", name="image")
    x = backbone.preprocess(inputs)
    x = backbone.base(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = head(x)
    return keras.Model(inputs, outputs, name="classifier")


def with_flip_tta(classifier: keras.Model) -> keras.Model:
    """Test-time augmentation: the mean of the classifier's probabilities for the image and its mirror image.

    The mirror is a fixed Dense layer holding the anti-diagonal identity, applied to the width axis
    between two Permute layers: built-in layers only, so the model still loads with `safe_mode=True`,
    and exact in float32 (each output pixel is one input pixel times 1).
    """
    height, width, channels = classifier.input_shape[1:]
    image = keras.Input((height, width, channels), dtype="float32", name="image")
    mirror = layers.Dense(width, use_bias=False, trainable=False, name="mirror_width")
    mirrored = layers.Permute((1, 3, 2), name="width_last")(image)
    mirrored = layers.Permute((1, 3, 2), name="width_back")(mirror(mirrored))
    mirror.set_weights([np.eye(width, dtype="float32")[::-1]])
    # a loaded functional model returns its single output as a one-element list
    outputs = [keras.tree.flatten(classifier(x))[0] for x in (image, mirrored)]
    mean = layers.Average(name="flip_tta_mean")(outputs)
    return keras.Model(image, mean, name=f"{classifier.name}_flip_tta")


def flip_tta_passes(tta: keras.Model) -> keras.Model:
    """The two probabilities a `with_flip_tta` model averages (image, mirror image), as its two outputs."""
    return keras.Model(tta.inputs, tta.get_layer("flip_tta_mean").input, name=f"{tta.name}_passes")


class RandomQuarterTurn(layers.Layer):
    """Rotate each square image by 0, 90, 180 or 270 degrees, drawn per image; identity outside training.

    Exact (pixels move, none are interpolated). Only the training input pipeline uses it, never a saved model.
    """

    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training:
            return images
        turns = keras.random.randint((tf.shape(images)[0],), 0, 4, seed=self.seed_generator)
        rotated = tf.stack([tf.image.rot90(images, k) for k in range(4)])  # (4, B, S, S, C): squares keep shape
        choose = tf.one_hot(turns, 4, dtype=images.dtype)  # (B, 4)
        return tf.einsum("kbhwc,bk->bhwc", rotated, choose)


class RandomResizedCrop(layers.Layer):
    """Inception's crop for photos: a random box of `min_area` to all of the image's area, aspect ratio 3/4
    to 4/3, resized back to the input size (bilinear), drawn per image; identity outside training.

    Keras 3 has RandomCrop (a fixed size) and RandomZoom (one aspect, reflected borders) but not this one.
    """

    def __init__(self, min_area: float, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_area, self.seed_generator = min_area, keras.random.SeedGenerator(seed)

    def call(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training:
            return images
        batch = tf.shape(images)[0]
        area = keras.random.uniform((batch,), self.min_area, 1.0, seed=self.seed_generator)
        ratio = tf.exp(keras.random.uniform((batch,), math.log(3 / 4), math.log(4 / 3), seed=self.seed_generator))
        width, height = tf.minimum(tf.sqrt(area * ratio), 1.0), tf.minimum(tf.sqrt(area / ratio), 1.0)
        left = keras.random.uniform((batch,), seed=self.seed_generator) * (1.0 - width)
        top = keras.random.uniform((batch,), seed=self.seed_generator) * (1.0 - height)
        boxes = tf.stack([top, left, top + height, left + width], axis=1)
        crops = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(batch), tf.shape(images)[1:3])
        return tf.cast(crops, images.dtype)


ERASED_PIXEL = [255 * m for m in TORCH_MEAN]  # ImageNet's mean pixel: what random erasing leaves


def build_augmentation(params: AugmentationParams, seed: int) -> keras.Sequential | None:
    """Random Keras preprocessing layers from params (each off at 0/'none'); None when all are off.

    They are applied in the training input pipeline only, never saved in the inference model.
    """
    steps: list[layers.Layer] = []
    if params.flip != "none":
        steps.append(layers.RandomFlip(params.flip, seed=seed))
    if params.quarter_turns:
        steps.append(RandomQuarterTurn(seed=seed + 5, name="random_quarter_turn"))
    if params.crop_area:
        steps.append(RandomResizedCrop(params.crop_area, seed=seed + 6, name="random_resized_crop"))
    if params.erasing:
        steps.append(layers.RandomErasing(factor=(params.erasing, params.erasing), fill_value=ERASED_PIXEL,
                                          value_range=(0, 255), seed=seed + 7))
    if params.rotation:
        steps.append(layers.RandomRotation(params.rotation, fill_mode="reflect", seed=seed + 1))
    if params.zoom:
        steps.append(layers.RandomZoom(params.zoom, fill_mode="reflect", seed=seed + 2))
    if params.translation:
        steps.append(layers.RandomTranslation(params.translation, params.translation, fill_mode="reflect", seed=seed + 3))
    if params.contrast:
        steps.append(layers.RandomContrast(params.contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(steps, name="augmentation") if steps else None


def all_layers(layer: layers.Layer) -> Iterator[layers.Layer]:
    """The layer and every layer nested in it (models inside models)."""
    yield layer
    for child in getattr(layer, "layers", []):
        yield from all_layers(child)


def freeze_batch_norm(model: keras.Model) -> int:
    """Set every BatchNormalization layer non-trainable (Keras 3 then also runs it in inference mode)."""
    count = 0
    for layer in all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


def reseed(model: keras.Model, seed: int) -> None:
    """Reset the random state of every layer (dropout) to a value derived from `seed`.

    Keras does not save seed-generator state with the weights, so fine-tuning reseeds at each epoch
    start: a run resumed from a checkpoint then draws the same dropout masks as an uninterrupted one.
    """
    weights = {id(v) for v in model.weights}
    states = [v for v in model.variables if id(v) not in weights]
    for i, state in enumerate(states):
        state.assign(tf.constant([seed + i, 0], dtype=state.dtype))
