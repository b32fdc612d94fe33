"""What a nightly rerun costs against a full run: 1% more images, and nothing changed.

In a temporary git repo holding the project (the default params.yaml: the Fashion-MNIST preset's
1,000 images per class), side by side in one run:
1. `dvc repro` from nothing (the full run);
2. `dvc repro` again with nothing changed (only the always-changed fingerprint stage runs);
3. `dvc repro` after `download.max_images_per_class` grows from 1,000 to 1,010 (1% more images: the
   preset's sample is ranked by a seeded hash of the pixels, so the 1,000 stay and 10 per class join).
Each row gives the wall time, its ratio to the full run, the stages DVC ran, and how many feature
vectors were computed rather than read from the content-addressed feature cache.

    python bench/retrain_bench.py [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from docs_section import write_section
from lineage_bench import project_repo, sh

from headstart.reporting import markdown_table

GROWN = 1010


def reproduce(repo: Path, label: str, full: float | None) -> dict[str, object]:
    log = repo / (re.sub(r"\W+", "-", label).strip("-") + ".log")
    seconds = sh(repo, "bash", "-c", f"dvc repro > '{log.name}' 2>&1")
    text = log.read_text(errors="replace")
    ran = re.findall(r"Running stage '([^']+)'", text)
    computed = re.findall(r"features: {\"computed\": (\d+)", text)
    return {"run": label, "seconds": round(seconds, 1), "x full": round(seconds / (full or seconds), 3),
            "stages run": ", ".join(ran) or "none", "features computed": int(computed[-1]) if computed else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = project_repo(Path(tmp), "fashion_mnist")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["download"]["max_images_per_class"] = 1000  # auto's demo sample, spelled out so it can grow
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rows = [reproduce(repo, "full run (nothing cached)", None)]
        full = float(rows[0]["seconds"])
        rows.append(reproduce(repo, "unchanged", full))
        params["download"]["max_images_per_class"] = GROWN
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rows.append(reproduce(repo, f"1% more images ({GROWN} per class)", full))
        decision = json.loads((repo / "reports" / "promotion.json").read_text())
        diff = json.loads((repo / "reports" / "data_diff.json").read_text())
    table = markdown_table(pd.DataFrame(rows))
    print(table)
    print(f"\ndata diff: {diff['totals']}; gate: {decision['outcome']} ({decision['reason']})")
    if args.write_docs:
        write_section("Retraining: a nightly rerun against a full run", "\n".join([
            "`python bench/retrain_bench.py --write-docs`: the default run in a temporary git repo, then an",
            "unchanged `dvc repro`, then one with 1% more images (`download.max_images_per_class` 1,000 -> 1,010).",
            "", table, "",
            f"Data diff of the grown run: {diff['totals']['added']} added, {diff['totals']['removed']} removed; "
            f"gate: {decision['outcome']} ({decision['reason']}).",
        ]))


if __name__ == "__main__":
    sys.exit(main())
