"""The default run's sample size: more images per class at the same step budget, scored on the same images.

`finetune.epochs: auto` spends a fixed budget of optimizer steps, so fine-tuning costs about the same time
whatever the number of training images: a larger sample shows the model more different images, each fewer
times. For each `--sizes` value the default pipeline (params.yaml, `download.max_images_per_class` set)
runs download -> split -> features -> train_head -> finetune in its own tree. The preset's sample is
ranked by a seeded pixel hash, so a larger sample holds every image of a smaller one, and its test images
(Fashion-MNIST's t10k) stay test images; val is carved from the train part in proportion, so most of a
smaller sample's val images become train images of a larger one. Each fine-tuned model is therefore
scored on the first size's images that its own tree keeps in the same split, paired with the first
size's model on them (McNemar's exact test, paired-bootstrap interval of the accuracy change;
headstart/uncertainty.py), and on its own test split.

    .venv/bin/python bench/sample_size_bench.py [--root /tmp/headstart-sample-size] [--sizes 1000 1500 2000]
        [--write-docs]
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

import keras  # noqa: E402
import pandas as pd  # noqa: E402
from accuracy_bench import run_stages  # noqa: E402
from docs_section import write_section  # noqa: E402

from headstart.data.datasets import image_dataset  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.params import load_params  # noqa: E402
from headstart.reporting import markdown_table  # noqa: E402
from headstart.runtime import describe_device  # noqa: E402
from headstart.uncertainty import compare_predictions, read_predictions, write_predictions  # noqa: E402

SCORED_SPLITS = ("val", "test")  # the first run's images each model is paired on


def prepare(size: int, root: Path) -> Layout:
    """The default pipeline through finetune at `size` images per class (reused when already finished)."""
    params = load_params(REPO / "params.yaml", {"download.max_images_per_class": size})
    layout = Layout(root / str(size))
    if not (layout.finetune_dir / "info.json").exists():
        run_stages(params, layout, ["download", "split", "features", "train_head", "finetune"])
    return layout


def predict_on(layout: Layout, info: dict[str, Any], sets: dict[str, pd.DataFrame], root: Path) -> None:
    """The fine-tuned model's predictions on each set of manifest rows (rows of another tree hold the same
    relative paths), written to root/predictions-<size>-<name>.csv; the model is loaded once."""
    model = keras.saving.load_model(layout.finetune_model, safe_mode=True)
    for name, images in sets.items():
        ds = image_dataset([str(layout.root / p) for p in images["path"]], None, info["image_size"], 64,
                           info["interpolation"])
        write_predictions(root / f"predictions-{layout.root.name}-{name}.csv", list(images["path"]),
                          list(images["label"]), model.predict(ds, verbose=0), info["classes"])


def measure(sizes: list[int], root: Path) -> list[dict[str, Any]]:
    layouts = [prepare(size, root) for size in sizes]
    manifest = pd.read_csv(layouts[0].split_manifest, dtype=str, keep_default_na=False)
    rows = []
    for size, layout in zip(sizes, layouts, strict=True):
        info = json.loads((layout.finetune_dir / "info.json").read_text())
        counts = json.loads(layout.split_summary.read_text())["total"]
        row: dict[str, Any] = {"size": size, "train": counts["train"], "epochs": info["epochs_run"],
                               "finetune_seconds": info["seconds_per_epoch"] * info["epochs_run"],
                               "own_val": {"images": counts["val"], "accuracy": info["best_val_accuracy"]}}
        own = pd.read_csv(layout.split_manifest, dtype=str, keep_default_na=False)
        kept = manifest.merge(own[["path", "split"]], on=["path", "split"])  # the first run's images in the same split
        predict_on(layout, info, {**{s: kept[kept["split"] == s] for s in SCORED_SPLITS},
                                  "own": own[own["split"] == "test"]}, root)
        for name in SCORED_SPLITS:
            paired = compare_predictions(read_predictions(root / f"predictions-{sizes[0]}-{name}.csv"),
                                         read_predictions(root / f"predictions-{size}-{name}.csv"), resamples=1000, seed=0)
            row[name] = {"images": paired.images, "accuracy": paired.head_accuracy,
                         "change": paired.accuracy_change, "p": paired.mcnemar_p}
        frame = read_predictions(root / f"predictions-{size}-own.csv").frame
        row["own_test"] = {"images": len(frame), "accuracy": float((frame["label"] == frame["predicted"]).mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    first = rows[0]["size"]
    shown = pd.DataFrame([{
        "images per class": r["size"], "train images": r["train"], "epochs (step budget 1,100)": r["epochs"],
        "finetune s": f"{r['finetune_seconds']:.0f}",
        **{f"{name} acc ({first}/class images)": f"{r[name]['accuracy']:.4f} ({r[name]['images']})" for name in SCORED_SPLITS},
        **{f"{name} Δ vs {first} [paired 95%], p": (
            "-" if r["size"] == first else
            f"{100 * r[name]['change'][0]:+.2f} [{100 * r[name]['change'][1]:+.2f}, {100 * r[name]['change'][2]:+.2f}], "
            f"{r[name]['p']:.2g}") for name in SCORED_SPLITS},
        **{f"own {name} acc (images)": f"{r[key]['accuracy']:.4f} ({r[key]['images']})"
           for name, key in (("val", "own_val"), ("test", "own_test"))},
    } for r in rows])
    return "\n".join([
        "## The default run's sample size (bench/sample_size_bench.py)",
        "",
        f"`{command}` on {describe_device()}: the default pipeline at each sample size, every model scored on "
        f"the {first}-per-class run's val and test images that the larger sample keeps in the same split, and "
        "paired with that run's model (the test images are Fashion-MNIST's t10k ones and stay; val is carved "
        "from the train part in proportion, so most of the first run's val images are train images of a larger "
        "sample); the last two columns are each run's own val and test splits.",
        "",
        markdown_table(shown),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/headstart-sample-size"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 1500, 2000])
    parser.add_argument("--write-docs", action="store_true", help="update this bench's section of docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    rows = measure(args.sizes, args.root)
    command = " ".join(["python bench/sample_size_bench.py --sizes", *map(str, args.sizes)])
    section = markdown(rows, command)
    print(section, f"\n({time.perf_counter() - started:.0f} s)")
    if args.write_docs:
        write_section("sample-size-bench", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
