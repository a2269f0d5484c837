"""Iceberg output on the embedded catalog (SeaweedFS's Iceberg REST catalog): one snapshot per
run, reruns replace their own rows, concurrent runs, failures at each step of the commit, and
the table read back independently (a fresh PyIceberg catalog, DuckDB's iceberg_scan)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from faulty_s3 import FaultyS3, S3Request
from pyiceberg.catalog import load_catalog
from pyiceberg.types import BinaryType

from vision_ops import iceberg, outputs
from vision_ops.cli import EXIT_OK, interrupted, main
from vision_ops.config import OutputSpec, parse_spec
from vision_ops.devstack import SeaweedS3
from vision_ops.errors import InterruptedDuringCommit
from vision_ops.evaluate import evaluate_run, read_metrics
from vision_ops.georef import geo_metadata
from vision_ops.iceberg import (
    CatalogError,
    IcebergSink,
    RunCommittedMeanwhile,
    open_table,
)
from vision_ops.masks import final_masks_folder, staged_masks_folder
from vision_ops.pipeline.incremental import done_sources
from vision_ops.query import connect, load_iceberg
from vision_ops.runindex import INDEX_FOLDER, KEY_SEPARATOR, read_index
from vision_ops.schema import PREDICTION_SCHEMA, STATUS_ERROR, STATUS_OK, item_id, output_schema
from vision_ops.sink import CommitRefused, RunDateConflict
from vision_ops.storage import StorageError, filesystem

pytestmark = [pytest.mark.s3, pytest.mark.timeout(300)]
DATE = dt.date(2026, 11, 24)
_tables = itertools.count()


# The storage options of the session's server for the folder beside each table (staging,
# masks): filled in by the `output` fixture.
STORE: dict[str, Any] = {}


@pytest.fixture
def output(iceberg_s3: SeaweedS3) -> OutputSpec:
    """A fresh table on the embedded catalog (staged rows, masks and metrics beside it in
    s3://out)."""
    STORE.update(options(iceberg_s3))
    name = f"t{next(_tables)}_{np.random.default_rng().integers(1 << 30)}"
    return OutputSpec(
        format="iceberg",
        uri=f"s3://out/{name}",
        table=f"tests.{name}",
        catalog=iceberg_s3.catalog_properties(),
    )


def options(server: SeaweedS3) -> dict[str, dict[str, str]]:
    return {"s3": server.storage_options()}


def rows(run_id: str, uris: list[str], errors: int = 0) -> pa.Table:
    count = len(uris)
    columns = {
        "run_id": [run_id] * count,
        "item_id": [item_id(uri) for uri in uris],
        "source_uri": uris,
        "model_name": ["m"] * count,
        "model_weights_sha256": ["h"] * count,
        "task": ["classification"] * count,
        "status": [STATUS_ERROR] * errors + [STATUS_OK] * (count - errors),
        "label": ["cat"] * count,
        "score": np.linspace(0, 1, count, dtype=np.float32),
        "top_k": [[{"label_id": 1, "label": "cat", "score": 0.5}]] * count,
    }
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(count, f.type)
        for f in PREDICTION_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=PREDICTION_SCHEMA)


def uris(prefix: str, count: int) -> list[str]:
    return [f"s3://images/{prefix}/{i}.jpg" for i in range(count)]


def commit_run(
    output: OutputSpec, run_id: str, sources: list[str], date: dt.date = DATE, **kwargs: Any
) -> IcebergSink:
    sink = IcebergSink(output, run_id, date, PREDICTION_SCHEMA, STORE, **kwargs)
    sink.write(rows(run_id, sources))
    sink.commit(sources, {"spec_digest": "s" * 64, "model_fingerprint": "f" * 64})
    return sink


def read_back(output: OutputSpec) -> Any:
    """The table through a fresh catalog client of its own (no state shared with the sink)."""
    return load_catalog("independent", **output.catalog).load_table(output.table)


def rows_by_run(output: OutputSpec) -> dict[str, list[str]]:
    table = read_back(output).scan(selected_fields=("run_id", "source_uri")).to_arrow()
    found: dict[str, list[str]] = {}
    for run, uri in zip(table["run_id"].to_pylist(), table["source_uri"].to_pylist(), strict=True):
        found.setdefault(run, []).append(uri)
    return {run: sorted(sources) for run, sources in sorted(found.items())}


def duckdb_rows(output: OutputSpec, server: SeaweedS3, snapshot: int | None = None) -> int:
    connection = connect(options(server))
    load_iceberg(connection)
    location = read_back(output).metadata_location
    at = f", snapshot_from_id = {snapshot}" if snapshot else ""
    return int(connection.sql(f"SELECT count(*) FROM iceberg_scan('{location}'{at})").fetchone()[0])


def test_a_run_is_one_snapshot_read_back_independently(output, iceberg_s3) -> None:
    sources = uris("a", 5)
    sink = IcebergSink(output, "r1", DATE, PREDICTION_SCHEMA, STORE)
    sink.write(rows("r1", sources[:2], errors=1))
    # an empty block (a resumed file whose sources were all cut short) is no other run's rows
    sink.write(PREDICTION_SCHEMA.empty_table())
    sink.write(rows("r1", sources[2:]))
    result = sink.commit(sources, {"spec_digest": "s" * 64, "stage_seconds": {"infer": 1.5}})
    assert (result.rows, result.ok, result.errors) == (5, 4, 1)

    table = read_back(output)
    assert [f.name for f in table.spec().fields] == ["run_date"]
    assert str(table.spec().fields[0].transform) == "identity"
    assert len(table.snapshots()) == 1
    summary = table.current_snapshot().summary
    assert summary["vision_ops.run_id"] == "r1"
    assert summary["vision_ops.run_date"] == "2026-11-24"
    assert summary["vision_ops.spec_digest"] == "s" * 64
    assert (summary["vision_ops.rows"], summary["vision_ops.errors"]) == ("5", "1")
    assert summary["added-records"] == "5"
    scanned = table.scan().to_arrow()
    assert scanned.column_names == ["run_date", *PREDICTION_SCHEMA.names]
    assert set(scanned["run_date"].to_pylist()) == {DATE}
    assert sorted(scanned["item_id"].to_pylist()) == sorted(item_id(u) for u in sources)
    assert scanned["top_k"].to_pylist()[0] == [{"label_id": 1, "label": "cat", "score": 0.5}]
    assert duckdb_rows(output, iceberg_s3) == 5

    manifest = outputs.committed_run(output)
    assert manifest is not None
    assert (manifest["run_id"], manifest["run_date"], manifest["rows"]) == ("r1", "2026-11-24", 5)
    assert manifest["stage_seconds"] == {"infer": 1.5}
    assert sum(f["rows"] for f in manifest["files"]) == 5
    assert outputs.verify_run(output)[1] == []


def test_the_table_keeps_the_geoparquet_metadata_and_the_task_in_its_properties(output) -> None:
    """A scene job's footprint stays WKB; the GeoParquet `geo` metadata its Parquet files would
    carry (CRS, bbox, covering) is a table property, as are the schema's version and task."""
    schema = output_schema("classification", tiles=True)
    utm = {"id": {"authority": "EPSG", "code": 32633}}
    geo = geo_metadata("footprint", utm, [500_000.0, 4_600_000.0, 500_640.0, 4_600_480.0])
    schema = schema.with_metadata({**(schema.metadata or {}), **geo})
    sources = uris("geo", 2)
    base = rows("g1", sources)
    table = pa.Table.from_arrays(
        [base[f.name] if f.name in base.column_names else pa.nulls(2, f.type) for f in schema],
        schema=schema,
    )
    sink = IcebergSink(output, "g1", DATE, schema, STORE)
    sink.write(table)
    sink.commit(sources)
    properties = read_back(output).properties
    assert json.loads(properties["geo"]) == json.loads(geo[b"geo"])
    assert json.loads(properties["geo"])["columns"]["footprint"]["crs"] == utm
    assert properties["vision_ops.task"] == "classification"
    assert read_back(output).schema().find_field("footprint").field_type == BinaryType()
    # The property is the table's extent: a later run's scenes widen it, and a run that cut
    # no scene (an incremental night with nothing new) leaves it as it was.
    east = geo_metadata("footprint", utm, [501_000.0, 4_599_000.0, 502_000.0, 4_600_000.0])
    none = geo_metadata("footprint", None, None)
    for run_id, added in (("g2", east), ("g3", none)):
        run_schema = schema.with_metadata({**(schema.metadata or {}), **added})
        IcebergSink(output, run_id, DATE, run_schema, STORE).commit([])
        footprint = json.loads(read_back(output).properties["geo"])["columns"]["footprint"]
        assert footprint["crs"] == utm, run_id
        assert footprint["bbox"] == [500_000.0, 4_599_000.0, 502_000.0, 4_600_480.0], run_id


def test_an_iceberg_scene_tables_footprint_queries_as_a_geometry(output) -> None:
    """The footprint an Iceberg table holds as WKB (no geometry type in Iceberg v2) is a
    GEOMETRY in `query`'s view, as a GeoParquet table's is: README's ST_Intersects query runs
    on both (it failed on Iceberg: no ST_Intersects(BLOB, GEOMETRY))."""
    from vision_ops.georef import polygon_wkb
    from vision_ops.query import register_views

    schema = output_schema("classification", tiles=True)
    sources = uris("geo", 2)
    base = rows("g1", sources)
    squares = [
        [(0, 0), (10, 0), (10, 10), (0, 10), (0, 0)],
        [(20, 20), (30, 20), (30, 30), (20, 30), (20, 20)],
    ]
    columns = {"footprint": pa.array([polygon_wkb(np.array(s)) for s in squares], pa.binary())}
    table = pa.Table.from_arrays(
        [
            columns.get(
                f.name, base[f.name] if f.name in base.column_names else pa.nulls(2, f.type)
            )
            for f in schema
        ],
        schema=schema,
    )
    sink = IcebergSink(output, "g1", DATE, schema, STORE)
    sink.write(table)
    sink.commit(sources)
    connection = connect(STORE, table_on_s3=True)
    register_views(connection, output, STORE)
    assert connection.sql("SELECT DISTINCT typeof(footprint) FROM predictions").fetchall() == [
        ("GEOMETRY",)
    ]
    point = "ST_GeomFromText('POINT (25 25)')"
    inside = f"SELECT source_uri FROM predictions WHERE ST_Intersects(footprint, {point})"
    assert connection.sql(inside).fetchall() == [(sources[1],)]


def segmentation_run(
    output: OutputSpec, server: SeaweedS3, run_id: str, sources: list[str]
) -> IcebergSink:
    """A segmentation run's rows, each naming the mask the run staged for it beside the table
    (as vision_ops.masks.write_masks does), committed."""
    schema = output_schema("segmentation")
    sink = IcebergSink(output, run_id, DATE, schema, options(server))
    staged = staged_masks_folder(sink.root, run_id, sink.attempt)
    final = final_masks_folder(sink.root, run_id, DATE, sink.attempt)
    names = [f"{item_id(uri)}.png" for uri in sources]
    for name in names:
        sink.fs.pipe_file(f"{staged}/{name}", b"png of class ids")
    base = rows(run_id, sources)
    columns = {
        **{name: base[name] for name in base.column_names if name in schema.names},
        "task": pa.array(["segmentation"] * len(sources)),
        "mask_uri": pa.array([f"s3://{final}/{name}" for name in names]),
    }
    sink.write(
        pa.Table.from_arrays(
            [columns.get(f.name, pa.nulls(len(sources), f.type)) for f in schema], schema=schema
        )
    )
    sink.commit(sources)
    return sink


def test_segmentation_masks_are_committed_beside_the_table_and_replaced_by_a_rerun(
    output, iceberg_s3
) -> None:
    first = segmentation_run(output, iceberg_s3, "s1", uris("seg", 2))
    table = read_back(output).scan(selected_fields=("mask_uri",)).to_arrow()
    fs = first.fs
    assert all(fs.exists(uri) for uri in table["mask_uri"].to_pylist())
    staged = fs.find(staged_masks_folder(first.root, "s1", first.attempt))
    assert [path for path in staged if path.endswith(".png")] == []  # moved at the commit
    rerun = segmentation_run(output, iceberg_s3, "s1", uris("seg", 1))  # one image less
    [mask] = read_back(output).scan(selected_fields=("mask_uri",)).to_arrow()["mask_uri"]
    fs.invalidate_cache()
    run_folder = final_masks_folder(rerun.root, "s1", DATE, None)
    folders = {path.rpartition("/")[0] for path in fs.find(run_folder) if path.endswith(".png")}
    assert folders == {f"{run_folder}/{rerun.attempt}"}  # the first attempt's masks are gone
    assert fs.cat_file(mask.as_py()) == b"png of class ids"
    # The first attempt's tidy-up, late (it stalled after its snapshot): it removes what its
    # own commit replaced (nothing), not every masks folder but its own (the rerun's, before).
    first._tidy_up(first._committed, None, first.parts.folder)
    fs.invalidate_cache()
    assert fs.cat_file(mask.as_py()) == b"png of class ids"


def test_a_run_committing_meanwhile_keeps_its_extent_in_the_tables_geo(output) -> None:
    """Run g1 reads the table's geo, then g2 commits before g1 reaches the catalog: g1's commit
    is retried against the new head, with the geo computed again from it (PyIceberg re-sends
    the properties as they were: g2's extent was lost)."""
    utm = {"id": {"authority": "EPSG", "code": 32633}}
    schema = output_schema("classification", tiles=True)

    def scenes(bbox: list[float]) -> pa.Schema:
        return schema.with_metadata(
            {**(schema.metadata or {}), **geo_metadata("footprint", utm, bbox)}
        )

    first = IcebergSink(output, "g1", DATE, scenes([0.0, 0.0, 10.0, 10.0]), STORE)
    second = IcebergSink(output, "g2", DATE, scenes([20.0, 20.0, 30.0, 30.0]), STORE)
    checked = first._check_not_committed_meanwhile

    def then_the_other_commits() -> None:
        checked()
        second.commit([])

    first._check_not_committed_meanwhile = then_the_other_commits  # type: ignore[method-assign]
    first.commit([])
    table = read_back(output)
    assert [s.summary.get("vision_ops.run_id") for s in table.snapshots()] == ["g2", "g1"]
    footprint = json.loads(table.properties["geo"])["columns"]["footprint"]
    assert footprint["bbox"] == [0.0, 0.0, 30.0, 30.0] and footprint["crs"] == utm


def test_tables_sharing_one_uri_and_run_id_keep_each_others_masks(output, iceberg_s3) -> None:
    other = output.model_copy(update={"table": f"{output.table}_other"})
    first = segmentation_run(output, iceberg_s3, "s1", uris("seg", 2))
    segmentation_run(other, iceberg_s3, "s1", uris("seg", 1))
    masks = read_back(output).scan(selected_fields=("mask_uri",)).to_arrow()["mask_uri"]
    first.fs.invalidate_cache()
    assert [first.fs.exists(uri) for uri in masks.to_pylist()] == [True, True]
    assert first.root == f"out/{output.uri.rpartition('/')[2]}/{output.table}"


def test_attempts_staged_in_the_earlier_layout_are_named_not_touched(output, caplog) -> None:
    """Before each table had a folder of its own, a run staged in `uri/_staging/<run_id>/`:
    a rerun after the upgrade says it does not resume from them, and leaves them."""
    fs, root = filesystem(output.uri, STORE)
    earlier = f"{root}/_staging/r1/0123456789ab/part-00000.parquet"
    fs.pipe_file(earlier, b"an earlier version's part")
    with caplog.at_level("WARNING", logger="vision_ops.iceberg"):
        commit_run(output, "r1", uris("a", 2))
    assert f"{root}/_staging/r1 holds attempts of run r1 staged by an earlier version" in (
        caplog.text
    )
    assert rows_by_run(output) == {"r1": uris("a", 2)} and fs.exists(earlier)
    caplog.clear()
    with caplog.at_level("WARNING", logger="vision_ops.iceberg"):
        commit_run(output, "r2", uris("b", 1))
    assert "earlier version" not in caplog.text


def test_tables_sharing_one_uri_and_run_id_keep_their_own_metrics(output) -> None:
    """Each table's evaluation is its own (imagefolder truth: the folder; every row says
    "cat"), and metrics scored before tables had folders of their own are still read."""
    other = output.model_copy(update={"table": f"{output.table}_other"})
    commit_run(output, "r1", uris("dog", 2))
    commit_run(other, "r1", uris("cat", 2))
    for table in (output, other):
        evaluate_run(table, "", "imagefolder", options=STORE)

    def accuracy(table: OutputSpec) -> float | None:
        metrics = read_metrics(table, outputs.committed_run(table, "r1", STORE), STORE)
        return None if metrics is None else metrics.to_pylist()[0]["value"]

    assert (accuracy(output), accuracy(other)) == (0.0, 1.0)
    fs, files = filesystem(output.files_uri, STORE)
    legacy = f"{output.uri.removeprefix('s3://')}/_metrics/r1.parquet"
    fs.mv(f"{files}/_metrics/r1.parquet", legacy)
    assert accuracy(output) == 0.0  # the earlier layout: uri/_metrics
    with fs.open(legacy, "rb") as handle:  # as metrics were written before they were stamped
        unstamped = pq.read_table(handle).replace_schema_metadata(None)
    with fs.open(legacy, "wb") as handle:
        pq.write_table(unstamped, handle)
    evaluate_run(output, "", "imagefolder", options=STORE)  # into the table's own folder
    commit_run(output, "r1", uris("dog", 1))  # a rerun: not evaluated, whatever lies elsewhere
    assert accuracy(output) is None


def test_rerun_replaces_only_the_rows_of_its_run_id(output, iceberg_s3) -> None:
    commit_run(output, "r1", uris("a", 3))
    commit_run(output, "r2", uris("b", 2))
    before = read_back(output).current_snapshot().snapshot_id
    commit_run(output, "r1", uris("c", 4))  # the same run id, other rows

    assert rows_by_run(output) == {"r1": uris("c", 4), "r2": uris("b", 2)}
    table = read_back(output)
    assert len(table.snapshots()) == 3
    assert table.current_snapshot().summary.operation.value == "overwrite"
    assert duckdb_rows(output, iceberg_s3) == 6
    assert duckdb_rows(output, iceberg_s3, snapshot=before) == 5  # time travel: the old r1
    runs = outputs.committed_runs(output)
    assert [(r["run_id"], r["rows"]) for r in runs] == [("r1", 4), ("r2", 2)]
    old = outputs.read_run(output, {"run_id": "r1", "snapshot_id": before}, columns=["source_uri"])
    assert sorted(old["source_uri"].to_pylist()) == uris("a", 3)


def test_a_commit_names_its_index_in_the_snapshot_summary_and_a_rerun_replaces_it(output) -> None:
    """The run's index (vision_ops.runindex) on S3 beside the table, read by --incremental's
    planning instead of the rows; the rerun's index replaces the first's."""
    sources = uris("indexed", 3)
    first = IcebergSink(output, "i1", DATE, PREDICTION_SCHEMA, STORE)
    first.write(rows("i1", sources, errors=1))  # the first source an error (no type: '')
    first.commit(sources, {"model_fingerprint": "f" * 64})
    run = outputs.committed_run(output, "i1")
    assert run["index_uri"] == f"{output.files_uri}/{INDEX_FOLDER}/i1-{first.attempt}.parquet"
    index = read_index(run["index_uri"], STORE)
    pairs = zip(index["source_key"].to_pylist(), index["error_types"].to_pylist(), strict=True)
    by_uri = {key.split(KEY_SEPARATOR)[0]: types for key, types in pairs}
    assert by_uri == {sources[0]: [""], sources[1]: [], sources[2]: []}
    assert outputs.verify_run(output, "i1", STORE)[1] == []
    done = done_sources(output, outputs.committed_runs(output), STORE, [])
    assert sorted(key.split(KEY_SEPARATOR)[0] for key in done.to_pylist()) == sources[1:]

    second = commit_run(output, "i1", sources)  # the rerun: every source ok
    rerun = outputs.committed_run(output, "i1")
    assert rerun["index_uri"].endswith(f"/i1-{second.attempt}.parquet")
    assert read_index(rerun["index_uri"], STORE).num_rows == 3
    fs, old = filesystem(run["index_uri"], STORE)
    assert not fs.exists(old)
    done = done_sources(output, outputs.committed_runs(output), STORE, [])
    assert sorted(key.split(KEY_SEPARATOR)[0] for key in done.to_pylist()) == sources


def test_a_refused_commit_leaves_the_previous_snapshot(output) -> None:
    commit_run(output, "r1", uris("a", 3))
    before = read_back(output).current_snapshot().snapshot_id
    sink = IcebergSink(output, "r1", DATE, PREDICTION_SCHEMA, STORE)
    sink.write(rows("r1", uris("b", 2)))
    with pytest.raises(CommitRefused, match="1 missing"):
        sink.commit(uris("b", 3))
    assert read_back(output).current_snapshot().snapshot_id == before
    assert rows_by_run(output) == {"r1": uris("a", 3)}
    assert data_files_in_store(sink) == data_files_in_snapshot(output)  # nothing of the attempt
    assert [rows for _, rows in sink.parts.files] == [2]  # staged, for a rerun to resume


def data_files_in_store(sink: IcebergSink) -> set[str]:
    """Every Parquet file under the table's location, as the store lists it."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **sink.fs.storage_options)
    location = sink.table.location().removeprefix("s3://")
    return {f"s3://{path}" for path in fs.find(location) if path.endswith(".parquet")}


def data_files_in_snapshot(output: OutputSpec) -> set[str]:
    return {task.file.file_path for task in read_back(output).scan().plan_files()}


def test_concurrent_runs_with_different_run_ids_both_commit(output) -> None:
    """Both start from the same snapshot; the second commit loses the race and is retried."""
    first = IcebergSink(output, "r1", DATE, PREDICTION_SCHEMA, STORE)
    second = IcebergSink(output, "r2", DATE, PREDICTION_SCHEMA, STORE)
    for sink, prefix in ((first, "a"), (second, "b")):
        sink.write(rows(sink.run_id, uris(prefix, 3)))
    first.commit(uris("a", 3))
    second.commit(uris("b", 3))
    assert rows_by_run(output) == {"r1": uris("a", 3), "r2": uris("b", 3)}

    barrier, errors = threading.Barrier(4), []

    def run(run_id: str) -> None:
        try:
            sink = IcebergSink(output, run_id, DATE, PREDICTION_SCHEMA, STORE)
            sink.write(rows(run_id, uris(run_id, 2)))
            barrier.wait()
            sink.commit(uris(run_id, 2))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert rows_by_run(output) == {
        "r1": uris("a", 3),
        "r2": uris("b", 3),
        **{f"t{i}": uris(f"t{i}", 2) for i in range(4)},
    }


def test_concurrent_attempts_of_one_run_id_one_wins(output) -> None:
    commit_run(output, "r1", uris("old", 2))
    first = IcebergSink(output, "r1", DATE, PREDICTION_SCHEMA, STORE)
    second = IcebergSink(output, "r1", DATE, PREDICTION_SCHEMA, STORE)
    first.write(rows("r1", uris("a", 3)))
    second.write(rows("r1", uris("b", 3)))
    first.commit(uris("a", 3))
    with pytest.raises(RunCommittedMeanwhile, match="another attempt of the same run id"):
        second.commit(uris("b", 3))
    assert rows_by_run(output) == {"r1": uris("a", 3)}


def test_racing_attempts_of_one_run_id_one_wins(output) -> None:
    """Both reach the catalog at once: one commit lands, the other fails naming the run. (The
    table exists first; runs that create it at the same instant: the next test.)"""
    open_table(output, PREDICTION_SCHEMA)
    barrier, outcomes = threading.Barrier(2), []

    def run(prefix: str) -> None:
        sink = IcebergSink(output, "r1", DATE, PREDICTION_SCHEMA, STORE)
        sink.write(rows("r1", uris(prefix, 3)))
        barrier.wait()
        try:
            sink.commit(uris(prefix, 3))
            outcomes.append(prefix)
        except CommitRefused as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=run, args=(p,)) for p in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [o for o in outcomes if o in ("a", "b")]
    lost = [o for o in outcomes if o not in ("a", "b")]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert "run r1" in lost[0]
    assert rows_by_run(output) == {"r1": uris(won[0], 3)}


def test_runs_creating_the_table_at_the_same_instant_both_commit(output) -> None:
    """Both find no table and create it; the catalog keeps one, and the other run's commit,
    against the table it created, is refused (`Table UUID does not match`): it reloads the
    table and commits again. Both runs' rows are in the one table."""
    barrier, errors = threading.Barrier(3), []

    def run(run_id: str) -> None:
        try:
            barrier.wait()
            sink = IcebergSink(output, run_id, DATE, PREDICTION_SCHEMA, STORE)
            sink.write(rows(run_id, uris(run_id, 2)))
            sink.commit(uris(run_id, 2))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(f"c{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert rows_by_run(output) == {f"c{i}": uris(f"c{i}", 2) for i in range(3)}
    assert len(read_back(output).snapshots()) == 3


def test_one_run_id_on_two_dates_is_refused_before_any_work(output) -> None:
    """Reproduction (b): r1 committed for one date; r1 for another date is refused when its
    sink opens, and the first date's rows stay."""
    commit_run(output, "r1", uris("a", 2), date=DATE)
    with pytest.raises(RunDateConflict, match="committed for 2026-11-24"):
        IcebergSink(output, "r1", DATE + dt.timedelta(days=1), PREDICTION_SCHEMA)
    table = read_back(output).scan().to_arrow()
    assert set(table["run_date"].to_pylist()) == {DATE} and table.num_rows == 2
    commit_run(output, "r1", uris("b", 1), date=DATE)  # the same date reruns
    assert rows_by_run(output) == {"r1": uris("b", 1)}


def test_rows_of_another_run_id_are_refused(output) -> None:
    sink = IcebergSink(output, "r1", DATE, PREDICTION_SCHEMA, STORE)
    with pytest.raises(CommitRefused, match="another run id"):
        sink.write(rows("r2", uris("a", 1)))


def test_a_table_of_another_schema_is_refused(output) -> None:
    commit_run(output, "r1", uris("a", 1))
    other = PREDICTION_SCHEMA.append(pa.field("extra", pa.string()))
    with pytest.raises(CatalogError, match="expected a table of this job's schema"):
        IcebergSink(output, "r2", DATE, other, STORE)


def detection_rows(run_id: str, schema: pa.Schema, sources: list[str]) -> pa.Table:
    entry = schema.field("detections").type.value_type
    box = {"label_id": 1, "label": "cat", "score": 0.9, "x_min": 1.0, "y_min": 2.0}
    box |= {"x_max": 3.0, "y_max": 4.0}
    if entry.get_field_index("mask") >= 0:
        box["mask"] = {"size": [8, 8], "counts": "PPYo0"}
    columns = {
        "run_id": [run_id] * len(sources),
        "item_id": [item_id(uri) for uri in sources],
        "source_uri": sources,
        "model_name": ["m"] * len(sources),
        "model_weights_sha256": ["h"] * len(sources),
        "task": ["detection"] * len(sources),
        "status": [STATUS_OK] * len(sources),
        "num_detections": [1] * len(sources),
        "detections": [[box]] * len(sources),
    }
    return pa.Table.from_arrays(
        [
            pa.array(columns[f.name], f.type)
            if f.name in columns
            else pa.nulls(len(sources), f.type)
            for f in schema
        ],
        schema=schema,
    )


def test_a_detection_table_without_masks_refuses_a_mask_model_before_any_work(output) -> None:
    plain, masked = output_schema("detection"), output_schema("detection", instance="mask")
    sink = IcebergSink(output, "r1", DATE, plain, STORE)
    sink.write(detection_rows("r1", plain, uris("a", 2)))
    sink.commit(uris("a", 2))
    with pytest.raises(CatalogError, match=r"detections.element.mask.*expected a table of this"):
        IcebergSink(output, "r2", DATE, masked, STORE)
    assert rows_by_run(output) == {"r1": uris("a", 2)}


def test_a_detection_table_with_masks_takes_a_run_without_them(output) -> None:
    plain, masked = output_schema("detection"), output_schema("detection", instance="mask")
    first = IcebergSink(output, "r1", DATE, masked, STORE)
    first.write(detection_rows("r1", masked, uris("a", 2)))
    first.commit(uris("a", 2))
    second = IcebergSink(output, "r2", DATE, plain, STORE)
    second.write(detection_rows("r2", plain, uris("b", 1)))
    second.commit(uris("b", 1))
    table = read_back(output).scan(selected_fields=("run_id", "detections")).to_arrow()
    masks = {
        run: boxes[0]["mask"]
        for run, boxes in zip(
            table["run_id"].to_pylist(), table["detections"].to_pylist(), strict=True
        )
    }
    assert masks == {"r1": {"size": [8, 8], "counts": "PPYo0"}, "r2": None}


# --- failures at each step of the commit -----------------------------------------------------


def data_file(r: S3Request) -> bool:
    return r.method == "PUT" and "/data/" in r.key


def manifest_file(r: S3Request) -> bool:
    name = r.key.rpartition("/")[2]
    return r.method == "PUT" and name.endswith(".avro") and not name.startswith("snap-")


def manifest_list(r: S3Request) -> bool:
    name = r.key.rpartition("/")[2]
    return r.method == "PUT" and name.startswith("snap-")


def catalog_table(r: S3Request) -> bool:
    """A request to one table of the REST catalog (its load, its commit)."""
    return re.search(r"/namespaces/[^/]+/tables/[^/]+$", r.key) is not None


def catalog_commit(r: S3Request) -> bool:
    """The REST catalog's commit of one table (not creating it: POST .../tables)."""
    return r.method == "POST" and catalog_table(r)


@pytest.fixture
def through_proxies(iceberg_s3: SeaweedS3) -> Iterator[Callable[..., tuple[OutputSpec, Any]]]:
    """An output whose S3 and catalog requests pass through fault-injecting proxies."""
    opened: list[FaultyS3] = []

    def make(output: OutputSpec, **faults: Any) -> tuple[OutputSpec, FaultyS3, FaultyS3]:
        s3 = FaultyS3(iceberg_s3.endpoint_url, **faults.get("s3", {})).start()
        catalog = FaultyS3(iceberg_s3.catalog_url, **faults.get("catalog", {})).start()
        opened.extend([s3, catalog])
        properties = output.catalog | {"uri": catalog.endpoint_url, "s3.endpoint": s3.endpoint_url}
        return output.model_copy(update={"catalog": properties}), s3, catalog

    yield make  # type: ignore[misc]
    for proxy in opened:
        proxy.stop()


@pytest.mark.parametrize(
    ("step", "faults"),
    [
        ("data file", {"s3": {"deny": data_file}}),
        ("manifest", {"s3": {"deny": manifest_file}}),
        ("manifest list", {"s3": {"deny": manifest_list}}),
        ("catalog commit refused", {"catalog": {"deny": catalog_commit}}),
        ("catalog commit reset", {"catalog": {"reset_every": 1, "faulty": catalog_commit}}),
    ],
)
def test_a_failed_rerun_leaves_the_earlier_run_committed(
    output, iceberg_s3, through_proxies, step, faults
) -> None:
    """Reproduction (a): a rerun of r1 whose commit fails at any step leaves r1's earlier rows
    committed, for every reader: PyIceberg, DuckDB, the run's manifest and verify."""
    commit_run(output, "r1", uris("old", 3))
    commit_run(output, "r2", uris("other", 2))
    before = read_back(output).current_snapshot().snapshot_id
    faulty, s3, catalog = through_proxies(output, **faults)
    with pytest.raises((StorageError, CommitRefused, OSError)):
        commit_run(faulty, "r1", uris("new", 4))
    assert sum(s3.faults.values()) + sum(catalog.faults.values()) > 0, step
    assert read_back(output).current_snapshot().snapshot_id == before
    assert rows_by_run(output) == {"r1": uris("old", 3), "r2": uris("other", 2)}
    assert duckdb_rows(output, iceberg_s3) == 5
    manifest = outputs.committed_run(output, "r1")
    assert manifest is not None and manifest["rows"] == 3
    assert outputs.verify_run(output, "r1")[1] == []
    commit_run(output, "r1", uris("new", 4))  # and a clean rerun then commits
    assert rows_by_run(output) == {"r1": uris("new", 4), "r2": uris("other", 2)}


def test_a_commit_whose_table_cannot_be_reloaded_leaves_no_data_files(
    output, through_proxies
) -> None:
    """The catalog answers the sink's first loads of the table, then refuses the reload just
    before the snapshot's commit: nothing was sent, so the attempt's data files are removed
    (they were left as if the commit might have landed)."""
    commit_run(output, "r1", uris("a", 3))
    loads = {"armed": False, "seen": 0}

    def second_load_of_the_commit(r: S3Request) -> bool:
        if not (loads["armed"] and r.method == "GET" and catalog_table(r)):
            return False
        loads["seen"] += 1
        return loads["seen"] >= 2  # the commit's first load (before the data files) passes

    faulty, _, catalog = through_proxies(output, catalog={"deny": second_load_of_the_commit})
    sink = IcebergSink(faulty, "r1", DATE, PREDICTION_SCHEMA, STORE)
    sink.write(rows("r1", uris("b", 2)))
    loads["armed"] = True
    with pytest.raises(CatalogError, match="cannot reload the table"):
        sink.commit(uris("b", 2))
    assert catalog.faults and sink._files  # the data files were written, then refused
    assert rows_by_run(output) == {"r1": uris("a", 3)}
    assert data_files_in_store(sink) == data_files_in_snapshot(output)


def test_ctrl_c_while_the_catalog_has_the_commit_is_not_called_nothing_committed(
    output, through_proxies
) -> None:
    """SIGINT as the commit reaches the catalog: the run does not say "nothing was committed"
    (the snapshot may have landed) but which run to rerun, and the rerun commits it."""
    commit_run(output, "r1", uris("old", 3))

    def ctrl_c_at_the_catalog_commit(r: S3Request) -> bool:
        if catalog_commit(r):
            os.kill(os.getpid(), signal.SIGINT)
        return False

    faulty, _, _ = through_proxies(output, catalog={"deny": ctrl_c_at_the_catalog_commit})
    with pytest.raises(InterruptedDuringCommit) as stopped:
        commit_run(faulty, "r1", uris("new", 2))
    spec = parse_spec({
        "input": {"uris": ["s3://images/new/"]},
        "model": {"architecture": "resnet18"},
        "output": output.model_dump(),
        "run": {"id": "r1", "date": DATE.isoformat()},
    })  # fmt: skip
    assert interrupted(spec, stopped.value) == (
        "interrupted during the catalog commit of run r1: its snapshot may have landed or not "
        "(`vision-ops verify` shows the committed run); the same command with --run-id r1 "
        f"--run-date {DATE.isoformat()} commits the run either way"
    )
    commit_run(output, "r1", uris("new", 2))
    assert rows_by_run(output) == {"r1": uris("new", 2)}


def test_a_commit_whose_response_is_lost_is_committed_once(output, through_proxies) -> None:
    """The catalog applies the commit, the client never hears: it finds its snapshot."""
    commit_run(output, "r1", uris("old", 3))
    faults = {"catalog": {"drop_response_every": 1, "faulty": catalog_commit}}
    faulty, _, catalog = through_proxies(output, **faults)
    commit_run(faulty, "r1", uris("new", 2))
    assert catalog.fault_count("dropped_response") >= 1
    assert rows_by_run(output) == {"r1": uris("new", 2)}
    assert len(read_back(output).snapshots()) == 2


# --- the pipeline and every reader, through the command line ---------------------------------


def job_spec(
    folder: Path, photos: Path, output: OutputSpec, weights: Path, server: SeaweedS3
) -> Path:
    spec = {
        "input": {"uris": [str(photos)]},
        "model": {
            "architecture": "mobilenet_v3_small",
            "weights": str(weights),
            "num_classes": 4,
            "preprocessing": {"resize": 72, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "task": {"kind": "classification", "top_k": 2},
        "runtime": {"batch_size": 8, "max_actors": 1},
        "output": output.model_dump(),
        "storage_options": options(server),
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_backfill_skips_a_date_whose_runs_snapshot_was_expired(
    output, iceberg_s3, tmp_path, tiny_weights, capsys, monkeypatch
) -> None:
    """Expiring a run's snapshot forgets its summary, not its rows: a backfill over its date
    skips it, saying so (it ran the date again with today's inputs, and that night's rows were
    replaced without a word). The backfill reads both from one loading of the table (it loaded
    it twice as it started)."""
    first, second = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
    commit_run(output, "n1", uris("night-1", 2), first)
    commit_run(output, "n2", uris("night-2", 2), second)
    table = read_back(output)
    oldest = table.snapshots()[0].snapshot_id
    table.maintenance.expire_snapshots().by_ids([oldest]).commit()
    assert [run["run_id"] for run in outputs.committed_runs(output)] == ["n2"]
    runs, expired = outputs.runs_and_expired_dates(output)
    assert [run["run_id"] for run in runs] == ["n2"] and expired == {"2026-11-01"}
    (tmp_path / "photos").mkdir()
    spec = str(job_spec(tmp_path, tmp_path / "photos", output, tiny_weights, iceberg_s3))
    loaded: list[str | None] = []
    load_table = iceberg.load_table

    def counted(target: OutputSpec) -> Any:
        loaded.append(target.table)
        return load_table(target)

    monkeypatch.setattr(iceberg, "load_table", counted)
    assert main(["backfill", spec, "--from", "2026-11-01", "--to", "2026-11-02"]) == EXIT_OK
    assert loaded == [output.table]
    assert capsys.readouterr().out.splitlines() == [
        "2026-11-01: holds the rows of a run whose snapshot was expired, skipped "
        "(`vision-ops run SPEC --run-date 2026-11-01` runs it again)",
        "2026-11-02: committed already, skipped",
    ]
    assert rows_by_run(output) == {"n1": uris("night-1", 2), "n2": uris("night-2", 2)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_runs_commit_to_iceberg_and_every_reader_reads_them(
    ray_local, output, iceberg_s3, tmp_path, photo_paths, tiny_weights, capsys
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in photo_paths[:3]:
        (photos / path.name).write_bytes(path.read_bytes())
    (photos / "broken.png").write_bytes(b"not a png")
    spec = str(job_spec(tmp_path, photos, output, tiny_weights, iceberg_s3))

    assert main(["run", spec, "--run-id", "n1", "--run-date", "2026-11-01"]) == EXIT_OK
    between = dt.datetime.now(dt.timezone.utc)
    time.sleep(0.05)
    assert main(["run", spec, "--run-id", "n2", "--run-date", "2026-11-02"]) == EXIT_OK
    assert rows_by_run(output) == {"n1": sorted(f"file://{p}" for p in photos.iterdir())} | {
        "n2": sorted(f"file://{p}" for p in photos.iterdir())
    }
    summaries = [s.summary for s in read_back(output).snapshots()]
    assert [(s["vision_ops.run_id"], s["vision_ops.rows"]) for s in summaries] == [
        ("n1", "4"),
        ("n2", "4"),
    ]
    assert len(summaries[0]["vision_ops.model_fingerprint"]) == 64

    capsys.readouterr()
    sql = "SELECT run_id, status, count(*) AS n FROM predictions GROUP BY ALL ORDER BY ALL"
    assert main(["query", spec, sql, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == [
        "run_id,status,n", "n1,error,1", "n1,ok,3", "n2,error,1", "n2,ok,3",
    ]  # fmt: skip
    assert main(["query", spec, sql, "--format", "csv", "--run-id", "n2"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["run_id,status,n", "n2,error,1", "n2,ok,3"]
    as_of = ["--as-of", between.isoformat()]
    assert main(["query", spec, sql, "--format", "csv", *as_of]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["run_id,status,n", "n1,error,1", "n1,ok,3"]
    assert main(["query", spec, sql, "--format", "csv", *as_of, "--run-id", "n1"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["run_id,status,n", "n1,error,1", "n1,ok,3"]
    assert main(["query", spec, sql, *as_of, "--run-id", "n2"]) == 1  # it was 0 rows, exit 0
    assert f"run n2 was not committed at {between.isoformat()}" in capsys.readouterr().err
    assert main(["query", spec]) == EXIT_OK  # the default summary per label
    assert "mean_score" in capsys.readouterr().out

    assert main(["verify", spec, "--run-id", "n1"]) == EXIT_OK
    assert "run n1 (2026-11-01): 4 units, each once" in capsys.readouterr().out
    assert main(["report", spec]) == EXIT_OK
    assert "run n2 (2026-11-02, classification)" in capsys.readouterr().out
    assert main(["evaluate", spec, "--truth-format", "imagefolder", "--run-id", "n1"]) == 0
    assert "accuracy: 0.0000" in capsys.readouterr().out  # the folder is no class of the model
    assert main(["report", spec, "--run-id", "n1"]) == EXIT_OK
    assert "against ground truth: accuracy 0.0000" in capsys.readouterr().out

    backfill = ["backfill", spec, "--from", "2026-11-01", "--to", "2026-11-03"]
    assert main(backfill) == EXIT_OK
    assert capsys.readouterr().out.count("committed already, skipped") == 2
    assert [r["run_date"] for r in outputs.committed_runs(output)] == [
        "2026-11-01", "2026-11-02", "2026-11-03",
    ]  # fmt: skip

    assert main(["run", spec, "--run-id", "n4", "--run-date", "2026-11-04", "--incremental"]) == 0
    n4 = outputs.read_run(output, outputs.committed_run(output, "n4"))  # the error input again
    assert [(r["source_uri"], r["error_type"]) for r in n4.to_pylist()] == [
        (f"file://{photos / 'broken.png'}", "NotAnImage")
    ]
    retried = {"sources": 1, "units": 1, "error_rows": 1, "skipped": 0}  # in the snapshot's summary
    assert outputs.committed_run(output, "n4")["retried"] == retried
    capsys.readouterr()
    assert main(["report", spec, "--check"]) == EXIT_OK  # the retry alone: no error-rate rise
    assert "drift: no figures (the run processed no new input" in capsys.readouterr().out
    kept = ["--set", "run.skip_errors=[NotAnImage]", "--incremental"]
    assert main(["run", spec, "--run-id", "n5", "--run-date", "2026-11-05", *kept]) == 0
    assert outputs.committed_run(output, "n5")["rows"] == 0  # everything committed already
    assert len(read_back(output).snapshots()) == 5
    assert read_back(output).scan().to_arrow().num_rows == 13
