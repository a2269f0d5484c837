"""Drift recorded at the commit: a run's figures against the committed runs before it land in
its manifest (Parquet's JSON, Iceberg's snapshot summary), `vision-ops run` prints them, and
`report --check` holds a run to the figures its manifest recorded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from committed_rows import classified, commit_rows

from vision_ops.cli import EXIT_OK, main
from vision_ops.config import MonitorSpec, OutputSpec
from vision_ops.drift import FIGURES, check_run, drift, psi
from vision_ops.errors import EXIT_DRIFT
from vision_ops.outputs import committed_run, committed_runs
from vision_ops.tasks import counts
from vision_ops.trend import new_units_of, run_figures, series, trend

pytestmark = pytest.mark.timeout(600)
LITE0 = {
    "kind": "entrypoint",
    "entrypoint": "vision_ops.zoo:efficientnet_lite0",
    "name": "efficientnet_lite0",
    "labels": "imagenet-1k",
    "preprocessing": {"resize": 256, "crop": 224, "mean": [0.498] * 3, "std": [0.502] * 3},
}
STEADY, SWAPPED = ("chelsea.png", "coffee.png"), ("astronaut.png", "rocket.jpg")
# Units a run (and the runs before it) needs for its distributions to be compared: the tests
# whose runs should compare them are this size (fewer: "too few units", no PSI).
ENOUGH = MonitorSpec().min_units
COPIES = 3  # each photo of a night copied: 6 units, the shares (and so the PSIs) of 2


def night_spec(folder: Path, output: dict[str, Any], index: int) -> dict[str, Any]:
    return {
        "input": {"uris": [str(folder)]},
        "task": {"kind": "classification", "top_k": 3},
        "model": LITE0,
        "runtime": {"batch_size": 4, "max_actors": 1},
        "output": output,
        "run": {"id": f"night-{index}", "date": f"2026-11-2{index}"},
    }


def photos(tmp_path: Path, photo_paths: list[Path], index: int, names: tuple[str, ...]) -> Path:
    """A night's folder: each named photo `COPIES` times."""
    folder = tmp_path / f"photos-{index}"
    folder.mkdir()
    for path in photo_paths:
        if path.name in names:
            for copy in range(COPIES):
                shutil.copy(path, folder / f"{path.stem}-{copy}{path.suffix}")
    return folder


@pytest.fixture(params=["parquet", pytest.param("iceberg", marks=pytest.mark.s3)])
def table_output(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, Any], Any]:
    """The job's `output:` (and `storage_options:`) of either format."""
    if request.param == "parquet":
        return {"uri": str(tmp_path / "table")}, {}
    server = request.getfixturevalue("iceberg_s3")
    name = f"drift_{tmp_path.name.replace('-', '_')[-20:]}"
    output = {
        "format": "iceberg",
        "uri": f"s3://out/{name}",
        "table": f"tests.{name}",
        "catalog": server.catalog_properties(),
    }
    return output, {"s3": server.storage_options()}


def target_of(output: dict[str, Any]) -> Any:
    """The table as outputs.* take it: a Parquet table's URI, an Iceberg table's spec."""
    return OutputSpec.model_validate(output) if output.get("format") == "iceberg" else output["uri"]


def recorded(output: dict[str, Any], options: Any, run_id: str) -> dict[str, Any]:
    """A run's `drift` as stored: Parquet's manifest JSON read plainly, Iceberg's snapshot
    summary read through a fresh PyIceberg catalog (the JSON of `vision_ops.details`)."""
    if output.get("format") != "iceberg":
        manifest = Path(output["uri"]) / "_manifests" / f"{run_id}.json"
        return dict(json.loads(manifest.read_text())["drift"])
    from pyiceberg.catalog import load_catalog

    table = load_catalog("independent", **output["catalog"]).load_table(output["table"])
    [summary] = [
        s.summary for s in table.snapshots() if s.summary.get("vision_ops.run_id") == run_id
    ]
    return dict(json.loads(summary["vision_ops.details"])["drift"])


def top_labels(output: dict[str, Any], options: Any, run_id: str) -> dict[str, float]:
    """The run's ok rows' labels, read back: plain pyarrow (Parquet) or a PyIceberg scan."""
    if output.get("format") != "iceberg":
        date = f"2026-11-2{run_id[-1]}"
        table = pq.read_table(Path(output["uri"]) / f"run_date={date}")
    else:
        from pyiceberg.catalog import load_catalog

        iceberg = load_catalog("independent", **output["catalog"]).load_table(output["table"])
        table = iceberg.scan(row_filter=f"run_id == '{run_id}'").to_arrow()
    return dict(counts(table.filter(pc.equal(table["status"], "ok"))["label"]))


def test_a_run_records_its_drift_in_its_manifest(
    ray_local, tmp_path, photo_paths, table_output, capsys
) -> None:
    """Three nights, the third over other photos: night 1 records no earlier run, night 2
    nothing crossed against night 1, night 3 its label PSI over the threshold against both;
    `vision-ops run` prints it and `report --check` uses the recorded figures."""
    from vision_ops.config import parse_spec
    from vision_ops.pipeline import run_job

    output, options = table_output
    summaries = []
    for index, names in enumerate((STEADY, STEADY), start=1):
        spec = night_spec(photos(tmp_path, photo_paths, index, names), output, index)
        summaries.append(run_job(parse_spec(spec | {"storage_options": options})))
    third = night_spec(photos(tmp_path, photo_paths, 3, SWAPPED), output, 3)
    (tmp_path / "night-3.yaml").write_text(yaml.safe_dump(third | {"storage_options": options}))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "night-3.yaml")]) == EXIT_OK
    printed = capsys.readouterr().out

    first = recorded(output, options, "night-1")
    assert summaries[0].drift == [] and first == {"compared": [], "attempts": []}
    second = recorded(output, options, "night-2")
    assert second["compared"] == ["night-1"]
    assert second["label_psi"] == {"value": 0.0, "threshold": 0.25, "crossed": False}
    assert not any(second[name]["crossed"] for name in FIGURES)

    found = recorded(output, options, "night-3")
    assert found["compared"] == ["night-1", "night-2"]
    attempts = [committed_run(target_of(output), r, options)["attempt"] for r in found["compared"]]
    assert found["attempts"] == attempts
    before = top_labels(output, options, "night-1")
    pooled = {k: 2 * v for k, v in before.items()}  # night 2 found what night 1 found
    expected = psi(top_labels(output, options, "night-3"), pooled)
    assert expected > 1  # the swapped photos' labels are none of the steady ones'
    assert found["label_psi"] == {"value": round(expected, 4), "threshold": 0.25, "crossed": True}
    assert set(found) == {"compared", "attempts", *FIGURES}
    assert "drift: ALERT label_psi" in printed
    assert "over the threshold 0.25: run night-3 against night-1, night-2" in printed

    target = target_of(output)
    again = drift(trend(target, options), MonitorSpec())  # from the rows, as report computed it
    assert {d.figure: d.value for d in again} == {k: found[k]["value"] for k in FIGURES}
    assert committed_run(target, "night-3", options)["drift"] == found  # the project's reader
    checked = check_run(target, MonitorSpec(), options)
    assert all(d.recorded for d in checked) and [d.value for d in checked] == [
        found[k]["value"] for k in FIGURES
    ]
    if not options:  # Parquet: the command too (the same function underneath)
        assert main(["report", output["uri"], "--check"]) == EXIT_DRIFT
        assert "(recorded in its manifest at its commit)" in capsys.readouterr().out


def test_report_check_uses_the_recorded_figures_only_for_the_runs_they_compared(
    tmp_path, capsys
) -> None:
    """A manifest's figures are used where they compare the runs the check would (here a
    recorded label PSI of 9, the rows say 0); with another `--runs` they are computed."""
    table = tmp_path / "table"
    rows = [classified(f"/nonexistent/{i}.jpg", ("cat", 0.9)) for i in range(ENOUGH)]
    for index in range(2):
        commit_rows(table, "classification", rows, f"n{index}", f"2026-05-0{index + 1}")
    figures = {name: {"value": 0.0, "threshold": 1.0, "crossed": False} for name in FIGURES}
    attempts = [committed_run(str(table), run_id)["attempt"] for run_id in ("n0", "n1")]
    entry = {"compared": ["n0", "n1"], "attempts": attempts, **figures, "label_psi": {"value": 9.0}}
    commit_rows(table, "classification", rows, "n2", "2026-05-03", details={"drift": entry})

    assert main(["report", str(table), "--check"]) == EXIT_DRIFT
    out = capsys.readouterr().out
    assert "drift: label_psi 9.0000 over the threshold 0.25: run n2 against n0, n1" in out
    assert "(recorded in its manifest at its commit)" in out
    assert main(["report", str(table), "--check", "--runs", "1"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "drift: label_psi 0.0000 within the threshold 0.25: run n2 against n1\n" in out
    page = tmp_path / "report.html"
    assert main(["report", str(table), "--check", "--html", str(page)]) == EXIT_DRIFT
    assert '<p class="drift-source">recorded in the run\'s manifest at its commit' in (
        page.read_text()
    )


def test_recorded_figures_are_not_used_once_a_run_they_compared_is_rerun(tmp_path, capsys) -> None:
    """n2 recorded no drift against n0 and n1 (all cats); n1 is then rerun, the same id and
    date, and its rows are dogs: the check computes n2's figures against n1 as it is now
    (the recorded ones, of the n1 that is gone, said all was well); so for a manifest that
    recorded the runs but not their commits (an earlier version's)."""
    table = tmp_path / "table"
    cats = [classified(f"/nonexistent/{i}.jpg", ("cat", 0.9)) for i in range(ENOUGH)]
    dogs = [classified(f"/nonexistent/{i}.jpg", ("dog", 0.9)) for i in range(ENOUGH)]
    for index in range(2):
        commit_rows(table, "classification", cats, f"n{index}", f"2026-05-0{index + 1}")
    quiet = {name: {"value": 0.0, "threshold": 0.25, "crossed": False} for name in FIGURES}
    attempts = [committed_run(str(table), run_id)["attempt"] for run_id in ("n0", "n1")]
    entry = {"compared": ["n0", "n1"], "attempts": attempts, **quiet}
    commit_rows(table, "classification", cats, "n2", "2026-05-03", details={"drift": entry})
    assert main(["report", str(table), "--check"]) == EXIT_OK
    assert "(recorded in its manifest at its commit)" in capsys.readouterr().out

    commit_rows(table, "classification", dogs, "n1", "2026-05-02")  # n1 rerun
    assert main(["report", str(table), "--check"]) == EXIT_DRIFT
    out = capsys.readouterr().out
    assert re.search(r"label_psi \d+\.\d{4} over the threshold 0\.25: run n2 against n0, n1\n", out)
    assert "(recorded in its manifest at its commit)" not in out
    assert not check_run(str(table), MonitorSpec())[0].recorded

    older = {"compared": ["n0", "n1"], **quiet}  # no attempts recorded
    commit_rows(table, "classification", cats, "n3", "2026-05-04", details={"drift": older})
    assert not check_run(str(table), MonitorSpec())[0].recorded


def test_a_run_is_compared_with_the_runs_before_it_never_itself(tmp_path) -> None:
    """At the commit: the committed runs before the run's date (a rerun's own earlier commit
    and later dates left out); with none, its staged rows are not even read."""
    from vision_ops.drift import drift_at_commit

    table = tmp_path / "table"
    cats = [classified(f"/nonexistent/{i}.jpg", ("cat", 0.9)) for i in range(ENOUGH)]
    for index in range(3):
        commit_rows(table, "classification", cats, f"n{index}", f"2026-05-0{index + 1}")
    dogs = pa.Table.from_pylist([classified("/nonexistent/d.jpg", ("dog", 0.5))] * ENOUGH)
    dogs = dogs.append_column("status", pa.array(["ok"] * ENOUGH))
    dogs = dogs.append_column("error_type", pa.nulls(ENOUGH, pa.string()))
    rerun = {"run_id": "n1", "run_date": "2026-05-02", "task": "classification"}
    found = drift_at_commit(str(table), MonitorSpec(), {}, rerun, dogs.select)
    assert [d.figure for d in found] == list(FIGURES)
    assert {d.compared for d in found} == {("n0",)}
    assert found[0].value == round(psi({"dog": ENOUGH}, {"cat": ENOUGH}), 4) and found[0].crossed

    def unread(columns: list[str]) -> pa.Table:
        raise AssertionError("a run with no earlier run must not read its staged rows")

    first = {"run_id": "n9", "run_date": "2026-04-30", "task": "classification"}
    assert drift_at_commit(str(table), MonitorSpec(), {}, first, unread) == []


def test_a_run_of_another_task_in_the_table_is_no_baseline(tmp_path, capsys) -> None:
    """A Parquet table holding detection runs, then a classification run: the classification
    run has no baseline (its image labels against boxes' labels gave a PSI of 18 and exit 6);
    the next classification run is compared with it alone."""
    table = tmp_path / "table"
    car = {"label_id": 1, "label": "car", "score": 0.9}
    car |= {"x_min": 0.0, "y_min": 0.0, "x_max": 5.0, "y_max": 5.0}
    boxes = [
        {"source_uri": f"/nonexistent/{i}.jpg", "num_detections": 1, "detections": [car]}
        for i in range(4)
    ]
    commit_rows(table, "detection", boxes, "d0", "2026-05-01")
    cats = [classified(f"/nonexistent/{i}.jpg", ("cat", 0.9)) for i in range(4)]
    commit_rows(table, "classification", cats, "c1", "2026-05-02")
    assert [point.run_id for point in trend(str(table))] == ["c1"]  # the latest run's task
    points = [run_figures(str(table), run, {}) for run in committed_runs(str(table))]
    assert [point.task for point in points] == ["detection", "classification"]
    assert drift(points, MonitorSpec()) == []
    assert check_run(str(table), MonitorSpec()) == []
    assert main(["report", str(table), "--check"]) == EXIT_OK
    commit_rows(table, "classification", cats, "c2", "2026-05-03")
    assert {d.compared for d in check_run(str(table), MonitorSpec())} == {("c1",)}
    assert {d.compared for d in drift(trend(str(table)), MonitorSpec())} == {("c1",)}


def test_the_error_rate_leaves_out_the_retries_a_manifest_records(tmp_path) -> None:
    """The error rows of sources an incremental run retried (its manifest's `retried`) were
    counted by the run that first failed on them: drift's error rate, computed from the rows,
    leaves them out of the run and of the baseline alike; a night of retries alone has no
    figures; a full run records no retries, and its every error counts."""
    from committed_rows import failed

    table = tmp_path / "table"
    cats = [classified(f"/p/{i}.jpg", ("cat", 0.9)) for i in range(3)]
    broken = failed("/p/broken.jpg", "CorruptImage", "bad")
    retry = {"retried": {"sources": 1, "units": 1, "error_rows": 1}}
    commit_rows(table, "classification", [*cats, broken], "n0", "2026-05-01")
    commit_rows(table, "classification", [broken], "n1", "2026-05-02", details=retry)
    assert drift(trend(str(table)), MonitorSpec()) == []
    new_cat = classified("/p/new.jpg", ("cat", 0.9))
    commit_rows(table, "classification", [broken, new_cat], "n2", "2026-05-03", details=retry)
    rise = {d.figure: d for d in drift(trend(str(table)), MonitorSpec())}["error_rate_rise"]
    assert (rise.value, rise.compared) == (-0.25, ("n0",))  # 0 of 1 against 1 of 4 (n1: none)
    commit_rows(table, "classification", [*cats, broken], "n3", "2026-05-04")
    rise = {d.figure: d for d in drift(trend(str(table)), MonitorSpec())}["error_rate_rise"]
    assert (rise.value, rise.compared) == (0.05, ("n0", "n2"))  # 1 of 4 against 1 of 5
    rates = series(trend(str(table)))["error rate"]  # the trend shows both rates
    assert rates["all"] == [0.25, 1.0, 0.5, 0.25]
    assert rates["new inputs"] == [0.25, None, 0.0, 0.25]
    shares = series(trend(str(table)))["label share"]["cat"]  # n1 labelled nothing: no share
    assert shares == [1.0, None, 1.0, 1.0]
    for night in range(5, 9):  # four nights of the retry alone: none is a baseline
        commit_rows(
            table, "classification", [broken], f"n{night}", f"2026-05-0{night}", details=retry
        )
    bad = [failed(f"/p/bad{i}.jpg", "CorruptImage", "bad") for i in range(2)]
    commit_rows(table, "classification", [*bad, new_cat], "n9", "2026-05-09")
    rise = {d.figure: d for d in drift(trend(str(table)), MonitorSpec())}["error_rate_rise"]
    assert rise.compared == ("n0", "n2", "n3") and rise.crossed  # they filled the window once
    assert rise.value == round(2 / 3 - 2 / 9, 4)


def test_the_error_rate_is_of_the_tiles_sent_to_the_model(tmp_path) -> None:
    """A scene's tiles with no data (`skipped` rows) are neither errors nor answers: drift's
    and the trend's error rates are of the tiles the model was sent. Counted in, two nights
    over sea (30 empty tiles each) read as 1 error in 40, and a night over land with the same
    1 error in 10 as a rise of 7.5 points, over the 5-point threshold."""
    from committed_rows import failed

    table = tmp_path / "table"

    def scene(night: int, empty: int) -> list[dict[str, Any]]:
        uri = f"/s/{night}.tif"
        tiles = [classified(uri, ("field", 0.9)) for _ in range(9)]
        tiles += [failed(uri, "RasterError", "bad block")]
        tiles += [{"source_uri": uri, "status": "skipped"} for _ in range(empty)]
        return [tile | {"tile_x": 32 * x, "tile_y": 0} for x, tile in enumerate(tiles)]

    for night, empty in enumerate((30, 30, 0)):
        commit_rows(
            table,
            "classification",
            scene(night, empty),
            f"n{night}",
            f"2026-06-0{night + 1}",
            tiles=True,
        )
    points = trend(str(table))
    assert [(p.units, p.sent_units, p.error_rate) for p in points] == [
        (40, 10, 0.1),
        (40, 10, 0.1),
        (10, 10, 0.1),
    ]
    assert series(points)["error rate"]["RasterError"] == [0.1, 0.1, 0.1]
    rise = {d.figure: d for d in drift(points, MonitorSpec())}["error_rate_rise"]
    assert (rise.value, rise.compared, rise.crossed) == (0.0, ("n0", "n1"), False)
    recorded = committed_run(str(table), "n0")
    assert recorded is not None and recorded["skipped"] == 30
    # an incremental night: n0's scene retried (clean now, its 30 empty tiles again) and a new
    # scene; the new units are the new scene's 10 (the retried empty tiles once, not twice)
    retried = {"sources": 1, "units": 40, "error_rows": 0, "skipped": 30}
    again = [
        row | {"status": "ok", "error_type": None} if row.get("error_type") else row
        for row in scene(0, 30)
    ]
    rows = again + [row | {"source_uri": "/s/new.tif"} for row in scene(3, 30)]
    commit_rows(
        table, "classification", rows, "n3", "2026-06-04", tiles=True, details={"retried": retried}
    )
    night = trend(str(table))[-1]
    assert (night.units, night.sent_units, night.new_units, night.new_errors) == (80, 20, 10, 1)
    assert new_units_of(committed_run(str(table), "n3")) == 10


def test_a_run_that_processed_nothing_has_no_drift_and_is_no_baseline(tmp_path, capsys) -> None:
    """A quiet incremental night commits no units: no figures (every share at the floor made
    PSIs of 8 and 9, and `report --check` exit 6 each quiet night), and the night after it is
    compared with the runs that processed units. A run of error rows only has no PSI."""
    from committed_rows import failed

    table = tmp_path / "table"
    cats = [classified(f"/nonexistent/{i}.jpg", ("cat", 0.9)) for i in range(ENOUGH)]
    commit_rows(table, "classification", cats, "n0", "2026-05-01")
    commit_rows(table, "classification", [], "n1", "2026-05-02")
    assert drift(trend(str(table)), MonitorSpec()) == []
    assert main(["report", str(table), "--check"]) == EXIT_OK
    assert "drift: no figures (the run processed no new input" in capsys.readouterr().out
    commit_rows(table, "classification", cats, "n2", "2026-05-03")
    found = drift(trend(str(table)), MonitorSpec(runs=1))
    assert [(d.figure, d.value, d.compared) for d in found] == [
        ("label_psi", 0.0, ("n0",)), ("score_psi", 0.0, ("n0",)), ("error_rate_rise", 0.0, ("n0",))
    ]  # fmt: skip
    commit_rows(
        table,
        "classification",
        [failed(f"/nonexistent/x{i}.jpg", "CorruptImage", "bad") for i in range(2)],
        "n3",
        "2026-05-04",
    )
    [rise] = drift(trend(str(table)), MonitorSpec())
    assert (rise.figure, rise.value, rise.compared) == ("error_rate_rise", 1.0, ("n0", "n2"))


def test_a_date_run_again_under_another_default_run_id_is_said_to_be_beside_the_first(
    tmp_path, caplog
) -> None:
    """The default run id holds the spec's digest: a date run again with a changed spec adds a
    run beside the first, and the run warns so; not of the same id (a rerun that replaces), of
    an id a user chose, or of another task's run in the table."""
    import datetime as dt
    import logging

    from vision_ops.config import parse_spec
    from vision_ops.pipeline.run import warn_of_runs_beside

    table = tmp_path / "table"
    cat = [classified("/x/a.jpg", ("cat", 0.9))]
    boxes = [{"source_uri": "/x/a.jpg", "num_detections": 0, "detections": []}]
    for run_id, task, rows in (
        ("2026-05-01-aaaaaaaa", "classification", cat),
        ("2026-05-01-bbbbbbbb", "detection", boxes),
        ("fix-1", "classification", cat),
        ("2026-05-02-cccccccc", "classification", cat),
    ):
        commit_rows(table, task, rows, run_id, run_id[:10] if run_id[0] == "2" else "2026-05-01")
    raw = {"input": {"uris": ["/x"]}, "model": {"architecture": "resnet18"}}
    spec = parse_spec(raw | {"output": {"uri": str(table)}})
    with caplog.at_level(logging.WARNING, logger="vision_ops.pipeline.run"):
        warn_of_runs_beside(spec, "2026-05-01-dddddddd", dt.date(2026, 5, 1))
        warn_of_runs_beside(spec, "2026-05-01-aaaaaaaa", dt.date(2026, 5, 1))  # itself
    assert [r.getMessage() for r in caplog.records] == [
        "run 2026-05-01-dddddddd: 2026-05-01 already holds committed run(s) 2026-05-01-aaaaaaaa "
        "of another spec (the default run id holds the spec's digest): this run is added beside "
        "them, not in their place; --run-id with the id of the run to replace replaces it instead"
    ]


def full_night(night: int) -> list[dict[str, Any]]:
    """A scene's 26 tiles: 14 forest, 8 water, 4 field, scored 0.55 to 0.95."""
    labels = ["forest"] * 14 + ["water"] * 8 + ["field"] * 4
    return [
        classified(f"/scenes/{night}/t{i}.tif", (label, 0.55 + 0.4 * i / 25))
        for i, label in enumerate(labels)
    ]


CHANGED = [classified(f"/scenes/0/t{i}.tif", ("field", 0.6)) for i in (22, 23)]  # 2 tiles
TOO_FEW = f"not compared, too few units (2 < {ENOUGH}) to compare distributions"


def two_full_nights(tmp_path: Path) -> Path:
    table = tmp_path / "table"
    for night in (0, 1):
        commit_rows(
            table, "classification", full_night(night), f"n{night}", f"2026-05-0{night + 1}"
        )
    return table


def test_a_night_of_too_few_units_is_not_compared_but_its_error_rate_is(tmp_path, capsys) -> None:
    """An --incremental night that re-processed 2 changed tiles, against two 26-tile nights:
    its label and score distributions are not compared, and the check says so (a PSI over 2
    units is noise: here label_psi 8.6795, an alert, exit 6, on a quiet night); its error rate
    is compared: the next 2-unit night, one of them an error row, alerts on it. `min_units` 2
    compares them."""
    from committed_rows import failed

    table = two_full_nights(tmp_path)
    commit_rows(table, "classification", CHANGED, "n2", "2026-05-03")
    assert main(["report", str(table), "--check"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"drift: label_psi {TOO_FEW}: run n2 against n0, n1\n" in out
    assert f"drift: score_psi {TOO_FEW}: run n2 against n0, n1\n" in out
    assert "drift: error_rate_rise 0.0000 within the threshold 0.05: run n2 against n0, n1\n" in out
    found = drift(trend(str(table)), MonitorSpec())
    assert [(d.figure, d.value, d.crossed) for d in found] == [
        ("label_psi", None, False), ("score_psi", None, False), ("error_rate_rise", 0.0, False)
    ]  # fmt: skip
    pooled = {"forest": 28, "water": 16, "field": 8}
    [label_psi, *_] = drift(trend(str(table)), MonitorSpec(min_units=2))
    assert label_psi.value == round(psi({"field": 2}, pooled), 4) and label_psi.crossed

    broken = failed("/scenes/0/t24.tif", "CorruptImage", "bad")
    commit_rows(table, "classification", [CHANGED[0], broken], "n3", "2026-05-04")
    assert main(["report", str(table), "--check"]) == EXIT_DRIFT
    captured = capsys.readouterr()
    assert f"drift: label_psi not compared, too few units (1 < {ENOUGH})" in captured.out
    assert captured.err == (
        "alert: error_rate_rise 0.5000 over the threshold 0.05: run n3 against n0, n1, n2\n"
    )  # 1 of 2 against 0 of 54


def test_a_night_of_too_few_units_is_recorded_so_and_an_earlier_record_held_to_it(
    tmp_path, capsys
) -> None:
    """At the commit the 2-tile night's PSIs are recorded as not compared (value null, and
    why), and `report --check` takes that record; a record made before `min_units` existed
    (label_psi 9.4099, crossed) is held to it: not compared, no alert."""
    from vision_ops.drift import drift_at_commit, manifest_entry

    table = two_full_nights(tmp_path)
    staged = pa.Table.from_pylist(CHANGED)
    staged = staged.append_column("status", pa.array(["ok"] * 2))
    staged = staged.append_column("error_type", pa.nulls(2, pa.string()))
    night = {"run_id": "n2", "run_date": "2026-05-03", "task": "classification"}
    entry = manifest_entry(drift_at_commit(str(table), MonitorSpec(), {}, night, staged.select))
    why = f"too few units (2 < {ENOUGH}) to compare distributions"
    assert entry["label_psi"] == {
        "value": None, "threshold": 0.25, "crossed": False, "not_compared": why
    }  # fmt: skip
    assert entry["error_rate_rise"] == {"value": 0.0, "threshold": 0.05, "crossed": False}
    commit_rows(table, "classification", CHANGED, "n2", "2026-05-03", details={"drift": entry})
    assert committed_run(str(table), "n2")["drift"] == entry  # through the manifest's JSON
    page = tmp_path / "report.html"
    assert main(["report", str(table), "--check", "--html", str(page)]) == EXIT_OK
    recorded_line = f"drift: label_psi {TOO_FEW}: run n2 against n0, n1 (recorded in its manifest"
    assert recorded_line in capsys.readouterr().out
    assert f"<td>-</td><td>0.25</td><td>not compared: too few units (2 &lt; {ENOUGH})" in (
        page.read_text()
    )

    alerted = {"value": 9.4099, "threshold": 0.25, "crossed": True}
    earlier = entry | {"label_psi": alerted, "score_psi": alerted}
    commit_rows(table, "classification", CHANGED, "n2", "2026-05-03", details={"drift": earlier})
    assert main(["report", str(table), "--check"]) == EXIT_OK
    assert recorded_line in capsys.readouterr().out
