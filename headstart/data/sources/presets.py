"""The named sources of presets.yaml, and the sample and image size a run really uses.

`download.max_images_per_class` and `features.image_size` default to "auto": a preset that declares
`demo` settings (Fashion-MNIST: 1,000 images per class at 96 px, sized for a CPU) gets them, and any
other source keeps every image at the backbone's native size. `effective_settings` is the one place
that turns the params into the values the stages use; only download and features call it, and later
stages read the image size features recorded in data/features/info.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headstart.params import Params

PRESETS_FILE = Path(__file__).parents[1] / "presets.yaml"


class DemoSettings(BaseModel):
    """What "auto" means for a preset: a sample and an image size sized for a CPU run."""

    model_config = ConfigDict(extra="forbid")
    max_images_per_class: int = Field(gt=0)
    image_size: int = Field(ge=32)


class Preset(BaseModel):
    """One entry of presets.yaml, validated like params: an unknown key or a wrong type names the preset."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, description="Raise it when the data behind the preset changes (its fingerprint).")
    kind: Literal["idx", "archive"]
    url: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    base_url: str | None = None
    files: dict[str, str] | None = None
    local_dir: str | None = None
    inner_archive: str | None = None
    label_from: Literal["folder", "index", "regex"] = "folder"
    label_regex: str | None = None
    index_regex: str | None = None
    images_per_class: int | None = Field(None, gt=0)
    classes: list[str] | None = None
    exclude_classes: list[str] = []
    demo: DemoSettings | None = None


class PresetError(ValueError):
    """presets.yaml holds an entry the download stage cannot use."""


@cache
def _read_presets() -> dict[str, dict[str, Any]]:
    """Every preset validated by `Preset`, as the plain mapping of the keys presets.yaml sets."""
    presets: dict[str, dict[str, Any]] = {}
    for name, entry in yaml.safe_load(PRESETS_FILE.read_text()).items():
        try:
            presets[name] = Preset.model_validate(entry).model_dump(exclude_unset=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in (name, *first["loc"]))
            raise PresetError(f"{PRESETS_FILE}: {where}: {first['msg']}; fix that preset") from None
    return presets


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
