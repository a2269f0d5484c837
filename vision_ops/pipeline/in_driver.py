"""The model in the driver's own threads (`runtime.predict_in: driver`).

A short run on one CPU node spends seconds starting the actor pool's interpreters (each imports
torch, torchvision and the pipeline: about 8 CPU seconds and 1 GB each, docs/performance.md)
before its first batch. Here the driver, which has imported them already, runs the same
predictors in threads of its own, one per actor the pool would have, each with the actor's
torch threads: torch releases the GIL while it computes, so the threads use the cores as the
actors would. Ray tasks still list and read; their batches reach the driver as the actors'
would, and each batch's rows come back as it finishes.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from vision_ops.errors import PredictorFailed, VisionOpsError

Rows = TypeVar("Rows")
Batch = dict[str, Any]


def predicted_in_threads(
    batches: Iterable[Batch], load: Callable[[], Callable[[Batch], Rows]], threads: int
) -> Iterator[Rows]:
    """Each batch's rows, as the batches finish: `threads` predictors (`load` makes one; they
    load while the first batches are read), each used by one batch at a time, at most
    `threads` batches taken ahead of the rows handed on. A predictor that fails to load or to
    predict ends the iteration with its error (as PredictorFailed, but a VisionOpsError),
    once the batches in flight have finished."""
    idle: queue.SimpleQueue[Callable[[Batch], Rows]] = queue.SimpleQueue()

    def load_one() -> None:
        try:
            predictor = load()
        except BaseException as err:  # handed to the batches that wait for a predictor
            predictor = _failing(err)
        idle.put(predictor)

    def predict(batch: Batch) -> Rows:
        predictor = idle.get()
        try:
            return predictor(batch)
        except VisionOpsError:  # a bad spec or model: its own message and exit code
            raise
        except Exception as err:
            raise PredictorFailed.of(err) from err
        finally:
            idle.put(predictor)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="predictor")
    try:
        for _ in range(threads):
            pool.submit(load_one)
        running: set[Future[Rows]] = set()
        for batch in batches:
            running.add(pool.submit(predict, batch))
            if len(running) >= threads:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in done)
    finally:  # a failure, Ctrl-C or a consumer that stops: no queued batch starts
        pool.shutdown(wait=True, cancel_futures=True)


def _failing(err: BaseException) -> Callable[[Batch], Any]:
    def fail(_batch: Batch) -> Any:
        raise err

    return fail
