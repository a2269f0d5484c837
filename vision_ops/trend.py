"""Trends: the figures of each committed run of a table, side by side by run date, as a table
and as charts."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vision_ops.outputs import Manifest, Target, committed_runs, read_run, retried_of
from vision_ops.report import SCORE_BINS, overall_metrics
from vision_ops.schema import STATUS_OK, STATUS_SKIPPED, rows_of_status
from vision_ops.storage import StorageOptions
from vision_ops.tasks import Task, counts, task_of_run

TREND_LABELS = 5  # labels whose share is followed (the most frequent over the runs shown)


@dataclass(frozen=True)
class RunFigures:
    """What one committed run found, in figures a trend follows and drift compares."""

    run_id: str
    run_date: str
    task: str  # the run's task: runs of another task in the table are no baseline of its
    units: int
    ok_units: int  # of `units`, those the model answered: what `labels` and the scores are of
    error_types: dict[str, float]  # error type -> error rows
    labels: dict[str, float]  # label -> the task's unit (images, boxes...)
    score_histogram: list[int]  # SCORE_BINS bins over [0, 1]
    mean_score: float | None
    p05_score: float | None
    images_per_second: float | None  # the manifest's, where it has one
    metrics: dict[str, float] = field(default_factory=dict)  # `vision-ops evaluate`'s
    # What of `units` an incremental run retried (sources whose latest run wrote an error
    # row): the manifest's `retried` (sources, units, error_rows, skipped), where it has one.
    retried: dict[str, int] = field(default_factory=dict)
    skipped_units: int = 0  # of `units`, tiles with no data: recorded, never sent to the model

    @property
    def retried_units(self) -> int:
        return int(self.retried.get("units", 0))

    @property
    def retried_errors(self) -> int:
        return int(self.retried.get("error_rows", 0))

    @property
    def sent_units(self) -> int:
        """The units sent to the model: what an error rate is of (a scene's tiles with no data
        are neither errors nor answers: counted, a night of more empty tiles read as fewer
        errors)."""
        return self.units - self.skipped_units

    @property
    def error_rate(self) -> float | None:
        """Error rows / units sent to the model (`rate`: None where none was)."""
        return rate(self.errors, self.sent_units)

    @property
    def errors(self) -> int:
        return int(sum(self.error_types.values()))

    @property
    def new_units(self) -> int:
        """The units of inputs this run was the first to send to the model (`new_units_sent`)."""
        return new_units_sent(self.units, self.skipped_units, self.retried)

    @property
    def new_errors(self) -> int:
        """The error rows of inputs this run was the first to process (retries left out)."""
        return self.errors - self.retried_errors

    def share(self, label: str) -> float:
        """The label's share of what the run counted (its images, boxes...)."""
        total = sum(self.labels.values())
        return self.labels.get(label, 0.0) / total if total else 0.0


def rate(count: float, units: int) -> float | None:
    """`count` of `units`, rounded as the trend shows it; None (`-`) where there are no units:
    a quiet night's 0 rows are no error rate of 0."""
    return round(count / units, 4) if units else None


def new_units_sent(rows: int, skipped: int, retried: Mapping[str, int]) -> int:
    """Of a run's `rows`, the units of inputs no run had sent to the model before: less its
    tiles with no data (`skipped`, never sent) and less the units it sent of the sources it
    retried (`retried`, as its manifest records it: a retried scene's empty tiles are among
    `skipped` already). What drift's error rate and --max-error-ratio are of."""
    retried_sent = int(retried.get("units", 0)) - int(retried.get("skipped", 0))
    return rows - skipped - retried_sent


def new_units_of(manifest: Mapping[str, Any]) -> int:
    """The units of inputs a committed run was the first to send to the model
    (`RunFigures.new_units`), from its manifest alone."""
    skipped = int(manifest.get("skipped", 0))
    return new_units_sent(int(manifest.get("rows", 1)), skipped, retried_of(manifest))


def run_figures(target: Target, manifest: Manifest, options: StorageOptions) -> RunFigures:
    """The figures of one committed run (its rows read back)."""
    task = task_of_run(manifest)
    columns = figure_columns(task)
    table = read_run(target, manifest, options, columns)
    metrics = overall_metrics(target, manifest, options)
    return table_figures(table, manifest, metrics)


def figure_columns(task: Task) -> list[str]:
    """The columns of a run's rows that its figures are made of."""
    return ["status", "error_type", *task.summary_columns]


def table_figures(
    table: pa.Table, manifest: Mapping[str, Any], metrics: dict[str, float] | None = None
) -> RunFigures:
    """The figures of one run's rows: a committed run's, or those a run has staged (its
    `manifest` then holds what a manifest will: run_id, run_date, task)."""
    summary = task_of_run(manifest).summary(table)
    scores = np.asarray(summary.scores, dtype=np.float64)
    speed = manifest.get("images_per_second")
    retried = retried_of(manifest)
    return RunFigures(
        run_id=manifest["run_id"],
        run_date=manifest["run_date"],
        task=str(manifest.get("task")),
        units=table.num_rows,
        ok_units=rows_of_status(table, STATUS_OK),
        error_types=dict(counts(pc.drop_null(table["error_type"]))),
        labels=dict(summary.labels),
        score_histogram=np.histogram(scores, bins=SCORE_BINS, range=(0, 1))[0].tolist(),
        mean_score=round(float(scores.mean()), 4) if len(scores) else None,
        p05_score=round(float(np.quantile(scores, 0.05)), 4) if len(scores) else None,
        images_per_second=float(speed) if speed is not None else None,
        metrics=metrics or {},
        retried=dict(retried),
        skipped_units=rows_of_status(table, STATUS_SKIPPED),
    )


def trend(
    target: Target, options: StorageOptions | None = None, since: dt.date | None = None
) -> list[RunFigures]:
    """Every committed run's figures, oldest run date first (from `since` on, where given), of
    the latest run's task: a Parquet table that held runs of another task before shows those
    no more (their labels are boxes', or masks', not the images' now followed)."""
    runs = committed_runs(target, options)
    chosen = [r for r in runs if since is None or dt.date.fromisoformat(r["run_date"]) >= since]
    chosen = [r for r in chosen if r.get("task") == chosen[-1].get("task")] if chosen else []
    return [run_figures(target, run, options or {}) for run in chosen]


def followed_labels(points: list[RunFigures]) -> list[str]:
    """The labels whose shares a trend shows: the most frequent over all its runs."""
    totals: dict[str, float] = {}
    for point in points:
        for label in point.labels:
            totals[label] = totals.get(label, 0.0) + point.share(label)
    return [label for label, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))][
        :TREND_LABELS
    ]


def new_error_rate(point: RunFigures) -> float | None:
    """The error rate of the inputs a run was the first to process (drift's), None where it
    processed none: where an incremental run retried earlier error rows, the trend shows it
    beside the rate of all its rows."""
    return rate(point.new_errors, point.new_units)


def series(points: list[RunFigures]) -> dict[str, dict[str, list[float | None]]]:
    """chart -> series -> one value per run: what the page draws and the table prints."""
    error_types = sorted({kind for point in points for kind in point.error_types})
    metric_names = sorted({name for point in points for name in point.metrics})
    return {
        "units": {"units": [float(p.units) for p in points]},
        "error rate": {
            "all": [p.error_rate for p in points],
            **(
                {"new inputs": [new_error_rate(p) for p in points]}
                if any(p.retried_units for p in points)
                else {}
            ),
            **{
                kind: [rate(p.error_types.get(kind, 0.0), p.sent_units) for p in points]
                for kind in error_types
            },
        },
        "score": {
            "mean": [p.mean_score for p in points],
            "p05": [p.p05_score for p in points],
        },
        "label share": {  # none of a run that labelled nothing (error rows only), as its score
            label: [round(p.share(label), 4) if any(p.labels.values()) else None for p in points]
            for label in followed_labels(points)
        },
        "images/s": {
            "images/s": [
                round(p.images_per_second, 2) if p.images_per_second is not None else None
                for p in points
            ]
        },
        **(
            {"metrics": {n: [p.metrics.get(n) for p in points] for n in metric_names}}
            if metric_names
            else {}
        ),
    }


# --- text ------------------------------------------------------------------------------------


def render_trend_text(points: list[RunFigures]) -> str:
    """One line per run: the columns of every chart's series."""
    if not points:
        return "no committed run\n"
    columns = [
        (f"{chart}: {name}" if chart not in ("units", "images/s") else chart, values)
        for chart, lines in series(points).items()
        for name, values in lines.items()
    ]
    header = ["run_date", "run_id", *[name for name, _ in columns]]
    rows = [
        [p.run_date, p.run_id, *[_cell(values[i]) for _, values in columns]]
        for i, p in enumerate(points)
    ]
    widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]
    return "".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in [header, *rows]
    )


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() and value > 1 else f"{value:.4g}"


# --- html ------------------------------------------------------------------------------------

COLOURS = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#b279a2", "#9d755d")
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>vision-ops trend</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
.grid {{ display: grid; grid-template-columns: 1fr 1fr; gap: 24px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 12px; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 15px; margin: 0 0 8px; }}
pre {{ font-size: 11px; }}
</style></head><body>
<h1>Trend of {table} &middot; {runs} runs, {first} to {last}</h1>
{alerts}
<div class="grid">{charts}</div>
<div class="card" style="margin-top:24px"><h2>Per run</h2><pre>{text}</pre></div>
</body></html>
"""


def render_trend_html(points: list[RunFigures], table: str, alerts: str = "") -> str:
    """One page, no external files: a line chart per figure (one point per run) and the table."""
    charts = "".join(
        f'<div class="card"><h2>{html.escape(chart)}</h2>'
        f"{trend_chart(chart, lines, [p.run_id for p in points])}</div>"
        for chart, lines in series(points).items()
    )
    return PAGE.format(
        table=html.escape(table),
        runs=len(points),
        first=html.escape(points[0].run_date) if points else "-",
        last=html.escape(points[-1].run_date) if points else "-",
        alerts=alerts,
        charts=charts,
        text=html.escape(render_trend_text(points)),
    )


def trend_chart(
    chart: str, lines: dict[str, list[float | None]], runs: list[str], width: int = 440
) -> str:
    """Values against runs (equally spaced, oldest left), a polyline and a point per value;
    the plot area is `rect.plot`, its value range `data-low` .. `data-high`."""
    height, left, top, plot_w, plot_h = 200, 50, 10, width - 70, 140
    values = [v for line in lines.values() for v in line if v is not None]
    if not values:
        return "<p>no data</p>"
    low, high = min(0.0, min(values)), max(values) or 1.0

    def x(index: int) -> float:
        return left + (plot_w * index / (len(runs) - 1) if len(runs) > 1 else plot_w / 2)

    def y(value: float) -> float:
        return top + plot_h * (1 - (value - low) / (high - low))

    parts = [
        f'<rect class="plot" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
        'fill="none" stroke="#ddd"/>',
        f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{high:.3g}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" font-size="10" text-anchor="end">'
        f"{low:.3g}</text>",
    ]
    for number, (name, line) in enumerate(lines.items()):
        colour = COLOURS[number % len(COLOURS)]
        drawn = [(i, v) for i, v in enumerate(line) if v is not None]
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in drawn)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [
            f'<circle class="point" data-series="{html.escape(name)}" '
            f'data-run="{html.escape(runs[i])}" data-value="{v}" cx="{x(i):.1f}" '
            f'cy="{y(v):.1f}" r="3" fill="{colour}"/>'
            for i, v in drawn
        ]
        parts.append(
            f'<text x="{left + 90 * number}" y="{height - 8}" font-size="10" fill="{colour}">'
            f"{html.escape(name[:16])}</text>"
        )
    return (
        f'<svg data-chart="{html.escape(chart)}" data-low="{low}" data-high="{high}" '
        f'width="{width}" height="{height}" role="img">{"".join(parts)}</svg>'
    )
