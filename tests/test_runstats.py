"""Run statistics: the start-up an actor hands on with its first batch, taken apart on the
driver into the run's start-up stages, and the line the run summary prints."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pyarrow as pa
import pytest

from vision_ops.runstats import (
    MAX_PROGRESS_POINTS,
    ActorStartup,
    RunStats,
    StartupClock,
    startup_line,
)
from vision_ops.schema import STAGE_PREFIX, STARTUP_PREFIX


def batch(rows: int, startup: ActorStartup) -> pa.Table:
    columns = {"item_id": pa.array(range(rows))}
    columns[f"{STAGE_PREFIX}inference"] = pa.array(np.full(rows, 0.5 / rows))
    for name, values in startup.columns(rows).items():
        columns[name] = pa.array(values)
    return pa.table(columns)


def test_an_actor_hands_its_start_up_on_with_its_first_batch_only() -> None:
    actor = ActorStartup(began_at=100.0)
    actor.ready(load_seconds=5.0, compile_seconds=3.0)
    first, second = actor.columns(3), actor.columns(2)
    assert sorted(first) == [
        f"{STARTUP_PREFIX}{n}" for n in ("began_at", "compile", "model_load", "ready_at")
    ]
    assert first[f"{STARTUP_PREFIX}model_load"].tolist() == [2.0] * 3  # compiling apart
    assert first[f"{STARTUP_PREFIX}compile"].tolist() == [3.0] * 3
    assert first[f"{STARTUP_PREFIX}began_at"].tolist() == [100.0] * 3
    assert all(np.isnan(values).all() and len(values) == 2 for values in second.values())


def test_the_driver_takes_the_stages_apart_from_its_clock_and_the_actors() -> None:
    clock = StartupClock(started=time.perf_counter() - 4.0)  # the run began 4 s ago
    with clock.stage("ray_connect"):
        time.sleep(0.05)
    stats = RunStats(started=time.perf_counter() - 1.0, started_at=1000.0)  # the pipeline's
    one, two = ActorStartup(began_at=1002.0), ActorStartup(began_at=1003.0)
    one.ready(load_seconds=1.5, compile_seconds=0.0)
    two.ready(load_seconds=2.5, compile_seconds=1.0)
    one.ready_at, two.ready_at = 1003.5, 1005.5
    rows = stats.record(batch(4, one))
    assert rows.column_names == ["item_id"]  # stage and start-up columns taken off
    stats.record(batch(4, one))  # its later batches carry NaN
    stats.record(batch(2, two))
    assert stats.stage_seconds == {"inference": pytest.approx(1.5)}
    assert stats.rows == 10 and len(stats.actors) == 2
    found = stats.startup_seconds(clock)
    assert found is not None and clock.seconds == found
    assert found["ray_connect"] >= 0.05
    assert found["pool_start"] == 2.0  # the first actor began 2 s after the pipeline
    assert (found["model_load"], found["compile"]) == (1.5, 1.0)  # the slowest actor's
    assert found["pool_ready"] == 5.5
    assert found["first_batch"] >= 1.0  # the first rows, 1 s after the pipeline began
    assert found["until_first_batch"] == pytest.approx(4.0 + found["first_batch"] - 1.0, abs=0.2)
    line = startup_line(found)
    assert line.startswith(f"start-up: Ray connect {found['ray_connect']:.1f}s, pool start 2.0s")
    assert "model load 1.5s, compile 1.0s, pool ready 5.5s" in line
    assert f"first rows {found['until_first_batch']:.1f}s after the run began" in line


def test_a_run_with_nothing_left_to_process_has_only_the_drivers_stages() -> None:
    clock = StartupClock()
    with clock.stage("listing"):
        pass
    found = RunStats().startup_seconds(clock)
    assert list(found) == ["listing"] and found["listing"] >= 0
    assert startup_line(found).startswith("start-up: listing 0.0s (")


def test_an_eight_hour_runs_progress_stays_a_few_hundred_points_from_start_to_end() -> None:
    stats = RunStats()
    for second in range(8 * 3600):  # a batch of 10 rows each second
        stats.rows += 10
        stats.note_progress(float(second))
    stats.rows += 5
    assert MAX_PROGRESS_POINTS // 2 <= len(stats.progress) <= MAX_PROGRESS_POINTS
    assert stats.progress[0] == (0.0, 10)
    assert stats.progress[-1][0] >= 8 * 3600 - 2 * stats.progress_interval_s
    gaps = {b[0] - a[0] for a, b in itertools.pairwise(stats.progress)}
    assert gaps == {stats.progress_interval_s}  # evenly spread
    assert all(rows == 10 * (t + 1) for t, rows in stats.progress)
    stats.finish()
    assert stats.progress[-1][1] == 8 * 3600 * 10 + 5  # closed at the last row
    short = RunStats()
    for second in range(300):  # a short run keeps every second
        short.rows += 1
        short.note_progress(float(second))
    assert [t for t, _ in short.progress] == [float(s) for s in range(300)]
