"""Resuming a run that did not commit: what its earlier attempts made durable is checked and
reused, whole sources only, each unit once; the rest is processed (counted at the model)."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from process_session import kill_session
from ray_temp_root import short_temp_dir
from test_exactly_once import make_images

from vision_ops import outputs
from vision_ops.cli import EXIT_OK, main
from vision_ops.config import OutputSpec
from vision_ops.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_TOO_MANY_ERRORS
from vision_ops.iceberg import IcebergSink
from vision_ops.masks import final_masks_folder, staged_masks_folder
from vision_ops.query import connect, register_views
from vision_ops.resume import RESUME_KEY, image_units
from vision_ops.schema import PREDICTION_SCHEMA, STATUS_OK, item_id, output_schema
from vision_ops.sink import CommitRefused, ParquetSink, committed_run, verify_run
from vision_ops.storage import canonical_uri, make_folder

DATE = dt.date(2026, 11, 24)
KEY = "k" * 64


def source_rows(uris: list[str], frames: dict[str, int] | None = None) -> pa.Table:
    """One ok row per image, or per frame of the sources `frames` names."""
    rows = []
    for uri in uris:
        count = (frames or {}).get(uri)
        for frame in range(count or 1):
            unit = item_id(uri, frame) if count else item_id(uri)
            rows.append({"item_id": unit, "source_uri": uri, "frame_count": count, "frame": frame})
    n = len(rows)
    columns = {
        "run_id": ["r1"] * n,
        "item_id": [r["item_id"] for r in rows],
        "source_uri": [r["source_uri"] for r in rows],
        "frame_count": [r["frame_count"] for r in rows],
        "frame_index": [None if r["frame_count"] is None else r["frame"] for r in rows],
        "model_name": ["m"] * n,
        "model_weights_sha256": ["h"] * n,
        "task": ["classification"] * n,
        "status": [STATUS_OK] * n,
        "score": np.linspace(0, 1, n, dtype=np.float32),
    }
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
        for f in PREDICTION_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=PREDICTION_SCHEMA)


def sink(root: Path, key: str = KEY, **options: Any) -> ParquetSink:
    settings = {"durable_every_rows": 2, "durable_every_s": 3600.0} | options
    return ParquetSink(
        str(root), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=4, resume_key=key, **settings
    )


URIS = [f"file:///x/{i}.jpg" for i in range(6)]


def crashed_attempt(root: Path, uris: list[str], **options: Any) -> ParquetSink:
    """An attempt that wrote `uris` (durably, every 2 rows) and died before its commit."""
    attempt = sink(root, **options)
    attempt.resume(image_units)
    rows = source_rows(uris)
    for row in range(rows.num_rows):  # as batches arrive, one row each
        attempt.write(rows.slice(row, 1))
    return attempt


def staged(root: Path) -> list[Path]:
    return sorted((root / "_staging" / "r1").glob("*/part-*.parquet"))


def test_rows_are_durable_every_so_many_rows_and_carry_the_resume_key(tmp_path: Path) -> None:
    crashed_attempt(tmp_path, URIS[:5])
    files = staged(tmp_path)
    assert [pq.read_metadata(f).num_rows for f in files] == [2, 2]  # the 5th is not yet due
    assert all(pq.read_schema(f).metadata[RESUME_KEY.encode()] == KEY.encode() for f in files)
    every_write = sink(tmp_path / "b", durable_every_rows=1000, durable_every_s=0.0)
    every_write.write(source_rows(URIS[:1]))
    assert len(staged(tmp_path / "b")) == 1  # the seconds bound: due at once


def test_a_rerun_reuses_the_sources_an_earlier_attempt_made_durable(tmp_path: Path) -> None:
    crashed_attempt(tmp_path, URIS[:5])  # 4 rows durable, the 5th lost with the attempt
    rerun = sink(tmp_path)
    done = rerun.resume(image_units)
    assert done == frozenset(URIS[:4]) and rerun.resumed == 4
    assert len(staged(tmp_path)) == 2 and all(rerun.attempt in str(f) for f in staged(tmp_path))
    rerun.write(source_rows(URIS[4:]))  # what is left: the 5th and 6th
    result = rerun.commit(URIS)
    assert (result.rows, result.resumed) == (6, 4)
    manifest = committed_run(str(tmp_path), "r1")
    assert (manifest["resumed_units"], manifest["processed_units"]) == (4, 2)
    assert verify_run(str(tmp_path), "r1")[1] == []
    parts = sorted((tmp_path / "run_date=2026-11-24").glob("*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts] == [4, 2]  # compacted to rows_per_file
    assert not (tmp_path / "_staging").exists()


def test_a_part_file_of_another_spec_model_or_inputs_is_never_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crashed_attempt(tmp_path, URIS[:4])
    rerun = sink(tmp_path, key="other" * 10)
    with caplog.at_level(logging.WARNING, logger="vision_ops.resume"):
        assert rerun.resume(image_units) == frozenset() and rerun.resumed == 0
    assert "was made by another spec, model, input snapshot or run date" in caplog.text
    assert "the run starts over" in caplog.text
    assert staged(tmp_path) == []  # the earlier attempt's files are gone


def test_a_weights_or_labels_file_replaced_in_place_makes_another_resume_key(
    tmp_path: Path,
) -> None:
    """The spec names the same paths; the store's versions of the files differ (retrained
    weights published over the old ones between a kill and its rerun): the rerun's key is
    not the killed attempt's, so its rows are not reused beside the new model's."""
    from vision_ops.config import parse_spec
    from vision_ops.pipeline.identity import model_files_digest

    weights, labels = tmp_path / "model.pt", tmp_path / "labels.txt"
    weights.write_bytes(b"old weights")
    labels.write_text("cat\ndog\n")
    spec = parse_spec({
        "input": {"uris": [str(tmp_path / "images")]},
        "model": {"kind": "torchvision", "architecture": "resnet18", "weights": str(weights),
                  "num_classes": 2, "labels": str(labels)},
        "task": {"kind": "classification"},
        "output": {"uri": str(tmp_path / "out")},
    })  # fmt: skip
    assert spec.model.files() == {"weights": str(weights), "labels": str(labels)}
    before = model_files_digest(spec)
    weights.write_bytes(b"old weights")  # copied afresh as a node starts: a new mtime only
    os.utime(weights, (1e9, 1e9))
    assert model_files_digest(spec) == before  # the same content: the same key, resumable
    weights.write_bytes(b"new weights")  # the same size: on local disk the content tells
    after_weights = model_files_digest(spec)
    labels.write_text("cat\nfox\n")
    assert len({before, after_weights, model_files_digest(spec)}) == 3
    enum = spec.model.model_copy(update={"weights": "DEFAULT", "labels": "imagenet-1k"})
    assert enum.files() == {}  # a weights enum's name and a built-in label set are no file


def test_a_model_file_whose_version_cannot_be_read_stops_the_run_before_any_work() -> None:
    """Not a version left unknown (another resume key: the staged rows would be discarded)."""
    from vision_ops.pipeline.identity import model_file_version
    from vision_ops.storage import StorageError

    with pytest.raises(StorageError, match="the model file's version cannot be read"):
        model_file_version("/nonexistent/model.pt", {})


def test_a_file_cut_short_by_the_kill_is_left_out(tmp_path: Path) -> None:
    crashed_attempt(tmp_path, URIS[:4])
    torn = staged(tmp_path)[-1]
    torn.write_bytes(torn.read_bytes()[:100])
    rerun = sink(tmp_path)
    assert rerun.resume(image_units) == frozenset(URIS[:2])


class Throttled:
    """A filesystem whose store refuses to read one file for now, as S3 throttling does
    (s3fs raises it as an OSError with an errno)."""

    def __init__(self, fs: Any, name: str) -> None:
        self._fs, self._name = fs, name

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if path.endswith(self._name) and "r" in mode:
            raise OSError(errno.EIO, "SlowDown: Please reduce your request rate.")
        return self._fs.open(path, mode, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def test_a_staged_file_the_store_will_not_read_now_fails_the_rerun_and_is_kept(
    tmp_path: Path,
) -> None:
    """Only a file cut short is left out (and removed): one the store refuses for now fails the
    rerun before anything is removed, and the next rerun resumes from all of it."""
    from vision_ops.storage import StorageError

    crashed_attempt(tmp_path, URIS[:4])
    files = staged(tmp_path)
    rerun = sink(tmp_path)
    rerun.parts.fs = Throttled(rerun.parts.fs, f"{files[-1].parent.name}/{files[-1].name}")
    expected = r"cannot be read to resume from them \(\[Errno 5\] SlowDown: .*\); they are kept"
    with pytest.raises(StorageError, match=expected):
        rerun.resume(image_units)
    assert staged(tmp_path) == files
    again = sink(tmp_path)
    assert again.resume(image_units) == frozenset(URIS[:4]) and again.resumed == 4


def test_a_source_is_resumed_only_whole(tmp_path: Path) -> None:
    """A DICOM instance of 3 frames with 2 made durable is processed again whole; its 2 rows
    are not reused (else the rerun would write them twice)."""
    ct, photo = "file:///x/ct.dcm", URIS[0]
    attempt = sink(tmp_path)
    attempt.resume(image_units)
    rows = source_rows([photo, ct], frames={ct: 3})
    attempt.write(rows.slice(0, 3))  # the photo and 2 frames: durable; the 3rd frame lost
    rerun = sink(tmp_path)
    assert rerun.resume(image_units) == frozenset([photo]) and rerun.resumed == 1
    rerun.write(source_rows([ct], frames={ct: 3}))
    assert rerun.commit([photo, ct]).rows == 4


def test_a_source_with_an_error_row_is_processed_again(tmp_path: Path) -> None:
    """An error row may be the store's, for the moment (a timeout): a rerun sends its source
    to the model again, and reuses the ok rows beside it."""
    failed, photo = URIS[0], URIS[1]
    rows = source_rows([failed, photo])
    status = pa.array(["error", STATUS_OK])
    attempt = sink(tmp_path)
    attempt.resume(image_units)
    attempt.write(rows.set_column(rows.schema.get_field_index("status"), "status", status))
    rerun = sink(tmp_path)
    assert rerun.resume(image_units) == frozenset([photo]) and rerun.resumed == 1
    rerun.write(source_rows([failed]))
    assert rerun.commit([failed, photo]).errors == 0


def test_staged_rows_of_other_units_than_planned_are_not_reused(tmp_path: Path) -> None:
    """As many staged units as the plan has, but not the ones it has (a DICOM instance read
    as frames 0 and 2 of 2): the ids decide, not the count."""
    ct = "file:///x/ct.dcm"
    rows = source_rows([ct], frames={ct: 3}).take([0, 2])
    rows = rows.set_column(rows.schema.get_field_index("frame_count"), "frame_count",
                           pa.array([2, 2], pa.int32()))  # fmt: skip
    attempt = sink(tmp_path)
    attempt.resume(image_units)
    attempt.write(rows)
    assert sink(tmp_path).resume(image_units) == frozenset()


def test_rows_staged_twice_by_killed_attempts_count_once(tmp_path: Path) -> None:
    """An attempt killed while staging an earlier one's rows again leaves them twice."""
    crashed_attempt(tmp_path, URIS[:4])
    first = staged(tmp_path)[0]
    copy = tmp_path / "_staging" / "r1" / "zzzz" / "part-00000.parquet"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    rerun = sink(tmp_path)
    assert rerun.resume(image_units) == frozenset(URIS[:4]) and rerun.resumed == 4
    rerun.write(source_rows(URIS[4:]))
    assert rerun.commit(URIS).rows == 6  # the exactly-once check passed


@pytest.mark.s3
def test_an_iceberg_rerun_commits_what_an_earlier_attempt_staged(iceberg_s3: Any) -> None:
    """The Iceberg sink stages as the Parquet one does (beside the table); the rerun's one
    snapshot holds the resumed rows and its own, each once, and its summary counts both."""
    from pyiceberg.catalog import load_catalog

    name = f"resume_sink_{time.monotonic_ns()}"
    output = OutputSpec(
        format="iceberg",
        uri=f"s3://out/{name}",
        table=f"tests.{name}",
        catalog=iceberg_s3.catalog_properties(),
    )

    def iceberg_sink() -> IcebergSink:
        options = {"s3": iceberg_s3.storage_options()}
        settings = {"durable_every_rows": 2, "durable_every_s": 3600.0, "resume_key": KEY}
        return IcebergSink(output, "r1", DATE, PREDICTION_SCHEMA, options, **settings)

    attempt = iceberg_sink()
    attempt.resume(image_units)
    rows = source_rows(URIS[:5])
    for row in range(rows.num_rows):
        attempt.write(rows.slice(row, 1))  # 4 durable, the 5th lost with the attempt
    rerun = iceberg_sink()
    assert rerun.resume(image_units) == frozenset(URIS[:4]) and rerun.resumed == 4
    rerun.write(source_rows(URIS[4:]))
    result = rerun.commit(URIS, {"spec_digest": "s" * 64})
    assert (result.rows, result.resumed) == (6, 4)
    table = load_catalog("independent", **output.catalog).load_table(output.table)
    assert [s.summary["vision_ops.resumed_units"] for s in table.snapshots()] == ["4"]
    assert table.current_snapshot().summary["vision_ops.processed_units"] == "2"
    committed = table.scan(selected_fields=("item_id", "source_uri")).to_arrow()
    assert sorted(committed["source_uri"].to_pylist()) == URIS  # each once
    assert outputs.verify_run(output, "r1")[1] == []
    assert rerun.fs.glob(f"{rerun.root}/_staging/r1/*/part-*") == []


def segmentation_rows(uris: list[str], masks: str) -> pa.Table:
    """One ok segmentation row per image, naming its mask in the committed folder `masks`."""
    schema = output_schema("segmentation")
    base = source_rows(uris)
    n = len(uris)
    columns = {name: base[name] for name in base.column_names if name in schema.names}
    columns["task"] = pa.array(["segmentation"] * n)
    columns["mask_uri"] = pa.array([f"{masks}/{item}.png" for item in base["item_id"].to_pylist()])
    arrays = [columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
              for f in schema]  # fmt: skip
    return pa.Table.from_arrays(arrays, schema=schema)


def stage_masked_rows(sink: Any, uris: list[str], first: int) -> None:
    """As a segmentation run does: each image's mask staged by a worker, then its row, one at
    a time (mask `i` holds b"mask i")."""
    staged = staged_masks_folder(sink.root, "r1", sink.attempt)
    final = canonical_uri(sink.fs, final_masks_folder(sink.root, "r1", DATE, sink.attempt))
    make_folder(sink.fs, staged)
    for index, uri in enumerate(uris, start=first):
        sink.fs.pipe_file(f"{staged}/{item_id(uri)}.png", f"mask {index}".encode())
        sink.write(segmentation_rows([uri], final))


def test_a_copied_segmentation_table_reads_its_own_masks(tmp_path: Path) -> None:
    """The rows name the original's masks (their `mask_uri`); read through a copy's manifest
    they name the copy's, which hold the same masks, with the original gone."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    sink = ParquetSink(str(original), "r1", DATE, output_schema("segmentation"))
    stage_masked_rows(sink, URIS[:3], first=0)
    sink.commit()
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    run = committed_run(str(copy), "r1")
    masks = outputs.read_run(str(copy), run)["mask_uri"].to_pylist()
    assert [uri.rpartition("/")[0] for uri in masks] == [run["masks_folder"]] * 3
    assert run["masks_folder"].startswith(f"file://{copy}/_masks/run_date=2026-11-24/r1/")
    assert [Path(uri.removeprefix("file://")).read_bytes() for uri in masks] == [
        b"mask 0",
        b"mask 1",
        b"mask 2",
    ]
    connection = connect({})
    register_views(connection, str(copy))
    queried = connection.sql("SELECT mask_uri FROM predictions ORDER BY mask_uri").fetchall()
    assert [uri for (uri,) in queried] == sorted(masks)  # `query` too: the copy's masks


def segmentation_sinks(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[Callable[[], Any], Any]:
    """A maker of resumable segmentation sinks of run r1 on a Parquet or an Iceberg table,
    and the table (as outputs.* take it)."""
    schema = output_schema("segmentation")
    settings = {"durable_every_rows": 2, "durable_every_s": 3600.0, "resume_key": KEY}
    if kind == "parquet":
        return (
            lambda: ParquetSink(str(tmp_path), "r1", DATE, schema, rows_per_file=4, **settings),
            str(tmp_path),
        )
    server = request.getfixturevalue("iceberg_s3")
    name = f"resume_masks_{time.monotonic_ns()}"
    output = OutputSpec(format="iceberg", uri=f"s3://out/{name}", table=f"tests.{name}",
                        catalog=server.catalog_properties())  # fmt: skip
    options = {"s3": server.storage_options()}
    return lambda: IcebergSink(output, "r1", DATE, schema, options, **settings), output


@pytest.mark.parametrize("kind", ["parquet", "iceberg"])
def test_a_segmentation_commit_refused_before_its_commit_point_leaves_all_to_resume(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The commit fails after the masks were published (here: the lock found lost): the masks
    go back with the rows into the attempt's staging, and the rerun resumes every source."""
    new_sink, target = segmentation_sinks(kind, tmp_path, request)
    attempt = new_sink()
    attempt.resume(image_units)
    stage_masked_rows(attempt, URIS, first=0)

    def lost() -> None:
        raise CommitRefused("the run's lock was taken over")

    with pytest.raises(CommitRefused, match="lock was taken over"):
        attempt.commit(URIS, held=lost)
    assert outputs.committed_run(target, "r1") is None
    rerun = new_sink()
    assert rerun.resume(image_units) == frozenset(URIS) and rerun.resumed == 6
    rows = rerun.staged(["source_uri", "mask_uri"]).to_pylist()
    rerun.fs.invalidate_cache()
    staged = staged_masks_folder(rerun.root, "r1", rerun.attempt)
    assert sorted(path.rpartition("/")[2] for path in rerun.fs.ls(staged)) == sorted(
        f"{item_id(uri)}.png" for uri in URIS
    )
    assert len(rows) == 6
    result = rerun.commit(URIS)
    assert (result.rows, result.resumed) == (6, 6)


@pytest.mark.parametrize("kind", ["parquet", "iceberg"])
def test_a_segmentation_run_stopped_inside_its_commit_leaves_all_to_resume(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """Stopped after its masks were published, before the commit point, with no undo (a
    SIGKILL; Ctrl-C's KeyboardInterrupt is no Exception): the rerun resumes every source with
    its mask (an Iceberg rerun found the masks moved out of staging and resumed none)."""
    new_sink, target = segmentation_sinks(kind, tmp_path, request)
    attempt = new_sink()
    attempt.resume(image_units)
    stage_masked_rows(attempt, URIS, first=0)

    def stopped() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attempt.commit(URIS, held=stopped)
    assert outputs.committed_run(target, "r1") is None
    rerun = new_sink()
    assert rerun.resume(image_units) == frozenset(URIS) and rerun.resumed == 6
    result = rerun.commit(URIS)
    assert (result.rows, result.resumed) == (6, 6)
    run = outputs.committed_run(target, "r1")
    rows = outputs.read_run(target, run, columns=["source_uri", "mask_uri"]).to_pylist()
    rerun.fs.invalidate_cache()
    masks = {row["source_uri"]: rerun.fs.cat_file(row["mask_uri"]) for row in rows}
    assert masks == {uri: f"mask {index}".encode() for index, uri in enumerate(URIS)}


class Killed(BaseException):
    """A SIGKILL, in process: nothing after it runs, no `except Exception` undoes anything."""


def killed(*_args: Any, **_kwargs: Any) -> None:
    raise Killed


@pytest.mark.parametrize(
    "step",
    ["IcebergSink._remove_masks_of", "_remove_index", "remove_attempt"],
)
def test_the_same_run_after_a_kill_past_its_iceberg_snapshot_is_that_commit(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Killed after its snapshot (the commit point), at each step of its tidying up: the
    same run again (its resume key) tidies up for it and is that commit, with nothing
    processed (before, it resumed every row and committed them again in a new snapshot); the
    replaced commit's masks and index go. A rerun of another key, or after a whole commit,
    is a run as ever."""
    import vision_ops.iceberg

    new_sink, target = segmentation_sinks("iceberg", tmp_path, request)
    replaced = new_sink()
    stage_masked_rows(replaced, URIS, first=0)
    replaced.commit(URIS)
    attempt = new_sink()
    assert attempt.finished_earlier is None  # a run committed whole: replaced as ever
    stage_masked_rows(attempt, URIS, first=10)
    with monkeypatch.context() as patched:
        owner, _, name = step.rpartition(".")
        module = vision_ops.iceberg
        patched.setattr(getattr(module, owner) if owner else module, name, killed)
        with pytest.raises(Killed):
            attempt.commit(URIS)
    run = outputs.committed_run(target, "r1")
    assert run is not None and run["attempt"] == attempt.attempt
    options = {"s3": request.getfixturevalue("iceberg_s3").storage_options()}
    other = IcebergSink(target, "r1", DATE, output_schema("segmentation"), options,
                        resume_key="another" * 8)  # fmt: skip
    assert other.finished_earlier is None
    again = new_sink()
    result = again.finished_earlier
    assert result is not None
    assert (result.rows, result.ok, result.errors, result.resumed) == (6, 6, 0, 6)
    assert sorted(result.files) == sorted(entry["uri"] for entry in run["files"])
    assert outputs.committed_run(target, "r1")["snapshot_id"] == run["snapshot_id"]  # no new one
    fs = again.fs
    fs.invalidate_cache()
    staged = f"{again.root}/_staging/r1/{attempt.attempt}"
    assert fs.glob(f"{staged}/*.parquet") + fs.glob(f"{staged}/_masks/*") == []
    masks_of = final_masks_folder(again.root, "r1", DATE, attempt.attempt).rpartition("/")[0]
    published = {path.rpartition("/")[0].rpartition("/")[2] for path in fs.glob(f"{masks_of}/*/*")}
    assert published == {attempt.attempt}  # the replaced commit's masks gone
    indexes = [path.rpartition("/")[2] for path in fs.find(f"{again.root}/_index")]
    assert indexes == [f"r1-{attempt.attempt}.parquet"]  # the replaced commit's gone
    rows = outputs.read_run(target, run, columns=["source_uri", "mask_uri"]).to_pylist()
    masks = {row["source_uri"]: fs.cat_file(row["mask_uri"]) for row in rows}
    assert masks == {uri: f"mask {index}".encode() for index, uri in enumerate(URIS, start=10)}
    assert new_sink().finished_earlier is None  # tidied up: a rerun now is a run as ever


@pytest.mark.parametrize("kind", ["parquet", "iceberg"])
def test_a_segmentation_rerun_reuses_rows_with_their_masks(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The masks of reused rows move into the rerun's staging and the rows name them where the
    rerun commits them; a row whose mask is not there keeps its source out of the resume."""
    new_sink, target = segmentation_sinks(kind, tmp_path, request)
    attempt = new_sink()
    attempt.resume(image_units)
    stage_masked_rows(attempt, URIS[:5], first=0)  # rows 0-3 durable, 4 lost (its mask staged)
    staged = staged_masks_folder(attempt.root, "r1", attempt.attempt)
    attempt.fs.rm_file(f"{staged}/{item_id(URIS[3])}.png")  # a durable row's mask missing
    rerun = new_sink()
    assert rerun.resume(image_units) == frozenset(URIS[:3]) and rerun.resumed == 3
    stage_masked_rows(rerun, URIS[3:], first=3)
    result = rerun.commit(URIS)
    assert (result.rows, result.resumed) == (6, 3)
    run = outputs.committed_run(target, "r1")
    rows = outputs.read_run(target, run, columns=["source_uri", "mask_uri"]).to_pylist()
    fs = rerun.fs
    fs.invalidate_cache()
    final = final_masks_folder(rerun.root, "r1", DATE, rerun.attempt)
    for row in rows:
        index = URIS.index(row["source_uri"])
        assert row["mask_uri"] == canonical_uri(fs, f"{final}/{item_id(row['source_uri'])}.png")
        assert fs.cat_file(row["mask_uri"]) == f"mask {index}".encode()
    assert len(rows) == 6 and len(fs.ls(final)) == 6
    left = fs.find(f"{rerun.root}/_staging/r1") if fs.exists(f"{rerun.root}/_staging/r1") else []
    assert [path for path in left if path.endswith((".parquet", ".png"))] == []  # none staged


# --- the whole job: the driver killed at 70 %, then the same command again ----------------


def counting_spec(
    folder: Path,
    output: dict[str, Any],
    marks: Path,
    runtime: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    spec = {
        "input": {"uris": [str(folder / "images")]},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "crashing:count_images",
            "kwargs": {"marks": str(marks), "seconds": 0.3},
            "preprocessing": {"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "task": {"kind": "classification", "top_k": 1},
        "runtime": {
            "batch_size": 2,
            "read_batch_size": 2,
            "max_actors": 1,
            "durable_every_rows": 4,
        }
        | (runtime or {}),
        "output": output | {"rows_per_file": 100},
        "run": {"id": "k1", "date": "2026-11-24"},
        **extra,
    }
    path = folder / f"job-{len(list(folder.glob('job*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def images_counted(marks: Path) -> int:
    return sum(int(mark.read_text()) for mark in marks.iterdir())


def durable_rows(fs: Any, staging: str) -> int:
    total = 0
    for path in fs.glob(f"{staging}/*/part-*.parquet"):
        try:
            with fs.open(path, "rb") as handle:
                total += pq.read_metadata(handle).num_rows
        except Exception:  # being written
            continue
    return total


def kill_at(spec: Path, fs: Any, staging: str, rows: int) -> None:
    """Run the spec in a driver process of its own and SIGKILL it (and its Ray) once `rows`
    rows are durable."""
    stop_at(spec, fs, staging, rows, signal.SIGKILL, spec.with_suffix(".log"))


def stop_at(spec: Path, fs: Any, staging: str, rows: int, how: int, log: Path) -> int:
    """Run the spec in a driver process of its own; once `rows` rows are durable send it `how`:
    SIGKILL to the driver and every process of its Ray (its session), any other signal to the
    driver alone (SIGINT as Ctrl-C, SIGTERM as a scheduler). Returns the driver's exit status;
    its output is in `log`."""
    ray_temp = short_temp_dir("vor")
    driver = start_driver(spec, log, ray_temp)
    try:
        deadline = time.monotonic() + 240
        while durable_rows(fs, staging) < rows:
            assert driver.poll() is None, "the run ended before it could be stopped"
            assert time.monotonic() < deadline, f"{rows} durable rows never appeared"
            fs.invalidate_cache()
            time.sleep(0.05)
        if how == signal.SIGKILL:
            kill_session(driver.pid)  # the driver, its Ray and the actors, in their own groups
        else:
            driver.send_signal(how)
        return driver.wait(timeout=120)
    finally:
        kill_session(driver.pid)  # whatever of its Ray is left
        shutil.rmtree(ray_temp, ignore_errors=True)


def start_driver(spec: Path, log: Path, ray_temp: Path) -> subprocess.Popen[bytes]:
    """`vision-ops run SPEC` in a driver process of its own (a session of its own, its Ray's
    temp root `ray_temp`), its output unbuffered in `log`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(ray_temp), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "vision_ops.cli", "run", str(spec)]
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def store_for(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    """Where a resume test's run writes: a local folder, SeaweedFS, or an Iceberg table on
    SeaweedFS's catalog (its rows staged beside it under `out`)."""
    import fsspec

    if store == "local":
        output: dict[str, Any] = {"uri": str(tmp_path / "table")}
        return Store(output, {}, fsspec.filesystem("file"), str(tmp_path / "table"))
    server = request.getfixturevalue("iceberg_s3" if store == "iceberg" else "seaweed")
    options = {"s3": server.storage_options()}
    name = f"resume_{tmp_path.name.replace('-', '_')}"
    output = {"uri": f"s3://out/{name}"}
    if store == "iceberg":
        output |= {"format": "iceberg", "table": f"tests.{name}"}
        output |= {"catalog": server.catalog_properties()}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options["s3"])
    return Store(output, options, fs, OutputSpec(**output).files_uri.removeprefix("s3://"))


@dataclass
class Store:
    output: dict[str, Any]  # the spec's output section
    options: dict[str, Any]  # the spec's storage_options
    fs: Any  # where the rows are staged
    root: str  # where the run's own files go within `fs` (OutputSpec.files_uri)

    @property
    def target(self) -> OutputSpec:
        return OutputSpec(**self.output)


def test_a_segmentation_job_killed_at_70_percent_resumes_with_its_masks(
    ray_local: None, tmp_path: Path
) -> None:
    """The whole job, with its masks: the rerun sends only the missing units to the model, and
    every committed row names a mask of its own that is there."""
    total = 40
    make_images(tmp_path / "images", total)
    marks = tmp_path / "marks"
    marks.mkdir()
    model = {
        "kind": "entrypoint",
        "entrypoint": "crashing:count_segments",
        "kwargs": {"marks": str(marks), "seconds": 0.3},
        "preprocessing": {"resize": 48, "crop": 48, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    table = tmp_path / "table"
    spec = counting_spec(
        tmp_path, {"uri": str(table)}, marks, model=model, task={"kind": "segmentation"}
    )
    kill_at(spec, fsspec.filesystem("file"), f"{table}/_staging/k1", rows=int(0.7 * total))
    for mark in marks.iterdir():
        mark.unlink()
    assert main(["run", str(spec)]) == EXIT_OK
    manifest = committed_run(str(table), "k1")
    resumed, processed = manifest["resumed_units"], manifest["processed_units"]
    assert resumed >= int(0.7 * total) and resumed + processed == total
    assert images_counted(marks) == processed <= total - int(0.7 * total) + 4
    assert verify_run(str(table), "k1")[1] == []
    rows = pq.read_table(table / "run_date=2026-11-24", columns=["item_id", "mask_uri"])
    masks = [uri.removeprefix("file://") for uri in rows["mask_uri"].to_pylist()]
    assert rows.num_rows == total and len(set(rows["item_id"].to_pylist())) == total
    assert len(set(masks)) == total
    for path in masks:
        with Image.open(path) as mask:
            assert mask.size == (48, 48)


# The driver SIGKILLs itself as it would write the manifest: past its commit point (the
# journal fenced), its files in place.
KILLED_PAST_THE_COMMIT_POINT = """
import os, signal, sys
import vision_ops.publish as publish
publish._write_manifest = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from vision_ops.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


@pytest.mark.parametrize("rerun", ["the same run", "an incremental night"])
def test_the_same_run_after_a_kill_past_its_commit_point_processes_nothing(
    ray_local: None, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys, rerun: str
) -> None:
    """A driver killed inside its commit, past the commit point: the rerun's sink finishes
    that commit as it opens, and the run is that commit; not one image goes through the
    model again (every unit was processed again before), and the command exits 0 with the
    committed run's figures. An incremental run of another date, next, finds the killed run
    committed (settled under the lock before it reads the table) and does its inputs no
    second time (it read the table first, and did them all again)."""
    total = 12
    make_images(tmp_path / "images", total)
    marks = tmp_path / "marks"
    marks.mkdir()
    table = tmp_path / "table"
    spec = counting_spec(tmp_path, {"uri": str(table)}, marks)
    ray_temp = short_temp_dir("vor")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_TMPDIR": str(ray_temp)
    }
    command = [sys.executable, "-c", KILLED_PAST_THE_COMMIT_POINT, str(spec)]
    driver = subprocess.Popen(command, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _, err = driver.communicate(timeout=300)
    finally:
        kill_session(driver.pid)  # what its Ray left
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert driver.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert committed_run(str(table), "k1") is None  # no manifest yet: readers see no run
    assert images_counted(marks) == total
    for mark in marks.iterdir():
        mark.unlink()
    capsys.readouterr()
    if rerun == "an incremental night":
        night = {"id": "k2", "date": "2026-11-25", "incremental": True}
        spec = counting_spec(tmp_path, {"uri": str(table)}, marks, run=night)
    with caplog.at_level(logging.WARNING, logger="vision_ops.pipeline.run"):
        assert main(["run", str(spec)]) == EXIT_OK
    assert list(marks.iterdir()) == []  # the model saw nothing
    manifest = committed_run(str(table), "k1")
    assert manifest is not None and manifest["rows"] == total
    assert verify_run(str(table), "k1")[1] == []
    rows = pq.read_table(table / "run_date=2026-11-24")
    assert rows.num_rows == total and len(set(rows["item_id"].to_pylist())) == total
    if rerun == "the same run":
        assert "killed past its commit point, is the run" in caplog.text
        assert f"run k1: {total} items, {total} ok, 0 errors" in capsys.readouterr().out
    else:
        assert committed_run(str(table), "k2")["rows"] == 0
        assert pq.read_table(table).num_rows == total  # every input once, across the runs


@pytest.mark.parametrize(
    ("store", "runner", "rerun"),
    [
        ("local", "ray", "ray"),
        ("s3", "ray", "ray"),
        ("iceberg", "ray", "ray"),
        ("local", "in_process", "in_process"),
        ("local", "ray", "in_process"),
    ],
)
def test_a_driver_killed_at_70_percent_resumes_with_the_missing_30(
    ray_local: None,
    tmp_path: Path,
    store: str,
    runner: str,
    rerun: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run killed (SIGKILL, its driver and its Ray) once 70 % of its rows are durable: the
    same command processes only the rest and commits every input once, the rows a clean run's.
    In this process (`runtime.runner: in_process`) too, and a run killed on Ray resumes in
    one process: the runner is not part of the resume key."""
    total = 40
    make_images(tmp_path / "images", total)
    marks = tmp_path / "marks"
    marks.mkdir()
    where = store_for(store, tmp_path, request)
    extra: dict[str, Any] = {"storage_options": where.options} if where.options else {}
    spec = counting_spec(tmp_path, where.output, marks, {"runner": runner}, **extra)
    kill_at(spec, where.fs, f"{where.root}/_staging/k1", rows=int(0.7 * total))
    runtime = {"runner": rerun}
    if rerun != runner:
        spec = counting_spec(tmp_path, where.output, marks, runtime, **extra)
    assert outputs.committed_run(where.target, "k1", where.options) is None
    for mark in marks.iterdir():
        mark.unlink()
    with caplog.at_level(logging.INFO, logger="vision_ops.pipeline.run"):
        assert main(["run", str(spec)]) == EXIT_OK
    manifest = outputs.committed_run(where.target, "k1", where.options)
    assert manifest["runner"] == rerun
    resumed, processed = manifest["resumed_units"], manifest["processed_units"]
    assert resumed >= int(0.7 * total) and resumed + processed == total
    assert f"run k1: {processed} units to process" in caplog.text  # what compile and pool see
    durability_interval = 4
    assert images_counted(marks) == processed <= total - int(0.7 * total) + durability_interval
    assert outputs.verify_run(where.target, "k1", where.options)[1] == []
    assert manifest["rows"] == total and len(manifest["files"]) == 1  # compacted
    rows = read_back(where, manifest)
    assert rows.num_rows == total and len(set(rows["item_id"].to_pylist())) == total
    where.fs.invalidate_cache()
    assert where.fs.glob(f"{where.root}/_staging/k1/*/part-*") == []  # cleaned after the commit
    # The same rows as a run that was never killed (the model is deterministic).
    clean = counting_spec(tmp_path, {"uri": str(tmp_path / "clean")}, marks, runtime)
    assert main(["run", str(clean)]) == EXIT_OK
    clean_rows = pq.read_table(tmp_path / "clean" / "run_date=2026-11-24")
    keep = ["item_id", "label_id", "score"]
    assert (
        rows.select(keep).sort_by("item_id").to_pylist()
        == clean_rows.select(keep).sort_by("item_id").to_pylist()
    )


def test_a_sigterm_as_a_committed_run_exits_leaves_its_outcome(tmp_path: Path) -> None:
    """SIGTERM once the run has committed and said so, as the process exits (Ray shutting its
    embedded cluster down: seconds): exit 0, the outcome, with a note and no traceback. It was
    raised inside Ray's exit hook ("Exception ignored in atexit callback ... Terminated"), and
    the night exited 1 ("nothing was committed", to a scheduler) or 0 at random."""
    make_images(tmp_path / "images", 4)
    marks = tmp_path / "marks"
    marks.mkdir()
    spec = counting_spec(tmp_path, {"uri": str(tmp_path / "table")}, marks)
    ray_temp = short_temp_dir("vot")
    log = tmp_path / "driver.log"
    driver = start_driver(spec, log, ray_temp)
    try:
        deadline = time.monotonic() + 240
        while "\ndrift: " not in log.read_text():  # the run's last line: it has committed
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never said it committed"
            time.sleep(0.05)
        time.sleep(0.3)  # the command has returned; Ray shuts down for seconds
        assert driver.poll() is None, "the process exited before the SIGTERM could be sent"
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=120) == EXIT_OK
    finally:
        kill_session(driver.pid)
        shutil.rmtree(ray_temp, ignore_errors=True)
    output = log.read_text()
    assert "note: SIGTERM as the command exits; its outcome stands (exit 0)" in output
    assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
    assert committed_run(str(tmp_path / "table"), "k1")["rows"] == 4


# The driver SIGTERMs itself (`sys.argv[2]` times) once its run has committed, as the summary
# of what it committed is being said (its start-up line composed, nothing printed yet): the
# window between the commit and the summary, made certain. The command runs as `vision-ops`.
SIGTERM_AS_THE_SUMMARY_IS_SAID = """
import os, signal, sys
import vision_ops.runstats as runstats
said, signals = runstats.startup_line, int(sys.argv[2])
def startup_line(*args, **kwargs):
    for _ in range(signals):
        os.kill(os.getpid(), signal.SIGTERM)
    return said(*args, **kwargs)
runstats.startup_line = startup_line
sys.argv = ["vision-ops", "run", sys.argv[1], *sys.argv[3:]]
from vision_ops.cli import console
console()
"""


@pytest.mark.parametrize(
    ("signals", "code", "said"),
    [
        (1, EXIT_TOO_MANY_ERRORS, "note: SIGTERM after run k1 committed; its outcome stands (exit"),
        (2, EXIT_TERMINATED, "error: terminated (SIGTERM) after run k1 committed\n"),
    ],
)
def test_a_sigterm_between_the_commit_and_the_summary_leaves_the_runs_outcome(
    tmp_path: Path, signals: int, code: int, said: str
) -> None:
    """SIGTERM once the run has committed, before its summary is said: the summary is said and
    the command exits with the run's own outcome (here its error ratio's exit 4), with a note;
    it exited 143 ("terminated"), read as a night that committed nothing. A second SIGTERM
    still ends it at once, saying the run is committed."""
    make_images(tmp_path / "images", 4)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")  # one error row in five
    marks = tmp_path / "marks"
    marks.mkdir()
    spec = counting_spec(tmp_path, {"uri": str(tmp_path / "table")}, marks)
    ray_temp = short_temp_dir("vos")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(ray_temp), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", SIGTERM_AS_THE_SUMMARY_IS_SAID, str(spec), str(signals)]
    command += ["--max-error-ratio", "0.1"]
    log = tmp_path / "driver.log"
    try:
        with log.open("wb") as out:
            driver = subprocess.Popen(command, env=env, start_new_session=True,
                                      stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            assert driver.wait(timeout=240) == code, log.read_text()[-3000:]
        finally:
            kill_session(driver.pid)  # what its Ray left
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    output = log.read_text()
    assert said in output, output[-3000:]
    assert "Traceback" not in output and "nothing was committed" not in output, output[-3000:]
    if signals == 1:  # the summary and the run's own check, said in full
        assert "run k1: 5 items, 4 ok, 1 errors" in output and "\ndrift: " in output
        assert "error: error rows 1/5 (of new inputs, sent to the model) exceed" in output
        assert f"{said} 4)" in output
    manifest = committed_run(str(tmp_path / "table"), "k1")
    assert manifest is not None and (manifest["rows"], manifest["errors"]) == (5, 1)
    assert verify_run(str(tmp_path / "table"), "k1")[1] == []


@pytest.mark.parametrize("runner", ["ray", "in_process"])
@pytest.mark.parametrize(
    ("how", "code", "said"),
    [
        (signal.SIGINT, EXIT_INTERRUPTED, "interrupted"),
        (signal.SIGTERM, EXIT_TERMINATED, "terminated (SIGTERM)"),
    ],
)
def test_ctrl_c_or_sigterm_exits_with_a_message_and_the_rerun_resumes(
    ray_local: None, tmp_path: Path, how: int, code: int, said: str, runner: str
) -> None:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop, `timeout`) to the driver mid-run: exit
    130 or 143 with one line saying what to do, no traceback, the durable parts left; the same
    command then resumes from them. SIGTERM exited 15 with Ray's crash report, not a word of
    what was left. A run in one process (`runtime.runner: in_process`) stops its reading and
    predicting threads the same way."""
    import fsspec

    total = 24
    make_images(tmp_path / "images", total)
    marks = tmp_path / "marks"
    marks.mkdir()
    runtime = {"runner": runner}
    spec = counting_spec(tmp_path, {"uri": str(tmp_path / "table")}, marks, runtime)
    staging = str(tmp_path / "table" / "_staging" / "k1")
    fs = fsspec.filesystem("file")
    log = tmp_path / "driver.log"
    assert stop_at(spec, fs, staging, 12, how, log) == code
    output = log.read_text()
    assert f"error: {said}: nothing was committed" in output
    assert "the same command with --run-id k1 --run-date 2026-11-24 resumes from them" in output
    assert "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]
    left = durable_rows(fs, staging)
    assert left >= 12 and committed_run(str(tmp_path / "table"), "k1") is None
    for mark in marks.iterdir():
        mark.unlink()
    assert main(["run", str(spec)]) == EXIT_OK
    manifest = committed_run(str(tmp_path / "table"), "k1")
    assert manifest["resumed_units"] == left  # every durable row (photos: one unit each)
    assert images_counted(marks) == manifest["processed_units"] == total - manifest["resumed_units"]
    assert verify_run(str(tmp_path / "table"), "k1")[1] == []


def test_a_worker_killed_as_the_oom_killer_would_ends_exactly_once(
    ray_local: None, tmp_path: Path
) -> None:
    """SIGKILL of the predictor's process mid-run (what the kernel's or Ray's OOM killer
    sends): Ray Data restarts the actor and the run commits each unit once; where the run
    fails instead, the rerun resumes and does."""
    total = 24
    make_images(tmp_path / "images", total)
    marks = tmp_path / "marks"
    marks.mkdir()
    table = str(tmp_path / "table")
    spec = counting_spec(tmp_path, {"uri": table}, marks)
    killed: list[int] = []

    def kill_the_model_once() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            calls = sorted(marks.iterdir(), key=lambda mark: mark.stat().st_mtime_ns)
            if len(calls) >= 3:
                pid = int(calls[-1].name.split("-")[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_the_model_once)
    watcher.start()
    code = main(["run", str(spec)])
    watcher.join()
    assert killed, "the predictor was never killed"
    if code != EXIT_OK:  # the run broke off: the same command resumes it
        assert committed_run(table, "k1") is None
        assert main(["run", str(spec)]) == EXIT_OK
    pids = {mark.name.split("-")[0] for mark in marks.iterdir()}
    assert len(pids) >= 2  # the model ran again in a new process
    manifest = committed_run(table, "k1")
    assert manifest["rows"] == manifest["ok"] == total
    assert verify_run(table, "k1")[1] == []


def dicom_instances(folder: Path, count: int, frames: int) -> dict[str, Any]:
    """`count` multi-frame CT instances of `frames` frames; the spec's input section."""
    from vision_ops.synthetic import dicom_bytes, phantom_ct

    folder.mkdir()
    for index in range(count):
        slices = phantom_ct(frames=frames, size=48, seed=index)
        tags = {"RescaleSlope": 1, "RescaleIntercept": -1024}
        (folder / f"ct{index}.dcm").write_bytes(dicom_bytes(slices, tags=tags))
    return {"uris": [str(folder)], "dicom": {"window": "brain"}}


def geotiff_scenes(folder: Path, count: int, tiles: int) -> dict[str, Any]:
    """`count` GeoTIFF scenes of `tiles` 64-pixel tiles each (in a row, no nodata); the spec's
    input section."""
    import rasterio
    from rasterio.transform import from_origin

    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(count):
        profile = {
            "driver": "GTiff", "width": 64 * tiles, "height": 64, "count": 3, "dtype": "uint8",
            "crs": "EPSG:32632", "transform": from_origin(500_000, 5_000_000, 10, 10),
        }  # fmt: skip
        with rasterio.open(folder / f"scene{index}.tif", "w", **profile) as out:
            out.write(rng.integers(1, 255, (3, 64, 64 * tiles), dtype=np.uint8))
    return {"uris": [str(folder)], "tiling": {"size": 64, "value_range": [0, 255]}}


def whole_sources_staged(staging: Path, units: int) -> tuple[int, int]:
    """In the readable part files an attempt left: the units of sources held whole (each of
    `units` units) and how many sources are held only in part."""
    seen: dict[str, set[str]] = defaultdict(set)
    for path in staging.glob("*/part-*.parquet"):
        try:
            table = pq.read_table(path, columns=["item_id", "source_uri"])
        except Exception:  # cut short by the kill
            continue
        for item, source in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
            seen[source].add(item)
    whole = [source for source, items in seen.items() if len(items) == units]
    return units * len(whole), len(seen) - len(whole)


@pytest.mark.parametrize("kind", ["dicom frames", "scene tiles"])
def test_a_killed_run_of_frames_or_tiles_resumes_whole_sources_only(
    ray_local: None, tmp_path: Path, kind: str
) -> None:
    """Units are frames (4 instances of 3) or tiles (4 scenes of 3); staged 4 rows a file, so
    the kill leaves a source in part: the rerun reuses the whole ones and sends the partial
    one to the model again whole; every unit once."""
    sources, per_source = 4, 3
    if kind == "dicom frames":
        inputs = dicom_instances(tmp_path / "inputs", sources, per_source)
    else:
        inputs = geotiff_scenes(tmp_path / "inputs", sources, per_source)
    marks = tmp_path / "marks"
    marks.mkdir()
    table = tmp_path / "table"
    spec = counting_spec(tmp_path, {"uri": str(table)}, marks, input=inputs)
    config = yaml.safe_load(spec.read_text())
    config["runtime"] |= {"read_batch_size": 1}  # a source per read task
    config["output"]["rows_per_file"] = 4  # a file of 4 rows holds a source in part
    spec.write_text(yaml.safe_dump(config))
    staging = table / "_staging" / "k1"
    import fsspec

    kill_at(spec, fsspec.filesystem("file"), str(staging), rows=4)
    whole, partial = whole_sources_staged(staging, per_source)
    assert partial >= 1, "the kill left no source in part"
    for mark in marks.iterdir():
        mark.unlink()
    assert main(["run", str(spec)]) == EXIT_OK
    manifest = committed_run(str(table), "k1")
    assert manifest["resumed_units"] == whole  # whole sources only
    assert images_counted(marks) == manifest["processed_units"] == sources * per_source - whole
    assert verify_run(str(table), "k1")[1] == []
    rows = pq.read_table(table / "run_date=2026-11-24").to_pylist()
    units = Counter(row["source_uri"] for row in rows)
    assert sorted(units.values()) == [per_source] * sources
    assert {row["status"] for row in rows} == {STATUS_OK}


def read_back(where: Store, manifest: dict[str, Any]) -> pa.Table:
    """The run's committed rows read independently of the sink: its part files with pyarrow,
    or the Iceberg table through a catalog client of its own (and counted by DuckDB)."""
    if where.output.get("format") != "iceberg":
        root = where.root.rstrip("/")
        paths = [f["uri"].split(root, 1)[1] for f in manifest["files"]]
        return pa.concat_tables(pq.read_table(where.fs.open(root + p, "rb")) for p in paths)
    from pyiceberg.catalog import load_catalog

    from vision_ops.query import connect, load_iceberg

    table = load_catalog("independent", **where.output["catalog"]).load_table(where.output["table"])
    connection = connect(where.options)
    load_iceberg(connection)
    scan = f"iceberg_scan('{table.metadata_location}')"
    counted = connection.sql(f"SELECT count(*), count(DISTINCT item_id) FROM {scan}").fetchone()
    assert counted == (manifest["rows"], manifest["rows"])
    summary = table.current_snapshot().summary
    assert summary["vision_ops.resumed_units"] == str(manifest["resumed_units"])
    return table.scan().to_arrow().drop_columns(["run_date"])


def scene_plan(widths: dict[str, int | None]) -> Any:
    """A plan of scenes 64 pixels high and `widths` wide, cut into 64-pixel tiles (a width of
    None: a scene whose header could not be read, one error unit), as planning makes it."""
    import ray

    from vision_ops.config import TilingSpec
    from vision_ops.pipeline.planning import ScenePlan
    from vision_ops.scenes import SCENE_FIELDS, SceneSummary
    from vision_ops.tally import listed_tally, token_sum

    rows_of_scenes, units = [], []
    for uri, width in widths.items():
        row: dict[str, Any] = {"source_uri": uri, "value_low": 0.0, "value_high": 255.0}
        if width is None:
            tiles = [None]
            row |= {"plan_error": "cannot read the header: timed out"}
        else:
            tiles = [(x, 0) for x in range(0, width, 64)]
            row |= {"scene_width": width, "scene_height": 64}
            row |= {"scene_transform": [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]}
        ids = [item_id(uri, tile=tile) for tile in tiles]
        rows_of_scenes.append(row | {"scene_tiles": len(ids), "scene_token_sum": token_sum(ids)})
        units += [(uri, tile) for tile in tiles]
    schema = pa.schema([pa.field("source_uri", pa.string()), *SCENE_FIELDS])
    table = pa.Table.from_pylist(rows_of_scenes, schema=schema)
    tiling = TilingSpec(size=64, value_range=(0, 255))
    summary = SceneSummary(len(widths), len(units), listed_tally(units))
    return ScenePlan(ray.data.from_arrow(table), tiling, summary, None, None)


def tile_rows(tiles: list[tuple[str, tuple[int, int] | None]]) -> pa.Table:
    """One ok row per (scene, tile); a tile of None: the scene's error row."""
    rows = source_rows([uri for uri, _ in tiles])
    ids = [item_id(uri, tile=tile) for uri, tile in tiles]
    return rows.set_column(rows.schema.get_field_index("item_id"), "item_id", pa.array(ids))


@pytest.mark.parametrize("staged", ["error row", "tile row"])
def test_a_one_tile_scene_is_not_resumed_as_another_unit(
    ray_local, tmp_path: Path, staged: str
) -> None:
    """A scene of one tile: the killed attempt could not read its header (one error row, id
    of the scene) and the rerun plans its tile, or the other way round. One staged unit, one
    planned, not the same: the scene is processed again, and the rerun commits (it was
    refused for good: the resumed row was not the unit the commit expected)."""
    from vision_ops.pipeline.run import resume_earlier_attempt

    scene, other = "file:///a.tif", "file:///b.tif"
    readable_now = staged == "error row"
    plan = scene_plan({scene: 64 if readable_now else None, other: 64})
    staged_rows = tile_rows([(scene, None if readable_now else (0, 0)), (other, (0, 0))])
    attempt = sink(tmp_path)
    attempt.resume(image_units)
    attempt.write(staged_rows)
    rerun = sink(tmp_path)
    _, left_plan, left = resume_earlier_attempt(rerun, plan.units(), plan, sources=2)
    assert (rerun.resumed, left) == (1, 1)
    assert left_plan is not None and left_plan.summary.scenes == 1
    rerun.write(tile_rows([(scene, (0, 0) if readable_now else None)]))
    assert rerun.commit(plan).rows == 2


def test_a_scene_is_resumed_only_with_every_tile(ray_local, tmp_path: Path) -> None:
    """Scene a's 4 tiles durable, scene b's 2 of 4: a is resumed, b's tiles all planned again
    (the scene rows left in Ray are b's alone, and the plan counts its 4 tiles)."""
    import ray

    from vision_ops.pipeline.run import resume_earlier_attempt

    scenes = ["file:///a.tif", "file:///b.tif"]
    plan = scene_plan({uri: 256 for uri in scenes})
    rows = tile_rows([(s, (x, 0)) for s in scenes for x in range(0, 256, 64)])
    attempt = sink(tmp_path)
    attempt.resume(image_units)
    attempt.write(rows.slice(0, 6))  # a whole, b's first two tiles
    rerun = sink(tmp_path)
    units, left_plan, left = resume_earlier_attempt(rerun, plan.units(), plan, sources=2)
    assert rerun.resumed == 4 and left == 4
    planned = pa.concat_tables(ray.get(units.to_arrow_refs()))
    assert planned["source_uri"].to_pylist() == ["file:///b.tif"] * 4
    assert sorted(planned["tile_x"].to_pylist()) == [0, 64, 128, 192]
    assert left_plan is not None and left_plan.count == 4


def squares_scenes(folder: Path, count: int) -> dict[str, Any]:
    """`count` GeoTIFF scenes of 320 x 128 pixels (3 tiles of 128 with 32 overlap), each with
    the three SQUARES of test_scenes (shifted down a row per scene) on a dim gradient (every
    tile has contrast, nothing in it is bright); the spec's input section."""
    from test_scene_merge import squares_scene

    folder.mkdir()
    for index in range(count):
        squares_scene(folder / f"scene{index:02d}.tif", index, background=30 + np.arange(320) % 40)
    tiling = {"size": 128, "overlap": 32, "bands": [1], "value_range": [0, 255]}
    return {"uris": [str(folder)], "tiling": tiling}


def test_a_tiled_detection_job_killed_at_70_percent_resumes_with_its_merged_scenes(
    ray_local: None, tmp_path: Path
) -> None:
    """10 scenes of 3 tiles: each scene's rows leave the merge, and become durable, while
    inference goes on, so the kill at 70 % comes before every tile was detected; the rerun
    sends only the scenes that were not durable to the model, and the table holds each
    scene's three squares once, as a run that was never killed does."""
    scenes, per_scene = 10, 3
    total = scenes * per_scene
    marks = tmp_path / "marks"
    marks.mkdir()
    extra = {
        "input": squares_scenes(tmp_path / "scenes", scenes),
        "task": {"kind": "detection", "score_threshold": 0.1},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "crashing:count_squares",
            "kwargs": {"marks": str(marks), "seconds": 0.3},
        },
    }
    table = tmp_path / "table"
    spec = counting_spec(tmp_path, {"uri": str(table)}, marks, **extra)
    config = yaml.safe_load(spec.read_text())
    config["runtime"] |= {"batch_size": 1, "read_batch_size": 1, "durable_every_rows": 3}
    spec.write_text(yaml.safe_dump(config))
    kill_at(spec, fsspec.filesystem("file"), f"{table}/_staging/k1", rows=int(0.7 * total))
    assert images_counted(marks) < total, "every tile was detected before a row was durable"
    for mark in marks.iterdir():
        mark.unlink()
    assert main(["run", str(spec)]) == EXIT_OK
    manifest = committed_run(str(table), "k1")
    resumed, processed = manifest["resumed_units"], manifest["processed_units"]
    assert resumed >= int(0.7 * total) and resumed % per_scene == 0  # whole scenes
    assert resumed + processed == total
    assert images_counted(marks) == processed <= total - int(0.7 * total) + per_scene
    assert verify_run(str(table), "k1")[1] == []
    rows = pq.read_table(table / "run_date=2026-11-24")
    assert rows.num_rows == total and len(set(rows["item_id"].to_pylist())) == total
    per_source = Counter(uri for uri in rows["source_uri"].to_pylist())
    boxes = Counter()
    for row in rows.select(["source_uri", "num_detections"]).to_pylist():
        boxes[row["source_uri"]] += row["num_detections"]
    assert set(per_source.values()) == {per_scene} and set(boxes.values()) == {3}
    clean = counting_spec(tmp_path, {"uri": str(tmp_path / "clean")}, marks, **extra)
    assert main(["run", str(clean)]) == EXIT_OK
    clean_rows = pq.read_table(tmp_path / "clean" / "run_date=2026-11-24")
    keep = ["item_id", "num_detections", "detections"]
    assert (
        rows.select(keep).sort_by("item_id").to_pylist()
        == clean_rows.select(keep).sort_by("item_id").to_pylist()
    )


def test_an_attempt_whose_staged_rows_another_took_over_is_told_so_at_its_commit(
    tmp_path: Path,
) -> None:
    """Attempt A still runs when attempt B of the same run id resumes from A's staged rows and
    removes them: A's commit is refused naming that, and B commits every row."""
    first = crashed_attempt(tmp_path, URIS[:4])  # still running, in fact
    second = sink(tmp_path)
    assert second.resume(image_units) == frozenset(URIS[:4])
    first.write(source_rows(URIS[4:]))
    with pytest.raises(CommitRefused) as refused:
        first.commit(URIS)
    assert str(refused.value) == (
        f"refusing to commit run r1: its staged rows are gone from {first.parts.folder}; "
        "another attempt of the same run id resumed from them (and commits them), so this "
        "attempt commits nothing"
    )
    second.write(source_rows(URIS[4:]))
    assert second.commit(URIS).rows == 6


def test_the_runs_rate_counts_the_rows_it_processed_not_those_it_resumed() -> None:
    """A resumed run's images/s is over the rows its pipeline processed: the resumed ones were
    processed by the attempt before (a run that resumed every row processed none)."""
    from vision_ops.pipeline.run import RunSummary
    from vision_ops.sink import CommitResult

    def summary(rows: int, resumed: int) -> RunSummary:
        commit = CommitResult("p", "m", [], rows, rows, 0, resumed=resumed)
        return RunSummary("r1", rows, seconds=5.0, pipeline_seconds=2.0, commit=commit)

    assert summary(100, 0).images_per_second == 50.0
    assert summary(100, 60).images_per_second == 20.0
    assert summary(100, 100).images_per_second == 0.0
