"""Run the chosen approaches on one workload, in order, and check what each produced."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vision_ops.benchmark.ceilings import decode_ceiling, model_ceiling
from vision_ops.benchmark.e2e import local_source, pipeline_run, s3_source, scaling
from vision_ops.benchmark.peers import daft_job, dataloader_loop, naive_ray
from vision_ops.benchmark.report import SCALED, BenchReport, Measurement
from vision_ops.benchmark.spec import BenchSpec
from vision_ops.benchmark.weights import TOP_K
from vision_ops.benchmark.workload import Workload, photo_description, prepare
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


Step = Callable[[Run], None]
STEPS: Registry[Step] = Registry("bench approach")


@STEPS.register("a")
def _decode_ceiling(run: Run) -> None:
    run.add(decode_ceiling(run.work))


@STEPS.register("b")
def _model_ceiling(run: Run) -> None:
    run.add(model_ceiling(run.work))


@STEPS.register("c")
def _pipeline(run: Run) -> None:
    """Local files; then the memory-scaling run where asked; then S3 where asked."""
    work = run.work
    base = run.add(*pipeline_run(work, local_source(work)))
    if work.bench.scale > 1:
        scaled_work = work.with_images(work.images * work.bench.scale)
        scaled, top1 = pipeline_run(scaled_work, local_source(scaled_work, SCALED))
        scaled.approach = f"vision-ops pipeline, local, {work.bench.scale}x images"
        run.add(scaled, top1)
        run.report.scaling = scaling(base, scaled)
    if work.bench.s3:
        with s3_source(work) as source:
            run.add(*pipeline_run(work, source))


@STEPS.register("d")
def _naive_ray(run: Run) -> None:
    run.add(*naive_ray(run.work))


@STEPS.register("e")
def _dataloader(run: Run) -> None:
    run.add(*dataloader_loop(run.work))


@STEPS.register("f")
def _daft(run: Run) -> None:
    run.add(*daft_job(run.work))


def run_bench(bench: BenchSpec) -> BenchReport:
    """Every approach `bench.only` names, on the same photos; the report with its checks."""
    work = prepare(bench)
    run = Run(work, BenchReport(settings(work)))
    for key in bench.only:
        STEPS.get(key)(run)
    record_agreement(run)
    run.report.problems = row_problems(run.report.measurements)
    return run.report


def record_agreement(run: Run) -> None:
    """Each approach's share of photos whose top-1 equals the DataLoader's (on shared photos)."""
    reference = run.top1.get(REFERENCE)
    if not reference:
        return
    for measurement in run.report.measurements:
        found = run.top1.get(measurement.key)
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
