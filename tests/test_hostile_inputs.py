"""Hostile and careless inputs: each gives one clear line naming the file, key or value, or is healed."""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headstart.data.sources.candidates import DownloadError
from headstart.layout import Layout
from headstart.params import ParamsError, load_params
from tasks import download
from tests.conftest import REPO_ROOT


def _download(project: Path, **download_params) -> Layout:
    layout = Layout(project)
    params = load_params(project / "absent.yaml", {f"download.{k}": v for k, v in download_params.items()})
    download.run(params, layout)
    return layout


def _classes(layout: Layout) -> list[str]:
    return sorted(pd.read_csv(layout.raw_manifest, dtype=str, keep_default_na=False)["label"].unique())


# --------------------------------------------------------------------------- sources that are not what they seem


@pytest.mark.parametrize("source", ["", "  "])
def test_empty_source_is_refused(tmp_path, source):
    with pytest.raises(DownloadError, match="download.source is empty"):
        _download(tmp_path / "project", source=source, max_images_per_class=None)


@pytest.mark.parametrize("which", ["project", "parent"])
def test_source_holding_the_project_is_refused(tmp_path, small_dataset, monkeypatch, which):
    project = small_dataset / "project"  # images beside the project: the folder holds both
    project.mkdir()
    monkeypatch.chdir(project)
    source = "." if which == "project" else ".."
    with pytest.raises(DownloadError, match=r"download.source '\.\.?' is (the project folder|a folder holding)"):
        _download(Path("."), source=source, max_images_per_class=None)
    assert not Path("data/raw").exists()


def test_class_folder_symlink_inside_the_source_is_followed(tmp_path, small_dataset):
    (small_dataset / "trouser").rename(small_dataset / ".store")
    (small_dataset / "trouser").symlink_to(small_dataset / ".store")
    layout = _download(tmp_path / "project", source=str(small_dataset), max_images_per_class=None)
    assert _classes(layout) == ["pullover", "t-shirt", "trouser"]


def test_class_folder_symlink_outside_the_source_is_refused_by_name(tmp_path, small_dataset):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (small_dataset / "trouser").rename(elsewhere / "trouser")
    (small_dataset / "trouser").symlink_to(elsewhere / "trouser")
    with pytest.raises(DownloadError, match=rf"{small_dataset / 'trouser'}: a symbolic link to the folder .*outside"):
        _download(tmp_path / "project", source=str(small_dataset), max_images_per_class=None)


def test_file_symlink_outside_the_source_is_quarantined_as_labels_files_do(tmp_path, small_dataset):
    outside = tmp_path / "outside.png"
    shutil.copy(small_dataset / "trouser" / "00001.png", outside)
    link = small_dataset / "pullover" / "linked.png"
    link.symlink_to(outside)
    layout = _download(tmp_path / "project", source=str(small_dataset), max_images_per_class=None)
    quarantine = pd.read_csv(layout.quarantine)
    assert quarantine["origin"].tolist() == [str(link)]
    assert "leads outside the source folder" in quarantine["reason"][0]
    assert not any(Path(p).name == "linked.png" for p in pd.read_csv(layout.raw_manifest)["path"])


@pytest.mark.parametrize("through", ["folders", "labels"])
def test_unicode_equivalent_class_names_are_one_class(tmp_path, small_dataset, through):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    (small_dataset / "trouser").rename(small_dataset / nfc)
    (small_dataset / nfc / "00020.png").rename(small_dataset / "00020.png")
    if through == "folders":
        (small_dataset / nfd).mkdir()
        (small_dataset / "00020.png").rename(small_dataset / nfd / "00020.png")
        layout = _download(tmp_path / "project", source=str(small_dataset), max_images_per_class=None)
    else:
        rows = [f"{p.relative_to(small_dataset).as_posix()},{p.parent.name}" for p in small_dataset.glob("*/*.png")]
        rows.append(f"00020.png,{nfd}")
        (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        layout = _download(tmp_path / "project", source=str(small_dataset), labels=str(tmp_path / "labels.csv"),
                           max_images_per_class=None)
    assert _classes(layout) == ["café", "pullover", "t-shirt"]
    assert (layout.raw_dir / nfc / "00020.png").exists()


@pytest.mark.parametrize("separator", ["\n", "\r", "\u2028", "\x85"])
def test_class_name_with_a_line_separator_is_refused_at_download(tmp_path, small_dataset, separator):
    bad = f"two{separator}lines"
    (small_dataset / "trouser").rename(small_dataset / bad)
    with pytest.raises(DownloadError, match=r"holds a line break.*a class name may hold letters") as error:
        _download(tmp_path / "project", source=str(small_dataset), max_images_per_class=None)
    assert repr(bad) in str(error.value)


def test_label_over_the_folder_name_limit_is_quarantined_by_name(tmp_path, small_dataset):
    long_label = "x" * 300
    rows = [f"{p.relative_to(small_dataset).as_posix()},{p.parent.name}" for p in small_dataset.glob("*/*.png")]
    rows[0] = rows[0].split(",")[0] + "," + long_label
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    layout = _download(tmp_path / "project", source=str(small_dataset), labels=str(tmp_path / "labels.csv"),
                       max_images_per_class=None, min_images_per_class=5)
    reason = pd.read_csv(layout.quarantine)["reason"].tolist()
    assert len(reason) == 1 and "300 bytes in UTF-8, over the 255-byte limit" in reason[0]
    assert "xxxxxxxx" in reason[0] and ".raw.tmp" not in reason[0]


def test_labels_file_with_no_usable_row_names_the_file_and_its_rows(tmp_path, small_dataset):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nmissing/1.png,a\nmissing/2.png,b\n,c\n")
    with pytest.raises(DownloadError, match=rf"{labels}: none of its 3 rows can be used \(line 2: .*no such file"):
        _download(tmp_path / "project", source=str(small_dataset), labels=str(labels))


# --------------------------------------------------------------------------- parameter files


def test_duplicate_key_in_params_yaml_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("download:\n  source: a\nsplit:\n  salt: s\ndownload:\n  source: b\n")
    with pytest.raises(ParamsError, match=r"key 'download' is given twice, on lines 1 and 5"):
        load_params(path)
    path.write_text("train_head:\n  epochs: 3\n  learning_rate: 0.1\n  epochs: 4\n")
    with pytest.raises(ParamsError, match=r"key 'epochs' is given twice, on lines 2 and 4"):
        load_params(path)


# --------------------------------------------------------------------------- entry points


def test_flow_module_refuses_unknown_arguments_and_documents_its_own():
    unknown = subprocess.run([sys.executable, "-m", "flows.pipeline", "--anything"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "unrecognized arguments: --anything" in unknown.stderr
    assert "usage: python -m flows.pipeline" in unknown.stderr and "[--stages STAGE" in unknown.stderr


# --------------------------------------------------------------------------- caches that heal


def test_truncated_decoded_image_cache_is_named_and_rebuilt(tmp_path, small_dataset, caplog):
    from headstart.data.datasets import cached_images

    paths = sorted(str(p) for p in small_dataset.glob("*/*.png"))[:24]
    keys = [Path(p).name for p in paths]
    first = np.array(cached_images(paths, keys, 32, "bilinear", tmp_path / "cache"))
    (cache,) = (tmp_path / "cache").glob("images-*.npy")
    with open(cache, "r+b") as handle:  # a copy cut short
        handle.truncate(cache.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        healed = cached_images(paths, keys, 32, "bilinear", tmp_path / "cache")
    np.testing.assert_array_equal(healed, first)
    assert f"{cache} is damaged or incomplete" in caplog.text
    data = bytearray(cache.read_bytes())  # same size, altered pixels: only the checksum tells
    data[-1] ^= 0xFF
    cache.write_bytes(bytes(data))
    np.testing.assert_array_equal(cached_images(paths, keys, 32, "bilinear", tmp_path / "cache"), first)


@pytest.mark.parametrize("damage", ["state_not_json", "state_of_another_shape", "weights_cut_short"])
def test_damaged_finetune_checkpoint_is_named_and_not_resumed(tmp_path, caplog, damage):
    import keras

    from headstart.callbacks import FinetuneState

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    state = FinetuneState.fresh({"val_loss": 0.5, "val_accuracy": 0.8})
    state.save(folder, model, improved=True)
    assert FinetuneState.load(folder) == state and state.last == "epoch-0.weights.h5"
    if damage == "state_not_json":
        (folder / "state.json").write_text('{"epochs_done": 1, "last": ')
    elif damage == "state_of_another_shape":  # e.g. written by another version: a key missing, a count negative
        (folder / "state.json").write_text(json.dumps({**state.model_dump(), "epochs_done": -1, "best_val_loss": None}))
    else:
        weights = folder / state.last
        weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        assert FinetuneState.load(folder) is None
    assert f"checkpoint {folder} is damaged" in caplog.text and "starting again from the head-only model" in caplog.text


# --------------------------------------------------------------------------- exported models and predict


def test_damaged_model_card_is_named_with_what_predict_can_do_without_it(tmp_path):
    from headstart.serving import ModelFormatError, read_input_size

    model = tmp_path / "model.keras"
    model.write_bytes(b"")
    (tmp_path / "model_card.json").write_text('{"input": {resized_inside_to: [96, 96]}}')
    with pytest.raises(ModelFormatError, match=rf"{tmp_path / 'model_card.json'}: damaged .*delete it: predict "
                                               "still runs without it"):
        read_input_size(model)
    (tmp_path / "model_card.json").unlink()
    assert read_input_size(model) is None


def test_truncated_keras_file_is_called_damaged_not_missing(tmp_path):
    import keras

    from headstart.data.artifacts import ArtifactError, load_model
    from headstart.serving import load_predictor

    path = tmp_path / "model.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=rf"{path}: not a .keras zip archive \(truncated or damaged\)"):
        load_predictor(path)
    with pytest.raises(ArtifactError, match=r"truncated or damaged\): rerun `headstart finetune`"):
        load_model(path, "finetune")


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "1e300", "soon"])
def test_predict_timeout_must_be_positive_finite_seconds(capsys, value):
    from tasks.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["predict", "x.jpg", "--timeout", value])
    assert exited.value.code == 2 and "--timeout: expected" in capsys.readouterr().err
    assert build_parser().parse_args(["predict", "x.jpg", "--timeout", "2.5"]).timeout == 2.5


# --------------------------------------------------------------------------- archives and URLs


@pytest.mark.parametrize("order", ["file_first", "folder_first"])
def test_member_that_is_both_file_and_folder_names_archive_and_member(tmp_path, small_dataset, order):
    archive = tmp_path / "bad.zip"
    image = (small_dataset / "trouser" / "00001.png").read_bytes()
    with zipfile.ZipFile(archive, "w") as bundle:
        for name in (["ds/x", "ds/x/1.png"] if order == "file_first" else ["ds/x/1.png", "ds/x"]):
            bundle.writestr(name, image)
    with pytest.raises(DownloadError, match=rf"{archive}: member 'ds/x(/1.png)?' is both a file and a folder"):
        _download(tmp_path / "project", source=str(archive))


def test_empty_archive_message_names_the_archive(tmp_path):
    archive = tmp_path / "empty.zip"
    zipfile.ZipFile(archive, "w").close()
    with pytest.raises(DownloadError, match=rf"^{archive}: no labelled images found in the archive") as error:
        _download(tmp_path / "project", source=str(archive))
    assert "data/cache/extract" not in str(error.value)


class _Redirects(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server naming)
        self.send_response(302)
        self.send_header("Location", self.path)  # to itself, for ever
        self.end_headers()


def test_redirect_loop_names_the_url(tmp_path):
    from headstart.data.sources.fetch import fetch_url

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
    try:
        with pytest.raises(DownloadError, match=rf"^{url}: redirect loop \(Exceeded 30 redirects"):
            fetch_url(url, tmp_path / "data.zip", None, timeout_s=5, retries=0)
    finally:
        server.shutdown()
        server.server_close()


def test_second_download_in_a_project_waits_for_the_first_and_says_so(tmp_path, small_dataset, caplog):
    from filelock import FileLock

    layout = Layout(tmp_path / "project")
    params = load_params(tmp_path / "absent.yaml", {"download.source": str(small_dataset),
                                                    "download.max_images_per_class": None})
    held = FileLock(layout.download_lock)
    layout.download_lock.parent.mkdir(parents=True)
    held.acquire()  # another download of this project, mid-way through unpacking
    results = []
    with caplog.at_level(logging.WARNING):
        second = threading.Thread(target=lambda: results.append(download.run(params, layout)))
        second.start()
        second.join(3)
        assert second.is_alive() and not layout.raw_dir.exists()
        assert f"another run in this project holds {layout.download_lock}; waiting" in caplog.text
        held.release()
        second.join(60)
    assert results and results[0]["images"] == 60


@pytest.mark.parametrize("name", ["weights.h5", "base.weights.h5", "model.keras"])
def test_weights_file_in_another_format_names_the_file_and_the_formats(tmp_path, name):
    from headstart.backbones.registry import get_spec
    from headstart.backbones.weights import weights_path

    path = tmp_path / name
    path.write_bytes(b"PK-not-really\x00" * 100)
    with pytest.raises(ValueError, match=rf"weights file {path} is not (an HDF5 file|a .keras zip archive) .*"
                                         r"HDF5 \(.weights.h5, .h5\) or a saved .keras model"):
        weights_path(get_spec("mobilenet_v2_tv"), str(path))


def test_sampling_below_the_minimum_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ParamsError, match=r"max_images_per_class=1 samples fewer images per class than "
                                          r"min_images_per_class=10 requires"):
        load_params(tmp_path / "absent.yaml", {"download.max_images_per_class": 1})
    assert load_params(tmp_path / "absent.yaml", {"download.max_images_per_class": 10}).download.max_images_per_class


def test_class_of_byte_copies_points_at_the_quarantined_duplicates(tmp_path, small_dataset):
    trouser = small_dataset / "trouser"
    for copy in sorted(trouser.iterdir())[1:]:
        shutil.copy(trouser / "00001.png", copy)
    with pytest.raises(DownloadError, match=r"'trouser' has 1 \(19 more were byte copies of these, listed in "
                                            r".*quarantine.csv\)"):
        _download(tmp_path / "project", source=str(small_dataset), max_images_per_class=None)


# --------------------------------------------------------------------------- scripts/pr_report.py


def _git(repo: Path, *args: str) -> None:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": os.environ["PATH"], "HOME": str(repo)}
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def _predictions(path: Path, classes: list[str], labels: list[str], seed: int) -> None:
    from headstart.uncertainty import write_predictions

    probs = np.random.default_rng(seed).dirichlet(np.ones(len(classes)), size=len(labels))
    write_predictions(path, [f"images/{i}.png" for i in range(len(labels))], labels, probs, classes)


@pytest.fixture
def pr_module():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import pr_report

    yield pr_report
    sys.path.remove(str(REPO_ROOT / "scripts"))


def test_pr_report_per_class_table_has_a_row_per_shared_class(tmp_path, pr_module):
    from headstart.uncertainty import compare_predictions, parse_predictions

    shared, base_only = list("abcde"), list("xyz")
    labels = [shared[i % 5] for i in range(60)]
    _predictions(tmp_path / "base.csv", shared + base_only, labels, 0)
    _predictions(tmp_path / "head.csv", shared, labels, 1)
    found = compare_predictions(parse_predictions((tmp_path / "base.csv").read_text(), "base"),
                                parse_predictions((tmp_path / "head.csv").read_text(), "head"), 50, 0)
    assert found.per_class["class"].tolist() == shared


def test_pr_report_non_utf8_predictions_and_missing_dvc_are_one_line(tmp_path, pr_module, monkeypatch, capsys):
    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    labels = ["café", "thé"] * 10
    _predictions(repo / "reports" / "predictions.csv", ["café", "thé"], labels, 0)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    text = (repo / "reports" / "predictions.csv").read_text(encoding="utf-8")
    (repo / "reports" / "predictions.csv").write_bytes(text.encode("latin-1"))
    section = "\n".join(pr_module.paired_section("HEAD", repo, "reports/predictions.csv", 50, 0))
    assert "Not compared: reports/predictions.csv: not UTF-8 text (invalid continuation byte at byte" in section

    only_git = tmp_path / "bin"
    only_git.mkdir()
    (only_git / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(only_git))
    assert pr_module.main(["--base", "HEAD", "--repo", str(repo), "--out", str(tmp_path / "out"), "--no-png"]) == 2
    assert "`dvc` is not on PATH" in capsys.readouterr().err


def test_no_val_split_is_refused_at_split_with_the_reason(tmp_path):
    with pytest.raises(ParamsError, match=r"split: val must be above 0: train_head and finetune pick their best "
                                          r"epoch on the val split"):
        load_params(tmp_path / "absent.yaml", {"split": {"train": 0.8, "val": 0.0, "test": 0.2}})


# --------------------------------------------------------------------------- what a killed run leaves


@pytest.mark.parametrize("stage", ["audit", "evaluate", "export"])
def test_stage_removes_the_stale_temps_a_killed_run_left(tmp_path, stage):
    import importlib

    layout = Layout(tmp_path / "project")
    stale = []
    for output in layout.outputs(stage):
        temp = output.with_name(f".{output.name}.tmp-0123456789abcdef{output.suffix or '.tmp'}")
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text("cut short")
        stale.append(temp)
    an_hour_ago = time.time() - 3700
    for temp in stale:
        os.utime(temp, (an_hour_ago, an_hour_ago))
    with pytest.raises(FileNotFoundError):  # nothing to read in this bare project: the stage stops after cleaning
        importlib.import_module(f"tasks.{stage}").run(load_params(tmp_path / "absent.yaml"), layout)
    assert [temp for temp in stale if temp.exists()] == []


# --------------------------------------------------------------------------- noise


def test_a_stage_prints_no_tensorflow_import_banners(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "train_head", "--root", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 2
    assert "absl::InitializeLog" not in done.stderr and "oneDNN" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("headstart train_head: error: ")


def test_class_names_with_tabs_draw_without_glyph_warnings(tmp_path):
    import warnings

    from headstart.reporting import plot_confusion

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib: "Glyph 9 (\t) missing from font(s) DejaVu Sans."
        plot_confusion(np.array([[3, 1], [0, 4]]), ["tab\tseparated", "plain"], tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 1000


@pytest.mark.slow  # trains six heads
def test_out_of_fold_heads_do_not_warn_of_tf_function_retracing(fashion_arrays, caplog):
    from headstart.audit import out_of_fold_probabilities
    from headstart.params import TrainHeadParams

    images, labels = fashion_arrays
    keep = np.flatnonzero(labels < 3)[:150]
    features = images[keep].reshape(len(keep), -1).astype(np.float32) / 255.0  # real pixels as features
    with caplog.at_level(logging.WARNING):
        probs, folds = out_of_fold_probabilities(features, labels[keep].astype(np.int64), ["a", "b", "c"],
                                                 TrainHeadParams(), folds=6, epochs=1, seed=0)
    assert folds == 6 and not np.isnan(probs).any()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert "retracing" not in caplog.text


@pytest.mark.parametrize("entry, named", [
    ({"kind": "idx"}, "broken.version"),                               # no version: its fingerprint needs one
    ({"version": 1, "kind": "zip"}, "broken.kind"),                     # a kind the download stage has no reader for
    ({"version": 1, "kind": "archive", "urll": "https://x"}, "broken.urll"),  # a typo is not silently ignored
])
def test_a_bad_preset_entry_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: dict, named: str) -> None:
    """presets.yaml is read through a pydantic model, like params: a bad entry is one line naming the key."""
    import yaml

    from headstart.data.sources import presets

    broken = tmp_path / "presets.yaml"
    broken.write_text(yaml.safe_dump({**yaml.safe_load(presets.PRESETS_FILE.read_text()), "broken": entry}))
    monkeypatch.setattr(presets, "PRESETS_FILE", broken)
    presets._read_presets.cache_clear()
    try:
        with pytest.raises(presets.PresetError, match=rf"{broken}: {named}: "):
            presets.load_presets()
    finally:
        presets._read_presets.cache_clear()
