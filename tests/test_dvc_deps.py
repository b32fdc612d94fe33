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

from headstart.layout import Layout
from headstart.params import SOURCE_STAGE, STAGES, TOOLS
from tests.conftest import REPO_ROOT

PACKAGES = ("tasks", "headstart")


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
        type_only = {id(inner) for node in ast.walk(tree) if _is_type_checking_block(node) for inner in ast.walk(node)}
        nodes = tree.body if module_level_only and current == module else ast.walk(tree)
        for node in (n for n in nodes if id(n) not in type_only):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                candidate = REPO_ROOT / (name.replace(".", "/") + ".py")
                if name.split(".")[0] in PACKAGES and candidate.exists():
                    pending.append(candidate)
    return seen


def _is_type_checking_block(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` imports are read by type checkers only, never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def declared_deps(stage: str) -> set[Path]:
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    return {REPO_ROOT / dep for dep in stages[stage]["deps"] if str(dep).endswith(".py")}


@pytest.mark.parametrize("stage", (SOURCE_STAGE, *STAGES))
def test_each_stage_depends_on_every_module_it_imports(stage: str) -> None:
    needed = project_imports(REPO_ROOT / "tasks" / f"{stage}.py") | project_imports(REPO_ROOT / "tasks" / "cli.py", module_level_only=True)
    missing = sorted(str(p.relative_to(REPO_ROOT)) for p in needed - declared_deps(stage))
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them under deps"


@pytest.mark.parametrize("stage", (SOURCE_STAGE, *STAGES))
def test_each_stage_depends_on_no_module_it_does_not_import(stage: str) -> None:
    """A module listed but not imported reruns the stage (and misses the Prefect cache) for nothing."""
    needed = project_imports(REPO_ROOT / "tasks" / f"{stage}.py") | project_imports(REPO_ROOT / "tasks" / "cli.py", module_level_only=True)
    extra = sorted(str(p.relative_to(REPO_ROOT)) for p in declared_deps(stage) - needed)
    assert not extra, f"dvc.yaml stage {stage!r} lists {extra} under deps but does not import them"


def test_the_import_reader_follows_imports_transitively() -> None:
    found = {p.relative_to(REPO_ROOT).as_posix() for p in project_imports(REPO_ROOT / "tasks" / "finetune.py")}
    assert {"tasks/finetune.py", "headstart/training.py", "headstart/backbones/torch_checkpoint.py",
            "headstart/params.py"} <= found
    assert "tasks/evaluate.py" not in found  # no stage imports another stage


@pytest.mark.parametrize("stage", (SOURCE_STAGE, *STAGES, *TOOLS))
def test_no_stage_imports_another_stage(stage: str) -> None:
    found = project_imports(REPO_ROOT / "tasks" / f"{stage}.py")
    others = sorted(p.name for p in found if p.parent.name == "tasks" and p.stem != stage)
    assert not others, f"tasks/{stage}.py imports {others}: shared code belongs in headstart/"


def test_package_init_files_hold_only_a_docstring() -> None:
    """Importing headstart.x.y runs headstart/__init__.py and headstart/x/__init__.py; with no code in them,
    a stage's code deps are exactly the modules it imports (the package files need not be listed)."""
    for init in sorted((REPO_ROOT / "headstart").rglob("__init__.py")):
        body = ast.parse(init.read_text()).body
        code = [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
        assert not code, f"{init.relative_to(REPO_ROOT)} holds code; move it into a module"


@pytest.mark.parametrize("stage", (SOURCE_STAGE, *STAGES))
def test_every_dvc_yaml_output_is_a_layout_path(stage: str) -> None:
    """What dvc.yaml declares a stage writes is exactly what Layout says it writes (outs, metrics and plots)."""
    declared = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"][stage]
    outs = {next(iter(out)) if isinstance(out, dict) else out
            for kind in ("outs", "metrics", "plots") for out in declared.get(kind, [])}
    layout = Layout(Path("."))
    assert outs == {path.as_posix() for path in layout.outputs(stage)}
