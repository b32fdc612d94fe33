"""The streaming image pipeline shared by features, fine-tuning and evaluation.

Decoding goes through `tasks.images.load_rgb` (Pillow: EXIF-upright RGB) and resizing through the
same Keras `Resizing` layer the exported model carries, so training, evaluation and serving see
identical pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from keras import layers

from tasks.images import load_rgb


def resizing_layer(image_size: int, interpolation: str = "bilinear") -> layers.Resizing:
    return layers.Resizing(image_size, image_size, interpolation=interpolation, name="resize")


def _decode(path: bytes, image_size: np.int32) -> np.ndarray:
    return load_rgb(path.decode("utf-8"), target_size=int(image_size))


def image_dataset(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    image_size: int,
    batch_size: int,
    interpolation: str = "bilinear",
) -> tf.data.Dataset:
    """Batches of float32 (B, S, S, 3) RGB in [0, 255] (and labels when given), decoded in parallel."""
    resize = resizing_layer(image_size, interpolation)

    def load(path: tf.Tensor) -> tf.Tensor:
        image = tf.numpy_function(_decode, [path, image_size], tf.uint8, stateful=False)
        image.set_shape([None, None, 3])
        return resize(tf.cast(image, tf.float32))

    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if labels is not None:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(np.asarray(labels, dtype=np.int32))))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
