"""The optimizer extension behind discriminative rates and gradual unfreezing, on a real Keras model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from headstart.callbacks import TimeCap
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


def test_auto_epochs_spend_the_step_budget_in_whole_epochs() -> None:
    auto = FinetuneParams()  # steps 1100, max_epochs 15
    assert auto.epochs_for(222) == 5  # the default run: 7,081 train images in batches of 32
    assert auto.epochs_for(57) == 15 and auto.epochs_for(110) == 10  # 1,800 images capped; 3,500 images
    assert auto.epochs_for(5000) == 1
    assert FinetuneParams(epochs=3).epochs_for(5) == 3
    assert FinetuneParams(unfreeze_epochs=4, steps=10).epochs_for(100) == 4  # never fewer than the unfreezing


def test_time_cap_stops_after_the_epoch_that_passes_it() -> None:
    model = _two_layer_model()
    model.compile("adam", loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)), np.eye(3)[rng.integers(0, 3, 64)]
    capped = TimeCap(minutes=1e-9)
    assert len(model.fit(x, y, epochs=4, verbose=0, callbacks=[capped]).history["loss"]) == 1 and capped.reached
    roomy = TimeCap(minutes=60)
    assert len(model.fit(x, y, epochs=4, verbose=0, callbacks=[roomy]).history["loss"]) == 4 and not roomy.reached


def test_quarter_turns_rotate_each_image_exactly_and_only_in_training(fashion_arrays) -> None:
    from headstart.model import RandomQuarterTurn, build_augmentation
    from headstart.params import AugmentationParams

    images = np.repeat(fashion_arrays[0][:16, ..., None], 3, axis=-1).astype("float32")
    turned = RandomQuarterTurn(seed=3)(images, training=True).numpy()
    turns = []
    for image, out in zip(images, turned, strict=True):
        matches = [k for k in range(4) if np.array_equal(np.rot90(image, k), out)]
        assert matches, "not an exact quarter turn"
        turns.append(matches[0])
    assert len(set(turns)) > 1  # drawn per image
    np.testing.assert_array_equal(RandomQuarterTurn(seed=3)(images, training=True).numpy(), turned)  # seeded
    np.testing.assert_array_equal(RandomQuarterTurn(seed=3)(images, training=False).numpy(), images)
    layers = build_augmentation(AugmentationParams(flip="horizontal_and_vertical", quarter_turns=True), 0).layers
    assert [type(layer).__name__ for layer in layers] == ["RandomFlip", "RandomQuarterTurn"]


def test_random_resized_crops_keep_the_size_vary_per_image_and_only_train(fashion_arrays) -> None:
    from headstart.model import RandomResizedCrop, build_augmentation
    from headstart.params import AugmentationParams

    images = np.repeat(fashion_arrays[0][:16, ..., None], 3, axis=-1).astype("float32")
    cropped = RandomResizedCrop(0.35, seed=3)(images, training=True).numpy()
    assert cropped.shape == images.shape and cropped.dtype == images.dtype
    changed = [not np.allclose(a, b, atol=1.0) for a, b in zip(images, cropped, strict=True)]
    assert sum(changed) >= 12  # nearly every image is cropped
    assert len({float(np.abs(a - b).mean()) for a, b in zip(images, cropped, strict=True)}) == len(images)  # per image
    np.testing.assert_array_equal(RandomResizedCrop(0.35, seed=3)(images, training=True).numpy(), cropped)  # seeded
    np.testing.assert_array_equal(RandomResizedCrop(0.35, seed=3)(images, training=False).numpy(), images)
    # a crop of 99.9-100% of the area, at most 4/3 wide: the middle of the image keeps its pixels closely
    whole = RandomResizedCrop(0.999, seed=1)(images, training=True).numpy()
    assert np.abs(whole - images).mean() < np.abs(cropped - images).mean()
    layers = build_augmentation(AugmentationParams(flip="none", crop_area=0.35), 0).layers
    assert [type(layer).__name__ for layer in layers] == ["RandomResizedCrop"]


def test_random_erasing_blanks_one_rectangle_in_about_the_asked_share_of_images_only_in_training(fashion_arrays) -> None:
    from headstart.model import ERASED_PIXEL, build_augmentation
    from headstart.params import AugmentationParams

    images = np.repeat(fashion_arrays[0][:200, ..., None], 3, axis=-1).astype("float32")
    erase = build_augmentation(AugmentationParams(flip="none", erasing=0.5), seed=3)
    assert [type(layer).__name__ for layer in erase.layers] == ["RandomErasing"]
    erased = erase(images, training=True).numpy()
    changed = np.any(erased != images, axis=-1)  # per pixel
    touched = [i for i in range(len(images)) if changed[i].any()]
    assert 70 <= len(touched) <= 130  # about half of 200 images
    for i in touched:
        np.testing.assert_allclose(erased[i][changed[i]], np.broadcast_to(ERASED_PIXEL, (changed[i].sum(), 3)), rtol=1e-6)
        rows, cols = np.nonzero(changed[i])  # one rectangle (pixels already at the fill colour stay unchanged)
        assert changed[i].sum() <= (np.ptp(rows) + 1) * (np.ptp(cols) + 1) <= 0.34 * 28 * 28
    again = build_augmentation(AugmentationParams(flip="none", erasing=0.5), seed=3)
    np.testing.assert_array_equal(again(images, training=True).numpy(), erased)  # seeded
    np.testing.assert_array_equal(erase(images, training=False).numpy(), images)
