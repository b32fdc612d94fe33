"""The model registry: every promoted model kept as a version, and a pointer to the champion.

Layout under `models/registry/` (a DVC out with `persist: true` of the promote stage, so `dvc repro`
never empties it and `dvc push` / `dvc pull` carry it; git holds its hash in dvc.lock):

    v1/, v2/, ...      a copy of models/export as promoted, plus entry.json (metrics, data fingerprint,
                       params, git commit, the gate's decision) and data.csv (path, label, sha256 of
                       every image it was trained on: the baseline of the next data diff)
    registry.json      {"champion": "v2", "events": [...]}: the pointer and its history

A version folder is written once, whole (an atomic rename), and never changed. `models/champion/` is
a copy of the champion's folder: what `headstart predict` serves by default, and the path of the
`headstart-classifier` artifact in dvc.yaml, so GTO's `headstart-classifier@vN.0.0` tags (registry
version vN) name that folder at a commit. Rollback moves the pointer and republishes that folder.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from headstart.files import atomic_directory, atomic_write_json, exclusive, remove_stale_temps
from headstart.layout import Layout

ARTIFACT = "headstart-classifier"
INDEX = "registry.json"
ENTRY = "entry.json"
DATA_TABLE = "data.csv"
CARD = "model_card.json"  # written by the export stage (headstart.serving.MODEL_CARD)
VERSION = re.compile(r"v([1-9][0-9]*)")
REFERENCE = re.compile(rf"(?:{re.escape(ARTIFACT)}@)?v([1-9][0-9]*)(?:\.0\.0)?")
CHAMPION = "champion"


class RegistryError(ValueError):
    """A registry reference or file that cannot be used; the message names it and what to do."""


def gto_version(version: str) -> str:
    """GTO's semantic version of registry version `vN`: `vN.0.0` (the tag `headstart-classifier@vN.0.0`)."""
    return f"{version}.0.0"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_revision(root: Path) -> dict[str, Any]:
    """The commit the run's code and params came from, and whether the work tree differed from it."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
    except OSError:  # no git on this machine
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": dirty}


def preferred_model_file(folder: Path) -> Path:
    """The .keras file when exported, else the first format the model card lists."""
    keras_file = folder / "model.keras"
    if keras_file.exists():
        return keras_file
    try:
        files = json.loads((folder / CARD).read_text())["files"]
        return folder / next(iter(files.values()))["path"]
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise RegistryError(f"{folder}: no model.keras and no readable {CARD} naming another format; "
                            "promote the model again or roll back to another version") from None


@dataclass(frozen=True)
class Registry:
    root: Path

    @classmethod
    def of(cls, layout: Layout) -> Registry:
        return cls(layout.registry_dir)

    @property
    def index_file(self) -> Path:
        return self.root / INDEX

    def versions(self) -> list[str]:
        """Every version folder, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and VERSION.fullmatch(p.name)]
        return sorted(found, key=lambda name: int(name[1:]))

    def _listing(self) -> str:
        return ", ".join(self.versions()) or "none yet"

    def read_index(self) -> dict[str, Any]:
        fix = f"choose the champion again with `headstart registry rollback <version>` (versions: {self._listing()})"
        if not self.index_file.exists():
            if self.versions():
                raise RegistryError(f"{self.index_file} is missing although the registry holds versions; {fix}")
            return {CHAMPION: None, "events": []}
        try:
            index = json.loads(self.index_file.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{self.index_file}: not readable JSON ({exc}); {fix}") from None
        if not isinstance(index, dict) or not isinstance(index.get("events", []), list):
            raise RegistryError(f"{self.index_file}: expected an object with 'champion' and 'events'; {fix}")
        champion = index.get(CHAMPION)
        if champion is not None and champion not in self.versions():
            raise RegistryError(f"{self.index_file}: champion {champion!r} is not a version in {self.root}; {fix}")
        return index

    def champion(self) -> str | None:
        return self.read_index().get(CHAMPION)

    def path(self, version: str) -> Path:
        return self.root / version

    def entry(self, version: str) -> dict[str, Any]:
        file = self.path(version) / ENTRY
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{file}: not readable ({exc}); a version folder is written once by the promote "
                                "stage: restore it (`dvc checkout models/registry`) or roll back to another "
                                "version") from None

    def find(self, reference: str) -> str:
        """The version a reference names: `champion`, `v3`, `headstart-classifier@v3` or `...@v3.0.0`."""
        if reference == CHAMPION:
            champion = self.champion()
            if champion is None:
                raise RegistryError(f"{self.root} has no champion yet: run the promote stage (`dvc repro`)")
            return champion
        match = REFERENCE.fullmatch(reference)
        if match is None:
            raise RegistryError(f"{reference!r} is not a registry version: use champion, vN, {ARTIFACT}@vN or "
                                f"{ARTIFACT}@vN.0.0 (versions: {self._listing()})")
        version = f"v{match.group(1)}"
        if version not in self.versions():
            raise RegistryError(f"registry version {reference!r} not found in {self.root} (versions: {self._listing()})")
        return version

    def version_of(self, export_id: str) -> str | None:
        """The version whose exported model card has this sha256, if one was registered."""
        return next((v for v in self.versions() if self.entry(v).get("export_id") == export_id), None)

    def register(self, export_dir: Path, entry: dict[str, Any], data: pd.DataFrame) -> str:
        """Copy the exported folder in as the next version with its entry and data table; returns vN."""
        # imported here: datadiff's Markdown pulls in matplotlib, which `headstart predict` (a registry reader)
        # should not pay for at start-up
        from headstart.datadiff import write_data_table

        remove_stale_temps(self.root / "v*")
        versions = self.versions()
        version = f"v{int(versions[-1][1:]) + 1 if versions else 1}"
        with atomic_directory(self.path(version)) as staging:
            shutil.copytree(export_dir, staging, dirs_exist_ok=True)
            write_data_table(data, staging / DATA_TABLE)
            atomic_write_json(staging / ENTRY, {**entry, "version": version, "gto": f"{ARTIFACT}@{gto_version(version)}"})
        return version

    def set_champion(self, version: str, action: str, reason: str) -> None:
        """Point at `version` and log why; a damaged index is replaced (its events are lost, the versions not)."""
        if version not in self.versions():
            raise RegistryError(f"registry version {version!r} not found in {self.root} (versions: {self._listing()})")
        try:
            index = self.read_index()
        except RegistryError:
            index = {CHAMPION: None, "events": []}
        event = {"at": now(), "action": action, "version": version, "previous": index.get(CHAMPION), "reason": reason}
        atomic_write_json(self.index_file, {CHAMPION: version, "events": [*index.get("events", []), event]})

    def publish(self, target: Path) -> None:
        """Make `target` (models/champion) an exact copy of the champion's folder."""
        champion = self.find(CHAMPION)
        with atomic_directory(target) as staging:
            shutil.copytree(self.path(champion), staging, dirs_exist_ok=True)


def rollback(layout: Layout, reference: str, reason: str = "") -> str:
    """Serve an earlier (or any) registered version: move the pointer and republish models/champion."""
    registry = Registry.of(layout)
    with exclusive(layout.registry_lock, "registry rollback"):
        version = registry.find(reference)  # a version reference reads no pointer: a damaged one can be replaced
        registry.set_champion(version, "rollback", reason or f"`headstart registry rollback {reference}`")
        registry.publish(layout.champion_dir)
    return version


def resolve_model(reference: str, layout: Layout) -> Path:
    """`headstart predict --model`: an existing path as given, `champion` (the served folder), or a version."""
    path = Path(reference)
    if path.exists():
        return path
    if reference == CHAMPION:
        if not layout.champion_dir.is_dir():
            raise RegistryError(f"no champion is served yet ({layout.champion_dir} is missing): run `dvc repro` "
                                "(its promote stage), or pass --model models/export/model.keras")
        return preferred_model_file(layout.champion_dir)
    if REFERENCE.fullmatch(reference):
        registry = Registry.of(layout)
        return preferred_model_file(registry.path(registry.find(reference)))
    return path


def describe(layout: Layout) -> str:
    """`headstart registry list`: one line per version, the champion marked."""
    registry = Registry.of(layout)
    champion = registry.champion()
    lines = []
    for version in registry.versions():
        entry = registry.entry(version)
        accuracy = (entry.get("metrics") or {}).get("test", {}).get("accuracy")
        commit = (entry.get("git") or {}).get("commit") or "no commit"
        lines.append(f"{'*' if version == champion else ' '} {version:<5} {entry.get('promoted_at', '?')}  "
                     f"test accuracy {accuracy if accuracy is None else f'{accuracy:.4f}'}  "
                     f"{commit[:12]}  {entry.get('reason', '')}")
    return "\n".join(lines) if lines else f"{registry.root}: no versions yet (the promote stage registers them)"
