"""The two ceilings: our read path on every core with no model, and the model with no reading."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vision_ops.benchmark.probes import sampled_peaks
from vision_ops.benchmark.readpool import timed_read
from vision_ops.benchmark.report import Measurement
from vision_ops.benchmark.spec import APPROACHES
from vision_ops.benchmark.workload import Workload
from vision_ops.config import JobSpec, Preprocessing
from vision_ops.decode import decode_image
from vision_ops.models import resolve_preprocessing
from vision_ops.predictors import Classifier
from vision_ops.schema import STATUS_OK
from vision_ops.transforms import resize_and_crop

MODEL_POOL_IMAGES = 256  # distinct pre-decoded crops the model-only loop cycles through
WARM_UP_BATCHES = 2


def read_crop(path: str, preprocessing: Preprocessing, max_pixels: int) -> np.ndarray:
    """The pipeline's read task for one local file: bytes -> RGB -> model-input crop."""
    image = decode_image(Path(path).read_bytes(), max_pixels)
    return resize_and_crop(image, preprocessing)


def decode_ceiling(work: Workload) -> Measurement:
    """(a) Images/s of file read + decode + resize + crop in one process per core, timed once
    the processes are up with their imports done; the wall time includes starting them."""
    spec = work.job()
    preprocessing = _preprocessing(spec)
    paths = [str(path) for path in work.paths]
    cores = work.bench.cores
    with sampled_peaks(work.bench.sample_interval_s, work.excluded) as peaks:
        started = time.perf_counter()
        rows, seconds = timed_read(paths, preprocessing, spec.input.max_pixels, cores)
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
        includes=f"file read + decode_image + resize_and_crop in {cores} processes (no torch); "
        "process start-up excluded from img/s, included in wall",
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


def model_ceiling(work: Workload) -> Measurement:
    """(b) The pipeline's own Classifier called in-process on uint8 crop batches, torch on every
    core: the median of `repeats` timed passes over N images, after a warm-up."""
    spec = work.job()
    pool = model_batches(work, spec.runtime.batch_size)
    rates: list[float] = []
    with sampled_peaks(work.bench.sample_interval_s, work.excluded) as peaks:
        started = time.perf_counter()
        predictor = Classifier(spec)
        torch.set_num_threads(work.bench.cores)  # after the predictor: it may set its own
        for batch in pool[:WARM_UP_BATCHES]:
            predictor(batch)
        for _ in range(work.bench.repeats):
            timed = time.perf_counter()
            rows = sum(len(predictor(batch)["status"]) for batch in batches_of(pool, work.images))
            rates.append(rows / (time.perf_counter() - timed))
        wall = time.perf_counter() - started
    return Measurement(
        key="b",
        approach=APPROACHES["b"],
        rows=rows,
        expected_rows=work.images,
        images_per_second=statistics.median(rates),
        steady_state=True,
        wall_seconds=wall,
        peaks=peaks,
        includes=f"vision_ops Classifier on {predictor.device.type}, {torch.get_num_threads()} "
        f"torch threads, batch {spec.runtime.batch_size}: median of {len(rates)} passes "
        "after warm-up; model load, warm-up included in wall; decoding excluded",
        details={"repeat_images_per_second": rates, "device": predictor.device.type},
    )
