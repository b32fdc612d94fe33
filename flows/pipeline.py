"""The headstart pipeline as one Prefect flow: each stage a task calling the same `tasks.<stage>.run`
that `headstart <stage>` (and so `dvc repro`) calls.

Caching is by content (see flows/stages.py): a stage's key hashes its params sections, its code and
data deps. download's deps include data/fingerprint.json, which the fingerprint task rewrites before
download is keyed (as `dvc repro` runs the always-changed fingerprint stage first), so a changed source
reruns download. A cached result records the hashes of the outputs the stage wrote; when those outputs are
missing or changed on disk the flow refreshes the cache, so a cache hit always leaves the stage's
outputs in place, as `dvc repro` would.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.states import State
from prefect.tasks import exponential_backoff
from pydantic import Field

from flows.sharding import dask_runner, features_sharded
from flows.stages import StageSpec, output_hashes, read_stage_specs, stage_key
from headstart.data.sources.candidates import TransientDownloadError
from headstart.layout import Layout
from headstart.params import SOURCE_STAGE, STAGES, Params, load_params
from headstart.reporting import run_report
from tasks.cli import import_tensorflow_quietly, parse_override

RESULTS_ENV = "HEADSTART_RESULTS_DIR"
ARTIFACT_KEY = "headstart-run-report"
BAD_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _key_from_parameters(_context: Any, parameters: dict[str, Any]) -> str:
    """The flow computes the content key before calling the task (it needs it for the output check)."""
    return parameters["key"]


def is_transient(exc: BaseException) -> bool:
    """Network trouble is worth another try later; bad input (wrong path, bad archive, checksum) is not.

    The download stage retries each transfer itself and then raises TransientDownloadError, keeping the
    partial file so the next attempt resumes it; any other DownloadError (a ValueError) is bad input.
    """
    if isinstance(exc, TransientDownloadError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, BAD_PATH_ERRORS)


def _retry_transient(_task: Any, _task_run: Any, state: State) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified, not swallowed: the state stays failed
        return is_transient(exc)
    return False


@task(cache_key_fn=_key_from_parameters, persist_result=True, task_run_name="{stage}")
def run_stage(stage: str, params: Params, root: str, key: str, shards: int = 1, workers: int = 2) -> dict[str, Any]:
    """Run one stage through its module's `run` (features: sharded over Dask workers when shards > 1),
    then record the hashes of what it wrote. Sharding does not change the key: the result is the same."""
    logger = get_run_logger()
    spec = read_stage_specs()[stage]
    logger.info("stage %s: running tasks.%s.run (content key %s)", stage, stage, key[-12:])
    started = time.perf_counter()
    import_tensorflow_quietly()  # once per process: TF's import banners are noise in the run's log too
    if stage == "features" and shards > 1:
        summary = features_sharded.with_options(task_runner=dask_runner(workers))(params, root, shards)
    else:
        summary = importlib.import_module(f"tasks.{stage}").run(params, Layout(Path(root)))
    outputs = output_hashes(spec, Path(root))
    missing = sorted(path for path, digest in outputs.items() if digest is None)
    if missing:
        raise RuntimeError(
            f"stage {stage} finished but did not write {', '.join(missing)} (declared in dvc.yaml); "
            f"fix tasks/{stage}.py or its outs in dvc.yaml."
        )
    logger.info("stage %s: done in %.1f s, %d outputs recorded", stage, time.perf_counter() - started, len(outputs))
    return {"stage": stage, "key": key, "outputs": outputs, "summary": summary}


@task(cache_policy=NO_CACHE, task_run_name=SOURCE_STAGE)
def fingerprint_source(params: Params, root: str) -> dict[str, Any]:
    """Never cached: it is what tells whether the source changed (tasks/fingerprint.py)."""
    summary = importlib.import_module(f"tasks.{SOURCE_STAGE}").run(params, Layout(Path(root)))
    get_run_logger().info("source fingerprint %s (%d files, %d read)", summary["digest"][:12], summary["files"],
                          summary["read"])
    return summary


def result_storage_for(root: Path, location: str | None) -> Path:
    """Where task results (and so the cache) live: the argument, $HEADSTART_RESULTS_DIR, or data/cache.

    Workers that should share a cache (a local one and a GPU one) need the same shared folder here.
    """
    chosen = location or os.environ.get(RESULTS_ENV) or str(root / "data" / "cache" / "prefect-results")
    path = Path(chosen).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def outputs_current(store: ResultStore, spec: StageSpec, root: Path, key: str) -> bool:
    """True when a result exists for `key` and the outputs it recorded are on disk unchanged."""
    if not store.exists(key):
        return False
    recorded = store.read(key).result
    return isinstance(recorded, dict) and recorded.get("outputs") == output_hashes(spec, root)


def select_stages(stages: list[str] | None) -> list[str]:
    if not stages:
        return list(STAGES)
    unknown = [name for name in stages if name not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}.")
    return [name for name in STAGES if name in stages]


def _network_retries(retries: int, backoff_s: float) -> dict[str, Any]:
    """Task options that retry a transient network failure (the tasks that fetch: fingerprint, download)."""
    if not retries:
        return {}
    return {"retries": retries, "retry_delay_seconds": exponential_backoff(backoff_s)(retries),
            "retry_jitter_factor": 0.5, "retry_condition_fn": _retry_transient}


def _stage_task(stage: str, storage: Path, refresh: bool, retries: int, backoff_s: float):
    options: dict[str, Any] = {"result_storage": storage, "refresh_cache": refresh, "name": f"stage-{stage}"}
    if stage == "download":
        options |= _network_retries(retries, backoff_s)
    return run_stage.with_options(**options)


@flow(name="headstart-pipeline", log_prints=True, persist_result=False)
def pipeline(
    overrides: dict[str, Any] | None = None,
    root: str = ".",
    params_file: str = "params.yaml",
    stages: list[str] | None = None,
    result_storage: str | None = None,
    download_retries: Annotated[int, Field(ge=0, le=20)] = 3,
    retry_backoff_s: Annotated[float, Field(ge=0)] = 10.0,
    feature_shards: Annotated[int, Field(ge=1)] = 1,
    dask_workers: Annotated[int, Field(ge=1)] = 2,
) -> dict[str, str]:
    """Run the stages (all, or the named ones in pipeline order); returns each stage's status.

    `overrides` (dotted like {"train_head.epochs": 5} or nested) apply over `params_file` and are
    validated by headstart.params.load_params, exactly as `headstart <stage> --set` does.
    `download_retries` reruns the whole download stage after a transient failure, waiting
    retry_backoff_s, then twice that, ... (each transfer also retries itself, download.retries).
    `feature_shards` > 1 splits the features stage into that many tasks on a local Dask cluster of
    `dask_workers` processes (flows/sharding.py).
    """
    logger = get_run_logger()
    params = load_params(params_file, overrides)
    layout = Layout(Path(root))
    data_root = Path(root).resolve()
    specs = read_stage_specs()
    storage = result_storage_for(data_root, result_storage)
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(storage)))
    outcomes: list[dict[str, Any]] = []
    selected = select_stages(stages)
    if "download" in selected:
        fingerprint_source.with_options(**_network_retries(download_retries, retry_backoff_s))(params, str(data_root))
    for stage in selected:
        key = stage_key(specs[stage], params, data_root)
        refresh = store.exists(key) and not outputs_current(store, specs[stage], data_root, key)
        if refresh:
            logger.info("stage %s: cached result found but its outputs are missing or changed; rerunning", stage)
        started = time.perf_counter()
        stage_task = _stage_task(stage, storage, refresh, download_retries, retry_backoff_s)
        state = stage_task(stage, params, str(data_root), key, feature_shards, dask_workers, return_state=True)
        state.result()  # raises the stage's own error
        status = "cached" if state.name == "Cached" else "ran"
        logger.info("stage %s: %s", stage, status)
        outcomes.append({"stage": stage, "status": status, "seconds": time.perf_counter() - started, "key": key})
    create_markdown_artifact(
        key=ARTIFACT_KEY, markdown=run_report(layout, outcomes), description="Stages run or cached, metrics, figures"
    )
    return {o["stage"]: o["status"] for o in outcomes}


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pipeline [--stages ...] [--set KEY=VALUE ...]`: the flow once, in this process."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                        metavar="KEY=VALUE", help="override one parameter, e.g. --set finetune.epochs=1")
    parser.add_argument("--root", default=".", help="data root holding data/ and models/ (default: .)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                        help=f"run only these, in pipeline order ({', '.join(STAGES)}); default: all")
    parser.add_argument("--result-storage", default=None, help="task result folder (default: see docs)")
    parser.add_argument("--download-retries", type=int, default=3)
    parser.add_argument("--feature-shards", type=int, default=1)
    parser.add_argument("--dask-workers", type=int, default=2)
    args = parser.parse_args(argv)
    statuses = pipeline(overrides=dict(args.overrides), root=args.root, params_file=args.params,
                        stages=args.stages, result_storage=args.result_storage,
                        download_retries=args.download_retries, feature_shards=args.feature_shards,
                        dask_workers=args.dask_workers)
    print(" ".join(f"{stage}: {status}" for stage, status in statuses.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
