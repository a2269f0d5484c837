"""A pool of plain Python processes running the pipeline's read path on shards of local files.

Each worker imports only what a read task imports (no torch, unlike a multiprocessing worker,
which re-imports the command's main module), says `ready`, then decodes the shard it is sent
and answers with the number of crops it made. Run as `python -m vision_ops.benchmark.readpool`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from vision_ops.config import Preprocessing

READY = "ready"


def read_crops(paths: list[str], preprocessing: Preprocessing, max_pixels: int) -> int:
    """The pipeline's read task for local files: bytes -> RGB -> model-input crop, counted."""
    from vision_ops.decode import decode_image
    from vision_ops.transforms import resize_and_crop

    made = 0
    for path in paths:
        crop = resize_and_crop(decode_image(Path(path).read_bytes(), max_pixels), preprocessing)
        made += int(crop.ndim == 3)
    return made


def shards(paths: list[str], count: int) -> list[list[str]]:
    """`count` interleaved shards of near-equal size."""
    return [paths[index::count] for index in range(count)]


def timed_read(
    paths: list[str], preprocessing: Preprocessing, max_pixels: int, processes: int
) -> tuple[int, float]:
    """Crops made and the seconds from sending the shards to the last answer (workers already
    started and their imports done)."""
    workers = [_start_worker() for _ in range(processes)]
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


def _start_worker() -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "vision_ops.benchmark.readpool"]
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
    import vision_ops.decode
    import vision_ops.transforms  # noqa: F401

    print(READY, flush=True)
    job = json.loads(sys.stdin.readline())
    made = read_crops(job["paths"], Preprocessing(**job["preprocessing"]), job["max_pixels"])
    print(made, flush=True)


if __name__ == "__main__":
    main()
