"""Run the chosen approaches on one workload, in order, and check what each produced."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vision_ops.benchmark.ceilings import decode_ceiling, model_ceiling
from vision_ops.benchmark.e2e import (
    driver_source,
    in_process_source,
    local_source,
    pipeline_run,
    running_cluster_source,
    s3_source,
    scaling,
)
from vision_ops.benchmark.isolated import in_a_fresh_process
from vision_ops.benchmark.peers import daft_job, dataloader_loop, naive_ray
from vision_ops.benchmark.report import (
    CEILINGS,
    JOBS,
    SCALE_SUFFIX,
    SCALED,
    BenchReport,
    Measurement,
    scaled,
)
from vision_ops.benchmark.spec import BenchSpec
from vision_ops.benchmark.weights import TOP_K
from vision_ops.benchmark.workload import Workload, photo_description, prepare
from vision_ops.errors import in_one_line
from vision_ops.registry import Registry

log = logging.getLogger(__name__)
REFERENCE = "e"  # top-1 agreement is measured against the DataLoader's predictions
VERSIONS = ("ray", "torch", "torchvision", "pillow", "daft")


@dataclass
class Run:
    """The workload, the report being filled and each approach's top-1 label by photo name."""

    work: Workload
    report: BenchReport
    top1: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, measurement: Measurement, top1: dict[str, int] | None = None) -> Measurement:
        log.info(
            "%s (%s): %d rows, %.1f img/s, %.1f s",
            measurement.key,
            measurement.approach,
            measurement.rows,
            measurement.images_per_second,
            measurement.wall_seconds,
        )
        self.report.measurements.append(measurement)
        if top1 is not None:
            self.top1[measurement.key] = top1
        return measurement


Step = Callable[[Run, Workload, str], None]
STEPS: Registry[Step] = Registry("bench approach")


@STEPS.register("a")
def _decode_ceiling(run: Run, work: Workload, key: str) -> None:
    run.add(decode_ceiling(work))


@STEPS.register("b")
def _model_ceiling(run: Run, work: Workload, key: str) -> None:
    run.add(model_ceiling(work))


@STEPS.register("c")
def _pipeline(run: Run, work: Workload, key: str) -> None:
    """Local files."""
    run.add(*pipeline_run(work, local_source(work, key)))


def _pipeline_from_s3(run: Run, work: Workload, key: str) -> None:
    """The same from S3 (c-s3, at N, where asked: after c, in a process of its own)."""
    with s3_source(work) as source:
        run.add(*pipeline_run(work, source))


@STEPS.register("g")
def _pipeline_in_driver(run: Run, work: Workload, key: str) -> None:
    run.add(*pipeline_run(work, driver_source(work, key)))


@STEPS.register("h")
def _pipeline_on_a_running_cluster(run: Run, work: Workload, key: str) -> None:
    run.add(*pipeline_run(work, running_cluster_source(work, key)))


@STEPS.register("i")
def _pipeline_in_one_process(run: Run, work: Workload, key: str) -> None:
    run.add(*pipeline_run(work, in_process_source(work, key)))


@STEPS.register("d")
def _naive_ray(run: Run, work: Workload, key: str) -> None:
    run.add(*naive_ray(work, key))


@STEPS.register("e")
def _dataloader(run: Run, work: Workload, key: str) -> None:
    run.add(*dataloader_loop(work, key))


@STEPS.register("f")
def _daft(run: Run, work: Workload, key: str) -> None:
    run.add(*daft_job(work, key))


def run_bench(bench: BenchSpec) -> BenchReport:
    """Every approach `bench.only` names, on the same photos, and every job (the pipeline and
    its peers) again on scale x N photos where asked; the report with its checks."""
    work = prepare(bench)
    run = Run(work, BenchReport(settings(work)))
    scaled_work = work.with_images(work.images * bench.scale) if bench.scale > 1 else None
    for key in bench.only:
        run_step(run, work, STEPS.get(key), key)
        if key == "c" and bench.s3:
            run_step(run, work, _pipeline_from_s3, "c-s3")
        if scaled_work is not None and key in JOBS:
            run_step(run, scaled_work, STEPS.get(key), scaled(key))
            run.report.measurements[-1].approach += f", {bench.scale}x N"
    by_key = {m.key: m for m in run.report.measurements}
    if "c" in by_key and SCALED in by_key:
        run.report.scaling = scaling(by_key["c"], by_key[SCALED])
    record_agreement(run)
    run.report.problems = row_problems(run.report.measurements)
    return run.report


def run_step(run: Run, work: Workload, step: Step, key: str) -> None:
    """`step`, measured as `key`: a job (the pipeline, a peer, at any size) in a fresh process
    of its own, as a user runs it (`in_a_fresh_process`); a ceiling in this one."""
    if key in CEILINGS:
        step(run, work, key)
        return
    for measurement, top1 in in_a_fresh_process(step_alone, work, step, key):
        run.add(measurement, top1)


def step_alone(
    work: Workload, step: Step, key: str
) -> list[tuple[Measurement, dict[str, int] | None]]:
    """`step` in this (child) process: its measurements, each with its top-1 labels and the
    process that ran it. An error that does not pickle comes back as `Type: first line`."""
    run = Run(work, BenchReport({}))
    try:
        step(run, work, key)
    except Exception as err:
        try:
            pickle.dumps(err)
        except Exception:
            log.debug("bench %s failed", key, exc_info=True)
            raise RuntimeError(f"bench {key}: {in_one_line(err)}") from None
        raise
    for measurement in run.report.measurements:
        measurement.details["process_id"] = os.getpid()
    return [(m, run.top1.get(m.key)) for m in run.report.measurements]


def record_agreement(run: Run) -> None:
    """Each approach's share of photos whose top-1 equals the DataLoader's (on shared photos)."""
    for measurement in run.report.measurements:
        at_scale = measurement.key.endswith(SCALE_SUFFIX)
        reference = run.top1.get(scaled(REFERENCE) if at_scale else REFERENCE)
        found = run.top1.get(measurement.key)
        if not reference:
            continue
        shared = sorted(set(found or ()) & set(reference))
        if found and shared:
            same = sum(found[name] == reference[name] for name in shared)
            measurement.top1_agreement = same / len(shared)


def row_problems(measurements: list[Measurement]) -> list[str]:
    """Each approach must have produced exactly one prediction per photo."""
    problems = []
    for m in measurements:
        if m.rows != m.expected_rows:
            problems.append(
                f"{m.key} ({m.approach}): {m.rows} predictions, expected {m.expected_rows}"
            )
        distinct = m.details.get("distinct_photos")
        if distinct is not None and distinct != m.rows:
            problems.append(f"{m.key} ({m.approach}): {m.rows} rows for {distinct} distinct photos")
        if m.details.get("error_rows"):
            problems.append(f"{m.key} ({m.approach}): {m.details['error_rows']} error rows")
    return problems


def settings(work: Workload) -> dict[str, Any]:
    bench = work.bench
    return {
        "model": f"{bench.architecture} (random weights, seed {bench.seed}) top-{TOP_K} at 224 px",
        "images": bench.images,
        "photo": photo_description(),
        "batch_size": work.batch_size,
        "device": work.device().type,
        "cores": bench.cores,
        "approaches": list(bench.only),
        "s3": bench.s3,
        "scale": bench.scale,
        "repeats": bench.repeats,
        "sample_interval_s": bench.sample_interval_s,
        "runtime": work.job().runtime.model_dump(),
        "workdir": str(bench.workdir),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in VERSIONS},
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
