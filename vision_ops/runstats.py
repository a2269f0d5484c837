"""Run statistics gathered on the driver: time per stage and rows over time, for the manifest."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vision_ops.schema import STAGE_PREFIX

PROGRESS_INTERVAL_S = 1.0  # at most one progress point a second, however many batches


@dataclass
class RunStats:
    """Stage seconds (summed over workers) and (elapsed seconds, rows) points of one run."""

    started: float = field(default_factory=time.perf_counter)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    progress: list[tuple[float, int]] = field(default_factory=list)
    rows: int = 0

    def record(self, table: pa.Table) -> pa.Table:
        """Take a batch's stage-time columns into the totals; the rows without them."""
        for name in [n for n in table.column_names if n.startswith(STAGE_PREFIX)]:
            stage = name.removeprefix(STAGE_PREFIX)
            spent = pc.sum(table[name]).as_py() or 0.0
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + spent
            table = table.drop_columns([name])
        self.rows += table.num_rows
        elapsed = time.perf_counter() - self.started
        if not self.progress or elapsed - self.progress[-1][0] >= PROGRESS_INTERVAL_S:
            self.progress.append((round(elapsed, 3), self.rows))
        return table

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
