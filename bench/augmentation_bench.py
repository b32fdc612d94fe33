"""Augmentation bench: which augmentation should the default recipe ship? (issue 18)

Each candidate runs the generalisation bench's pipeline (bench/generalisation_bench.py) on the same
datasets, the candidate's `--set` overrides on top of each dataset's natural settings. The table gives
what a choice by the data would see (the fine-tune stage's best val loss and val accuracy) beside what it
is for (test accuracy), so a default is kept only if no candidate beats it on val loss by more than noise.

    .venv/bin/python bench/augmentation_bench.py [--root /tmp/headstart-augmentation]
        [--datasets coat_pullover_1000 sklearn_digits fashion_100] [--write-docs]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import datasets as bench_datasets  # noqa: E402
import pandas as pd  # noqa: E402
from docs_section import write_section  # noqa: E402
from generalisation_bench import read_result, run_dataset  # noqa: E402

from headstart.layout import Layout  # noqa: E402
from headstart.reporting import markdown_table  # noqa: E402
from headstart.runtime import describe_device  # noqa: E402

CANDIDATES: dict[str, dict[str, Any]] = {
    "shipped (flip, or none where the dataset has a handedness)": {},
    "shipped + resized crops 0.35": {"finetune.augmentation.crop_area": 0.35},
    "shipped + random erasing 0.5": {"finetune.augmentation.erasing": 0.5},
}
DATASETS = ("coat_pullover_1000", "sklearn_digits", "fashion_100")


def result(root: Path, candidate: str, dataset: str) -> dict[str, Any]:
    """One finished run (run now unless its project already holds the fine-tuned model and metrics)."""
    folder = root / slug(candidate)
    layout = Layout(folder / dataset)
    if not (layout.metrics_file.exists() and (layout.finetune_dir / "info.json").exists()):
        run_dataset(dataset, folder, CANDIDATES[candidate])
    found = read_result(dataset, bench_datasets.SETTINGS[dataset], layout, {})
    return {"dataset": dataset, "candidate": candidate, "val_loss": found["best_val_loss"],
            "val_accuracy": found["val"]["finetune"], "test_accuracy": found["final"],
            "test_images": found["gain"]["images"]}

def slug(candidate: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in candidate)


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    table = pd.DataFrame(rows)
    chosen = table.loc[table.groupby("dataset")["val_loss"].idxmin()].set_index("dataset")["candidate"]
    shown = pd.DataFrame([{
        "dataset": r["dataset"], "augmentation": r["candidate"], "test images": r["test_images"],
        "best val loss": f"{r['val_loss']:.4f}", "val accuracy": f"{r['val_accuracy']:.4f}",
        "test accuracy": f"{r['test_accuracy']:.4f}",
        "lowest val loss": "yes" if chosen[r["dataset"]] == r["candidate"] else "",
    } for r in rows])
    wins = {c: int((chosen == c).sum()) for c in dict.fromkeys(table["candidate"])}
    return "\n".join([
        "## Augmentation: the default chosen by a table (bench/augmentation_bench.py)",
        "",
        f"`{command}` on {describe_device()}: each candidate on each dataset through every stage with the "
        "shipped params.yaml and the dataset's natural settings (bench/datasets.py); val loss is the fine-tune "
        "stage's best epoch (label smoothing 0.1 included), the quantity a choice by the data would compare.",
        "",
        markdown_table(shown),
        "",
        "Lowest val loss: " + ", ".join(f"{c} on {n} of {len(chosen)}" for c, n in wins.items()) + ".",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/headstart-augmentation"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(bench_datasets.BUILDERS))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--write-docs", action="store_true", help="update this bench's section of docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    rows = [result(args.root, candidate, dataset) for dataset in args.datasets for candidate in args.candidates]
    section = markdown(rows, "python bench/augmentation_bench.py")
    print(section)
    if args.write_docs:
        write_section("augmentation-bench", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
