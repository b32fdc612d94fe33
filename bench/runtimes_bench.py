"""Inference runtimes side by side: the features stage, evaluate and `headstart predict` on TensorFlow,
OpenVINO (f32) and ONNX Runtime, as ratios to TensorFlow, with each runtime's parity.

Two project trees at the default setting (packaged MobileNetV2 at 96 px) on real Fashion-MNIST images:
for the features stage, the default run's data (the fashion_mnist preset's 1,000 images per class,
downloaded and split), or with `--features-per-class N` N train images of each class written as class
folders; for evaluate and predict, one of `--per-class` images per class, trained once (one
fine-tuning epoch: this bench is about inference) and exported as keras, onnx and openvino. Then
`--rounds` rounds, each running every measurement once per runtime in an order that rotates from
round to round, every run a fresh `headstart` process (so imports and model loading count, as they
do for a user): the features stage on an empty feature cache, with the backbone's conversion kept from
an earlier run (as on every run after the first) and without it (`features_cold`: the first run), evaluate
(Grad-CAM off: it runs on TensorFlow whatever the runtime), predict on a folder of 200 test images and on
one image. The
table reports medians. Parity: the largest difference from TensorFlow's output of the same run, as
a fraction of the output's scale (features: the largest feature; probabilities: 1), and top-1
agreement for evaluate and predict.

    .venv/bin/python bench/runtimes_bench.py [--per-class 200] [--features-per-class N] [--rounds 3]
        [--measures features features_cold evaluate predict_200 predict_1] [--work DIR] [--write-docs]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from datasets import FASHION_CLASSES, FASHION_DIR, read_idx, write_folders  # noqa: E402
from docs_section import write_section  # noqa: E402

from headstart.data.manifest import read_split_manifest  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.runtimes import RUNTIMES, available  # noqa: E402
from headstart.uncertainty import PROBABILITY_PREFIX  # noqa: E402

HEADSTART = [sys.executable, "-m", "tasks.cli"]
MEASURES = ("features", "features_cold", "evaluate", "predict_200", "predict_1")


def _source(root: Path, per_class: int) -> Path:
    images = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    return write_folders(root, images[keep], [FASHION_CLASSES[int(labels[i])] for i in keep])


def _headstart(root: Path, *args: str) -> tuple[float, str, str]:
    """Run one `headstart` command in a fresh process; (wall seconds, stdout, stderr)."""
    start = time.perf_counter()
    done = subprocess.run([*HEADSTART, *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"headstart {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout, done.stderr


def _build(work: Path, per_class: int | None, name: str, stages: tuple[str, ...]) -> Layout:
    """A project tree on `per_class` Fashion-MNIST images per class, or on the default run's data (None)."""
    layout = Layout(work / name)
    if (layout.root / ".complete").exists():
        return layout
    layout.root.mkdir(parents=True, exist_ok=True)
    params: dict = {"evaluate": {"gradcam_per_class": 0}}  # the default run's data and settings
    if per_class is not None:
        params |= {"download": {"source": str(_source(work / f"source_{per_class}", per_class))},
                   "features": {"image_size": 96}, "finetune": {"epochs": 1, "top_blocks": 2},
                   "export": {"formats": ["keras", "onnx", "openvino"]}}
    (layout.root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in stages:
        seconds, _, _ = _headstart(layout.root, stage)
        print(f"setup: {name} {stage} {seconds:.0f} s", flush=True)
    (layout.root / ".complete").touch()
    return layout


def _features(layout: Layout, runtime: str, cold: bool = False) -> tuple[float, np.ndarray, float]:
    """The features stage on an empty feature cache; `cold`: without the conversion an earlier run kept."""
    shutil.rmtree(layout.feature_cache_dir, ignore_errors=True)
    if cold:
        shutil.rmtree(layout.conversion_cache_dir, ignore_errors=True)
    seconds, _, err = _headstart(layout.root, "features", "--set", f"features.runtime={runtime}")
    stats = json.loads(err[err.rindex("features: {") + len("features: "):].splitlines()[0])
    with np.load(layout.features_dir / "test.npz") as data:
        return seconds, data["features"], stats["images_per_s"]


def _evaluate(layout: Layout, runtime: str) -> tuple[float, np.ndarray]:
    seconds, _, _ = _headstart(layout.root, "evaluate", "--set", f"evaluate.runtime={runtime}")
    predictions = pd.read_csv(layout.predictions_file)
    return seconds, predictions[[c for c in predictions.columns if c.startswith(PROBABILITY_PREFIX)]].to_numpy()


def _predict(layout: Layout, inputs: list[str], runtime: str) -> tuple[float, np.ndarray]:
    seconds, out, _ = _headstart(layout.root, "predict", *inputs, "--runtime", runtime, "--format", "csv",
                                 "--top-k", "10", "--model", str(layout.export_dir / "model.keras"))
    table = pd.read_csv(io.StringIO(out)).pivot(index="input", columns="label", values="probability")
    return seconds, table.sort_index().to_numpy()


def _parity(output: np.ndarray, reference: np.ndarray, scale: float) -> float:
    return float(np.abs(output - reference).max()) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--features-per-class", type=int, default=None,
                        help="default: the default run's data (fashion_mnist preset, 1,000 per class)")
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=list(MEASURES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/headstart-runtimes-bench"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    runtimes = [r for r in RUNTIMES if available(r)]
    layout = _build(args.work, args.per_class, "project",
                    ("download", "split", "features", "train_head", "finetune", "evaluate", "export"))
    small = _build(args.work, args.features_per_class,
                   "features_default" if args.features_per_class is None else "features_project", ("download", "split"))
    manifest = pd.read_csv(layout.split_manifest)
    test = manifest[manifest["split"] == "test"]
    folder = args.work / "predict_200"
    if not folder.exists():
        folder.mkdir()
        for path in sorted(test["path"])[:200]:
            shutil.copy(layout.root / path, folder / f"{Path(path).parent.name}_{Path(path).name}")
    one = [str(sorted(folder.iterdir())[0])]

    every = {
        "features stage": lambda rt: _features(small, rt),
        "features stage, first run": lambda rt: _features(small, rt, cold=True),
        "evaluate stage": lambda rt: _evaluate(layout, rt),
        "predict, 200 images": lambda rt: _predict(layout, [str(folder)], rt),
        "predict, 1 image": lambda rt: _predict(layout, one, rt),
    }
    measures = {name: every[name] for name, key in zip(every, MEASURES, strict=True) if key in args.measures}
    seconds: dict[tuple[str, str], list[float]] = {}
    rates: dict[str, list[float]] = {}
    worst: dict[tuple[str, str], float] = {}
    agree: dict[tuple[str, str], float] = {}
    for round_ in range(args.rounds):
        order = runtimes[round_ % len(runtimes):] + runtimes[: round_ % len(runtimes)]
        for name, measure in measures.items():
            outputs = {}
            for runtime in order:
                result = measure(runtime)
                seconds.setdefault((name, runtime), []).append(result[0])
                outputs[runtime] = result[1]
                if name.startswith("features"):
                    rates.setdefault((name, runtime), []).append(result[2])
                print(f"round {round_ + 1} {name} {runtime}: {result[0]:.1f} s", flush=True)
            reference = outputs["tensorflow"]
            scale = float(np.abs(reference).max()) if name.startswith("features") else 1.0
            for runtime, output in outputs.items():
                key = (name, runtime)
                worst[key] = max(worst.get(key, 0.0), _parity(output, reference, scale))
                if not name.startswith("features"):
                    agreement = float((output.argmax(1) == reference.argmax(1)).mean())
                    agree[key] = min(agree.get(key, 1.0), agreement)

    rows = []
    for name in measures:
        base = statistics.median(seconds[(name, "tensorflow")])
        for runtime in runtimes:
            median = statistics.median(seconds[(name, runtime)])
            rows.append({
                "measure": name, "runtime": runtime if runtime == "tensorflow" else f"{runtime} f32",
                "median s": round(median, 2), "x TF (faster)": round(base / median, 2),
                "images/s in the stage": round(statistics.median(rates[(name, runtime)])) if name.startswith("features")
                else "",
                "max diff / scale": f"{worst[(name, runtime)]:.1e}",
                "top-1 agreement": "" if name.startswith("features") else f"{agree[(name, runtime)]:.4f}",
            })
    table = pd.DataFrame(rows)
    cores = os.cpu_count()
    features_images = len(read_split_manifest(small.split_manifest))
    evaluated = (f"evaluate on the val + test splits of a {len(manifest)}-image tree ({len(test)} test), "
                 if "evaluate" in args.measures else f"on a {len(manifest)}-image tree ({len(test)} test): ")
    header = (f"features stage on {features_images} Fashion-MNIST images (empty feature cache; the first run "
              f"also without the backbone's conversion on disk), {evaluated}predict on 200 of its test images and on "
              f"one; packaged MobileNetV2 at 96 px, {cores} CPU cores, median of {args.rounds} rounds (runtimes "
              "alternating), every run a fresh `headstart` process")
    print(header + "\n\n" + table.to_markdown(index=False))
    if args.write_docs:
        write_section("runtimes", "\n".join([
            "## Inference runtimes (bench/runtimes_bench.py)", "",
            f"`.venv/bin/python bench/runtimes_bench.py --per-class {args.per_class} "
            + ("" if args.features_per_class is None else f"--features-per-class {args.features_per_class} ")
            + f"--rounds {args.rounds} --measures {' '.join(args.measures)} --write-docs`: " + header + ". Parity is the largest difference from TensorFlow's output in the same "
            "round (features: as a fraction of the largest feature; probabilities: absolute), over all rounds; "
            "top-1 agreement is the lowest over the rounds.", "",
            table.to_markdown(index=False), ""]))


if __name__ == "__main__":
    main()
