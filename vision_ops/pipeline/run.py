"""A job run end to end: inputs listed, read/decode tasks, the predictor actor pool (or the
driver's threads: `runtime.predict_in`), the commit."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from vision_ops.cluster import reachable_nodes
from vision_ops.config import JobSpec, RuntimeSpec
from vision_ops.detection import instance_output
from vision_ops.drift import Drift, check_run, drift_at_commit, manifest_entry
from vision_ops.errors import VisionOpsError
from vision_ops.host_memory import heap_trimmed
from vision_ops.masks import write_masks
from vision_ops.models import check_job, resolve_labels, resolve_preprocessing
from vision_ops.outputs import (
    RunGuard,
    Sink,
    check_run_date,
    committed_run,
    committed_runs,
    open_sink,
    retried_of,
    run_guard,
)
from vision_ops.pipeline.connect import connect_ray, nodes_up
from vision_ops.pipeline.identity import identity_digests
from vision_ops.pipeline.in_driver import predicted_in_threads
from vision_ops.pipeline.in_process import (
    listed_in_process,
    model_batches,
    process_plan,
    read_in_threads,
)
from vision_ops.pipeline.incremental import retried_record, retried_rows, skip_committed
from vision_ops.pipeline.listing import BLOCKWISE, AnyListing, HeldListing, Listing, list_listing
from vision_ops.pipeline.planning import ScenePlan, plan_scenes
from vision_ops.pool import (
    PoolPlan,
    check_in_driver,
    placed_for_units,
    placed_on_cluster,
    plan_pool,
    pool_for_inputs,
)
from vision_ops.predictors import load_predictor
from vision_ops.reader import unit_reader
from vision_ops.resume import Units, image_units, without_sources
from vision_ops.runindex import ROW_COLUMNS
from vision_ops.runstats import ActorStartup, RunStats, StartupClock
from vision_ops.schema import output_schema, task_of
from vision_ops.sink import CommitResult
from vision_ops.sources import InputPlan, plan_inputs, table_apart
from vision_ops.storage import require_bucket
from vision_ops.tally import ExpectedUnits
from vision_ops.tasks import DetectionTask, get_task

log = logging.getLogger(__name__)
MB = 1024**2
# The units a run processes: a Ray dataset, or rows held here (a run in this process).
UnitRows: TypeAlias = ray.data.Dataset | pa.Table
# Memory a read task reserves: a large photo decoded (8k x 6k RGB is 150 MB) plus its bytes.
READ_TASK_MEMORY_BYTES = 512 * MB
# Blocks a map task may make before the executor takes them (Ray Data's default: 2). Cutting a
# listing block into read blocks (`unit_blocks`) makes hundreds of small blocks in one task; at
# 2 ahead they trickled out at the executor's pace, about 10 a second, while the task held the
# CPU the read tasks waited for: 4,000 photos reached a ready pool 9 s late (docs/performance.md,
# "The listing's cut held the read tasks back").
MAP_TASK_BLOCKS_AHEAD = 64


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    inputs: int
    seconds: float  # the whole run: listing, cluster start, pipeline, commit
    pipeline_seconds: float  # from the first read to the last row received
    commit: CommitResult
    # Its figures against the runs before it; [] no earlier run, None: none could be had.
    drift: list[Drift] | None = None
    startup_seconds: dict[str, float] | None = None  # by stage (RunStats.startup_seconds)
    # Inputs --incremental left out: committed before with this model and input version.
    skipped_as_done: int = 0
    # Inputs --incremental processed again: their latest run wrote an error row for them.
    retried: int = 0
    retries: dict[str, int] = field(default_factory=dict)  # the manifest's `retried`

    @property
    def images_per_second(self) -> float:
        """Throughput of the pipeline itself (cluster and model start-up included), over the
        rows it processed (not those resumed from an earlier attempt's staging)."""
        processed = self.commit.rows - self.commit.resumed
        return processed / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0


def run_job(spec: JobSpec, clock: StartupClock | None = None) -> RunSummary:
    """Run a validated spec to a committed table; raises before any work if it cannot run.
    `clock`: start-up timed from an earlier start; by default from now."""
    check_job(spec)
    return run_checked_job(spec, clock or StartupClock())


def run_checked_job(
    spec: JobSpec, clock: StartupClock, on_commit: Callable[[], None] | None = None
) -> RunSummary:
    """`run_job` on a spec whose model `check_job` has passed already (the command line checks
    it while Ray starts, and times start-up from before that): the check is not repeated (for
    detection it reads the labels from storage, for embeddings it builds the model).
    `on_commit` is called once the run is committed, before its lock is released (the command
    line stops obeying SIGTERM from there: the run's outcome stands)."""
    spec = spec.pinned()
    run_id, run_date = spec.resolved_run()
    inputs = plan_inputs(spec.input, spec.storage_options)
    require_bucket(spec.output.uri, spec.storage_options)  # before the table's first read
    check_run_date(spec, run_id, run_date)
    if run_id == spec.default_run_id(run_date):  # not one the user named
        warn_of_runs_beside(spec, run_id, run_date)
    table = table_apart(spec.input, spec.output.uri, spec.storage_options)
    held = None
    if spec.runtime.runner != "ray":  # listed here first: a short run goes in this process
        with clock.stage("listing"):
            held = listed_in_process(spec, inputs, table)
    listing: AnyListing
    if held is None:
        spec, plan, listing = listed_on_ray(spec, inputs, table, clock)
    else:
        spec, plan, listing = in_process(spec), process_plan(spec.runtime), held
    with run_guard(spec, run_id) as lock:  # the table's run lock, where its format needs one
        listed = listing.count
        retried = None
        if spec.run.incremental:
            listing, retried = skip_committed(spec, listing, run_id)
        commit, pipeline_seconds, drifts, retries = _process_and_commit(
            spec, listing, plan, lock, clock, retried
        )
        if on_commit is not None:
            on_commit()
    seconds = time.perf_counter() - clock.started
    return RunSummary(
        run_id,
        listing.count,
        seconds,
        pipeline_seconds,
        commit,
        drifts,
        startup_seconds=clock.seconds,
        skipped_as_done=listed - listing.count,
        retried=retries.get("sources", 0),
        retries=retries,
    )


def listed_on_ray(
    spec: JobSpec, inputs: InputPlan, table: str | None, clock: StartupClock
) -> tuple[JobSpec, PoolPlan, Listing]:
    """Ray joined or started, the pool planned on its cluster (refused, before any work, where
    it cannot run), the spec placed and sized for it, and the inputs listed into Ray."""
    with clock.stage("ray_connect"):
        connect_ray(spec.runtime.local_dashboard)
    reachable = reachable_nodes() if spec.runtime.autoscaling else None
    up = nodes_up()
    plan = plan_pool(spec.runtime, ray.cluster_resources(), reachable, up)
    check_in_driver(spec.runtime, plan, up)
    placed = placed_on_cluster(spec, plan, up)
    spec = spec.model_copy(update={"runtime": placed}).sized(plan.num_gpus)
    with clock.stage("listing"):
        listing = list_listing(spec.input, inputs, spec.storage_options, table)
    return spec, plan, listing


def in_process(spec: JobSpec) -> JobSpec:
    """The spec as a run in this process runs it (`pipeline/in_process.py`): the model in the
    driver's threads, on the CPUs alone (a GPU the machine has is left to Ray's runs: the
    numerics, and so the resume key, are those of a CPU run)."""
    runtime = spec.runtime.model_copy(update={"predict_in": "driver", "device": "cpu"})
    return spec.model_copy(update={"runtime": runtime}).sized(0)


def warn_of_runs_beside(spec: JobSpec, run_id: str, run_date: dt.date) -> None:
    """A warning where the date holds committed runs of its task under other default ids:
    the default run id holds the spec's digest, so a date run again with a changed spec is a
    run beside the earlier one (both in the table), not in its place; `--run-id` of the
    earlier one replaces it. Runs of ids a user chose, or of another task, are left out."""
    date = run_date.isoformat()
    default_id = re.compile(rf"{re.escape(date)}-[0-9a-f]{{8}}")
    runs = committed_runs(spec.output, spec.storage_options)
    beside = [
        run["run_id"]
        for run in runs
        if run["run_date"] == date
        and run["run_id"] != run_id
        and default_id.fullmatch(run["run_id"])
        and run.get("task") == spec.task.kind
    ]
    if beside:
        log.warning(
            "run %s: %s already holds committed run(s) %s of another spec (the default run id "
            "holds the spec's digest): this run is added beside them, not in their place; "
            "--run-id with the id of the run to replace replaces it instead",
            run_id,
            date,
            ", ".join(beside),
        )


def sized_for_units(spec: JobSpec, plan: PoolPlan, units: int) -> tuple[JobSpec, PoolPlan]:
    """The spec's model placed (`runtime.predict_in: auto` settled for the run's size),
    compiled where `units` make it pay, and the pool no larger than their model calls, counting
    the units this run still processes: a scene's tiles once it is cut, less the sources an
    earlier attempt made durable (a DICOM instance counts one, a lower bound)."""
    placed = placed_for_units(spec.runtime, units)
    spec = as_run_in_driver(spec.model_copy(update={"runtime": placed}))
    spec = compiled_if_it_pays(spec, units)
    plan = pool_for_inputs(plan, spec.runtime, units)
    run_id, _ = spec.resolved_run()
    log.info(
        "run %s: %d units to process, %s %s, %d images per model call, %d files per read task",
        run_id,
        units,
        "predictor threads in the driver" if placed.predict_in == "driver" else "predictor pool",
        plan,
        spec.runtime.images_per_call,
        spec.runtime.files_per_read_task,
    )
    return spec, plan


def as_run_in_driver(spec: JobSpec) -> JobSpec:
    """The spec as the driver's threads run it (`runtime.predict_in: driver`): uncompiled
    (torch.compile is not thread-safe, and the driver's runs are short), and with glibc's
    handling of freed memory kept (`retain_host_memory` is for a predictor actor's process,
    not the driver's). Other specs as they are."""
    runtime = spec.runtime
    if runtime.predict_in != "driver":
        return spec
    if runtime.compile:
        log.info("runtime.predict_in: driver: the model runs uncompiled (in threads)")
    in_driver = runtime.model_copy(update={"compile": False, "retain_host_memory": False})
    return spec.model_copy(update={"runtime": in_driver})


def compiled_if_it_pays(spec: JobSpec, inputs: int) -> JobSpec:
    """The spec with `runtime.compile` as the run's size makes it pay: off for fewer than
    `compile_min_inputs` inputs, only where a node compiled the model before for fewer than
    `compile_min_inputs_cold` (a first compile costs several times a cached one), else as asked."""
    runtime = spec.runtime
    compiled_from = runtime.fewest_units_compiled
    if compiled_from is None or inputs >= max(runtime.compile_min_inputs_cold, compiled_from):
        return spec
    if inputs >= compiled_from:
        log.info(
            "%d inputs, under runtime.compile_min_inputs_cold=%d: the model is compiled only on "
            "nodes that compiled it before",
            inputs,
            runtime.compile_min_inputs_cold,
        )
        update = {"compile_only_where_cached": True}
    else:
        log.info(
            "%d inputs, under runtime.compile_min_inputs=%d: the model runs uncompiled",
            inputs,
            runtime.compile_min_inputs,
        )
        update = {"compile": False}
    return spec.model_copy(update={"runtime": runtime.model_copy(update=update)})


def _process_and_commit(
    spec: JobSpec,
    listing: AnyListing,
    plan: PoolPlan,
    lock: RunGuard,
    clock: StartupClock,
    retried: pa.Array | None,
) -> tuple[CommitResult, float, list[Drift] | None, dict[str, int]]:
    """Process the listing's units and commit them; `retried`: the source keys an incremental
    run processes again (`skip_committed`), None for a run that is not incremental. Returns
    the commit, the pipeline's seconds, the drift figures and what the run retried."""
    run_id, run_date = spec.resolved_run()
    units, schema, tiles = plan_units(spec, listing)
    expected: ExpectedUnits = tiles if tiles else listing
    identity = identity_digests(spec, listing, plan)
    sink = open_sink(spec, run_id, run_date, schema, identity)  # its format's (outputs.py)
    if sink.finished_earlier is not None:
        log.warning(
            "run %s: an earlier attempt of this run, killed past its commit point, is the "
            "run (its commit finished or tidied up as this one started): nothing to process",
            run_id,
        )
        manifest = committed_run(spec.output, run_id, spec.storage_options) or {}
        return sink.finished_earlier, 0.0, committed_drift(spec, run_id), dict(retried_of(manifest))
    units, tiles, left = resume_earlier_attempt(sink, units, tiles, listing.count)
    stats = RunStats()
    if left > 0:
        sized, pool = sized_for_units(spec, plan, left)
        for table in predicted_rows(sized, units, pool, schema, sink.attempt, tiles):
            written = time.perf_counter()
            rows = stats.record(table)
            sink.write(rows)
            stats.add_stage("commit", time.perf_counter() - written)
            lock.require_held()  # a run that lost its table stops here
    pipeline_seconds = stats.finish()
    details = stats.as_manifest(pipeline_seconds) | identity
    details["startup_seconds"] = stats.startup_seconds(clock)
    if left > 0:  # where the model ran: actors or driver (`auto` settled for the run's size)
        details["predict_in"] = sized.runtime.predict_in
    details["runner"] = "in_process" if isinstance(listing, HeldListing) else "ray"
    if spec.input.tiling is not None:  # the report shows a tile as the model saw it
        bands = spec.input.tiling.bands  # None: each scene's default (`raster.scene_bands`)
        details["tile_bands"] = list(bands) if bands is not None else None
    details["bits_stored"] = spec.input.bits_stored  # and a 16-bit image, as it saw it
    details["task_settings"] = spec.task.model_dump(mode="json")  # what its scorer can give
    retries = staged_retries(sink, retried)
    if retried is not None:  # an incremental run: what it processed again (drift's error rate)
        details["retried"] = retries
    drifts = staged_drift(spec, sink, schema, retries)
    if drifts is not None:
        details["drift"] = manifest_entry(drifts)
    commit = sink.commit(expected, details, lock.confirm_held)
    return commit, pipeline_seconds, drifts, retries


def staged_retries(sink: Sink, retried: pa.Array | None) -> dict[str, int]:
    """What the staged rows hold of the sources an incremental run retried (`retried_rows`);
    the rows are read only where it retried some."""
    if retried is None or not len(retried):
        return retried_record()
    return retried_rows(sink.staged(ROW_COLUMNS), retried)


def staged_drift(
    spec: JobSpec, sink: Sink, schema: pa.Schema, retries: dict[str, int]
) -> list[Drift] | None:
    """The run's drift figures (its staged rows against the committed runs before it, the
    spec's `monitor:`; `retries`: what of them an incremental run retried), for its manifest;
    None, with a warning, where they cannot be had (the run commits all the same, and
    `report --check` computes them)."""
    run_id, run_date = spec.resolved_run()
    run = {
        "run_id": run_id,
        "run_date": run_date.isoformat(),
        "task": task_of(schema),
        "retried": retries,
    }
    options = spec.storage_options
    try:
        return drift_at_commit(spec.output, spec.monitor, options, run, sink.staged)
    except (VisionOpsError, OSError, pa.ArrowException) as err:
        log.warning("run %s: drift figures not recorded: %s", run_id, err)
        return None


def committed_drift(spec: JobSpec, run_id: str) -> list[Drift] | None:
    """A committed run's drift figures (recorded at its commit where they still compare the
    same runs); None, with a warning, where they cannot be had."""
    try:
        return check_run(spec.output, spec.monitor, spec.storage_options, run_id)
    except (VisionOpsError, OSError, pa.ArrowException) as err:
        log.warning("run %s: drift figures not had: %s", run_id, err)
        return None


def resume_earlier_attempt(
    sink: Sink, units: UnitRows, tiles: ScenePlan | None, sources: int
) -> tuple[UnitRows, ScenePlan | None, int]:
    """The units (and scene plan) left once the sink has reused what an earlier attempt of
    the run id made durable (vision_ops.resume: whole sources only), and how many are left."""
    if tiles is None:
        done = sink.resume(image_units)
        if not done:
            return units, None, sources
        if isinstance(units, pa.Table):  # held here
            return without_sources(units, done), None, sources - len(done)
        left = units.map_batches(functools.partial(without_sources, sources=done), **BLOCKWISE)
        return left, None, sources - len(done)

    def tiles_of(uri: str, frames: int | None) -> Units:  # asked where earlier parts exist
        return tiles.facts.units(uri)

    done = sink.resume(tiles_of)
    if not done:
        return units, tiles, tiles.count
    kept = tiles.without(done, sum(tiles.facts.tiles[uri] for uri in done))
    return kept.units(), kept, kept.count


def plan_units(spec: JobSpec, listing: AnyListing) -> tuple[UnitRows, pa.Schema, ScenePlan | None]:
    """The units to process (the listing's dataset or the rows held here, or its scenes'
    tiles: planned in Ray tasks, vision_ops.pipeline.planning), the table's schema, and the
    scene plan where there is one."""
    schema = output_schema(
        spec.task.kind,
        dicom=spec.input.dicom is not None,
        tiles=spec.input.tiling is not None,
        instance=instance_output(getattr(spec.model, "architecture", None))
        if spec.task.kind == "detection"
        else None,
        fields=get_task(spec.task.kind).job_fields(spec),
    )
    if isinstance(listing, HeldListing):  # never tiled (JobSpec.ray_needed_for)
        return listing.rows, schema, None
    if spec.input.tiling is None:
        return listing.dataset, schema, None
    tiles = plan_scenes(listing, spec.input.tiling, spec.storage_options)
    log.info("%d scenes cut into %d tiles", listing.count, tiles.count)
    metadata = (schema.metadata or {}) | tiles.parquet_metadata()
    return tiles.units(), schema.with_metadata(metadata), tiles


def merged_per_scene(
    spec: JobSpec, rows: ray.data.Dataset, tiles: ScenePlan | None
) -> ray.data.Dataset:
    """Detection over tiled scenes: each scene's rows merged in Ray (ScenePlan.merged)."""
    if tiles is None or not spec.merges_scene_rows:
        return rows
    assert isinstance(spec.task, DetectionTask)
    return tiles.merged(rows, spec.task.seam_overlap)


def with_limits(dataset: ray.data.Dataset, runtime: RuntimeSpec) -> ray.data.Dataset:
    """The dataset set to fail when no stage makes progress for `stall_timeout_s`, to let a
    map task make `MAP_TASK_BLOCKS_AHEAD` blocks before they are taken, and to keep its object
    store use within `queue_mb` where the spec sets it."""
    context = dataset.context
    context.execution_no_progress_timeout_s = runtime.stall_timeout_s
    context._max_num_blocks_in_streaming_gen_buffer = MAP_TASK_BLOCKS_AHEAD
    if runtime.queue_mb is not None:
        limits = context.execution_options.resource_limits
        budget = runtime.queue_mb * MB
        context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    return dataset


def unit_blocks(units: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """The units (the listing, or tiles cut from it) in blocks of `rows` rows, one read task
    each, split as they stream, never gathered."""
    return units.repartition(target_num_rows_per_block=rows)


def predicted_rows(
    spec: JobSpec,
    listing: UnitRows,
    plan: PoolPlan,
    schema: pa.Schema,
    attempt: str,
    tiles: ScenePlan | None,
) -> Iterable[pa.Table]:
    """The run's rows as they reach the driver: read, predicted (by the actor pool, or in the
    driver's threads: `runtime.predict_in`; in this process, for a listing held here) and
    built; segmentation masks are staged for commit `attempt`."""
    stages = RowStages.of(spec, schema, attempt)
    if isinstance(listing, pa.Table):
        return rows_in_process(spec, listing, plan, stages)
    units = read_units(spec, listing, plan)
    if spec.runtime.predict_in == "driver":
        return rows_in_driver(spec, units, plan, stages)
    return rows_from_actors(spec, units, plan, stages, tiles)


def rows_in_driver(
    spec: JobSpec, units: ray.data.Dataset, plan: PoolPlan, stages: RowStages
) -> Iterable[pa.Table]:
    """The pool as threads of the driver (pipeline/in_driver.py), each with an actor's torch
    threads, staging its batches' masks and building their rows itself (the spec as
    `as_run_in_driver` made it)."""
    batches = with_limits(units, spec.runtime).iter_batches(
        batch_size=spec.runtime.images_per_call, batch_format="numpy"
    )
    return predicted_in_driver(spec, batches, plan, stages)


def rows_in_process(
    spec: JobSpec, listing: pa.Table, plan: PoolPlan, stages: RowStages
) -> Iterator[pa.Table]:
    """The listing held here read in this process's threads and predicted in its threads, as
    `rows_in_driver` does with Ray's read tasks (pipeline/in_process.py); the reads stopped
    as the rows end, however they end (a failure, Ctrl-C, a consumer that stops)."""
    runtime = spec.runtime
    read = unit_reader(spec, resolve_preprocessing(spec.model, spec.task.kind))
    blocks = read_in_threads(listing, read, runtime.files_per_read_task, plan.read_tasks or 1)
    batches = model_batches(blocks, runtime.images_per_call)
    try:
        yield from predicted_in_driver(spec, batches, plan, stages)
    finally:
        batches.close()
        blocks.close()


def predicted_in_driver(
    spec: JobSpec, batches: Iterable[dict[str, Any]], plan: PoolPlan, stages: RowStages
) -> Iterator[pa.Table]:
    """The batches' rows from the pool's predictors as threads of this process
    (`in_driver.predicted_in_threads`), its freed heap given back as they pass
    (`host_memory.heap_trimmed`: the threads' arenas would hold it)."""
    load = functools.partial(predictor_in_thread, spec, plan.threads, stages)
    return heap_trimmed(predicted_in_threads(batches, load, plan.max_size))


def predictor_in_thread(
    spec: JobSpec, threads: int | None, stages: RowStages
) -> Callable[[dict[str, Any]], pa.Table]:
    """One driver thread's predictor: a batch to its rows, masks staged on the way."""
    predict = PredictRows(spec, threads, stages.in_predictor)
    return lambda batch: stages.after_predictor(predict(batch))


def rows_from_actors(
    spec: JobSpec,
    units: ray.data.Dataset,
    plan: PoolPlan,
    stages: RowStages,
    tiles: ScenePlan | None,
) -> Iterable[pa.Table]:
    """The predictor actor pool's rows, masks staged and rows built in Ray after it where the
    task writes masks, a tiled scene's detections merged."""
    predictions = units.map_batches(
        PredictRows,
        fn_constructor_kwargs={
            "spec": spec,
            "threads": plan.threads,
            "to_rows": stages.in_predictor,
        },
        compute=ActorPoolStrategy(min_size=plan.min_size, max_size=plan.max_size),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        batch_size=spec.runtime.images_per_call,
        batch_format="numpy",
    )
    if stages.stage_masks is not None:
        predictions = predictions.map_batches(
            stages.after_predictor, batch_format="numpy", batch_size=None
        )
    rows = with_limits(merged_per_scene(spec, predictions, tiles), spec.runtime)
    return rows.iter_batches(batch_format="pyarrow", batch_size=None)


@dataclass(frozen=True)
class RowStages:
    """What turns a model batch's predictions into table rows: `to_rows`, in the predictor
    itself unless the task stages masks first (`stage_masks`, then `to_rows`, after it)."""

    to_rows: Callable[..., pa.Table]
    stage_masks: Callable[..., dict[str, Any]] | None

    @classmethod
    def of(cls, spec: JobSpec, schema: pa.Schema, attempt: str) -> RowStages:
        run_id, run_date = spec.resolved_run()
        task = get_task(spec.task.kind)
        to_rows = functools.partial(
            task.rows,
            run_id=run_id,
            labels=resolve_labels(spec.model, spec.storage_options),
            schema=schema,
        )
        if not task.writes_masks(spec):
            return cls(to_rows, None)
        stage_masks = functools.partial(
            write_masks,
            root_uri=spec.output.files_uri,
            run_id=run_id,
            run_date=run_date,
            attempt=attempt,
            storage_options=spec.storage_options,
        )
        return cls(to_rows, stage_masks)

    @property
    def in_predictor(self) -> Callable[..., pa.Table] | None:
        return self.to_rows if self.stage_masks is None else None

    def after_predictor(self, predictions: pa.Table | dict[str, Any]) -> pa.Table:
        """The rows of a batch the predictor returned: as they are, or its masks staged and
        its rows built."""
        if self.stage_masks is None:
            assert isinstance(predictions, pa.Table)
            return predictions
        return self.to_rows(self.stage_masks(predictions))


def read_units(spec: JobSpec, listing: ray.data.Dataset, plan: PoolPlan) -> ray.data.Dataset:
    """The units read (and decoded, where the spec's runtime says so) in Ray tasks, in blocks
    of at most a model batch."""
    # One read task per read batch: its images reach the model as soon as they are decoded
    # (Ray Data would otherwise coalesce a task's output into one block), and there are enough
    # tasks to keep every free core decoding.
    blocks = unit_blocks(listing, spec.runtime.files_per_read_task)
    reader = unit_reader(spec, resolve_preprocessing(spec.model, spec.task.kind))
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
    return model_batch_blocks(units, spec)


def model_batch_blocks(units: ray.data.Dataset, spec: JobSpec) -> ray.data.Dataset:
    """The read tasks' blocks cut into blocks of one model batch where a block can hold more:
    a read task fetches several batches (`decode: device`), or a DICOM instance gives a unit
    per frame. An actor's rows leave it a task at a time, one task per block, so the first rows
    reach the driver after one model call, not after a read task's many (docs/performance.md,
    "First rows a model batch at a time")."""
    runtime = spec.runtime
    if runtime.files_per_read_task <= runtime.images_per_call and spec.input.dicom is None:
        return units  # a unit per file: a read task's block is at most one model batch
    return units.repartition(target_num_rows_per_block=runtime.images_per_call)


class PredictRows:
    """One actor call from a read batch to its rows: the task's predictor, then the table builder
    unless a later stage (segmentation masks) needs the raw predictions. Rows leave the actor as
    Arrow, and no CPU task waits beside the read tasks for a core to build them."""

    def __init__(
        self, spec: JobSpec, threads: int | None, to_rows: Callable[..., pa.Table] | None
    ) -> None:
        self.startup = ActorStartup()
        loading = time.perf_counter()
        self.predict = load_predictor(spec, threads)
        self.startup.ready(time.perf_counter() - loading, self.predict.compile_seconds)
        self.to_rows = to_rows

    def __call__(self, batch: dict[str, Any]) -> pa.Table | dict[str, Any]:
        predictions = self.predict(batch) | self.startup.columns(len(batch["status"]))
        return self.to_rows(predictions) if self.to_rows else predictions
