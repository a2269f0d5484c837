"""The SQL `vision_ops.query` builds over a table's files."""

from __future__ import annotations

import time

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
    assert main(["query", table, "--format", "csv", "--", sql]) == EXIT_OK  # past a `--`
    assert capsys.readouterr().out.splitlines() == ["run_id,label", "r1,cat"]
    with pytest.raises(SystemExit) as refused:
        main(["query", table, "--format", "csv", sql, "SELECT 2"])
    assert refused.value.code == 2
    assert f"unrecognized arguments: {sql} SELECT 2" in capsys.readouterr().err


def test_the_boxes_of_a_tiled_detection_table_keep_their_tile_scene_and_crs(
    tmp_path, capsys
) -> None:
    """A tiled table's `boxes` view gives each box's tile, its scene's size and CRS (boxes are
    in scene pixels: the tile's image size beside them misled), the box in the CRS and its
    centre in WGS84, which the `detections` struct holds (the view dropped them)."""
    from vision_ops.cli import EXIT_OK, main

    box = {"label_id": 3, "label": "car", "score": 0.9, "x_min": 300.0, "y_min": 10.0}
    box |= {"x_max": 320.0, "y_max": 30.0, "crs_x_min": 600_300.0, "crs_y_min": 5_199_400.0}
    box |= {"crs_x_max": 600_320.0, "crs_y_max": 5_199_420.0, "lon": 10.31, "lat": 46.94}
    row = {
        "source_uri": "/x/scene.tif", "tile_x": 256, "tile_y": 0, "tile_size": 256,
        "image_width": 256, "image_height": 256, "scene_width": 1000, "scene_height": 800,
        "crs": "EPSG:32632", "detections": [box], "num_detections": 1,
    }  # fmt: skip
    commit_rows(tmp_path / "table", "detection", [row], "r1", tiles=True)
    sql = (
        "SELECT tile_x, tile_y, scene_width, crs, label, x_min, crs_x_min, crs_y_max, lon, lat "
        "FROM boxes"
    )
    assert main(["query", str(tmp_path / "table"), sql, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[1:] == [
        "256,0,1000,EPSG:32632,car,300.0,600300.0,5199420.0,10.31,46.94"
    ]


def test_a_query_made_while_a_rerun_replaces_the_run_reads_the_rerun(
    tmp_path, capsys, monkeypatch
) -> None:
    """A rerun of the run a query reads commits between the query's reading of the manifests
    and of the files, and removes the files it replaced: the query reads the manifests again
    and answers with the rerun's rows (it failed, DuckDB's "No files found")."""
    from vision_ops import query
    from vision_ops.cli import EXIT_OK, main

    table = tmp_path / "table"
    first = [classified(f"/x/{name}.jpg", ("cat", 0.9)) for name in "ab"]
    commit_rows(table, "classification", first, "r1")
    real = query.register_views
    views: list[str] = []

    def a_rerun_commits_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        task = real(*args, **kwargs)
        views.append("registered")
        if len(views) == 1:
            rerun = [classified(f"/x/{name}.jpg", ("dog", 0.8)) for name in "abc"]
            commit_rows(table, "classification", rerun, "r1")
        return task

    monkeypatch.setattr(query, "register_views", a_rerun_commits_meanwhile)
    sql = "SELECT label, count(*) AS n FROM predictions GROUP BY label"
    assert main(["query", str(table), "--format", "csv", sql]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["label,n", "dog,3"]
    assert views == ["registered", "registered"]


def test_a_folder_with_no_committed_run_is_said_so_with_what_a_table_holds(
    tmp_path, capsys
) -> None:
    """A folder that holds no committed run (an Iceberg table's folder beside it, with its
    `_index/` and `_metrics/`): query, report and evaluate say what a table's folder holds and
    how an Iceberg table is read (it was "no committed run" alone)."""
    from vision_ops.cli import main

    beside = tmp_path / "vision.nightly"
    (beside / "_index").mkdir(parents=True)
    hint = "(a table's folder holds _manifests/; an Iceberg table is read through its spec)"
    for command in (["query"], ["report"], ["evaluate", "--truth", str(tmp_path)]):
        assert main([command[0], str(beside), *command[1:]]) != 0
        assert capsys.readouterr().err == f"error: {beside}: no committed run {hint}\n"


def test_a_query_reads_each_manifest_of_the_table_once(tmp_path, capsys, monkeypatch) -> None:
    """A query reads the table's manifests once: it read each three times (for the version of
    the table's commits a read is made again on, for its relation, and for the task of the
    latest run), and a year of nightly runs on S3 is a year of requests each time."""
    from vision_ops import sink
    from vision_ops.cli import EXIT_OK, main

    table = tmp_path / "table"
    for night in (1, 2, 3):
        row = classified(f"/x/{night}.jpg", ("cat", 0.9))
        commit_rows(table, "classification", [row], f"n{night}", f"2026-12-0{night}")
    read: list[str] = []
    real = sink.manifest_of

    def counted(text, path):  # type: ignore[no-untyped-def]
        read.append(path.rsplit("/", 1)[-1])
        return real(text, path)

    monkeypatch.setattr(sink, "manifest_of", counted)
    sql = "SELECT count(*) AS n FROM predictions"
    assert main(["query", str(table), "--format", "csv", sql]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["n", "3"]
    assert sorted(read) == ["n1.json", "n2.json", "n3.json"]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_the_version_of_a_tables_commits_changes_with_each_commit_alone(
    store, tmp_path, request
) -> None:
    """The version a query is read again on (`sink.commits_version`, one listing of the
    manifests) changes when a run commits and when it is rerun with a manifest of the same
    size, and not otherwise."""
    from vision_ops.sink import MANIFESTS, commits_version

    if store == "s3":
        options = request.getfixturevalue("s3_options")
        write = request.getfixturevalue("s3fs_client").pipe_file
        root = "s3://images/commits-version"
    else:
        options, root = None, str(tmp_path / "table")
        (tmp_path / "table" / MANIFESTS).mkdir(parents=True)

        def write(path: str, data: bytes) -> None:
            with open(path, "wb") as file:
                file.write(data)

    folder = root.removeprefix("s3://") + f"/{MANIFESTS}"
    none = commits_version(root, options)
    write(f"{folder}/r1.json", b'{"rows": 1}')
    first = commits_version(root, options)
    assert first != none
    assert commits_version(root, options) == first
    if store == "local":
        time.sleep(0.05)  # a file's time changes by the clock's tick (S3: its ETag, the MD5)
    write(f"{folder}/r1.json", b'{"rows": 2}')  # the rerun's manifest, of the same size
    assert commits_version(root, options) not in (none, first)


def test_search_finds_common_words_and_names_each_unit_once_as_its_latest_run_read_it(
    tmp_path, capsys
) -> None:
    """--search over an OCR table of two nights: each unit once, as its latest night read it
    (every unit came once per night before; a unit whose latest row is an error is not found
    by older text), and ordinary English words found ("right", "first" were DuckDB's default
    stopwords: never matched)."""
    import json

    from vision_ops.cli import EXIT_OK, main
    from vision_ops.schema import item_id

    def page(name: str, text: str) -> dict[str, object]:
        uri = f"file:///scans/{name}.png"
        return {"source_uri": uri, "item_id": item_id(uri), "text": text, "lines": []}

    table = tmp_path / "table"
    night_one = [page("a", "turn right at the first gate"), page("b", "left only")]
    night_one.append(page("c", "an old unreadable scan"))
    commit_rows(table, "ocr", night_one, "n1", "2026-12-01")
    night_two = [page("a", "turn right at the second gate"), page("b", "left first")]
    night_two.append(page("c", "") | {"status": "error", "error_type": "NotAnImage"})
    commit_rows(table, "ocr", night_two, "n2", "2026-12-02")
    found = {}
    for word in ("right", "second", "first", "left", "unreadable"):
        assert main(["query", str(table), "--search", word, "--format", "json"]) == EXIT_OK
        found[word] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["image"], row["run_id"]) for row in found["right"]] == [("a.png", "n2")]
    assert [row["text"] for row in found["second"]] == ["turn right at the second gate"]
    # "first": b's latest text (a stopword before); a's older night's text is not a's now
    assert [(row["image"], row["text"]) for row in found["first"]] == [("b.png", "left first")]
    assert [(row["image"], row["run_id"]) for row in found["left"]] == [("b.png", "n2")]
    assert found["unreadable"] == []  # c's latest row is an error: its older text is not found


def test_the_summary_counts_each_unit_once_as_its_latest_run_left_it(tmp_path, capsys) -> None:
    """Without SQL, `query` summarises each unit's latest row (--run-id: that run's rows): over
    every row, a table of nightly runs counted each image once a night (7 embedded images
    showed 14 units), and a summary of the latest run alone would be empty after a quiet
    incremental night. SQL still reads every committed row."""
    from vision_ops.cli import EXIT_OK, main
    from vision_ops.schema import item_id

    def image(name: str, label: str, score: float) -> dict[str, object]:
        uri = f"/x/{name}.jpg"
        return classified(uri, (label, score)) | {"item_id": item_id(uri)}

    table = tmp_path / "table"
    cats = [image(name, "cat", 0.9) for name in "abc"]
    commit_rows(table, "classification", cats, "n1", "2026-12-01")
    dogs = [image(name, "dog", 0.8) for name in "ab"]
    commit_rows(table, "classification", dogs, "n2", "2026-12-02")
    commit_rows(table, "classification", [], "n3", "2026-12-03")  # a quiet incremental night
    assert main(["query", str(table), "--format", "csv"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "label,images,mean_score"
    assert sorted(lines[1:]) == ["cat,1,0.9", "dog,2,0.8"]
    assert main(["query", str(table), "--run-id", "n1", "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["label,images,mean_score", "cat,3,0.9"]
    sql = "SELECT count(*) AS n FROM predictions"
    assert main(["query", str(table), sql, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["n", "5"]


def test_a_file_gone_without_a_commit_since_is_not_read_again(tmp_path, capsys, caplog) -> None:
    """A committed file deleted by hand (no commit since) fails the query at once, without
    "a commit replaced a file" warnings (it was read three times, with two); --out into a
    folder that is not there is refused before any read."""
    from vision_ops.cli import EXIT_BAD_SPEC, EXIT_FAILED, main

    table = tmp_path / "table"
    commit_rows(table, "classification", [classified("/x/a.jpg", ("cat", 0.9))], "r1")
    missing = str(tmp_path / "no" / "such" / "out.csv")
    assert main(["query", str(table), "SELECT 1 AS one", "--out", missing]) == EXIT_BAD_SPEC
    assert f"--out {missing}: expected a file in an existing folder" in capsys.readouterr().err
    for part in table.glob("run_date=*/*.parquet"):
        part.unlink()
    assert main(["query", str(table), "--format", "csv"]) == EXIT_FAILED
    assert "No files found" in capsys.readouterr().err
    assert "reading again" not in caplog.text
