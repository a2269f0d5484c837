"""Run reports: what a committed run found and how it ran, as text and as a self-contained page."""

from __future__ import annotations

import html
import itertools
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vision_ops.errors import VisionOpsError
from vision_ops.gallery import COMMON_PANELS, PANELS, Sources
from vision_ops.outputs import Manifest, Target, committed_run_or_raise, read_run, retried_of
from vision_ops.schema import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, rows_of_status
from vision_ops.storage import StorageOptions
from vision_ops.tasks import counts, task_of_run

SCORE_BINS = 10
TOP_LABELS = 20
SAMPLES = 8  # units per gallery strip (--samples)


@dataclass(frozen=True)
class RunReport:
    run_id: str
    run_date: str
    task: str
    rows: int
    ok: int
    errors: int
    skipped: int  # tiles with no data: never sent to the model
    labels: list[tuple[str, float]]  # per label, the task's unit (images, boxes, pixel share)
    error_types: list[tuple[str, float]]
    score_histogram: list[int]  # SCORE_BINS equal bins over [0, 1]
    score_quantiles: dict[str, float]
    images_per_second: float
    pipeline_seconds: float
    stage_seconds: dict[str, float]
    slowest_stage: str | None
    progress: list[tuple[float, int]]
    metrics: dict[str, float] = field(default_factory=dict)  # from `vision-ops evaluate`
    unit: str = "images"  # what `labels` counts (the task's)
    score: str = "top-1 score"  # what the score histogram shows (the task's)
    panels: list[tuple[str, str]] = field(default_factory=list)  # (title, html) the task adds
    # What an incremental run processed again (its manifest's `retried`): inputs an earlier
    # run wrote error rows for, and the error rows they wrote this time.
    retried_inputs: int = 0
    retried_errors: int = 0

    @property
    def retried_text(self) -> str:
        """'' where the run retried nothing."""
        if not self.retried_inputs:
            return ""
        return (
            f"retried: {self.retried_inputs} input(s) with earlier error rows, "
            f"{self.retried_errors} error row(s) again"
        )


class NoSuchRun(VisionOpsError, LookupError):
    """No committed run matches."""


def build_report(
    table_uri: Target,
    run_id: str | None = None,
    options: StorageOptions | None = None,
    samples: int = SAMPLES,
) -> RunReport:
    """The report of a committed run: the given id, else the latest."""
    manifest = committed_run_or_raise(table_uri, run_id, options, NoSuchRun)
    task = task_of_run(manifest)
    table = read_run(table_uri, manifest, options)
    summary = task.summary(table)
    bits_stored = manifest.get("bits_stored", 16)
    retried = retried_of(manifest)
    with Sources(
        options or {}, samples, manifest.get("tile_bands"), bits_stored, compared=summary.compared
    ) as sources:
        drawn = panels(table, (*task.panels, *COMMON_PANELS), sources)
    return RunReport(
        run_id=manifest["run_id"],
        run_date=manifest["run_date"],
        task=task.name,
        rows=table.num_rows,
        ok=rows_of_status(table, STATUS_OK),
        errors=rows_of_status(table, STATUS_ERROR),
        skipped=rows_of_status(table, STATUS_SKIPPED),
        labels=summary.labels[:TOP_LABELS],
        error_types=counts(pc.drop_null(table["error_type"])),
        score_histogram=np.histogram(summary.scores, bins=SCORE_BINS, range=(0, 1))[0].tolist(),
        score_quantiles=_quantiles(summary.scores),
        images_per_second=float(manifest.get("images_per_second", 0.0)),
        pipeline_seconds=float(manifest.get("pipeline_seconds", 0.0)),
        stage_seconds=dict(manifest.get("stage_seconds", {})),
        slowest_stage=manifest.get("slowest_stage"),
        progress=[(float(t), int(n)) for t, n in manifest.get("progress", [])],
        metrics=overall_metrics(table_uri, manifest, options),
        unit=task.unit,
        score=task.score,
        panels=drawn,
        retried_inputs=int(retried.get("sources", 0)),
        retried_errors=int(retried.get("error_rows", 0)),
    )


def panels(table: pa.Table, names: tuple[str, ...], sources: Sources) -> list[tuple[str, str]]:
    """The named panels (gallery.PANELS) that have something to show for the run."""
    drawn = (PANELS.get(name)(table, sources) for name in dict.fromkeys(names))
    return [panel for panel in drawn if panel is not None]


def overall_metrics(
    table_uri: Target, manifest: Manifest, options: StorageOptions | None
) -> dict[str, float]:
    """The run's scores against ground truth (not per class), where its commit has been
    evaluated."""
    from vision_ops.evaluate import read_metrics

    table = read_metrics(table_uri, manifest, options)
    if table is None:
        return {}
    rows = table.to_pylist()
    return {r["metric"]: r["value"] for r in rows if r["label"] is None and r["predicted"] is None}


def _quantiles(scores: np.ndarray) -> dict[str, float]:
    if not len(scores):
        return {}
    points = np.quantile(scores, [0.05, 0.5, 0.95])
    return {name: round(float(v), 4) for name, v in zip(("p05", "p50", "p95"), points, strict=True)}


# --- text ------------------------------------------------------------------------------------


def render_text(report: RunReport) -> str:
    lines = [
        f"run {report.run_id} ({report.run_date}, {report.task})",
        f"items: {report.rows}  ok: {report.ok}  errors: {report.errors}"
        + (f"  skipped: {report.skipped}" if report.skipped else "")
        + (f"  ({report.retried_text})" if report.retried_inputs else ""),
        f"throughput: {report.images_per_second:.2f} images/s over {report.pipeline_seconds:.1f}s",
        "stage seconds (all workers): "
        + (", ".join(f"{k} {v:.1f}" for k, v in report.stage_seconds.items()) or "none")
        + (f"; slowest: {report.slowest_stage}" if report.slowest_stage else ""),
        f"scores ({report.score}): "
        + (", ".join(f"{k} {v:g}" for k, v in report.score_quantiles.items()) or "none"),
        f"top labels ({report.unit}):",
        *[f"  {number(count):>7}  {label}" for label, count in report.labels],
        "errors by type:" + ("" if report.error_types else " none"),
        *[f"  {number(count):>7}  {kind}" for kind, count in report.error_types],
    ]
    if report.metrics:
        lines.append("against ground truth: " + _metrics_text(report.metrics))
    return "\n".join(lines) + "\n"


def number(value: float) -> str:
    """A count as an integer, a share with four decimals."""
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"


def _metrics_text(metrics: dict[str, float]) -> str:
    from vision_ops.evaluate import shown_metric

    return ", ".join(f"{name} {shown_metric(name, value)}" for name, value in metrics.items())


# --- html ------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>vision-ops run {run}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
.grid {{ display: grid; grid-template-columns: 1fr 1fr; gap: 24px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 12px; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 15px; margin: 0 0 8px; }}
td {{ padding: 2px 12px 2px 0; }}
</style></head><body>
<h1>Run {run} &middot; {date} &middot; {task}</h1>
<table><tr><td>items</td><td><b>{rows}</b></td><td>ok</td><td><b>{ok}</b></td>
<td>errors</td><td><b>{errors}</b>{retried}</td>{skipped}<td>images/s</td><td><b>{rate:.2f}</b></td>
<td>slowest stage</td><td><b>{slowest}</b></td></tr></table>
{header}<div class="grid">
<div class="card"><h2>Top labels ({unit})</h2>{labels}</div>
<div class="card"><h2>Score distribution ({score})</h2>{scores}</div>
<div class="card"><h2>Errors by type</h2>{errors_chart}</div>
<div class="card"><h2>Images/s over the run</h2>{progress}</div>
<div class="card"><h2>Against ground truth</h2>{metrics}</div>
</div>
{panels}</body></html>
"""


def render_html(report: RunReport, header: str = "") -> str:
    """One page, no external files: inline SVG charts, embedded thumbnails; `header` (HTML,
    e.g. the drift card) above the charts."""
    bins = [f"{i / SCORE_BINS:.1f}" for i in range(SCORE_BINS)]
    return PAGE.format(
        run=html.escape(report.run_id),
        header=header,
        date=html.escape(report.run_date),
        task=report.task,
        rows=report.rows,
        ok=report.ok,
        errors=report.errors,
        retried=f" ({html.escape(report.retried_text)})" if report.retried_inputs else "",
        skipped=f"<td>skipped</td><td><b>{report.skipped}</b></td>" if report.skipped else "",
        rate=report.images_per_second,
        slowest=html.escape(report.slowest_stage or "-"),
        unit=html.escape(report.unit),
        score=html.escape(report.score),
        labels=bar_chart(report.labels, "#4c78a8"),
        scores=bar_chart(list(zip(bins, report.score_histogram, strict=True)), "#72b7b2"),
        errors_chart=bar_chart(report.error_types, "#e45756") if report.error_types else "none",
        progress=line_chart(throughput_series(report.progress)),
        metrics=html.escape(_metrics_text(report.metrics)) or "not evaluated",
        panels="".join(
            f'<div class="card panel" style="margin-top:24px"><h2>{html.escape(title)}</h2>'
            f"{body}</div>"
            for title, body in report.panels
        ),
    )


def bar_chart(pairs: list[tuple[str, float]], colour: str, width: int = 420) -> str:
    """Horizontal bars, one per (label, count or share)."""
    if not pairs:
        return "<p>no data</p>"
    top, row, label_w = max(count for _, count in pairs) or 1, 18, 130
    bars = []
    for index, (label, count) in enumerate(pairs):
        y, length = index * row, (width - label_w - 50) * count / top
        bars.append(
            f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="11">'
            f"{html.escape(label[:22])}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{length:.1f}" height="{row - 5}" '
            f'fill="{colour}"/><text x="{label_w + length + 4:.1f}" y="{y + 13}" '
            f'font-size="11">{number(count)}</text>'
        )
    height = row * len(pairs) + 4
    return f'<svg width="{width}" height="{height}" role="img">{"".join(bars)}</svg>'


def throughput_series(progress: list[tuple[float, int]]) -> list[tuple[float, float]]:
    """(seconds, images/s) between consecutive progress points."""
    return [
        (t1, (n1 - n0) / (t1 - t0))
        for (t0, n0), (t1, n1) in itertools.pairwise(progress)
        if t1 > t0
    ]


def line_chart(points: list[tuple[float, float]], width: int = 420, height: int = 180) -> str:
    """A value (images/s) against seconds elapsed."""
    if len(points) < 2:
        return "<p>too short a run to plot</p>"
    t_max, n_max = max(t for t, _ in points) or 1, max(n for _, n in points) or 1
    coords = " ".join(
        f"{40 + (width - 50) * t / t_max:.1f},{height - 25 - (height - 35) * n / n_max:.1f}"
        for t, n in points
    )
    return (
        f'<svg width="{width}" height="{height}" role="img">'
        f'<line x1="40" y1="{height - 25}" x2="{width - 10}" y2="{height - 25}" stroke="#999"/>'
        f'<line x1="40" y1="10" x2="40" y2="{height - 25}" stroke="#999"/>'
        f'<polyline points="{coords}" fill="none" stroke="#f58518" stroke-width="2"/>'
        f'<text x="40" y="{height - 8}" font-size="11">0 s</text>'
        f'<text x="{width - 10}" y="{height - 8}" font-size="11" text-anchor="end">'
        f"{t_max:.0f} s</text>"
        f'<text x="4" y="16" font-size="11">{n_max:.1f}</text></svg>'
    )
