"""The SQL `vision_ops.query` builds over a table's files."""

from __future__ import annotations

import pytest
from committed_rows import classified, commit_rows

from vision_ops.query import connect, read_sql


def test_a_plain_glob_of_a_table_in_a_folder_with_an_apostrophe_reads(tmp_path) -> None:
    """`read_sql` (the demo's and the README's plain glob) quotes the path as SQL: a folder
    named o'brien broke the statement, and a crafted name could have added to it."""
    table = tmp_path / "o'brien" / "table"
    commit_rows(table, "classification", [classified("/nonexistent/a.jpg", ("cat", 0.9))], "r1")
    assert connect({}).sql(f"SELECT count(*) FROM {read_sql(str(table))}").fetchone() == (1,)


def test_the_summary_of_a_table_that_held_another_task_counts_its_own_task_only(
    tmp_path, capsys
) -> None:
    """Detection runs, then a classification run into the same Parquet table: `query` without
    SQL summarises the latest run's task over its rows alone (the detection images were
    counted as classified images of label NULL); SQL still sees every committed row."""
    from vision_ops.cli import EXIT_OK, main

    table = tmp_path / "table"
    boxes = {"num_detections": 0, "detections": []}
    images = [{"source_uri": f"/nonexistent/d{i}.jpg"} | boxes for i in range(4)]
    commit_rows(table, "detection", images, "d1", "2026-05-01")
    cats = [classified(f"/nonexistent/c{i}.jpg", ("cat", 0.9)) for i in range(2)]
    commit_rows(table, "classification", cats, "c1", "2026-05-02")
    assert main(["query", str(table), "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["label,images,mean_score", "cat,2,0.9"]
    sql = "SELECT task, count(*) AS n FROM predictions GROUP BY task ORDER BY task"
    assert main(["query", str(table), sql, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["task,n", "classification,2", "detection,4"]


def test_the_sql_may_follow_the_options(tmp_path, capsys) -> None:
    """`query TARGET --run-id R --format csv "SQL"` as README's synopsis allows: argparse left
    the SQL after an option unrecognized (exit 2). Two words after the options still are."""
    from vision_ops.cli import EXIT_OK, main

    table = str(tmp_path / "table")
    commit_rows(tmp_path / "table", "classification", [classified("/x/a.jpg", ("cat", 0.9))], "r1")
    sql = "SELECT run_id, label FROM predictions"
    assert main(["query", table, "--run-id", "r1", "--format", "csv", sql]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["run_id,label", "r1,cat"]
    with pytest.raises(SystemExit) as refused:
        main(["query", table, "--format", "csv", sql, "SELECT 2"])
    assert refused.value.code == 2
    assert f"unrecognized arguments: {sql} SELECT 2" in capsys.readouterr().err
