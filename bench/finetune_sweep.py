"""Fine-tuning settings compared on one prepared tree: the head is trained once, each setting fine-tunes it.

Prints, per setting, the test accuracy of the kept model, the best epoch and the val loss/accuracy per
epoch (epoch 0 = the head-only model). How the finetune defaults in params.yaml were chosen
(docs/benchmarks.md, "How the fine-tuning defaults were chosen").

    .venv/bin/python bench/finetune_sweep.py --root /tmp/sweep --set download.max_images_per_class=1000 \\
        'finetune.top_blocks=4' 'finetune.optimizer=adam,finetune.learning_rate=1e-5'
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_bench import REPO, run_stages, score_head, score_model  # noqa: E402

from tasks import finetune  # noqa: E402
from tasks.cli import parse_override  # noqa: E402
from tasks.layout import Layout  # noqa: E402
from tasks.params import load_params  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/headstart-sweep"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applies to every setting (data size, head)")
    parser.add_argument("settings", nargs="+", help="comma-separated KEY=VALUE overrides, one argument per setting")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    common = dict(map(parse_override, args.overrides))
    layout = Layout(args.root)
    if not (layout.head_dir / "head.keras").exists():
        run_stages(load_params(REPO / "params.yaml", common), layout, ["download", "split", "features", "train_head"])
    print(f"head: {score_head(layout)}", flush=True)
    for setting in args.settings:
        params = load_params(REPO / "params.yaml", {**common, **dict(map(parse_override, setting.split(",")))})
        started = time.perf_counter()
        info = finetune.run(params, layout)
        history = pd.read_csv(layout.finetune_dir / "history.csv")
        print(f"{setting}: test {score_model(layout)} best epoch {info['best_epoch']} "
              f"val_loss {history['val_loss'].round(3).tolist()} val_accuracy {history['val_accuracy'].round(3).tolist()} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
