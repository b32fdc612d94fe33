"""Augmented views of train images for cached features: one stateless seed per (image, view)."""

from __future__ import annotations

import hashlib

import keras
import numpy as np
import tensorflow as tf

# Names the augmentation recipe in `augment`; change it whenever that function changes.
AUGMENT_ID = "flip-crop80-rot10-v1"
MAX_ROTATION_RAD = np.deg2rad(10.0)
MIN_CROP_SCALE = 0.8


def view_key(sha256: str, view: int) -> str:
    return f"{sha256}#{view}"


def view_seed(sha256: str, view: int, augment_seed: int) -> tuple[int, int]:
    """A stateless seed per (image, view): the same view whatever else is in the run."""
    digest = hashlib.sha256(f"{augment_seed}:{sha256}:{view}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF, int.from_bytes(digest[4:8], "little") & 0x7FFFFFFF


def augment(image: tf.Tensor, seed: tf.Tensor, resize: keras.layers.Layer) -> tf.Tensor:
    """Random flip, crop (80-100% of the side, resized back) and rotation (up to 10 degrees)."""
    size = tf.shape(image)[0]
    flip_seed, scale_seed, crop_seed, angle_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    scale = tf.random.stateless_uniform([], scale_seed, MIN_CROP_SCALE, 1.0)
    side = tf.cast(tf.cast(size, tf.float32) * scale, tf.int32)
    image = resize(tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), crop_seed))
    angle = tf.random.stateless_uniform([], angle_seed, -MAX_ROTATION_RAD, MAX_ROTATION_RAD)
    centre = (tf.cast(size, tf.float32) - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # output (x, y) samples input (cos*x - sin*y + tx, sin*x + cos*y + ty): a rotation about the centre
    transform = tf.stack([cos, -sin, centre - cos * centre + sin * centre,
                          sin, cos, centre - sin * centre - cos * centre, 0.0, 0.0])
    return keras.ops.image.affine_transform(image, transform, interpolation="bilinear", fill_mode="reflect")
