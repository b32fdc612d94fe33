"""Fine-tuning recipes side by side, on one prepared tree, with the project's own finetune stage on this CPU.

The tree (download -> split -> features -> train_head, default params.yaml) is prepared once; each
recipe then runs `tasks.finetune.run` from the same head and is scored on the test images. Per
recipe: test accuracy of the kept model (epoch 0 = head only, kept when no epoch beats it on val
loss), val loss per epoch, seconds per epoch, training images/s and the achieved GFLOP/s against
this CPU's float32 matmul peak measured in the same run. The default in params.yaml follows from
this table (docs/benchmarks.md, "Fine-tuning recipes").

    .venv/bin/python bench/finetune_bench.py [--root /tmp/headstart-finetune-bench] [--recipes default classic]
        [--set download.max_images_per_class=1000] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
from accuracy_bench import run_stages, score_head, score_model  # noqa: E402
from docs_section import write_section  # noqa: E402

from headstart.data.sources.presets import effective_settings  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.params import Params, load_params  # noqa: E402
from headstart.reporting import markdown_table  # noqa: E402
from headstart.runtime import describe_device  # noqa: E402
from headstart.training import assemble  # noqa: E402
from tasks import finetune  # noqa: E402
from tasks.cli import parse_override  # noqa: E402

OLD_DEFAULT = {"top_blocks": 4, "batch_norm": "frozen", "optimizer": "sgd", "learning_rate": 1e-4,
               "schedule": "constant", "label_smoothing": 0.0, "weight_decay": 0.0, "epochs": 3}
RECIPES: dict[str, dict[str, Any]] = {
    "classic": OLD_DEFAULT,  # the old Keras-guide recipe, the default before this table
    "default": {},  # params.yaml as committed
    "all_layers": {"top_blocks": "all"},
    "all_layers_bn_frozen": {"top_blocks": "all", "batch_norm": "frozen"},
    "bn_frozen": {"batch_norm": "frozen"},
    "discriminative": {"backbone_lr_multiplier": 0.1},
    "gradual": {"unfreeze_epochs": 2},
    "sgd_one_cycle": {"optimizer": "sgd", "learning_rate": 0.01},
    "no_smoothing": {"label_smoothing": 0.0},
    "epochs_8": {"epochs": 8},
    "erasing": {"augmentation.erasing": 0.5},
}


def matmul_peak_gflops(size: int = 2048, repeats: int = 20) -> float:
    """This CPU's float32 peak as TF reaches it: large square matmuls, best of three timings."""
    a = tf.random.uniform((size, size))
    run = tf.function(lambda x: tf.linalg.matmul(x, x))
    run(a).numpy()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            result = run(a)
        result.numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best / 1e9


def _forward_flops(layer: keras.Layer) -> float:
    """Multiply-adds x 2 of one conv/dense layer, from its weight and output shapes."""
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
        height, width = layer.output.shape[1:3]
        return 2.0 * int(np.prod(layer.kernel.shape)) * height * width
    if isinstance(layer, keras.layers.Dense):
        return 2.0 * int(np.prod(layer.kernel.shape))
    return 0.0


def training_gflop_per_image(params: Params, layout: Layout, first_trainable: int) -> float:
    """Forward x3 for trained layers (input and weight gradients), x2 above the cut for frozen ones, x1 below."""
    model, backbone = assemble(params, layout)
    total = 0.0
    for index, layer in enumerate(backbone.base.layers):
        total += _forward_flops(layer) * (3 if index >= first_trainable else 1)
    head = model.get_layer("head")
    total += sum(3 * _forward_flops(layer) for layer in head.layers)
    return total / 1e9


def run_recipe(name: str, overrides: dict[str, Any], common: dict[str, Any], layout: Layout,
               peak: float) -> dict[str, Any]:
    params = load_params(REPO / "params.yaml", {**common, **{f"finetune.{k}": v for k, v in overrides.items()}})
    shutil.rmtree(layout.checkpoint_dir, ignore_errors=True)  # a finished checkpoint would be resumed, not timed
    started = time.perf_counter()
    info = finetune.run(params, layout)
    wall = time.perf_counter() - started
    history = pd.read_csv(layout.finetune_dir / "history.csv")
    rate = info["train_images_per_second"]
    gflop = training_gflop_per_image(params, layout, info["first_trainable_layer"])
    return {
        "recipe": name, "overrides": overrides, **score_model(layout), "best_epoch": info["best_epoch"],
        "val_loss": history["val_loss"].round(4).tolist(), "val_accuracy": history["val_accuracy"].round(4).tolist(),
        "seconds_per_epoch": info["seconds_per_epoch"], "images_per_second": rate,
        "gflops": gflop * rate if rate else None, "peak_share": gflop * rate / peak if rate else None,
        "wall_seconds": wall,
    }


def markdown(rows: list[dict[str, Any]], head: dict[str, float], peak: float, command: str, params: Params) -> str:
    effective = effective_settings(params)
    lines = [
        "## Fine-tuning recipes (bench/finetune_bench.py)",
        "",
        f"`{command}` on {describe_device()}, Keras {keras.__version__}: Fashion-MNIST, "
        f"{effective.max_images_per_class} images per class, {effective.image_size} px, "
        f"{params.features.backbone}; every recipe starts from the same trained head (test accuracy "
        f"{head['accuracy']:.4f}). Recipes are the default params.yaml plus the overrides shown. "
        f"Float32 matmul peak measured in the same run: {peak:.0f} GFLOP/s. GFLOP/s counts the conv and "
        "dense layers: forward x3 where weights train, x2 above the cut, x1 below.",
        "",
        markdown_table(pd.DataFrame([_row(r, head) for r in rows])),
    ]
    return "\n".join(lines)


def _row(r: dict[str, Any], head: dict[str, float]) -> dict[str, Any]:
    return {
        "recipe": r["recipe"],
        "overrides": ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(params.yaml)",
        "test acc": r["accuracy"],
        "gain vs head": f"{100 * (r['accuracy'] - head['accuracy']):+.2f}",
        "best epoch": r["best_epoch"],
        "val loss per epoch (0 = head)": ", ".join(f"{v:.3f}" for v in r["val_loss"]),
        "s/epoch": f"{r['seconds_per_epoch']:.0f}" if r["seconds_per_epoch"] else "-",
        "train img/s": f"{r['images_per_second']:.0f}" if r["images_per_second"] else "-",
        "GFLOP/s (share of peak)": f"{r['gflops']:.0f} ({r['peak_share']:.0%})" if r["gflops"] else "-",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/headstart-finetune-bench"))
    parser.add_argument("--recipes", nargs="+", default=["classic", "default"], choices=sorted(RECIPES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applies to every recipe (data size, head)")
    parser.add_argument("--write-docs", action="store_true", help="update this bench's section of docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    common = dict(map(parse_override, args.overrides))
    params, layout = load_params(REPO / "params.yaml", common), Layout(args.root)
    if not (layout.head_model).exists():
        run_stages(params, layout, ["download", "split", "features", "train_head"])
    head, peak = score_head(layout), matmul_peak_gflops()
    rows = []
    for name in args.recipes:
        rows.append(run_recipe(name, RECIPES[name], common, layout, peak))
        print(json.dumps(rows[-1]), flush=True)
    command = " ".join(["python bench/finetune_bench.py", "--recipes", *args.recipes, *(f"--set {o}" for o in args.overrides)])
    section = markdown(rows, head, peak, command, params)
    print(section)
    (args.root / "finetune_bench.json").write_text(json.dumps({"head": head, "peak": peak, "rows": rows}, indent=2))
    if args.write_docs:
        write_section("finetune-bench", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
