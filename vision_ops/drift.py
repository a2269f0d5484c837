"""Drift: a run's label and score distributions and error rate against the runs before it.

The population stability index of a distribution p (this run) against q (the earlier runs
pooled), over the same bins (labels, or score bins), each share floored at EPSILON:

    PSI = sum_i (p_i - q_i) * ln(p_i / q_i)

0 when they are equal; by the usual reading under 0.1 a small shift, 0.25 and over a large one.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass

from vision_ops.config import MonitorSpec
from vision_ops.outputs import Target, committed_runs, describe
from vision_ops.report import NoSuchRun
from vision_ops.storage import StorageOptions
from vision_ops.trend import RunFigures, run_figures

EPSILON = 1e-4  # the share given to a bin one side has and the other has not


@dataclass(frozen=True)
class Drift:
    """One figure of a run against its threshold and the runs it was compared with."""

    figure: str  # label_psi, score_psi or error_rate_rise (MonitorSpec's field)
    value: float
    threshold: float
    run_id: str
    compared: tuple[str, ...]  # the earlier runs, pooled

    @property
    def crossed(self) -> bool:
        return self.value > self.threshold

    def __str__(self) -> str:
        verdict = "over" if self.crossed else "within"
        return (
            f"{self.figure} {self.value:.4f} {verdict} the threshold {self.threshold:g}: run "
            f"{self.run_id} against {', '.join(self.compared)}"
        )


def psi(current: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """The population stability index of `current` against `baseline` (counts per bin)."""
    bins = sorted(set(current) | set(baseline))
    p, q = _shares(current, bins), _shares(baseline, bins)
    return float(sum((a - b) * math.log(a / b) for a, b in zip(p, q, strict=True)))


def _shares(counts: Mapping[str, float], bins: list[str]) -> list[float]:
    total = sum(counts.values())
    return [max(counts.get(b, 0.0) / total if total else 0.0, EPSILON) for b in bins]


def pooled(points: list[RunFigures], counts: str) -> dict[str, float]:
    """The runs' `labels` or score histogram counts added up."""
    total: dict[str, float] = {}
    for point in points:
        for key, value in _counts(point, counts).items():
            total[key] = total.get(key, 0.0) + value
    return total


def _counts(point: RunFigures, counts: str) -> dict[str, float]:
    if counts == "labels":
        return dict(point.labels)
    return {str(i): float(n) for i, n in enumerate(point.score_histogram)}


def drift(points: list[RunFigures], monitor: MonitorSpec, run_id: str | None = None) -> list[Drift]:
    """The figures of run `run_id` (default: the last of `points`, oldest first) against the
    `monitor.runs` runs before it; none where it has no earlier run."""
    index = len(points) - 1 if run_id is None else [p.run_id for p in points].index(run_id)
    if index < 1:
        return []
    run, earlier = points[index], points[max(0, index - monitor.runs) : index]
    compared = tuple(p.run_id for p in earlier)
    errors = sum(sum(p.error_types.values()) for p in earlier)
    base_rate = errors / max(sum(p.units for p in earlier), 1)
    figures = {
        "label_psi": psi(run.labels, pooled(earlier, "labels")),
        "score_psi": psi(_counts(run, "scores"), pooled(earlier, "scores")),
        "error_rate_rise": run.error_rate - base_rate,
    }
    return [
        Drift(name, round(value, 4), float(getattr(monitor, name)), run.run_id, compared)
        for name, value in figures.items()
    ]


def render_drift_html(found: list[Drift]) -> str:
    """A card of the figures, those over their threshold in red."""
    if not found:
        return '<div class="card drift"><h2>Drift</h2><p>no earlier run to compare</p></div>'
    rows = "".join(
        f'<tr class="drift{" crossed" if d.crossed else ""}" style="color:'
        f'{"#c62828" if d.crossed else "#222"}"><td>{d.figure}</td><td>{d.value:.4f}</td>'
        f"<td>{d.threshold:g}</td><td>{'ALERT' if d.crossed else 'ok'}</td></tr>"
        for d in found
    )
    return (
        f'<div class="card drift" style="margin:12px 0"><h2>Drift: run '
        f"{html.escape(found[0].run_id)} against {html.escape(', '.join(found[0].compared))}"
        f"</h2><table><tr><th>figure</th><th>value</th><th>threshold</th><th></th></tr>"
        f"{rows}</table></div>"
    )


def check_run(
    target: Target,
    monitor: MonitorSpec,
    options: StorageOptions | None = None,
    run_id: str | None = None,
) -> list[Drift]:
    """The drift figures of a committed run (default: the latest), reading it and the
    `monitor.runs` committed runs before it."""
    runs = committed_runs(target, options)
    ids = [run["run_id"] for run in runs]
    if run_id is not None and run_id not in ids:
        raise NoSuchRun(f"{describe(target)}: no committed run {run_id}")
    index = len(runs) - 1 if run_id is None else ids.index(run_id)
    chosen = runs[max(0, index - monitor.runs) : index + 1]
    return drift([run_figures(target, run, options or {}) for run in chosen], monitor)
