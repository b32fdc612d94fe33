"""A really trained project tree for the evaluate / export / predict tests.

Real Fashion-MNIST images of four easily confused classes go through the real download, split,
features, train_head and finetune stages (packaged ImageNet MobileNetV2 at 32 px, one fine-tuning
epoch). Confusable classes keep test accuracy below 100%, so the misclassification gallery and the
quality gate have something to show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from headstart.layout import Layout
from headstart.params import Params
from tasks import download, evaluate, export, features, finetune, split, train_head
from tests.conftest import write_class_folders
from tests.stage_inputs import make_params

CLASS_IDS = (0, 2, 4, 6)  # t-shirt, pullover, coat, shirt
PER_CLASS = 40


# 24 val images: enough for evaluate to cross-validate a temperature (params.yaml's minimum is 50)
EVALUATE = {"calibration_min_images": 20}
# a head trained with heavy label smoothing is underconfident, which a temperature below 1 corrects
CALIBRATED = {"train_head": {"label_smoothing": 0.3}, "finetune": {"enabled": False},
              "split": {"train": 0.35, "val": 0.5, "test": 0.15}}
CALIBRATED_PER_CLASS = 200


def trained_params(root: Path, **sections: dict[str, Any]) -> Params:
    """The params the tree was built with, plus `sections` overrides (e.g. export={"formats": [...]})."""
    return make_params(root, **{**sections, "evaluate": {**EVALUATE, **sections.get("evaluate", {})}})


def calibrated_params(root: Path, **sections: dict[str, Any]) -> Params:
    """The params of `build_calibrated_tree`, plus `sections` overrides."""
    return trained_params(root, **{**CALIBRATED, **sections})


def build_trained_tree(root: Path, images: np.ndarray, labels: np.ndarray) -> Layout:
    """Run every stage up to finetune under `root` and return its layout."""
    keep = np.isin(labels, CLASS_IDS)
    write_class_folders(root / "source", images[keep], labels[keep], per_class=PER_CLASS)
    params, layout = trained_params(root), Layout(root)
    for stage in (download, split, features, train_head, finetune):
        stage.run(params, layout)
    return layout


def build_calibrated_tree(root: Path, images: np.ndarray, labels: np.ndarray) -> Layout:
    """A tree whose model is a head trained with label smoothing 0.3 (not fine-tuned) on 200 images per class,
    half of them val: underconfident enough, on enough val images, for evaluate to keep its temperature;
    export (Keras) serves it."""
    keep = np.isin(labels, CLASS_IDS)
    write_class_folders(root / "source", images[keep], labels[keep], per_class=CALIBRATED_PER_CLASS)
    params, layout = calibrated_params(root, export={"formats": ["keras"]}), Layout(root)
    for stage in (download, split, features, train_head, finetune, evaluate, export):
        stage.run(params, layout)
    return layout
