"""Throughput arithmetic: steady-state rates from (time, rows) points, and the ceilings' limit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# A steady state shorter than this is a burst of output, not a rate (the pipeline's progress
# points are a second apart).
MIN_STEADY_SECONDS = 1.0


def steady_rate(
    points: Sequence[tuple[float, int]],
    min_seconds: float = MIN_STEADY_SECONDS,
    edge_rows: int = 0,
) -> float | None:
    """Rows per second between start-up and drain: (rows in the window) / (its seconds).
    Points are (seconds, cumulative rows) in time order. The window opens at the first point to
    reach `edge_rows` rows and closes at the last to leave `edge_rows` still to come (by
    default: the first point and the last). With several producers (actors) delivering coarse
    blocks, their first blocks arrive together, the ones after the first made before the
    window opened, and their last blocks as the pool drains: one block per producer at each
    end keeps both out. None when the window holds less than `min_seconds`, or fewer than
    two such rounds of blocks (2 x `edge_rows` rows: one round is too coarse a rate)."""
    total = points[-1][1] if points else 0
    inside = [i for i, (_, rows) in enumerate(points) if edge_rows <= rows <= total - edge_rows]
    if len(inside) < 2:
        return None
    (t0, rows0), (t1, rows1) = points[inside[0]], points[inside[-1]]
    if rows1 <= rows0 or rows1 - rows0 < 2 * edge_rows or t1 - t0 < min_seconds:
        return None
    return (rows1 - rows0) / (t1 - t0)


def points_from_times(done_at: Iterable[float]) -> list[tuple[float, int]]:
    """Per-row completion times (rows of one batch share theirs) -> cumulative (time, rows)."""
    times, counts = np.unique(np.asarray(list(done_at), dtype=np.float64), return_counts=True)
    return [(float(t), int(n)) for t, n in zip(times, np.cumsum(counts), strict=True)]


def shared_core_ceiling(decode_rate: float, model_rate: float) -> float:
    """The rate when decoding and the model take turns on the same cores: 1 / (1/a + 1/b)."""
    return 1.0 / (1.0 / decode_rate + 1.0 / model_rate)
