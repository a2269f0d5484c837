"""The SQL `vision_ops.query` builds over a table's files."""

from __future__ import annotations

from committed_rows import classified, commit_rows

from vision_ops.query import connect, read_sql


def test_a_plain_glob_of_a_table_in_a_folder_with_an_apostrophe_reads(tmp_path) -> None:
    """`read_sql` (the demo's and the README's plain glob) quotes the path as SQL: a folder
    named o'brien broke the statement, and a crafted name could have added to it."""
    table = tmp_path / "o'brien" / "table"
    commit_rows(table, "classification", [classified("/nonexistent/a.jpg", ("cat", 0.9))], "r1")
    assert connect({}).sql(f"SELECT count(*) FROM {read_sql(str(table))}").fetchone() == (1,)
