"""Keras models on OpenVINO and ONNX Runtime: conversion (export's files, and in memory for features and
evaluate), and a runner whose first batch is checked against TensorFlow.

ONNX goes through tf2onnx, which keeps the tensors a function captures by value (the mean and variance of the
preprocessing `Normalization` layer, eager constants) as graph inputs that no caller feeds ("... are missing
from input feed"); some it also freezes, leaving the input unread. `to_onnx` bakes each captured value that a
node reads into the graph as an initializer and drops the rest, so the file takes the image only.

Converting the backbone takes seconds (tf2onnx or `openvino.convert_model`), so the features stage keeps
each conversion on disk (`cached_conversion`), named by what determines it, and checks it before reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from filelock import FileLock

from headstart.files import atomic_directory, sha256_file
from headstart.runtimes import Runner, check_parity, onnx_runner, openvino_runner

log = logging.getLogger(__name__)

ONNX_OPSET = 17


def traced(model: keras.Model, spec: tf.TensorSpec, output_name: str | None = None) -> Any:
    """The model in inference mode as one tf.function: its outputs as a list, or as {output_name: output}."""
    if output_name is None:
        return tf.function(lambda x: keras.tree.flatten(model(x, training=False)), input_signature=[spec],
                           autograph=False)
    return tf.function(lambda x: {output_name: model(x, training=False)}, input_signature=[spec], autograph=False)


def to_onnx(function: Any) -> Any:
    """An ONNX ModelProto of a traced function, its captured constants baked in (see the module docstring)."""
    import onnx
    import tf2onnx

    (spec,) = function.input_signature
    concrete = function.get_concrete_function()
    proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=ONNX_OPSET)
    constants = {inner.name: outer for outer, inner in concrete.graph.captures if inner.dtype != tf.resource}
    graph = proto.graph
    read = {name for node in graph.node for name in node.input}
    for entry in [entry for entry in graph.input if entry.name in constants]:
        if entry.name in read:
            graph.initializer.append(onnx.numpy_helper.from_array(constants[entry.name].numpy(), entry.name))
        graph.input.remove(entry)
    if len(graph.input) != 1:
        raise ValueError(f"the ONNX model takes inputs {[i.name for i in graph.input]} besides the image")
    onnx.checker.check_model(proto)
    return proto


def to_openvino(function: Any) -> Any:
    """An OpenVINO model of a traced function, its input and outputs named as the function names them."""
    import openvino as ov

    model = ov.convert_model(function.get_concrete_function())
    (spec,) = function.input_signature
    if spec.name:
        model.inputs[0].get_tensor().set_names({spec.name})
    return model


_FILES = {"openvino": ("model.xml", "model.bin"), "onnxruntime": ("model.onnx",)}
CHECKSUMS = "checksums.json"


def _converter_version(runtime: str) -> str:
    if runtime == "openvino":
        import openvino as ov

        return f"openvino {ov.__version__}"
    import tf2onnx

    return f"tf2onnx {tf2onnx.__version__} opset {ONNX_OPSET}"


def weights_digest(model: keras.Model) -> str:
    """sha256 of the model's weight values: what a name such as `weights: none` (random each build) cannot vouch for."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:16]


def _intact(folder: Path, files: Sequence[str]) -> str | None:
    """None when every file is there with the sha256 its checksums.json records, else what is wrong."""
    try:
        recorded = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError) as exc:
        return f"{CHECKSUMS} unreadable ({exc})"
    for name in files:
        if not (folder / name).is_file():
            return f"{name} missing"
        if recorded.get(name) != sha256_file(folder / name):
            return f"{name} does not match its checksum"
    return None


def cached_conversion(function: Any, runtime: str, folder: Path, key: str) -> Path:
    """`function` converted for `runtime` (model.xml + .bin, or model.onnx) under `folder`, reused while intact.

    `key` names what the traced model computes (`runner` adds the sha256 of its weight values to the caller's
    name, e.g. a backbone's cache_id: architecture, weights file sha256, input size, preprocessing); the
    converter's version and the input's shape and dtype are added here. The
    precision is not part of it: it is a compile-time hint, and the files hold f32 weights. A conversion is
    built under a temporary name with a checksum of each file and swapped in whole, so a killed run leaves
    none half-written; one damaged since (truncated, edited) fails its checksum and is converted again.
    """
    (spec,) = function.input_signature
    described = [key, runtime, _converter_version(runtime), keras.__version__, spec.shape.as_list(), spec.dtype.name]
    target = folder / hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]
    files = _FILES[runtime]
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / f"{target.name}.lock"):  # two runs converting the same model: the second reuses
        problem = _intact(target, files) if target.exists() else "absent"
        if problem is None:
            log.info("%s: reusing the %s conversion in %s", key, runtime, target)
            return target / files[0]
        if problem != "absent":
            log.warning("%s: cached %s conversion %s: %s; converting again", key, runtime, target, problem)
            shutil.rmtree(target, ignore_errors=True)
        with atomic_directory(target) as staging:
            if runtime == "openvino":
                import openvino as ov

                ov.save_model(to_openvino(function), str(staging / files[0]), compress_to_fp16=False)
            else:
                (staging / files[0]).write_bytes(to_onnx(function).SerializeToString())
            (staging / "key.json").write_text(json.dumps(described, indent=1) + "\n")
            (staging / CHECKSUMS).write_text(json.dumps({name: sha256_file(staging / name) for name in files}))
    return target / files[0]


def _tensorflow_runner(function: Any) -> Runner:
    def run(batch: np.ndarray) -> list[np.ndarray]:
        out = function(tf.constant(batch))
        return [t.numpy() for t in (out.values() if isinstance(out, dict) else out)]

    return run


class CheckedRunner:
    """A runtime's runner whose first batch is compared with TensorFlow's (RuntimeParityError beyond tolerance)."""

    def __init__(self, runner: Runner, reference: Runner | None, runtime: str, precision: str, what: str):
        self.runner, self.reference = runner, reference
        self.runtime, self.precision, self.what = runtime, precision, what
        self.parity: float | None = None  # fraction of the output scale, after the first batch

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        out = self.runner(batch)
        if self.reference is not None:
            self.parity = check_parity(out, self.reference(batch), self.runtime, self.precision, self.what)
            log.info("%s: %s (%s) agrees with TensorFlow to %.1e of the output scale on the first batch",
                     self.what, self.runtime, self.precision, self.parity)
            self.reference = None  # frees TensorFlow's traced copy
        return out

    def map(self, batches: Iterable[np.ndarray]) -> Iterator[list[np.ndarray]]:
        """The outputs of each batch in turn: the first checked, the rest pipelined where the runner can."""
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        yield self(first)
        yield from (self.runner.map(batches) if hasattr(self.runner, "map") else map(self.runner, batches))


def runner(model: keras.Model, shape: Sequence[int | None], runtime: str, precision: str = "f32",
           what: str = "model", dtype: tf.DType = tf.float32, batch: int | None = None,
           cache: tuple[Path, str] | None = None) -> CheckedRunner:
    """`model` on `runtime` (a resolved name) for input batches of `shape`; outputs as a list, in float32.

    `batch`: OpenVINO compiles for that static batch size (faster; other sizes are padded or split).
    `cache`: (folder, key) to keep the conversion on disk and reuse it (`cached_conversion`), the key
    extended by the weights' own digest."""
    function = traced(model, tf.TensorSpec(list(shape), dtype, name="image"))
    reference = _tensorflow_runner(function)
    if runtime == "tensorflow":
        return CheckedRunner(reference, None, runtime, precision, what)
    if cache is not None:
        folder, key = cache
        converted: Any = cached_conversion(function, runtime, folder, f"{key}|weights:{weights_digest(model)}")
    else:
        converted = to_openvino(function) if runtime == "openvino" else to_onnx(function).SerializeToString()
    fast = openvino_runner(converted, precision, batch) if runtime == "openvino" else onnx_runner(converted)
    return CheckedRunner(fast, reference, runtime, precision, what)
