"""dvc.yaml's code deps are derived from the code: a stage depends on every project module it imports.

A module missing from a stage's deps lets a code change leave the stage "up to date" for `dvc repro`
and for the Prefect cache (which reads the same declarations). The imports are read with `ast`, so
the check follows the code as it is, transitively, from `tasks/<stage>.py` and the CLI that runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tasks.params import STAGES
from tests.conftest import REPO_ROOT

PACKAGES = ("tasks",)


def project_imports(module: Path, module_level_only: bool = False) -> set[Path]:
    """The project modules `module` imports, directly or through each other (itself included).

    `module_level_only` reads only the first module's top-level imports: the CLI imports the
    non-stage commands (predict, inspect) inside the functions that run them.
    """
    seen: set[Path] = set()
    pending = [module]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        tree = ast.parse(current.read_text())
        nodes = tree.body if module_level_only and current == module else ast.walk(tree)
        for node in nodes:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                candidate = REPO_ROOT / (name.replace(".", "/") + ".py")
                if name.split(".")[0] in PACKAGES and candidate.exists():
                    pending.append(candidate)
    return seen


def declared_deps(stage: str) -> set[Path]:
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    return {REPO_ROOT / dep for dep in stages[stage]["deps"] if str(dep).endswith(".py")}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_depends_on_every_module_it_imports(stage: str) -> None:
    needed = project_imports(REPO_ROOT / "tasks" / f"{stage}.py") | project_imports(REPO_ROOT / "tasks" / "cli.py", module_level_only=True)
    missing = sorted(str(p.relative_to(REPO_ROOT)) for p in needed - declared_deps(stage))
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them under deps"


def test_the_import_reader_follows_imports_transitively() -> None:
    found = {p.name for p in project_imports(REPO_ROOT / "tasks" / "finetune.py")}
    assert {"finetune.py", "training.py", "backbones.py", "torch_checkpoint.py", "params.py"} <= found
    assert "evaluate.py" not in found  # no stage imports another stage
