"""The promotion gate on really trained models: first promotion, a worse challenger kept out while the
champion stays served, force, rollback, registry versions in `headstart predict`, a changed class set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from headstart.data.manifest import read_split_manifest
from headstart.layout import Layout
from headstart.registry import Registry
from tasks import cli, download, evaluate, export, features, finetune, promote, split, train_head
from tests.conftest import write_class_folders
from tests.model_fixture import trained_params
from tests.stage_inputs import copy_tree

pytestmark = pytest.mark.slow
FAST_EXPORT = {"formats": ["keras"], "representative_samples": 8}


def _params(root: Path, **sections: dict[str, Any]):
    return trained_params(root, export=FAST_EXPORT, evaluate={"bootstrap_resamples": 50, "gradcam_per_class": 0,
                                                               "gallery_size": 0}, **sections)


def _retrain(layout: Layout, stages, **sections: dict[str, Any]) -> dict[str, Any]:
    params = _params(layout.root, **sections)
    for stage in (*stages, evaluate, export, promote):
        result = stage.run(params, layout)
    return result


def _report(layout: Layout) -> dict[str, Any]:
    return json.loads(layout.promotion_json.read_text())


def _predict(capsys, layout: Layout, image: Path, *model: str) -> dict[str, float]:
    assert cli.main(["predict", str(image), "--root", str(layout.root), "--format", "jsonl", "--top-k", "4", *model]) == 0
    [line] = capsys.readouterr().out.splitlines()
    return {entry["label"]: entry["probability"] for entry in json.loads(line)["predictions"]}


def _test_paths(layout: Layout) -> list[str]:
    return read_split_manifest(layout.split_manifest).query("split == 'test'")["path"].tolist()


@pytest.fixture(scope="module")
def promoted(trained_tree, tmp_path_factory) -> tuple[Layout, dict[str, Any]]:
    """The session's trained tree, evaluated, exported and through its first promote (built once)."""
    layout = copy_tree(trained_tree.root, tmp_path_factory.mktemp("promoted") / "tree")
    return layout, _retrain(layout, ())


@pytest.fixture
def tree(promoted, tmp_path: Path) -> Layout:
    """A private copy of the promoted tree (its stages write into it freely)."""
    return copy_tree(promoted[0].root, tmp_path / "tree")


def test_first_promotes_a_worse_challenger_is_kept_out_force_and_rollback(promoted, tree: Layout, capsys) -> None:
    registry = Registry.of(tree)
    first = promoted[1]
    assert first == {"outcome": "promoted", "champion_before": None, "champion_after": "v1", "registered": "v1"}
    assert "No champion yet" in tree.data_diff_md.read_text()
    entry = registry.entry("v1")
    assert entry["classes"] == (tree.champion_dir / "labels.txt").read_text().split()
    assert entry["metrics"]["test"]["accuracy"] == json.loads(tree.metrics_file.read_text())["test"]["accuracy"]
    assert entry["params"]["promote"]["tolerance"] == 0.01 and entry["gto"] == "headstart-classifier@v1.0.0"
    assert len(entry["data"]["raw_manifest_sha256"]) == 64 and entry["data"]["images"] > 0
    assert promote.run(_params(tree.root), tree)["outcome"] == "unchanged"  # a rerun registers nothing new

    # the challenger: an untrained head (one epoch at a vanishing rate), no fine-tuning
    worse = _retrain(tree, (train_head, finetune), train_head={"epochs": 1, "learning_rate": 1e-7},
                     finetune={"enabled": False})
    report = _report(tree)
    assert worse["outcome"] == "kept" and registry.champion() == "v1" and registry.versions() == ["v1"]
    assert "promote.tolerance" in report["reason"] and report["comparison"]["accuracy_change"]["change"] < -0.01
    assert "Same images as the data `v1` was trained on." in tree.data_diff_md.read_text()
    image = tree.root / _test_paths(tree)[0]
    served = _predict(capsys, tree, image)
    assert served == pytest.approx(_predict(capsys, tree, image, "--model", "v1"), abs=1e-6)

    forced = promote.run(_params(tree.root, promote={"force": True}), tree)
    assert forced["registered"] == "v2" and registry.champion() == "v2"
    assert _report(tree)["reason"].startswith("promote.force is set: promoted although")
    challenger = (tree.export_dir / "model.keras").read_bytes()
    assert (tree.champion_dir / "model.keras").read_bytes() == challenger == (registry.path("v2") / "model.keras").read_bytes()
    assert _predict(capsys, tree, image, "--model", "v2") != pytest.approx(served, abs=1e-3)

    assert cli.main(["registry", "rollback", "v1", "--root", str(tree.root)]) == 0
    assert "* v1" in capsys.readouterr().out
    assert _predict(capsys, tree, image) == pytest.approx(served, abs=1e-6)
    again = promote.run(_params(tree.root), tree)  # the rolled-back challenger is not promoted again
    assert again["outcome"] == "kept" and registry.champion() == "v1"
    assert "already registered as v2" in _report(tree)["reason"]


def test_a_changed_class_set_is_compared_on_the_shared_classes(tree: Layout, fashion_arrays) -> None:
    registry = Registry.of(tree)
    champion_classes = registry.entry("v1")["classes"]
    gone = champion_classes[-1]
    shutil.rmtree(tree.root / "source" / gone)
    images, labels = fashion_arrays
    write_class_folders(tree.root / "source", images[labels == 7], labels[labels == 7], per_class=20)  # sneaker
    stages = (download, split, features, train_head, finetune)

    kept = _retrain(tree, stages, finetune={"enabled": False}, promote={"class_change": "require_force"})
    report = _report(tree)
    assert kept["outcome"] == "kept" and "promote.class_change is require_force" in report["reason"]
    diff = json.loads(tree.data_diff_json.read_text())
    assert (diff["classes_added"], diff["classes_removed"]) == (["sneaker"], [gone])

    shared = promote.run(_params(tree.root), tree)
    report = _report(tree)
    assert report["shared_classes"] == sorted(champion_classes[:-1])
    assert "added: `sneaker`" in report["notices"][0] and f"removed: `{gone}`" in report["notices"][0]
    test = read_split_manifest(tree.split_manifest).query("split == 'test'")
    assert 0 < report["comparison"]["images"] == int((test["label"] != "sneaker").sum()) < len(test)
    assert shared["outcome"] in ("promoted", "kept")
    assert (shared["outcome"] == "promoted") == (registry.champion() == "v2")
