"""One typed reader per artifact that a later stage reads: JSON records, feature arrays, saved models,
and class weights derived from the training labels. Stages read each other's outputs only through here."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import keras
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from sklearn.utils.class_weight import compute_class_weight

from headstart.files import atomic_write_json
from headstart.layout import Layout


class ArtifactError(ValueError):
    """An artifact or a setting that does not fit the data; the message names the file or key and what to do."""


def read_json(path: Path, stage: str) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `headstart {stage}` first")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path}: the file: {exc} (damaged, not JSON); rerun `headstart {stage}`") from None


def require_keras_archive(path: Path, advice: str) -> None:
    """A `.keras` file is a zip archive; Keras reports one cut short as "File not found", which it is not."""
    if not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path}: not a .keras zip archive (truncated or damaged): {advice}")


def load_model(path: Path, stage: str) -> keras.Model:
    """Load a `.keras` file in safe mode (no Lambda layers or custom code are trusted)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `headstart {stage}` first")
    require_keras_archive(path, f"rerun `headstart {stage}`")
    return keras.models.load_model(path, safe_mode=True, compile=False)


class StageInfo(BaseModel):
    """The fields of a stage's info.json that later stages rely on, typed; the rest is kept as written
    (a record for people: timings, versions, params) and reachable as extra attributes."""

    model_config = ConfigDict(extra="allow", frozen=True)

    classes: list[str]


class FeaturesInfo(StageInfo):
    feature_dim: int
    image_size: int
    backbone: str
    weights_id: str | None = None
    preprocessing_id: str | None = None
    cache_id: str | None = None


class HeadInfo(StageInfo):
    val_accuracy: float


class ModelInfo(StageInfo):
    """models/finetune/info.json: what evaluate and export need to feed the final classifier."""

    image_size: int
    backbone: str | None = None
    weights_id: str | None = None
    interpolation: str = "bilinear"
    fine_tuned: bool = False


Info = TypeVar("Info", bound=StageInfo)


def _read_info(path: Path, stage: str, model: type[Info]) -> Info:
    try:
        return model.model_validate(read_json(path, stage))
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "the file"
        raise ArtifactError(f"{path}: {where}: {problem['msg']}; rerun `headstart {stage}`") from None


def write_info(path: Path, info: dict[str, Any], model: type[StageInfo]) -> None:
    """The one writer of a stage's info.json: checked against the typed reader's model first, so a field a
    later stage relies on can never be written missing or mistyped."""
    model.model_validate(info)
    atomic_write_json(path, info)


def read_features_info(layout: Layout) -> FeaturesInfo:
    return _read_info(layout.features_dir / "info.json", "features", FeaturesInfo)


def read_head_info(layout: Layout) -> HeadInfo:
    return _read_info(layout.head_dir / "info.json", "train_head", HeadInfo)


def read_model_info(layout: Layout) -> ModelInfo:
    return _read_info(layout.finetune_dir / "info.json", "finetune", ModelInfo)


def read_metrics(layout: Layout) -> dict[str, Any]:
    """metrics.json as evaluate wrote it: per split and model, flat numbers (the keys `dvc metrics` shows)."""
    metrics = read_json(layout.metrics_file, "evaluate")
    if not isinstance(metrics, dict) or "test" not in metrics:
        raise ArtifactError(f"{layout.metrics_file}: no test metrics; rerun `headstart evaluate`")
    return metrics


def load_split(path: Path, num_classes: int, feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, D), labels int32 (N,)) from a features .npz, checked against info.json."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the features stage first (headstart features)")
    with np.load(path, allow_pickle=False) as data:
        features = data["features"].astype(np.float32, copy=False)
        labels = data["labels"].astype(np.int32, copy=False)
    if features.ndim != 2 or features.shape[1] != feature_dim or len(labels) != len(features):
        raise ArtifactError(
            f"{path}: features {features.shape} / labels {labels.shape} do not match feature_dim={feature_dim} "
            "in info.json: rerun the features stage"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ArtifactError(f"{path}: labels outside 0..{num_classes - 1}: rerun the features stage")
    return features, labels


def load_split_paths(path: Path) -> np.ndarray:
    """The manifest path of each row of a features .npz, in row order (as the features stage wrote them)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the features stage first (headstart features)")
    with np.load(path, allow_pickle=False) as data:
        return data["path"].astype(str)


def class_weights(spec: str | dict[str, float], labels: np.ndarray, classes: list[str]) -> dict[int, float] | None:
    """Keras `class_weight` from params: none, balanced (n / (C * count) on the train split) or per class name.

    Classes missing from an explicit mapping keep weight 1.0.
    """
    if spec == "none":
        return None
    if isinstance(spec, str):  # "balanced": params allow no other text
        present = np.bincount(labels, minlength=len(classes))
        if (present == 0).any():
            empty = [c for c, n in zip(classes, present, strict=True) if n == 0]
            raise ArtifactError(f"class_weight: balanced needs train images of every class; none for {empty}")
        weights = compute_class_weight("balanced", classes=np.arange(len(classes)), y=labels)
        return {i: float(w) for i, w in enumerate(weights)}
    unknown = sorted(set(spec) - set(classes))
    if unknown:
        raise ArtifactError(
            f"train_head.class_weight names unknown class(es) {unknown}; the classes are {classes}. "
            "Fix the names in params.yaml (they are the class folder names)."
        )
    bad = {name: w for name, w in spec.items() if not w > 0}
    if bad:
        raise ArtifactError(f"train_head.class_weight: weights must be > 0, got {bad}")
    return {i: float(spec.get(name, 1.0)) for i, name in enumerate(classes)}
