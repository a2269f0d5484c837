"""The task registry: every registered task is whole (its spec in config's union, its predictor,
scorer and report panels found, its default query and views valid SQL over its own schema),
every reader takes a committed run of it through the CLI (query, report --html, verify,
evaluate) by its manifest's task, failing with a message and an exit code, never a traceback,
a job of its record's example model runs through the pipeline and every reader (a task added
by registering a record is tested with no new test code), and the toy jobs
(tests/toy_models.py) give the values known in advance."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from committed_rows import commit_rows
from pydantic import TypeAdapter
from toy_models import TOY_JOBS, TRUTHS, ToyJob, toy_images

from vision_ops.cli import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK, NO_ROWS, main
from vision_ops.config import ModelSpec, SpecError, parse_spec
from vision_ops.errors import UnknownTask
from vision_ops.models import torchvision_architectures
from vision_ops.predictors import Predictor
from vision_ops.report import PANELS
from vision_ops.schema import PARTITION_COLUMN, STATUS_ERROR, item_id, output_schema
from vision_ops.sink import ParquetSink
from vision_ops.tasks import TASKS, Task, boxes_view, get_task, task_of_run
from vision_ops.trend import figure_columns, table_figures

DATE = dt.date(2026, 11, 24)
NAMES = TASKS.names()
# The smallest `model:` section of each model kind (nothing is loaded: the spec is only parsed).
MODEL_OF_KIND = {
    "torchvision": {"kind": "torchvision", "architecture": "resnet18"},
    "torchscript": {"kind": "torchscript", "uri": "model.pt"},
    "entrypoint": {"kind": "entrypoint", "entrypoint": "package.module:build"},
    "onnx": {"kind": "onnx", "uri": "model.onnx"},
    "ppocr": {"kind": "ppocr"},
}


def minimal_spec(task: dict[str, Any], model: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job spec of `task`, with `model` (default: the task's default or example model)."""
    record = get_task(str(task["kind"]))
    chosen = model or dict(record.default_model or record.example_model)
    return {
        "input": {"uris": ["photos/"]},
        "output": {"uri": "out/"},
        "task": task,
        "model": chosen,
    }


@pytest.mark.parametrize("name", NAMES)
def test_a_scored_tasks_counted_metrics_are_among_its_metrics(name: str) -> None:
    record = get_task(name)
    if record.scorer is not None:
        assert set(record.counted_metrics) <= set(record.metrics), name


@pytest.mark.parametrize("name", NAMES)
def test_a_task_section_is_validated_by_its_record(name: str) -> None:
    record = get_task(name)
    spec = parse_spec(minimal_spec({"kind": name}))
    section = spec.task
    assert type(section) is record.spec and section.kind == name
    # dumped whole (submission copies and fingerprints hold every setting) and read back alike
    assert set(spec.model_dump(mode="json")["task"]) == set(record.spec.model_fields)
    assert parse_spec(spec.model_dump(mode="json")) == spec
    assert record.spec.model_fields["kind"].default == name
    # a setting of another task is refused, named with the section's path
    stray = "top_k" if name != "classification" else "score_threshold"
    with pytest.raises(SpecError, match=rf"task\.{stray}: Extra inputs are not permitted"):
        parse_spec(minimal_spec({"kind": name, stray: 1}))


@pytest.mark.parametrize("name", NAMES)
def test_a_task_refuses_a_model_kind_it_does_not_run(name: str) -> None:
    record = get_task(name)
    assert set(record.model_kinds) <= set(MODEL_OF_KIND)
    for other in sorted(set(MODEL_OF_KIND) - set(record.model_kinds)):
        # the message's own line, named by its field (no location prefix)
        expected = rf"\n  model\.kind: task {name} runs model\.kind .*; found {other}"
        with pytest.raises(SpecError, match=expected):
            parse_spec(minimal_spec({"kind": name}, model=MODEL_OF_KIND[other]))


@pytest.mark.parametrize("name", NAMES)
def test_a_record_names_code_that_exists(name: str) -> None:
    task = get_task(name)
    assert issubclass(task.predictor_class(), Predictor)
    assert task.schema.names[-len(task.fields) :] == [f.name for f in task.fields]
    assert all(panel in PANELS for panel in task.panels)
    assert (task.scorer is None) == (not task.truth_formats)
    if task.scorer is not None:
        assert callable(task.scorer_function())
    if task.architectures is not None:
        known = torchvision_architectures(name)
        assert known and all(a.strip() in known for a in task.architecture_examples.split(","))
    assert task.batch_sizes.cpu > 0 and task.batch_sizes.gpu > 0
    example = TypeAdapter(ModelSpec).validate_python(dict(task.example_model))
    assert getattr(example, "weights", None) is None  # nothing to download


def test_an_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(UnknownTask, match="unknown task 'nope'; expected one of: classification"):
        get_task("nope")
    with pytest.raises(UnknownTask, match="expected its manifest to name its task"):
        task_of_run({"run_id": "r1"})


def _empty(task: Task) -> pa.Table:
    schema = task.schema.insert(0, pa.field(PARTITION_COLUMN, pa.string()))
    return schema.empty_table()


@pytest.mark.parametrize("name", NAMES)
def test_default_query_and_views_are_valid_sql_over_the_task_schema(name: str) -> None:
    """The issue's failure (a default query naming another task's columns) for any task."""
    task = get_task(name)
    connection = duckdb.connect()
    connection.register("rows", _empty(task))
    connection.execute("CREATE VIEW predictions AS SELECT * FROM rows")
    for view, select in task.views.items():
        sql = select if isinstance(select, str) else select(task.schema.names)
        connection.execute(f"CREATE VIEW {view} AS {sql}")
    assert connection.sql(task.default_query).fetchall() == []
    if name == "detection":  # and a tiled table's boxes: its scene columns and CRS boxes
        tiled = output_schema(name, tiles=True)
        connection.register(
            "tiled", tiled.insert(0, pa.field(PARTITION_COLUMN, pa.string())).empty_table()
        )
        connection.execute("CREATE OR REPLACE VIEW predictions AS SELECT * FROM tiled")
        connection.execute(f"CREATE OR REPLACE VIEW boxes AS {boxes_view(tiled.names)}")
        assert "crs_x_min" in connection.sql("SELECT * FROM boxes").columns


# --- a committed run of every task, through the CLI -------------------------------------------


def _error_rows(task: Task, count: int = 2) -> pa.Table:
    """Rows every task has: error rows (its own columns null), as a run of unreadable files."""
    uris = [f"file:///data/bad{i}.png" for i in range(count)]
    base = {"run_id": "r1", "model_name": "m", "model_weights_sha256": "h", "task": task.name}
    rows = [
        base
        | {"source_uri": uri, "item_id": item_id(uri), "status": STATUS_ERROR}
        | {"error_type": "CorruptImage", "error_message": "cannot decode"}
        for uri in uris
    ]
    return pa.Table.from_pylist(rows, schema=task.schema)


@pytest.mark.parametrize("name", NAMES)
def test_a_run_s_figures_need_only_its_summary_columns(name: str) -> None:
    """The trend and the drift read only `figure_columns` of a run's rows: enough for its
    summary (a column it reads and the record does not name fails here)."""
    task = get_task(name)
    rows = _error_rows(task).select(figure_columns(task))
    run = {"run_id": "r1", "run_date": DATE.isoformat(), "task": name}
    figures = table_figures(rows, run)
    assert figures.units == 2 and figures.error_types == {"CorruptImage": 2.0}
    assert figures.labels == {} and figures.mean_score is None


def _commit(root: Path, task: Task) -> Path:
    table = _error_rows(task)
    sink = ParquetSink(str(root), "r1", DATE, task.schema)
    sink.write(table)
    sink.commit(table["source_uri"].to_pylist())
    return root


@pytest.mark.parametrize("name", NAMES)
def test_every_reader_takes_a_run_of_the_task(name: str, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    table = str(_commit(tmp_path / "table", get_task(name)))
    assert main(["query", table, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.strip() != ""  # the summary's header, no rows
    sql = "SELECT task, count(*) AS n FROM predictions GROUP BY task"
    assert main(["query", table, sql, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.split() == ["task,n", f"{name},2"]
    page = tmp_path / "report.html"
    assert main(["report", table, "--html", str(page)]) == EXIT_OK
    text = capsys.readouterr().out
    assert f"run r1 ({DATE}, {name})" in text and "items: 2  ok: 0  errors: 2" in text
    assert "2  CorruptImage" in text and page.read_text().startswith("<!doctype html>")
    assert main(["verify", table]) == EXIT_OK
    assert "2 units, each once" in capsys.readouterr().out
    task = get_task(name)
    if task.scorer is None:
        return
    missing = str(tmp_path / "no-truth")
    code = main(["evaluate", table, "--truth", missing, "--truth-format", task.truth_formats[0]])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED and err.startswith("error: ") and "Traceback" not in err


def _manifest_task(root: Path, task: str) -> None:
    path = root / "_manifests" / "r1.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"task": task}))


@pytest.mark.parametrize("command", ["query", "report"])
def test_a_run_of_an_unknown_task_exits_2_with_a_message(command: str, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    root = _commit(tmp_path / "table", get_task(NAMES[0]))
    _manifest_task(root, "hologram")
    assert main([command, str(root)]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert (
        err.startswith("error: unknown task 'hologram'; expected one of: ")
        and "Traceback" not in err
    )


def test_a_report_that_breaks_exits_1_with_a_message(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    root = _commit(tmp_path / "table", get_task(NAMES[0]))
    for part in root.glob("run_date=*/*.parquet"):
        part.unlink()  # committed, then lost: reading the run fails
    assert main(["report", str(root)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_the_console_script_exits_non_zero_with_a_message(tmp_path: Path) -> None:
    """Through the installed entry point: a failure is a message and an exit status."""
    script = Path(sys.executable).with_name("vision-ops")
    for command in (["report", str(tmp_path)], ["query", str(tmp_path)]):
        done = subprocess.run([str(script), *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == EXIT_FAILED, done.stderr
        assert "no committed run" in done.stderr and "Traceback" not in done.stderr


# --- a job of every task, through the pipeline and back ----------------------------------------


def _run_job(name: str, toy: ToyJob, folder: Path) -> str:
    """Run a job of task `name` over the toy images (model: the toy's, else the record's
    example); the table's URI."""
    spec = {
        "input": {"uris": [str(toy_images(folder))]},
        "task": {"kind": name, **toy.task},
        "model": dict(get_task(name).example_model) if toy.model is None else toy.model(folder),
        "runtime": {"batch_size": 4, "max_actors": 1, "intra_op_threads": 1},
        "output": {"uri": str(folder / "table")},
        "run": {"id": "toy", "date": DATE.isoformat()},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(folder / "job.yaml")]) == EXIT_OK
    return str(folder / "table")


def _read_back(table: str, folder: Path, capsys) -> list[str]:  # type: ignore[no-untyped-def]
    """The run's units through query, report and verify: two photos and a broken file. The
    lines of its default query's CSV."""
    assert "3 items, 2 ok, 1 errors" in capsys.readouterr().out
    assert main(["query", table, "--format", "csv"]) == EXIT_OK
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary  # its header at least: an untrained detector may find no box
    assert main(["report", table, "--html", str(folder / "report.html")]) == EXIT_OK
    assert "items: 3  ok: 2  errors: 1" in capsys.readouterr().out
    assert main(["verify", table]) == EXIT_OK
    assert "3 units, each once" in capsys.readouterr().out
    return summary


def _truth_format(task: Task) -> str:
    """The first of the task's truth formats the toy images have ground truth in."""
    known = [fmt for fmt in task.truth_formats if fmt in TRUTHS]
    if not known:
        pytest.fail(f"task {task.name!r} reads {task.truth_formats}: add one to TRUTHS")
    return known[0]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", NAMES)
def test_a_job_of_every_task_with_its_example_model_runs_and_reads_back(  # type: ignore[no-untyped-def]
    name: str, ray_local, tmp_path, capsys
) -> None:
    """A registered task, with no test code of its own: its record's untrained example model
    runs; query, report and verify read the run; evaluate scores it (figures unchecked: the
    weights are random)."""
    task = get_task(name)
    table = _run_job(name, ToyJob(), tmp_path)
    _read_back(table, tmp_path, capsys)
    if task.scorer is None:
        return
    truth, truth_format = TRUTHS[_truth_format(task)](tmp_path)
    args = ["--truth", truth] if truth else []
    assert main(["evaluate", table, *args, "--truth-format", truth_format]) == EXIT_OK
    lines = capsys.readouterr().out.strip().splitlines()
    figures = [line.partition(": ") for line in lines[:-1]]
    assert figures and all(math.isfinite(float(value)) for _, _, value in figures)
    assert re.fullmatch(r"metrics: \d+ rows for run toy", lines[-1])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(TOY_JOBS))
def test_a_toy_job_gives_the_values_known_in_advance(  # type: ignore[no-untyped-def]
    name: str, ray_local, tmp_path, capsys
) -> None:
    """A toy job (tests/toy_models.py): run, queried, reported, verified and scored against the
    toy's truth, with the metric its predictions give."""
    toy = TOY_JOBS[name]
    table = _run_job(name, toy, tmp_path)
    assert len(_read_back(table, tmp_path, capsys)) >= 2  # a header and a row
    if toy.truth is None:
        assert get_task(name).scorer is None, f"task {name!r} has a scorer: give its toy a truth"
        return
    truth, truth_format = toy.truth(tmp_path)
    args = ["--truth", truth] if truth else []
    assert main(["evaluate", table, *args, "--truth-format", truth_format]) == EXIT_OK
    assert toy.metric is not None
    metric, value = toy.metric
    assert f"{metric}: {value:.4f}" in capsys.readouterr().out


def test_sql_that_returns_no_rows_is_named_not_printed(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    table = str(_commit(tmp_path / "table", get_task("classification")))
    for fmt in ("table", "csv"):
        assert main(["query", table, "DROP VIEW predictions", "--format", fmt]) == EXIT_BAD_SPEC
        shown = capsys.readouterr()
        assert shown.err == f"error: {NO_ROWS}\n" and shown.out == ""
    assert main(["query", table, "SELECT count(*) AS n FROM predictions", "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "2"]  # the table is not changed


def test_runs_are_read_by_column_name_from_a_path_with_an_apostrophe(
    tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    """The manifests' file paths are SQL string literals (quoted, whatever they hold), and runs
    of one table that differ in columns are read by name (the newer's columns kept)."""
    task = get_task("classification")
    root = tmp_path / "o'neil" / "table"
    _commit(root, task)  # r1, without the column r2 adds
    wider = task.schema.append(pa.field("site", pa.string()))
    rows = _error_rows(task).set_column(0, "run_id", pa.array(["r2", "r2"]))
    rows = rows.append_column("site", pa.array(["north", "south"]))
    later = ParquetSink(str(root), "r2", DATE + dt.timedelta(days=1), wider)
    later.write(rows)
    later.commit(rows["source_uri"].to_pylist())
    sql = (
        "SELECT run_id, count(*) AS n, count(site) AS sited FROM predictions GROUP BY 1 ORDER BY 1"
    )
    assert main(["query", str(root), sql, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.split() == ["run_id,n,sited", "r1,2,0", "r2,2,2"]
    assert main(["report", str(root)]) == EXIT_OK and "run r2" in capsys.readouterr().out


def test_query_writes_the_format_its_out_file_names(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    table = str(_commit(tmp_path / "table", get_task("classification")))
    sql = "SELECT item_id FROM predictions ORDER BY 1"
    out = tmp_path / "items.csv"
    assert main(["query", table, sql, "--out", str(out)]) == EXIT_OK  # csv, from the name
    assert capsys.readouterr().out == "" and out.read_text().split()[0] == "item_id"
    assert len(out.read_text().split()) == 3
    parquet = tmp_path / "items.parquet"
    assert main(["query", table, sql, "--out", str(parquet)]) == EXIT_OK
    assert pq.read_table(parquet).num_rows == 2
    for wrong, message in [
        (["--out", str(tmp_path / "items.txt")], "expected --format csv, json or parquet"),
        (["--out", str(out), "--format", "table"], "expected --format csv, json or parquet"),
        (["--format", "xml"], "--format: expected table, csv, json or parquet, found 'xml'"),
        (["--format", "parquet"], "--format parquet needs --out FILE"),  # (exited 1)
    ]:
        assert main(["query", table, sql, *wrong]) == EXIT_BAD_SPEC
        assert message in capsys.readouterr().err


def test_a_run_that_wrote_nothing_is_reported(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    task = get_task("classification")
    empty = ParquetSink(str(tmp_path / "table"), "r0", DATE, task.schema)
    empty.commit([])
    assert main(["report", str(tmp_path / "table")]) == EXIT_OK
    shown = capsys.readouterr().out
    assert f"run r0 ({DATE}, classification)" in shown and "items: 0  ok: 0  errors: 0" in shown


@pytest.mark.parametrize("command", ["report", "verify", "evaluate", "query"])
def test_a_run_id_that_is_not_one_is_refused_before_any_read(
    tmp_path: Path, command, capsys
) -> None:  # type: ignore[no-untyped-def]
    table = str(_commit(tmp_path / "table", get_task("classification")))
    with pytest.raises(SystemExit) as exited:
        main([command, table, "--run-id", "../../elsewhere/_manifests/x"])
    assert exited.value.code == 2
    assert "--run-id: expected letters, digits and . _ -" in capsys.readouterr().err


def test_a_committed_run_of_no_rows_is_queried_as_none(tmp_path, capsys) -> None:
    """`query` agrees with `report` and `verify`: the run is committed, with no rows (it said
    "no committed run"), and the task's views read it too."""
    table = tmp_path / "table"
    commit_rows(table, "detection", [], "n0", "2026-05-01")
    sql = "SELECT count(*) AS n FROM predictions"
    assert main(["query", str(table), sql, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.split() == ["n", "0"]
    boxes = "SELECT count(*) AS n FROM boxes"
    assert main(["query", str(table), boxes, "--run-id", "n0", "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.split() == ["n", "0"]
    assert main(["query", str(table), "--run-id", "n9"]) == EXIT_FAILED
    assert "no committed run n9" in capsys.readouterr().err
