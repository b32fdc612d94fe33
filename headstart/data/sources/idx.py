"""MNIST-format IDX files: reading them, and their images as PNG candidates."""

from __future__ import annotations

import gzip
import io
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.data.sources.candidates import Candidate, DownloadError
from headstart.files import sha256_bytes


def read_idx(path: Path) -> np.ndarray:
    """Read an MNIST-format IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DownloadError(
            f"{path}: truncated or corrupt gzip file ({exc}); replace it with a complete copy"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DownloadError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DownloadError(f"{path}: IDX header says {shape} but the file holds {len(data) - offset} bytes; truncated?")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def find_idx(folder: Path, prefix: str, kind: str) -> Path | None:
    matches = sorted(folder.glob(f"{prefix}-{kind}-idx*-ubyte*"))
    return matches[0] if matches else None


def idx_candidates(
    folder: Path, classes: list[str] | None, per_class: int | None, seed: int
) -> tuple[list[Candidate], int, dict[str, int]]:
    """Images of `train-*` and `t10k-*` IDX pairs as PNG candidates (t10k marked as the shipped test split),
    no files skipped, and each class's image count before sampling.

    Sampling happens before PNG encoding (ranked by a seeded hash of the pixels) so a small default
    run does not encode 70,000 images.
    """
    candidates: list[Candidate] = []
    available: dict[str, int] = {}
    pairs = [(prefix, split) for prefix, split in (("train", ""), ("t10k", "test")) if find_idx(folder, prefix, "images")]
    if not pairs:
        raise DownloadError(f"{folder}: no IDX files found (expected train-images-idx3-ubyte[.gz] and labels)")
    pool: dict[int, list[tuple[str, np.ndarray, str, int]]] = defaultdict(list)
    for prefix, split in pairs:
        images_file, labels_file = find_idx(folder, prefix, "images"), find_idx(folder, prefix, "labels")
        assert images_file is not None  # pairs holds only the prefixes whose images were found
        if labels_file is None:
            raise DownloadError(f"{folder}: {images_file.name} has no matching {prefix}-labels-idx1-ubyte file")
        images, labels = read_idx(images_file), read_idx(labels_file)
        if len(images) != len(labels):
            raise DownloadError(f"{folder}: {len(images)} images but {len(labels)} labels in the {prefix} files")
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            rank = sha256_bytes(f"{seed}:".encode() + image.tobytes())
            pool[int(label)].append((rank, image, split, index))
    for label, items in sorted(pool.items()):
        if classes is not None and label >= len(classes):
            raise DownloadError(f"{folder}: label {label} has no class name in the preset ({len(classes)} names)")
        chosen = sorted(items, key=lambda item: item[0])[:per_class] if per_class else items
        name = classes[label] if classes else str(label)
        available[name] = len(items)
        for _, image, split, index in chosen:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            prefix = "t10k" if split else "train"
            candidates.append(
                Candidate(label=name, name=f"{prefix}-{index:05d}.png", origin=f"{folder}/{prefix}#{index}",
                          data=buffer.getvalue(), source_split=split)
            )
    return candidates, 0, available


# --------------------------------------------------------------------------- resolving a source
