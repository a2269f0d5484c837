"""Run statistics gathered on the driver: start-up stages, time per stage and rows over time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vision_ops.schema import STAGE_PREFIX, STARTUP_PREFIX

PROGRESS_INTERVAL_S = 1.0  # at most one progress point a second, however many batches
# A run's progress keeps at most this many points (every second of a 10-minute run): past it,
# every other point goes and the interval doubles, so an 8-hour run's manifest (an Iceberg
# snapshot's summary, read by every query) holds a few kB of progress, evenly spread.
MAX_PROGRESS_POINTS = 600


# The start-up stages as `vision-ops run` prints them, in the order they happen.
STARTUP_STAGES = {
    "ray_connect": "Ray connect",
    "listing": "listing",
    "pool_start": "pool start",
    "model_load": "model load",
    "compile": "compile",
    "pool_ready": "pool ready",
    "first_batch": "first batch",
}


def startup_line(seconds: dict[str, float]) -> str:
    """One line of the run summary: each stage's seconds, and the first rows after the start."""
    stages = ", ".join(
        f"{label} {seconds[name]:.1f}s" for name, label in STARTUP_STAGES.items() if name in seconds
    )
    until = seconds.get("until_first_batch")
    after = f"; first rows {until:.1f}s after the run began" if until is not None else ""
    return f"start-up: {stages or '-'}{after} (pool stages from the pipeline's start)"


@dataclass
class StartupClock:
    """The driver's start-up stages (Ray connect, listing), timed on its wall clock."""

    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begun


@dataclass
class RunStats:
    """Stage seconds (summed over workers), (elapsed seconds, rows) points of one run, and the
    start-up its actors reported (`STARTUP_PREFIX` columns, one set per actor)."""

    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)  # epoch: where actors' times fall
    stage_seconds: dict[str, float] = field(default_factory=dict)
    progress: list[tuple[float, int]] = field(default_factory=list)
    progress_interval_s: float = PROGRESS_INTERVAL_S
    rows: int = 0
    actors: list[dict[str, float]] = field(default_factory=list)
    first_batch: float | None = None  # seconds from the start to the first rows received

    def record(self, table: pa.Table) -> pa.Table:
        """Take a batch's stage-time columns into the totals; the rows without them."""
        table = self._take_startup(table)
        if self.first_batch is None and table.num_rows:
            self.first_batch = time.perf_counter() - self.started
        for name in [n for n in table.column_names if n.startswith(STAGE_PREFIX)]:
            stage = name.removeprefix(STAGE_PREFIX)
            spent = pc.sum(table[name]).as_py() or 0.0
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + spent
            table = table.drop_columns([name])
        self.rows += table.num_rows
        self.note_progress(time.perf_counter() - self.started)
        return table

    def note_progress(self, elapsed: float) -> None:
        """A (seconds, rows) point where the last is at least the interval old, the series
        thinned to every other point (and the interval doubled) past MAX_PROGRESS_POINTS."""
        if self.progress and elapsed - self.progress[-1][0] < self.progress_interval_s:
            return
        self.progress.append((round(elapsed, 3), self.rows))
        if len(self.progress) > MAX_PROGRESS_POINTS:
            self.progress = self.progress[::2]
            self.progress_interval_s *= 2

    def _take_startup(self, table: pa.Table) -> pa.Table:
        """Each actor's start-up, from the first row of the batches carrying one."""
        names = [n for n in table.column_names if n.startswith(STARTUP_PREFIX)]
        if not names:
            return table
        columns = {n.removeprefix(STARTUP_PREFIX): table[n].to_numpy() for n in names}
        rows = np.flatnonzero(~np.isnan(next(iter(columns.values()))))
        if rows.size:
            self.actors.append({key: float(values[rows[0]]) for key, values in columns.items()})
        return table.drop_columns(names)

    def startup_seconds(self, clock: StartupClock) -> dict[str, float]:
        """The run's start-up by stage, also kept in `clock`: the driver's (Ray connect,
        listing), then from the pipeline's start the pool's first actor up, the longest model
        load and compile of its actors, every actor ready, the first rows received; and the
        first rows counted from the run's start. Actors' epoch times are placed on the driver's
        clock (clamped at 0)."""
        found = dict(clock.seconds)
        if self.actors:
            began = min(actor["began_at"] for actor in self.actors) - self.started_at
            ready = max(actor["ready_at"] for actor in self.actors) - self.started_at
            found["pool_start"] = max(began, 0.0)
            for stage in ("model_load", "compile"):
                found[stage] = max(actor[stage] for actor in self.actors)
            found["pool_ready"] = max(ready, 0.0)
        if self.first_batch is not None:
            found["first_batch"] = self.first_batch
            found["until_first_batch"] = self.started - clock.started + self.first_batch
        clock.seconds = {name: round(seconds, 3) for name, seconds in found.items()}
        return clock.seconds

    def add_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def finish(self) -> float:
        """Seconds since the start; closes the progress series at the last row."""
        elapsed = time.perf_counter() - self.started
        if not self.progress or self.progress[-1][1] != self.rows:
            self.progress.append((round(elapsed, 3), self.rows))
        return elapsed

    def as_manifest(self, pipeline_seconds: float) -> dict[str, Any]:
        slowest = max(self.stage_seconds, key=self.stage_seconds.__getitem__, default=None)
        return {
            "pipeline_seconds": round(pipeline_seconds, 3),
            "images_per_second": round(self.rows / pipeline_seconds, 3) if pipeline_seconds else 0,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "slowest_stage": slowest,
            "progress": [list(point) for point in self.progress],
        }


@dataclass
class ActorStartup:
    """A predictor actor's start-up, measured in its __init__, handed on with its first batch."""

    began_at: float = field(default_factory=time.time)
    model_load: float = float("nan")
    compile: float = float("nan")
    ready_at: float = float("nan")
    sent: bool = False

    def ready(self, load_seconds: float, compile_seconds: float) -> None:
        """The predictor is loaded: `load_seconds` in all, `compile_seconds` of them compiling."""
        self.model_load = load_seconds - compile_seconds
        self.compile = compile_seconds
        self.ready_at = time.time()

    def columns(self, rows: int) -> dict[str, np.ndarray]:
        """`STARTUP_PREFIX` columns for a batch of `rows` rows: the figures on the first batch's
        rows, NaN on every later batch's (the columns stay, so every block has one schema)."""
        figures = {"began_at": self.began_at, "model_load": self.model_load}
        figures |= {"compile": self.compile, "ready_at": self.ready_at}
        nan = self.sent
        self.sent = True
        return {
            f"{STARTUP_PREFIX}{name}": np.full(rows, np.nan if nan else value, dtype=np.float64)
            for name, value in figures.items()
        }
