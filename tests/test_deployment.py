"""prefect.yaml end to end: a real `prefect server start`, a process work pool, `prefect deploy`, a
worker, a deployment run on real images, its outputs and artifact, and the nightly cron schedule."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from flows.pipeline import ARTIFACT_KEY
from headstart.layout import Layout
from headstart.params import STAGES, load_params
from tests.conftest import FASHION_CLASSES, REPO_ROOT, write_class_folders
from tests.test_flows import TINY

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
POOL = "headstart-local"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a process and everything it started (each runs in its own session)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class Server:
    def __init__(self, home: Path) -> None:
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            # flow runs import this checkout's tasks/ and headstart/, not an installed copy of the project
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        }
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([str(BIN / "prefect"), *args], cwd=REPO_ROOT, env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def cli(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO_ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, self.api + path, json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def log_tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for process in reversed(self.processes):
            _stop(process)


def _wait(what: str, check, timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "prefect-home")
    try:
        process = server.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(server.port))

        def healthy() -> bool:
            assert process.poll() is None, f"prefect server exited:\n{server.log_tail('server')}"
            try:
                return httpx.get(server.api + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait("the Prefect server", healthy, timeout=180)
        yield server
    finally:
        server.stop()


def _next_cron_0200_utc(after: dt.datetime) -> dt.datetime:
    candidate = after.replace(hour=2, minute=0, second=0, microsecond=0)
    return candidate if candidate > after else candidate + dt.timedelta(days=1)


def test_deploy_run_and_schedule(server: Server, tmp_path: Path, fashion_arrays) -> None:
    started = dt.datetime.now(dt.UTC)
    pictures, labels = fashion_arrays
    images = write_class_folders(tmp_path / "images", pictures[labels < 3], labels[labels < 3], per_class=12)
    root = tmp_path / "run"

    server.cli("work-pool", "create", POOL, "--type", "process")
    server.cli("--no-prompt", "deploy", "--name", "quick", "--name", "nightly", timeout=180)
    worker = server.start("worker", "worker", "start", "--pool", POOL, "--limit", "1")

    quick = server.call("GET", "/deployments/name/headstart-pipeline/quick")
    overrides = {**quick["parameters"]["overrides"], **TINY, "download.source": str(images)}

    def deployment_run() -> str:
        """One run of the quick deployment to completion; its run report (the flow's artifact)."""
        run = server.call("POST", f"/deployments/{quick['id']}/create_flow_run",
                          {"parameters": {"overrides": overrides, "root": str(root)}})

        def finished() -> dict[str, Any] | None:
            assert worker.poll() is None, f"worker exited:\n{server.log_tail('worker')}"
            state = server.call("GET", f"/flow_runs/{run['id']}")["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait("the deployment run", finished, timeout=600, every=2)
        assert state["type"] == "COMPLETED", f"{state}\n{server.log_tail('worker')}"
        artifacts = server.call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        [report] = [a for a in artifacts if a["key"] == ARTIFACT_KEY]
        return report["data"]

    report = deployment_run()
    layout = Layout(root)
    assert (layout.export_dir / "model.keras").exists()
    accuracy = json.loads(layout.metrics_file.read_text())["test"]["accuracy"]
    assert all(re.search(rf"^\| {stage} +\| ran +\|", report, re.MULTILINE) for stage in STAGES)
    assert re.search(rf"^\| test\.accuracy +\| {accuracy:.4f} +\|", report, re.MULTILINE)
    assert json.loads(layout.promotion_json.read_text())["outcome"] == "promoted"
    assert "No champion yet" in report

    # the folder grows by three images of one class: the next run of the same deployment retrains on them
    # and the gate decides against the champion, re-scored on today's test split
    grown = images / FASHION_CLASSES[0]
    extra = pictures[labels == 0][12:15]
    for n, picture in enumerate(extra):
        Image.fromarray(picture).save(grown / f"added-{n}.png")
    report = deployment_run()
    assert re.search(r"^\| download +\| ran +\|", report, re.MULTILINE), report
    assert re.search(r"^\| promote +\| ran +\|", report, re.MULTILINE), report
    diff = json.loads(layout.data_diff_json.read_text())
    assert diff["baseline"] == "v1" and diff["totals"]["added"] == 3 and diff["totals"]["removed"] == 0
    assert diff["per_class"][FASHION_CLASSES[0]]["added"] == 3
    decision = json.loads(layout.promotion_json.read_text())
    assert decision["outcome"] in ("promoted", "kept"), decision
    assert "3 added, 0 removed" in report and "## Promotion gate" in report

    nightly = server.call("GET", "/deployments/name/headstart-pipeline/nightly")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]

    def scheduled() -> list[dict[str, Any]]:
        return server.call("POST", "/flow_runs/filter", {
            "deployments": {"id": {"any_": [nightly["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC",
        })

    upcoming = _wait("scheduled nightly runs", scheduled, timeout=120, every=2)
    first = dt.datetime.fromisoformat(upcoming[0]["expected_start_time"].replace("Z", "+00:00"))
    # the scheduler planned it at some moment between the start and now: the next 02:00 UTC after that
    # moment, which is one of two days only when the test ran across 02:00
    assert first in {_next_cron_0200_utc(started), _next_cron_0200_utc(dt.datetime.now(dt.UTC))}
    assert len(upcoming) > 1


def test_every_preset_is_valid() -> None:
    """Each deployment's overrides pass the same validation a run applies."""
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    names = [d["name"] for d in config["deployments"]]
    assert {"nightly", "quick", "gpu-full"} <= set(names)
    for deployment in config["deployments"]:
        assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
        load_params(REPO_ROOT / "params.yaml", deployment["parameters"]["overrides"])
