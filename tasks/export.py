"""export stage: package the final classifier for callers that hold raw images.

The exported model takes uint8 RGB images of any size: Input (None, None, 3) uint8 -> cast ->
the same Keras `Resizing` layer the data pipeline uses -> the classifier (preprocessing inside).
Formats: `.keras`, a SavedModel with a named serving signature, TFLite float32 / float16 /
full-integer int8 (calibrated on a sample of the train split), ONNX (tf2onnx; ONNX Runtime) and OpenVINO
IR (f32 weights; run at f32). A parity check runs every format
through `headstart.serving`'s loaders (predict's too) on the test split; float formats that disagree with Keras on
more than `1 - export.min_float_agreement` of the images fail the stage. Every format carries the
softmax temperature evaluate chose (metrics.json `calibration.temperature`: 1 unless scaling lowered the
held-out val log loss; baked into the final Dense layer), so it serves the probabilities evaluate
scored; the model card says which T and why (`calibration.reason`).
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from headstart.calibration import CalibrationRecord, apply_temperature, read_calibration
from headstart.data.artifacts import ModelInfo, load_model, read_features_info, read_metrics, read_model_info
from headstart.data.images import load_rgb
from headstart.data.manifest import read_split_manifest
from headstart.files import atomic_directory, atomic_write_json, remove_stale_temps, sha256_file
from headstart.layout import Layout
from headstart.model import with_flip_tta
from headstart.params import Params
from headstart.runtimes import RuntimeUnavailable, available, install_hint
from headstart.serving import (
    FILES,
    INPUT_NAME,
    LABELS_FILE,
    MODEL_CARD,
    OUTPUT_NAME,
    SIGNATURE,
    Predictor,
    files_of,
    keras_runner,
    load_predictor,
    serving_model,
    write_onnx,
    write_openvino,
    write_saved_model,
)

log = logging.getLogger(__name__)

FLOAT_FORMATS = ("keras", "saved_model", "tflite_float32", "tflite_float16", "onnx", "openvino")
RUNTIME_OF = {"onnx": "onnxruntime", "openvino": "openvino"}  # formats whose parity check needs that package
PARITY_BATCH = 32


class ExportParityError(ValueError):
    """An exported float format disagrees with the Keras model more than allowed."""


def representative_images(layout: Layout, count: int, image_size: int) -> list[np.ndarray]:
    """`count` train images, the same ones every run: the lowest content hashes (an unbiased, stable draw)."""
    manifest = read_split_manifest(layout.split_manifest)
    train = manifest[manifest["split"] == "train"].sort_values("sha256").head(count)
    if train.empty:
        raise ValueError(f"{layout.split_manifest} has no train images to calibrate the int8 model with")
    return [load_rgb(layout.root / path, target_size=image_size) for path in train["path"]]


def convert_tflite(saved_model: Path, kind: str, calibration: list[np.ndarray] | None = None) -> bytes:
    """TFLite flatbuffer from the SavedModel signature; input stays uint8 with a resizable (-1) shape."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[SIGNATURE])
    if kind == "tflite_float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "tflite_int8":

        def samples() -> Iterator[list[np.ndarray]]:
            for image in calibration or []:
                yield [image[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return converter.convert()


def _test_images(layout: Layout, classes: list[str], image_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The test split decoded as evaluate and predict decode it, with class indices."""
    manifest = read_split_manifest(layout.split_manifest)
    test = manifest[manifest["split"] == "test"]
    if test.empty:
        raise ValueError(f"{layout.split_manifest} has no test images for the parity check: set split.test > 0")
    images = [load_rgb(layout.root / path, target_size=image_size) for path in test["path"]]
    return images, test["label"].map(classes.index).to_numpy()


def _predict_all(predictor: Predictor, images: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([predictor.predict(images[i : i + PARITY_BATCH]) for i in range(0, len(images), PARITY_BATCH)])


def parity_check(reference: np.ndarray, exported: dict[str, Path], images: list[np.ndarray],
                 labels: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement with the in-memory Keras model, accuracy and largest probability gap per format."""
    ref_top1 = reference.argmax(axis=1)
    ref_accuracy = float((ref_top1 == labels).mean())
    result: dict[str, Any] = {"images": len(labels), "reference": {"accuracy": ref_accuracy}}
    for fmt, path in exported.items():
        probs = _predict_all(load_predictor(path), images)
        top1 = probs.argmax(axis=1)
        accuracy = float((top1 == labels).mean())
        result[fmt] = {
            "agreement": float((top1 == ref_top1).mean()),
            "accuracy": accuracy,
            "accuracy_drop": ref_accuracy - accuracy,
            "max_abs_prob_diff": float(np.abs(probs - reference).max()),
        }
        log.info("export: %s agrees with the in-memory Keras model on %.2f%% of %d test images (accuracy %.4f vs %.4f)",
                 fmt, 100 * result[fmt]["agreement"], len(labels), accuracy, ref_accuracy)
    return result


def check_float_agreement(parity: dict[str, Any], minimum: float, report: Path) -> None:
    """Fail when a float format's top-1 disagrees with Keras too often (int8 is only reported)."""
    failing = {f: parity[f]["agreement"] for f in FLOAT_FORMATS if f in parity and parity[f]["agreement"] < minimum}
    if failing:
        raise ExportParityError(
            "exported float model(s) disagree with the Keras model on the test split: "
            + ", ".join(f"{f} top-1 agreement {a:.4f}" for f, a in failing.items())
            + f" < export.min_float_agreement={minimum:g}; nothing was exported. See {report}."
        )


def _size(fmt: str, path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files_of(fmt, path))


def code_hashes() -> dict[str, str]:
    """sha256 of every module of the installed stages (`tasks`) and library (`headstart`): which code made
    this model."""
    root = Path(__file__).resolve().parents[1]
    modules = sorted([*(root / "tasks").glob("*.py"), *(root / "headstart").rglob("*.py")])
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in modules}


def model_card(params: Params, layout: Layout, info: ModelInfo, files: dict[str, Path], parity: dict[str, Any],
               image_size: int, calibration: CalibrationRecord) -> dict[str, Any]:
    metrics = read_metrics(layout)
    features_info = read_features_info(layout) if (layout.features_dir / "info.json").exists() else None
    return {
        "classes": info.classes,
        "backbone": info.backbone,
        "weights_id": info.weights_id,
        "fine_tuned": info.fine_tuned,
        "tta_flip": params.evaluate.tta_flip,
        "calibration": calibration.model_dump(mode="json"),
        "input": {
            "name": INPUT_NAME, "dtype": "uint8", "shape": [None, None, None, 3], "color": "RGB, 0..255, upright",
            "resized_inside_to": [image_size, image_size], "interpolation": info.interpolation,
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32 (uint8 in the int8 TFLite model, scale 1/256)",
                   "shape": [None, len(info.classes)], "meaning": "softmax probabilities in labels.txt order, temperature-scaled by "
                              f"calibration.temperature = {calibration.temperature:.4f} ({calibration.reason})"},
        "serving_signature": SIGNATURE,
        "files": {fmt: {"path": FILES[fmt], "bytes": _size(fmt, path)} for fmt, path in files.items()},
        "params": params.model_dump(mode="json"),
        "metrics": metrics,
        "parity": parity,
        "data": {
            "split_manifest_sha256": sha256_file(layout.split_manifest),
            "features_cache_id": features_info.cache_id if features_info else None,
        },
        "source_model_sha256": sha256_file(layout.finetune_model),
        "code": code_hashes(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()},
    }


def _check_runtimes(formats: Sequence[str]) -> None:
    missing = [f"{fmt} needs {RUNTIME_OF[fmt]} ({install_hint(RUNTIME_OF[fmt])})" for fmt in formats
               if fmt in RUNTIME_OF and not available(RUNTIME_OF[fmt])]
    if missing:
        raise RuntimeUnavailable(f"export.formats: {'; '.join(missing)}; or remove the format from export.formats")


def run(params: Params, layout: Layout) -> dict[str, Any]:
    p = params.export
    remove_stale_temps(*layout.outputs("export"))
    _check_runtimes(p.formats)
    info = read_model_info(layout)
    classes = info.classes
    image_size = info.image_size
    classifier = load_model(layout.finetune_model, "finetune")
    scaling = read_calibration(layout)
    apply_temperature(classifier, scaling.temperature)  # each TTA pass is scaled before the mean, as evaluated
    # the model evaluate scored: with flip test-time augmentation when evaluate.tta_flip is on
    model = serving_model(with_flip_tta(classifier) if params.evaluate.tta_flip else classifier, image_size,
                          info.interpolation)
    images, labels = _test_images(layout, classes, image_size)
    reference = _predict_all(Predictor(keras_runner(model), classes, "keras"), images)

    scratch = Path(tempfile.mkdtemp(prefix=".export.", dir=layout.root))
    try:
        with atomic_directory(layout.export_dir) as staging:
            (staging / LABELS_FILE).write_text("\n".join(classes) + "\n", encoding="utf-8")
            exported: dict[str, Path] = {}
            if "keras" in p.formats:
                model.save(staging / FILES["keras"])
                exported["keras"] = staging / FILES["keras"]
            # the TFLite converters read the SavedModel even when it is not a requested format
            saved_model = staging / FILES["saved_model"] if "saved_model" in p.formats else scratch / "saved_model"
            write_saved_model(model, saved_model)
            if "saved_model" in p.formats:
                exported["saved_model"] = saved_model
            calibration = (representative_images(layout, p.representative_samples, image_size)
                           if "tflite_int8" in p.formats else None)
            for fmt in ("tflite_float32", "tflite_float16", "tflite_int8"):
                if fmt in p.formats:
                    log.info("export: converting %s", fmt)
                    (staging / FILES[fmt]).write_bytes(convert_tflite(saved_model, fmt, calibration))
                    exported[fmt] = staging / FILES[fmt]
            for fmt, write in (("onnx", write_onnx), ("openvino", write_openvino)):
                if fmt in p.formats:
                    log.info("export: converting %s", fmt)
                    write(model, staging / FILES[fmt])
                    exported[fmt] = staging / FILES[fmt]

            parity = parity_check(reference, exported, images, labels)
            parity["min_float_agreement"] = p.min_float_agreement
            for fmt, path in exported.items():
                parity[fmt]["bytes"] = _size(fmt, path)
            card = model_card(params, layout, info, exported, parity, image_size, scaling)
            atomic_write_json(staging / MODEL_CARD, card)
            atomic_write_json(layout.export_parity, parity)
            check_float_agreement(parity, p.min_float_agreement, layout.export_parity)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return parity
