"""The two ceilings: our read path on every core with no model, and the model with no reading."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vision_ops.benchmark.isolated import in_a_fresh_process
from vision_ops.benchmark.probes import sampled_peaks
from vision_ops.benchmark.readpool import read_crop, timed_read
from vision_ops.benchmark.report import Measurement
from vision_ops.benchmark.spec import APPROACHES
from vision_ops.benchmark.workload import Workload
from vision_ops.config import JobSpec, Preprocessing
from vision_ops.models import resolve_preprocessing
from vision_ops.predictors import load_predictor
from vision_ops.schema import STATUS_OK

# What approach (a) runs for each runtime.decode: the pipeline's own decoding of a photo.
DECODERS = {
    "tasks": "decode_image + resize_and_crop (Pillow, no torch)",
    "device": "torchvision decode_jpeg + resize + crop on the CPU, 1 thread each",
}
MODEL_POOL_IMAGES = 256  # distinct pre-decoded crops the model-only loop cycles through
WARM_UP_BATCHES = 2


def decode_ceiling(work: Workload) -> Measurement:
    """(a) Images/s of file read + decode + resize + crop in one process per core, timed once
    the processes are up with their imports done; the wall time includes starting them."""
    spec = work.job()
    preprocessing = _preprocessing(spec)
    paths = [str(path) for path in work.paths]
    cores, decode = work.bench.cores, spec.runtime.decode
    with sampled_peaks(work.bench.sample_interval_s, work.excluded) as peaks:
        started = time.perf_counter()
        rows, seconds = timed_read(paths, preprocessing, spec.input.max_pixels, cores, decode)
        wall = time.perf_counter() - started
    return Measurement(
        key="a",
        approach=APPROACHES["a"],
        rows=rows,
        expected_rows=work.images,
        images_per_second=rows / seconds,
        steady_state=True,
        wall_seconds=wall,
        peaks=peaks,
        includes=f"file read + {DECODERS[decode]} in {cores} processes; process start-up "
        "excluded from img/s, included in wall",
    )


def _preprocessing(spec: JobSpec) -> Preprocessing:
    """The crop the pipeline's read tasks make for this spec (models.resolve_preprocessing)."""
    preprocessing = resolve_preprocessing(spec.model, spec.task.kind)
    if preprocessing is None:
        raise ValueError("the bench's job spec has no preprocessing")
    return preprocessing


def model_batches(work: Workload, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Whole batches of pre-decoded crops (uint8 (B, 224, 224, 3)) the model-only loop cycles."""
    spec = work.job()
    preprocessing = _preprocessing(spec)
    paths = work.paths
    count = batch_size * max(1, -(-min(len(paths), MODEL_POOL_IMAGES) // batch_size))
    crops = [
        read_crop(str(paths[i % len(paths)]), preprocessing, spec.input.max_pixels)
        for i in range(count)
    ]
    images = np.stack(crops)
    status = np.full(batch_size, STATUS_OK, dtype=object)
    return [
        {"image": images[start : start + batch_size], "status": status}
        for start in range(0, count, batch_size)
    ]


def batches_of(pool: list[dict[str, np.ndarray]], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """`rows` images in the pool's batches, cycled; the last one cut short (views, no copies)."""
    size = len(pool[0]["status"])
    for index, start in enumerate(range(0, rows, size)):
        batch, take = pool[index % len(pool)], min(size, rows - start)
        yield batch if take == size else {name: col[:take] for name, col in batch.items()}


@dataclass(frozen=True)
class ModelTiming:
    rates: list[float]  # images/s of each timed pass
    device: str
    threads: int
    compiled: bool  # torch.compile'd (the spec's runtime.compile, whatever the run's size)


def model_ceiling(work: Workload) -> Measurement:
    """(b) The pipeline's own Classifier called on uint8 crop batches, torch on every core: the
    median of `repeats` timed passes over N images, after a warm-up. It runs in a child process
    set up as a predictor actor is (host memory kept for reuse), which leaves this process, and
    the peers measured in it after, as they were. Compiled where the spec compiles at all, at
    any size: the model's best rate (the pipeline compiles only runs long enough to pay for it,
    so at N its actors may run eagerly and its ratios against b understate it)."""
    spec = work.job()
    pool = model_batches(work, spec.runtime.images_per_call)
    with sampled_peaks(work.bench.sample_interval_s, work.excluded) as peaks:
        started = time.perf_counter()
        args = (spec, pool, work.images, work.bench.repeats, work.bench.cores)
        timing = in_a_fresh_process(time_model, *args)
        wall = time.perf_counter() - started
    return Measurement(
        key="b",
        approach=APPROACHES["b"],
        rows=work.images,
        expected_rows=work.images,
        images_per_second=statistics.median(timing.rates),
        steady_state=True,
        wall_seconds=wall,
        peaks=peaks,
        includes=f"vision_ops Classifier on {timing.device}, {timing.threads} torch threads, "
        f"batch {spec.runtime.images_per_call}, {'compiled' if timing.compiled else 'eager'}: "
        f"median of {len(timing.rates)} passes after "
        "warm-up, in a child process; its start, model load and warm-up included in wall; "
        "decoding excluded",
        details={
            "repeat_images_per_second": timing.rates,
            "device": timing.device,
            "compiled": timing.compiled,
        },
    )


def time_model(
    spec: JobSpec, pool: list[dict[str, np.ndarray]], images: int, repeats: int, cores: int
) -> ModelTiming:
    """Timed passes of a predictor over `images` images from the pool, in this process."""
    predictor = load_predictor(spec)  # set up as the pipeline's actors are
    torch.set_num_threads(cores)  # after the predictor: it may set its own
    for batch in pool[:WARM_UP_BATCHES]:
        predictor(batch)
    rates: list[float] = []
    for _ in range(repeats):
        timed = time.perf_counter()
        rows = sum(len(predictor(batch)["status"]) for batch in batches_of(pool, images))
        rates.append(rows / (time.perf_counter() - timed))
    compiled = predictor.static_batch > 0
    return ModelTiming(rates, predictor.device.type, torch.get_num_threads(), compiled)
