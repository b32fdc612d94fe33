"""Accuracy, size and CPU latency of every exported format, side by side.

Runs each format through `headstart.serving.load_predictor` (what `headstart predict` uses) on the
project's test split and on a real photo, and prints a Markdown table with ratios to `.keras`.

    .venv/bin/python bench/predict_bench.py --root . [--repeats 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from headstart.data.images import load_rgb  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.serving import FILES, Predictor, load_predictor  # noqa: E402

PHOTO = Path("/usr/share/darknet/data/dog.jpg")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _median_ms(predictor: Predictor, images: list[np.ndarray], repeats: int) -> float:
    for _ in range(3):  # warm up: tracing, interpreter allocation
        predictor.predict(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict(images)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", type=Path)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    layout = Layout(args.root)
    classes = (layout.export_dir / "labels.txt").read_text().split()
    manifest = pd.read_csv(layout.split_manifest)
    test = manifest[manifest["split"] == "test"]
    images = [load_rgb(layout.root / p) for p in test["path"]]
    labels = test["label"].map(classes.index).to_numpy()
    photo = load_rgb(PHOTO)
    print(f"{len(images)} test images ({images[0].shape[1]}x{images[0].shape[0]}), photo {PHOTO.name} "
          f"{photo.shape[1]}x{photo.shape[0]}, {os.cpu_count()} CPU cores, median of {args.repeats} runs\n")

    rows = []
    for fmt, name in FILES.items():
        path = layout.export_dir / name
        if not path.exists():
            continue
        start = time.perf_counter()
        predictor = load_predictor(path)
        load_s = time.perf_counter() - start
        probs = np.concatenate([predictor.predict(images[i : i + args.batch]) for i in range(0, len(images), args.batch)])
        batch = images[: args.batch]
        rows.append({
            "format": fmt,
            "test accuracy": float((probs.argmax(1) == labels).mean()),
            "size MB": _size(path) / 1e6,
            "load s": load_s,
            "1 image ms": _median_ms(predictor, images[:1], args.repeats),
            "1 photo ms": _median_ms(predictor, [photo], args.repeats),
            f"batch {len(batch)} ms/image": _median_ms(predictor, batch, args.repeats) / len(batch),
        })
        print(f"measured {fmt}", flush=True)

    table = pd.DataFrame(rows).set_index("format")
    base = table.loc["keras"] if "keras" in table.index else table.iloc[0]
    for column in ("size MB", "1 image ms", "1 photo ms", table.columns[-1]):
        table[f"{column.rsplit(' ', 1)[0]} vs keras"] = table[column] / base[column]
    print()
    print(table.to_markdown(floatfmt=".3g"))


if __name__ == "__main__":
    main()
