"""Each backbone's preprocessing as built-in Keras layers (float32 RGB 0..255 in), so saved models load in
safe mode."""

from __future__ import annotations

import keras
import numpy as np

TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def preprocess_layer(preprocessing_id: str, name: str) -> keras.Model:
    """float32 RGB in [0, 255] -> what the base expects, as a small Sequential of built-in layers."""
    layers: list[keras.Layer]
    if preprocessing_id == "torch_imagenet":
        layers = [
            keras.layers.Rescaling(1.0 / 255.0),
            keras.layers.Normalization(mean=list(TORCH_MEAN), variance=[s * s for s in TORCH_STD]),
        ]
    elif preprocessing_id == "caffe_bgr":
        layers = [keras.layers.Dense(3, trainable=False, name="rgb_to_bgr_minus_mean")]
    elif preprocessing_id == "tf_minus1_1":
        layers = [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)]
    elif preprocessing_id == "tf_lite":
        layers = [keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0)]
    elif preprocessing_id == "keras_builtin":
        layers = [keras.layers.Identity()]
    else:
        raise ValueError(f"unknown preprocessing_id {preprocessing_id!r}")
    model = keras.Sequential([keras.Input((None, None, 3)), *layers], name=f"{name}_preprocess")
    if preprocessing_id == "caffe_bgr":
        swap = np.eye(3, dtype="float32")[::-1]  # output channel j takes input channel 2 - j
        model.layers[0].set_weights([swap, -np.asarray(CAFFE_BGR_MEAN, dtype="float32")])
    return model
