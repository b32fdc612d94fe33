"""A real project tree up to the features stage, for the train_head and finetune tests.

Real Fashion-MNIST images go through the real download, split and features stages with the
packaged (ImageNet) MobileNetV2 at 32 px. The tree is built once per session; each test gets its
own copy so stages can write into it freely.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from headstart.layout import Layout
from headstart.params import Params, validate_params
from tasks import download, features, split
from tests.conftest import write_class_folders

IMAGE_SIZE = 32
CLASS_IDS = (0, 1, 7)  # t-shirt, trouser, sneaker
PER_CLASS = 40

BASE_PARAMS: dict[str, Any] = {
    "download": {"min_images_per_class": 5},
    "features": {"image_size": IMAGE_SIZE, "batch_size": 32},
    "train_head": {"epochs": 10, "batch_size": 16, "units": 32},
    "finetune": {"epochs": 1, "batch_size": 16, "top_blocks": 1},
}


def make_params(root: Path, **sections: dict[str, Any]) -> Params:
    """BASE_PARAMS with `sections` merged in, reading the images written under `root`."""
    raw = {name: dict(values) for name, values in BASE_PARAMS.items()}
    raw["download"]["source"] = str(root / "source")
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return validate_params(raw)


def build_feature_tree(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    keep = np.isin(labels, CLASS_IDS)
    write_class_folders(root / "source", images[keep], labels[keep], per_class=PER_CLASS)
    params, layout = make_params(root), Layout(root)
    for stage in (download, split, features):
        stage.run(params, layout)
    return root


def copy_tree(source: Path, target: Path) -> Layout:
    """A private copy of the tree (the converted backbone weights are linked, not copied)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("backbone"))
    (target / "data" / "backbone").symlink_to(source / "data" / "backbone", target_is_directory=True)
    return Layout(target)
