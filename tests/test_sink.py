"""The commit: part files staged, moved into the run_date partition, manifest last; reruns."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vision_ops.schema import PREDICTION_SCHEMA, SCHEMA_VERSION, STATUS_ERROR, STATUS_OK
from vision_ops.sink import CommitRefused, ParquetSink

DATE = dt.date(2026, 11, 24)


def rows(count: int, start: int = 0, errors: int = 0) -> pa.Table:
    status = [STATUS_ERROR] * errors + [STATUS_OK] * (count - errors)
    columns = {
        "run_id": ["r"] * count,
        "item_id": [f"id{start + i:04d}" for i in range(count)],
        "source_uri": [f"file:///x/{start + i}.jpg" for i in range(count)],
        "model_name": ["m"] * count,
        "model_weights_sha256": ["h"] * count,
        "task": ["classification"] * count,
        "status": status,
        "score": np.linspace(0, 1, count, dtype=np.float32),
    }
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(count, f.type)
        for f in PREDICTION_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=PREDICTION_SCHEMA)


def test_rows_are_split_into_files_and_committed_with_a_manifest(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path), "r", DATE, PREDICTION_SCHEMA, rows_per_file=4)
    sink.write(rows(3, errors=1))
    sink.write(rows(6, start=3))
    assert not (tmp_path / "run_date=2026-11-24").exists()  # nothing visible before commit
    result = sink.commit()
    partition = tmp_path / "run_date=2026-11-24"
    names = sorted(p.name for p in partition.glob("*.parquet"))
    assert (partition / "_SUCCESS").exists()
    assert names == [f"r-{sink.attempt}-part-{n:05d}.parquet" for n in range(3)]
    assert [pq.read_metadata(partition / n).num_rows for n in names] == [4, 4, 1]
    table = pq.read_table(partition).sort_by("item_id")
    assert table["item_id"].to_pylist() == [f"id{i:04d}" for i in range(9)]
    assert (result.rows, result.ok, result.errors) == (9, 8, 1)
    manifest = json.loads((tmp_path / "_manifests" / "r.json").read_text())
    assert manifest["rows"] == 9 and manifest["schema_version"] == SCHEMA_VERSION == "2"
    assert manifest["attempt"] == sink.attempt
    assert [f["rows"] for f in manifest["files"]] == [4, 4, 1]
    assert result.files == [f"file://{partition}/{n}" for n in names]
    assert not (tmp_path / "_staging").exists() and not (tmp_path / "_commits").exists()


def test_rerun_replaces_only_its_own_run(tmp_path: Path) -> None:
    other = ParquetSink(str(tmp_path), "other", DATE, PREDICTION_SCHEMA)
    other.write(rows(2))
    other.commit()
    first = ParquetSink(str(tmp_path), "r", DATE, PREDICTION_SCHEMA, rows_per_file=2)
    first.write(rows(5))
    first.commit()
    second = ParquetSink(str(tmp_path), "r", DATE, PREDICTION_SCHEMA, rows_per_file=10)
    second.write(rows(5))
    second.commit()
    names = sorted(p.name for p in (tmp_path / "run_date=2026-11-24").glob("*.parquet"))
    assert names == [
        f"other-{other.attempt}-part-00000.parquet",
        f"r-{second.attempt}-part-00000.parquet",
    ]


def test_a_commit_whose_staged_files_miss_rows_it_wrote_is_refused(tmp_path: Path) -> None:
    """Each staged footer holds what was written to it, but a file gone from the staging (a
    staging fault) would leave its rows out: the staged files' sum is checked too."""
    sink = ParquetSink(str(tmp_path), "r", DATE, PREDICTION_SCHEMA, rows_per_file=4)
    sink.write(rows(4))
    sink.parts.flush()
    sink.write(rows(5, start=4))
    sink.parts.flush()
    assert [count for _, count in sink.parts.files] == [4, 4, 1]
    sink.parts.files.pop()  # lost from the staging
    with pytest.raises(CommitRefused, match="the staged files hold 8 rows, the run wrote 9"):
        sink.commit()
    assert not (tmp_path / "run_date=2026-11-24").exists()
    assert not (tmp_path / "_manifests").exists()


def test_memory_filesystem_round_trip() -> None:
    import fsspec

    sink = ParquetSink("memory://tables/preds", "r", DATE, PREDICTION_SCHEMA)
    sink.write(rows(3))
    result = sink.commit()
    fs = fsspec.filesystem("memory")
    with fs.open(result.files[0].removeprefix("memory://"), "rb") as handle:
        assert pq.read_table(handle).num_rows == 3
    fs.rm("/tables", recursive=True)


@pytest.mark.parametrize("content", [b'{"run_id": "r1", "files": [', b"[1, 2]", b"\xff\xfe"])
def test_a_corrupt_manifest_is_named_by_the_commands_that_read_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    from committed_rows import classified, commit_rows

    from vision_ops.cli import EXIT_FAILED, main

    table = tmp_path / "table"
    commit_rows(table, "classification", [classified("file:///a.jpg", ("cat", 0.9))], "r1")
    manifest = table / "_manifests" / "r1.json"
    manifest.write_bytes(content)
    for command in (["verify", str(table)], ["report", str(table)], ["query", str(table)]):
        assert main(command) == EXIT_FAILED
        err = capsys.readouterr().err
        assert f"error: manifest {manifest}: " in err and "Traceback" not in err


def test_a_table_root_that_is_a_file_is_said_to_be_one(tmp_path: Path) -> None:
    import fsspec

    from vision_ops.publish import read_manifest
    from vision_ops.storage import StorageError

    root = tmp_path / "a-file"
    root.write_text("not a folder")
    with pytest.raises(StorageError, match=f"^{root} is a file, expected a table's folder$"):
        read_manifest(fsspec.filesystem("file"), str(root), "r1")


def test_a_committed_file_cut_short_is_named_by_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from committed_rows import classified, commit_rows

    from vision_ops.cli import EXIT_FAILED, main

    table = tmp_path / "table"
    commit_rows(table, "classification", [classified("file:///a.jpg", ("cat", 0.9))], "r1")
    part = next(table.glob("run_date=*/*.parquet"))
    part.write_bytes(part.read_bytes()[:40])
    assert main(["report", str(table)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"{part}: not a readable Parquet file" in err and "ArrowInvalid:" not in err
