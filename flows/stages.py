"""Stage declarations shared by DVC and Prefect, and the content hashes that key the Prefect cache.

`dvc.yaml` is the one place that says what each stage reads (code, data, params keys) and writes.
Prefect reads the same declarations, so a stage is "up to date" for both tools under the same
rule: the hash of its params values, of the content of its code and data deps, and the presence
and content of its outputs. Paths never enter a key, only content.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from headstart.files import sha256_file
from headstart.params import SOURCE_STAGE, STAGES, Params

CODE_ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("tasks", "headstart", "flows")
"""Deps under these folders are code: they resolve against the installed checkout, not the data root."""
PARAMS_FILE = "params.yaml"


class StageDeclarationError(ValueError):
    """dvc.yaml lacks a stage or declares it in a form the flow cannot read."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]
    """Every path the stage writes: `outs`, `metrics` and `plots` of dvc.yaml."""


def _paths(entries: list[Any] | None) -> tuple[str, ...]:
    """dvc.yaml lists a path either bare or as a one-key mapping to its options."""
    paths: list[str] = []
    for entry in entries or []:
        paths.extend([entry] if isinstance(entry, str) else list(entry))
    return tuple(paths)


def _param_keys(stage: str, entries: list[Any] | None) -> tuple[str, ...]:
    keys: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict) and set(entry) == {PARAMS_FILE}:
            keys.extend(entry[PARAMS_FILE])
        else:
            raise StageDeclarationError(
                f"dvc.yaml stage '{stage}': params entry {entry!r} is not a key of {PARAMS_FILE}; "
                "the Prefect flow only validates params.yaml keys."
            )
    return tuple(keys)


def read_stage_specs(dvc_file: Path = CODE_ROOT / "dvc.yaml") -> dict[str, StageSpec]:
    """Parse the fingerprint stage and every pipeline stage from dvc.yaml (the declarations `dvc repro` uses)."""
    try:
        declared = yaml.safe_load(dvc_file.read_text())["stages"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise StageDeclarationError(f"{dvc_file}: cannot read its 'stages' mapping ({exc}).") from None
    specs: dict[str, StageSpec] = {}
    for name in (SOURCE_STAGE, *STAGES):
        if name not in declared:
            raise StageDeclarationError(f"{dvc_file}: stage '{name}' is missing; add it (see headstart.params.SOURCE_STAGE and STAGES).")
        block = declared[name]
        specs[name] = StageSpec(
            name=name,
            deps=_paths(block.get("deps")),
            params=_param_keys(name, block.get("params")),
            outs=_paths(block.get("outs")) + _paths(block.get("metrics")) + _paths(block.get("plots")),
        )
    return specs


def resolve(path: str, root: Path) -> Path:
    """Code deps live in the checkout; data deps and outputs live under the run's data root."""
    return (CODE_ROOT if Path(path).parts[0] in CODE_DIRS else root) / path


def hash_path(path: Path) -> str | None:
    """sha256 of a file, or of a directory's sorted (relative path, file sha256) list; None if absent."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{child.relative_to(path).as_posix()}\0{sha256_file(child)}\n".encode())
    return digest.hexdigest()


def param_value(params: Params, dotted: str) -> Any:
    node: Any = params.model_dump(mode="json")
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise StageDeclarationError(f"dvc.yaml names param '{dotted}', which headstart/params.py does not define.")
        node = node[part]
    return node


def stage_key(spec: StageSpec, params: Params, root: Path) -> str:
    """The cache key of a stage run: its params values and the content of its code and data deps."""
    payload = {
        "stage": spec.name,
        "params": {key: param_value(params, key) for key in spec.params},
        "deps": {dep: hash_path(resolve(dep, root)) for dep in spec.deps},
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return f"headstart-{spec.name}-{hashlib.sha256(blob).hexdigest()}"


def output_hashes(spec: StageSpec, root: Path) -> dict[str, str | None]:
    return {out: hash_path(resolve(out, root)) for out in spec.outs}
