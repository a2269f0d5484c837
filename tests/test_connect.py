"""The driver's start-up overlap: the model stack loads and the model is checked while Ray
starts, a refusal found meanwhile is raised, and a cluster started for it does not outlive it."""

from __future__ import annotations

import threading

import pytest
import ray

from vision_ops.errors import ModelError
from vision_ops.pipeline.connect import connect_while
from vision_ops.runstats import StartupClock


def refuse() -> None:
    raise ModelError("model.entrypoint: cannot import nowhere.mod:build")


def test_the_preparation_runs_in_a_thread_while_ray_starts(own_ray_root) -> None:
    seen: dict[str, bool] = {}

    def prepare() -> None:
        seen["own thread"] = threading.current_thread() is not threading.main_thread()
        seen["ray up when it began"] = ray.is_initialized()

    clock = StartupClock()
    try:
        connect_while(prepare, clock)
        assert seen == {"own thread": True, "ray up when it began": False}
        assert ray.is_initialized()
        assert clock.seconds["ray_connect"] > 0  # the connection alone, as a stage
    finally:
        ray.shutdown()


def test_a_refusal_found_while_ray_starts_is_raised_and_its_cluster_shut(own_ray_root) -> None:
    with pytest.raises(ModelError, match=r"cannot import nowhere\.mod:build"):
        connect_while(refuse, StartupClock())
    assert not ray.is_initialized()


def test_a_cluster_joined_before_stays_up_after_a_refusal(ray_local) -> None:
    with pytest.raises(ModelError):
        connect_while(refuse, StartupClock())
    assert ray.is_initialized()  # the caller's cluster: not this function's to shut
