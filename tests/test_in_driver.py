"""The driver's predictor threads (`runtime.predict_in: driver`): every batch once, each
predictor on one batch at a time, failures raised, never waited on forever. The run itself
on Ray is in test_pipeline.py and test_segmentation.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from vision_ops.errors import ModelError, PredictorFailed
from vision_ops.pipeline.in_driver import predicted_in_threads

pytestmark = pytest.mark.timeout(60)


class Predictor:
    """Returns its batch's number after a short sleep; records overlapping use of itself."""

    def __init__(self, overlaps: list[int]) -> None:
        self.busy = threading.Lock()
        self.overlaps = overlaps

    def __call__(self, batch: dict[str, Any]) -> int:
        if not self.busy.acquire(blocking=False):
            self.overlaps.append(batch["n"])
            return batch["n"]
        try:
            time.sleep(0.01)
            return int(batch["n"])
        finally:
            self.busy.release()


def loader(overlaps: list[int], made: list[Predictor]) -> Callable[[], Predictor]:
    def load() -> Predictor:
        predictor = Predictor(overlaps)
        made.append(predictor)
        return predictor

    return load


def test_every_batch_once_each_predictor_on_one_batch_at_a_time() -> None:
    overlaps: list[int] = []
    made: list[Predictor] = []
    taken = []

    def batches():  # type: ignore[no-untyped-def]
        for n in range(40):
            taken.append(n)
            yield {"n": n}

    out = []
    for rows in predicted_in_threads(batches(), loader(overlaps, made), threads=3):
        out.append(rows)
        assert len(taken) - len(out) <= 3  # at most `threads` batches ahead of the rows
    assert sorted(out) == list(range(40)) and overlaps == [] and len(made) == 3


def test_a_predictor_that_cannot_load_fails_the_iteration_without_a_hang() -> None:
    def load() -> Predictor:
        raise OSError("weights not readable")

    with pytest.raises(PredictorFailed, match=r"^OSError: weights not readable$"):
        list(predicted_in_threads(({"n": n} for n in range(5)), load, threads=2))


def test_a_failing_batch_fails_the_iteration() -> None:
    def load() -> Callable[[dict[str, Any]], int]:
        def predict(batch: dict[str, Any]) -> int:
            if batch["n"] == 3:
                raise RuntimeError("out of memory")
            return int(batch["n"])

        return predict

    with pytest.raises(PredictorFailed, match=r"^RuntimeError: out of memory$") as failed:
        list(predicted_in_threads(({"n": n} for n in range(10)), load, threads=2))
    assert isinstance(failed.value.__cause__, RuntimeError)  # the error itself, for the log


def test_a_bad_model_keeps_its_own_error() -> None:
    """A VisionOpsError (a model the spec names that does not load) is raised as it is: the
    command reports it with its own exit code, as from an actor."""

    def load() -> Predictor:
        raise ModelError("model.weights: expected a state_dict")

    with pytest.raises(ModelError, match="expected a state_dict"):
        list(predicted_in_threads(({"n": n} for n in range(4)), load, threads=2))


def test_one_predictor_of_several_that_cannot_load_fails_the_iteration() -> None:
    loads = iter([RuntimeError("CUDA error"), None, None])
    overlaps: list[int] = []

    def load() -> Predictor:
        failure = next(loads)
        if failure is not None:
            raise failure
        return Predictor(overlaps)

    with pytest.raises(PredictorFailed, match=r"^RuntimeError: CUDA error$"):
        list(predicted_in_threads(({"n": n} for n in range(30)), load, threads=3))


def test_a_consumer_that_stops_takes_no_more_batches_and_leaves_no_thread() -> None:
    """Rows taken, then the consumer stops (a failed commit, Ctrl-C): no batch queued behind
    the running ones is predicted, and the predictor threads have ended."""
    predicted: list[int] = []

    def load() -> Callable[[dict[str, Any]], int]:
        def predict(batch: dict[str, Any]) -> int:
            predicted.append(batch["n"])
            time.sleep(0.02)
            return int(batch["n"])

        return predict

    rows = predicted_in_threads(({"n": n} for n in range(1000)), load, threads=2)
    taken = [next(rows) for _ in range(3)]
    rows.close()
    assert len(taken) == 3 and len(predicted) <= 3 + 2  # the ones in flight, no more
    assert not [t for t in threading.enumerate() if t.name.startswith("predictor")]
