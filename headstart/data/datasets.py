"""The streaming image pipeline shared by features, fine-tuning and evaluation.

Decoding goes through `headstart.data.images.load_rgb` (Pillow: EXIF-upright RGB) and resizing through the
same Keras `Resizing` layer the exported model carries, so training, evaluation and serving see
identical pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from keras import layers

from headstart.data.images import DECODE_ID, load_rgb
from headstart.files import atomic_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

CACHE_BATCH = 64
CACHE_DTYPE = "float32"  # image_dataset's own dtype: the cache stores its pixels unrounded


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


def cached_images(
    paths: Sequence[str], keys: Sequence[str], image_size: int, interpolation: str, folder: Path
) -> np.ndarray:
    """`image_dataset`'s pixels, computed once: float32 (N, S, S, 3) on disk, memory-mapped.

    Training epochs read this array instead of decoding files again; memory-mapping keeps the
    process's own memory at a batch while the OS caches what fits. The rows are `image_dataset`'s
    output bit for bit (no rounding to uint8: resizing makes fractional values, and rounding them
    flipped borderline images between fine-tuning's validation and evaluate), so training, the
    fine-tune stage's validation, evaluate and the exported model see identical pixels. The file is
    named by the images' content hashes (`keys`), the size and the interpolation; other cache files are removed.
    """
    digest = hashlib.sha256(json.dumps([list(keys), image_size, interpolation, DECODE_ID, CACHE_DTYPE])
                            .encode()).hexdigest()[:20]
    target = folder / f"images-{digest}.npy"
    shape = (len(paths), image_size, image_size, 3)
    if not _intact(target, shape):
        with atomic_path(target, suffix=".npy") as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=CACHE_DTYPE, shape=shape)
            row = 0
            for batch in image_dataset(paths, None, image_size, CACHE_BATCH, interpolation):
                array[row : row + len(batch)] = batch.numpy()
                row += len(batch)
            array.flush()
            del array
        atomic_write_text(_checksum_file(target), sha256_file(target) + "\n")  # last: it vouches for the file
        for stale in folder.glob("images-*.npy*"):
            if stale not in (target, _checksum_file(target)):
                stale.unlink(missing_ok=True)
    return np.load(target, mmap_mode="r")


def _checksum_file(cache: Path) -> Path:
    return cache.with_name(cache.name + ".sha256")


def _intact(cache: Path, shape: tuple[int, ...]) -> bool:
    """True when `cache` holds the whole array its header promises and matches the checksum written after it;
    a cache cut short (a full disk, a copy interrupted) or altered is named and rebuilt."""
    if not cache.exists():
        return False
    try:
        array = np.load(cache, mmap_mode="r")
        problem = "" if array.shape == shape and array.dtype == CACHE_DTYPE else f"holds {array.shape} {array.dtype}, not {shape} {CACHE_DTYPE}"
        del array
    except (ValueError, OSError, EOFError) as exc:  # numpy: "mmap length is greater than file size"
        problem = str(exc)
    checksum = _checksum_file(cache)
    if not problem and not (checksum.exists() and checksum.read_text().strip() == sha256_file(cache)):
        problem = f"its content does not match {checksum.name}" if checksum.exists() else f"{checksum.name} is missing"
    if problem:
        log.warning("decoded-image cache %s is damaged or incomplete (%s): decoding the images again", cache, problem)
        return False
    return True
