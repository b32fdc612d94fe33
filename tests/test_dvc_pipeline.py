"""dvc.yaml for real: `dvc repro`, no-op reruns, param edits, experiments and a local remote, in a
temporary git repository holding a copy of the project, on real Fashion-MNIST images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from flows.stages import hash_path
from headstart.params import STAGES
from tests.conftest import REPO_ROOT, write_class_folders
from tests.test_flows import TINY

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CACHED_OUTS = ("data/raw", "data/split/manifest.csv", "data/features", "models/head", "models/finetune",
               "models/export")
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore")


def _run(repo: Path, *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _set_params(repo: Path, overrides: dict[str, Any]) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _ran(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


@pytest.fixture
def repo(tmp_path: Path, fashion_arrays) -> Path:
    """A git repo with the project's DVC files, tasks/ and headstart/ (imported from there via PYTHONPATH)."""
    pictures, labels = fashion_arrays
    images = write_class_folders(tmp_path / "images", pictures[labels < 3], labels[labels < 3], per_class=12)
    repo = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files", "tasks", "headstart", *PROJECT_FILES], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, repo / name)
    _set_params(repo, {**TINY, "download.source": str(images)})
    _run(repo, "git", "init", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "project")
    return repo


def test_split_repro_noop_param_edit_and_experiments(repo: Path) -> None:
    assert _ran(_run(repo, "dvc", "repro", "split")) == ["download", "split"]
    assert _ran(_run(repo, "dvc", "repro", "split")) == []
    first = {out: hash_path(repo / out) for out in ("data/raw", "data/split/manifest.csv")}

    _set_params(repo, {"split.salt": "another-salt"})
    assert _ran(_run(repo, "dvc", "repro", "split")) == ["split"]
    assert hash_path(repo / "data/raw") == first["data/raw"]
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "salt")

    _run(repo, "dvc", "exp", "run", "split", "-S", "split.train=0.6", "-S", "split.val=0.25", "-n", "wider-val")
    shown = json.loads(_run(repo, "dvc", "exp", "show", "--json"))
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    names = {run["name"]: run for exp in experiments for run in exp["revs"]}
    params = names["wider-val"]["data"]["params"]["params.yaml"]["data"]["split"]
    assert (params["train"], params["val"]) == (0.6, 0.25)



def test_whole_pipeline_from_scratch_remote_round_trip_then_only_what_changed(repo: Path, tmp_path: Path) -> None:
    assert _ran(_run(repo, "dvc", "repro")) == list(STAGES)
    assert _ran(_run(repo, "dvc", "repro")) == []
    metrics = json.loads((repo / "metrics.json").read_text())
    predictions = pd.read_csv(repo / "reports" / "predictions.csv", dtype=str, keep_default_na=False)
    right = (predictions["label"] == predictions["predicted"]).mean()  # recomputed from the per-image rows
    assert metrics["test"]["accuracy"] == pytest.approx(right) and right > 1 / predictions["label"].nunique()

    remote = tmp_path / "remote"
    _run(repo, "dvc", "remote", "add", "-d", "local", str(remote))
    _run(repo, "dvc", "push")
    champion_after_one_run(repo, tmp_path / "got")
    pushed = {out: hash_path(repo / out) for out in CACHED_OUTS}
    assert all(pushed.values())
    for out in CACHED_OUTS:
        shutil.rmtree(repo / out) if (repo / out).is_dir() else (repo / out).unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    _run(repo, "dvc", "pull")
    assert {out: hash_path(repo / out) for out in CACHED_OUTS} == pushed
    assert _ran(_run(repo, "dvc", "repro")) == []

    _set_params(repo, {"train_head.learning_rate": 0.01})
    assert _ran(_run(repo, "dvc", "repro")) == list(STAGES[STAGES.index("train_head"):])
    promotion = json.loads((repo / "reports" / "promotion.json").read_text())
    registry = repo / "models" / "registry"
    assert promotion["champion_before"] == "v1" and promotion["comparison"]["images"] > 0
    expected = ["v1", "v2"] if promotion["outcome"] == "promoted" else ["v1"]  # v1 survives the rerun (persist)
    assert sorted(p.name for p in registry.glob("v*")) == expected, promotion


def champion_after_one_run(repo: Path, got: Path) -> None:
    """The first run promoted v1 and serves it; GTO tags it and `dvc artifacts get` fetches it by that tag."""
    promotion = json.loads((repo / "reports" / "promotion.json").read_text())
    assert (promotion["outcome"], promotion["champion_after"]) == ("promoted", "v1")
    served = repo / "models" / "champion" / "model.keras"
    assert hash_path(served) == hash_path(repo / "models" / "registry" / "v1" / "model.keras")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "first champion")
    _run(repo, "gto", "register", "headstart-classifier", "HEAD", "--version", "v1.0.0")
    _run(repo, "gto", "assign", "headstart-classifier", "--version", "v1.0.0", "--stage", "prod")
    shown = json.loads(_run(repo, "gto", "show", "--json"))["headstart-classifier"]
    assert (shown["version"], shown["stage"]) == ("v1.0.0", {"prod": "v1.0.0"})
    _run(repo, "dvc", "artifacts", "get", str(repo), "headstart-classifier", "--stage", "prod", "-o", str(got))
    assert hash_path(got / "model.keras") == hash_path(served)


def test_a_stage_reruns_when_a_library_module_it_imports_changes(repo: Path) -> None:
    """The code deps dvc.yaml derives from the imports (tests/test_dvc_deps.py) make a library edit count."""
    assert _ran(_run(repo, "dvc", "repro", "download")) == ["download"]
    with open(repo / "headstart" / "serving.py", "a") as module:  # not imported by download
        module.write("\n# an edit the download stage does not import\n")
    assert "changed deps" not in _run(repo, "dvc", "status", "download")

    imported = "headstart/data/sources/folders.py"  # download -> sources.resolve -> sources.folders
    with open(repo / imported, "a") as module:
        module.write("\n# an edit the download stage imports\n")
    status = _run(repo, "dvc", "status", "download")
    assert "changed deps" in status and imported in status, status
    assert _ran(_run(repo, "dvc", "repro", "download")) == ["download"]
