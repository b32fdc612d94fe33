"""What each evaluation and audit addition costs on a finished project, beside what evaluate already spends.

The baseline is the final model's prediction of the val and test images (what evaluate did before the
additions). Each addition is timed with the library call the stage makes: bootstrap intervals (and the
1,000 scikit-learn calls they replace), temperature scaling with ECE and the reliability figure,
the Grad-CAM grid, the near-duplicate search (pixel space) and the out-of-fold suspect search. It then flips a few
train labels at random and reports where the suspect search ranks them.

    .venv/bin/python bench/trust_bench.py --root . [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from docs_section import write_section  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score, recall_score  # noqa: E402

from headstart.audit import SplitRows, leakage_table, out_of_fold_probabilities, suspect_table  # noqa: E402
from headstart.calibration import calibrate, ece_intervals, split_scores, write_reliability  # noqa: E402
from headstart.conversion import runner  # noqa: E402
from headstart.data.artifacts import (  # noqa: E402
    load_model,
    load_split,
    load_split_paths,
    read_features_info,
    read_model_info,
)
from headstart.data.manifest import read_split_manifest  # noqa: E402
from headstart.explain import GradCam, gradcam_examples, plot_gradcam  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.params import Params, load_params  # noqa: E402
from headstart.reporting import most_confident_mistakes  # noqa: E402
from headstart.serving import serving_model  # noqa: E402
from headstart.uncertainty import bootstrap_intervals  # noqa: E402
from tasks.evaluate import predict_images  # noqa: E402


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def _sklearn_bootstrap(labels: np.ndarray, predicted: np.ndarray, resamples: int, seed: int) -> None:
    """The loop the vectorised bootstrap replaces: three scikit-learn calls per resample."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        accuracy_score(labels[index], predicted[index])
        f1_score(labels[index], predicted[index], average="macro", zero_division=0)
        recall_score(labels[index], predicted[index], average=None, zero_division=0)


def _planted_flip_ranks(train: SplitRows, classes: list[str], params: Params, flips: int) -> np.ndarray:
    """Ranks in the suspect list of `flips` train images given a random wrong label (1 = most suspect)."""
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(train.labels), flips, replace=False)
    labels = train.labels.copy()
    labels[chosen] = (labels[chosen] + rng.integers(1, len(classes), flips)) % len(classes)
    a = params.audit
    probs, _ = out_of_fold_probabilities(train.features, labels, classes, params.train_head, a.folds, a.epochs, a.seed)
    suspects = suspect_table(probs, SplitRows(train.name, train.features, labels, train.paths), classes)
    rank = dict(zip(suspects["path"], suspects["rank"], strict=True))
    return np.sort([rank[path] for path in train.paths[chosen]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--flips", type=int, default=20, help="train labels flipped for the suspect-rank check")
    parser.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    args = parser.parse_args()
    root = args.root.resolve()
    params, layout = load_params(root / "params.yaml"), Layout(root)
    p, info, features_info = params.evaluate, read_model_info(layout), read_features_info(layout)
    classes = info.classes
    manifest = read_split_manifest(layout.split_manifest)
    manifest["y"] = manifest["label"].map(classes.index).astype(np.int32)
    frames = {s: manifest[manifest["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    plain = load_model(layout.finetune_model, "finetune")
    rows: list[tuple[str, float]] = []

    run = runner(plain, [None, info.image_size, info.image_size, 3], "tensorflow")
    seconds, probs = _timed(lambda: {s: predict_images(run, layout, frames[s], info, params.features.batch_size)[0]
                                     for s in ("val", "test")})
    rows.append(("baseline: predict val + test with the final model", seconds))
    y = {s: frames[s]["y"].to_numpy() for s in ("val", "test")}
    predicted = probs["test"].argmax(axis=1)

    seconds, _ = _timed(lambda: bootstrap_intervals(y["test"], predicted, len(classes), p.bootstrap_resamples,
                                                    p.bootstrap_seed))
    rows.append((f"bootstrap intervals, test ({p.bootstrap_resamples} resamples, vectorised)", seconds))
    seconds, _ = _timed(lambda: _sklearn_bootstrap(y["test"], predicted, p.bootstrap_resamples, p.bootstrap_seed))
    rows.append((f"  the same as {p.bootstrap_resamples} x 3 scikit-learn calls (not used)", seconds))

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)

        def calibration() -> float:
            temperature = calibrate(y, {s: probs[s][None] for s in y}, p)["temperature"]
            for split in ("val", "test"):
                split_scores(y[split], probs[split][None], temperature, p.calibration_bins)
                ece_intervals(y[split], probs[split], p.calibration_bins, p.bootstrap_resamples, p.bootstrap_seed)
            write_reliability(y["test"], probs["test"][None], temperature, p.calibration_bins, out / "c.csv",
                              out / "reliability.png")
            return temperature

        seconds, _ = _timed(calibration)
        rows.append(("temperature: cross-validated decision on val, ECE val/test with intervals, CSV + figure",
                     seconds))

        def gradcam() -> None:
            model = serving_model(plain, info.image_size, info.interpolation)
            test = frames["test"]
            worst = most_confident_mistakes(test, probs["test"], p.gallery_size)
            examples = gradcam_examples(test, probs["test"], worst, p.gradcam_per_class)
            plot_gradcam(GradCam(model, p.gradcam_layer), examples, classes, root, info.image_size,
                         out / "gradcam.png")

        seconds, _ = _timed(gradcam)
        rows.append((f"Grad-CAM grid ({p.gallery_size} mistakes + {p.gradcam_per_class} per class)", seconds))

    split_rows = {}
    for split in ("train", "val", "test"):
        npz = layout.features_dir / f"{split}.npz"
        features, labels = load_split(npz, len(classes), features_info.feature_dim)
        split_rows[split] = SplitRows(split, features, labels, np.asarray(load_split_paths(npz)))
    a = params.audit
    seconds, found = _timed(lambda: leakage_table([split_rows["val"], split_rows["test"]], split_rows["train"], classes,
                                                  root, a))
    pairs = found.table
    rows.append((f"audit: near-duplicates of {len(split_rows['train'].labels)} train images in val + test", seconds))
    train = split_rows["train"]
    seconds, _ = _timed(lambda: out_of_fold_probabilities(train.features, train.labels, classes, params.train_head,
                                                          a.folds, a.epochs, a.seed))
    rows.append((f"audit: out-of-fold head, {a.folds} folds x {a.epochs} epochs", seconds))
    ranks = _planted_flip_ranks(train, classes, params, args.flips)

    baseline = rows[0][1]
    table = pd.DataFrame({"step": [name for name, _ in rows], "seconds": [round(s, 2) for _, s in rows],
                          "x baseline": [round(s / baseline, 3) for _, s in rows]})
    text = table.to_markdown(index=False)
    print(text)
    images = len(pairs.drop_duplicates(["split", "path"]))
    found = (f"near-duplicates (pixel similarity >= {found.threshold.min():.4f} to {found.threshold.max():.4f} by class): "
             f"{images} val/test images ({len(pairs)} pairs).\n\n"
             f"{args.flips} train labels flipped at random (seed 0): their ranks among the "
             f"{len(train.labels)} train images in the suspect list are {', '.join(map(str, ranks))}; "
             f"{int((ranks <= 2 * args.flips).sum())} of them are in the top {2 * args.flips}.")
    print(found)
    if args.write_docs:
        write_section("trust", "## Evaluation and audit additions (bench/trust_bench.py)\n\n"
                      f"`python bench/trust_bench.py --root . --write-docs` on the default run's project "
                      f"({len(frames['val'])} val, {len(frames['test'])} test, {len(train.labels)} train images, "
                      f"{info.image_size} px); the baseline is what evaluate spent before these additions.\n\n" + text
                      + "\n\n" + found)


if __name__ == "__main__":
    main()
