"""Where the first fine-tuning epoch's loss comes from: the warm-started model's loss on the train images at
step 0 (no update), switching on one training-mode difference at a time (issue 18).

Run on a tree prepared through train_head, e.g. by bench/generalisation_bench.py:

    .venv/bin/python bench/finetune_start_bench.py --root /tmp/headstart-generalisation/shirt_tshirt --dataset shirt_tshirt

Each row is the mean label-smoothed cross-entropy (no L2 term) over the train images (val for the first row):
inference mode (the head's view of the features), then dropout, BatchNorm batch statistics, both, and the
flips fit applies. Weights are restored between rows (training mode moves the BatchNorm moving statistics).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import datasets as bench_datasets  # noqa: E402
import keras  # noqa: E402

from headstart.data.datasets import cached_images  # noqa: E402
from headstart.data.manifest import read_split_manifest  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.model import all_layers  # noqa: E402
from headstart.params import load_params  # noqa: E402
from headstart.training import EpochData, assemble, compile_for_finetuning, configure_trainable, image_rows  # noqa: E402
from tasks.cli import parse_override  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--dataset", choices=list(bench_datasets.SETTINGS), required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    settings = {key: parse_override(f"{key}={value}")[1] for key, value in bench_datasets.SETTINGS[args.dataset].items()}
    params = load_params(REPO / "params.yaml", {**settings, **dict(map(parse_override, args.overrides))})
    layout, ft = Layout(args.root), params.finetune
    manifest = read_split_manifest(layout.split_manifest)
    classes = sorted(manifest["label"].unique())
    rows, labels, n_train = image_rows(layout, manifest, classes)
    model, backbone = assemble(params, layout)
    _, blocks = configure_trainable(model, backbone, ft)
    compile_for_finetuning(model, blocks, ft, math.ceil(n_train / ft.batch_size))
    images = cached_images([str(layout.root / p) for p in rows["path"]], list(rows["sha256"]), backbone.image_size,
                           backbone.spec.interpolation, layout.image_cache_dir)
    flipped = EpochData(images, labels, n_train, len(classes), ft)
    plain = EpochData(images, labels, n_train, len(classes),
                      ft.model_copy(update={"augmentation": ft.augmentation.model_copy(update={"flip": "none"})}))
    saved = [w.numpy() for w in model.weights]
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=ft.label_smoothing)
    norms = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    drops = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.Dropout)]

    def mean_loss(batches, training: bool, batch_statistics: bool = True, dropout: bool = True) -> float:
        for weight, value in zip(model.weights, saved, strict=True):
            weight.assign(value)
        trainable = [layer.trainable for layer in norms]
        rates = [layer.rate for layer in drops]
        for layer in norms:
            layer.trainable = layer.trainable and batch_statistics  # non-trainable BatchNorm runs in inference mode
        for layer in drops:
            layer.rate = layer.rate if dropout else 0.0
        total = count = 0.0
        for x, y in batches:
            total += float(loss(y, model(x, training=training))) * len(x)
            count += len(x)
        for layer, was in zip(norms, trainable, strict=True):
            layer.trainable = was
        for layer, rate in zip(drops, rates, strict=True):
            layer.rate = rate
        return total / count

    table = [
        ("val images, inference mode (the warm-started model)", mean_loss(plain.val, False)),
        ("train images, inference mode", mean_loss(plain.train, False)),
        ("+ dropout", mean_loss(plain.train, True, batch_statistics=False)),
        ("+ BatchNorm batch statistics (no dropout)", mean_loss(plain.train, True, dropout=False)),
        ("+ both", mean_loss(plain.train, True)),
        ("+ both + flips (fit's first step)", mean_loss(flipped.train, True)),
    ]
    print("| step 0, no update | loss |\n|---|---|")
    for name, value in table:
        print(f"| {name} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
