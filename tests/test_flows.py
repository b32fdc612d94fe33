"""The Prefect flow on real Fashion-MNIST images, against a real (temporary) Prefect server."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.exceptions import ParameterTypeError
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import ARTIFACT_KEY, is_transient, pipeline
from flows.stages import StageDeclarationError, hash_path, read_stage_specs, stage_key
from headstart.data.sources.candidates import DownloadError, TransientDownloadError
from headstart.files import sha256_file
from headstart.layout import Layout
from headstart.params import STAGES, ParamsError, load_params
from tests.conftest import REPO_ROOT, write_class_folders

pytestmark = pytest.mark.slow  # starts a Prefect server and runs stages

FAST = {"download.min_images_per_class": 5}
NO_FILE = "/nonexistent/params.yaml"
"""The flow's defaults (headstart/params.py) keep these tests independent of edits to params.yaml."""


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def images(tmp_path: Path, fashion_arrays) -> Path:
    """3 classes x 12 real Fashion-MNIST images as PNG class folders."""
    pictures, labels = fashion_arrays
    keep = labels < 3
    return write_class_folders(tmp_path / "images", pictures[keep], labels[keep], per_class=12)


def _run(root: Path, overrides: dict[str, Any], **kwargs: Any) -> dict[str, str]:
    return pipeline(overrides={**FAST, **overrides}, root=str(root), params_file=NO_FILE,
                    stages=["download", "split"], **kwargs)


def _tree(root: Path) -> dict[str, str | None]:
    layout = Layout(root)
    return {"raw": hash_path(layout.raw_dir), "split": hash_path(layout.split_manifest)}


def test_rerun_is_cached_and_a_param_change_reruns_only_downstream(tmp_path: Path, images: Path) -> None:
    root = tmp_path / "run"
    source = {"download.source": str(images)}
    assert _run(root, source) == {"download": "ran", "split": "ran"}
    first = _tree(root)
    assert _run(root, source) == {"download": "cached", "split": "cached"}
    assert _tree(root) == first

    reshuffled = {**source, "split.salt": "another-salt"}
    assert _run(root, reshuffled) == {"download": "cached", "split": "ran"}
    assert _tree(root)["raw"] == first["raw"]
    assert _tree(root)["split"] != first["split"]


def test_a_cache_hit_never_leaves_outputs_missing(tmp_path: Path, images: Path) -> None:
    root = tmp_path / "run"
    source = {"download.source": str(images)}
    _run(root, source)
    before = _tree(root)
    Layout(root).split_manifest.unlink()
    assert _run(root, source) == {"download": "cached", "split": "ran"}
    assert _tree(root) == before

    shutil.rmtree(Layout(root).raw_dir)
    assert _run(root, source) == {"download": "ran", "split": "cached"}
    assert _tree(root) == before


def test_a_source_that_grows_reruns_download_and_split_and_a_touch_reruns_nothing(
    tmp_path: Path, images: Path, fashion_arrays
) -> None:
    root, source = tmp_path / "run", {"download.source": str(images)}
    assert _run(root, source) == {"download": "ran", "split": "ran"}
    (images / "trouser" / "00001.png").touch()
    assert _run(root, source) == {"download": "cached", "split": "cached"}

    pictures, _ = fashion_arrays
    Image.fromarray(pictures[1500]).save(images / "trouser" / "added.png")
    assert _run(root, source) == {"download": "ran", "split": "ran"}
    manifest = Layout(root).raw_manifest.read_text()
    assert "data/raw/trouser/added.png" in manifest
    assert _run(root, source) == {"download": "cached", "split": "cached"}


def test_keys_follow_content_not_paths(tmp_path: Path, images: Path) -> None:
    """A copy of the data under another root has the same keys; its own outputs decide what reruns."""
    first, second = tmp_path / "first", tmp_path / "second"
    storage = str(tmp_path / "results")
    _run(first, {"download.source": str(images)}, result_storage=storage)
    shutil.copytree(first / "data", second / "data")
    params = load_params(NO_FILE, {**FAST, "download.source": str(images)})
    specs = read_stage_specs()
    assert stage_key(specs["split"], params, first) == stage_key(specs["split"], params, second)
    assert _run(second, {"download.source": str(images)}, result_storage=storage) == {
        "download": "cached", "split": "cached"}

    (second / "data" / "raw" / "manifest.csv").write_text("path,label\n")
    assert stage_key(specs["split"], params, first) != stage_key(specs["split"], params, second)


def artifacts_of(flow_run_id: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def task_runs_of(flow_run_id: Any) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def test_the_run_publishes_a_markdown_artifact(tmp_path: Path, images: Path) -> None:
    state = pipeline(overrides={**FAST, "download.source": str(images)}, root=str(tmp_path / "run"),
                     params_file=NO_FILE, stages=["download", "split"], return_state=True)
    assert state.is_completed()
    [artifact] = [a for a in artifacts_of(state.state_details.flow_run_id) if a.key == ARTIFACT_KEY]
    assert artifact.type == "markdown"
    assert all(re.search(rf"^\| {stage} +\| ran +\|", artifact.data, re.MULTILINE) for stage in ("download", "split"))
    assert "evaluate stage has not run" in artifact.data


def test_bad_overrides_and_stage_names_fail_with_the_key(tmp_path: Path, images: Path) -> None:
    with pytest.raises(ParamsError, match="split.train"):
        _run(tmp_path / "run", {"download.source": str(images), "split.train": 2})
    with pytest.raises(ValueError, match="'trian_head'"):
        pipeline(root=str(tmp_path / "run"), params_file=NO_FILE, stages=["trian_head"])


class _FlakyArchive(http.server.BaseHTTPRequestHandler):
    """Serves one archive, answering 503 to the first `failures` requests."""

    archive: bytes = b""
    failures = 0
    requests = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).requests += 1
        if type(self).requests <= type(self).failures:
            self.send_error(503, "try later")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.archive)))
        self.end_headers()
        self.wfile.write(self.archive)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def flaky_server(tmp_path: Path, images: Path) -> Iterator[tuple[str, str, type[_FlakyArchive]]]:
    archive = tmp_path / "fashion.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(images, arcname="fashion")
    handler = type("Handler", (_FlakyArchive,), {"archive": archive.read_bytes(), "failures": 2, "requests": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fashion.tar.gz", sha256_file(archive), handler
    finally:
        server.shutdown()
        server.server_close()


def test_download_is_retried_with_backoff_after_transient_failures(tmp_path: Path, flaky_server) -> None:
    url, digest, handler = flaky_server
    overrides = {**FAST, "download.source": url, "download.sha256": digest, "download.retries": 0}
    state = pipeline(overrides=overrides, root=str(tmp_path / "run"), params_file=NO_FILE,
                     stages=["download"], download_retries=3, retry_backoff_s=0.05, return_state=True)
    assert state.is_completed(), state
    assert handler.requests == 3
    assert task_runs_of(state.state_details.flow_run_id)["download"].run_count == 3
    assert (tmp_path / "run" / "data" / "raw" / "manifest.csv").exists()


def test_bad_input_is_not_retried(tmp_path: Path) -> None:
    """The fingerprint task, which runs before download, is the first to meet the missing folder."""
    state = pipeline(overrides={"download.source": str(tmp_path / "no-such-folder")}, root=str(tmp_path / "run"),
                     params_file=NO_FILE, stages=["download"], download_retries=3,
                     retry_backoff_s=30, return_state=True)
    assert state.is_failed()
    runs = task_runs_of(state.state_details.flow_run_id)
    assert "no-such-folder" in runs["fingerprint"].state.message
    assert runs["fingerprint"].run_count == 1 and "download" not in runs


def test_transient_errors_are_told_apart_from_bad_input() -> None:
    assert is_transient(TransientDownloadError("http://x/a.tgz: transfer failed (timed out)"))
    assert not is_transient(DownloadError("a message that says download failed after 5 attempts"))
    assert is_transient(ConnectionResetError("reset by peer"))
    assert not is_transient(DownloadError("download.source 'x': no such preset, folder or file"))
    assert not is_transient(FileNotFoundError("data/raw/manifest.csv"))
    assert not is_transient(ValueError("bad value"))


def test_stage_declarations_come_from_dvc_yaml(tmp_path: Path) -> None:
    specs = read_stage_specs()
    declared = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert specs["split"].deps == tuple(declared["split"]["deps"])
    assert "data/split/summary.json" in specs["split"].outs

    broken = tmp_path / "dvc.yaml"
    broken.write_text(yaml.safe_dump({"stages": {name: declared[name] for name in ("fingerprint", "download")}}))
    with pytest.raises(StageDeclarationError, match="stage 'split' is missing"):
        read_stage_specs(broken)

    declared["split"]["params"] = ["split.no_such_knob"]
    broken.write_text(yaml.safe_dump({"stages": declared}))
    with pytest.raises(StageDeclarationError, match="split.no_such_knob"):
        stage_key(read_stage_specs(broken)["split"], load_params(NO_FILE), tmp_path)


TINY = {**FAST, "features.image_size": 32, "train_head.epochs": 1, "audit.epochs": 1, "finetune.epochs": 1,
        "evaluate.gallery_size": 4, "export.formats": ["keras"], "export.representative_samples": 8}
"""The whole pipeline in about a minute on 2 cores: packaged MobileNetV2 at 32 px, one epoch each."""


def test_whole_pipeline_reruns_only_what_a_param_change_touches(tmp_path: Path, images: Path) -> None:
    root, overrides = tmp_path / "run", {**TINY, "download.source": str(images)}

    def run(extra: dict[str, Any]) -> Any:
        return pipeline(overrides={**overrides, **extra}, root=str(root), params_file=NO_FILE, return_state=True)

    state = run({})
    assert state.result() == dict.fromkeys(STAGES, "ran")
    assert run({}).result() == dict.fromkeys(STAGES, "cached")
    last = run({"train_head.learning_rate": 0.01})
    changed = last.result()
    after = STAGES.index("train_head")
    assert changed == {s: "cached" if i < after else "ran" for i, s in enumerate(STAGES)}

    layout = Layout(root)
    metrics = json.loads(layout.metrics_file.read_text())
    [artifact] = [a for a in artifacts_of(last.state_details.flow_run_id) if a.key == ARTIFACT_KEY]
    accuracy = metrics["test"]["accuracy"]
    assert re.search(rf"^\| test\.accuracy +\| {accuracy:.4f} +\|", artifact.data, re.MULTILINE)
    assert str((layout.reports_dir / "figures" / "confusion_matrix.png").resolve()) in artifact.data
    promotion = json.loads(layout.promotion_json.read_text())  # the gate ran again, against the first champion
    assert promotion["champion_before"] == "v1" and promotion["outcome"] in ("promoted", "kept")
    assert layout.promotion_md.read_text().splitlines()[0] in artifact.data
    assert "## Data since the champion" in artifact.data and "Same images as the data `v1`" in artifact.data


def test_sharded_features_on_two_dask_workers_match_the_single_process_run(tmp_path: Path, images: Path) -> None:
    overrides = {**TINY, "download.source": str(images)}
    stages = ["download", "split", "features"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    pipeline(overrides=overrides, root=str(single), params_file=NO_FILE, stages=stages)
    state = pipeline(overrides=overrides, root=str(sharded), params_file=NO_FILE, stages=stages, feature_shards=3,
                     dask_workers=2, return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="features-shard-")))
    assert {run.name for run in runs if run.state.is_completed()} >= {f"features-shard-{i}" for i in range(3)}

    for split in ("train", "val", "test"):
        with np.load(Layout(single).features_dir / f"{split}.npz") as a, \
                np.load(Layout(sharded).features_dir / f"{split}.npz") as b:
            for column in ("labels", "sha256", "path"):
                assert (a[column] == b[column]).all(), (split, column)
            # Same vectors up to float32 rounding: oneDNN sums in a different order for another batch size
            # or thread count (seen: 2e-6 absolute); a misplaced row would differ by ~0.1.
            np.testing.assert_allclose(a["features"], b["features"], rtol=1e-4, atol=1e-5)


def test_shard_counts_below_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ParameterTypeError, match="feature_shards"):
        pipeline(root=str(tmp_path), params_file=NO_FILE, stages=["features"], feature_shards=0)
