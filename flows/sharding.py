"""Scale-out of the features stage: N Prefect tasks, one per shard of the split manifest, under a
Dask task runner.

Each shard task runs the ordinary `tasks.features.run` on its own subset of the manifest, which
fills the shared content-addressed feature cache (concurrent writers are safe: every shard file has
a unique name). The merge is then the ordinary features stage over the whole manifest: every vector
is already cached, so it computes nothing and writes the per-split arrays in manifest order. The
result therefore does not depend on how the images were divided or which worker finished first.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task, unmapped
from prefect_dask import DaskTaskRunner

from headstart.files import atomic_path
from headstart.layout import Layout
from headstart.params import Params
from tasks import features


class ShardingError(RuntimeError):
    """The merge had to compute vectors the shards should have cached."""


@dataclass(frozen=True)
class ShardLayout(Layout):
    """The run's layout (images, backbone, feature cache) but one shard's manifest and scratch outputs."""

    shard_dir: Path = Path("shard")

    @property
    def split_manifest(self) -> Path:
        return self.shard_dir / "manifest.csv"

    @property
    def features_dir(self) -> Path:
        return self.shard_dir / "features"


def shard_manifests(layout: Layout, shards: int) -> list[Path]:
    """Split the manifest by image content (sorted sha256, contiguous runs) into at most `shards` files."""
    manifest = pd.read_csv(layout.split_manifest, dtype=str, keep_default_na=False)
    groups = [g for g in np.array_split(np.array(sorted(set(manifest["sha256"]))), shards) if len(g)]
    base = layout.root / "data" / "cache" / "feature-shards"
    paths = []
    for index, group in enumerate(groups):
        target = base / f"{index:03d}" / "manifest.csv"
        with atomic_path(target) as tmp:
            manifest.loc[manifest["sha256"].isin(set(group))].to_csv(tmp, index=False)
        paths.append(target)
    return paths


@task(task_run_name="features-shard-{index}")
def features_shard(params: Params, root: str, index: int, manifest: str) -> dict[str, Any]:
    """Cache the feature vectors of one shard's images (its scratch per-split arrays are discarded)."""
    layout = ShardLayout(root=Path(root), shard_dir=Path(manifest).parent)
    stats = features.run(params, layout)
    shutil.rmtree(layout.features_dir, ignore_errors=True)
    get_run_logger().info("shard %d: %d vectors computed, %d reused", index, stats["computed"], stats["reused"])
    return stats


def dask_runner(workers: int) -> DaskTaskRunner:
    """A local Dask cluster of single-threaded worker processes (TensorFlow uses the cores inside)."""
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


@flow(name="headstart-features-sharded", persist_result=False)
def features_sharded(params: Params, root: str, shards: int) -> dict[str, Any]:
    """Map the shards over the flow's task runner, then merge through the ordinary features stage."""
    layout = Layout(Path(root))
    manifests = shard_manifests(layout, shards)
    futures = features_shard.map(unmapped(params), unmapped(root), list(range(len(manifests))),
                                 [str(m) for m in manifests])
    shard_stats = [future.result() for future in futures]
    merged = features.run(params, layout)
    if merged["computed"] or merged["views_computed"]:
        raise ShardingError(
            f"merge computed {merged['computed']} vectors and {merged['views_computed']} views the shards "
            "should have cached; check that every worker sees the same data/cache/features folder."
        )
    return {**merged, "shards": [s["computed"] for s in shard_stats]}
