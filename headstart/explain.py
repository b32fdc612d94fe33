"""Grad-CAM (Selvaraju et al., 2017): where in an image the backbone found the evidence for a class.

For a class c with logit z_c and a feature map A (H' x W' x K) of the backbone, each channel is
weighted by its mean gradient a_k = mean_ij dz_c/dA_k(i,j), and the map is ReLU(sum_k a_k A_k),
scaled to [0, 1] (min-max per image) and resized to the input image. By default A is the map the classifier pools (the
backbone's last conv block); `layer` names an earlier layer of the backbone for a finer grid.

`GradCam` runs the models headstart builds (`serving_model`, `with_flip_tta`, `build_classifier`) as
the chain of their own layers under a `tf.GradientTape`, with the logits read before the head's
softmax. Under flip TTA the image and its mirror image are both explained and the mirror's map is
mirrored back before the ReLU. A probe at construction checks that this chain reproduces the model's
own probabilities, so a model of another shape is refused instead of explained wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import layers
from matplotlib import colormaps
from matplotlib.figure import Figure

from headstart.data.images import load_rgb
from headstart.model import all_layers
from headstart.reporting import image_grid, save_figure, scored_rows
from headstart.serving import group_by_shape, read_labels

MIRROR = "mirror"  # the chain step of with_flip_tta: the batch is followed by its mirror images
COLORMAP = "jet"
ALPHA = 0.45  # weight of the heat map in the overlay
PROBE_TOLERANCE = 1e-3


class ExplainError(ValueError):
    """A model Grad-CAM cannot explain, or an explanation request it cannot meet; the message says why."""


def _unroll(model: keras.Model) -> list[layers.Layer | str]:
    """The model's layers in call order, wrappers (models holding models) opened, flip TTA as `MIRROR`."""
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if any(isinstance(layer, layers.Average) for layer in model.layers):  # with_flip_tta
        if len(inner) != 1:
            raise ExplainError(f"model {model.name!r} averages {len(inner)} models; Grad-CAM explains one classifier")
        return [MIRROR, *_unroll(inner[0])]
    steps: list[layers.Layer | str] = []
    for layer in model.layers:
        if isinstance(layer, layers.InputLayer):
            continue
        nested = isinstance(layer, keras.Model) and any(isinstance(child, keras.Model) for child in layer.layers)
        steps.extend(_unroll(layer) if nested else [layer])
    return steps


class GradCam:
    """Grad-CAM maps and probabilities for a headstart classifier, optionally at a named backbone layer."""

    def __init__(self, model: keras.Model, layer: str | None = None, source: str | Path | None = None):
        where = f"{source}: " if source else ""
        self.model = model
        steps = _unroll(model)
        pooling = next((i for i, step in enumerate(steps) if not isinstance(step, str) and i > 0
                        and len(step.input.shape) == 4 and len(step.output.shape) == 2), None)
        backbone = steps[pooling - 1] if pooling else None
        if not pooling or not isinstance(backbone, keras.Model) or not any(isinstance(x, layers.Conv2D) for x in all_layers(backbone)):
            raise ExplainError(
                f"{where}model {model.name!r} has no convolutional backbone whose feature map it pools, so Grad-CAM "
                "has no conv layer to explain: pass a model written by `headstart export` (models/export/model.keras)"
            )
        # flip TTA's MIRROR wraps the whole classifier, so it can only come before the backbone
        self._before, self._backbone = steps[: pooling - 1], backbone
        self._after = cast(list[keras.Layer], steps[pooling:-1])
        head = steps[-1]
        output = head.layers[-1] if isinstance(head, keras.Model) else None
        if not isinstance(head, keras.Model) or not isinstance(output, layers.Dense) or \
                output.get_config()["activation"] != "softmax":
            raise ExplainError(f"{where}model {model.name!r} does not end in a softmax Dense layer, so its class "
                               "logits cannot be read: pass a model written by `headstart export`")
        self._hidden = keras.Model(head.inputs[0], output.input, name="head_before_softmax")
        self._output = output
        self._feature_model = self._features_at(layer, where)
        self.layer = layer or "the last conv block"
        self._check_probe(where)

    def _features_at(self, layer: str | None, where: str) -> keras.Model:
        """Backbone input -> (the explained feature map, the backbone's output)."""
        base = self._backbone
        if layer is None:
            return keras.Model(base.inputs[0], [base.outputs[0], base.outputs[0]], name="gradcam_features")
        names = [x.name for x in base.layers if len(x.output.shape) == 4]
        if layer not in names:
            raise ExplainError(
                f"{where}layer {layer!r} (evaluate.gradcam_layer, --explain-layer) is not a 4-D feature map of "
                f"backbone {base.name!r}: name one of its layers "
                f"(the last ones are {', '.join(names[-4:])}; `headstart inspect --backbone NAME` lists them all)"
            )
        return keras.Model(base.inputs[0], [base.get_layer(layer).output, base.outputs[0]], name="gradcam_features")

    def _check_probe(self, where: str) -> None:
        spec = self.model.inputs[0]
        height, width = (shape or 64 for shape in spec.shape[1:3])
        probe = np.random.default_rng(0).integers(0, 256, (2, height, width, 3)).astype(spec.dtype)
        expected = keras.tree.flatten(self.model(probe, training=False))[0].numpy()
        _, probs = self._run(probe)
        gap = float(np.abs(probs - expected).max())
        if gap > PROBE_TOLERANCE:
            raise ExplainError(
                f"{where}Grad-CAM's pass through model {self.model.name!r} gives probabilities {gap:.2g} away from "
                "the model's own: it is not a model headstart builds. Pass a model written by `headstart export`"
            )

    def _run(self, images: np.ndarray, targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, H', W') ReLU'd class-weighted maps for `targets` (None: the top class) and (N, classes)
        probabilities, for a same-size batch."""
        count = len(images)
        x = tf.convert_to_tensor(images)
        for step in self._before:
            x = tf.concat([x, tf.reverse(x, axis=[2])], axis=0) if isinstance(step, str) else step(x, training=False)
        views = int(x.shape[0]) // count
        with tf.GradientTape() as tape:
            features, pooled = self._feature_model(x, training=False)
            for step in self._after:
                pooled = step(pooled, training=False)
            hidden = tf.cast(self._hidden(pooled, training=False), tf.float32)
            logits = tf.matmul(hidden, tf.cast(self._output.kernel, tf.float32))
            if self._output.use_bias:
                logits += tf.cast(self._output.bias, tf.float32)
            probs = tf.reduce_mean(tf.reshape(tf.nn.softmax(logits), (views, count, -1)), axis=0).numpy()
            chosen = probs.argmax(axis=1) if targets is None else targets
            score = tf.reduce_sum(tf.gather(logits, np.tile(chosen, views), axis=1, batch_dims=1))
        gradients = tf.cast(tape.gradient(score, features), tf.float32)
        weights = tf.reduce_mean(gradients, axis=(1, 2))
        weighted = tf.einsum("bhwk,bk->bhw", tf.cast(features, tf.float32), weights).numpy()
        maps = weighted[:count]
        if views == 2:  # the mirror image's evidence, mirrored back onto the image
            maps = maps + weighted[count:, :, ::-1]
        return np.maximum(maps, 0), probs

    def explain(self, images: Sequence[np.ndarray], targets: Sequence[int] | None = None
                ) -> tuple[list[np.ndarray], np.ndarray]:
        """Maps (each HxW float32 in [0, 1], the image's size) for `targets` (default: the top class), and
        the (N, classes) probabilities. Images are uint8 HxWx3 as the model takes them."""
        maps: list[np.ndarray] = [np.zeros(0)] * len(images)
        probs = np.zeros((len(images), self._output.units), dtype=np.float32)
        for indices in group_by_shape(images).values():
            batch = np.stack([images[i] for i in indices])
            chosen = None if targets is None else np.asarray([targets[i] for i in indices], dtype=np.int64)
            raw, probs[indices] = self._run(batch, chosen)
            # min-max per image, as pytorch-grad-cam does: a map that is high everywhere still shows its peaks
            low, peak = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
            scaled = np.divide(raw - low, peak - low, out=np.zeros_like(raw), where=peak > low)
            resized = tf.image.resize(scaled[..., None], batch.shape[1:3], method="bilinear").numpy()[..., 0]
            for i, cam in zip(indices, np.clip(resized, 0, 1), strict=True):
                maps[i] = cam
        return maps, probs


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The heat map in `COLORMAP` (red: most evidence) blended on the uint8 RGB image, as uint8."""
    heat = colormaps[COLORMAP](cam)[..., :3]
    return np.round(255 * ((1 - alpha) * image / 255.0 + alpha * heat)).astype(np.uint8)


def _show(axis, image: np.ndarray, cam: np.ndarray, title: str, color: str = "black") -> None:
    axis.imshow(overlay(image, cam))
    axis.set_title(title, fontsize=8, color=color)
    axis.axis("off")


# ---------------------------------------------------------------- evaluate: the test-split grid


def gradcam_examples(rows: pd.DataFrame, probs: np.ndarray, mistakes: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """The gallery's mistakes, then the `per_class` most confident correct test images of each class."""
    scored = scored_rows(rows, probs)
    correct = scored[scored["predicted"] == scored["y"]].sort_values(["y", "confidence"], ascending=[True, False],
                                                                      kind="stable")
    return pd.concat([mistakes[scored.columns], correct.groupby("y", sort=True).head(per_class)], ignore_index=True)


def plot_gradcam(explainer: GradCam, examples: pd.DataFrame, classes: list[str], root: Path, image_size: int,
                 target: Path) -> None:
    """A grid of overlays for the predicted class, titled actual / predicted (confidence); mistakes in red."""
    images = [load_rgb(root / path, target_size=image_size) for path in examples["path"]]
    maps, _ = explainer.explain(images, examples["predicted"].tolist())
    figure, axes = image_grid(len(images), 6, (2.2, 2.6))
    for axis, row, image, cam in zip(axes.flat, examples.itertuples(), images, maps, strict=False):
        wrong = row.predicted != row.y
        _show(axis, image, cam, f"true: {row.label}\npred: {classes[row.predicted]} ({row.confidence:.2f})",
              "red" if wrong else "black")
    if examples.empty:
        axes[0][0].text(0.5, 0.5, "no test images to explain", ha="center", va="center")
    figure.suptitle(f"Grad-CAM of the predicted class at {explainer.layer} (test split; mistakes in red)",
                    fontsize=10)
    save_figure(figure, target)


# ---------------------------------------------------------------- predict --explain


def load_explainer(model_path: Path, layer: str | None = None) -> GradCam:
    """GradCam over an exported Keras model; the other formats have no gradients to read."""
    if model_path.suffix != ".keras" or not model_path.is_file():
        state = "does not exist" if not model_path.exists() else "is not a Keras model (.keras)"
        raise ExplainError(
            f"--explain needs the exported Keras model, and {model_path} {state}: pass --model "
            "models/export/model.keras (`headstart export` writes it when export.formats includes keras)"
        )
    model = keras.models.load_model(model_path, safe_mode=True, compile=False)
    return GradCam(model, layer, source=model_path)


def overlay_name(source: str, taken: set[str]) -> str:
    """`<input stem>.png`, from a file name or a URL's last path part; `-2`, `-3`... when already taken."""
    stem = re.sub(r"[^\w.-]+", "_", Path(source.split("?")[0].rstrip("/")).stem) or "image"
    name, number = f"{stem}.png", 1
    while name in taken:
        number += 1
        name = f"{stem}-{number}.png"
    taken.add(name)
    return name


class OverlayWriter:
    """Writes one figure per predicted image into `folder`: the image and its overlay for the top class."""

    def __init__(self, explainer: GradCam, classes: list[str], folder: Path):
        self.explainer, self.classes, self.folder = explainer, classes, folder
        self.taken: set[str] = set()
        self.written: list[Path] = []

    def __call__(self, names: Sequence[str], images: Sequence[np.ndarray], probs: np.ndarray) -> None:
        top = probs.argmax(axis=1)
        maps, _ = self.explainer.explain(images, top.tolist())
        for name, image, cam, best, p in zip(names, images, maps, top, probs, strict=True):
            figure = Figure(figsize=(5.0, 2.9))
            left, right = figure.subplots(1, 2)
            left.imshow(image)
            left.axis("off")
            _show(right, image, cam, "Grad-CAM")
            figure.suptitle(f"{Path(name).name}\npredicted: {self.classes[best]} ({p[best]:.2f})", fontsize=9)
            figure.tight_layout()
            target = self.folder / overlay_name(name, self.taken)
            save_figure(figure, target)
            self.written.append(target)


def overlay_writer(model_path: Path, layer: str | None, folder: Path) -> OverlayWriter:
    """`headstart predict --explain`: the exported Keras model's explainer writing into `folder`."""
    return OverlayWriter(load_explainer(model_path, layer), read_labels(model_path), folder)
