"""Assemble the stages on Ray Data: list -> read/decode tasks -> predictor actor pool -> commit."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from vision_ops.config import DetectionTask, JobSpec, RuntimeSpec, SegmentationTask
from vision_ops.detection import instance_output
from vision_ops.lock import RunLock
from vision_ops.masks import write_masks
from vision_ops.models import check_job, resolve_labels, resolve_preprocessing
from vision_ops.predictors import PREDICTORS
from vision_ops.reader import read_units
from vision_ops.runstats import RunStats
from vision_ops.scenes import SceneMerger, TilePlan, plan_tiles
from vision_ops.schema import TABLE_BUILDERS, output_schema
from vision_ops.sink import CommitResult, ParquetSink, committed_runs, read_committed_file
from vision_ops.sources import list_inputs
from vision_ops.storage import StorageOptions, require_bucket

log = logging.getLogger(__name__)
# Memory a read task reserves: a large photo decoded (8k x 6k RGB is 150 MB) plus its bytes.
READ_TASK_MEMORY_BYTES = 512 * 1024**2


class ClusterTooSmall(RuntimeError):
    """The actor pool the spec asks for cannot be scheduled on this cluster."""


@dataclass(frozen=True)
class PoolPlan:
    """The predictor pool, the torch threads of each actor and the read tasks beside it."""

    min_size: int
    max_size: int
    num_cpus: float
    num_gpus: float
    threads: int | None = None  # None: the actor's CPUs (Ray's OMP_NUM_THREADS)
    read_tasks: int | None = None  # None: as many as Ray Data scales to


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    inputs: int
    seconds: float  # the whole run: listing, cluster start, pipeline, commit
    pipeline_seconds: float  # from the first read to the last row received
    commit: CommitResult

    @property
    def images_per_second(self) -> float:
        """Throughput of the pipeline itself (cluster and model start-up included)."""
        return self.commit.rows / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0


def plan_pool(runtime: RuntimeSpec, resources: Mapping[str, float]) -> PoolPlan:
    """Size the predictor pool from the cluster; refuse, before any work, one that cannot run."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    num_gpus = _gpus_per_actor(runtime, gpus)
    by_cpu = math.floor((cpus - runtime.reserved_cpus) / runtime.num_cpus_per_actor + 1e-9)
    by_gpu = math.floor(gpus / num_gpus + 1e-9) if num_gpus else by_cpu
    fits = max(0, min(by_cpu, by_gpu))
    if runtime.min_actors > fits and not runtime.autoscaling:
        raise ClusterTooSmall(_too_small_message(runtime, num_gpus, cpus, gpus, fits))
    top = runtime.max_actors or max(fits, runtime.min_actors)
    if top > fits and not runtime.autoscaling:
        log.warning("runtime.max_actors=%d capped to the %d actors that fit", top, fits)
        top = fits
    if runtime.autoscaling:  # the nodes up now say nothing of the nodes to come
        return PoolPlan(runtime.min_actors, top, runtime.num_cpus_per_actor, num_gpus)
    left = math.floor(cpus - top * runtime.num_cpus_per_actor + 1e-9)
    return PoolPlan(
        runtime.min_actors,
        top,
        runtime.num_cpus_per_actor,
        num_gpus,
        threads=None if num_gpus else max(1, math.floor(cpus / top + 1e-9)),
        read_tasks=max(1, left),
    )


def _gpus_per_actor(runtime: RuntimeSpec, cluster_gpus: float) -> float:
    """The spec's figure, else 1 where the cluster has a GPU and the device allows it."""
    num_gpus = runtime.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if cluster_gpus >= 1 and runtime.device != "cpu" else 0.0
    if runtime.device == "cuda" and num_gpus == 0:
        raise ClusterTooSmall("runtime.device is cuda: expected num_gpus_per_actor > 0 and a GPU")
    return num_gpus


def _too_small_message(
    runtime: RuntimeSpec, num_gpus: float, cpus: float, gpus: float, fits: int
) -> str:
    return (
        f"runtime.min_actors={runtime.min_actors} actors of {runtime.num_cpus_per_actor:g} CPU "
        f"and {num_gpus:g} GPU each cannot be scheduled: the cluster has {cpus:g} CPUs and "
        f"{gpus:g} GPUs, and {runtime.reserved_cpus:g} CPUs stay free for reading and decoding "
        f"(runtime.reserved_cpus); expected min_actors <= {fits}. Lower runtime.min_actors or "
        "runtime.num_cpus_per_actor, add nodes, or set runtime.autoscaling: true"
    )


def connect_ray() -> None:
    """Join RAY_ADDRESS when set, else start (or reuse) the embedded local cluster with its
    dashboard on 127.0.0.1 only (Ray itself turns token authentication on for a new local
    cluster unless RAY_AUTH_MODE says otherwise)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(dashboard_host="127.0.0.1", log_to_driver=True)


def run_job(spec: JobSpec) -> RunSummary:
    """Run a validated spec to a committed table; raises before any work if it cannot run."""
    started = time.perf_counter()
    run_id = spec.resolved_run()[0]
    check_job(spec)
    listing = list_inputs(spec.input, spec.storage_options)
    connect_ray()
    plan = plan_pool(spec.runtime, ray.cluster_resources())
    lease = spec.run.lock_lease_s
    require_bucket(spec.output.uri, spec.storage_options)
    with RunLock(spec.output.uri, run_id, lease, spec.storage_options) as lock:
        if spec.run.incremental:
            listing = skip_committed(spec, listing, run_id)
        log.info("run %s: %d inputs, predictor pool %s", run_id, listing.num_rows, plan)
        commit, pipeline_seconds = _process_and_commit(spec, listing, plan, lock)
    seconds = time.perf_counter() - started
    return RunSummary(run_id, listing.num_rows, seconds, pipeline_seconds, commit)


def _process_and_commit(
    spec: JobSpec, listing: pa.Table, plan: PoolPlan, lock: RunLock
) -> tuple[CommitResult, float]:
    run_id, run_date = spec.resolved_run()
    units, schema, tiles = plan_units(spec, listing)
    sink = ParquetSink(
        spec.output.uri, run_id, run_date, schema, spec.output.rows_per_file, spec.storage_options
    )
    merger = scene_merger(spec, tiles)
    stats = RunStats()
    if units.num_rows:
        dataset = build_dataset(spec, units, plan, run_id, schema)
        dataset.context.execution_no_progress_timeout_s = spec.runtime.stall_timeout_s
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            written = time.perf_counter()
            rows = stats.record(table)
            sink.write(merger.add(rows) if merger else rows)
            stats.add_stage("commit", time.perf_counter() - written)
            lock.renew_if_due()
    pipeline_seconds = stats.finish()
    details = stats.as_manifest(pipeline_seconds) | identity_digests(spec, listing)
    return sink.commit(listed_units(units), details), pipeline_seconds


def plan_units(spec: JobSpec, listing: pa.Table) -> tuple[pa.Table, pa.Schema, TilePlan | None]:
    """The units to process (the listing, or its scenes' tiles), the table's schema, and the
    tile plan where there is one."""
    schema = output_schema(
        spec.task.kind,
        dicom=spec.input.dicom is not None,
        tiles=spec.input.tiling is not None,
        instance=instance_output(getattr(spec.model, "architecture", None))
        if spec.task.kind == "detection"
        else None,
    )
    if spec.input.tiling is None:
        return listing, schema, None
    tiles = plan_tiles(listing, spec.input.tiling, spec.storage_options)
    log.info("%d scenes cut into %d tiles", listing.num_rows, tiles.units.num_rows)
    metadata = (schema.metadata or {}) | tiles.parquet_metadata()
    return tiles.units, schema.with_metadata(metadata), tiles


def scene_merger(spec: JobSpec, tiles: TilePlan | None) -> SceneMerger | None:
    """Detection over tiled scenes reduces each scene once its tiles are in."""
    if tiles is None or not isinstance(spec.task, DetectionTask):
        return None
    return SceneMerger(tiles, spec.task.seam_overlap)


def listed_units(units: pa.Table) -> list[tuple[str, tuple[int, int] | None]]:
    """Each unit's source and tile offset (None for a whole source), for the commit check."""
    uris = units["source_uri"].to_pylist()
    if "tile_x" not in units.column_names:
        return [(uri, None) for uri in uris]
    xs, ys = units["tile_x"].to_pylist(), units["tile_y"].to_pylist()
    return [(uri, None if x is None else (x, y)) for uri, x, y in zip(uris, xs, ys, strict=True)]


def skip_committed(spec: JobSpec, listing: pa.Table, run_id: str) -> pa.Table:
    """The listing less sources another run committed with this model and this input version
    (a committed run holds every unit of each source it read: all frames of an instance)."""
    fingerprint = model_fingerprint(spec)
    done: set[tuple[str, str]] = set()
    for run in committed_runs(spec.output.uri, spec.storage_options):
        if run["run_id"] != run_id and run.get("model_fingerprint") == fingerprint:
            done |= committed_versions(run, spec.storage_options)
    keep = [(row["source_uri"], version_key(row)) not in done for row in listing.to_pylist()]
    log.info("incremental: %d of %d inputs already committed", keep.count(False), len(keep))
    return listing.filter(pa.array(keep, pa.bool_()))


def committed_versions(run: dict[str, Any], options: StorageOptions) -> set[tuple[str, str]]:
    columns = ["source_uri", "source_etag", "source_size", "source_mtime"]
    versions = set()
    for entry in run["files"]:
        for row in read_committed_file(entry["uri"], options, columns).to_pylist():
            versions.add((row["source_uri"], version_key(row)))
    return versions


def version_key(row: dict[str, Any]) -> str:
    """An input's version: its ETag, else its size and modification time."""
    if row.get("source_etag"):
        return f"etag:{row['source_etag']}"
    mtime = row.get("source_mtime")
    stamp = mtime.astimezone(dt.timezone.utc).isoformat() if mtime else None
    return f"size:{row.get('source_size')}|mtime:{stamp}"


def identity_digests(spec: JobSpec, listing: pa.Table) -> dict[str, str]:
    """What the run read and with what: the input snapshot, the spec and the model."""
    snapshot = hashlib.sha256()
    for row in listing.to_pylist():
        version = (row["source_etag"], row["source_size"], row["source_mtime"])
        snapshot.update(f"{row['source_uri']}|{version}\n".encode())
    return {
        "input_snapshot_digest": snapshot.hexdigest(),
        "spec_digest": spec.fingerprint(),
        "model_fingerprint": model_fingerprint(spec),
    }


def model_fingerprint(spec: JobSpec) -> str:
    """The model, task and unit settings that decide the rows (a weights file: pin its
    sha256). Tiling and DICOM settings count where set, so a photo job's fingerprint is the
    same as before they existed."""
    content: dict[str, Any] = {
        "model": spec.model.model_dump(mode="json"),
        "task": spec.task.model_dump(),
    }
    for name in ("tiling", "dicom"):
        settings = getattr(spec.input, name)
        if settings is not None:
            content[name] = settings.model_dump(mode="json")
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def build_dataset(
    spec: JobSpec, listing: pa.Table, plan: PoolPlan, run_id: str, schema: pa.Schema
) -> ray.data.Dataset:
    # One read task per read batch: its images reach the model as soon as they are decoded
    # (Ray Data would otherwise coalesce a task's output into one block), and there are enough
    # tasks to keep every free core decoding.
    step = spec.runtime.read_batch_size
    blocks = [listing.slice(i, step) for i in range(0, listing.num_rows, step)]
    reader = functools.partial(
        read_units,
        preprocessing=resolve_preprocessing(spec.model, spec.task.kind),
        max_pixels=spec.input.max_pixels,
        storage_options=spec.storage_options,
        dicom=spec.input.dicom,
        tiling=spec.input.tiling,
        decode_on_device=spec.runtime.decode == "device",
    )
    units = ray.data.from_arrow(blocks).map_batches(
        reader,
        batch_size=spec.runtime.read_batch_size,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=plan.read_tasks),
        num_cpus=1,
        # A reservation the predictor lacks also keeps decoding in CPU tasks: Ray Data does not
        # fuse stages whose resources differ, so the actor pool spends its time on the model.
        memory=READ_TASK_MEMORY_BYTES,
    )
    to_rows = functools.partial(
        TABLE_BUILDERS.get(spec.task.kind),
        run_id=run_id,
        labels=resolve_labels(spec.model, spec.storage_options),
        schema=schema,
    )
    masks = isinstance(spec.task, SegmentationTask) and spec.task.masks
    predictions = units.map_batches(
        PredictRows,
        fn_constructor_kwargs={
            "spec": spec,
            "threads": plan.threads,
            "to_rows": None if masks else to_rows,
        },
        compute=ActorPoolStrategy(min_size=plan.min_size, max_size=plan.max_size),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        batch_size=spec.runtime.batch_size,
        batch_format="numpy",
    )
    if not masks:
        return predictions
    stage_masks = functools.partial(
        write_masks,
        root_uri=spec.output.uri,
        run_id=run_id,
        run_date=spec.resolved_run()[1],
        storage_options=spec.storage_options,
    )
    predictions = predictions.map_batches(stage_masks, batch_format="numpy", batch_size=None)
    return predictions.map_batches(to_rows, batch_format="numpy", batch_size=None)


class PredictRows:
    """One actor call from a read batch to its rows: the task's predictor, then the table builder
    unless a later stage (segmentation masks) needs the raw predictions. Rows leave the actor as
    Arrow, and no CPU task waits beside the read tasks for a core to build them."""

    def __init__(
        self, spec: JobSpec, threads: int | None, to_rows: Callable[..., pa.Table] | None
    ) -> None:
        self.predict = PREDICTORS.get(spec.task.kind)(spec, threads)
        self.to_rows = to_rows

    def __call__(self, batch: dict[str, Any]) -> pa.Table | dict[str, Any]:
        predictions = self.predict(batch)
        return self.to_rows(predictions) if self.to_rows else predictions
