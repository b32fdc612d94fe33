"""features stage: run the frozen backbone once per image and cache its pooled feature vector.

The cache (`layout.feature_cache_dir`, kept across runs, not a DVC out) is content-addressed: one
namespace per `backbone.cache_id` (backbone, weights sha256, input size, preprocessing; plus the
augmentation recipe and seed for augmented views), and inside it one key per image sha256 (plus
view number). So adding images computes only the new ones, renaming or moving a file computes
nothing, and changing the backbone or size starts a new namespace.

A namespace holds uniquely named shards written to a temporary name and renamed into place, each
carrying a sha256 of its own contents that is checked before use: a killed run loses at most the
shard it was filling, a damaged shard is dropped and its images computed again, and concurrent
runs never write the same file. `index.json` (which keys live in which shard) only saves opening
every shard; it is rebuilt from the shards whenever it is missing or out of date.

Outputs, per split in manifest order, in `layout.features_dir`: `{train,val,test}.npz` with
`features` float32 (N, D), `labels` int32, `sha256` and `path`; `train_views.npz` when
`augmented_views` > 0 (each train row's views 0..V-1 in turn, plus `view`); and `info.json`.
They are streamed to disk chunk by chunk, so memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from filelock import FileLock
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from headstart.backbones.loading import build_feature_extractor, load_backbone
from headstart.backbones.registry import Backbone
from headstart.data.datasets import image_dataset, resizing_layer
from headstart.data.images import DECODE_ID
from headstart.data.manifest import SPLITS, read_split_manifest
from headstart.files import (
    STALE_TEMP_S,
    atomic_directory,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    sha256_file,
)
from headstart.layout import Layout
from headstart.params import FeaturesParams, Params

log = logging.getLogger(__name__)

# Names the augmentation recipe in `_augment`; change it whenever that function changes.
AUGMENT_ID = "flip-crop80-rot10-v1"
MAX_ROTATION_RAD = np.deg2rad(10.0)
MIN_CROP_SCALE = 0.8
GATHER_ROWS = 2048  # rows assembled and written at a time
OPEN_SHARDS = 8  # shards kept in memory while assembling


class FeaturesError(ValueError):
    """A manifest or cache problem the user has to fix; the message names the file and what to do."""


class CorruptShard(ValueError):
    pass


# ---------------------------------------------------------------- manifest


# ---------------------------------------------------------------- cache


def _digest(keys: np.ndarray, features: np.ndarray) -> str:
    digest = hashlib.sha256("\n".join(keys.tolist()).encode("utf-8"))
    digest.update(repr(features.shape).encode())
    digest.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
    return digest.hexdigest()


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys and features of a shard, or CorruptShard when it is truncated or its checksum fails."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, features, digest = data["keys"], data["features"], str(data["digest"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise CorruptShard(f"{path.name}: unreadable ({exc})") from None
    if features.ndim != 2 or keys.shape != (len(features),):
        raise CorruptShard(f"{path.name}: {len(keys)} keys for features of shape {features.shape}")
    if _digest(keys, features) != digest:
        raise CorruptShard(f"{path.name}: checksum mismatch")
    return keys, features


def _stat(path: Path, field: str, missing: float) -> float:
    """A stat field, or `missing` when a concurrent run removed or renamed the file since it was listed."""
    try:
        return getattr(path.stat(), field)
    except FileNotFoundError:
        return missing


class ShardCache:
    """One namespace of the content-addressed feature cache."""

    def __init__(self, root: Path, namespace: str) -> None:
        self.namespace = namespace
        self.dir = root / hashlib.sha256(namespace.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "namespace.txt").exists():
            atomic_write_text(self.dir / "namespace.txt", namespace + "\n")  # for people browsing the cache
        self.shards: dict[str, dict[str, Any]] = {}  # shard file name -> {"size", "keys"}
        self.location: dict[str, tuple[str, int]] = {}  # key -> (shard, row)
        self.dropped = 0
        self._scan()

    @property
    def _index(self) -> Path:
        return self.dir / "index.json"

    def _scan(self) -> None:
        """Read the index, then open only the shards it does not describe (new, or changed in size)."""
        try:
            known = json.loads(self._index.read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            known = {}
        changed = False
        for leftover in self.dir.glob(".*.tmp"):  # from killed runs; a live writer renames its file within seconds
            if time.time() - _stat(leftover, "st_mtime", time.time()) > STALE_TEMP_S:
                leftover.unlink(missing_ok=True)
        for path in sorted(self.dir.glob("*.npz")):
            size = _stat(path, "st_size", -1)
            if size < 0:  # dropped by a concurrent run since the listing
                continue
            entry = known.get(path.name)
            if not (isinstance(entry, dict) and entry.get("size") == size and isinstance(entry.get("keys"), list)):
                try:
                    keys, _ = read_shard(path)
                except CorruptShard as exc:
                    self._drop(path, exc)
                    continue
                entry, changed = {"size": size, "keys": keys.tolist()}, True
            self._add(path.name, entry)
        if changed or set(known) != set(self.shards):
            self.save_index()

    def _add(self, name: str, entry: dict[str, Any]) -> None:
        self.shards[name] = entry
        for row, key in enumerate(entry["keys"]):
            self.location.setdefault(key, (name, row))

    def _drop(self, path: Path, reason: Exception) -> None:
        log.warning("feature cache: dropping damaged shard %s (%s); its images are computed again", path, reason)
        path.unlink(missing_ok=True)
        self.dropped += 1
        entry = self.shards.pop(path.name, None)
        if entry is not None:
            self.location = {k: v for k, v in self.location.items() if v[0] != path.name}
            for name, other in self.shards.items():  # keys the dropped shard shadowed may live elsewhere
                for row, key in enumerate(other["keys"]):
                    self.location.setdefault(key, (name, row))

    def save_index(self) -> None:
        atomic_write_json(self._index, {"namespace": self.namespace, "shards": self.shards})

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self.location]

    def verify(self, keys: Iterable[str]) -> None:
        """Checksum every shard holding one of `keys`, dropping damaged ones before they are used."""
        for name in sorted({self.location[k][0] for k in keys if k in self.location}):
            try:
                read_shard(self.dir / name)
            except CorruptShard as exc:
                self._drop(self.dir / name, exc)

    def write(self, keys: Sequence[str], features: np.ndarray) -> None:
        """Write one shard under a fresh unique name: temp file, fsync, rename."""
        keys_array = np.asarray(keys, dtype=str)
        features = np.ascontiguousarray(features, dtype=np.float32)
        name = f"{uuid.uuid4().hex}.npz"
        with atomic_path(self.dir / name) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=keys_array, features=features, digest=np.asarray(_digest(keys_array, features)))
                handle.flush()
                os.fsync(handle.fileno())
        self._add(name, {"size": (self.dir / name).stat().st_size, "keys": keys_array.tolist()})

    def gather(self, keys: Sequence[str], dim: int) -> Iterator[np.ndarray]:
        """Feature rows for `keys`, in order, a chunk at a time (a few shards open at once)."""
        open_shards: OrderedDict[str, np.ndarray] = OrderedDict()
        for start in range(0, len(keys), GATHER_ROWS):
            chunk = keys[start : start + GATHER_ROWS]
            out = np.empty((len(chunk), dim), dtype=np.float32)
            for i, key in enumerate(chunk):
                name, row = self.location[key]
                if name not in open_shards:
                    open_shards[name] = read_shard(self.dir / name)[1]
                    if len(open_shards) > OPEN_SHARDS:
                        open_shards.popitem(last=False)
                open_shards.move_to_end(name)
                out[i] = open_shards[name][row]
            yield out


# ---------------------------------------------------------------- output files


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    return {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}


def write_npz_streaming(target: Path, rows: int, dim: int, chunks: Iterable[np.ndarray], **small: np.ndarray) -> None:
    """An .npz that np.load reads, whose `features` (rows, dim) arrive in chunks, never all in memory."""
    written = 0
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("features.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_2_0(out, _npy_header((rows, dim), np.dtype("<f4")))
            for chunk in chunks:
                out.write(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
                written += len(chunk)
        for name, array in small.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)
    if written != rows:
        raise RuntimeError(f"{target}: wrote {written} feature rows, expected {rows}")


# ---------------------------------------------------------------- computing


def view_key(sha256: str, view: int) -> str:
    return f"{sha256}#{view}"


def view_seed(sha256: str, view: int, augment_seed: int) -> tuple[int, int]:
    """A stateless seed per (image, view): the same view whatever else is in the run."""
    digest = hashlib.sha256(f"{augment_seed}:{sha256}:{view}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF, int.from_bytes(digest[4:8], "little") & 0x7FFFFFFF


def _augment(image: tf.Tensor, seed: tf.Tensor, resize: keras.layers.Layer) -> tf.Tensor:
    """Random flip, crop (80-100% of the side, resized back) and rotation (up to 10 degrees)."""
    size = tf.shape(image)[0]
    flip_seed, scale_seed, crop_seed, angle_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    scale = tf.random.stateless_uniform([], scale_seed, MIN_CROP_SCALE, 1.0)
    side = tf.cast(tf.cast(size, tf.float32) * scale, tf.int32)
    image = resize(tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), crop_seed))
    angle = tf.random.stateless_uniform([], angle_seed, -MAX_ROTATION_RAD, MAX_ROTATION_RAD)
    centre = (tf.cast(size, tf.float32) - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # output (x, y) samples input (cos*x - sin*y + tx, sin*x + cos*y + ty): a rotation about the centre
    transform = tf.stack([cos, -sin, centre - cos * centre + sin * centre,
                          sin, cos, centre - sin * centre - cos * centre, 0.0, 0.0])
    return keras.ops.image.affine_transform(image, transform, interpolation="bilinear", fill_mode="reflect")


@dataclass
class _Job:
    """Images to run through the backbone and the cache their vectors go to."""

    cache: ShardCache
    keys: list[str]
    paths: list[str]  # absolute
    shas: list[str]  # of each path's content, checked before decoding
    seeds: list[tuple[int, int]] | None  # augmented views only
    description: str


class _Extractor:
    """The backbone as one traced function, built only when something has to be computed."""

    def __init__(self, backbone: Backbone) -> None:
        model = build_feature_extractor(backbone)
        spec = tf.TensorSpec([None, backbone.image_size, backbone.image_size, 3], tf.float32)
        self.fn = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), input_signature=[spec],
                              autograph=False)

    def __call__(self, batch: tf.Tensor) -> np.ndarray:
        return self.fn(batch).numpy()


def _dataset(job: _Job, backbone: Backbone, batch_size: int) -> tf.data.Dataset:
    interpolation = backbone.spec.interpolation
    ds = image_dataset(job.paths, None, backbone.image_size, batch_size, interpolation)
    if job.seeds is None:
        return ds
    resize = resizing_layer(backbone.image_size, interpolation)
    seeds = tf.data.Dataset.from_tensor_slices(np.asarray(job.seeds, dtype=np.int32))
    ds = tf.data.Dataset.zip((ds.unbatch(), seeds))
    ds = ds.map(lambda image, seed: _augment(image, seed, resize), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
    )


def _compute(job: _Job, extract: Callable[[tf.Tensor], np.ndarray], backbone: Backbone,
             params: FeaturesParams, progress: Progress) -> int:
    """Run the backbone over the job's images, writing a shard every `shard_size` vectors."""
    task = progress.add_task(job.description, total=len(job.keys), rate="")
    pending: list[np.ndarray] = []
    done = flushed = 0
    start = time.perf_counter()
    for batch in _dataset(job, backbone, params.batch_size):
        pending.append(extract(batch))
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


def _namespace(backbone: Backbone, mixed_precision: bool) -> str:
    return f"{backbone.cache_id}|{DECODE_ID}" + ("|mixed_float16" if mixed_precision else "")


def _load_backbone(params: FeaturesParams, layout: Layout, mixed_precision: bool) -> Backbone:
    previous = keras.mixed_precision.global_policy()
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return load_backbone(params.backbone, params.weights, params.image_size, layout.backbone_dir,
                             allow_random=params.allow_random_weights)
    finally:
        keras.mixed_precision.set_global_policy(previous)


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
    atomic_write_json(out / "info.json", info)


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

    remove_stale_temps(layout.features_dir, layout.backbone_dir / "*")
    manifest = read_split_manifest(layout.split_manifest)
    classes = sorted(manifest["label"].unique())
    manifest["label_index"] = manifest["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int32)
    manifest["split_order"] = manifest["split"].map(SPLITS.index)

    gpus = tf.config.list_physical_devices("GPU")
    mixed_precision = p.mixed_precision and bool(gpus)
    if p.mixed_precision and not gpus:
        log.warning("features.mixed_precision ignored: no GPU (float16 is slower than float32 on CPU)")
    backbone = _load_backbone(p, layout, mixed_precision)
    namespace = _namespace(backbone, mixed_precision)
    log.info("features: cache namespace %s, running on %s", namespace, "GPU" if gpus else "CPU")
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
        extract = _Extractor(backbone)
        with _progress() as progress:
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

    n_unique = manifest["sha256"].nunique()
    n_views = manifest.loc[manifest["split"] == "train", "sha256"].nunique() * p.augmented_views
    total = sum(computed.values())
    stats = {
        "computed": computed["features"],
        "reused": n_unique - computed["features"],
        "views_computed": computed.get("augmented views", 0),
        "views_reused": n_views - computed.get("augmented views", 0),
        "dropped_shards": base.dropped + (views.dropped if views else 0),
        "images_per_s": round(total / timings["compute"], 1) if total else None,
        "timings_s": timings,
        "rows": {split: int((manifest["split"] == split).sum()) for split in SPLITS},
    }
    log.info("features: %s", json.dumps(stats))
    return stats
