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
