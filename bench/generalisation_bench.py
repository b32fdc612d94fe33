"""Generalisation bench: does fine-tuning pay on data unlike the default Fashion-MNIST demo? (issue 18)

For each real dataset of bench/datasets.py, at the `--set` settings it runs at naturally, the pipeline's
own stage functions run download -> split -> features -> train_head -> finetune -> evaluate with the
shipped params.yaml, and evaluate's paired comparison (head on cached features against the final model,
same test images) gives the change of test accuracy, its paired-bootstrap 95% interval and McNemar's
exact p-value. Fine-tuning should be significantly better than the head (p < 0.05) on most datasets and
significantly worse on none; the recipe's defaults are tuned by this table.

    .venv/bin/python bench/generalisation_bench.py [--root /tmp/headstart-generalisation] [--datasets digits faces]
        [--set finetune.max_epochs=10] [--write-docs] [--collect ROOT ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import datasets as bench_datasets  # noqa: E402
import pandas as pd  # noqa: E402
from docs_section import write_section  # noqa: E402

from headstart.layout import Layout  # noqa: E402
from headstart.params import load_params  # noqa: E402
from headstart.reporting import markdown_table  # noqa: E402
from headstart.runtime import describe_device  # noqa: E402
from tasks import download, evaluate, features, finetune, split, train_head  # noqa: E402
from tasks.cli import parse_override  # noqa: E402

STAGES = (download, split, features, train_head, finetune, evaluate)
SIGNIFICANT = evaluate.SIGNIFICANT


def run_dataset(name: str, root: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every stage on one dataset in its own project tree; the comparison evaluate wrote, and timings."""
    source = bench_datasets.build(name, root / "sources")
    settings = {key: parse_override(f"{key}={value}")[1] for key, value in bench_datasets.SETTINGS[name].items()}
    params = load_params(REPO / "params.yaml", {"download.source": str(source), **settings, **overrides})
    layout = Layout(root / name)
    seconds: dict[str, float] = {}
    for stage in STAGES:
        started = time.perf_counter()
        stage.run(params, layout)
        seconds[stage.__name__.rsplit(".", 1)[-1]] = time.perf_counter() - started
    return read_result(name, bench_datasets.SETTINGS[name], layout, seconds)


def read_result(name: str, settings: dict[str, str], layout: Layout, seconds: dict[str, float]) -> dict[str, Any]:
    """The comparison evaluate wrote in a finished project, and what fine-tuning recorded."""
    metrics = json.loads(layout.metrics_file.read_text())
    info = json.loads((layout.finetune_dir / "info.json").read_text())
    history = pd.read_csv(layout.finetune_dir / "history.csv")
    return {"dataset": name, "settings": settings, "seconds": seconds,
            "train_images": json.loads(layout.split_summary.read_text())["total"]["train"],
            "head": metrics["head"]["test"]["accuracy"], "final": metrics["test"]["accuracy"],
            "gain": metrics["finetune_gain"], "epochs_run": info["epochs_run"], "best_epoch": info["best_epoch"],
            "fine_tuned": info["fine_tuned"], "val": {"finetune": info["best_val_accuracy"],
                                                       "evaluate": metrics["val"]["accuracy"]},
            "best_val_loss": info["best_val_loss"],
            "first_epoch_loss": float(history.loc[1, "loss"]) if len(history) > 1 else None,
            "initial_val_loss": float(history.loc[0, "val_loss"])}


def verdict(gain: dict[str, Any]) -> str:
    if gain["p_value"] >= SIGNIFICANT:
        return "within noise"
    return "better" if gain["delta"] > 0 else "WORSE"


def markdown(results: list[dict[str, Any]], command: str) -> str:
    rows = [{
        "dataset": r["dataset"], "settings": ", ".join(f"{k}={v}" for k, v in r["settings"].items()),
        "train images": r["train_images"], "test images": r["gain"]["images"], "head": f"{r['head']:.4f}", "final": f"{r['final']:.4f}",
        "Δ (points)": f"{100 * r['gain']['delta']:+.2f}",
        "paired 95% interval": f"{100 * r['gain']['low']:+.2f} to {100 * r['gain']['high']:+.2f}",
        "McNemar p": f"{r['gain']['p_value']:.3g}", "verdict": verdict(r["gain"]),
        "epochs (best)": f"{r['epochs_run']} ({r['best_epoch']})",
        "epoch-1 train loss / start val loss": (f"{r['first_epoch_loss']:.3f} / {r['initial_val_loss']:.3f}"
                                                if r["first_epoch_loss"] is not None else "-"),
        "val acc finetune = evaluate": f"{r['val']['finetune']:.4f} = {r['val']['evaluate']:.4f}",
        "wall time": f"{sum(r['seconds'].values()) / 60:.1f} min" if r["seconds"] else "see `make run`",
    } for r in results]
    better = sum(verdict(r["gain"]) == "better" for r in results)
    worse = sum(verdict(r["gain"]) == "WORSE" for r in results)
    return "\n".join([
        "## Generalisation: does fine-tuning pay beyond the demo? (bench/generalisation_bench.py)",
        "",
        f"`{command}` on {describe_device()} (shared with other jobs: wall times are loaded, not clean); the "
        "shipped params.yaml at each dataset's natural settings (bench/datasets.py), every stage run by its own "
        "function. Δ is the final model's test accuracy minus the head's (cached features) on the same test "
        "images, with evaluate's paired-bootstrap interval and McNemar's exact test (metrics.json `finetune_gain`).",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
        f"Fine-tuning is significantly better than the head (p < {SIGNIFICANT}) on {better} of {len(results)} "
        f"datasets and significantly worse on {worse}.",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/headstart-generalisation"))
    parser.add_argument("--datasets", nargs="+", default=list(bench_datasets.BUILDERS), choices=list(bench_datasets.BUILDERS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--default-run", type=Path, metavar="PROJECT",
                        help="add the row of a finished `make run` of the default dataset in PROJECT (e.g. .)")
    parser.add_argument("--write-docs", action="store_true", help="update this bench's section of docs/benchmarks.md")
    parser.add_argument("--collect", type=Path, nargs="+", metavar="ROOT",
                        help="run nothing: tabulate the results.json of earlier runs (e.g. datasets run in parallel)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = dict(map(parse_override, args.overrides))
    results = [r for root in args.collect for r in json.loads((root / "results.json").read_text())] if args.collect else []
    for name in [] if args.collect else args.datasets:
        results.append(run_dataset(name, args.root, overrides))
        args.root.mkdir(parents=True, exist_ok=True)
        (args.root / "results.json").write_text(json.dumps(results, indent=2))
        logging.info("bench: %s", json.dumps(results[-1]))
    if args.default_run:
        results.insert(0, read_result("default run (`make run`)", {"params.yaml": "as shipped"},
                                      Layout(args.default_run), {}))  # its wall time is make run's
    command = " ".join(["python bench/generalisation_bench.py", *(f"--set {o}" for o in args.overrides)])
    section = markdown(results, command)
    print(section)
    if args.write_docs:
        write_section("generalisation-bench", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
