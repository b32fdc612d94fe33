"""Pull-request report: how the workspace's params, metrics and plots differ from a base git ref.

Writes OUT/report.md (the Markdown a CI job posts on the pull request: `dvc params diff`,
`dvc metrics diff`, a pointer to the plots, and a paired comparison of the base commit's and the
workspace's per-image test predictions, which tells a real change from noise, then the promote
stage's data diff and gate decision) and
OUT/plots/index.html (`dvc plots diff`), plus a PNG per changed linear plot when matplotlib can
draw it. Run it from the repository root, e.g.

    python scripts/pr_report.py --base origin/main --out pr-report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from headstart.layout import Layout
from headstart.reporting import markdown_table, promotion_sections
from headstart.uncertainty import (
    LEVEL,
    PredictionsError,
    compare_predictions,
    format_interval,
    parse_predictions,
)

NO_CHANGES = "_No changes._"
PREDICTIONS = "reports/predictions.csv"


class ReportError(RuntimeError):
    """A dvc or git command failed; the message carries its output."""


def dvc(*args: str, cwd: Path) -> str:
    try:
        done = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ReportError("`dvc` is not on PATH: activate the project's .venv (or `pip install dvc`) "
                          "and run again") from None
    if done.returncode != 0:
        raise ReportError(f"`dvc {' '.join(args)}` failed in {cwd}:\n{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _ref_exists(ref: str, cwd: Path) -> bool:
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=cwd,
                          capture_output=True, text=True)
    return done.returncode == 0


def _field(spec: Any, channel: str) -> str | None:
    """The data field a vega-lite spec puts on `channel` (x or y), searching nested layers."""
    if isinstance(spec, dict):
        encoding = spec.get("encoding", {}).get(channel)
        if isinstance(encoding, dict) and isinstance(encoding.get("field"), str):
            return encoding["field"]
        children = spec.get("layer", [])
    else:
        children = spec if isinstance(spec, list) else []
    return next((field for child in children if (field := _field(child, channel))), None)


def _series(rows: list[dict[str, Any]], x: str, y: str, revisions: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Each revision's (x, y) points, or {} when the plot is not numeric with one y per x."""
    try:
        series = {rev: sorted((float(r[x]), float(r[y])) for r in rows if r.get("rev") == rev) for rev in revisions}
    except (KeyError, TypeError, ValueError):  # class names on an axis, or a field missing
        return {}
    if any(len({px for px, _ in points}) != len(points) for points in series.values()):
        return {}  # several y per x: a confusion matrix, not a curve
    return series


def plot_pngs(base: str, cwd: Path, out: Path) -> list[Path]:
    """A PNG per plot that is a series (one y per x in each revision), each revision a line.

    Plots that are not numeric series (a confusion matrix, per-class bars) stay in the HTML page only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, Any] = json.loads(dvc("plots", "diff", base, "--json", "--split", cwd=cwd))["data"]
    written: list[Path] = []
    for name, renders in sorted(plots.items()):
        for render in renders:
            x, y = _field(render["content"], "x"), _field(render["content"], "y")
            rows = render.get("anchor_definitions", {}).get("<DVC_METRIC_DATA>", [])
            series = _series(rows, x, y, render["revisions"]) if x and y else {}
            if not series:
                continue
            figure, axes = plt.subplots(figsize=(6, 3.5))
            for rev, points in series.items():
                if points:
                    axes.plot(*zip(*points, strict=True), marker="o", label=rev)
            axes.set(title=name, xlabel=x, ylabel=y)
            axes.legend()
            target = out / f"plot-{len(written):02d}.png"
            figure.savefig(target, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(target)
    return written


def _listed(paths: list[str], limit: int = 5) -> str:
    return ", ".join(f"`{p}`" for p in paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _text(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PredictionsError(f"{origin}: not UTF-8 text ({exc.reason} at byte {exc.start}); rerun "
                               "`headstart evaluate`, which writes it as UTF-8") from None


def paired_section(base: str, cwd: Path, predictions: str, resamples: int, seed: int) -> list[str]:
    """Markdown comparing `base`'s and the workspace's per-image predictions on the test images both have."""
    title = [f"### Paired test predictions (`{predictions}`)", ""]
    shown = subprocess.run(["git", "show", f"{base}:{predictions}"], cwd=cwd, capture_output=True)
    if shown.returncode != 0:
        return [*title, f"`{base}` has no `{predictions}`, so there is nothing to pair; the metrics above "
                "have no paired test."]
    if not (cwd / predictions).exists():
        return [*title, f"The workspace has no `{predictions}`: run `headstart evaluate` (or `dvc repro`)."]
    try:
        found = compare_predictions(parse_predictions(_text(shown.stdout, f"{base}:{predictions}"),
                                                      f"{base}:{predictions}"),
                                    parse_predictions(_text((cwd / predictions).read_bytes(), predictions), predictions),
                                    resamples, seed)
    except PredictionsError as exc:
        return [*title, f"Not compared: {exc}"]
    change, low, high = found.accuracy_change
    level = f"{LEVEL:.0%}"
    lines = [*title, f"{found.images} test images in both."]
    lines += [f"Only in `{base}`: {len(found.only_base)} ({_listed(found.only_base)})."] if found.only_base else []
    lines += [f"Only in the workspace: {len(found.only_head)} ({_listed(found.only_head)})."] if found.only_head else []
    accuracy = pd.DataFrame([{"": "accuracy", base: found.base_accuracy, "workspace": found.head_accuracy,
                              "change": change, f"{level} interval of the change": format_interval(low, high)}])
    discordant = found.base_only_right + found.head_only_right
    lines += ["", markdown_table(accuracy), "",
              f"McNemar's exact test: p = {found.mcnemar_p:.4g} ({discordant} images changed correctness: "
              f"{found.head_only_right} now right, {found.base_only_right} now wrong).",
              "", f"Intervals: paired bootstrap over the shared images ({resamples} resamples, seed {seed})."]
    table = found.per_class.rename(columns={"base_f1": f"F1 {base}", "head_f1": "F1 workspace",
                                            "f1_change": "change", "low": f"{level} low", "high": f"{level} high"})
    dropped = table[table["dropped"]].drop(columns="dropped")
    lines += ["", f"Classes whose F1 dropped by more than the noise (the whole {level} interval of the change "
              "is below 0):", "", markdown_table(dropped) if not dropped.empty else "None."]
    lines += ["", "<details><summary>F1 change of every class</summary>", "",
              markdown_table(table.drop(columns="dropped")), "", "</details>"]
    return lines


def build_report(base: str, cwd: Path, out: Path, png: bool = True, predictions: str = PREDICTIONS,
                 resamples: int = 1000, seed: int = 0) -> Path:
    """Run the three diffs and the paired comparison against `base` and write OUT/report.md; returns its path."""
    if not _ref_exists(base, cwd):
        raise ReportError(f"--base {base!r} is not a commit in {cwd}; fetch it (git fetch origin) or name another ref.")
    out.mkdir(parents=True, exist_ok=True)
    params = dvc("params", "diff", base, "--md", cwd=cwd)
    metrics = dvc("metrics", "diff", base, "--md", cwd=cwd)
    dvc("plots", "diff", base, "--out", str((out / "plots").resolve()), cwd=cwd)
    pngs = plot_pngs(base, cwd, out) if png else []
    lines = [f"## headstart: changes against `{base}`", "", "### Params", "", params or NO_CHANGES, "",
             "### Metrics", "", metrics or NO_CHANGES, "", "### Plots", "",
             "`plots/index.html` (the `dvc plots diff` page) is attached to this run."]
    lines += [f"![{png_path.stem}]({png_path.name})" for png_path in pngs]
    lines += ["", *paired_section(base, cwd, predictions, resamples, seed)]
    lines += ["", *(line.replace("## ", "### ", 1) for line in promotion_sections(Layout(cwd)))]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="origin/main", help="git ref to compare with (default: origin/main)")
    parser.add_argument("--out", default="pr-report", type=Path, help="output folder (default: pr-report)")
    parser.add_argument("--repo", default=".", type=Path, help="repository root (default: .)")
    parser.add_argument("--no-png", action="store_true", help="skip the matplotlib PNGs")
    parser.add_argument("--predictions", default=PREDICTIONS,
                        help=f"per-image predictions to pair, relative to the repository root (default: {PREDICTIONS})")
    parser.add_argument("--resamples", default=1000, type=int, help="paired bootstrap resamples (default: 1000)")
    parser.add_argument("--seed", default=0, type=int, help="paired bootstrap seed (default: 0)")
    args = parser.parse_args(argv)
    if args.resamples < 1:
        parser.error(f"--resamples must be at least 1, got {args.resamples}")
    try:
        report = build_report(args.base, args.repo, args.out, png=not args.no_png, predictions=args.predictions,
                              resamples=args.resamples, seed=args.seed)
    except ReportError as exc:
        print(f"pr_report: error: {exc}", file=sys.stderr)
        return 2
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
