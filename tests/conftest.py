"""Shared fixtures: real images from the registry datasets installed by scripts/setup.sh."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.data.sources.idx import read_idx  # noqa: F401 - tests read Fashion-MNIST through it

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DARKNET_PHOTOS = Path("/usr/share/darknet/data")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


@pytest.fixture(scope="session")
def fashion_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The first 2,000 Fashion-MNIST training images and labels (real, from Debian's package)."""
    images = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")[:2000]
    labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")[:2000]
    return images, labels


def write_class_folders(root: Path, images: np.ndarray, labels: np.ndarray, per_class: int, scale: int = 1) -> Path:
    """Write `per_class` real images of each class as PNG into root/<class>/<n>.png."""
    counts: dict[int, int] = {}
    for image, label in zip(images, labels, strict=True):
        label = int(label)
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / FASHION_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        if scale != 1:
            picture = picture.resize((image.shape[1] * scale, image.shape[0] * scale))
        picture.save(folder / f"{counts[label]:05d}.png")
    return root


@pytest.fixture
def small_dataset(tmp_path: Path, fashion_arrays) -> Path:
    """A folder of 3 classes x 20 real Fashion-MNIST images."""
    images, labels = fashion_arrays
    keep = labels < 3
    return write_class_folders(tmp_path / "images", images[keep], labels[keep], per_class=20)


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """Real colour photos: darknet's sample photos (Debian) and scikit-image's test photos."""
    import skimage.data

    found = {p.stem: p for p in DARKNET_PHOTOS.glob("*.jpg")}
    skimage_dir = Path(skimage.data.__file__).parent
    for name in ("chelsea.png", "coffee.png", "astronaut.png"):
        if (skimage_dir / name).exists():
            found[Path(name).stem] = skimage_dir / name
    return found


@pytest.fixture(scope="session")
def trained_tree(tmp_path_factory, fashion_arrays):
    """A project trained through finetune on real images (evaluate/export/predict tests; built once)."""
    from tests.model_fixture import build_trained_tree

    images, labels = fashion_arrays
    return build_trained_tree(tmp_path_factory.mktemp("trained"), images, labels)


@pytest.fixture(scope="session")
def exported_tree(trained_tree):
    """`trained_tree` after the real evaluate and export stages (built once)."""
    from headstart.runtimes import available
    from tasks import evaluate, export
    from tests.model_fixture import trained_params

    # every format whose runtime is installed (OpenVINO and ONNX Runtime are optional for the suite)
    formats = [fmt for fmt in export.FILES if available(export.RUNTIME_OF.get(fmt, "tensorflow"))]
    params = trained_params(trained_tree.root, export={"formats": formats})
    evaluate.run(params, trained_tree)
    export.run(params, trained_tree)
    return trained_tree


@pytest.fixture(scope="session")
def calibrated_tree(tmp_path_factory, fashion_arrays):
    """A head-only model whose temperature evaluate keeps, evaluated and exported (Keras; built once)."""
    from tests.model_fixture import build_calibrated_tree

    images, labels = fashion_arrays
    return build_calibrated_tree(tmp_path_factory.mktemp("calibrated"), images, labels)
