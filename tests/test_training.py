"""The optimizer extension behind discriminative rates and gradual unfreezing, on a real Keras model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from headstart.optimizers import block_scales, learning_rate_schedule, make_optimizer
from headstart.params import FinetuneParams


def _two_layer_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="low"), keras.layers.Dense(3, name="top")])
    return model


def _one_step(ft: FinetuneParams, scale_of_low: float) -> tuple[float, float]:
    """Mean absolute change of each layer's kernel after one training step."""
    model = _two_layer_model()
    scales, _ = block_scales(1, 0, scale_of_low)
    model.compile(make_optimizer(ft, 10, [(v, scales[0]) for v in model.get_layer("low").trainable_weights]),
                  loss="categorical_crossentropy")
    before = [model.get_layer(name).kernel.numpy() for name in ("low", "top")]
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 4)), np.eye(3)[rng.integers(0, 3, 16)], batch_size=16, epochs=1, verbose=0)
    return tuple(float(np.abs(model.get_layer(name).kernel.numpy() - b).mean())
                 for name, b in zip(("low", "top"), before, strict=True))


def test_a_zero_multiplier_freezes_a_group_even_under_weight_decay() -> None:
    ft = FinetuneParams(schedule="constant", weight_decay=0.5)
    low, top = _one_step(ft, 0.0)
    assert low == 0.0 and top > 0


def test_the_multiplier_scales_the_update() -> None:
    ft = FinetuneParams(schedule="constant", weight_decay=0.0, learning_rate=1e-3)
    full_low, _ = _one_step(ft, 1.0)
    tenth_low, _ = _one_step(ft, 0.1)
    assert tenth_low == pytest.approx(full_low / 10, rel=0.05)  # Adam's first step is lr x sign(gradient)


def test_gradual_unfreezing_releases_blocks_top_down() -> None:
    scales, release = block_scales(4, 2, 0.5)
    release(0)
    assert [float(s.numpy()) for s in scales] == [0.0, 0.0, 0.5, 0.5]
    release(1)
    assert [float(s.numpy()) for s in scales] == [0.5] * 4


def test_one_cycle_warms_up_from_a_25th_then_anneals() -> None:
    schedule = learning_rate_schedule(FinetuneParams(learning_rate=1e-3, warmup_fraction=0.2), 100)
    rates = [float(schedule(step)) for step in (0, 20, 60, 100)]
    assert rates[0] == pytest.approx(4e-5) and rates[1] == pytest.approx(1e-3)
    assert rates[1] > rates[2] > rates[3] and rates[3] < 1e-6
