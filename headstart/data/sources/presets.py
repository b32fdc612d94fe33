"""The named sources of presets.yaml, and the sample and image size a run really uses.

`download.max_images_per_class` and `features.image_size` default to "auto": a preset that declares
`demo` settings (Fashion-MNIST: 1,000 images per class at 96 px, sized for a CPU) gets them, and any
other source keeps every image at the backbone's native size. `effective_settings` is the one place
that turns the params into the values the stages use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from headstart.params import Params

PRESETS_FILE = Path(__file__).parents[1] / "presets.yaml"


@cache
def _read_presets() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(PRESETS_FILE.read_text())


def load_presets() -> dict[str, dict[str, Any]]:
    return {name: dict(preset) for name, preset in _read_presets().items()}


@dataclass(frozen=True)
class EffectiveSettings:
    """What "auto" resolved to: None keeps every image / uses the backbone's native size."""

    max_images_per_class: int | None
    image_size: int | None
    demo: bool  # whether a preset's demo settings filled an "auto"


def effective_settings(params: Params) -> EffectiveSettings:
    """`download.max_images_per_class` and `features.image_size` with "auto" resolved for `download.source`."""
    preset = _read_presets().get(params.download.source, {})
    demo = preset.get("demo") or {}
    sample, size = params.download.max_images_per_class, params.features.image_size
    return EffectiveSettings(
        max_images_per_class=demo.get("max_images_per_class") if sample == "auto" else sample,
        image_size=demo.get("image_size") if size == "auto" else size,
        demo=bool(demo) and "auto" in (sample, size),
    )
