"""Where and how TF runs: distribution strategy, mixed precision, seeds and the device record."""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import keras
import tensorflow as tf


def choose_strategy(kind: str) -> tf.distribute.Strategy:
    """auto: several workers in TF_CONFIG -> multi-worker, several GPUs -> mirrored, else the default.

    `mirrored` without GPUs mirrors over the logical CPU devices (how the tests run it on CPU).
    """
    workers = len(json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", []))
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "multi_worker" or (kind == "auto" and workers > 1):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if kind == "auto" and len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes outputs; other multi-worker replicas write to a scratch folder."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


@contextmanager
def mixed_precision(mixed: bool) -> Iterator[None]:
    """mixed_float16 while the model is built and trained; the global policy is restored after."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def describe_device() -> str:
    """The accelerator(s) TF sees, or the CPU, for the record in each stage's info.json."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = {tf.config.experimental.get_device_details(gpu).get("device_name", "GPU") for gpu in gpus}
        return f"{len(gpus)} x GPU ({', '.join(sorted(names))})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and TF; with `deterministic`, also make TF ops reproducible (slower on GPU)."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def runtime_info() -> dict[str, str]:
    return {"tf_version": tf.__version__, "keras_version": keras.__version__, "device": describe_device()}


class _RetracingNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


@contextmanager
def fresh_models_expected() -> Iterator[None]:
    """Silence TF's "N out of the last N calls ... triggered tf.function retracing" inside the block.

    TF counts traces per Python function, and Keras' train and predict steps are the same function for
    every model: a loop that builds a fresh model per fold traces once per fold by design, which that
    warning (meant for a function retraced by changing arguments) misreads as a mistake.
    """
    notice = _RetracingNotice()
    tf.get_logger().addFilter(notice)
    try:
        yield
    finally:
        tf.get_logger().removeFilter(notice)
