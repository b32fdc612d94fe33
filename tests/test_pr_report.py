"""scripts/pr_report.py in a real DVC repo with two commits whose metrics differ.

The repo's one stage fits a logistic regression on real Fashion-MNIST pixels with a regularisation
strength from params.yaml, logging per-iteration accuracy (a linear plot) and a confusion plot, and
writes per-image test predictions in the evaluate stage's format. `train.drop_class` leaves one class
out of training, so the second commit really loses it: the paired section must flag it.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from headstart.datadiff import diff_data, write_diff
from headstart.layout import Layout
from tests.conftest import FASHION_CLASSES, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import pr_report  # noqa: E402

pytestmark = pytest.mark.slow  # runs dvc repro in a real repo

BIN = Path(sys.executable).parent
TRAIN = '''
import json, warnings
import numpy as np, yaml
from sklearn.linear_model import LogisticRegression
from pathlib import Path
from sklearn.metrics import confusion_matrix
from headstart.uncertainty import write_predictions
warnings.simplefilter("ignore")
params = yaml.safe_load(open("params.yaml"))["train"]
data = np.load("data.npz")
x, y = data["x"] / 255.0, data["y"]
train = np.flatnonzero((np.arange(len(y)) < 600) & (y != params["drop_class"]))
curve = []
for steps in (1, 2, 4, 8):
    model = LogisticRegression(C=params["C"], max_iter=steps).fit(x[train], y[train])
    curve.append({"step": steps, "accuracy": float(model.score(x[600:], y[600:]))})
json.dump({"accuracy": curve[-1]["accuracy"]}, open("metrics.json", "w"))
json.dump(curve, open("curve.json", "w"))
pred = model.predict(x[600:])
json.dump([{"actual": int(a), "predicted": int(p)} for a, p in zip(y[600:], pred)], open("confusion.json", "w"))
recall = [{"class": f"class-{c}", "recall": float((pred[y[600:] == c] == c).mean())} for c in np.unique(y[600:])]
json.dump(recall, open("per_class.json", "w"))
probs = np.zeros((len(y) - 600, len(CLASSES)))
probs[:, model.classes_] = model.predict_proba(x[600:])  # a class left out of training gets probability 0
write_predictions(Path("reports/predictions.csv"), [f"images/{i:04d}.png" for i in range(600, len(y))],
                  [CLASSES[c] for c in y[600:]], probs, CLASSES)
'''.replace("CLASSES", repr(list(FASHION_CLASSES)))
DVC_YAML = {"stages": {"train": {
    "cmd": f"{sys.executable} train.py", "deps": ["train.py", "data.npz"], "params": ["train.C"],
    "outs": [{"reports/predictions.csv": {"cache": False}}], "metrics": [{"metrics.json": {"cache": False}}],
    "plots": [{"curve.json": {"x": "step", "y": "accuracy", "cache": False}},
              {"confusion.json": {"template": "confusion", "x": "predicted", "y": "actual", "cache": False}},
              {"per_class.json": {"template": "bar_horizontal", "x": "recall", "y": "class", "cache": False}}],
}}}


def _run(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO_ROOT),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _commit_run(repo: Path, c: float, message: str, drop_class: int | None = None) -> float:
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"C": c, "drop_class": drop_class}}))
    _run(repo, "dvc", "repro")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", message)
    return json.loads((repo / "metrics.json").read_text())["accuracy"]


@pytest.fixture
def repo(tmp_path: Path, fashion_arrays, monkeypatch: pytest.MonkeyPatch) -> Path:
    pictures, labels = fashion_arrays
    repo = tmp_path / "repo"
    repo.mkdir()
    np.savez(repo / "data.npz", x=pictures[:1000].reshape(1000, -1).astype(np.float32), y=labels[:1000])
    (repo / "train.py").write_text(TRAIN)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    _run(repo, "git", "init", "-q")
    _run(repo, "dvc", "init", "-q")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return repo


def _exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value written out: twice the smaller binomial(b + c, 1/2) tail, capped at 1."""
    return min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c))


def test_report_shows_the_param_metric_and_plot_changes(repo: Path) -> None:
    base_accuracy = _commit_run(repo, 0.0001, "base")
    head_accuracy = _commit_run(repo, 1.0, "head", drop_class=FASHION_CLASSES.index("trouser"))
    assert base_accuracy != head_accuracy

    out = repo / "pr-report"
    assert pr_report.main(["--base", "HEAD~1", "--out", str(out), "--repo", str(repo)]) == 0
    report = (out / "report.md").read_text()
    params_rows = [line for line in report.splitlines() if line.startswith("| params.yaml")]
    assert any("train.C" in row and "0.0001" in row and "1.0" in row for row in params_rows)
    assert any("train.drop_class" in row and "1" in row for row in params_rows)
    metrics_row = next(line for line in report.splitlines() if line.startswith("| metrics.json"))
    assert f"{base_accuracy:.5g}"[:5] in metrics_row and f"{head_accuracy:.5g}"[:5] in metrics_row
    html = (out / "plots" / "index.html").read_text()
    assert "curve.json" in html and "HEAD~1" in html
    pngs = sorted(out.glob("plot-*.png"))
    assert len(pngs) == 1  # the curve; the confusion matrix and per-class bars are not series
    assert all(f"]({png.name})" in report for png in pngs)
    assert all(png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for png in pngs)

    base, head = (pd.read_csv(source, dtype=str, keep_default_na=False)
                  for source in (io.StringIO(_run(repo, "git", "show", "HEAD~1:reports/predictions.csv")),
                                 repo / "reports" / "predictions.csv"))
    base_right, head_right = base["predicted"] == base["label"], head["predicted"] == head["label"]
    b, c = int((base_right & ~head_right).sum()), int((~base_right & head_right).sum())
    paired = report.split("### Paired test predictions (`reports/predictions.csv`)")[1]
    assert "400 test images in both." in paired and "Only in" not in paired
    assert f"McNemar's exact test: p = {_exact_mcnemar(b, c):.4g} ({b + c} images changed correctness" in paired
    accuracy_row = next(line for line in paired.splitlines() if line.startswith("| accuracy"))
    cells = [cell.strip() for cell in accuracy_row.strip("|").split("|")]
    change, interval = float(cells[3]), [float(v) for v in cells[4].strip("[]").split(",")]
    assert change == pytest.approx(head_accuracy - base_accuracy, abs=1e-4)
    assert interval[0] < change < interval[1]
    dropped = paired.split("is below 0):")[1].split("<details>")[0]
    flagged = [line.split("|")[1].strip() for line in dropped.splitlines() if line.startswith("| ")][1:]
    assert "trouser" in flagged, paired
    trouser = next(line for line in paired.split("<details>")[1].splitlines() if line.startswith("| trouser "))
    assert [cell.strip() for cell in trouser.strip("|").split("|")][2] == "0.0000"  # never predicted any more


def test_a_base_without_predictions_is_said_and_the_report_goes_on(repo: Path) -> None:
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "before the pipeline ran")
    _commit_run(repo, 1.0, "first run")
    out = repo / "pr-report"
    args = ["--base", "HEAD~1", "--out", str(out), "--repo", str(repo), "--no-png", "--predictions", "reports/predictions.csv"]
    assert pr_report.main(args) == 0
    report = (out / "report.md").read_text()
    assert "`HEAD~1` has no `reports/predictions.csv`, so there is nothing to pair" in report
    assert next(line for line in report.splitlines() if line.startswith("| metrics.json"))  # the diffs still ran
    assert "### Promotion gate\n\nNot run yet: the promote stage writes the data diff" in report

    layout = Layout(repo)  # the promote stage's data diff, as it writes it on a first run
    table = pd.DataFrame({"path": ["data/raw/a/1.png", "data/raw/b/2.png"], "label": ["a", "b"], "sha256": ["0" * 64] * 2})
    write_diff(diff_data(None, table), layout.data_diff_json, layout.data_diff_md)
    assert pr_report.main(args) == 0
    assert "### Data since the champion\n\nNo champion yet" in (out / "report.md").read_text()


def test_an_unknown_base_ref_is_a_clear_error(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _commit_run(repo, 1.0, "only")
    assert pr_report.main(["--base", "no-such-branch", "--out", str(repo / "out"), "--repo", str(repo)]) == 2
    assert "'no-such-branch' is not a commit" in capsys.readouterr().err
