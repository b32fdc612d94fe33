"""The inference runtimes beside TensorFlow: OpenVINO and ONNX Runtime, which runs what, and the parity rule.

This module never imports TensorFlow, so `headstart predict` on a `.xml` or `.onnx` model starts in
well under a second (TensorFlow's import alone takes about 5 s on a 2-core CPU); turning a Keras model
into these formats is headstart/conversion.py.

`auto` takes OpenVINO where it is installed, always at the precision asked for: left alone, OpenVINO runs
bf16 on CPUs with AVX512_BF16 or AMX, so INFERENCE_PRECISION_HINT is always set. f32 OpenVINO and ONNX
Runtime agree with TensorFlow to a few 1e-6 of the output's scale; bf16 differs by a few percent
(docs/benchmarks.md, "Inference runtimes"), hence one tolerance per precision in `check_parity`.
"""

from __future__ import annotations

import importlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RUNTIMES = ("tensorflow", "openvino", "onnxruntime")
PRECISIONS = ("f32", "bf16")
_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
_INSTALL = {"openvino": "pip install openvino==2026.4.1", "onnxruntime": "pip install onnxruntime==1.32.0"}
# max |runtime - TensorFlow| allowed, as a fraction of max |TensorFlow| over the checked batch. Measured on
# MobileNetV2 features and probabilities (docs/benchmarks.md): f32 <= 4e-6, bf16 up to 0.16; a wrong
# conversion (preprocessing, channel order, a missing constant) is off by the output's whole scale.
TOLERANCE = {"f32": 1e-4, "bf16": 0.5}

Runner = Callable[[np.ndarray], list[np.ndarray]]


class RuntimeUnavailable(ValueError):
    """A runtime was asked for by name but its package is not installed."""


class RuntimeParityError(ValueError):
    """A runtime's outputs differ from TensorFlow's beyond the tolerance of its precision."""


def install_hint(runtime: str) -> str:
    return _INSTALL[runtime]


def available(runtime: str) -> bool:
    """Whether the runtime's package imports (TensorFlow always does)."""
    if runtime == "tensorflow":
        return True
    try:
        importlib.import_module(_MODULES[runtime])
    except ImportError:
        return False
    return True


def resolve(setting: str, precision: str = "f32", key: str = "runtime", gpu: bool = False) -> str:
    """The runtime `setting` names: auto is OpenVINO where installed, else TensorFlow (f32 only; always on a GPU,
    which OpenVINO's CPU plugin would leave idle)."""
    if setting == "auto":
        if available("openvino") and not (gpu and precision == "f32"):
            return "openvino"
        if precision != "f32":
            raise RuntimeUnavailable(f"{key}: auto with precision {precision} needs OpenVINO, which is not installed: "
                                     f"{_INSTALL['openvino']}, or set the precision to f32")
        return "tensorflow"
    if setting not in RUNTIMES:
        raise ValueError(f"{key}: unknown runtime {setting!r}; use auto, {', '.join(RUNTIMES)}")
    if precision != "f32" and setting != "openvino":
        raise ValueError(f"{key}: precision {precision} runs on OpenVINO only, not {setting}: use openvino or auto")
    if not available(setting):
        raise RuntimeUnavailable(f"{key}: {setting} is not installed: {_INSTALL[setting]}, or use auto / tensorflow")
    return setting


def openvino_runner(model: Any, precision: str = "f32", batch: int | None = None) -> Runner:
    """An OpenVINO model (in memory, or an .xml/.onnx path) compiled for the CPU at `precision`.

    Without `batch` (predict: a few images at a time), latency mode, one request. With `batch`, the model is
    compiled for that static batch size, in throughput mode, and `map` keeps every request busy: on the
    CPU plugin MobileNetV2 at 96 px runs about twice as fast at a static batch as at a dynamic one (1,650
    against 780 img/s, docs/benchmarks.md), and two streams of one thread each lose no time when the other
    jobs of a shared machine take one thread's core. Threads are not pinned to cores: on a shared 2-core
    machine pinned threads waited for their busy core (32 against 40 img/s unpinned)."""
    import openvino as ov
    import openvino.properties.hint as hints

    core = ov.Core()
    if isinstance(model, Path):
        model = core.read_model(str(model))
    if batch is not None:
        shape = model.inputs[0].get_partial_shape()
        shape[0] = batch
        model.reshape({model.inputs[0]: shape})
    mode = hints.PerformanceMode.LATENCY if batch is None else hints.PerformanceMode.THROUGHPUT
    config = {hints.inference_precision: "bf16" if precision == "bf16" else "f32", hints.performance_mode: mode,
              hints.enable_cpu_pinning: False}
    compiled = core.compile_model(model, "CPU", config)
    if batch is not None:
        return _StaticBatches(compiled, batch)
    request = compiled.create_infer_request()
    outputs = len(compiled.outputs)

    def run(images: np.ndarray) -> list[np.ndarray]:
        request.infer({0: np.ascontiguousarray(images)})
        return [request.get_output_tensor(i).data.copy() for i in range(outputs)]

    return run


class _StaticBatches:
    """A model compiled for a static batch size: a shorter batch is padded, a longer one split, and `map`
    runs the batches of an iterator on all infer requests at once, yielding their outputs in order."""

    def __init__(self, compiled: Any, batch: int):
        import openvino as ov

        self.batch, self.outputs = batch, len(compiled.outputs)
        self.queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue.set_callback(self._collect)
        self.done: dict[int, list[np.ndarray]] = {}
        self.key = 0

    def _collect(self, request: Any, key: int) -> None:
        self.done[key] = [request.get_output_tensor(i).data.copy() for i in range(self.outputs)]

    def _submit(self, images: np.ndarray) -> list[tuple[int, int]]:
        """Start each chunk of `images` (start_async copies it, and waits while every request is busy)."""
        keys = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            if len(chunk) < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            self.queue.start_async({0: np.ascontiguousarray(chunk)}, self.key)
            keys.append((self.key, min(self.batch, len(images) - start)))
            self.key += 1
        return keys

    def _take(self, keys: list[tuple[int, int]]) -> list[np.ndarray]:
        parts = [[out[:rows] for out in self.done.pop(key)] for key, rows in keys]
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]

    def map(self, batches: Iterable[np.ndarray]) -> Iterator[list[np.ndarray]]:
        pending: deque[list[tuple[int, int]]] = deque()
        for images in batches:
            pending.append(self._submit(images))
            while pending and all(key in self.done for key, _ in pending[0]):
                yield self._take(pending.popleft())
        self.queue.wait_all()
        while pending:
            yield self._take(pending.popleft())

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        return next(self.map([images]))


def onnx_runner(model: bytes | Path) -> Runner:
    """An ONNX model (serialised bytes or a path) on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model) if isinstance(model, Path) else model,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: np.ascontiguousarray(batch)})


def input_spec(runtime: str, path: Path) -> tuple[Any, Sequence[Any]]:
    """(dtype, shape) of the first input of a saved OpenVINO or ONNX model, -1/None where dynamic."""
    if runtime == "openvino":
        import openvino as ov

        port = ov.Core().read_model(str(path)).inputs[0]
        shape = port.get_partial_shape()
        return port.get_element_type().to_dtype(), [d.get_length() if d.is_static else None for d in shape]
    import onnx

    tensor = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), dims


def parity(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """max |output - reference| over every output, as a fraction of max |reference| (1 when all zero)."""
    diff = max(float(np.abs(np.asarray(o, np.float64) - r).max()) for o, r in zip(outputs, reference, strict=True))
    scale = max(float(np.abs(r).max()) for r in reference)
    return diff / scale if scale else diff


def check_parity(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], runtime: str, precision: str,
                 what: str) -> float:
    """Raise RuntimeParityError when `outputs` differ from TensorFlow's `reference` beyond the precision's tolerance."""
    found = parity(outputs, reference)
    if found > TOLERANCE[precision]:
        raise RuntimeParityError(
            f"{what}: {runtime} ({precision}) differs from TensorFlow by {found:.2e} of the output scale on the first "
            f"batch, above the {TOLERANCE[precision]:g} allowed at {precision}; nothing was written. "
            "Set the runtime to tensorflow, and report the model and runtime versions"
        )
    return found
