"""Text about backbones for the CLI: the registry listing and one backbone's layers and cut points."""

from __future__ import annotations

from pathlib import Path

import keras

from headstart.backbones.cuts import cut_points
from headstart.backbones.loading import load_backbone
from headstart.backbones.registry import DEFAULT_BACKBONE, REGISTRY


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
