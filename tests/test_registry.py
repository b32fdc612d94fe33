"""The data diff from real download manifests, and the registry's references and damaged files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from headstart.datadiff import DataTableError, diff_data, diff_markdown, read_data_table
from headstart.layout import Layout
from headstart.params import validate_params
from headstart.registry import Registry, RegistryError, resolve_model, rollback
from tasks import cli, download
from tests.conftest import FASHION_CLASSES, write_class_folders


def _download(root: Path, source: Path) -> Layout:
    layout = Layout(root)
    download.run(validate_params({"download": {"source": str(source), "min_images_per_class": 3}}), layout)
    return layout


def test_data_diff_counts_added_removed_changed_per_class_and_class_changes(tmp_path: Path, fashion_arrays) -> None:
    images, labels = fashion_arrays
    keep = labels < 4
    source = write_class_folders(tmp_path / "source", images[keep], labels[keep], per_class=6)
    before = read_data_table(_download(tmp_path / "run", source).raw_manifest, "rerun download")

    tshirt, trouser, pullover, dress = (source / FASHION_CLASSES[i] for i in range(4))
    spare = images[labels == 0][50:52]
    for n, picture in enumerate(spare):  # two new t-shirts
        Image.fromarray(picture).save(tshirt / f"new-{n}.png")
    (trouser / "00001.png").unlink()  # one trouser removed
    Image.fromarray(images[labels == 2][60]).save(pullover / "00002.png")  # a pullover edited in place
    os.utime(pullover / "00003.png", ns=(1, 1))  # touched only: same bytes
    shutil.rmtree(dress)  # a class removed ...
    write_class_folders(tmp_path / "more", images[labels == 7], labels[labels == 7], per_class=4)
    shutil.copytree(tmp_path / "more" / FASHION_CLASSES[7], source / FASHION_CLASSES[7])  # ... and one added
    after = read_data_table(_download(tmp_path / "run", source).raw_manifest, "rerun download")

    diff = diff_data(before, after, "v1")
    counts = diff.counts.set_index("class")
    assert counts.loc["t-shirt"].to_dict() == {"before": 6, "after": 8, "added": 2, "removed": 0, "changed": 0}
    assert counts.loc["trouser"].to_dict() == {"before": 6, "after": 5, "added": 0, "removed": 1, "changed": 0}
    assert counts.loc["pullover"].to_dict() == {"before": 6, "after": 6, "added": 0, "removed": 0, "changed": 1}
    assert counts.loc["dress"].to_dict() == {"before": 6, "after": 0, "added": 0, "removed": 6, "changed": 0}
    assert counts.loc["sneaker"].to_dict() == {"before": 0, "after": 4, "added": 4, "removed": 0, "changed": 0}
    assert (diff.classes_added, diff.classes_removed) == (["sneaker"], ["dress"])
    report = diff.as_json()
    assert report["totals"] == {"before": 24, "after": 23, "added": 6, "removed": 7, "changed": 1}
    text = diff_markdown(diff)
    assert "6 added, 7 removed, 1 changed in place" in text and "Classes added: `sneaker`" in text

    assert not diff_data(after, after, "v2").changed
    first = diff_data(None, after)
    assert first.baseline is None and "No champion yet" in diff_markdown(first)
    assert first.counts.set_index("class").loc["sneaker", "added"] == 4


def test_a_damaged_data_table_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "data.csv"
    bad.write_text("path,label\nraw/a/1.png,a\n")
    with pytest.raises(DataTableError, match=r"data.csv: missing column\(s\) sha256; restore it"):
        read_data_table(bad, "restore it")
    with pytest.raises(DataTableError, match="not found"):
        read_data_table(tmp_path / "absent.csv", "restore it")


def _fake_export(folder: Path, marker: str) -> Path:
    """An export folder's files (the registry copies them; no model is loaded in these tests)."""
    folder.mkdir(parents=True)
    (folder / "labels.txt").write_text("a\nb\n")
    (folder / "model.keras").write_bytes(marker.encode())
    (folder / "model_card.json").write_text(json.dumps({"classes": ["a", "b"], "marker": marker,
                                                        "files": {"keras": {"path": "model.keras"}}}))
    return folder


@pytest.fixture
def two_versions(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path)
    registry = Registry.of(layout)
    table = pd.DataFrame([{"path": "data/raw/a/1.png", "label": "a", "sha256": "0" * 64}])
    for n in (1, 2):
        version = registry.register(_fake_export(tmp_path / f"export{n}", f"m{n}"), {"export_id": f"id{n}"}, table)
        registry.set_champion(version, "promote", "test")
        registry.publish(layout.champion_dir)
    return layout


def test_references_resolve_and_rollback_moves_the_pointer(two_versions: Layout) -> None:
    registry = Registry.of(two_versions)
    assert registry.versions() == ["v1", "v2"] and registry.champion() == "v2"
    for reference in ("v1", "headstart-classifier@v1", "headstart-classifier@v1.0.0"):
        assert resolve_model(reference, two_versions) == registry.path("v1") / "model.keras"
    assert resolve_model("champion", two_versions).read_bytes() == b"m2"
    assert registry.version_of("id1") == "v1" and registry.version_of("other") is None
    assert rollback(two_versions, "v1") == "v1"
    assert registry.champion() == "v1"
    assert (two_versions.champion_dir / "model.keras").read_bytes() == b"m1"
    events = json.loads(registry.index_file.read_text())["events"]
    assert [(e["action"], e["version"], e["previous"]) for e in events][-1] == ("rollback", "v1", "v2")


def test_a_rollback_waits_while_another_change_of_champion_holds_the_registry(two_versions: Layout, caplog) -> None:
    """promote reads, compares and replaces the champion under the same lock: no change is lost between them."""
    import logging
    import threading

    from filelock import FileLock

    two_versions.registry_lock.parent.mkdir(parents=True, exist_ok=True)
    held = FileLock(two_versions.registry_lock)
    held.acquire()  # a promote mid-way between reading the champion and replacing it
    done: list[str] = []
    with caplog.at_level(logging.WARNING):
        waiting = threading.Thread(target=lambda: done.append(rollback(two_versions, "v1")))
        waiting.start()
        waiting.join(2)
        assert waiting.is_alive() and Registry.of(two_versions).champion() == "v2"
        assert f"another run in this project holds {two_versions.registry_lock}; waiting" in caplog.text
        held.release()
        waiting.join(30)
    assert done == ["v1"] and Registry.of(two_versions).champion() == "v1"


def test_an_unknown_version_is_an_error_listing_the_versions(two_versions: Layout, capsys) -> None:
    with pytest.raises(RegistryError, match=r"'v9' not found .* \(versions: v1, v2\)"):
        resolve_model("v9", two_versions)
    assert cli.main(["registry", "rollback", "v9", "--root", str(two_versions.root)]) == 2
    assert "(versions: v1, v2)" in capsys.readouterr().err
    assert cli.main(["predict", "x.png", "--model", "headstart-classifier@v7", "--root", str(two_versions.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("headstart predict: error: registry version 'headstart-classifier@v7' not found")
    assert err.count("\n") == 1 and "(versions: v1, v2)" in err


def test_a_damaged_pointer_is_a_clear_error_and_rollback_repairs_it(two_versions: Layout, capsys) -> None:
    registry = Registry.of(two_versions)
    registry.index_file.write_text("{not json")
    assert cli.main(["registry", "list", "--root", str(two_versions.root)]) == 2
    err = capsys.readouterr().err
    assert "registry.json: not readable JSON" in err and "headstart registry rollback <version>" in err
    assert "(versions: v1, v2)" in err
    registry.index_file.write_text(json.dumps({"champion": "v5", "events": []}))
    with pytest.raises(RegistryError, match="champion 'v5' is not a version"):
        registry.champion()
    registry.index_file.unlink()
    with pytest.raises(RegistryError, match="registry.json is missing although the registry holds versions"):
        registry.champion()
    assert cli.main(["registry", "rollback", "v2", "--root", str(two_versions.root)]) == 0
    assert registry.champion() == "v2" and "* v2" in capsys.readouterr().out

    (registry.path("v1") / "entry.json").unlink()  # a damaged version folder is named too
    assert cli.main(["registry", "list", "--root", str(two_versions.root)]) == 2
    assert "v1/entry.json: not readable" in capsys.readouterr().err


def test_predict_without_a_champion_says_what_to_run(tmp_path: Path, capsys) -> None:
    assert cli.main(["predict", "x.png", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no champion is served yet" in err and "dvc repro" in err


@pytest.mark.parametrize(("key", "value", "message"), [
    ("promote.tolerance", -0.1, "key 'promote.tolerance' has value -0.1"),
    ("promote.class_change", "ignore", "key 'promote.class_change' has value 'ignore'"),
])
def test_bad_promote_params_name_the_key(key: str, value: object, message: str) -> None:
    from headstart.params import ParamsError, load_params

    with pytest.raises(ParamsError, match=message):
        load_params("no-such-params.yaml", {key: value})


def test_promote_without_an_export_says_which_stage_to_run(tmp_path: Path, capsys) -> None:
    assert cli.main(["promote", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "models/export/model_card.json not found: run the export stage first" in err
