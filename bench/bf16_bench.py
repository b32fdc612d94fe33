"""What bf16 features cost in accuracy: the head trained and scored on OpenVINO f32 features against bf16 ones.

On each bench dataset (bench/datasets.py, at its own settings): download, split, then for f32 and
bf16 in turn the features stage on OpenVINO and train_head, then the head's val and test accuracy on
that precision's features, and the features stage's images/s. The two precisions share the tree and
differ only in the cache namespace, so the same images, split and head recipe meet both.

    .venv/bin/python bench/bf16_bench.py [--datasets fashion_100 coat_pullover digits] [--work DIR] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import datasets  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from docs_section import write_section  # noqa: E402

from headstart.layout import Layout  # noqa: E402


def _headstart(root: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        raise RuntimeError(f"headstart {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stderr


def _accuracy(layout: Layout, split: str) -> float:
    head = keras.saving.load_model(layout.head_dir / "head.keras", compile=False)
    with np.load(layout.features_dir / f"{split}.npz") as data:
        return float((head.predict(data["features"], verbose=0).argmax(1) == data["labels"]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["fashion_100", "coat_pullover", "digits"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/headstart-bf16-bench"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        source = datasets.build(name, args.work / "data")
        layout = Layout(args.work / "projects" / name)
        layout.root.mkdir(parents=True, exist_ok=True)
        sets = [f"--set=download.source={source}", *(f"--set={k}={v}" for k, v in datasets.SETTINGS[name].items())]
        for stage in ("download", "split"):
            _headstart(layout.root, stage, *sets)
        for precision in ("f32", "bf16"):
            err = _headstart(layout.root, "features", *sets, "--set=features.runtime=openvino",
                             f"--set=features.precision={precision}")
            stats = json.loads(err[err.rindex("features: {") + len("features: "):].splitlines()[0])
            _headstart(layout.root, "train_head", *sets)
            rows.append({"dataset": name, "images": sum(stats["rows"].values()), "precision": precision,
                         "head val accuracy": round(_accuracy(layout, "val"), 4),
                         "head test accuracy": round(_accuracy(layout, "test"), 4),
                         "features images/s": stats["images_per_s"]})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False))
    if args.write_docs:
        write_section("bf16", "\n".join([
            "### bf16 features and head accuracy (bench/bf16_bench.py)", "",
            f"`.venv/bin/python bench/bf16_bench.py --datasets {' '.join(args.datasets)} --write-docs`: the head "
            "trained and scored on OpenVINO f32 features, then on bf16 ones (`features.precision: bf16`), same "
            "tree, split and head recipe; images/s of the features stage's compute (conversion included).", "",
            table.to_markdown(index=False), ""]))


if __name__ == "__main__":
    main()
