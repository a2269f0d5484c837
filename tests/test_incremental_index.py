"""The per-run index --incremental reads (vision_ops.runindex): written at each commit, one row
per source, read instead of the run's rows, its rows read where a run has none, checked by
verify."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_exactly_once import make_images, write_spec

from vision_ops import lock_file, outputs
from vision_ops.cli import EXIT_FAILED, EXIT_OK, main
from vision_ops.pipeline import incremental
from vision_ops.pipeline.incremental import done_sources
from vision_ops.runindex import (
    INDEX_FOLDER,
    KEY_SEPARATOR,
    index_of,
    merged,
    read_index,
    source_key,
)
from vision_ops.schema import PREDICTION_SCHEMA, STATUS_ERROR, STATUS_OK, STATUS_SKIPPED
from vision_ops.sink import ParquetSink, committed_run, committed_runs
from vision_ops.storage import StorageError

pytestmark = pytest.mark.timeout(900)
DATE = dt.date(2026, 11, 20)
# (source, units, status of each unit, error type of each unit): a 3-frame DICOM instance with
# one bad frame, a scene's tiles (one with no data), a photo, a broken photo
UNITS = [
    ("s3://b/ct.dcm", [STATUS_OK, STATUS_ERROR, STATUS_OK], [None, "CorruptDicom", None]),
    ("s3://b/scene.tif", [STATUS_OK, STATUS_SKIPPED, STATUS_OK, STATUS_OK], [None] * 4),
    ("s3://b/cat.jpg", [STATUS_OK], [None]),
    ("s3://b/html.jpg", [STATUS_ERROR], ["NotAnImage"]),
]


def unit_rows(run_id: str, units: list = UNITS) -> pa.Table:  # type: ignore[type-arg]
    """One row per unit (frame, tile, photo) of `units`, each source with its own ETag."""
    columns: dict[str, list] = {name: [] for name in ("source_uri", "status", "error_type")}  # type: ignore[type-arg]
    columns |= {"item_id": [], "frame_index": [], "source_etag": []}
    for uri, statuses, kinds in units:
        for index, (status, kind) in enumerate(zip(statuses, kinds, strict=True)):
            columns["source_uri"].append(uri)
            columns["source_etag"].append(f"etag-{uri[-7:]}")
            columns["item_id"].append(f"{uri}#{index}")
            columns["frame_index"].append(index)
            columns["status"].append(status)
            columns["error_type"].append(kind)
    count = len(columns["item_id"])
    fixed = {
        "run_id": [run_id] * count,
        "model_name": ["m"] * count,
        "task": ["classification"] * count,
    }
    columns |= fixed | {"model_weights_sha256": ["h"] * count}
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(count, f.type)
        for f in PREDICTION_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=PREDICTION_SCHEMA)


def key(uri: str) -> str:
    return source_key(uri, f"etag:etag-{uri[-7:]}")


def commit(root: Path, run_id: str, rows: pa.Table, date: dt.date = DATE) -> ParquetSink:
    sink = ParquetSink(str(root), run_id, date, PREDICTION_SCHEMA, rows_per_file=2)
    sink.write(rows)
    sink.commit(None, {"model_fingerprint": "f" * 64})
    return sink


def as_dict(index: pa.Table) -> dict[str, set[str]]:
    pairs = zip(index["source_key"].to_pylist(), index["error_types"].to_pylist(), strict=True)
    return {source: set(types) for source, types in pairs}


EXPECTED = {
    key("s3://b/ct.dcm"): {"CorruptDicom"},
    key("s3://b/scene.tif"): set(),
    key("s3://b/cat.jpg"): set(),
    key("s3://b/html.jpg"): {"NotAnImage"},
}


def test_a_commit_writes_one_index_row_per_source_named_in_its_manifest(tmp_path) -> None:
    """9 units in 5 part files of 2 rows (sources split across files): 4 index rows."""
    sink = commit(tmp_path, "n1", unit_rows("n1"))
    manifest = committed_run(str(tmp_path), "n1")
    assert manifest is not None and len(manifest["files"]) == 5
    uri = manifest["index_uri"]
    assert uri == f"file://{tmp_path}/{INDEX_FOLDER}/n1-{sink.attempt}.parquet"
    index = read_index(uri)
    assert (index.num_rows, as_dict(index)) == (4, EXPECTED)
    assert pq.read_schema(uri.removeprefix("file://")).names == ["source_key", "error_types"]
    assert not (tmp_path / "_staging").exists()  # staged, then moved in with the part files
    assert outputs.verify_run(str(tmp_path), "n1") == (manifest, [])


def test_the_index_of_parts_is_the_index_of_their_rows() -> None:
    rows = unit_rows("n1")
    parts = [index_of(rows.slice(start, 2)) for start in range(0, rows.num_rows, 2)]
    assert as_dict(merged(parts)) == as_dict(index_of(rows)) == EXPECTED
    assert merged([]).num_rows == 0 and index_of(rows.slice(0, 0)).num_rows == 0


def test_skip_errors_is_the_reading_runs(tmp_path) -> None:
    """The index keeps error types, not a retry decision: each reader applies its own."""
    commit(tmp_path, "n1", unit_rows("n1"))
    runs = committed_runs(str(tmp_path))
    retry_all = done_sources(str(tmp_path), runs, {}, [])
    assert sorted(retry_all.to_pylist()) == sorted([key("s3://b/cat.jpg"), key("s3://b/scene.tif")])
    keep_permanent = done_sources(str(tmp_path), runs, {}, ["NotAnImage"])
    assert key("s3://b/html.jpg") in keep_permanent.to_pylist()
    assert key("s3://b/ct.dcm") not in keep_permanent.to_pylist()


def test_a_rerun_replaces_the_index_and_a_failed_commit_leaves_none(tmp_path, monkeypatch) -> None:
    first = commit(tmp_path, "n1", unit_rows("n1"))
    fixed = [(uri, [STATUS_OK] * len(s), [None] * len(s)) for uri, s, _ in UNITS]
    second = commit(tmp_path, "n1", unit_rows("n1", fixed))
    index_files = sorted(path.name for path in (tmp_path / INDEX_FOLDER).iterdir())
    assert index_files == [f"n1-{second.attempt}.parquet"] != [f"n1-{first.attempt}.parquet"]
    manifest = committed_run(str(tmp_path), "n1")
    assert manifest is not None
    assert as_dict(read_index(manifest["index_uri"])) == {k: set() for k in EXPECTED}
    write = lock_file.replace_file  # how a manifest is written, over the version it replaces

    def lose_the_manifest(fs, path, data):  # type: ignore[no-untyped-def]
        if path.endswith("_manifests/n2.json"):
            raise OSError("the store went away")  # at the commit point: nothing committed
        write(fs, path, data)

    monkeypatch.setattr(lock_file, "replace_file", lose_the_manifest)
    with pytest.raises(StorageError, match="went away"):
        commit(tmp_path, "n2", unit_rows("n2"))
    assert committed_run(str(tmp_path), "n2") is None
    assert sorted(path.name for path in (tmp_path / INDEX_FOLDER).iterdir()) == index_files


def test_verify_finds_an_index_that_disagrees_with_the_rows(tmp_path, capsys) -> None:
    commit(tmp_path, "n1", unit_rows("n1"))
    manifest = committed_run(str(tmp_path), "n1")
    assert manifest is not None
    path = manifest["index_uri"].removeprefix("file://")
    index = pq.read_table(path)
    pq.write_table(
        index.filter(
            pa.array([k != key("s3://b/cat.jpg") for k in index["source_key"].to_pylist()])
        ),
        path,
    )
    _, problems = outputs.verify_run(str(tmp_path), "n1")
    assert problems == [
        "the run's index disagrees with its rows: 1 source(s) missing, 0 not in the rows, "
        "0 with other error types"
    ]
    Path(path).write_bytes(b"not parquet")
    assert main(["verify", str(tmp_path), "--run-id", "n1"]) == EXIT_FAILED
    assert "the run's index is unreadable" in capsys.readouterr().err


def first_run_of_three_photos_and_a_broken_file(
    tmp_path: Path, tiny_weights: Path
) -> tuple[Path, str]:
    """Run r1 (2026-11-20) committed over 3 photos and a broken one: the spec and the table."""
    make_images(tmp_path / "images", 3)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes((tmp_path / "images" / "img000.png").read_bytes()[:60])
    spec = write_spec(tmp_path, tiny_weights, tmp_path / "table")
    assert main(["run", str(spec), "--run-id", "r1", "--run-date", "2026-11-20"]) == EXIT_OK
    return spec, str(tmp_path / "table")


def test_incremental_reads_each_runs_index_and_the_rows_of_a_run_without_one(
    ray_local, tmp_path, tiny_weights, monkeypatch, capsys
) -> None:
    """Run 1 commits 3 photos and a broken file. Run 2 may not read any run's rows, only
    indexes: it processes exactly the broken file again. Run 2's manifest then loses its index
    (as a run committed before indexes existed): run 3 reads its rows (and run 1's index) and
    processes exactly the one new photo."""
    spec, table = first_run_of_three_photos_and_a_broken_file(tmp_path, tiny_weights)
    first = committed_run(table, "r1")
    assert first is not None and first["rows"] == 4
    assert by_uri(read_index(first["index_uri"])) == {
        **{f"img{i:03d}.png": set() for i in range(3)},
        "broken.png": {"CorruptImage"},
    }
    rows_read: list[str] = []
    reads_rows = incremental.committed_versions

    def no_row_reads(output, run, options):  # type: ignore[no-untyped-def]
        rows_read.append(run["run_id"])
        return reads_rows(output, run, options)

    monkeypatch.setattr(incremental, "committed_versions", no_row_reads)
    again = ["--run-id", "r2", "--run-date", "2026-11-21", "--incremental"]
    assert main(["run", str(spec), *again]) == EXIT_OK
    second = pq.read_table(tmp_path / "table" / "run_date=2026-11-21").to_pylist()
    assert [(Path(r["source_uri"]).name, r["error_type"]) for r in second] == [
        ("broken.png", "CorruptImage")
    ]
    assert rows_read == []
    manifest_path = tmp_path / "table" / "_manifests" / "r2.json"
    manifest = json.loads(manifest_path.read_text())
    Path(manifest.pop("index_uri").removeprefix("file://")).unlink()
    manifest_path.write_text(json.dumps(manifest))
    make_images(tmp_path / "new", 1, seed=5)
    (tmp_path / "new" / "img000.png").rename(tmp_path / "images" / "new.png")
    kept = ["--set", "run.skip_errors=[CorruptImage]", "--run-id", "r3", "--incremental"]
    assert main(["run", str(spec), *kept, "--run-date", "2026-11-22"]) == EXIT_OK
    third = pq.read_table(tmp_path / "table" / "run_date=2026-11-22").to_pylist()
    assert [Path(r["source_uri"]).name for r in third] == ["new.png"]
    assert rows_read == ["r2"]  # the run without an index, and that one only
    capsys.readouterr()


def test_an_incremental_nights_retry_of_a_broken_file_is_no_error_rate_rise(
    ray_local, tmp_path, tiny_weights, capsys
) -> None:
    """Run 1 (full) fails on a broken file among 3 photos. Each incremental night after it
    retries that file: its manifest records the retry (`retried`), and drift leaves it out of
    the error rate, which the run that first failed on it counted. Night 2 retries only: no
    figures, and `report --check` passes (the retry alone read as an error rate of 1.0, over
    the threshold, every night). Night 3 adds a photo: its error rate is the new photo's.
    --max-error-ratio leaves the retries out as well (the file failed nights 2 and 3 at 0.4:
    1 error row in 1, then in 2)."""
    spec, table = first_run_of_three_photos_and_a_broken_file(tmp_path, tiny_weights)
    assert "retried" not in (committed_run(table, "r1") or {})  # a full run retries nothing
    bound = ["--max-error-ratio", "0.4"]
    nightly = ["--incremental", "--run-id", "r2", "--run-date", "2026-11-21", *bound]
    assert main(["run", str(spec), *nightly]) == EXIT_OK
    second = committed_run(table, "r2")
    assert second is not None and second["rows"] == 1 and second["errors"] == 1
    assert second["retried"] == {"sources": 1, "units": 1, "error_rows": 1, "skipped": 0}
    out = capsys.readouterr().out
    assert "1 input(s) retried (error rows of earlier runs)" in out
    assert "drift: no figures (the run processed no new input" in out
    assert main(["report", table, "--check"]) == EXIT_OK
    assert main(["report", table]) == EXIT_OK
    report = capsys.readouterr().out
    assert "errors: 1  (retried: 1 input(s) with earlier error rows, 1 error row(s) again)" in (
        report
    )
    make_images(tmp_path / "new", 1, seed=5)
    (tmp_path / "new" / "img000.png").rename(tmp_path / "images" / "new.png")
    nightly = ["--incremental", "--run-id", "r3", "--run-date", "2026-11-22", *bound]
    assert main(["run", str(spec), *nightly]) == EXIT_OK
    third = committed_run(table, "r3")
    assert third is not None and (third["rows"], third["errors"]) == (2, 1)
    assert third["retried"] == {"sources": 1, "units": 1, "error_rows": 1, "skipped": 0}
    # 0 errors in 1 new photo, against run 1's 1 in 4 (run 2, of retries alone, is no baseline)
    assert third["drift"]["error_rate_rise"]["value"] == -0.25
    assert third["drift"]["compared"] == ["r1"]
    assert main(["report", table, "--check", "--max-label-psi", "99", "--max-score-psi", "99"]) == (
        EXIT_OK
    )
    assert "error_rate_rise -0.2500 within" in capsys.readouterr().out


def by_uri(index: pa.Table) -> dict[str, set[str]]:
    """An index by file name (a key's URI, before its version)."""
    return {Path(k.split(KEY_SEPARATOR)[0]).name: v for k, v in as_dict(index).items()}


def test_incremental_skips_the_inputs_of_a_manifest_that_names_uris_only(
    ray_local, tmp_path, tiny_weights, capsys
) -> None:
    """A manifest of URIs alone (no ETag, no size): a run's rows record the store's identity
    of each input, and an incremental run asks the store the same, so the second night
    processes nothing (its date's _SUCCESS written all the same) and the third exactly the photo
    that changed."""
    make_images(tmp_path / "images", 3)
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("".join(f"{p}\n" for p in sorted((tmp_path / "images").glob("*.png"))))
    spec = write_spec(tmp_path, tiny_weights, tmp_path / "table")
    uris_only = ["--set", "input.uris=[]", "--set", f"input.manifest={manifest}"]
    first = ["--run-id", "n1", "--run-date", DATE.isoformat()]
    assert main(["run", str(spec), *uris_only, *first]) == EXIT_OK
    nightly = [*uris_only, "--incremental"]
    assert main(["run", str(spec), *nightly, "--run-id", "n2", "--run-date", "2026-11-21"]) == 0
    assert committed_run(str(tmp_path / "table"), "n2")["rows"] == 0
    assert (tmp_path / "table" / "run_date=2026-11-21" / "_SUCCESS").exists()  # none: no folder
    changed = tmp_path / "images" / "img001.png"
    make_images(tmp_path / "again", 1, seed=7)
    changed.write_bytes((tmp_path / "again" / "img000.png").read_bytes() + b"\0")  # another size
    assert main(["run", str(spec), *nightly, "--run-id", "n3", "--run-date", "2026-11-22"]) == 0
    third = pq.read_table(tmp_path / "table" / "run_date=2026-11-22").to_pylist()
    assert [Path(r["source_uri"]).name for r in third] == ["img001.png"]
    rewritten = tmp_path / "images" / "img002.png"  # new pixels, the same size (local disk:
    make_images(tmp_path / "other", 1, seed=8)  # no ETag, so the version is size and mtime)
    photo = (tmp_path / "other" / "img000.png").read_bytes()
    assert len(photo) == rewritten.stat().st_size and photo != rewritten.read_bytes()
    before = rewritten.stat().st_mtime
    rewritten.write_bytes(photo)
    os.utime(rewritten, (before + 10, before + 10))  # however coarse the clock
    assert main(["run", str(spec), *nightly, "--run-id", "n4", "--run-date", "2026-11-23"]) == 0
    fourth = pq.read_table(tmp_path / "table" / "run_date=2026-11-23").to_pylist()
    assert [Path(r["source_uri"]).name for r in fourth] == ["img002.png"]
    mtime = fourth[0]["source_mtime"].timestamp()
    assert fourth[0]["source_size"] == len(photo) and mtime == pytest.approx(before + 10)
    capsys.readouterr()


def test_a_run_of_a_default_id_warns_of_another_run_of_its_date(
    ray_local, tmp_path, tiny_weights, caplog
) -> None:
    """A run without --run-id on a date that holds a committed run of another id (another
    spec's digest) says it is added beside it; with --run-id it does not (the user chose)."""
    from committed_rows import classified, commit_rows

    make_images(tmp_path / "images", 1)
    table = tmp_path / "table"
    earlier = [classified("/x/a.jpg", ("cat", 0.9))]
    commit_rows(table, "classification", earlier, "2026-11-20-aaaaaaaa", "2026-11-20")
    spec = write_spec(tmp_path, tiny_weights, table)
    with caplog.at_level("WARNING", logger="vision_ops.pipeline.run"):
        assert main(["run", str(spec), "--run-date", "2026-11-20"]) == EXIT_OK
        assert main(["run", str(spec), "--run-date", "2026-11-20", "--run-id", "named"]) == 0
    beside = [r.getMessage() for r in caplog.records if "added beside them" in r.getMessage()]
    assert len(beside) == 1 and "holds committed run(s) 2026-11-20-aaaaaaaa" in beside[0]
    assert len(committed_runs(str(table))) == 3
