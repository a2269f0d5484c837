"""Trends across runs and drift alerts: four nights committed from a few rows through the real
Parquet sink, the last one's inputs swapped; figures checked against the rows, the alert
through `vision-ops report --check`, the chart points in headless Chromium."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from browser import CHROMIUM, measure
from committed_rows import classified, commit_rows, failed

from vision_ops.cli import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK, main
from vision_ops.config import MonitorSpec
from vision_ops.drift import EPSILON, drift, psi
from vision_ops.errors import EXIT_DRIFT
from vision_ops.trend import render_trend_html, render_trend_text, series, trend

NIGHTS = ("2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04")


def night(index: int) -> list[dict[str, object]]:
    """Nights 0-2: 6 cats and 4 dogs scored 0.7-0.95, one broken file; night 3 (inputs
    swapped): 8 cars scored 0.3-0.45 and three broken files."""
    if index < 3:
        rows = [
            classified(f"/nonexistent/b/{index}/cat{i}.jpg", ("cat", 0.9 - 0.02 * i))
            for i in range(6)
        ]
        rows += [
            classified(f"/nonexistent/b/{index}/dog{i}.jpg", ("dog", 0.75 + 0.05 * i))
            for i in range(4)
        ]
        return [*rows, failed(f"/nonexistent/b/{index}/x.jpg", "NotAnImage", "not an image")]
    rows = [classified(f"/nonexistent/b/3/car{i}.jpg", ("car", 0.3 + 0.02 * i)) for i in range(8)]
    return rows + [
        failed(f"/nonexistent/b/3/x{i}.jpg", "EmptyFile", "empty file") for i in range(3)
    ]


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    table = tmp_path_factory.mktemp("trend") / "table"
    for index, date in enumerate(NIGHTS):
        details = {"images_per_second": 10.0 + index}
        commit_rows(table, "classification", night(index), f"night-{index}", date, details=details)
    return table


def test_psi_is_its_formula() -> None:
    assert psi({"a": 5, "b": 5}, {"a": 50, "b": 50}) == 0.0
    expected = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi({"a": 9, "b": 1}, {"a": 5, "b": 5}) == pytest.approx(expected)
    one_sided = (1 - 0.5) * math.log(1 / 0.5) + (EPSILON - 0.5) * math.log(EPSILON / 0.5)
    assert psi({"a": 4}, {"a": 1, "b": 1}) == pytest.approx(one_sided)


def test_trend_figures_equal_the_rows(nights) -> None:
    points = trend(str(nights))
    assert [p.run_id for p in points] == [f"night-{i}" for i in range(4)]
    assert [p.units for p in points] == [11, 11, 11, 11]
    assert [round(p.error_rate, 4) for p in points] == [0.0909] * 3 + [0.2727]
    cat_dog = [0.9 - 0.02 * i for i in range(6)] + [0.75 + 0.05 * i for i in range(4)]
    assert points[0].mean_score == pytest.approx(np.mean(np.float32(cat_dog)), abs=1e-4)
    assert points[3].p05_score == pytest.approx(
        np.quantile(np.float32([0.3 + 0.02 * i for i in range(8)]), 0.05), abs=1e-4
    )
    assert points[0].labels == {"cat": 6.0, "dog": 4.0} and points[3].labels == {"car": 8.0}
    assert [p.images_per_second for p in points] == [10.0, 11.0, 12.0, 13.0]
    drawn = series(points)
    assert drawn["label share"] == {
        "cat": [0.6] * 3 + [0.0],
        "dog": [0.4] * 3 + [0.0],
        "car": [0.0] * 3 + [1.0],
    }
    assert drawn["error rate"]["EmptyFile"] == [0.0, 0.0, 0.0, 0.2727]
    assert [p.run_id for p in trend(str(nights), since=dt.date(2026, 3, 3))] == [
        "night-2",
        "night-3",
    ]


def test_the_swapped_night_drifts_and_the_steady_ones_do_not(nights) -> None:
    points = trend(str(nights))
    steady = {d.figure: d for d in drift(points[:3], MonitorSpec())}
    assert all(
        not d.crossed and d.value == pytest.approx(0.0, abs=1e-9)
        for f, d in steady.items()
        if f != "error_rate_rise"
    )
    assert steady["error_rate_rise"].value == pytest.approx(0.0, abs=1e-4)
    swapped = {d.figure: d for d in drift(points, MonitorSpec(runs=2))}
    assert swapped["label_psi"].compared == ("night-1", "night-2")
    baseline = {"cat": 12, "dog": 8}
    assert swapped["label_psi"].value == pytest.approx(psi({"car": 8}, baseline), abs=1e-4)
    assert swapped["label_psi"].crossed and swapped["score_psi"].crossed
    assert swapped["error_rate_rise"].value == pytest.approx(3 / 11 - 2 / 22, abs=1e-4)


def test_report_check_exits_6_naming_the_figure_threshold_and_runs(nights, capsys) -> None:
    table = str(nights)
    assert main(["report", table, "--check", "--run-id", "night-2"]) == EXIT_OK
    assert "drift: label_psi 0.0000 within the threshold 0.25" in capsys.readouterr().out
    assert main(["report", table, "--check"]) == EXIT_DRIFT
    err = capsys.readouterr().err
    assert (
        "alert: label_psi" in err
        and "over the threshold 0.25: run night-3 against night-0, night-1, night-2" in err
    )
    assert "alert: error_rate_rise 0.1818 over the threshold 0.05" in err
    loose = ["--max-label-psi", "50", "--max-score-psi", "50", "--max-error-rate-rise", "0.5"]
    assert main(["report", table, "--check", *loose]) == EXIT_OK
    capsys.readouterr()
    assert main(["report", table, "--check", "--runs", "0"]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert err == (
        "error: report --check thresholds: runs: Input should be greater than or equal to 1\n"
    )  # one line, the flag's field named: no pydantic dump
    assert main(["report", table, "--since", "2026-03-02"]) == EXIT_BAD_SPEC  # without --trend
    assert main(["report", table, "--samples", "0"]) == EXIT_BAD_SPEC
    assert "--samples: expected 1 or more, found 0" in capsys.readouterr().err
    for unchecked in (["--trend"], []):  # thresholds without --check: refused, not ignored
        assert main(["report", table, *unchecked, "--runs", "2", *loose[:2]]) == EXIT_BAD_SPEC
        assert capsys.readouterr().err == (
            "error: --runs, --max-label-psi: drift thresholds, expected with --check\n"
        )


def test_report_trend_check_checks_the_run_it_is_given(nights, capsys) -> None:
    """`--trend --check --run-id night-2` checks night 2 (within), not the latest (night 3,
    over); a run the trend does not hold is an error, no traceback."""
    table = str(nights)
    assert main(["report", table, "--trend", "--check", "--run-id", "night-2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "drift: label_psi 0.0000 within the threshold 0.25: run night-2 against night-0, " \
        "night-1\n" in out  # fmt: skip
    assert "night-3 against" not in out
    args = ["report", table, "--trend", "--check", "--since", "2026-03-03", "--run-id", "night-1"]
    assert main(args) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err == f"error: no committed run night-1 in {table} since 2026-03-03\n"


def test_report_check_since_checks_every_run_from_that_date(nights, capsys) -> None:
    """Every night from a date is checked, not the latest alone (nights a failed schedule
    left unchecked): nights 2 and 3 each against the runs before it; one over its threshold
    is exit 6. A date past the last night checks nothing: exit 1 saying so, as --trend does
    (it passed, exit 0, saying the run "processed no new input")."""
    table = str(nights)
    assert main(["report", table, "--check", "--since", "2026-03-05"]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert captured.err == f"error: no committed run in {table} since 2026-03-05\n"
    assert "drift:" not in captured.out
    assert main(["report", table, "--check", "--since", "2026-03-03"]) == EXIT_DRIFT
    out = capsys.readouterr().out
    within = "label_psi 0.0000 within the threshold 0.25: run night-2 against night-0, night-1\n"
    assert within in out
    assert "over the threshold 0.25: run night-3 against night-0, night-1, night-2\n" in out
    assert "run night-1 against" not in out
    loose = ["--max-label-psi", "50", "--max-score-psi", "50", "--max-error-rate-rise", "0.5"]
    assert main(["report", table, "--check", "--since", "2026-03-02", *loose]) == EXIT_OK
    assert capsys.readouterr().out.count("drift: error_rate_rise") == 3
    page = nights.parent / "since.html"
    args = ["report", table, "--check", "--since", "2026-03-03", "--html", str(page)]
    assert main(args) == EXIT_DRIFT
    html = page.read_text()
    cards = [html.index(f"Drift: run {run}") for run in ("night-2", "night-3")]
    assert cards == sorted(cards) and html.count('<div class="card drift"') == 2
    capsys.readouterr()
    both = ["report", table, "--check", "--since", "2026-03-02", "--run-id", "night-2"]
    assert main(both) == EXIT_BAD_SPEC
    assert "expected --since (every run from a date) or --run-id, found both" in (
        capsys.readouterr().err
    )


def test_the_spec_monitor_section_sets_the_thresholds(nights, tmp_path, capsys) -> None:
    spec = {
        "input": {"uris": ["/nonexistent/b/"]},
        "model": {"architecture": "resnet18"},
        "output": {"uri": str(nights)},
        "monitor": {"runs": 1, "label_psi": 40, "score_psi": 40, "error_rate_rise": 0.9},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["report", str(tmp_path / "job.yaml"), "--check"]) == EXIT_OK
    assert "run night-3 against night-2" in capsys.readouterr().out
    spec["monitor"] = {"label_psi": -1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["report", str(tmp_path / "job.yaml"), "--check"]) == EXIT_BAD_SPEC


def test_report_trend_prints_a_line_per_run(nights, capsys, tmp_path) -> None:
    page = tmp_path / "trend.html"
    code = main(["report", str(nights), "--trend", "--since", "2026-03-02", "--html", str(page)])
    assert code == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run_date", "run_id", "units"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        [d, f"night-{i}", "11"] for i, d in enumerate(NIGHTS[1:], start=1)
    ]
    assert "<svg" in page.read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_trend_chart_points_equal_the_table(nights, tmp_path) -> None:
    points = trend(str(nights))
    found = drift(points, MonitorSpec())
    from vision_ops.drift import render_drift_html

    page = render_trend_html(points, str(nights), render_drift_html(found))
    drawn = measure(page, tmp_path)["points"]
    table = series(points)
    for chart, lines in table.items():
        for name, values in lines.items():
            shown = [p for p in drawn if p["chart"] == chart and p["series"] == name]
            ran = [point.run_id for point, v in zip(points, values, strict=True) if v is not None]
            assert [p["run"] for p in shown] == ran
            assert [p["value"] for p in shown] == [v for v in values if v is not None]
            for p in shown:  # where the point is drawn reads back as its value
                plot, at = p["plot"], p["at"]
                height = 1 - (at["y"] + at["h"] / 2 - plot["y"]) / plot["h"]
                assert p["low"] + height * (p["high"] - p["low"]) == pytest.approx(
                    p["value"], abs=(p["high"] - p["low"]) / 100
                )
    units = [p for p in drawn if p["chart"] == "units"]
    assert [p["value"] for p in units] == [11, 11, 11, 11]
    assert "ALERT" in page and render_trend_text(points).count("night-") == 4


def test_the_trend_shows_evaluate_metrics_where_a_run_was_scored(tmp_path) -> None:
    from vision_ops.evaluate import evaluate_run

    table = tmp_path / "table"
    for index, date in enumerate(NIGHTS[:2]):
        commit_rows(table, "classification", night(index), f"night-{index}", date)
    truth = tmp_path / "truth.csv"
    truth.write_text("uri,label\n/nonexistent/b/1/cat0.jpg,cat\n/nonexistent/b/1/dog0.jpg,cat\n")
    evaluate_run(str(table), str(truth), "table", run_id="night-1")
    metrics = series(trend(str(table)))["metrics"]
    assert metrics["accuracy"] == [None, 0.5]  # night-0 was not scored


def test_report_refuses_an_empty_trend_and_an_html_page_it_cannot_write(
    nights, capsys, tmp_path
) -> None:
    from vision_ops.errors import EXIT_FAILED

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--trend"]) == EXIT_FAILED
    assert f"error: no committed run in {empty}" in capsys.readouterr().err
    assert main(["report", str(nights), "--trend", "--since", "2027-01-01"]) == EXIT_FAILED
    assert "since 2027-01-01" in capsys.readouterr().err
    nowhere = tmp_path / "missing" / "page.html"
    assert main(["report", str(nights), "--html", str(nowhere)]) == EXIT_BAD_SPEC
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the report, not after printing it
    assert f"--html {nowhere}: expected a file in an existing folder" in captured.err


def test_a_night_of_no_units_has_no_error_rate(tmp_path: Path) -> None:
    """A quiet incremental night commits no units: its error rates are `-` (no units, no
    rate), as its score and label shares are, not 0 beside the nights that had units."""
    table = tmp_path / "table"
    commit_rows(table, "classification", night(0), "night-0", NIGHTS[0])
    commit_rows(table, "classification", [], "quiet", NIGHTS[1])
    points = trend(str(table))
    assert series(points)["error rate"] == {"all": [0.0909, None], "NotAnImage": [0.0909, None]}
    quiet = render_trend_text(points).splitlines()[2].split()
    assert quiet == ["2026-03-02", "quiet", "0", "-", "-", "-", "-", "-", "-", "-"]
