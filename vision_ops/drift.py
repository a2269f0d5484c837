"""Drift: a run's label and score distributions and error rate against the runs before it.

The population stability index of a distribution p (this run) against q (the earlier runs
pooled), over the same bins (labels, or score bins), each share floored at EPSILON:

    PSI = sum_i (p_i - q_i) * ln(p_i / q_i)

0 when they are equal; by the usual reading under 0.1 a small shift, 0.25 and over a large one.
Over a handful of units it is noise (two tiles of a quiet incremental night against 26-tile
nights read 8.7: each label the two lack adds 7 to 9 times its share), so the distributions
are compared only where the run and the runs pooled each hold `MonitorSpec.min_units` units the
model answered; the error rate is compared whatever the count.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from vision_ops.config import MonitorSpec
from vision_ops.outputs import Manifest, Target, committed_runs, describe
from vision_ops.report import NoSuchRun
from vision_ops.schema import PARTITION_COLUMN, run_order
from vision_ops.storage import StorageOptions
from vision_ops.tasks import task_of_run
from vision_ops.trend import RunFigures, figure_columns, new_units_of, run_figures, table_figures

EPSILON = 1e-4  # the share given to a bin one side has and the other has not
FIGURES = ("label_psi", "score_psi", "error_rate_rise")  # each is MonitorSpec's threshold field
DISTRIBUTIONS = {"label_psi": "labels", "score_psi": "scores"}  # figure -> what it compares


@dataclass(frozen=True)
class Drift:
    """One figure of a run against its threshold and the runs it was compared with; a
    distribution's figure has no value where too few units were there to compare
    (`not_compared` says so): it never alerts."""

    figure: str  # label_psi, score_psi or error_rate_rise (MonitorSpec's field)
    value: float | None  # None: not compared (`not_compared`)
    threshold: float
    run_id: str
    compared: tuple[str, ...]  # the earlier runs, pooled
    recorded: bool = False  # the value is the one the run's manifest recorded at its commit
    attempts: tuple[str | None, ...] = ()  # the commits of those runs, where known
    not_compared: str = ""  # why `value` is None: `too_few_units`'s words

    @property
    def crossed(self) -> bool:
        return self.value is not None and self.value > self.threshold

    def __str__(self) -> str:
        against = (
            f"run {self.run_id} against {', '.join(self.compared)}"
            f"{' (recorded in its manifest at its commit)' if self.recorded else ''}"
        )
        if self.value is None:
            return f"{self.figure} not compared, {self.not_compared}: {against}"
        verdict = "over" if self.crossed else "within"
        value = f"{self.value:.4f} {verdict} the threshold {self.threshold:g}"
        return f"{self.figure} {value}: {against}"


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


def too_few_units(run_units: int, compared_units: int, monitor: MonitorSpec) -> str:
    """Why a run's label and score distributions are not compared with those of the runs
    before it (pooled): one side holds fewer than `monitor.min_units` units the model answered,
    and a PSI over so few is noise; "" where both hold enough."""
    least = monitor.min_units
    if run_units < least:
        return f"too few units ({run_units} < {least}) to compare distributions"
    if compared_units < least:
        return (
            f"too few units in the runs compared ({compared_units} < {least}) to compare "
            "distributions"
        )
    return ""


def drift(points: list[RunFigures], monitor: MonitorSpec, run_id: str | None = None) -> list[Drift]:
    """The figures of run `run_id` (default: the last of `points`, oldest first) against the
    `monitor.runs` runs of its task before it that processed new inputs; none where it
    processed no new input (a quiet incremental night, or one that only retried earlier error
    rows: such a night is no baseline either) or has no such earlier run. A distribution
    either side has nothing in (a run of error rows only) gives no PSI; one either side has
    fewer than `monitor.min_units` answered units in is not compared (`too_few_units`).

    The error rate counts new inputs only, the runs' and the baseline's alike: an incremental
    run's retries of earlier error rows (`RunFigures.retried_units`) were counted by the run
    that first failed on them, and a broken file retried each night would otherwise read as a
    rise every night. A full run retries nothing: its every error counts."""
    index = len(points) - 1 if run_id is None else [p.run_id for p in points].index(run_id)
    run = points[index]
    earlier = [p for p in points[:index] if p.new_units and p.task == run.task][-monitor.runs :]
    if not run.new_units or not earlier:
        return []
    rate_before = sum(p.new_errors for p in earlier) / sum(p.new_units for p in earlier)
    figures: dict[str, float | None] = {
        "error_rate_rise": run.new_errors / run.new_units - rate_before
    }
    unmeasured = too_few_units(run.ok_units, sum(p.ok_units for p in earlier), monitor)
    for name, counts in DISTRIBUTIONS.items():
        now, before = _counts(run, counts), pooled(earlier, counts)
        if sum(now.values()) and sum(before.values()):
            figures[name] = None if unmeasured else psi(now, before)
    compared = tuple(p.run_id for p in earlier)
    return [
        _figure(name, figures[name], monitor, run.run_id, compared, unmeasured)
        for name in FIGURES
        if name in figures
    ]


def _figure(
    name: str,
    value: float | None,
    monitor: MonitorSpec,
    run_id: str,
    compared: tuple[str, ...],
    unmeasured: str,
    recorded: bool = False,
) -> Drift:
    """A figure against its threshold in `monitor`; no value: not compared, `unmeasured` why."""
    threshold = float(getattr(monitor, name))
    if value is None:
        return Drift(name, None, threshold, run_id, compared, recorded, not_compared=unmeasured)
    return Drift(name, round(float(value), 4), threshold, run_id, compared, recorded)


def runs_before(runs: list[Manifest], run_id: str, run_date: str) -> list[Manifest]:
    """The committed runs before run `run_id` of `run_date`, in committed_runs' order
    (schema.RUN_ORDER); the run itself (a rerun's earlier commit) left out."""
    this_run = run_order({PARTITION_COLUMN: run_date, "run_id": run_id})
    return [run for run in runs if run_order(run) < this_run]


def baseline_runs(runs: list[Manifest], run: Manifest, monitor: MonitorSpec) -> list[Manifest]:
    """The `monitor.runs` committed runs before `run` of its task that committed new inputs (a
    quiet incremental night's run of none, or of retries alone, is no baseline, nor a run of
    another task in the same Parquet table), as `drift` pools them."""
    earlier = runs_before(runs, run["run_id"], run["run_date"])
    same_task = [committed for committed in earlier if committed.get("task") == run.get("task")]
    return [committed for committed in same_task if new_units_of(committed)][-monitor.runs :]


def drift_at_commit(
    target: Target,
    monitor: MonitorSpec,
    options: StorageOptions,
    run: Manifest,
    staged: Callable[[list[str]], pa.Table],
) -> list[Drift]:
    """The figures of a run about to commit (`run`: its run_id, run_date and task) against the
    `monitor.runs` committed runs before it, as `drift` computes them for `report --check`;
    its `staged` rows are read only where there is an earlier run (none: no figures)."""
    earlier = baseline_runs(committed_runs(target, options), run, monitor)
    if not earlier:
        return []
    points = [run_figures(target, committed, options) for committed in earlier]
    rows = staged(figure_columns(task_of_run(run)))
    found = drift([*points, table_figures(rows, run)], monitor)
    return [replace(d, attempts=_attempts(earlier)) for d in found]


def _attempts(runs: list[Manifest]) -> tuple[str | None, ...]:
    """Which commit of each run: a rerun of a baseline run keeps its id, not its attempt."""
    return tuple(run.get("attempt") for run in runs)


def manifest_entry(found: list[Drift]) -> dict[str, Any]:
    """What a run's manifest records as `drift`: the runs compared (none: no earlier run, and
    no figures) and per figure its value, its threshold and whether it crossed it (a figure
    not compared: value null, and why)."""
    return {
        "compared": list(found[0].compared) if found else [],
        "attempts": list(found[0].attempts) if found else [],
        **{d.figure: _entry_figure(d) for d in found},
    }


def _entry_figure(found: Drift) -> dict[str, Any]:
    entry = {"value": found.value, "threshold": found.threshold, "crossed": found.crossed}
    return entry | ({"not_compared": found.not_compared} if found.value is None else {})


def recorded_drift(
    manifest: Manifest, earlier: list[Manifest], monitor: MonitorSpec
) -> list[Drift] | None:
    """The figures a run's manifest recorded at its commit, held to `monitor`'s thresholds and
    its `min_units` (judged on the manifests' counts of ok units: a PSI recorded over fewer is
    not compared), where it compared exactly the commits of the runs `earlier`; None where it
    recorded none or compared others (a run committed since, a baseline run rerun since,
    another `monitor.runs`, or a manifest that did not record the commits), or recorded a
    distribution not compared that `min_units` now compares: they are computed."""
    entry = manifest.get("drift")
    compared = tuple(run["run_id"] for run in earlier)
    if not isinstance(entry, Mapping) or tuple(entry.get("compared") or ()) != compared:
        return None
    if tuple(entry.get("attempts") or ()) != _attempts(earlier):
        return None
    if not all(isinstance(entry.get(name), Mapping) for name in FIGURES):
        return None
    unmeasured = _recorded_too_few_units(manifest, earlier, monitor)
    if unmeasured is None:
        return None
    values = {name: entry[name].get("value") for name in FIGURES}
    for name in DISTRIBUTIONS:
        if unmeasured:
            values[name] = None
        elif values[name] is None:
            return None
    return [
        _figure(name, values[name], monitor, manifest["run_id"], compared, unmeasured, True)
        for name in FIGURES
    ]


def _recorded_too_few_units(
    manifest: Manifest, earlier: list[Manifest], monitor: MonitorSpec
) -> str | None:
    """`too_few_units` of a run and the runs it compared, from their manifests' `ok` counts
    (the rows' status, as `RunFigures.ok_units`); None where a manifest has none."""
    if any(run.get("ok") is None for run in (manifest, *earlier)):
        return None
    return too_few_units(int(manifest["ok"]), sum(int(run["ok"]) for run in earlier), monitor)


def render_drift_cards(found: list[Drift]) -> str:
    """A card per run checked (`report --check --since`: several), in the order found."""
    by_run: dict[str, list[Drift]] = {}
    for figure in found:
        by_run.setdefault(figure.run_id, []).append(figure)
    return "".join(render_drift_html(run) for run in by_run.values()) or render_drift_html([])


# Why a run has no drift figures: the run's summary line and the report's card say it so.
NO_FIGURES = (
    "no figures (the run processed no new input, only retries of earlier error rows or none, "
    "or no committed run before it processed units)"
)


def render_drift_html(found: list[Drift]) -> str:
    """A card of the figures, those over their threshold in red."""
    if not found:
        return f'<div class="card drift"><h2>Drift</h2><p>{NO_FIGURES}</p></div>'

    source = (
        "recorded in the run's manifest at its commit"
        if found[0].recorded
        else "computed from the committed rows"
    )
    rows = "".join(
        f'<tr class="drift{" crossed" if d.crossed else ""}" style="color:'
        f'{"#c62828" if d.crossed else "#222"}"><td>{d.figure}</td><td>{_shown_value(d)}</td>'
        f"<td>{d.threshold:g}</td><td>{_verdict(d)}</td></tr>"
        for d in found
    )
    return (
        f'<div class="card drift" style="margin:12px 0"><h2>Drift: run '
        f"{html.escape(found[0].run_id)} against {html.escape(', '.join(found[0].compared))}"
        f'</h2><p class="drift-source">{source}</p>'
        "<table><tr><th>figure</th><th>value</th><th>threshold</th><th></th></tr>"
        f"{rows}</table></div>"
    )


def _shown_value(found: Drift) -> str:
    return "-" if found.value is None else f"{found.value:.4f}"


def _verdict(found: Drift) -> str:
    if found.value is None:
        return html.escape(f"not compared: {found.not_compared}")
    return "ALERT" if found.crossed else "ok"


def check_run(
    target: Target,
    monitor: MonitorSpec,
    options: StorageOptions | None = None,
    run_id: str | None = None,
) -> list[Drift]:
    """The drift figures of a committed run (default: the latest): those its manifest recorded
    at its commit where they compare the same runs, else computed from its rows and those of
    the `monitor.runs` committed runs before it."""
    return _checked(target, monitor, options, committed_runs(target, options), run_id)


def check_runs_since(
    target: Target, monitor: MonitorSpec, options: StorageOptions | None, since: dt.date
) -> list[Drift]:
    """`check_run` for every committed run from `since` on, the table's runs listed once;
    NoSuchRun where there is none (a date mistyped, or past the last run, is not "no drift")."""
    return check_runs(
        target,
        monitor,
        options,
        lambda run: dt.date.fromisoformat(run["run_date"]) >= since,
        none_chosen=f"no committed run in {describe(target)} since {since}",
    )


def check_runs_of_dates(
    target: Target, monitor: MonitorSpec, options: StorageOptions | None, dates: Collection[str]
) -> list[Drift]:
    """`check_run` for the committed runs of these run dates (ISO), the runs listed once."""
    return check_runs(target, monitor, options, lambda run: run["run_date"] in dates)


def check_runs(
    target: Target,
    monitor: MonitorSpec,
    options: StorageOptions | None,
    chosen: Callable[[Manifest], bool],
    none_chosen: str = "",
) -> list[Drift]:
    """`check_run` for each committed run `chosen` picks, in commit order; NoSuchRun saying
    `none_chosen`, where given, if it picks none."""
    runs = committed_runs(target, options)
    ids = [run["run_id"] for run in runs if chosen(run)]
    if not ids and none_chosen:
        raise NoSuchRun(none_chosen)
    return [d for run_id in ids for d in _checked(target, monitor, options, runs, run_id)]


def _checked(
    target: Target,
    monitor: MonitorSpec,
    options: StorageOptions | None,
    runs: list[Manifest],
    run_id: str | None,
) -> list[Drift]:
    ids = [run["run_id"] for run in runs]
    if run_id is not None and run_id not in ids:
        raise NoSuchRun(f"{describe(target)}: no committed run {run_id}")
    if not runs:
        return []
    run = runs[len(runs) - 1 if run_id is None else ids.index(run_id)]
    earlier = baseline_runs(runs, run, monitor)
    found = recorded_drift(run, earlier, monitor)
    if found is not None:
        return found
    return drift([run_figures(target, r, options or {}) for r in [*earlier, run]], monitor)
