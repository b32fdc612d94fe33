"""Keras models on OpenVINO and ONNX Runtime: conversion (export's files, and in memory for features and
evaluate), and a runner whose first batch is checked against TensorFlow.

ONNX goes through tf2onnx, which keeps the tensors a function captures by value (the mean and variance of the
preprocessing `Normalization` layer, eager constants) as graph inputs that no caller feeds ("... are missing
from input feed"); some it also freezes, leaving the input unread. `to_onnx` bakes each captured value that a
node reads into the graph as an initializer and drops the rest, so the file takes the image only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

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


def runner(model: keras.Model, shape: Sequence[int | None], runtime: str, precision: str = "f32",
           what: str = "model", dtype: tf.DType = tf.float32) -> CheckedRunner:
    """`model` on `runtime` (a resolved name) for input batches of `shape`; outputs as a list, in float32."""
    function = traced(model, tf.TensorSpec(list(shape), dtype, name="image"))
    reference = _tensorflow_runner(function)
    if runtime == "tensorflow":
        return CheckedRunner(reference, None, runtime, precision, what)
    fast = openvino_runner(to_openvino(function), precision) if runtime == "openvino" else \
        onnx_runner(to_onnx(function).SerializeToString())
    return CheckedRunner(fast, reference, runtime, precision, what)
