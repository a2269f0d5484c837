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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from vision_ops.config import DetectionTask, InputSpec, JobSpec, RuntimeSpec, SegmentationTask
from vision_ops.detection import instance_output
from vision_ops.lock import RunLock
from vision_ops.masks import write_masks
from vision_ops.models import check_job, resolve_labels, resolve_preprocessing
from vision_ops.predictors import load_predictor
from vision_ops.reader import read_units
from vision_ops.runstats import RunStats
from vision_ops.scenes import SceneMerger, TilePlan, plan_tiles
from vision_ops.schema import TABLE_BUILDERS, output_schema
from vision_ops.sink import CommitResult, ParquetSink, committed_runs, read_committed_file
from vision_ops.sources import (
    LISTING_BLOCK_ROWS,
    LISTING_SCHEMA,
    InputPlan,
    ManifestRead,
    SourceError,
    nothing_found,
    plan_inputs,
)
from vision_ops.storage import StorageOptions, arrow_filesystem, require_bucket
from vision_ops.tally import (
    ExpectedUnits,
    ListedUnits,
    ListingSummary,
    RepeatFinder,
    Tally,
    rows_in_buckets,
    rows_with_hashes,
    rows_without,
    summarise_block,
)

log = logging.getLogger(__name__)
MAX_REPEATED_URIS = 100_000  # URIs named more than once that a run sets right (else refuses)
MB = 1024**2
# Memory a read task reserves: a large photo decoded (8k x 6k RGB is 150 MB) plus its bytes.
READ_TASK_MEMORY_BYTES = 512 * MB


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
    num_gpus = gpus_per_actor(runtime, gpus)
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


def gpus_per_actor(runtime: RuntimeSpec, cluster_gpus: float) -> float:
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
    inputs = plan_inputs(spec.input, spec.storage_options)
    connect_ray()
    plan = plan_pool(spec.runtime, ray.cluster_resources())
    spec = spec.sized(plan.num_gpus)
    listing = list_listing(spec.input, inputs, spec.storage_options)
    lease = spec.run.lock_lease_s
    require_bucket(spec.output.uri, spec.storage_options)
    with RunLock(spec.output.uri, run_id, lease, spec.storage_options) as lock:
        if spec.run.incremental:
            listing = skip_committed(spec, listing, run_id)
        log.info(
            "run %s: %d inputs, predictor pool %s, %d images per model call, %d files per read "
            "task",
            run_id,
            listing.count,
            plan,
            spec.runtime.images_per_call,
            spec.runtime.files_per_read_task,
        )
        commit, pipeline_seconds = _process_and_commit(spec, listing, plan, lock)
    seconds = time.perf_counter() - started
    return RunSummary(run_id, listing.count, seconds, pipeline_seconds, commit)


# --- the listing, held by Ray ----------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """A run's inputs as a dataset materialized in Ray's object store (each URI once; the
    driver holds block references, not rows) and the summary of one pass over it. As the
    commit's ExpectedUnits: one unit per source."""

    dataset: ray.data.Dataset
    summary: ListingSummary

    @property
    def count(self) -> int:
        return self.summary.count

    def tally(self) -> Tally:
        return self.summary.tally

    def in_buckets(self, buckets: Collection[int]) -> list[str]:
        select = functools.partial(rows_in_buckets, buckets=frozenset(buckets))
        found = self.dataset.map_batches(select, **_BLOCKWISE)
        return [uri for table in _tables(found) for uri in table["source_uri"].to_pylist()]

    def table(self) -> pa.Table:
        """The whole listing here, sorted by URI (for work that keeps it on the driver)."""
        refs = self.dataset.to_arrow_refs()
        return pa.concat_tables([LISTING_SCHEMA.empty_table(), *ray.get(refs)]).sort_by(
            "source_uri"
        )


_BLOCKWISE: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": LISTING_BLOCK_ROWS}


def list_listing(spec: InputSpec, inputs: InputPlan, options: StorageOptions) -> Listing:
    """The planned inputs into the object store: the driver's table, s3:// listings a page
    at a time (blocks put as they come), a manifest read by Ray Data where it lies; a URI
    that more than one of them names (or a manifest twice) is kept once, the first part's."""
    parts = _listing_parts(inputs, options)
    dataset = _union(parts)
    summary = summarise(dataset, find_repeats=inputs.parts > 1 or inputs.manifest is not None)
    repeated = summary.repeats.repeated() if summary.repeats is not None else set()
    if repeated:
        dataset = _keep_first(parts, repeated)
        summary = summarise(dataset, find_repeats=False)
    if summary.count == 0:
        raise nothing_found(spec)
    return Listing(dataset, summary)


def summarise(dataset: ray.data.Dataset, find_repeats: bool) -> ListingSummary:
    """One pass over the listing (in Ray tasks), added up here in fixed memory: the count,
    the expected units' tally, the input snapshot digest and (where asked) repeated URIs."""
    summary = ListingSummary(repeats=RepeatFinder() if find_repeats else None)
    for table in _tables(dataset.map_batches(summarise_block, **_BLOCKWISE)):
        summary.add(table)
    return summary


def _listing_parts(inputs: InputPlan, options: StorageOptions) -> list[ray.data.Dataset]:
    parts: list[ray.data.Dataset] = []
    if inputs.table.num_rows:
        parts.append(ray.data.from_arrow(inputs.table))
    for listing in inputs.listings:
        refs = [ray.put(block) for block in listing.blocks()]
        if refs:
            parts.append(ray.data.from_arrow_refs(refs))  # type: ignore[arg-type]
    if inputs.manifest is not None:
        parts.append(_manifest_dataset(inputs.manifest, options))
    return parts


def _manifest_dataset(manifest: ManifestRead, options: StorageOptions) -> ray.data.Dataset:
    """The manifest read by Ray Data's reader for its format, as listing rows, materialized
    (an unreadable entry fails here, before any work)."""
    fs, path = arrow_filesystem(manifest.uri, options)
    where: dict[str, Any] = {"filesystem": fs, "file_extensions": None}
    if manifest.format == "parquet":
        rows = ray.data.read_parquet(path, partitioning=None, **where)
        rows = rows.select_columns(list(manifest.columns))
    elif manifest.format == "csv":
        no_hive: Any = None  # Ray's default would read key=value folders as columns
        rows = ray.data.read_csv(path, partitioning=no_hive, **where, **manifest.csv_arguments())
    else:
        rows = ray.data.read_text(path, **where)
    rows = rows.map_batches(manifest.normalise, **_BLOCKWISE)
    rows.context.raise_original_map_exception = True  # a bad entry's SourceError, as raised
    try:
        return rows.materialize()
    except Exception as err:
        raise _source_error(manifest.uri, err) from None


def _source_error(uri: str, err: BaseException) -> SourceError:
    """The SourceError a Ray task raised (Ray's error carries it as `cause`), else one naming
    the manifest and what went wrong reading it."""
    found: BaseException | None = err
    while found is not None:
        original = getattr(found, "cause", None)
        if isinstance(original, SourceError):  # one line; Ray appends its retry advice
            return SourceError(str(original).splitlines()[0])
        found = found.__cause__ or original
    return SourceError(f"manifest {uri}: cannot read: {type(err).__name__}: {err}")


def _union(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    if not parts:
        return ray.data.from_arrow(LISTING_SCHEMA.empty_table())
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:]).materialize()


def _keep_first(parts: list[ray.data.Dataset], repeated: set[int]) -> ray.data.Dataset:
    """The listing with each repeated URI once: the row of the first part naming it."""
    first: dict[str, dict[str, Any]] = {}
    for part in parts:
        select = functools.partial(rows_with_hashes, hashes=repeated)
        found = part.map_batches(select, **_BLOCKWISE)
        for table in _tables(found):
            for row in table.to_pylist():
                first.setdefault(row["source_uri"], row)
    if len(first) > MAX_REPEATED_URIS:
        raise SourceError(
            f"{len(first)} inputs are named more than once (by a manifest twice, or by more "
            f"than one of uris and manifest); expected at most {MAX_REPEATED_URIS}: "
            "deduplicate the manifest"
        )
    log.info("%d inputs named more than once are kept once", len(first))
    uris = frozenset(first)
    drop = functools.partial(rows_without, uris=uris)
    kept = [part.map_batches(drop, **_BLOCKWISE) for part in parts]
    once = pa.Table.from_pylist([first[uri] for uri in sorted(first)], schema=LISTING_SCHEMA)
    return _union([*kept, ray.data.from_arrow(once)]).materialize()


def _tables(dataset: ray.data.Dataset) -> Any:
    return dataset.iter_batches(batch_format="pyarrow", batch_size=None)


def _process_and_commit(
    spec: JobSpec, listing: Listing, plan: PoolPlan, lock: RunLock
) -> tuple[CommitResult, float]:
    run_id, run_date = spec.resolved_run()
    units, schema, tiles = plan_units(spec, listing)
    expected: ExpectedUnits = ListedUnits(listed_units(tiles.units)) if tiles else listing
    sink = ParquetSink(
        spec.output.uri, run_id, run_date, schema, spec.output.rows_per_file, spec.storage_options
    )
    merger = scene_merger(spec, tiles)
    stats = RunStats()
    if (tiles.units.num_rows if tiles else listing.count) > 0:
        dataset = with_limits(build_dataset(spec, units, plan, run_id, schema), spec.runtime)
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            written = time.perf_counter()
            rows = stats.record(table)
            sink.write(merger.add(rows) if merger else rows)
            stats.add_stage("commit", time.perf_counter() - written)
            lock.renew_if_due()
    pipeline_seconds = stats.finish()
    details = stats.as_manifest(pipeline_seconds) | identity_digests(spec, listing)
    return sink.commit(expected, details), pipeline_seconds


def plan_units(
    spec: JobSpec, listing: Listing
) -> tuple[ray.data.Dataset | pa.Table, pa.Schema, TilePlan | None]:
    """The units to process (the listing's dataset, or its scenes' tiles: planned here, on the
    driver, from the whole listing), the table's schema, and the tile plan where there is one.
    """
    schema = output_schema(
        spec.task.kind,
        dicom=spec.input.dicom is not None,
        tiles=spec.input.tiling is not None,
        instance=instance_output(getattr(spec.model, "architecture", None))
        if spec.task.kind == "detection"
        else None,
    )
    if spec.input.tiling is None:
        return listing.dataset, schema, None
    tiles = plan_tiles(listing.table(), spec.input.tiling, spec.storage_options)
    log.info("%d scenes cut into %d tiles", listing.count, tiles.units.num_rows)
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


def skip_committed(spec: JobSpec, listing: Listing, run_id: str) -> Listing:
    """The listing less sources another run committed with this model and this input version
    (a committed run holds every unit of each source it read: all frames of an instance).
    The committed versions are gathered on the driver; the listing is filtered in Ray tasks."""
    fingerprint = model_fingerprint(spec)
    done: set[tuple[str, str]] = set()
    for run in committed_runs(spec.output.uri, spec.storage_options):
        if run["run_id"] != run_id and run.get("model_fingerprint") == fingerprint:
            done |= committed_versions(run, spec.storage_options)
    select = functools.partial(not_done, done=done)
    kept = listing.dataset.map_batches(select, **_BLOCKWISE).materialize()
    left = Listing(kept, summarise(kept, find_repeats=False))
    log.info(
        "incremental: %d of %d inputs already committed", listing.count - left.count, listing.count
    )
    return left


def not_done(block: pa.Table, done: set[tuple[str, str]]) -> pa.Table:
    """The rows of a listing block whose (URI, version) is not in `done`."""
    keep = [(row["source_uri"], version_key(row)) not in done for row in block.to_pylist()]
    return block.filter(pa.array(keep, pa.bool_()))


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


def identity_digests(spec: JobSpec, listing: Listing) -> dict[str, str]:
    """What the run read and with what: the input snapshot, the spec and the model. The
    snapshot digest was summed as the listing streamed through Ray tasks (each source's URI
    and version, SHA-256 each, added modulo 2**256, then hashed with the count): the same
    inputs give the same digest whatever their order or blocks."""
    return {
        "input_snapshot_digest": listing.summary.snapshot.hexdigest(),
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


def with_limits(dataset: ray.data.Dataset, runtime: RuntimeSpec) -> ray.data.Dataset:
    """The dataset set to fail when no stage makes progress for `stall_timeout_s`, and to keep
    its object store use within `queue_mb` where the spec sets it."""
    context = dataset.context
    context.execution_no_progress_timeout_s = runtime.stall_timeout_s
    if runtime.queue_mb is not None:
        limits = context.execution_options.resource_limits
        budget = runtime.queue_mb * MB
        context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    return dataset


def unit_blocks(units: ray.data.Dataset | pa.Table, rows: int) -> ray.data.Dataset:
    """The units in blocks of `rows` rows, one read task each: a table (tiles) sliced here, a
    dataset (the listing) split as it streams, never gathered."""
    if isinstance(units, pa.Table):
        return ray.data.from_arrow([units.slice(i, rows) for i in range(0, units.num_rows, rows)])
    return units.repartition(target_num_rows_per_block=rows)


def build_dataset(
    spec: JobSpec,
    listing: ray.data.Dataset | pa.Table,
    plan: PoolPlan,
    run_id: str,
    schema: pa.Schema,
) -> ray.data.Dataset:
    # One read task per read batch: its images reach the model as soon as they are decoded
    # (Ray Data would otherwise coalesce a task's output into one block), and there are enough
    # tasks to keep every free core decoding.
    blocks = unit_blocks(listing, spec.runtime.files_per_read_task)
    reader = functools.partial(
        read_units,
        preprocessing=resolve_preprocessing(spec.model, spec.task.kind),
        max_pixels=spec.input.max_pixels,
        storage_options=spec.storage_options,
        dicom=spec.input.dicom,
        tiling=spec.input.tiling,
        decode_on_device=spec.runtime.decode == "device",
    )
    units = blocks.map_batches(
        reader,
        batch_size=spec.runtime.files_per_read_task,
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
        batch_size=spec.runtime.images_per_call,
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
        self.predict = load_predictor(spec, threads)
        self.to_rows = to_rows

    def __call__(self, batch: dict[str, Any]) -> pa.Table | dict[str, Any]:
        predictions = self.predict(batch)
        return self.to_rows(predictions) if self.to_rows else predictions
