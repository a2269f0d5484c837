"""(c) The pipeline end to end: `run_job` on the bench's job, from local files and from S3."""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vision_ops.benchmark.local_ray import joined_ray, local_ray, on_cores, running_cluster
from vision_ops.benchmark.probes import sampled_peaks
from vision_ops.benchmark.rates import steady_rate
from vision_ops.benchmark.report import Measurement
from vision_ops.benchmark.workload import Workload
from vision_ops.config import JobSpec
from vision_ops.devstack import LOCAL_CREDENTIALS, SeaweedS3
from vision_ops.models import resolve_preprocessing
from vision_ops.sink import committed_run, read_committed_file

PHOTO_BUCKET, OUTPUT_BUCKET = "bench-photos", "bench-out"
SCALING_TARGET = 1.15  # N -> scale x N images may raise the pipeline's peak RSS by < 15 %
INCLUDES = (
    "run_job: listing, Ray start-up, read/decode tasks, the predictors (actors; g: the "
    "driver's threads; i: no Ray, reads and predictors in the job's threads) and their model "
    "load, "
    "Parquet commit; img/s from the manifest's progress between every actor's first block and "
    "its last, so start-up and drain are excluded; wall includes ray.init (h: joining the "
    "running cluster)"
)
# c is the actor pool at every size, g the driver's threads; h, on a running cluster, as a
# user's run settles `predict_in: auto` between them by its size
# (vision_ops.pool.placed_for_units).
IN_ACTORS = {"predict_in": "actors"}
IN_DRIVER = {"predict_in": "driver"}
AS_SIZED = {"predict_in": "auto"}
IN_PROCESS = {"runner": "in_process"}


@dataclass(frozen=True)
class Source:
    """Where a pipeline run reads and writes."""

    key: str
    approach: str
    input_uri: str
    output_uri: str
    storage_options: dict[str, dict[str, Any]]
    # Over the job's runtime settings: the actor pool unless said otherwise.
    runtime: dict[str, Any] = field(default_factory=lambda: dict(IN_ACTORS))
    # Joins a cluster started (and past a first job) before the measurement, not one of its
    # own started inside it.
    on_running_cluster: bool = False

    @property
    def without_ray(self) -> bool:
        """Runs in the bench's job process alone: no Ray started for it."""
        return self.runtime.get("runner") == "in_process"


def local_source(work: Workload, key: str = "c") -> Source:
    output = str(work.output_dir(f"e2e-{key}"))
    return Source(key, "vision-ops pipeline, local files", str(work.photos), output, {})


def driver_source(work: Workload, key: str = "g") -> Source:
    """Local files, the model in the driver's threads (`runtime.predict_in: driver`)."""
    output = str(work.output_dir(f"e2e-{key}"))
    approach = "vision-ops pipeline, model in the driver"
    return Source(key, approach, str(work.photos), output, {}, IN_DRIVER)


def running_cluster_source(work: Workload, key: str = "h") -> Source:
    """Local files, on a long-lived cluster started before the measurement (a nightly job's
    cluster), the model placed as `runtime.predict_in: auto` places it for the run's size."""
    output = str(work.output_dir(f"e2e-{key}"))
    approach = "vision-ops pipeline, on a running cluster"
    return Source(key, approach, str(work.photos), output, {}, AS_SIZED, on_running_cluster=True)


def in_process_source(work: Workload, key: str = "i") -> Source:
    """Local files, the whole run in the job's one process, Ray not started
    (`runtime.runner: in_process`)."""
    output = str(work.output_dir(f"e2e-{key}"))
    approach = "vision-ops pipeline, in one process"
    return Source(key, approach, str(work.photos), output, {}, IN_PROCESS)


def pipeline_run(work: Workload, source: Source) -> tuple[Measurement, dict[str, int]]:
    """One committed run of the bench's job; its measurement and each photo's top-1 label."""
    run_id = f"bench-{source.key}"
    spec = work.job(source.input_uri, source.output_uri, run_id, source.storage_options)
    runtime = spec.runtime.model_validate(spec.runtime.model_dump() | source.runtime)
    spec = spec.model_copy(update={"runtime": runtime})
    cores = work.bench.cores
    with contextlib.ExitStack() as cluster:
        address = cluster.enter_context(running_cluster(cores)) if source.on_running_cluster else ""
        with sampled_peaks(work.bench.sample_interval_s, work.excluded) as peaks:
            started = time.perf_counter()
            with _cluster(source, address, cores):
                from vision_ops.pipeline import run_job

                summary = run_job(spec)
                wall = time.perf_counter() - started
    manifest = committed_run(source.output_uri, run_id, source.storage_options) or {}
    progress = [(float(t), int(rows)) for t, rows in manifest.get("progress", [])]
    steady = steady_rate(progress, edge_rows=pool_blocks(spec))
    commit = summary.commit
    measurement = Measurement(
        key=source.key,
        approach=source.approach,
        rows=commit.ok,
        expected_rows=work.images,
        images_per_second=steady or summary.images_per_second,
        steady_state=steady is not None,
        wall_seconds=wall,
        peaks=peaks,
        includes=INCLUDES,
        details={
            "run_seconds": summary.seconds,
            "pipeline_seconds": summary.pipeline_seconds,
            "pipeline_images_per_second": summary.images_per_second,
            "error_rows": commit.errors,
            "stage_seconds": manifest.get("stage_seconds"),
            "startup_seconds": manifest.get("startup_seconds"),
            "runtime": spec.runtime.model_dump(),
            "predict_in": manifest.get("predict_in"),
        },
        queued_share=queued_share(spec, commit.ok, peaks.object_store_bytes),
    )
    return measurement, committed_top1(source, run_id)


def _cluster(source: Source, address: str, cores: int) -> contextlib.AbstractContextManager[Any]:
    """What the timed run runs on: the running cluster at `address`, a local Ray of `cores`
    CPUs started inside the measurement, or this process pinned to `cores` CPUs."""
    if address:
        return joined_ray(address)
    return on_cores(cores) if source.without_ray else local_ray(cores)


def queued_share(spec: JobSpec, rows: int, object_store_bytes: int | None) -> float | None:
    """The object store's peak over the bytes of the run's decoded crops (uint8, crop x crop x
    3 each), where the read tasks decode (`runtime.decode: tasks`); else None: with `device`
    they queue encoded files and the actors decode inside the steady window. None too where the
    store's use was not seen."""
    preprocessing = resolve_preprocessing(spec.model, spec.task.kind)
    if spec.runtime.decode != "tasks" or preprocessing is None or object_store_bytes is None:
        return None
    return object_store_bytes / (rows * preprocessing.crop**2 * 3) if rows else None


def pool_blocks(spec: JobSpec) -> int:
    """Rows of one output block from every actor: an actor hands on a model batch at a time
    (pipeline.run.model_batch_blocks), and the pool's first (and last) blocks come at once."""
    runtime = spec.runtime
    return (runtime.max_actors or runtime.min_actors or 1) * runtime.images_per_call


def committed_top1(source: Source, run_id: str) -> dict[str, int]:
    """Photo file name -> top-1 class id, from the run's committed files."""
    manifest = committed_run(source.output_uri, run_id, source.storage_options) or {}
    found: dict[str, int] = {}
    for entry in manifest.get("files", []):
        table = read_committed_file(
            entry["uri"], source.storage_options, ["source_uri", "label_id"]
        )
        for uri, label in zip(
            table["source_uri"].to_pylist(), table["label_id"].to_pylist(), strict=True
        ):
            if label is not None:
                found[posixpath.basename(uri)] = int(label)
    return found


@contextlib.contextmanager
def s3_source(work: Workload) -> Iterator[Source]:
    """The photos uploaded to a SeaweedFS server started here (its memory not counted); the
    run reads and writes s3://. The server stops when the block ends."""
    saved = {name: os.environ.get(name) for name in LOCAL_CREDENTIALS}
    os.environ.update(LOCAL_CREDENTIALS)  # before Ray starts: its workers inherit them
    try:
        with SeaweedS3(buckets=(PHOTO_BUCKET, OUTPUT_BUCKET)) as server:
            pid = server.process.pid if server.process else None
            work.exclude_pids.add(pid or -1)
            options = server.storage_options()
            upload(work, options)
            yield Source(
                "c-s3",
                "vision-ops pipeline, s3:// in and out",
                f"s3://{PHOTO_BUCKET}/photos/",
                f"s3://{OUTPUT_BUCKET}/e2e",
                {"s3": options},
            )
            work.exclude_pids.discard(pid or -1)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def upload(work: Workload, options: dict[str, Any]) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.put([str(path) for path in work.paths], f"{PHOTO_BUCKET}/photos/")


def scaling(base: Measurement, scaled: Measurement) -> dict[str, Any]:
    """Peak memory of the pipeline at N and at scale x N images, and their ratios."""
    rss = [base.peaks.rss_bytes, scaled.peaks.rss_bytes]
    pss = [base.peaks.pss_bytes, scaled.peaks.pss_bytes]
    ratio = rss[1] / rss[0] if rss[0] else float("nan")
    return {
        "images": [base.rows, scaled.rows],
        "peak_rss_bytes": rss,
        "peak_pss_bytes": pss,
        "rss_ratio": ratio,
        "pss_ratio": pss[1] / pss[0] if pss[0] else float("nan"),
        "target_ratio": SCALING_TARGET,
        "within_target": ratio < SCALING_TARGET,
    }
