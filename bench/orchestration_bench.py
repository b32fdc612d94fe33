"""Unchanged-rerun cost through DVC and through Prefect, and a PR report for a one-param change.

In a temporary git repo holding the project's DVC files, tasks/ and headstart/ (the `quick` preset of
prefect.yaml on the Fashion-MNIST preset): `dvc repro`, then time a second (no-op) `dvc repro`;
run the Prefect flow on the same data root, then time an unchanged rerun (every stage cached).
Then change train_head.learning_rate, reproduce, and write the PR report against the commit.

    python bench/orchestration_bench.py [--report-out docs/pr-report-example.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore")


def sh(repo: Path, *args: str) -> float:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


FLOW = """
import sys, time
from prefect.testing.utilities import prefect_test_harness
from flows.pipeline import pipeline
with prefect_test_harness(server_startup_timeout=180):
    pipeline(root=".")
    started = time.perf_counter()
    statuses = pipeline(root=".")
    print("RERUN", f"{time.perf_counter() - started:.2f}", statuses, file=sys.stderr)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-out", type=Path, default=None, help="copy the PR report Markdown here")
    args = parser.parse_args()
    preset = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == "quick")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        names = subprocess.run(["git", "ls-files", "tasks", "headstart", *FILES], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split()
        for name in names:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        for dotted, value in preset["parameters"]["overrides"].items():
            section, key = dotted.split(".", 1)
            params[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for step in (["git", "init", "-q"], ["git", "add", "-A"],
                     ["git", "-c", "user.name=b", "-c", "user.email=b@example.com", "commit", "-qm", "base"]):
            sh(repo, *step)
        full = sh(repo, "dvc", "repro")
        noop = sh(repo, "dvc", "repro")
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "-c", "user.name=b", "-c", "user.email=b@example.com", "commit", "-qm", "reproduced")
        env = {**os.environ, "PYTHONPATH": str(repo), "PREFECT_HOME": str(repo / ".prefect"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
        flow = subprocess.run([sys.executable, "-c", FLOW], cwd=repo, env=env, capture_output=True, text=True)
        if flow.returncode:
            sys.exit(flow.stderr[-3000:])
        _, seconds, statuses = next(line for line in flow.stderr.splitlines() if line.startswith("RERUN")).split(" ", 2)
        params["train_head"]["learning_rate"] = 0.003
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed = sh(repo, "dvc", "repro")
        sh(repo, sys.executable, str(REPO / "scripts" / "pr_report.py"), "--base", "HEAD", "--out", "pr-report")
        report = (repo / "pr-report" / "report.md").read_text()
        print(f"dvc repro from scratch (quick preset): {full:.1f} s")
        print(f"dvc repro, unchanged (no-op):          {noop:.1f} s")
        print(f"prefect flow, unchanged (all cached):  {seconds} s  {statuses}")
        print(f"dvc repro after train_head.learning_rate change: {changed:.1f} s")
        print(report)
        if args.report_out:
            args.report_out.write_text(report)


if __name__ == "__main__":
    main()
