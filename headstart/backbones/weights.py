"""Weight files: torch checkpoints converted once into a replica (cached by the checkpoint's sha256), and
strict loading of Keras weight files."""

from __future__ import annotations

import json
import logging
import time
import warnings
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np

from headstart.backbones.registry import SOURCES, WEIGHT_FILE_SUFFIXES, BackboneSpec
from headstart.backbones.replicas import BASE_NAME
from headstart.backbones.torch_checkpoint import load_state_dict
from headstart.files import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)


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


def classifier_with_base(spec: BackboneSpec, size: int) -> keras.Model:
    return spec.builder((size, size, 3), None, True)


def _convert(spec: BackboneSpec, checkpoint: Path, target: Path) -> float:
    """Build the replica classifier, copy the checkpoint in and save it atomically; returns seconds."""
    assert spec.packaged is not None
    started = time.perf_counter()
    model = classifier_with_base(spec, spec.default_size)
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


def download_checkpoint(spec: BackboneSpec, weights_dir: Path) -> Path:
    """`imagenet` for a torch-sourced backbone: fetch the same checkpoint from its official address."""
    assert spec.packaged is not None and spec.packaged.url is not None
    name = spec.packaged.url.rsplit("/", 1)[-1]
    Path(weights_dir).mkdir(parents=True, exist_ok=True)  # get_file falls back to /tmp/.keras when it is absent
    return Path(
        keras.utils.get_file(
            name, spec.packaged.url, file_hash=spec.packaged.sha256, cache_dir=str(Path(weights_dir).resolve()), cache_subdir="downloads"
        )
    )


def base_from_converted(spec: BackboneSpec, size: int, weights_file: Path) -> keras.Model:
    classifier = classifier_with_base(spec, size)
    load_file_into(classifier, weights_file)
    return classifier.get_layer(BASE_NAME)


def weights_path(spec: BackboneSpec, weights: str) -> Path:
    path = Path(weights)
    if not str(path).endswith(WEIGHT_FILE_SUFFIXES):
        raise ValueError(
            f"weights {weights!r} for backbone {spec.name}: use one of {', '.join(SOURCES)} "
            f"or a path to a {' / '.join(WEIGHT_FILE_SUFFIXES)} file"
        )
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist (weights: {weights!r}); check the path")
    keras_zip = path.suffix == ".keras"
    if not (zipfile.is_zipfile(path) if keras_zip else h5py.is_hdf5(path)):
        raise ValueError(
            f"weights file {path} is not {'a .keras zip archive' if keras_zip else 'an HDF5 file'} (damaged, or "
            "another format renamed): features.weights takes a Keras weights file, HDF5 (.weights.h5, .h5) or a "
            "saved .keras model"
        )
    return path


def load_file_into(model: keras.Model, path: Path) -> None:
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

