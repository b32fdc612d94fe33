"""features stage: run the frozen backbone once per image and cache its pooled feature vector.

The cache (`layout.feature_cache_dir`, kept across runs, not a DVC out) is content-addressed: one
namespace per `backbone.cache_id` (backbone, weights sha256, input size, preprocessing; plus the
augmentation recipe and seed for augmented views), and inside it one key per image sha256 (plus
view number). So adding images computes only the new ones, renaming or moving a file computes
nothing, and changing the backbone or size starts a new namespace. The backbone runs on `features.runtime`
(headstart/runtimes.py); f32 runtimes agree with TensorFlow to 1e-4 of the features' scale (checked on the
first batch) and share a namespace, while bf16 features get their own (`|bf16`), never mixing with f32 ones.
The backbone's OpenVINO / ONNX conversion is kept in `layout.conversion_cache_dir` for later runs
(headstart/conversion.py), and OpenVINO runs it at the static batch size `features.batch_size`.

The cache itself is headstart/data/feature_cache.py.

Outputs, per split in manifest order, in `layout.features_dir`: `{train,val,test}.npz` with
`features` float32 (N, D), `labels` int32, `sha256` and `path`; `train_views.npz` when
`augmented_views` > 0 (each train row's views 0..V-1 in turn, plus `view`); and `info.json`.
They are streamed to disk chunk by chunk, so memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
from filelock import FileLock
from rich.progress import Progress

from headstart.backbones.loading import build_feature_extractor, load_backbone
from headstart.backbones.registry import Backbone
from headstart.conversion import runner
from headstart.data.artifacts import FeaturesInfo, write_info
from headstart.data.datasets import image_batches, image_dataset, prefetched, resizing_layer
from headstart.data.feature_cache import ShardCache, write_npz_streaming
from headstart.data.images import DECODE_ID
from headstart.data.manifest import SPLITS, read_split_manifest
from headstart.data.sources.presets import effective_settings
from headstart.data.views import AUGMENT_ID, augment, view_key, view_seed
from headstart.files import (
    atomic_directory,
    remove_stale_temps,
    sha256_file,
)
from headstart.layout import Layout
from headstart.params import FeaturesParams, Params
from headstart.progress import count_progress
from headstart.runtime import mixed_precision
from headstart.runtimes import resolve

log = logging.getLogger(__name__)



class FeaturesError(ValueError):
    """A manifest or cache problem the user has to fix; the message names the file and what to do."""


@dataclass
class _Job:
    """Images to run through the backbone and the cache their vectors go to."""

    cache: ShardCache
    keys: list[str]
    paths: list[str]  # absolute
    shas: list[str]  # of each path's content, checked before decoding
    seeds: list[tuple[int, int]] | None  # augmented views only
    description: str


def _extractor(backbone: Backbone, runtime: str, precision: str, batch_size: int, conversions: Path,
               mixed: bool) -> Callable[[Iterator[np.ndarray]], Iterator[np.ndarray]]:
    """The backbone on `runtime`, built only when something has to be computed, its conversion kept in
    `conversions` for the next run; its first batch is checked against TensorFlow."""
    size = backbone.image_size
    key = backbone.cache_id + ("|mixed_float16" if mixed else "")
    run = runner(build_feature_extractor(backbone), [None, size, size, 3], runtime, precision, "features",
                 batch=batch_size, cache=(conversions, key))
    return lambda batches: (outputs[0] for outputs in run.map(batches))


def _batches(job: _Job, backbone: Backbone, batch_size: int) -> Iterator[np.ndarray]:
    """The job's images as the backbone takes them, decoded in a thread while the backbone runs."""
    interpolation = backbone.spec.interpolation
    if job.seeds is None:
        return prefetched(image_batches(job.paths, backbone.image_size, batch_size, interpolation))
    ds = image_dataset(job.paths, None, backbone.image_size, batch_size, interpolation)
    resize = resizing_layer(backbone.image_size, interpolation)
    seeds = tf.data.Dataset.from_tensor_slices(np.asarray(job.seeds, dtype=np.int32))
    ds = tf.data.Dataset.zip((ds.unbatch(), seeds))
    ds = ds.map(lambda image, seed: augment(image, seed, resize), num_parallel_calls=tf.data.AUTOTUNE)
    return (batch.numpy() for batch in ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def _compute(job: _Job, extract: Callable[[Iterator[np.ndarray]], Iterator[np.ndarray]], backbone: Backbone,
             params: FeaturesParams, progress: Progress) -> int:
    """Run the backbone over the job's images, writing a shard every `shard_size` vectors."""
    task = progress.add_task(job.description, total=len(job.keys), rate="")
    pending: list[np.ndarray] = []
    done = flushed = 0
    start = time.perf_counter()
    for features in extract(_batches(job, backbone, params.batch_size)):
        pending.append(features)
        done += len(pending[-1])
        if done - flushed >= params.shard_size or done == len(job.keys):
            job.cache.write(job.keys[flushed:done], np.concatenate(pending))
            pending, flushed = [], done
        rate = done / max(time.perf_counter() - start, 1e-9)
        progress.update(task, completed=done, rate=f"{rate:,.0f} img/s")
    if done != len(job.keys):
        raise RuntimeError(f"{job.description}: the pipeline yielded {done} images, expected {len(job.keys)}")
    job.cache.save_index()
    return done


def _check_files(files: Iterable[tuple[str, str]]) -> None:
    """The files about to be decoded exist and still hold the content the manifest names."""
    for full, sha in sorted(files):
        if not Path(full).is_file():
            raise FileNotFoundError(f"{full}: listed in the split manifest but missing; rerun `headstart download` and `headstart split`")
        if sha256_file(full) != sha:
            raise FeaturesError(
                f"{full}: content changed since download recorded it (split takes its hashes from there): "
                "rerun `headstart download` and `headstart split` to restore it from download.source "
                "(with DVC: `dvc repro`, which reruns download because data/raw changed)"
            )


# ---------------------------------------------------------------- stage


def _namespace(backbone: Backbone, mixed: bool, precision: str) -> str:
    return (f"{backbone.cache_id}|{DECODE_ID}" + ("|mixed_float16" if mixed else "")
            + ("" if precision == "f32" else f"|{precision}"))


def _load_backbone(params: FeaturesParams, image_size: int | None, layout: Layout, mixed: bool) -> Backbone:
    with mixed_precision(mixed):
        return load_backbone(params.backbone, params.weights, image_size, layout.backbone_dir,
                             allow_random=params.allow_random_weights)


def _plan(manifest: pd.DataFrame, layout: Layout, p: FeaturesParams, base: ShardCache,
          views: ShardCache | None) -> list[_Job]:
    """What is not in the cache yet: base vectors of every image, then augmented views of train images."""
    # train first, so a first run's shards hold each split's rows together
    unique = manifest.sort_values("split_order", kind="stable").drop_duplicates("sha256")
    base.verify(unique["sha256"])
    todo = unique.set_index("sha256").loc[base.missing(unique["sha256"])]
    jobs = [_Job(base, todo.index.tolist(), [str(layout.root / x) for x in todo["path"]], todo.index.tolist(), None,
                 "features")]
    if views is not None:
        train = manifest.loc[manifest["split"] == "train"].drop_duplicates("sha256")
        wanted = [(sha, path, v) for sha, path in zip(train["sha256"], train["path"], strict=True)
                  for v in range(p.augmented_views)]
        views.verify(view_key(sha, v) for sha, _, v in wanted)
        absent = set(views.missing(view_key(sha, v) for sha, _, v in wanted))
        wanted = [w for w in wanted if view_key(w[0], w[2]) in absent]
        jobs.append(_Job(views, [view_key(sha, v) for sha, _, v in wanted], [str(layout.root / x) for _, x, _ in wanted],
                         [sha for sha, _, _ in wanted], [view_seed(sha, v, p.augment_seed) for sha, _, v in wanted],
                         "augmented views"))
    return jobs


def _write_outputs(out: Path, manifest: pd.DataFrame, backbone: Backbone, info: dict[str, Any], base: ShardCache,
                   views: ShardCache | None, augmented_views: int) -> None:
    dim = backbone.feature_dim
    for split in SPLITS:
        rows = manifest.loc[manifest["split"] == split]
        write_npz_streaming(out / f"{split}.npz", len(rows), dim, base.gather(rows["sha256"].tolist(), dim),
                            labels=rows["label_index"].to_numpy(np.int32), sha256=rows["sha256"].to_numpy(str),
                            path=rows["path"].to_numpy(str))
    if views is not None:
        train, v = manifest.loc[manifest["split"] == "train"], augmented_views
        keys = [view_key(sha, i) for sha in train["sha256"] for i in range(v)]
        write_npz_streaming(out / "train_views.npz", len(keys), dim, views.gather(keys, dim),
                            labels=np.repeat(train["label_index"].to_numpy(np.int32), v),
                            sha256=np.repeat(train["sha256"].to_numpy(str), v),
                            path=np.repeat(train["path"].to_numpy(str), v),
                            view=np.tile(np.arange(v, dtype=np.int32), len(train)))
    write_info(out / "info.json", info, FeaturesInfo)


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """Compute the missing feature vectors, then write the per-split arrays. Returns counts, speed and timings."""
    p = params.features
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    remove_stale_temps(layout.features_dir, layout.backbone_dir / "*", layout.conversion_cache_dir / "*")
    manifest = read_split_manifest(layout.split_manifest)
    classes = sorted(manifest["label"].unique())
    manifest["label_index"] = manifest["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int32)
    manifest["split_order"] = manifest["split"].map(SPLITS.index)

    gpus = tf.config.list_physical_devices("GPU")
    mixed = p.mixed_precision and bool(gpus)
    if p.mixed_precision and not gpus:
        log.warning("features.mixed_precision ignored: no GPU (float16 is slower than float32 on CPU)")
    backbone = _load_backbone(p, effective_settings(params).image_size, layout, mixed)
    runtime = resolve(p.runtime, p.precision, "features.runtime", gpu=bool(gpus))
    namespace = _namespace(backbone, mixed, p.precision)
    log.info("features: cache namespace %s, running on %s (%s, %s)", namespace, "GPU" if gpus else "CPU", runtime,
             p.precision)
    lap("backbone")

    base = ShardCache(layout.feature_cache_dir, namespace)
    views = None
    if p.augmented_views:
        views = ShardCache(layout.feature_cache_dir, f"{namespace}|views:{AUGMENT_ID}|seed={p.augment_seed}")
    jobs = _plan(manifest, layout, p, base, views)
    _check_files({(path, sha) for job in jobs for path, sha in zip(job.paths, job.shas, strict=True)})
    lap("plan")

    computed = {job.description: 0 for job in jobs}
    if any(job.keys for job in jobs):
        extract = _extractor(backbone, runtime, p.precision, p.batch_size, layout.conversion_cache_dir, mixed)
        with count_progress() as progress:
            for job in jobs:
                if job.keys:
                    computed[job.description] = _compute(job, extract, backbone, p, progress)
    lap("compute")

    info = {"classes": classes, "backbone": backbone.spec.name, "weights_id": backbone.weights_id,
            "image_size": backbone.image_size, "feature_dim": backbone.feature_dim,
            "preprocessing_id": backbone.spec.preprocessing_id, "augmented_views": p.augmented_views,
            "cache_id": namespace}
    layout.features_dir.parent.mkdir(parents=True, exist_ok=True)
    # two runs at once each build their own staging folder; the lock serialises the swap into place
    with FileLock(layout.features_dir.parent / ".features.lock"), atomic_directory(layout.features_dir) as out:
        _write_outputs(out, manifest, backbone, info, base, views, p.augmented_views)
    lap("write")

    stats = _stats(manifest, p.augmented_views, computed, base.dropped + (views.dropped if views else 0), timings)
    stats["runtime"] = f"{runtime} {p.precision}"
    log.info("features: %s", json.dumps(stats))
    return stats


def _stats(manifest: pd.DataFrame, augmented_views: int, computed: dict[str, int], dropped: int,
           timings: dict[str, float]) -> dict[str, Any]:
    n_unique = manifest["sha256"].nunique()
    n_views = manifest.loc[manifest["split"] == "train", "sha256"].nunique() * augmented_views
    total = sum(computed.values())
    return {
        "computed": computed["features"],
        "reused": n_unique - computed["features"],
        "views_computed": computed.get("augmented views", 0),
        "views_reused": n_views - computed.get("augmented views", 0),
        "dropped_shards": dropped,
        "images_per_s": round(total / timings["compute"], 1) if total else None,
        "timings_s": timings,
        "rows": {split: int((manifest["split"] == split).sum()) for split in SPLITS},
    }
