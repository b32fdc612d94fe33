"""scripts/pr_report.py in a real DVC repo with two commits whose metrics differ.

The repo's one stage fits a logistic regression on real Fashion-MNIST pixels with a regularisation
strength from params.yaml, logging per-iteration accuracy (a linear plot) and a confusion plot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import pr_report  # noqa: E402

BIN = Path(sys.executable).parent
TRAIN = '''
import json, warnings
import numpy as np, yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
warnings.simplefilter("ignore")
C = yaml.safe_load(open("params.yaml"))["train"]["C"]
data = np.load("data.npz")
x, y = data["x"] / 255.0, data["y"]
curve = []
for steps in (1, 2, 4, 8):
    model = LogisticRegression(C=C, max_iter=steps).fit(x[:300], y[:300])
    curve.append({"step": steps, "accuracy": float(model.score(x[300:], y[300:]))})
json.dump({"accuracy": curve[-1]["accuracy"]}, open("metrics.json", "w"))
json.dump(curve, open("curve.json", "w"))
pred = model.predict(x[300:])
json.dump([{"actual": int(a), "predicted": int(p)} for a, p in zip(y[300:], pred)], open("confusion.json", "w"))
recall = [{"class": f"class-{c}", "recall": float((pred[y[300:] == c] == c).mean())} for c in np.unique(y[300:])]
json.dump(recall, open("per_class.json", "w"))
'''
DVC_YAML = {"stages": {"train": {
    "cmd": f"{sys.executable} train.py", "deps": ["train.py", "data.npz"], "params": ["train.C"],
    "metrics": [{"metrics.json": {"cache": False}}],
    "plots": [{"curve.json": {"x": "step", "y": "accuracy", "cache": False}},
              {"confusion.json": {"template": "confusion", "x": "predicted", "y": "actual", "cache": False}},
              {"per_class.json": {"template": "bar_horizontal", "x": "recall", "y": "class", "cache": False}}],
}}}


def _run(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _commit_run(repo: Path, c: float, message: str) -> float:
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"C": c}}))
    _run(repo, "dvc", "repro")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", message)
    return json.loads((repo / "metrics.json").read_text())["accuracy"]


@pytest.fixture
def repo(tmp_path: Path, fashion_arrays, monkeypatch: pytest.MonkeyPatch) -> Path:
    pictures, labels = fashion_arrays
    repo = tmp_path / "repo"
    repo.mkdir()
    np.savez(repo / "data.npz", x=pictures[:400].reshape(400, -1).astype(np.float32), y=labels[:400])
    (repo / "train.py").write_text(TRAIN)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    _run(repo, "git", "init", "-q")
    _run(repo, "dvc", "init", "-q")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return repo


def test_report_shows_the_param_metric_and_plot_changes(repo: Path) -> None:
    base_accuracy = _commit_run(repo, 0.0001, "base")
    head_accuracy = _commit_run(repo, 1.0, "head")
    assert base_accuracy != head_accuracy

    out = repo / "pr-report"
    assert pr_report.main(["--base", "HEAD~1", "--out", str(out), "--repo", str(repo)]) == 0
    report = (out / "report.md").read_text()
    params_row = next(line for line in report.splitlines() if line.startswith("| params.yaml"))
    assert "train.C" in params_row and "0.0001" in params_row and "1.0" in params_row
    metrics_row = next(line for line in report.splitlines() if line.startswith("| metrics.json"))
    assert f"{base_accuracy:.5g}"[:5] in metrics_row and f"{head_accuracy:.5g}"[:5] in metrics_row
    html = (out / "plots" / "index.html").read_text()
    assert "curve.json" in html and "HEAD~1" in html
    pngs = sorted(out.glob("plot-*.png"))
    assert len(pngs) == 1  # the curve; the confusion matrix and per-class bars are not series
    assert all(f"]({png.name})" in report for png in pngs)
    assert all(png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for png in pngs)


def test_an_unknown_base_ref_is_a_clear_error(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _commit_run(repo, 1.0, "only")
    assert pr_report.main(["--base", "no-such-branch", "--out", str(repo / "out"), "--repo", str(repo)]) == 2
    assert "'no-such-branch' is not a commit" in capsys.readouterr().err
