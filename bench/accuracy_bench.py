"""Accuracy benchmark: head-only vs fine-tuned test accuracy on Fashion-MNIST, and class weights on imbalance.

Runs the pipeline's own stage functions (download -> split -> features -> train_head -> finetune)
with the default params.yaml (packaged torchvision MobileNetV2, CPU-sized), then scores both
models on the test split: the head on the cached test features, the fine-tuned `.keras` file
(loaded in safe mode) on the test images. A second part drops 90% of the training images of half
the classes and compares class_weight none vs balanced by test macro-F1.

    .venv/bin/python bench/accuracy_bench.py [--root /tmp/headstart-bench] [--set finetune.epochs=4] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import keras  # noqa: E402
from docs_section import DOCS, write_section  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402

from headstart.data.datasets import image_dataset  # noqa: E402
from headstart.data.sources.presets import effective_settings  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.params import Params, load_params  # noqa: E402
from headstart.reporting import markdown_table  # noqa: E402
from headstart.runtime import describe_device  # noqa: E402
from tasks import download, features, finetune, split, train_head  # noqa: E402
from tasks.cli import parse_override  # noqa: E402

STAGES = {"download": download, "split": split, "features": features, "train_head": train_head, "finetune": finetune}
MINORITY_KEEP = 0.1  # fraction of train images kept for the minority classes


def run_stages(params: Params, layout: Layout, names: list[str]) -> dict[str, float]:
    seconds = {}
    for name in names:
        started = time.perf_counter()
        STAGES[name].run(params, layout)
        seconds[name] = time.perf_counter() - started
        logging.info("bench: %s took %.1f s", name, seconds[name])
    return seconds


def _scores(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(labels, predicted)), "macro_f1": float(f1_score(labels, predicted, average="macro"))}


def score_head(layout: Layout) -> dict[str, float]:
    head = keras.saving.load_model(layout.head_model, safe_mode=True)
    with np.load(layout.features_dir / "test.npz") as data:
        return _scores(data["labels"], head.predict(data["features"], batch_size=256, verbose=0).argmax(axis=1))


def score_model(layout: Layout) -> dict[str, float]:
    info = json.loads((layout.finetune_dir / "info.json").read_text())
    model = keras.saving.load_model(layout.finetune_model, safe_mode=True)
    manifest = pd.read_csv(layout.split_manifest, dtype=str, keep_default_na=False)
    test = manifest[manifest["split"] == "test"]
    labels = test["label"].map({c: i for i, c in enumerate(info["classes"])}).to_numpy()
    ds = image_dataset([str(layout.root / p) for p in test["path"]], None, info["image_size"], 64, info["interpolation"])
    return _scores(labels, model.predict(ds, verbose=0).argmax(axis=1))


def _info(layout: Layout) -> tuple[dict[str, Any], dict[str, Any]]:
    return (json.loads((layout.head_dir / "info.json").read_text()),
            json.loads((layout.finetune_dir / "info.json").read_text()))


def balanced_part(params: Params, layout: Layout) -> dict[str, Any]:
    seconds = run_stages(params, layout, list(STAGES))
    head_info, ft_info = _info(layout)
    return {
        "seconds": seconds,
        "head": {**score_head(layout), "val_accuracy": head_info["val_accuracy"], "epochs": head_info["epochs_run"],
                 "seconds_per_epoch": head_info["seconds_per_epoch"]},
        "finetune": {**score_model(layout), "val_accuracy": ft_info["best_val_accuracy"], "epochs": ft_info["epochs_run"],
                     "best_epoch": ft_info["best_epoch"], "seconds_per_epoch": ft_info["seconds_per_epoch"]},
        "train_images": int(np.load(layout.features_dir / "train.npz")["labels"].size),
    }


def make_imbalanced(source: Layout, target: Layout) -> list[str]:
    """A project tree sharing the source's images and caches, whose train split drops most minority images."""
    target.split_dir.mkdir(parents=True, exist_ok=True)
    for shared in ("data/raw", "data/backbone", "data/cache/features"):
        link = target.root / shared
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to((source.root / shared).resolve(), target_is_directory=True)
    manifest = pd.read_csv(source.split_manifest, dtype=str, keep_default_na=False)
    classes = sorted(manifest["label"].unique())
    minority = classes[1::2]
    rng = np.random.default_rng(0)
    drop = (manifest["split"] == "train") & manifest["label"].isin(minority) & (rng.random(len(manifest)) > MINORITY_KEEP)
    manifest[~drop].to_csv(target.split_manifest, index=False)
    return minority


def imbalanced_part(params: Params, source: Layout, root: Path) -> dict[str, Any]:
    layout = Layout(root)
    minority = make_imbalanced(source, layout)
    results: dict[str, Any] = {"minority": minority}
    features.run(params, layout)
    for weighting in ("none", "balanced"):
        weighted = params.model_copy(update={"train_head": params.train_head.model_copy(update={"class_weight": weighting})})
        seconds = run_stages(weighted, layout, ["train_head", "finetune"])
        results[weighting] = {"head": score_head(layout), "finetune": score_model(layout), "seconds": seconds}
    results["train_images"] = int(np.load(layout.features_dir / "train.npz")["labels"].size)
    return results


def markdown(params: Params, balanced: dict[str, Any], imbalanced: dict[str, Any] | None, command: str) -> str:
    head, ft, seconds = balanced["head"], balanced["finetune"], balanced["seconds"]
    p, f, effective = params.finetune, params.features, effective_settings(params)
    lines = [
        "## Accuracy: head-only vs fine-tuned (bench/accuracy_bench.py)",
        "",
        f"`{command}` on {describe_device()}, Keras {keras.__version__}; "
        f"Fashion-MNIST, {effective.max_images_per_class} images per class, {balanced['train_images']} train images, "
        f"split {params.split.train}/{params.split.val}/{params.split.test}; {f.backbone} ({f.weights} weights) at {effective.image_size} px; "
        f"fine-tuning: top {p.top_blocks} blocks, {p.optimizer} lr {p.learning_rate}, {p.epochs} epochs, batch {p.batch_size}.",
        "",
        "| model | test accuracy | test macro-F1 | val accuracy | epochs | s/epoch | stage wall time |",
        "|---|---|---|---|---|---|---|",
        f"| head only (cached features) | {head['accuracy']:.4f} | {head['macro_f1']:.4f} | {head['val_accuracy']:.4f} | "
        f"{head['epochs']} | {head['seconds_per_epoch']:.3f} | {seconds['train_head']:.1f} s |",
        f"| fine-tuned (images) | {ft['accuracy']:.4f} | {ft['macro_f1']:.4f} | {ft['val_accuracy']:.4f} | "
        f"{ft['epochs']} (best {ft['best_epoch']}) | {ft['seconds_per_epoch']:.1f} | {seconds['finetune']:.1f} s |",
        "",
        f"Fine-tuning gain: {100 * (ft['accuracy'] - head['accuracy']):+.2f} points of test accuracy. "
        f"One fine-tuning epoch costs {ft['seconds_per_epoch'] / head['seconds_per_epoch']:.0f}x a head epoch. "
        "Whole pipeline wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
        + f" = {sum(seconds.values()):.0f} s.",
    ]
    if imbalanced is not None:
        lines += [
            "",
            f"Class weights on an imbalanced train split ({imbalanced['train_images']} train images: classes "
            f"{', '.join(imbalanced['minority'])} keep {MINORITY_KEEP:.0%} of theirs; val and test unchanged):",
            "",
            markdown_table(pd.DataFrame([
                {"class_weight": weighting, "head accuracy": r["head"]["accuracy"], "head macro-F1": r["head"]["macro_f1"],
                 "fine-tuned accuracy": r["finetune"]["accuracy"], "fine-tuned macro-F1": r["finetune"]["macro_f1"],
                 "train_head + finetune wall time": f"{sum(r['seconds'].values()):.1f} s"}
                for weighting, r in ((w, imbalanced[w]) for w in ("none", "balanced"))
            ])),
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/headstart-bench"))
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-imbalanced", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help=f"update this bench's section of {DOCS}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    params = load_params(args.params, dict(map(parse_override, args.overrides)))

    balanced = balanced_part(params, Layout(args.root / "balanced"))
    imbalanced = None if args.skip_imbalanced else imbalanced_part(params, Layout(args.root / "balanced"), args.root / "imbalanced")
    command = " ".join(["python bench/accuracy_bench.py", *(f"--set {o}" for o in args.overrides)])
    section = markdown(params, balanced, imbalanced, command)
    print(section)
    (args.root / "results.json").write_text(json.dumps({"balanced": balanced, "imbalanced": imbalanced}, indent=2))
    if args.write_docs:
        write_section("accuracy-bench", section)
    gain = balanced["finetune"]["accuracy"] - balanced["head"]["accuracy"]
    if gain <= 0:
        print(f"FAIL: fine-tuned test accuracy does not beat head-only ({gain:+.4f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
