"""The streaming image pipeline shared by features, fine-tuning and evaluation.

Decoding goes through `headstart.data.images.load_rgb` (Pillow: EXIF-upright RGB) and resizing through the
same Keras `Resizing` layer the exported model carries, so training, evaluation and serving see
identical pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import numpy as np
import tensorflow as tf
from keras import layers

from headstart.data.images import DECODE_ID, ImageError, load_rgb
from headstart.files import atomic_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

CACHE_BATCH = 64
CACHE_DTYPE = "float32"  # image_dataset's own dtype: the cache stores its pixels unrounded


def resizing_layer(image_size: int, interpolation: str = "bilinear") -> layers.Resizing:
    return layers.Resizing(image_size, image_size, interpolation=interpolation, name="resize")


DECODE_THREADS = 4  # Pillow releases the GIL while it inflates and decodes


def _decode(path: str, image_size: int) -> np.ndarray:
    try:
        return load_rgb(path, target_size=image_size)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}; rerun `headstart download` to quarantine it") from None


def image_batches(paths: Sequence[str], image_size: int, batch_size: int,
                  interpolation: str = "bilinear") -> Iterator[np.ndarray]:
    """Float32 (B, S, S, 3) RGB batches in [0, 255], decoded by Pillow in threads, then resized one shape at
    a time: resizing is per image, so a stack of same-shape images comes out bit for bit as each would alone.

    Iterating this directly skips tf.data, whose per-call Python overhead cost twice the decoding itself
    (10,000 Fashion-MNIST images to 96 px: 2.3 s here, 5.2 s through `image_dataset`, docs/benchmarks.md)."""
    resize = resizing_layer(image_size, interpolation)
    decode = partial(_decode, image_size=image_size)
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        for start in range(0, len(paths), batch_size):
            images = list(pool.map(decode, paths[start:start + batch_size]))
            batch = np.empty((len(images), image_size, image_size, 3), np.float32)
            shapes: dict[tuple[int, ...], list[int]] = {}
            for row, image in enumerate(images):
                shapes.setdefault(image.shape, []).append(row)
            for rows in shapes.values():
                batch[rows] = resize(np.stack([images[row] for row in rows]).astype(np.float32))
            yield batch


def prefetched(batches: Iterator[np.ndarray], depth: int = 4) -> Iterator[np.ndarray]:
    """`batches`, produced `depth` ahead in a thread: decoding overlaps the consumer's inference, which
    releases the GIL (OpenVINO, ONNX Runtime, TensorFlow). An error in the thread is raised here."""
    queue: Queue[Any] = Queue(depth)
    end = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                queue.put(batch)
            queue.put(end)
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="decode")
    thread.start()
    try:
        while (item := queue.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                queue.get(timeout=0.1)
            except Empty:
                pass


def image_dataset(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    image_size: int,
    batch_size: int,
    interpolation: str = "bilinear",
) -> tf.data.Dataset:
    """`image_batches` as a tf.data.Dataset (and labels when given), for Keras' fit and predict."""
    paths = list(paths)
    ds = tf.data.Dataset.from_generator(
        lambda: image_batches(paths, image_size, batch_size, interpolation),
        output_signature=tf.TensorSpec((None, image_size, image_size, 3), tf.float32),
    ).apply(tf.data.experimental.assert_cardinality(math.ceil(len(paths) / batch_size)))  # Keras then knows the end
    if labels is not None:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(np.asarray(labels, dtype=np.int32))
                                  .batch(batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE)


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
            for batch in image_batches(paths, image_size, CACHE_BATCH, interpolation):
                array[row : row + len(batch)] = batch
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
