"""Fine-tuning cut points: where each block of a backbone's base starts, and the first layer to train."""

from __future__ import annotations

import re

from headstart.backbones.registry import Backbone


def cut_points(backbone: Backbone) -> dict[str, int]:
    """Block name -> index in base.layers of the block's first layer (the first layer to train)."""
    pattern = re.compile(backbone.spec.block_pattern)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, layer in enumerate(backbone.base.layers):
        match = pattern.match(layer.name)
        if match:
            first.setdefault(match.group(1), index)
            last[match.group(1)] = index
    names = list(first)
    points: dict[str, int] = {}
    for position, block in enumerate(names):
        if position == 0:
            if not backbone.spec.blocks_marked_by_end:
                points[block] = first[block]
        else:
            # a block starts right after the previous one ends (shortcut convs included)
            points[block] = last[names[position - 1]] + 1
    return points


def resolve_unfreeze_index(backbone: Backbone, unfreeze_from: str | int | None, top_blocks: int | str) -> int:
    """Index of the first base layer to train: a cut point or layer name, an index, the top N blocks or all."""
    layers = backbone.base.layers
    points = cut_points(backbone)
    if unfreeze_from is None and top_blocks == "all":
        return 0
    if unfreeze_from is None:
        assert isinstance(top_blocks, int), top_blocks  # "all" returned above; params allow no other text
        if top_blocks < 0 or top_blocks > len(points):
            raise ValueError(f"top_blocks {top_blocks} for {backbone.spec.name}: it has {len(points)} blocks")
        return len(layers) if top_blocks == 0 else list(points.values())[-top_blocks]
    if isinstance(unfreeze_from, bool) or not isinstance(unfreeze_from, (int, str)):
        raise ValueError(f"unfreeze_from {unfreeze_from!r}: give a cut point, a layer name or an index")
    if isinstance(unfreeze_from, int):
        if not -len(layers) <= unfreeze_from < len(layers):
            raise ValueError(f"unfreeze_from {unfreeze_from} is out of range: {backbone.spec.name} has {len(layers)} layers")
        return unfreeze_from % len(layers)
    if unfreeze_from in points:
        return points[unfreeze_from]
    for index, layer in enumerate(layers):
        if layer.name == unfreeze_from:
            return index
    raise ValueError(
        f"unfreeze_from {unfreeze_from!r} is neither a cut point nor a layer of {backbone.spec.name}; "
        f"cut points: {', '.join(points)} (see `headstart inspect --backbone {backbone.spec.name}`)"
    )

