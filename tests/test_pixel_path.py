"""One pixel path: fine-tuning's cache, its validation batches, evaluate's pipeline and the exported model's
own resize see identical pixels (issue 18), on a non-square photo, a 28 px image and a 16-bit PNG."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from headstart.data.datasets import cached_images, image_batches, image_dataset, prefetched, resizing_layer
from headstart.data.images import ImageError, load_rgb
from headstart.params import FinetuneParams
from headstart.serving import serving_model
from headstart.training import EpochData

SIZE = 64


def _sources(tmp_path: Path, photos: dict[str, Path], fashion_arrays) -> list[Path]:
    photo = photos["dog"]  # 768x576 JPEG: non-square, reduced while decoding
    assert Image.open(photo).width != Image.open(photo).height
    small = tmp_path / "shirt.png"
    Image.fromarray(fashion_arrays[0][0]).save(small)  # 28x28 grayscale: upscaled to fractional values
    deep = tmp_path / "deep.png"
    ramp = (np.linspace(0, 60_000, 40 * 50).reshape(40, 50)).astype(np.uint16)
    Image.fromarray(ramp).save(deep)  # 16-bit grayscale
    assert Image.open(deep).mode.startswith("I")
    return [photo, small, deep]


def test_training_validation_evaluate_and_export_see_identical_pixels(tmp_path: Path, photos, fashion_arrays) -> None:
    paths = [str(p) for p in _sources(tmp_path, photos, fashion_arrays)]
    cached = np.asarray(cached_images(paths, [str(i) for i in range(len(paths))], SIZE, "bilinear", tmp_path / "cache"))
    evaluated = np.concatenate([batch.numpy() for batch in image_dataset(paths, None, SIZE, 2)])
    np.testing.assert_array_equal(cached, evaluated)
    assert np.any(cached != np.rint(cached))  # resizing makes fractional pixels, and the cache keeps them

    # the exported model: raw uint8 of any size in, its own Resizing inside; an identity classifier shows its input
    identity = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Identity()])
    exported = serving_model(identity, SIZE, "bilinear")
    for path, row in zip(paths, cached, strict=True):
        served = exported.predict(load_rgb(path, target_size=SIZE)[None], verbose=0)[0]
        np.testing.assert_array_equal(served, row)

    # fine-tuning's train (no augmentation) and validation batches come from the same rows
    ft = FinetuneParams(augmentation={"flip": "none"}, batch_size=8)
    data = EpochData(cached, np.arange(len(paths)) % 2, 2, 2, ft)
    train = np.concatenate([x.numpy() for x, _ in data.train])
    np.testing.assert_array_equal(np.concatenate([train[np.argsort(data._order())], *[x.numpy() for x, _ in data.val]]),
                                  cached)


def test_a_batch_of_mixed_shapes_resizes_as_each_image_alone(tmp_path: Path, photos, fashion_arrays) -> None:
    """image_batches resizes the images of one shape together: bit for bit what each gives alone."""
    paths = [str(p) for p in _sources(tmp_path, photos, fashion_arrays)]
    for i in (1, 2):  # more 28 px images, the shape the stack resizes together
        Image.fromarray(fashion_arrays[0][i]).save(tmp_path / f"shirt{i}.png")
        paths.insert(i, str(tmp_path / f"shirt{i}.png"))
    (batch,) = list(prefetched(image_batches(paths, SIZE, len(paths))))
    resize = resizing_layer(SIZE, "bilinear")
    for path, row in zip(paths, batch, strict=True):
        np.testing.assert_array_equal(resize(load_rgb(path, target_size=SIZE).astype(np.float32)), row)


def test_a_decoding_error_in_the_prefetching_thread_reaches_the_caller(tmp_path: Path, fashion_arrays) -> None:
    good = tmp_path / "shirt.png"
    Image.fromarray(fashion_arrays[0][0]).save(good)
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ImageError, match=r"cut\.png: corrupt or truncated"):
        list(prefetched(image_batches([str(good)] * 5 + [str(bad)], SIZE, 2)))
