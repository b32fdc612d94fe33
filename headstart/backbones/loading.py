"""The weight-source policy (imagenet, packaged, a local file or none) and the models built on a backbone."""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from headstart.backbones.preprocessing import preprocess_layer
from headstart.backbones.registry import (
    REGISTRY,
    Backbone,
    BackboneSpec,
    get_spec,
    image_size_for,
    packaged_checkpoint,
)
from headstart.backbones.weights import (
    base_from_converted,
    classifier_with_base,
    converted_weights,
    download_checkpoint,
    load_file_into,
    weights_path,
)
from headstart.files import sha256_file

log = logging.getLogger(__name__)


def _base_from_file(spec: BackboneSpec, size: int, path: Path) -> keras.Model:
    """A local file holds the base's weights, or (packaged backbones) the converted classifier's."""
    if spec.packaged is not None:
        try:
            return base_from_converted(spec, size, path)
        except ValueError as classifier_error:
            first_error = f"nor its converted classifier's ({classifier_error})"
    base = spec.builder((size, size, 3), None, False)
    try:
        load_file_into(base, path)
    except ValueError as base_error:
        detail = f"{base_error}" if spec.packaged is None else f"{base_error}; {first_error}"
        raise ValueError(f"{path} does not hold the base weights of backbone {spec.name}: {detail}") from None
    return base


def _packaged_base(spec: BackboneSpec, size: int, checkpoint: Path, weights_dir: Path) -> tuple[keras.Model, str]:
    weights_file, digest = converted_weights(spec, checkpoint, weights_dir)
    try:
        return base_from_converted(spec, size, weights_file), digest
    except (ValueError, OSError) as exc:  # a damaged cache file: convert again
        log.warning("converted weights %s unreadable (%s); converting again", weights_file, exc)
        weights_file.unlink()
        weights_file, digest = converted_weights(spec, checkpoint, weights_dir)
        return base_from_converted(spec, size, weights_file), digest


def _imagenet_base(spec: BackboneSpec, size: int, weights_dir: Path) -> tuple[keras.Model, str]:
    """Download ImageNet weights (Keras' files, or the torch checkpoint a packaged backbone converts)."""
    downloads_checkpoint = spec.packaged is not None and spec.packaged.url is not None
    if not (downloads_checkpoint or spec.keras_imagenet):
        raise ValueError(f"weights 'imagenet' has no download for {spec.name}; use packaged or a weights file")
    try:
        if downloads_checkpoint:
            return _packaged_base(spec, size, download_checkpoint(spec, weights_dir), weights_dir)
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
    size = image_size_for(spec, image_size)
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
        path = weights_path(spec, weights)
        base, weights_id = _base_from_file(spec, size, path), sha256_file(path)
    base.trainable = False
    return Backbone(spec, size, weights_id, preprocess_layer(spec.preprocessing_id, name), base)


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
            weights_file = weights_path(spec, weights)
        core = classifier_with_base(spec, size)
        load_file_into(core, weights_file)
    elif weights in ("imagenet", "none"):
        core = spec.builder((size, size, 3), None if weights == "none" else "imagenet", True)
    else:
        raise ValueError(f"the ImageNet classifier of {name} loads weights imagenet or none, not {weights!r}")
    inputs = keras.Input((size, size, 3), name="image")
    x = preprocess_layer(spec.preprocessing_id, name)(inputs)
    outputs = core(x, training=False)
    return keras.Model(inputs, outputs, name=f"{name}_imagenet")

