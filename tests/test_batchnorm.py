"""The fused training-mode BatchNorm (headstart/batchnorm.py): Keras' numbers on real images, Keras' layers
in the saved model."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from headstart.batchnorm import batch_norm_layers, fuse, fuse_layer


def _images(fashion_arrays, n: int = 32) -> np.ndarray:
    return np.repeat(fashion_arrays[0][:n, ..., None], 3, axis=-1).astype(np.float32) / 255.0


def _pair(momentum: float = 0.9) -> tuple[keras.layers.BatchNormalization, keras.layers.BatchNormalization]:
    plain, fused = (keras.layers.BatchNormalization(momentum=momentum, epsilon=1e-3) for _ in range(2))
    for layer in (plain, fused):
        layer.build((None, 28, 28, 3))
        layer.gamma.assign([0.5, 1.0, 2.0])
        layer.beta.assign([0.1, -0.2, 0.3])
    fuse_layer(fused)
    return plain, fused


def test_the_fused_layer_gives_keras_outputs_gradients_and_moving_statistics(fashion_arrays):
    plain, fused = _pair()
    images = _images(fashion_arrays)
    weights = tf.constant(np.random.default_rng(0).normal(size=(16, 28, 28, 3)), tf.float32)  # a loss with real gradients
    for step in range(3):  # three training calls: the moving statistics follow the same momentum
        batch = tf.constant(images[step * 8:(step + 1) * 8 + 8])
        results = []
        for layer in (plain, fused):
            with tf.GradientTape() as tape:
                tape.watch(batch)
                out = layer(batch, training=True)
                loss = tf.reduce_sum(out * weights)
            results.append((out, *tape.gradient(loss, [batch, layer.gamma, layer.beta])))
        for a, b in zip(*results, strict=True):  # float32 rounding: the kernel sums in another order
            scale = float(np.abs(a.numpy()).max())
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=5e-5 * scale)
        np.testing.assert_allclose(plain.moving_mean.numpy(), fused.moving_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(plain.moving_variance.numpy(), fused.moving_variance.numpy(), atol=1e-6)
    assert not np.allclose(plain.moving_variance.numpy(), 1.0)  # the statistics did move
    np.testing.assert_allclose(fused(images, training=False).numpy(), plain(images, training=False).numpy(), atol=1e-5)


def test_a_fused_model_saves_and_loads_as_standard_keras_layers(fashion_arrays, tmp_path):
    inputs = keras.Input((28, 28, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    inner = keras.Model(inputs, keras.layers.BatchNormalization()(x), name="inner")
    outer = keras.Sequential([keras.Input((28, 28, 3)), inner, keras.layers.BatchNormalization()])
    assert fuse(outer) == 2  # nested models included
    outer.compile(optimizer="sgd", loss="mse")
    images = _images(fashion_arrays)
    outer.fit(images, np.zeros((32, 26, 26, 4), np.float32), epochs=1, verbose=0)
    outer.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    layers = batch_norm_layers(loaded)
    assert len(layers) == 2 and all(type(layer) is keras.layers.BatchNormalization for layer in layers)
    assert all("call" not in vars(layer) for layer in layers)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), outer.predict(images, verbose=0), atol=1e-6)
