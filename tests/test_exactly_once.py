"""Runs that lose nothing: the commit refuses anything but each listed unit once, `verify`
re-checks, incremental runs skip what is done, one run at a time, a killed driver is harmless."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from cluster_script import run_cluster_script
from PIL import Image
from process_session import kill_session
from ray_temp_root import short_temp_dir

from vision_ops import config
from vision_ops.cli import EXIT_FAILED, EXIT_OK, main
from vision_ops.config import load_spec
from vision_ops.lock import LOCK_NAME, LockHeld, RunLock
from vision_ops.pipeline import incremental, run_job
from vision_ops.pipeline.incremental import done_versions, not_done
from vision_ops.runindex import KEY_SEPARATOR, index_of, source_key, source_keys
from vision_ops.schema import PREDICTION_SCHEMA, item_id
from vision_ops.sink import ParquetSink, committed_runs
from vision_ops.written import CommitRefused, check_exactly_once, expected_units

pytestmark = pytest.mark.timeout(900)


def test_check_exactly_once_names_missing_unexpected_and_doubled_units() -> None:
    check_exactly_once({"a", "b"}, ["b", "a"])
    with pytest.raises(CommitRefused) as err:
        check_exactly_once({"a", "b", "c"}, ["a", "a", "x"])
    message = str(err.value)
    assert "2 missing (e.g. ['b', 'c'])" in message
    assert "1 unexpected (e.g. ['x'])" in message and "1 twice (e.g. ['a'])" in message


def test_expected_units_are_one_per_source_or_one_per_frame() -> None:
    expected = expected_units(["s3://b/photo.jpg", "s3://b/ct.dcm"], {"s3://b/ct.dcm": 3})
    frames = {item_id("s3://b/ct.dcm", frame) for frame in range(3)}
    assert expected == {item_id("s3://b/photo.jpg")} | frames


def framed_rows(uri: str, frames: list[int], count: int):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    columns = {
        "run_id": ["r"] * len(frames),
        "item_id": [item_id(uri, frame) for frame in frames],
        "source_uri": [uri] * len(frames),
        "frame_index": frames,
        "frame_count": [count] * len(frames),
        "model_name": ["m"] * len(frames),
        "model_weights_sha256": ["h"] * len(frames),
        "task": ["classification"] * len(frames),
        "status": ["ok"] * len(frames),
    }
    return pa.Table.from_arrays(
        [pa.array(columns.get(f.name, [None] * len(frames)), f.type) for f in PREDICTION_SCHEMA],
        schema=PREDICTION_SCHEMA,
    )


def test_a_missing_frame_or_a_disputed_frame_count_refuses_the_commit(tmp_path: Path) -> None:
    date = dt.date(2026, 11, 24)
    short = ParquetSink(str(tmp_path / "a"), "r", date, PREDICTION_SCHEMA)
    short.write(framed_rows("s3://b/ct.dcm", [0, 2], 3))
    with pytest.raises(CommitRefused, match="1 missing"):
        short.commit(["s3://b/ct.dcm"])
    disputed = ParquetSink(str(tmp_path / "b"), "r", date, PREDICTION_SCHEMA)
    disputed.write(framed_rows("s3://b/ct.dcm", [0], 2))
    disputed.write(framed_rows("s3://b/ct.dcm", [1], 3))
    with pytest.raises(CommitRefused, match="disagree on the frame count"):
        disputed.commit(["s3://b/ct.dcm"])
    whole = ParquetSink(str(tmp_path / "c"), "r", date, PREDICTION_SCHEMA)
    whole.write(framed_rows("s3://b/ct.dcm", [2, 0, 1], 3))
    assert whole.commit(["s3://b/ct.dcm"]).rows == 3


def test_a_refused_commit_leaves_nothing_for_readers(tmp_path: Path) -> None:
    import pyarrow as pa

    columns = {
        "run_id": ["r"],
        "item_id": [item_id("s3://b/u.jpg")],
        "source_uri": ["s3://b/u.jpg"],
        "model_name": ["m"],
        "model_weights_sha256": ["h"],
        "task": ["classification"],
        "status": ["ok"],
    }
    table = pa.Table.from_arrays(
        [pa.array(columns.get(f.name, [None]), f.type) for f in PREDICTION_SCHEMA],
        schema=PREDICTION_SCHEMA,
    )
    sink = ParquetSink(str(tmp_path), "r", dt.date(2026, 11, 24), PREDICTION_SCHEMA)
    sink.write(table)
    with pytest.raises(CommitRefused, match="1 missing"):
        sink.commit(["s3://b/u.jpg", "s3://b/v.jpg"])
    assert committed_runs(str(tmp_path)) == []
    assert not (tmp_path / "run_date=2026-11-24").exists()


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:03d}.png")


def write_spec(folder: Path, tiny_weights: Path, output: Path, **runtime: object) -> Path:
    spec = {
        "input": {"uris": [str(folder / "images")]},
        "model": {
            "architecture": "mobilenet_v3_small",
            "weights": str(tiny_weights),
            "num_classes": 4,
            "preprocessing": {"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "runtime": {"batch_size": 2, "read_batch_size": 2, "max_actors": 1, **runtime},
        "output": {"uri": str(output), "rows_per_file": 2},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_verify_passes_a_committed_run_and_catches_damage(
    ray_local, tmp_path, tiny_weights, capsys
):
    make_images(tmp_path / "images", 5)
    spec = write_spec(tmp_path, tiny_weights, tmp_path / "table")
    assert main(["run", str(spec), "--run-id", "v1"]) == EXIT_OK
    capsys.readouterr()
    assert main(["verify", str(spec)]) == EXIT_OK
    shown = capsys.readouterr().out
    assert "run v1" in shown and "5 units, each once, in 3 readable file(s)" in shown
    manifest = committed_runs(str(tmp_path / "table"))[0]
    assert manifest["rows"] == 5 and len(manifest["units_digest"]) == 64
    assert {"input_snapshot_digest", "spec_digest", "model_fingerprint"} <= set(manifest)
    assert re.fullmatch(r"cpu autocast=off decode=(tasks|device)", manifest["numerics"])
    part = Path(manifest["files"][1]["uri"].removeprefix("file://"))
    part.write_bytes(part.read_bytes()[:100])
    assert main(["verify", str(spec), "--run-id", "v1"]) == EXIT_FAILED
    assert "unreadable" in capsys.readouterr().err


def test_incremental_runs_skip_committed_units(ray_local, tmp_path, tiny_weights, capsys) -> None:
    make_images(tmp_path / "images", 6)
    spec = write_spec(tmp_path, tiny_weights, tmp_path / "table")
    assert main(["run", str(spec), "--run-date", "2026-11-20"]) == EXIT_OK
    assert main(["run", str(spec), "--run-date", "2026-11-21", "--incremental"]) == EXIT_OK
    assert "2026-11-21-" in capsys.readouterr().out
    second = committed_runs(str(tmp_path / "table"))[-1]
    assert (second["run_date"], second["rows"], second["files"]) == ("2026-11-21", 0, [])
    touched = tmp_path / "images" / "img003.png"
    Image.fromarray(np.full((40, 56, 3), 7, dtype=np.uint8)).save(touched)
    assert main(["run", str(spec), "--run-date", "2026-11-22", "--incremental"]) == EXIT_OK
    third = pq.read_table(tmp_path / "table" / "run_date=2026-11-22").to_pylist()
    assert [row["source_uri"] for row in third] == [touched.as_uri().replace("%3D", "=")]
    other_model = ["--set", "task.top_k=2", "--run-date", "2026-11-23", "--incremental"]
    assert main(["run", str(spec), *other_model]) == EXIT_OK
    assert pq.read_table(tmp_path / "table" / "run_date=2026-11-23").num_rows == 6


def committed_rows(*rows: tuple[str, str, str | None]):  # type: ignore[no-untyped-def]
    """A run's (source_uri, status, error_type) rows as read back for incremental runs."""
    return pa.table(
        {
            "source_uri": [uri for uri, _, _ in rows],
            "source_etag": ["e1"] * len(rows),
            "source_size": pa.array([None] * len(rows), pa.int64()),
            "source_mtime": pa.array([None] * len(rows), pa.timestamp("us", tz="UTC")),
            "status": [status for _, status, _ in rows],
            "error_type": pa.array([kind for _, _, kind in rows], pa.string()),
        }
    )


def done_uris(runs: list[pa.Table], skip_errors: list[str]) -> set[str]:
    done = done_versions([index_of(rows) for rows in runs], skip_errors)
    return {key.split(KEY_SEPARATOR)[0] for key in done.to_pylist()}


def test_an_input_version_is_its_etag_else_its_size_and_modification_time() -> None:
    stamp = dt.datetime(2026, 11, 20, 8, 30, tzinfo=dt.timezone.utc)
    later = stamp + dt.timedelta(microseconds=1)
    listing = pa.table(
        {
            "source_uri": ["s3://b/a.png", "s3://b/b.png", "s3://b/b.png", "file:///c.png"],
            "source_etag": ["e1", "", "", None],
            "source_size": pa.array([10, 20, 20, None], pa.int64()),
            "source_mtime": pa.array([stamp, stamp, later, None], pa.timestamp("us", tz="UTC")),
        }
    )
    micros = int(stamp.timestamp() * 1_000_000)
    assert source_keys(listing).to_pylist() == [
        source_key("s3://b/a.png", "etag:e1"),
        source_key("s3://b/b.png", f"size:20|mtime:{micros}"),  # an empty ETag is no version
        source_key("s3://b/b.png", f"size:20|mtime:{micros + 1}"),
        source_key("file:///c.png", "size:None|mtime:None"),
    ]
    done = {source_key("s3://b/b.png", f"size:20|mtime:{micros}")}
    kept = not_done(listing, done)
    assert kept["source_mtime"].to_pylist() == [stamp, later, None]  # b.png changed: kept


@pytest.mark.parametrize("fold_rows", [None, 1], ids=["one fold", "a fold per run"])
def test_incremental_counts_ok_rows_done_and_retries_error_rows(monkeypatch, fold_rows) -> None:
    if fold_rows is not None:  # the runs' outcomes folded as they are read: the same answer
        monkeypatch.setattr(incremental, "FOLD_ROWS", fold_rows)
    first = committed_rows(
        ("s3://b/ok.png", "ok", None),
        ("s3://b/denied.png", "error", "PermissionError"),
        ("s3://b/html.jpg", "error", "NotAnImage"),
        ("s3://b/nodata.tif", "skipped", None),
        ("s3://b/ct.dcm", "ok", None),
        ("s3://b/ct.dcm", "error", "CorruptDicom"),  # one bad frame: the whole instance again
    )
    assert sorted(done_versions([index_of(first)], []).to_pylist()) == [
        source_key("s3://b/nodata.tif", "etag:e1"),
        source_key("s3://b/ok.png", "etag:e1"),
    ]
    kept = done_uris([first], ["NotAnImage", "ImageTooLarge"])
    assert kept == {"s3://b/ok.png", "s3://b/nodata.tif", "s3://b/html.jpg"}
    second = committed_rows(
        ("s3://b/denied.png", "ok", None),  # a later ok supersedes an earlier error
        ("s3://b/ok.png", "error", "FileNotFoundError"),  # a later error supersedes an ok
        ("s3://b/ct.dcm", "ok", None),
        ("s3://b/ct.dcm", "ok", None),
    )
    later = done_uris([first, second], [])
    assert later == {"s3://b/denied.png", "s3://b/nodata.tif", "s3://b/ct.dcm"}
    earlier = done_uris([second, first], [])
    assert earlier == {"s3://b/ok.png", "s3://b/nodata.tif"}


def test_incremental_runs_process_an_error_input_again(
    ray_local, tmp_path, tiny_weights, capsys
) -> None:
    make_images(tmp_path / "images", 3)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes((tmp_path / "images" / "img000.png").read_bytes()[:60])
    spec = write_spec(tmp_path, tiny_weights, tmp_path / "table")
    assert main(["run", str(spec), "--run-id", "first", "--run-date", "2026-11-20"]) == EXIT_OK
    first = pq.read_table(tmp_path / "table" / "run_date=2026-11-20").to_pylist()
    errors = {Path(r["source_uri"]).name: r["error_type"] for r in first if r["status"] == "error"}
    assert (len(first), errors) == (4, {"broken.png": "CorruptImage"})
    again = ["--run-id", "second", "--run-date", "2026-11-21", "--incremental"]
    assert main(["run", str(spec), *again]) == EXIT_OK
    second = pq.read_table(tmp_path / "table" / "run_date=2026-11-21").to_pylist()
    assert [(Path(r["source_uri"]).name, r["error_type"]) for r in second] == [
        ("broken.png", "CorruptImage")
    ]
    kept = ["--set", "run.skip_errors=[CorruptImage]", "--run-id", "third"]
    assert main(["run", str(spec), *kept, "--run-date", "2026-11-22", "--incremental"]) == EXIT_OK
    third = committed_runs(str(tmp_path / "table"))[-1]
    assert (third["run_id"], third["rows"], third["files"]) == ("third", 0, [])
    capsys.readouterr()


def test_a_second_run_on_the_same_output_is_refused(ray_local, tmp_path, tiny_weights, capsys):
    make_images(tmp_path / "images", 2)
    spec_path = write_spec(tmp_path, tiny_weights, tmp_path / "table")
    with RunLock(str(tmp_path / "table"), "nightly-elsewhere", lease_s=600):
        with pytest.raises(LockHeld, match="being written by run nightly-elsewhere"):
            run_job(load_spec(spec_path))
        assert main(["run", str(spec_path)]) == EXIT_FAILED
        assert "being written by run nightly-elsewhere" in capsys.readouterr().err
    assert not (tmp_path / "table" / LOCK_NAME).exists()
    stale = {
        "owner": "dead",
        "run_id": "crashed",
        "host": "elsewhere",
        "pid": "1",
        "since": "2026-01-01T00:00:00+00:00",
        "expires": "2026-01-01T06:00:00+00:00",
    }
    (tmp_path / "table" / LOCK_NAME).write_text(json.dumps(stale))
    assert main(["run", str(spec_path)]) == EXIT_OK  # an expired lease is taken over
    assert not (tmp_path / "table" / LOCK_NAME).exists()


def test_a_run_that_crosses_midnight_keeps_the_date_it_started_with(
    ray_local, tmp_path, tiny_weights, monkeypatch
):
    """No run id or date given: "today" is asked once, as the run starts. Here each later ask
    would be a day on (a run that crosses midnight UTC): the lock, rows and manifest keep the
    first."""
    make_images(tmp_path / "images", 3)
    spec = load_spec(write_spec(tmp_path, tiny_weights, tmp_path / "table"))
    asked = iter(range(100))
    start = dt.date(2026, 11, 30)
    monkeypatch.setattr(config, "utc_today", lambda: start + dt.timedelta(days=next(asked)))
    summary = run_job(spec)
    assert summary.run_id == f"2026-11-30-{spec.fingerprint()[:8]}"
    (manifest,) = committed_runs(str(tmp_path / "table"))
    assert (manifest["run_id"], manifest["run_date"]) == (summary.run_id, "2026-11-30")
    assert [p.name for p in (tmp_path / "table").glob("run_date=*")] == ["run_date=2026-11-30"]
    rows = pq.read_table(tmp_path / "table" / "run_date=2026-11-30")
    assert rows.num_rows == 3 and set(rows["run_id"].to_pylist()) == {summary.run_id}


def test_killed_driver_leaves_nothing_and_a_rerun_completes(ray_local, tmp_path, tiny_weights):
    make_images(tmp_path / "images", 160)
    table = tmp_path / "table"
    spec = write_spec(tmp_path, tiny_weights, table)
    ray_temp = short_temp_dir("vok")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_TMPDIR": str(ray_temp)
    }
    command = [sys.executable, "-m", "vision_ops.cli", "run", str(spec), "--run-id", "k1"]
    driver = subprocess.Popen(command, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list((table / "_staging").glob("k1/*/*.parquet")):
            assert driver.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no staged file appeared"
            time.sleep(0.05)
        kill_session(driver.pid)  # the driver, its Ray and the actors, in their own groups
        driver.wait(timeout=60)
    finally:
        kill_session(driver.pid)
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert committed_runs(str(table)) == []  # readers see nothing of it
    assert main(["query", str(table), "SELECT 1"]) == EXIT_FAILED
    assert (table / LOCK_NAME).exists()  # the dead run's lock: its pid is gone, so it is stale
    assert main(["run", str(spec), "--run-id", "k1"]) == EXIT_OK
    rerun = pq.read_table(table / f"run_date={committed_runs(str(table))[0]['run_date']}")
    clean_spec = write_spec(tmp_path, tiny_weights, tmp_path / "clean")
    assert main(["run", str(clean_spec), "--run-id", "k1"]) == EXIT_OK
    clean = pq.read_table(
        tmp_path / "clean" / f"run_date={committed_runs(str(tmp_path / 'clean'))[0]['run_date']}"
    )
    keep = ["item_id", "source_uri", "status", "label_id"]
    assert rerun.select(keep).sort_by("item_id").equals(clean.select(keep).sort_by("item_id"))
    np.testing.assert_allclose(
        rerun.sort_by("item_id")["score"].to_numpy(),
        clean.sort_by("item_id")["score"].to_numpy(),
        atol=1e-6,
    )
    assert main(["verify", str(table)]) == EXIT_OK


def test_actor_killed_mid_batch_the_run_completes_exactly_once(ray_local, tmp_path) -> None:
    make_images(tmp_path / "images", 12)
    marker = tmp_path / "crashed-once"
    spec = {
        "input": {"uris": [str(tmp_path / "images")]},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "crashing:crash_once",
            "kwargs": {"marker": str(marker)},
            "preprocessing": {"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "task": {"kind": "classification", "top_k": 1},
        "runtime": {"batch_size": 2, "read_batch_size": 2, "max_actors": 1},
        "output": {"uri": str(tmp_path / "table")},
        "run": {"id": "crash"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == EXIT_OK
    assert marker.exists()  # the actor did die mid-run
    rows = pq.read_table(tmp_path / "table").to_pylist()
    assert sorted(r["source_uri"].rsplit("/", 1)[1] for r in rows) == [
        f"img{i:03d}.png" for i in range(12)
    ]
    assert {r["status"] for r in rows} == {"ok"}
    assert main(["verify", str(path)]) == EXIT_OK


def test_a_read_failing_in_a_run_in_one_process_fails_it_in_one_line(
    tmp_path, capsys, monkeypatch
) -> None:
    """A run in this process (`runtime.runner: in_process`) whose store fails as it fetches
    (not one input's error: the connection gone): exit 1 with that error in one line, what was
    left and how to resume, no traceback, nothing committed."""
    import vision_ops.reader as reader

    def store_gone(*args: object, **kwargs: object) -> None:
        raise ConnectionError("the store closed the connection")

    make_images(tmp_path / "images", 4)
    monkeypatch.setattr(reader, "fetch_capped", store_gone)
    spec = {
        "input": {"uris": [str(tmp_path / "images")]},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "vision_ops.zoo:efficientnet_lite0",
            "preprocessing": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "runtime": {"batch_size": 2, "runner": "in_process"},
        "output": {"uri": str(tmp_path / "table")},
        "run": {"id": "gone", "date": "2026-11-24"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["run", str(path)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: a read failed in the driver: ConnectionError: the store closed the connection; "
        "nothing was committed; the rows made durable so far stay staged, and the same command "
        "with --run-id gone --run-date 2026-11-24 resumes from them"
    ]
    assert "Traceback" not in err
    assert committed_runs(str(tmp_path / "table")) == []


@pytest.mark.parametrize("predict_in", ["actors", "driver", "in_process"])
def test_a_model_failing_in_its_worker_fails_the_run_in_one_line(
    ray_local, tmp_path, capsys, caplog, monkeypatch, predict_in
) -> None:
    """A model that fails on its device mid-run: the run exits 1 with the model's own error in
    one line (Ray passes it on as its worker's traceback, in ANSI colours; the driver's
    threads raise it themselves, in a run in this process too), nothing committed."""
    from crashing import DEVICE_LOST

    make_images(tmp_path / "images", 8)
    spec = {
        "input": {"uris": [str(tmp_path / "images")]},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "crashing:lose_device",
            "preprocessing": {"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "task": {"kind": "classification", "top_k": 1},
        "runtime": {
            "batch_size": 2,
            "read_batch_size": 2,
            "max_actors": 1,
        }
        | ({"runner": "in_process"} if predict_in == "in_process" else {"predict_in": predict_in}),
        "output": {"uri": str(tmp_path / "table")},
        "run": {"id": "lost", "date": "2026-11-24"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["run", str(path)]) == EXIT_FAILED
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error:")]
    where = {
        "actors": "a worker failed",
        "driver": "the predictor failed in the driver",
        "in_process": "the predictor failed in the driver",
    }[predict_in]
    log = {
        "actors": " (the worker's stack trace: Ray Data's log, in the Ray session's logs/ray-data)",
        "driver": "",
        "in_process": "",
    }[predict_in]
    assert said == [
        f"error: {where}: RuntimeError: {DEVICE_LOST}; nothing was committed; the rows "
        "made durable so far stay staged, and the same command with --run-id lost --run-date "
        f"2026-11-24 resumes from them{log}"
    ]
    assert 'File "' not in err and "\x1b[" not in err  # no frames, no colour codes
    assert committed_runs(str(tmp_path / "table")) == []
    import threading

    assert not [t.name for t in threading.enumerate() if t.name.startswith("reader")]
    if predict_in == "driver":  # at DEBUG the driver's own traceback is logged (README)
        caplog.set_level(logging.DEBUG, logger="vision_ops.cli")
        monkeypatch.setenv("VISION_OPS_LOG_LEVEL", "DEBUG")
        assert main(["run", str(path)]) == EXIT_FAILED
        [failed] = [r for r in caplog.records if r.message == "the predictor failed in the driver"]
        assert failed.exc_info is not None and DEVICE_LOST in str(failed.exc_info[1])
        # A backfill's run: the same backfill resumes it (it takes no --run-id), and it says
        # where it stopped and which dates it did not run.
        capsys.readouterr()
        dates = ["--from", "2026-11-01", "--to", "2026-11-03"]
        assert main(["backfill", str(path), "--set", "run.id=null", *dates]) == EXIT_FAILED
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert said == [
            f"error: {where}: RuntimeError: {DEVICE_LOST}; nothing was committed; the rows made "
            "durable so far stay staged, and the same backfill (from 2026-11-01, the dates "
            "committed skipped) resumes from them",
            "error: the backfill stopped at 2026-11-01: 2026-11-02..2026-11-03 not run (2 dates)",
        ]


def test_a_stalled_run_fails_naming_the_stuck_stage(tmp_path) -> None:
    """In a process (and local cluster) of its own: the hung actor dies with its driver."""
    make_images(tmp_path / "images", 4)
    spec = {
        "input": {"uris": [str(tmp_path / "images")]},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "crashing:stall",
            "preprocessing": {"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "runtime": {"batch_size": 2, "max_actors": 1, "stall_timeout_s": 15},
        "output": {"uri": str(tmp_path / "table")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    ray_temp = short_temp_dir("vos")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(ray_temp), "PYTHONPATH": str(Path(__file__).parent)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vision_ops.cli", "run", str(path)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert done.returncode == EXIT_FAILED, done.stderr[-2000:]
    assert "made no progress" in done.stderr and "MapBatches(PredictRows)" in done.stderr
    assert "nothing was committed; the rows made durable so far stay staged" in done.stderr
    assert committed_runs(str(tmp_path / "table")) == []


NODE_LOSS = """
import json, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from vision_ops.config import load_spec
from vision_ops.pipeline import run_job
from vision_ops.pipeline.incremental import done_versions

spec_path, marks, temp = sys.argv[1:4]
# The head has room for reads only; the predictor (2 CPUs) fits on the worker alone.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp})
worker = cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
ray.data.DataContext.get_current().enable_progress_bars = False
outcome = {}

def run():
    try:
        summary = run_job(load_spec(spec_path))
        outcome["rows"] = summary.commit.rows
    except BaseException as err:
        outcome["error"] = repr(err)

job = threading.Thread(target=run)
job.start()
deadline = time.monotonic() + 240
while not any(p.name.startswith(worker.node_id) for p in Path(marks).iterdir()):
    if not job.is_alive() or time.monotonic() > deadline:
        break
    time.sleep(0.05)
outcome["removed_mid_run"] = job.is_alive()
cluster.remove_node(worker)
replacement = cluster.add_node(num_cpus=2)  # as a cloud autoscaler replaces a lost node
job.join(400)
outcome["worker_node"], outcome["replacement_node"] = worker.node_id, replacement.node_id
outcome["marks"] = sorted({p.name.split("-")[0] for p in Path(marks).iterdir()})
print(json.dumps(outcome))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.timeout(600)
def test_a_worker_node_removed_mid_run_the_run_completes_exactly_once(tmp_path) -> None:
    """Two raylets (ray.cluster_utils.Cluster), in a process of its own; the node running the
    predictor is removed mid-run and a replacement joins, as an autoscaler would; Ray Data
    restarts the actor there and the commit holds."""
    make_images(tmp_path / "images", 48)
    marks = tmp_path / "marks"
    marks.mkdir()
    spec = {
        "input": {"uris": [str(tmp_path / "images")]},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "crashing:slow_on_nodes",
            "kwargs": {"marks": str(marks)},
            "preprocessing": {"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "task": {"kind": "classification", "top_k": 1},
        "runtime": {
            "batch_size": 2,
            "read_batch_size": 2,
            "max_actors": 1,
            "num_cpus_per_actor": 2,
        },
        "output": {"uri": str(tmp_path / "table")},
        "run": {"id": "node-loss"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    outcome = run_cluster_script(NODE_LOSS, str(path), str(marks))
    assert outcome["removed_mid_run"], outcome
    assert outcome.get("error") is None and outcome["rows"] == 48, outcome
    # The predictor ran on the lost node, then on its replacement.
    assert outcome["marks"] == sorted([outcome["worker_node"], outcome["replacement_node"]])
    rows = pq.read_table(tmp_path / "table").to_pylist()
    assert sorted(r["source_uri"].rsplit("/", 1)[1] for r in rows) == [
        f"img{i:03d}.png" for i in range(48)
    ]
    assert {r["status"] for r in rows} == {"ok"}
    assert main(["verify", str(path)]) == EXIT_OK
