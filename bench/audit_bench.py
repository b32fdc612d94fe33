"""The trust checks on several real datasets: leakage recall and false alarms, planted label flips, calibration.

Per dataset of bench/datasets.py (at its natural `--set` settings) a project tree is built with the
real download, split and features stages on the class folders plus planted copies of some images
(a JPEG q75 re-encode, a 2x bicubic upscale, a crop of 5% off each border, a brightness shift of
+40 levels; each as its own file, so the content-keyed split scatters them):

- leakage recall: of the planted copies whose original landed on the other side of train, the share
  the audit pairs with their original;
- false alarms: the audit rerun on the same features with every planted copy removed (the dataset
  as it came), and the share of its val/test images flagged; the flagged pairs are drawn side by
  side into `<work>/<name>/flagged.png` to be looked at by eye;
- planted flips: 20 train labels changed at random, and the rank of each in the out-of-fold suspect list;
- calibration: train_head on the cached features, then the temperature decision on its val
  probabilities (cross-validated, as evaluate makes it), and test ECE before and after with intervals.

    .venv/bin/python bench/audit_bench.py [--work /tmp/headstart-audit-bench] [--datasets digits faces ...]
        [--write-docs]
"""

from __future__ import annotations

import argparse
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
from datasets import SETTINGS, build, plant_copies  # noqa: E402
from docs_section import write_section  # noqa: E402
from sklearn.metrics import log_loss  # noqa: E402

from headstart.audit import SplitRows, leakage_table, out_of_fold_probabilities, plot_leakage, suspect_table  # noqa: E402
from headstart.calibration import calibrate, ece_intervals, served_probabilities, split_scores  # noqa: E402
from headstart.data.artifacts import load_split, load_split_paths, read_features_info  # noqa: E402
from headstart.layout import Layout  # noqa: E402
from headstart.params import Params, load_params  # noqa: E402
from headstart.reporting import markdown_table  # noqa: E402
from headstart.uncertainty import format_interval  # noqa: E402
from tasks import download, features, split, train_head  # noqa: E402

HEADER = """## Trust checks on five datasets (bench/audit_bench.py)

`python bench/audit_bench.py --write-docs` on this 2-core CPU: `default` is the default run's data
(Fashion-MNIST, 1,000 per class, 96 px, params.yaml as committed, no plants); the others are the
bench/datasets.py sets at their natural settings, with copies planted (a JPEG q75 re-encode, a 2x
bicubic upscale, a 5% crop off each border, +40 brightness; up to 30 of each). "Planted copies found":
of the copies whose original landed on the other side of train, the share the audit pairs with it.
"Flagged without plants": the audit rerun on the same images minus the plants (the data as it came),
val/test images with a train near-duplicate. Seconds: the near-duplicate search (decoding the images
to 24-px grayscale, the references, the search), the out-of-fold search, the calibration decision.

"""
FOOTER = """Calibration is decided on the head's probabilities (train_head on the cached features, seconds),
not on a fine-tuned model: fine-tuning five datasets is too slow for this shared machine. The test
columns show what the decision did on images it never saw. "test log loss at the fitted T" is what
serving the fitted T would have given.
"""

DEFAULT = "default"  # the default run's data and params.yaml as committed, without plants


def bench_params(name: str, work: Path) -> Params:
    """params.yaml with the dataset's natural settings, reading the planted source under `work/name`."""
    if name == DEFAULT:
        return load_params(REPO / "params.yaml")
    return load_params(REPO / "params.yaml", {"download.source": str(work / name / "source"), **SETTINGS[name]})


def prepare(name: str, work: Path) -> tuple[Params, Layout, pd.DataFrame]:
    """The dataset's tree up to the features stage (built once), and its planted copies."""
    root, layout = work / name, Layout(work / name)
    plants_csv = root / "plants.csv"
    if name == DEFAULT and not plants_csv.exists():
        root.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(columns=["copy", "original", "kind"]).to_csv(plants_csv, index=False)
    if not plants_csv.exists():
        source = root / "source"
        if not source.exists():
            build(name, work / "datasets")
            shutil.copytree(work / "datasets" / name, source)
        pd.DataFrame(plant_copies(source)).to_csv(plants_csv, index=False)
    params = bench_params(name, work)
    if not (layout.features_dir / "info.json").exists():
        started = time.perf_counter()
        for stage in (download, split, features):
            stage.run(params, layout)
        logging.info("bench: %s: download, split, features took %.1f s", name, time.perf_counter() - started)
    return params, layout, pd.read_csv(plants_csv)


def _rows(layout: Layout, classes: list[str], dim: int) -> dict[str, SplitRows]:
    rows = {}
    for name in ("train", "val", "test"):
        npz = layout.features_dir / f"{name}.npz"
        vectors, labels = load_split(npz, len(classes), dim)
        rows[name] = SplitRows(name, vectors, labels, np.asarray(load_split_paths(npz)))
    return rows


def _without_plants(rows: SplitRows) -> SplitRows:
    keep = np.array(["/plant-" not in path for path in rows.paths], dtype=bool)
    return SplitRows(rows.name, rows.features[keep], rows.labels[keep], rows.paths[keep])


def leakage(params: Params, layout: Layout, plants: pd.DataFrame, rows: dict[str, SplitRows], classes: list[str],
            out: Path) -> dict[str, Any]:
    """Recall of the planted copies across splits, then the false alarms on the dataset without them."""
    result: dict[str, Any] = {}
    if len(plants):
        started = time.perf_counter()
        found = leakage_table([rows["val"], rows["test"]], rows["train"], classes, layout.root, params.audit)
        result["seconds_planted"] = time.perf_counter() - started
        pairs = {frozenset(pair) for pair in zip(found.table["path"], found.table["train_path"], strict=True)}
        split_of = {path: split for split, r in rows.items() for path in r.paths}
        crossing = []
        for plant in plants.itertuples():
            copy, original = f"data/raw/{plant.copy}", f"data/raw/{plant.original}"
            if (split_of[copy] == "train") != (split_of[original] == "train"):
                crossing.append((plant.kind, frozenset((copy, original)) in pairs))
        found_by_kind = pd.DataFrame(crossing, columns=["kind", "found"]).groupby("kind")["found"]
        result.update(planted=len(crossing), found=int(sum(hit for _, hit in crossing)),
                      by_kind={kind: f"{int(g.sum())}/{len(g)}" for kind, g in found_by_kind})
    clean = {split: _without_plants(r) for split, r in rows.items()}
    started = time.perf_counter()
    found = leakage_table([clean["val"], clean["test"]], clean["train"], classes, layout.root, params.audit)
    result["seconds"] = time.perf_counter() - started
    flagged = found.table.drop_duplicates(["split", "path"])
    queries = len(clean["val"].paths) + len(clean["test"].paths)
    result.update(reference=found.reference, threshold=found.threshold, flagged=len(flagged), queries=queries,
                  pairs=found.table)
    plot_leakage(found.table.head(12), layout.root, out)
    return result


def planted_flips(params: Params, rows: SplitRows, classes: list[str], flips: int) -> tuple[np.ndarray, float]:
    """Ranks in the suspect list of `flips` train images given a random wrong label (1 = most suspect)."""
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(rows.labels), flips, replace=False)
    labels = rows.labels.copy()
    labels[chosen] = (labels[chosen] + rng.integers(1, len(classes), flips)) % len(classes)
    a = params.audit
    started = time.perf_counter()
    probs, _ = out_of_fold_probabilities(rows.features, labels, classes, params.train_head, a.folds, a.epochs, a.seed)
    seconds = time.perf_counter() - started
    suspects = suspect_table(probs, SplitRows(rows.name, rows.features, labels, rows.paths), classes)
    rank = dict(zip(suspects["path"], suspects["rank"], strict=True))
    return np.sort([rank[path] for path in rows.paths[chosen]]), seconds


def calibration(params: Params, layout: Layout, rows: dict[str, SplitRows]) -> dict[str, Any]:
    """train_head on the cached features, then evaluate's temperature decision on the head's probabilities."""
    started = time.perf_counter()
    train_head.run(params, layout)
    head_seconds = time.perf_counter() - started
    head = keras.saving.load_model(layout.head_dir / "head.keras", safe_mode=True)
    probs = {s: head.predict(rows[s].features, batch_size=1024, verbose=0)[None] for s in ("val", "test")}
    labels = {s: rows[s].labels for s in ("val", "test")}
    p = params.evaluate
    started = time.perf_counter()
    record = calibrate(labels, probs, p)
    scores = split_scores(labels["test"], probs["test"], record["temperature"], p.calibration_bins)
    intervals = {scaling: ece_intervals(labels["test"], served_probabilities(probs["test"], t), p.calibration_bins,
                                        p.bootstrap_resamples, p.bootstrap_seed)
                 for scaling, t in (("before", 1.0), ("after", record["temperature"]))}
    seconds = time.perf_counter() - started
    served = served_probabilities(probs["test"], record["temperature"])
    fitted = served_probabilities(probs["test"], record.get("candidate_temperature", 1.0))
    test_log_loss = {name: float(log_loss(labels["test"], p_, labels=range(served.shape[-1])))
                     for name, p_ in (("before", probs["test"][0]), ("after", served), ("fitted", fitted))}
    return {"record": record, "scores": scores, "intervals": intervals, "test_log_loss": test_log_loss,
            "seconds": seconds, "head_seconds": head_seconds, "val": len(labels["val"]), "test": len(labels["test"])}


def _interval(value: float, interval: dict[str, float]) -> str:
    return f"{value:.4f} {format_interval(**interval)}"


def bench(name: str, work: Path, flips: int) -> dict[str, Any]:
    params, layout, plants = prepare(name, work)
    info = read_features_info(layout)
    rows = _rows(layout, info.classes, info.feature_dim)
    found = leakage(params, layout, plants, rows, info.classes, work / name / "flagged.png")
    clean_train = _without_plants(rows["train"])
    ranks, flip_seconds = planted_flips(params, clean_train, info.classes, min(flips, len(clean_train.labels) // 10))
    calibrated = calibration(params, layout, rows)
    logging.info("bench: %s done", name)
    return {"name": name, "train": len(clean_train.labels), "leakage": found, "ranks": ranks,
            "flip_seconds": flip_seconds, "calibration": calibrated}


def tables(results: list[dict[str, Any]]) -> str:
    leak, flips, calib = [], [], []
    for r in results:
        f, c = r["leakage"], r["calibration"]
        leak.append({"dataset": r["name"], "reference by class (2nd-NN pixel similarity, p99.9)": f"{f['reference'].min():.4f} to {f['reference'].max():.4f}",
                     "threshold by class": f"{f['threshold'].min():.4f} to {f['threshold'].max():.4f}",
                     "planted copies found": f"{f['found']}/{f['planted']} ({f['found'] / f['planted']:.0%})"
                     if f.get("planted") else "-",
                     "by kind": ", ".join(f"{k} {v}" for k, v in f.get("by_kind", {}).items()) or "-",
                     "flagged without plants": f"{f['flagged']}/{f['queries']} ({f['flagged'] / f['queries']:.1%})",
                     "seconds": f"{f['seconds']:.1f}"})
        ranks = r["ranks"]
        flips.append({"dataset": r["name"], "train images": r["train"], "flips": len(ranks),
                      "ranks of the flips": ", ".join(map(str, ranks)),
                      "in the top 2x": f"{int((ranks <= 2 * len(ranks)).sum())}/{len(ranks)}",
                      "seconds": f"{r['flip_seconds']:.1f}"})
        rec, s, ci = c["record"], c["scores"], c["intervals"]
        calib.append({"dataset": r["name"], "val/test": f"{c['val']}/{c['test']}",
                      "T fitted": f"{rec.get('candidate_temperature', float('nan')):.3f}",
                      "decision": rec["decision"], "T served": f"{rec['temperature']:.3f}",
                      "held-out val log loss T=1 / T": f"{rec.get('heldout_log_loss_unscaled', float('nan')):.4f} / "
                                                       f"{rec.get('heldout_log_loss_scaled', float('nan')):.4f}",
                      "test log loss T=1 / served / at the fitted T": f"{c['test_log_loss']['before']:.4f} / "
                      f"{c['test_log_loss']['after']:.4f} / {c['test_log_loss']['fitted']:.4f}",
                      "test ECE before": _interval(s["ece_uncalibrated"], ci["before"]["ece"]),
                      "test ECE after": _interval(s["ece"], ci["after"]["ece"]),
                      "equal-mass ECE before / after": f"{s['ece_adaptive_uncalibrated']:.4f} / {s['ece_adaptive']:.4f}",
                      "seconds": f"{c['seconds']:.2f}"})
    return "\n\n".join(markdown_table(pd.DataFrame(t)) for t in (leak, flips, calib))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/headstart-audit-bench"))
    parser.add_argument("--datasets", nargs="+", default=[DEFAULT, "digits", "faces", "coat_pullover", "fashion_100"])
    parser.add_argument("--flips", type=int, default=20)
    parser.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = [bench(name, args.work, args.flips) for name in args.datasets]
    for r in results:
        flagged = r["leakage"]["pairs"]
        print(r["name"], "flagged pairs without plants:")
        print(flagged.head(12).to_string(index=False))
        print(r["name"], "calibration:", r["calibration"]["record"]["reason"])
    text = tables(results)
    print(text)
    if args.write_docs:
        write_section("audit-bench", HEADER + text + "\n\n" + FOOTER)




if __name__ == "__main__":
    main()
