"""The export contract, shared by the export stage (which writes it) and predict (which reads it).

Every exported format takes raw uint8 RGB images of any size under the input name `image` and
returns softmax `probabilities` in `labels.txt` order; resizing and preprocessing live inside the
model. The loaders here run `.keras` (safe mode), a SavedModel directory (its `serving_default`
signature), a `.tflite` file (LiteRT interpreter, input resized per image shape), an `.onnx` file (ONNX
Runtime) or an OpenVINO `.xml` (f32); the export stage's parity check runs its formats through these
same loaders. TensorFlow and Keras are imported only by what needs them, so predicting with the last
three formats never pays TensorFlow's import (about 5 s).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headstart import runtimes

SIGNATURE = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
LABELS_FILE = "labels.txt"
MODEL_CARD = "model_card.json"
FILES = {  # format -> its name in the export folder
    "keras": "model.keras",
    "saved_model": "saved_model",
    "tflite_float32": "model_float32.tflite",
    "tflite_float16": "model_float16.tflite",
    "tflite_int8": "model_int8.tflite",
    "onnx": "model.onnx",
    "openvino": "model.xml",  # and its weights, model.bin
}


class ModelFormatError(ValueError):
    """A model path that is not one of the exported formats, or a model without the expected I/O."""


def serving_model(classifier: Any, image_size: int, interpolation: str) -> Any:
    """Raw uint8 RGB of any size in, class probabilities out; built-in layers only (safe-mode loadable)."""
    import keras
    from keras import layers

    from headstart.data.datasets import resizing_layer

    image = keras.Input((None, None, 3), dtype="uint8", name=INPUT_NAME)
    x = layers.Rescaling(1.0, name="to_float32")(image)  # Rescaling casts to its float32 compute dtype
    # training=False pinned: Resizing's call defaults to training=True, and as the first layer with a training
    # argument it would set it for everything after it, so `model(x)` would run BatchNorm on batch statistics
    x = resizing_layer(image_size, interpolation)(x, training=False)
    return keras.Model(image, classifier(x), name="headstart_classifier")


def write_saved_model(model: Any, target: Path) -> None:
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SIGNATURE,
        fn=lambda image: {OUTPUT_NAME: model(image, training=False)},
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)],
    )
    archive.write_out(str(target), verbose=False)


def _serving_function(model: Any) -> Any:
    import tensorflow as tf

    from headstart.conversion import traced

    return traced(model, tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME), OUTPUT_NAME)


def write_onnx(model: Any, target: Path) -> None:
    """The serving model as ONNX (uint8 `image` of any size in, `probabilities` out)."""
    from headstart.conversion import to_onnx

    target.write_bytes(to_onnx(_serving_function(model)).SerializeToString())


def write_openvino(model: Any, target: Path) -> None:
    """The serving model as OpenVINO IR: `target` (.xml) and its weights beside it (.bin), kept in f32."""
    import openvino as ov

    from headstart.conversion import to_openvino

    converted = to_openvino(_serving_function(model))
    converted.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    ov.save_model(converted, str(target), compress_to_fp16=False)


def files_of(fmt: str, path: Path) -> list[Path]:
    """Every file a format's export consists of (OpenVINO: the .xml and its .bin)."""
    return [path, path.with_suffix(".bin")] if fmt == "openvino" else [path]


def _beside(model_path: Path, name: str) -> list[Path]:
    """Where the export folder's `name` sits for this model (a SavedModel directory: inside or beside it)."""
    return ([model_path / name] if model_path.is_dir() else []) + [model_path.parent / name]


def read_labels(model_path: Path) -> list[str]:
    """Class names from labels.txt beside the model."""
    for candidate in _beside(model_path, LABELS_FILE):
        if candidate.exists():
            labels = [line.strip() for line in candidate.read_text(encoding="utf-8").splitlines() if line.strip()]
            if labels:
                return labels
    raise FileNotFoundError(
        f"no {LABELS_FILE} found beside {model_path}: predict needs the export folder's {LABELS_FILE} "
        "(run `headstart export`, or copy it next to the model)"
    )


def read_input_size(model_path: Path) -> int | None:
    """The side the model resizes to inside, from model_card.json beside it; None without a card."""
    for candidate in _beside(model_path, MODEL_CARD):
        if candidate.exists():
            try:
                return int(json.loads(candidate.read_text(encoding="utf-8"))["input"]["resized_inside_to"][0])
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise ModelFormatError(
                    f"{candidate}: damaged ({type(exc).__name__}: {exc}). Copy the export folder's {MODEL_CARD} "
                    "again, or delete it: predict still runs without it, decoding images at full size"
                ) from None
    return None


def group_by_shape(images: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Image shape -> the indices of the images of that shape (a model runs one shape per batch)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.shape, []).append(index)
    return groups


class Predictor:
    """Runs one exported model on uint8 HxWx3 images; images of the same size share a batch.

    `image_size` is the side the model resizes to inside: images are decoded toward it, as in
    training (None: decoded at full size).
    """

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], classes: list[str], kind: str,
                 image_size: int | None = None):
        self._run_batch = run_batch
        self.classes = classes
        self.kind = kind
        self.image_size = image_size

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, classes) float32 probabilities, in the order of `images`."""
        out = np.zeros((len(images), len(self.classes)), dtype=np.float32)
        for indices in group_by_shape(images).values():
            probs = self._run_batch(np.stack([images[i] for i in indices]))
            if probs.shape[-1] != len(self.classes):
                raise ModelFormatError(
                    f"the {self.kind} model outputs {probs.shape[-1]} classes but {LABELS_FILE} lists {len(self.classes)}: "
                    "use the labels.txt exported with this model"
                )
            out[indices] = probs
        return out


def _check_input(kind: str, dtype: Any, shape: Sequence[Any], path: Path) -> None:
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ModelFormatError(
            f"{path}: this {kind} model takes {np.dtype(dtype).name} {list(shape)}, not uint8 RGB images of any size; "
            "predict needs a model written by `headstart export` (models/export/)"
        )


def _keras_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import keras

    from headstart.data.artifacts import require_keras_archive  # imports Keras: only for a .keras file

    require_keras_archive(path, "copy it again, or export it again with `headstart export`")
    model = keras.models.load_model(path, safe_mode=True, compile=False)
    _check_input("Keras", model.inputs[0].dtype, model.inputs[0].shape, path)
    return keras_runner(model)


def keras_runner(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """One traced function for every image size (no retracing per shape)."""
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False),
                       input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    return lambda batch: call(tf.constant(batch)).numpy()


def _saved_model_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    if SIGNATURE not in loaded.signatures:
        raise ModelFormatError(f"{path}: no '{SIGNATURE}' signature (it has {sorted(loaded.signatures)})")
    signature = loaded.signatures[SIGNATURE]
    spec = signature.structured_input_signature[1].get(INPUT_NAME)
    if spec is None:
        raise ModelFormatError(f"{path}: signature '{SIGNATURE}' has no '{INPUT_NAME}' input")
    _check_input("SavedModel", spec.dtype.as_numpy_dtype, spec.shape, path)

    def run(batch: np.ndarray) -> np.ndarray:
        # keep a reference to `loaded`: the signature's variables live as long as it does
        return loaded.signatures[SIGNATURE](**{INPUT_NAME: tf.constant(batch)})[OUTPUT_NAME].numpy()

    return run


def _tflite_runner(path: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the LiteRT wheel is missing on this platform: TF's own interpreter runs the same file
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    source, = interpreter.get_input_details()
    target, = interpreter.get_output_details()
    _check_input("TFLite", source["dtype"], source["shape_signature"], path)
    scale, zero_point = target["quantization"]
    current: list[tuple[int, ...]] = [()]

    def run(batch: np.ndarray) -> np.ndarray:
        if batch.shape != current[0]:
            interpreter.resize_tensor_input(source["index"], batch.shape, strict=True)
            interpreter.allocate_tensors()
            current[0] = batch.shape
        interpreter.set_tensor(source["index"], batch)
        interpreter.invoke()
        out = interpreter.get_tensor(target["index"])
        if np.issubdtype(out.dtype, np.integer):  # int8 export: quantised probabilities
            out = (out.astype(np.float32) - zero_point) * scale
        return out.astype(np.float32)

    return run


def _runtime_runner(runtime: str, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """An .onnx file on ONNX Runtime or an OpenVINO .xml at f32, after checking its input."""
    if not runtimes.available(runtime):
        raise runtimes.RuntimeUnavailable(f"{path}: running this model needs {runtime}, which is not installed: "
                                          f"{runtimes.install_hint(runtime)}")
    dtype, shape = runtimes.input_spec(runtime, path)
    _check_input("ONNX" if runtime == "onnxruntime" else "OpenVINO", dtype, shape, path)
    run = runtimes.onnx_runner(path) if runtime == "onnxruntime" else runtimes.openvino_runner(path, "f32")
    return lambda batch: run(batch)[0]


TWINS = {"openvino": "openvino", "onnxruntime": "onnx"}  # runtime -> the export format it runs


def twin(path: Path, runtime: str) -> Path:
    """The model that serves a `.keras` or SavedModel export on `runtime`: the same export folder's OpenVINO or
    ONNX file (written from the same model and parity-checked against it by the export stage). `auto` takes
    the OpenVINO file where OpenVINO is installed and the file is there, else the model as given."""
    tensorflow_format = path.is_dir() or path.suffix == ".keras"
    if runtime == "tensorflow" or (runtime == "auto" and not tensorflow_format):
        return path
    own = {".onnx": "onnxruntime", ".xml": "openvino"}.get(path.suffix, "tensorflow")
    if not tensorflow_format:
        if runtime != own:
            raise ModelFormatError(f"{path}: --runtime {runtime} cannot run this file (it runs on {own}); "
                                   f"pass --runtime {own} or auto, or --model the export folder's model.keras")
        return path
    if runtime == "auto":
        candidate = _beside(path, FILES["openvino"])[-1]
        return candidate if runtimes.available("openvino") and candidate.exists() else path
    candidate = _beside(path, FILES[TWINS[runtime]])[-1]
    if not candidate.exists():
        raise FileNotFoundError(f"--runtime {runtime}: no {candidate.name} beside {path}: export it (export.formats: "
                                f"{TWINS[runtime]}) or pass --runtime tensorflow")
    return candidate


def load_predictor(path: str | Path, threads: int | None = None, runtime: str = "tensorflow") -> Predictor:
    """A predictor for an exported `.keras` file, SavedModel directory, `.tflite`, `.onnx` or OpenVINO `.xml` file,
    on `runtime` (see `twin`; tensorflow runs every format as given)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} not found: run `headstart export` or pass --model")
    path = twin(path, runtime)
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ModelFormatError(f"{path} is a directory without saved_model.pb: pass a SavedModel directory")
        kind, run = "saved_model", _saved_model_runner(path)
    elif path.suffix == ".keras":
        kind, run = "keras", _keras_runner(path)
    elif path.suffix == ".tflite":
        kind, run = "tflite", _tflite_runner(path, threads)
    elif path.suffix == ".onnx":
        kind, run = "onnx", _runtime_runner("onnxruntime", path)
    elif path.suffix == ".xml":
        kind, run = "openvino", _runtime_runner("openvino", path)
    else:
        raise ModelFormatError(f"{path}: unknown model format; pass a .keras, .tflite, .onnx or OpenVINO .xml file "
                               "or a SavedModel directory")
    return Predictor(run, read_labels(path), kind, read_input_size(path))
