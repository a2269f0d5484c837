"""A pool of plain Python processes running the pipeline's read path on shards of local files.

Each worker imports only what the decoder imports (for read tasks no torch, unlike a
multiprocessing worker, which re-imports the command's main module), says `ready`, then decodes
the shard it is sent and answers with the number of crops it made. The decoder is the spec's
`runtime.decode`: `tasks` is the read tasks' Pillow path, `device` the predictor's torchvision
path on the CPU, one thread a process. Run as `python -m vision_ops.benchmark.readpool DECODE`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vision_ops.config import Preprocessing

READY = "ready"


def read_crops(
    paths: list[str], preprocessing: Preprocessing, max_pixels: int, decode: str = "tasks"
) -> int:
    """The pipeline's decoding of local files: bytes -> RGB -> model-input crop, counted."""
    if decode == "device":
        return device_crops(paths, preprocessing, max_pixels)
    return sum(int(read_crop(path, preprocessing, max_pixels).ndim == 3) for path in paths)


def read_crop(path: str, preprocessing: Preprocessing, max_pixels: int) -> np.ndarray:
    """The pipeline's read task for one local file: bytes -> RGB -> model-input crop."""
    from vision_ops.decode import decode_image
    from vision_ops.transforms import resize_and_crop

    return resize_and_crop(decode_image(Path(path).read_bytes(), max_pixels), preprocessing)


def device_crops(paths: list[str], preprocessing: Preprocessing, max_pixels: int) -> int:
    """`runtime.decode: device` on a CPU: torchvision decodes and crops, on one thread."""
    import torch

    from vision_ops.device_decode import model_inputs

    torch.set_num_threads(1)
    payloads = [Path(path).read_bytes() for path in paths]
    crops = model_inputs(payloads, torch.device("cpu"), max_pixels, preprocessing, threads=1)
    return sum(isinstance(crop, torch.Tensor) for crop in crops)


def _warm_device_decoder() -> None:
    """One tiny photo through the torchvision path: its libraries load before timing starts."""
    import torch
    from torchvision.io import encode_jpeg

    from vision_ops.device_decode import model_inputs

    tiny = bytes(encode_jpeg(torch.zeros((3, 8, 8), dtype=torch.uint8)).numpy())
    spec = Preprocessing(resize=8, crop=8, mean=(0, 0, 0), std=(1, 1, 1))
    model_inputs([tiny], torch.device("cpu"), 64, spec, threads=1)


def shards(paths: list[str], count: int) -> list[list[str]]:
    """`count` interleaved shards of near-equal size."""
    return [paths[index::count] for index in range(count)]


def timed_read(
    paths: list[str],
    preprocessing: Preprocessing,
    max_pixels: int,
    processes: int,
    decode: str = "tasks",
) -> tuple[int, float]:
    """Crops made and the seconds from sending the shards to the last answer (workers already
    started and their imports done)."""
    workers = [_start_worker(decode) for _ in range(processes)]
    try:
        for worker in workers:
            _expect(worker, READY)
        started = time.perf_counter()
        for worker, shard in zip(workers, shards(paths, processes), strict=True):
            job = {
                "paths": shard,
                "preprocessing": preprocessing.model_dump(),
                "max_pixels": max_pixels,
            }
            _send(worker, job)
        made = sum(int(_expect(worker)) for worker in workers)
        return made, time.perf_counter() - started
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def _start_worker(decode: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "vision_ops.benchmark.readpool", decode]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _send(worker: subprocess.Popen[str], job: dict[str, object]) -> None:
    if worker.stdin is None:
        raise RuntimeError("read worker has no stdin")
    worker.stdin.write(json.dumps(job) + "\n")
    worker.stdin.flush()


def _expect(worker: subprocess.Popen[str], text: str | None = None) -> str:
    line = worker.stdout.readline().strip() if worker.stdout is not None else ""
    if not line or (text is not None and line != text):
        raise RuntimeError(
            f"read worker {worker.pid}: expected {text or 'a count'}, found {line!r}"
        )
    return line


def main() -> None:
    decode = sys.argv[1]
    if decode == "device":
        _warm_device_decoder()
    else:
        import vision_ops.decode
        import vision_ops.transforms  # noqa: F401

    print(READY, flush=True)
    job = json.loads(sys.stdin.readline())
    preprocessing = Preprocessing(**job["preprocessing"])
    made = read_crops(job["paths"], preprocessing, job["max_pixels"], decode)
    print(made, flush=True)


if __name__ == "__main__":
    main()
