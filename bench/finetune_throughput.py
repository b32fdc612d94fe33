"""Where a fine-tuning epoch's time goes: the input pipeline alone, the training step alone, and the two
together as `model.fit` runs them, in images/s, CPU cores busy, and the share of the machine's measured
matmul peak.

The model, trainable part, compilation and epoch data are built exactly as the finetune stage builds
them (headstart/training.py) on a project tree whose head is trained (e.g. the tree bench/runtimes_bench.py
leaves), with the default recipe (`finetune` section defaults) at that tree's image size. The step alone
trains on one batch taken from the pipeline and repeated from memory; the input alone iterates the
training batches without a model. Each measurement runs `--rounds` times, alternating, median kept.

    .venv/bin/python bench/finetune_throughput.py --root /tmp/headstart-runtimes-bench/project [--batches 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from finetune_bench import matmul_peak_gflops, training_gflop_per_image  # noqa: E402

from headstart.data.datasets import cached_images  # noqa: E402
from headstart.data.manifest import read_split_manifest  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.params import load_params  # noqa: E402
from headstart.runtime import seed_everything  # noqa: E402
from headstart.training import EpochData, assemble, compile_for_finetuning, configure_trainable, image_rows  # noqa: E402


def _timed(work: Callable[[], int]) -> tuple[float, float]:
    """(images/s, CPU cores busy) of `work`, which returns the images it processed."""
    cpu, wall = os.times(), time.perf_counter()
    images = work()
    seconds, after = time.perf_counter() - wall, os.times()
    return images / seconds, (after.user + after.system - cpu.user - cpu.system) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    layout = Layout(args.root)
    raw = load_params(args.root / "params.yaml")
    params = raw.model_copy(update={"finetune": type(raw.finetune)(epochs=1)})  # the default recipe
    ft = params.finetune
    manifest = read_split_manifest(layout.split_manifest)
    classes = sorted(manifest["label"].unique())
    rows, labels, n_train = image_rows(layout, manifest, classes)
    seed_everything(ft.seed, ft.deterministic)  # as the stage runs (op determinism on by default)
    model, backbone = assemble(params, layout)
    described, blocks = configure_trainable(model, backbone, ft)
    compile_for_finetuning(model, blocks, ft, args.batches)
    images = cached_images([str(layout.root / p) for p in rows["path"]], list(rows["sha256"]), backbone.image_size,
                           backbone.spec.interpolation, layout.image_cache_dir)
    data = EpochData(images, labels, n_train, len(classes), ft)
    n = min(args.batches, n_train // ft.batch_size)
    batch = next(iter(data.train))
    repeated = tf.data.Dataset.from_tensors(batch).repeat(n)

    def input_only() -> int:
        return sum(int(x.shape[0]) for x, _ in data.train.take(n))

    def step_only() -> int:
        model.fit(repeated, epochs=1, verbose=0)
        return n * ft.batch_size

    def together() -> int:
        model.fit(data.train.take(n), epochs=1, verbose=0)
        return n * ft.batch_size

    together()  # warm up: tracing the train function
    measures = {"input pipeline alone": input_only, "training step alone": step_only, "model.fit (both)": together}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in measures}
    for _ in range(args.rounds):
        for name, work in measures.items():
            results[name].append(_timed(work))
    peak = matmul_peak_gflops()
    gflop = training_gflop_per_image(params, layout, described["first_trainable_layer"])
    print(f"{backbone.spec.name} at {backbone.image_size} px, top_blocks {ft.top_blocks}, batch {ft.batch_size}, "
          f"{n} batches, {os.cpu_count()} cores; matmul peak {peak:.0f} GFLOP/s; {gflop:.3f} GFLOP per trained image\n")
    print("| measure | images/s | CPU cores busy | GFLOP/s | share of matmul peak |\n|---|---|---|---|---|")
    for name, found in results.items():
        rate, cores = statistics.median(r for r, _ in found), statistics.median(c for _, c in found)
        compute = "" if name.startswith("input") else f"{rate * gflop:.0f} | {100 * rate * gflop / peak:.0f}%"
        print(f"| {name} | {rate:.0f} | {cores:.2f} | {compute or ' | '} |")


if __name__ == "__main__":
    main()
