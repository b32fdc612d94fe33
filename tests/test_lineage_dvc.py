"""`dvc repro` and `dvc status` see the user's source through the fingerprint stage: in a temporary git
repository holding a copy of the project, on real Fashion-MNIST images, for a folder, an archive, a
labels file and a URL behind a real local HTTP server. Kept to download and split."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from tests import test_dvc_pipeline, test_fingerprint
from tests.test_dvc_pipeline import _ran, _run, _set_params
from tests.test_fingerprint import _tar_gz

pytestmark = pytest.mark.slow
repo = test_dvc_pipeline.repo  # the project in a temporary git repo, its source in tmp_path/images
versioned = test_fingerprint.versioned  # a local HTTP server serving versions of one archive
spare = test_fingerprint.spare
UP_TO_DATE: dict = {}
SOURCE_CHANGED = {"download": [{"changed deps": {"data/fingerprint.json": "modified"}}]}


def _status(repo: Path, *stages: str) -> dict:
    """`dvc status --json <stages>` once the fingerprint stage has looked at the source: `dvc status` alone
    cannot look outside the repository, and lists the always_changed fingerprint stage every time."""
    _run(repo, "dvc", "repro", "fingerprint")
    return json.loads(_run(repo, "dvc", "status", "--json", *(stages or ("download",))))


def _paths(repo: Path) -> set[str]:
    return set(pd.read_csv(repo / "data" / "raw" / "manifest.csv")["path"])


def test_a_folder_grown_shrunk_and_edited_reruns_download_and_split_and_a_touch_reruns_nothing(repo, tmp_path, spare):
    images = tmp_path / "images"  # the repo fixture's source
    assert _ran(_run(repo, "dvc", "repro", "split")) == ["download", "split"]
    assert "Data and pipelines are up to date." in _run(repo, "dvc", "status", "download", "split")

    os.utime(images / "trouser" / "00001.png")
    assert _status(repo, "download", "split") == UP_TO_DATE
    assert "Data and pipelines are up to date." in _run(repo, "dvc", "status", "download", "split")
    output = _run(repo, "dvc", "repro", "split")
    assert _ran(output) == [] and "Stage 'download' didn't change, skipping" in output

    def add() -> None:
        spare[0].save(images / "trouser" / "added.png")

    def remove() -> None:
        (images / "pullover" / "00002.png").unlink()

    def edit() -> None:
        spare[1].save(images / "t-shirt" / "00003.png")

    for change, expect in ((add, "data/raw/trouser/added.png"), (remove, "data/raw/pullover/00002.png"),
                           (edit, "data/raw/t-shirt/00003.png")):
        before = (repo / "data" / "raw" / "manifest.csv").read_text()
        change()
        assert _status(repo, "download", "split") == SOURCE_CHANGED, change.__name__
        assert _ran(_run(repo, "dvc", "repro", "split")) == ["download", "split"], change.__name__
        after = (repo / "data" / "raw" / "manifest.csv").read_text()
        assert after != before and (expect in _paths(repo)) == (change is not remove)
    assert _status(repo, "download", "split") == UP_TO_DATE


def test_an_archive_replaced_in_place(repo, tmp_path, spare):
    images = tmp_path / "images"
    archive = _tar_gz(images, tmp_path / "images.tar.gz")
    _set_params(repo, {"download.source": str(archive)})
    assert _ran(_run(repo, "dvc", "repro", "download")) == ["download"]
    assert _status(repo) == UP_TO_DATE

    spare[0].save(images / "trouser" / "added.png")
    _tar_gz(images, archive)  # same path, new content
    assert _status(repo) == SOURCE_CHANGED
    assert _ran(_run(repo, "dvc", "repro", "download")) == ["download"]
    assert "data/raw/trouser/added.png" in _paths(repo)


def test_an_edited_labels_file(repo, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels.csv"
    rows = [[path.relative_to(images).as_posix(), path.parent.name] for path in sorted(images.rglob("*.png"))]
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label"], *rows])
    _set_params(repo, {"download.labels": str(labels)})
    assert _ran(_run(repo, "dvc", "repro", "download")) == ["download"]
    assert _status(repo) == UP_TO_DATE

    relabelled = next(row for row in rows if row[1] == "trouser")
    relabelled[1] = "pullover"
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label"], *rows])
    assert _status(repo) == SOURCE_CHANGED
    assert _ran(_run(repo, "dvc", "repro", "download")) == ["download"]
    manifest = pd.read_csv(repo / "data" / "raw" / "manifest.csv")
    assert manifest.loc[manifest["origin"].str.endswith(relabelled[0]), "label"].tolist() == ["pullover"]


def test_a_url_whose_content_changes_behind_the_same_address(repo, tmp_path, spare, versioned):
    url, handler = versioned
    images = tmp_path / "images"
    handler.body = _tar_gz(images, tmp_path / "v1.tar.gz").read_bytes()
    _set_params(repo, {"download.source": url})
    assert _ran(_run(repo, "dvc", "repro", "download")) == ["download"]
    assert _status(repo) == UP_TO_DATE

    spare[0].save(images / "trouser" / "added.png")
    handler.body, handler.version = _tar_gz(images, tmp_path / "v2.tar.gz").read_bytes(), 2
    assert _status(repo) == SOURCE_CHANGED
    assert _ran(_run(repo, "dvc", "repro", "download")) == ["download"]
    assert "data/raw/trouser/added.png" in _paths(repo)
