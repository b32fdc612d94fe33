"""Would a fused training-mode BatchNorm make fine-tuning every layer affordable? (issue 20, item 3)

Keras 3 computes training-mode BatchNormalization unfused on TensorFlow (moments, then arithmetic:
keras-team/keras-core#225). headstart/batchnorm.py can instead run each BatchNormalization layer of the
fine-tuned classifier on TensorFlow's fused kernel (`tf.raw_ops.FusedBatchNormV3`) in training mode, on the
same variables and with Keras' momentum semantics.

First a numerical check: one training-mode forward pass of the whole classifier on a real batch with each
BatchNorm, from the same weights: the outputs and every layer's moving mean and variance must agree to
~1e-5. Then the training step alone (one batch repeated from memory, the classifier compiled as the
finetune stage compiles it, headstart/training.py) for the default recipe (`top_blocks` 14) and for every
layer trainable, with Keras' layer and with the fused one, `--rounds` rounds alternating, median images/s.

    .venv/bin/python bench/fused_batchnorm_bench.py --root /tmp/headstart-runtimes-bench/project [--batches 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from headstart.batchnorm import batch_norm_layers, fuse  # noqa: E402
from headstart.data.datasets import cached_images  # noqa: E402
from headstart.data.manifest import read_split_manifest  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.params import load_params  # noqa: E402
from headstart.runtime import seed_everything  # noqa: E402
from headstart.training import EpochData, assemble, compile_for_finetuning, configure_trainable, image_rows  # noqa: E402


def check(params, layout: Layout, batch: np.ndarray) -> dict[str, float]:
    """Max abs differences, fused against Keras, after one training-mode forward pass from the same weights."""
    plain, _ = assemble(params, layout)
    fused, _ = assemble(params, layout)
    fuse(fused)
    for model in (plain, fused):
        for layer in batch_norm_layers(model):
            layer.trainable = True
    out_plain = plain(batch, training=True).numpy()
    out_fused = fused(batch, training=True).numpy()
    pairs = list(zip(batch_norm_layers(plain), batch_norm_layers(fused), strict=True))
    return {
        "output": float(np.abs(out_plain - out_fused).max()),
        "moving_mean": max(float(np.abs(a.moving_mean.numpy() - b.moving_mean.numpy()).max()) for a, b in pairs),
        "moving_variance": max(float(np.abs(a.moving_variance.numpy() - b.moving_variance.numpy()).max())
                               for a, b in pairs),
        "moving_variance_scale": max(float(np.abs(a.moving_variance.numpy()).max()) for a, _ in pairs),
        "layers": len(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    layout = Layout(args.root)
    raw = load_params(args.root / "params.yaml")
    default = type(raw.finetune)(epochs=1)
    manifest = read_split_manifest(layout.split_manifest)
    classes = sorted(manifest["label"].unique())
    rows, labels, n_train = image_rows(layout, manifest, classes)
    seed_everything(default.seed, default.deterministic)
    params = raw.model_copy(update={"finetune": default})
    _, backbone = assemble(params, layout)
    images = cached_images([str(layout.root / p) for p in rows["path"]], list(rows["sha256"]), backbone.image_size,
                           backbone.spec.interpolation, layout.image_cache_dir)
    data = EpochData(images, labels, n_train, len(classes), default)
    x, y = next(iter(data.train))
    found = check(params, layout, x.numpy())
    print(f"parity after one training-mode pass over {found['layers']} BatchNorm layers: output {found['output']:.1e}, "
          f"moving mean {found['moving_mean']:.1e}, moving variance {found['moving_variance']:.1e} "
          f"(largest moving variance {found['moving_variance_scale']:.1f})", flush=True)

    repeated = tf.data.Dataset.from_tensors((x, y)).repeat(args.batches)
    steps = {}
    for blocks in (default.top_blocks, "all"):
        for kind in ("keras", "fused"):
            ft = type(raw.finetune)(epochs=1, top_blocks=blocks)
            run_params = raw.model_copy(update={"finetune": ft})
            model, backbone = assemble(run_params, layout)
            if kind == "fused":
                fuse(model)
            _, trained = configure_trainable(model, backbone, ft)
            compile_for_finetuning(model, trained, ft, args.batches)
            model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(2), epochs=1, verbose=0)  # trace
            steps[(str(blocks), kind)] = model
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for round_ in range(args.rounds):
        order = list(steps) if round_ % 2 == 0 else list(steps)[::-1]
        for key in order:
            start = time.perf_counter()
            steps[key].fit(repeated, epochs=1, verbose=0)
            rates[key].append(args.batches * default.batch_size / (time.perf_counter() - start))
            print(f"round {round_ + 1} top_blocks {key[0]} {key[1]}: {rates[key][-1]:.1f} img/s", flush=True)
    print(f"\n{backbone.spec.name} at {backbone.image_size} px, batch {default.batch_size}, {args.batches} steps a "
          f"measure, median of {args.rounds} rounds, {os.cpu_count()} cores\n")
    print("| trained | BatchNorm | train step images/s | fused / Keras |\n|---|---|---|---|")
    for key, found_rates in rates.items():
        median = statistics.median(found_rates)
        base = statistics.median(rates[(key[0], "keras")])
        label = "every layer" if key[0] == "all" else f"top {key[0]} blocks (default)"
        print(f"| {label} | {key[1]} | {median:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
