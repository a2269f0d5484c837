"""The job end to end on a real local Ray cluster: predictions equal a direct model call, every
input is accounted for once, bad files become error rows, the schema is the declared one."""

from __future__ import annotations

import base64
import io
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hostile import png_declaring
from PIL import Image
from torchvision import transforms

from vision_ops.config import JobSpec, RuntimeSpec, parse_spec
from vision_ops.gallery import Sources
from vision_ops.pipeline import RunSummary, run_job
from vision_ops.pipeline.run import (
    MAP_TASK_BLOCKS_AHEAD,
    compiled_if_it_pays,
    sized_for_units,
    unit_blocks,
    with_limits,
)
from vision_ops.pool import ClusterTooSmall
from vision_ops.query import connect, read_sql
from vision_ops.report import build_report
from vision_ops.runstats import RunStats
from vision_ops.schema import PREDICTION_SCHEMA, SCHEMA_VERSION
from vision_ops.sink import committed_run
from vision_ops.zoo import efficientnet_lite0

pytestmark = pytest.mark.timeout(600)
MEAN, STD = [0.498] * 3, [0.502] * 3
TOP_K = 5
LITE0 = {
    "kind": "entrypoint",
    "entrypoint": "vision_ops.zoo:efficientnet_lite0",
    "name": "efficientnet_lite0",
    "labels": "imagenet-1k",
    "preprocessing": {"resize": 256, "crop": 224, "mean": MEAN, "std": STD},
}


def job(inputs: list[str], output_uri: str, run_id: str = "test-run", **extra: object) -> JobSpec:
    raw: dict[str, object] = {
        "input": {"uris": inputs},
        "task": {"kind": "classification", "top_k": TOP_K},
        "model": LITE0,
        "runtime": {"batch_size": 4, "max_actors": 1},
        "output": {"uri": output_uri},
        "run": {"id": run_id, "date": "2026-11-24"},
    }
    return parse_spec(raw | extra)


@pytest.fixture(scope="module")
def direct_top_k(photo_paths: list[Path]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Top-k labels and scores per photo name from a plain torchvision call on the model."""
    from vision_ops.models import load_labels

    model, labels = efficientnet_lite0().eval(), load_labels("imagenet-1k")
    preprocess = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in photo_paths])
    with torch.inference_mode():
        top = model(batch).softmax(-1).topk(TOP_K)
    return {
        path.name: ([labels[i] for i in ids], scores.numpy())
        for path, ids, scores in zip(photo_paths, top.indices.tolist(), top.values, strict=True)
    }


@pytest.fixture
def photo_dir(tmp_path: Path, photo_paths: list[Path]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in photo_paths:
        shutil.copy(path, folder / path.name)
    return folder


def assert_matches_direct(rows: list[dict], direct: dict) -> None:
    assert sorted(Path(r["source_uri"]).name for r in rows) == sorted(direct)
    for row in rows:
        labels, scores = direct[Path(row["source_uri"]).name]
        assert row["status"] == "ok"
        assert [e["label"] for e in row["top_k"]] == labels
        np.testing.assert_allclose([e["score"] for e in row["top_k"]], scores, atol=1e-5)
        assert row["label"] == labels[0]
        assert row["score"] == pytest.approx(float(scores[0]), abs=1e-5)


def test_local_files_equal_a_direct_model_call(
    ray_local, photo_dir, tmp_path, direct_top_k, caplog
):
    output = tmp_path / "table"
    caplog.set_level(logging.INFO, logger="vision_ops.pipeline")
    derived = job([str(photo_dir)], str(output), runtime={"max_actors": 1})  # no batch_size
    summary = run_job(derived)
    assert "8 images per model call, 16 files per read task" in caplog.text  # a CPU actor's
    rows = pq.read_table(output / "run_date=2026-11-24").to_pylist()
    assert summary.commit.rows == summary.inputs == len(direct_top_k) == len(rows)
    assert_matches_direct(rows, direct_top_k)
    chelsea = next(r for r in rows if r["source_uri"].endswith("chelsea.png"))
    assert (chelsea["image_width"], chelsea["image_height"]) == (451, 300)
    assert chelsea["source_size"] == (photo_dir / "chelsea.png").stat().st_size
    assert chelsea["model_name"] == "efficientnet_lite0" and chelsea["run_id"] == "test-run"
    startup = committed_run(str(output), "test-run")["startup_seconds"]
    assert summary.startup_seconds == startup
    assert list(startup) == [
        "ray_connect", "listing", "pool_start", "model_load", "compile", "pool_ready",
        "first_batch", "until_first_batch",
    ]  # fmt: skip
    assert all(seconds >= 0 for seconds in startup.values())
    assert startup["model_load"] > 0 and startup["compile"] == 0  # runtime.compile is off
    # one actor: up, its model loaded, ready, then its first batch out
    ready = startup["pool_start"] + startup["model_load"]
    assert ready <= startup["pool_ready"] + 0.01 <= startup["first_batch"] + 0.02
    assert startup["until_first_batch"] >= startup["listing"] + startup["first_batch"]


def test_twelve_bit_data_in_16_bit_files_is_scaled_from_its_bits_stored(
    ray_local, photo_paths, tmp_path
) -> None:
    """A 12-bit scanner's greys (0..4095) in 16-bit PNGs, read with `input.bits_stored: 12`:
    the model sees the greys at full range (at 16 bits they were nearly black), as a plain
    torchvision call on the same greys scaled to 8 bits sees them."""
    from vision_ops.models import load_labels

    folder, direct = tmp_path / "scans", {}
    folder.mkdir()
    model, labels = efficientnet_lite0().eval(), load_labels("imagenet-1k")
    preprocess = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]
    )
    for path in photo_paths[:2]:
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 16  # 0..4080
        Image.fromarray(grey).save(folder / f"{path.stem}.png")  # mode I;16
        eight = Image.fromarray(np.round(grey / 4095 * 255).astype(np.uint8)).convert("RGB")
        pixels = transforms.Normalize(MEAN, STD)(preprocess(eight))[None]
        with torch.inference_mode():
            top = model(pixels).softmax(-1).topk(TOP_K)
        direct[f"{path.stem}.png"] = ([labels[i] for i in top.indices[0]], top.values[0].numpy())
    output = tmp_path / "table"
    run_job(job([str(folder)], str(output), input={"uris": [str(folder)], "bits_stored": 12}))
    rows = pq.read_table(output / "run_date=2026-11-24").to_pylist()
    assert_matches_direct(rows, direct)
    manifest = committed_run(str(output), "test-run")  # the report shows them as read
    assert manifest["bits_stored"] == 12
    with Sources({}, bits_stored=manifest["bits_stored"]) as sources:
        shown = sources.pixels(rows[0])
    grey = np.asarray(Image.open(folder / rows[0]["source_uri"].rpartition("/")[2]), float)
    assert shown is not None and shown.mean() == pytest.approx((grey / 4095 * 255).mean(), abs=1)
    strips = "".join(html for _, html in build_report(str(output)).panels)
    thumbnails = re.findall(r"data:image/\w+;base64,([A-Za-z0-9+/=]+)", strips)
    assert len(thumbnails) >= 2  # none nearly black (at 16 bits their means were under 16)
    for encoded in thumbnails:
        assert np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded)))).mean() > 40


@pytest.mark.s3
def test_s3_in_and_out_equal_a_direct_model_call(
    ray_local, seaweed, s3fs_client, s3_options, photo_paths, direct_top_k
):
    for path in photo_paths:
        s3fs_client.put_file(str(path), f"images/photos/{path.name}")
    output = "s3://out/lite0"
    spec = job(["s3://images/photos/"], output, storage_options=s3_options)
    summary = run_job(spec)
    assert summary.commit.partition_uri == f"{output}/run_date=2026-11-24"
    attempt = committed_run(output, "test-run", s3_options)["attempt"]
    part = f"{output}/run_date=2026-11-24/test-run-{attempt}-part-00000.parquet"
    assert summary.commit.files == [part]
    result = connect(s3_options).execute(f"SELECT * FROM {read_sql(output)}")
    rows = result.to_arrow_table().to_pylist()
    assert_matches_direct(rows, direct_top_k)
    etags = {r["source_uri"]: r["source_etag"] for r in rows}
    listed = s3fs_client.find("images/photos/", detail=True)
    assert etags == {f"s3://{k}": v["ETag"].strip('"') for k, v in listed.items()}
    assert {str(r["run_date"]) for r in rows} == {"2026-11-24"}


def test_a_run_compiles_only_when_its_inputs_make_it_pay(tmp_path) -> None:
    thresholds = {"compile_min_inputs": 100, "compile_min_inputs_cold": 300}
    spec = job(["/photos"], str(tmp_path), runtime={"compile": True, **thresholds})
    assert spec.runtime.compile and not spec.runtime.compile_only_where_cached
    assert not compiled_if_it_pays(spec, 99).runtime.compile
    for warm_only in (100, 299):  # compiled on the nodes that compiled the model before
        runtime = compiled_if_it_pays(spec, warm_only).runtime
        assert runtime.compile and runtime.compile_only_where_cached
    assert compiled_if_it_pays(spec, 300) == spec
    same = job(["/p"], "/o", runtime={"compile": True, "compile_min_inputs_cold": 0})
    assert compiled_if_it_pays(same, 2999) != same and compiled_if_it_pays(same, 3000) == same
    eager = job(["/photos"], str(tmp_path))  # compile is off unless asked for
    assert not compiled_if_it_pays(eager, 10**6).runtime.compile
    defaults = job(["/p"], "/o", runtime={"compile": True}).runtime
    assert (defaults.compile_min_inputs, defaults.compile_min_inputs_cold) == (3000, 8000)


@pytest.fixture
def tables_at_driver(monkeypatch) -> list[int]:
    """The row count of each table the driver receives from the actors, in order."""
    tables: list[int] = []
    record = RunStats.record

    def counted(stats: RunStats, table: pa.Table) -> pa.Table:
        tables.append(table.num_rows)
        return record(stats, table)

    monkeypatch.setattr(RunStats, "record", counted)
    return tables


def test_rows_reach_the_driver_a_model_batch_at_a_time(
    ray_local, photo_dir, tmp_path, direct_top_k, tables_at_driver
):
    """One read task fetches every photo, the model takes one at a time: each photo's row
    leaves the actor on its own, so the driver has rows after the first model call."""
    runtime = {"batch_size": 1, "read_batch_size": len(direct_top_k), "max_actors": 1}
    output = tmp_path / "table"
    summary = run_job(job([str(photo_dir)], str(output), runtime=runtime))
    assert tables_at_driver == [1] * len(direct_top_k) == [1] * summary.inputs
    assert_matches_direct(pq.read_table(output / "run_date=2026-11-24").to_pylist(), direct_top_k)


def test_a_listing_block_is_cut_into_read_blocks_by_a_task_that_runs_ahead(ray_local):
    """One map task cuts a listing block into read blocks; the run's dataset lets it make
    MAP_TASK_BLOCKS_AHEAD blocks before the executor takes them (Ray Data's default, 2, made
    it trickle them out while it held a CPU the read tasks waited for)."""
    import ray

    # a private attribute of Ray Data: a release that drops it must fail here, not stall runs
    assert hasattr(ray.data.DataContext.get_current(), "_max_num_blocks_in_streaming_gen_buffer")
    listing = ray.data.from_arrow(pa.table({"source_uri": [f"s3://b/{i}.jpg" for i in range(200)]}))
    blocks = with_limits(unit_blocks(listing, 8), RuntimeSpec())
    assert blocks.context._max_num_blocks_in_streaming_gen_buffer == MAP_TASK_BLOCKS_AHEAD == 64
    tables = list(blocks.iter_batches(batch_format="pyarrow", batch_size=None))
    assert [t.num_rows for t in tables] == [8] * 25
    uris = [uri for t in tables for uri in t["source_uri"].to_pylist()]
    assert sorted(uris) == sorted(f"s3://b/{i}.jpg" for i in range(200))


def test_the_frames_of_one_instance_leave_a_model_batch_at_a_time(
    ray_local, tmp_path, tables_at_driver
):
    """A read task of one file still gives many rows where the file is a multi-frame DICOM."""
    from vision_ops.synthetic import dicom_bytes, phantom_ct

    folder, frames = tmp_path / "ct", 5
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(dicom_bytes(phantom_ct(frames=frames, size=48, seed=0)))
    runtime = {"batch_size": 1, "read_batch_size": 1, "max_actors": 1}
    output = tmp_path / "table"
    spec = job(
        [str(folder)], str(output), runtime=runtime, input={"uris": [str(folder)], "dicom": {}}
    )
    summary = run_job(spec)
    assert tables_at_driver == [1] * frames == [1] * summary.commit.rows
    rows = pq.read_table(output / "run_date=2026-11-24").to_pylist()
    assert sorted(r["frame_index"] for r in rows) == list(range(frames))
    assert {r["status"] for r in rows} == {"ok"}


def write_bad_corpus(folder: Path) -> dict[str, str]:
    """Broken files and the error type each must produce."""
    good = (folder / "chelsea.png").read_bytes()
    jpeg = (folder / "rocket.jpg").read_bytes()
    (folder / "empty.png").write_bytes(b"")
    (folder / "html.jpg").write_bytes(b"<!doctype html><title>404</title>")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "huge.png").write_bytes(png_declaring(100_000, 100_000))
    return {
        "empty.png": "EmptyFile",
        "html.jpg": "NotAnImage",
        "truncated.jpg": "CorruptImage",
        "truncated.png": "CorruptImage",
        "huge.png": "ImageTooLarge",
    }


def test_bad_files_become_error_rows_and_good_ones_survive(
    ray_local, photo_dir, tmp_path, direct_top_k
):
    expected_errors = write_bad_corpus(photo_dir)
    output = tmp_path / "table"
    # an object store budget below one read task's output (16 crops, 2.4 MB) still completes
    runtime = {"batch_size": 4, "max_actors": 1, "queue_mb": 1}
    summary = run_job(job([str(photo_dir)], str(output), run_id="bad-corpus", runtime=runtime))
    rows = pq.read_table(output / "run_date=2026-11-24").to_pylist()
    listed = sorted(p.as_uri() for p in photo_dir.iterdir())
    assert sorted(r["source_uri"] for r in rows) == listed  # each input exactly once
    errors = {Path(r["source_uri"]).name: r for r in rows if r["status"] == "error"}
    assert {name: r["error_type"] for name, r in errors.items()} == expected_errors
    assert all(
        r["error_message"] and r["top_k"] is None and r["label"] is None for r in errors.values()
    )
    assert_matches_direct([r for r in rows if r["status"] == "ok"], direct_top_k)
    assert (summary.commit.ok, summary.commit.errors) == (len(direct_top_k), len(expected_errors))


def test_written_schema_is_the_declared_one(ray_local, photo_dir, tmp_path):
    summary = run_job(job([str(photo_dir / "coffee.png")], str(tmp_path / "t")))
    (path,) = [f.removeprefix("file://") for f in summary.commit.files]
    schema = pq.read_schema(path)
    assert schema.equals(PREDICTION_SCHEMA, check_metadata=False)
    assert schema.metadata[b"vision_ops.schema_version"] == SCHEMA_VERSION.encode()


def test_rerun_of_a_run_id_replaces_its_rows(ray_local, photo_dir, tmp_path):
    output = tmp_path / "table"
    spec = job([str(photo_dir)], str(output), output={"uri": str(output), "rows_per_file": 2})
    first = run_job(spec)
    before = pq.read_table(output / "run_date=2026-11-24").sort_by("item_id")
    second = run_job(spec)
    after = pq.read_table(output / "run_date=2026-11-24").sort_by("item_id")
    assert len(first.commit.files) == len(second.commit.files) == 3
    assert not set(first.commit.files) & set(second.commit.files)  # new names, the old removed
    attempt = committed_run(str(output), "test-run")["attempt"]
    assert sorted(p.name for p in (output / "run_date=2026-11-24").iterdir()) == [
        "_SUCCESS",
        *[f"test-run-{attempt}-part-{i:05d}.parquet" for i in range(3)],
    ]
    assert after.drop(["top_k", "score"]).equals(before.drop(["top_k", "score"]))
    np.testing.assert_allclose(after["score"].to_numpy(), before["score"].to_numpy(), atol=1e-6)
    assert not (output / "_staging").exists()


def predictor_actors() -> set[str]:
    """The ids of every predictor actor the suite's Ray cluster has started, dead or alive
    (Ray's GCS table: its state API needs the dashboard, which the suite leaves off)."""
    import ray._private.state

    actors = ray._private.state.actors().values()
    return {a["ActorID"] for a in actors if "PredictRows" in a["ActorClassName"]}


def test_a_pool_left_open_starts_whole_on_a_fixed_cluster(
    ray_local, photo_dir, tmp_path, direct_top_k
):
    """Two half-CPU actors fit the suite's 2 CPUs beside the reserved one; with min_actors
    left open both start at once. (From `min_actors: 1` Ray Data starts one and adds another
    only while inputs queue for it: these 5 photos, 2 model calls, both go to the first.)"""
    runtime = {"batch_size": 4, "num_cpus_per_actor": 0.5, "reserved_cpus": 1}
    before = predictor_actors()
    summary = run_job(job([str(photo_dir)], str(tmp_path / "table"), runtime=runtime))
    assert len(predictor_actors() - before) == 2
    assert summary.commit.rows == len(direct_top_k) == 5
    rows = pq.read_table(tmp_path / "table" / "run_date=2026-11-24").to_pylist()
    assert_matches_direct(rows, direct_top_k)


def test_the_model_in_the_driver_gives_the_same_rows_and_starts_no_actor(
    ray_local, photo_dir, tmp_path, direct_top_k, monkeypatch
):
    """`runtime.predict_in: driver`: the pool's two half-CPU actors become two predictors in
    threads of the driver (never its main thread), Ray tasks still read, and the rows are
    those of a direct model call, each input once, bad files as error rows."""
    import threading

    import vision_ops.pipeline.run as pipeline_run

    calls: list[int] = []
    loaded: list[int] = []
    runtimes: list[RuntimeSpec] = []

    class Recorded(pipeline_run.PredictRows):  # type: ignore[misc]
        def __init__(self, spec, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            loaded.append(threading.get_ident())
            runtimes.append(spec.runtime)
            super().__init__(spec, *args, **kwargs)

        def __call__(self, batch):  # type: ignore[no-untyped-def]
            calls.append(threading.get_ident())
            return super().__call__(batch)

    monkeypatch.setattr(pipeline_run, "PredictRows", Recorded)
    expected_errors = write_bad_corpus(photo_dir)
    runtime = {"batch_size": 2, "num_cpus_per_actor": 0.5, "reserved_cpus": 1}
    compiled = {"compile": True, "compile_min_inputs": 0, "compile_min_inputs_cold": 0}
    output = tmp_path / "table"
    before = predictor_actors()
    spec = job([str(photo_dir)], str(output), runtime=runtime | compiled | {"predict_in": "driver"})
    assert spec.runtime.retain_host_memory
    summary = run_job(spec)
    assert predictor_actors() == before  # no actor started
    assert len(loaded) == 2 and threading.get_ident() not in loaded + calls
    for used in runtimes:  # uncompiled (not thread-safe), glibc's freed memory kept
        assert not used.compile and not used.retain_host_memory
    assert len(calls) == len(list(photo_dir.iterdir())) // 2  # a model call a batch of 2
    assert_each_input_once(summary, output, photo_dir, direct_top_k, expected_errors)


def assert_each_input_once(
    summary: RunSummary,
    output: Path,
    photo_dir: Path,
    direct: dict[str, tuple[list[str], np.ndarray]],
    errors: dict[str, str],
) -> None:
    """The run committed each file of `photo_dir` once: the photos as a direct model call
    gives them, the broken files as the error rows `errors` names."""
    listed = sorted(p.as_uri() for p in photo_dir.iterdir())
    rows = pq.read_table(output / "run_date=2026-11-24").to_pylist()
    assert sorted(r["source_uri"] for r in rows) == listed
    found = {Path(r["source_uri"]).name: r["error_type"] for r in rows if r["status"] == "error"}
    assert found == errors
    assert_matches_direct([r for r in rows if r["status"] == "ok"], direct)
    assert (summary.commit.ok, summary.commit.errors) == (len(direct), len(errors))


@pytest.mark.parametrize(("driver_max_inputs", "placed"), [(5, "driver"), (4, "actors")])
def test_auto_places_the_model_by_the_runs_size(
    ray_local, photo_dir, tmp_path, direct_top_k, driver_max_inputs, placed
):
    """`predict_in: auto` on the suite's one-node CPU cluster: a run of 5 photos runs in the
    driver's threads where driver_max_inputs allows 5, else in the actor pool; the manifest
    says where, and the rows are a direct model call's either way."""
    runtime = {"batch_size": 4, "num_cpus_per_actor": 0.5, "reserved_cpus": 1}
    auto = {"predict_in": "auto", "driver_max_inputs": driver_max_inputs}
    output = tmp_path / "table"
    before = predictor_actors()
    summary = run_job(job([str(photo_dir)], str(output), runtime=runtime | auto))
    assert len(predictor_actors() - before) == (2 if placed == "actors" else 0)
    assert committed_run(str(output), "test-run")["predict_in"] == placed
    assert summary.commit.rows == len(direct_top_k) == 5
    assert_matches_direct(pq.read_table(output / "run_date=2026-11-24").to_pylist(), direct_top_k)


def test_a_run_in_this_process_gives_a_direct_model_calls_rows_without_ray(
    no_ray, photo_dir, tmp_path, direct_top_k, monkeypatch
):
    """`runtime.runner: in_process`: no Ray is started (`ray.init` fails the test), the inputs
    are read in this process's threads (never its main thread) and predicted in its own, and
    the rows are those of a direct model call, each input once, bad files as error rows; the
    manifest says where it ran, and its start-up has no Ray connect."""
    import threading

    import ray

    import vision_ops.pipeline.in_process as in_process

    readers: set[int] = set()
    read_blocks = in_process.BlockAccessor.batch_to_block

    def recorded(batch, *args, **kwargs):  # type: ignore[no-untyped-def]
        readers.add(threading.get_ident())
        return read_blocks(batch, *args, **kwargs)

    monkeypatch.setattr(in_process.BlockAccessor, "batch_to_block", staticmethod(recorded))
    expected_errors = write_bad_corpus(photo_dir)
    runtime = {"batch_size": 2, "read_batch_size": 3, "runner": "in_process"}
    output = tmp_path / "table"
    summary = run_job(job([str(photo_dir)], str(output), runtime=runtime))
    assert not ray.is_initialized()
    assert readers and threading.get_ident() not in readers
    assert_each_input_once(summary, output, photo_dir, direct_top_k, expected_errors)
    manifest = committed_run(str(output), "test-run")
    assert (manifest["runner"], manifest["predict_in"]) == ("in_process", "driver")
    assert "ray_connect" not in manifest["startup_seconds"]


@pytest.mark.parametrize(("driver_max_inputs", "runner"), [(5, "in_process"), (4, "ray")])
def test_auto_runs_a_short_run_in_this_process_and_a_longer_one_on_ray(
    own_ray_root, photo_dir, tmp_path, direct_top_k, driver_max_inputs, runner
):
    """`runner: auto` with no cluster to join and Ray not up: a run of 5 photos runs in this
    process where driver_max_inputs allows 5, else Ray starts; the rows are a direct model
    call's either way."""
    import ray

    auto = {"batch_size": 4, "runner": "auto", "driver_max_inputs": driver_max_inputs}
    output = tmp_path / "table"
    summary = run_job(job([str(photo_dir)], str(output), runtime=auto))
    assert ray.is_initialized() == (runner == "ray")
    assert committed_run(str(output), "test-run")["runner"] == runner
    assert summary.commit.rows == len(direct_top_k) == 5
    assert_matches_direct(pq.read_table(output / "run_date=2026-11-24").to_pylist(), direct_top_k)


def test_an_incremental_run_in_this_process_skips_the_done_and_retries_the_errors(
    no_ray, photo_dir, tmp_path, direct_top_k
):
    """Incremental runs in this process: the second leaves out the photos the first committed,
    processes the one added since and tries the first's error row again."""
    photos = sorted(photo_dir.iterdir())
    (photo_dir / "broken.png").write_bytes(photos[0].read_bytes()[:100])
    held_back = tmp_path / "later"
    held_back.mkdir()
    photos[-1].rename(held_back / photos[-1].name)
    output = tmp_path / "table"
    runtime = {"batch_size": 2, "runner": "in_process"}
    first = run_job(job([str(photo_dir)], str(output), "first", runtime=runtime))
    assert (first.commit.ok, first.commit.errors) == (4, 1)
    (held_back / photos[-1].name).rename(photo_dir / photos[-1].name)
    incremental = {"incremental": True, "id": "second", "date": "2026-11-25"}
    second = run_job(job([str(photo_dir)], str(output), runtime=runtime, run=incremental))
    assert (second.skipped_as_done, second.retried, second.inputs) == (4, 1, 2)
    rows = pq.read_table(output / "run_date=2026-11-25").to_pylist()
    names = {Path(r["source_uri"]).name: r["status"] for r in rows}
    assert names == {photos[-1].name: "ok", "broken.png": "error"}
    added = {photos[-1].name: direct_top_k[photos[-1].name]}
    assert_matches_direct([r for r in rows if r["status"] == "ok"], added)


def test_a_run_is_placed_before_its_compile_is_decided(tmp_path, caplog) -> None:
    """`sized_for_units` settles where the model runs first, then whether it compiles: a
    short `auto` run with compile on goes to the driver uncompiled (it would not have
    compiled), a long one to compiled actors; the driver's way is never told of a compile it
    does not make, nor its threads more than its model calls."""
    from vision_ops.pool import PoolPlan

    thresholds = {"compile": True, "compile_min_inputs": 100, "compile_min_inputs_cold": 300}
    auto = job(["/p"], str(tmp_path), runtime=thresholds | {"predict_in": "auto"}).sized(0)
    plan = PoolPlan(2, 2, 0.5, 0.0, threads=1)
    short, threads = sized_for_units(auto, plan, 10)
    assert short.runtime.predict_in == "driver" and not short.runtime.compile
    assert threads.max_size == 2
    long, _ = sized_for_units(auto, plan, 300)
    assert long.runtime.predict_in == "actors" and long.runtime.compile
    driver = job(["/p"], str(tmp_path), runtime=thresholds | {"predict_in": "driver"}).sized(0)
    with caplog.at_level("INFO", logger="vision_ops.pipeline.run"):
        warm_only, _ = sized_for_units(driver, plan, 150)
    assert not warm_only.runtime.compile and not warm_only.runtime.compile_only_where_cached
    assert "compiled only on nodes that compiled it before" not in caplog.text
    _, threads = sized_for_units(driver, plan, 3)  # 3 units: one model call of 8
    assert threads.max_size == 1


def test_the_model_in_the_driver_is_refused_where_it_cannot_be_the_pool() -> None:
    """Refused before any work: GPUs for the pool, more than one node, an autoscaling
    cluster; a tiled detection job (its scenes' rows are merged after the pool) at parsing."""
    from vision_ops.pool import NotInTheDriver, PoolPlan, check_in_driver

    driver = RuntimeSpec(predict_in="driver")
    one_node = [({"CPU": 8.0, "GPU": 0.0}, 1.0)]
    check_in_driver(driver, PoolPlan(1, 4, 2, 0), one_node)  # fits
    check_in_driver(RuntimeSpec(), PoolPlan(1, 1, 1, 1), one_node * 2)  # actors: no check
    cases = [
        (driver, PoolPlan(1, 1, 1, 1), one_node, "this cluster has GPUs for the predictor pool"),
        (driver, PoolPlan(1, 4, 2, 0), one_node * 2, "this cluster has 2 nodes"),
        (RuntimeSpec(predict_in="driver", autoscaling=True), PoolPlan(1, 4, 2, 0), one_node,
         "1 node, autoscaling"),
    ]  # fmt: skip
    for runtime, plan, nodes, found in cases:
        with pytest.raises(NotInTheDriver, match=f"{found}: expected predict_in: actors"):
            check_in_driver(runtime, plan, nodes)
    with pytest.raises(ValueError, match="merged in Ray after the actor pool"):
        parse_spec(
            {
                "input": {"uris": ["s3://b/scenes/"], "tiling": {"size": 512}},
                "task": {"kind": "detection"},
                "model": {"architecture": "fasterrcnn_resnet50_fpn", "weights": "w.pt"},
                "runtime": {"predict_in": "driver"},
                "output": {"uri": "s3://b/out"},
            }
        )


def test_unschedulable_pool_is_refused_before_any_work(ray_local, photo_dir, tmp_path):
    output = tmp_path / "never"
    spec = job([str(photo_dir)], str(output), runtime={"min_actors": 2})
    with pytest.raises(ClusterTooSmall, match=r"min_actors=2 .* expected min_actors <= 1"):
        run_job(spec)
    assert not output.exists()


def test_a_table_inside_the_input_folder_is_never_its_own_input(ray_local, photo_dir, direct_top_k):
    """The table lies in the folder the run lists, and every extension is kept: the second
    run lists the photos only, not the first run's part files, manifest and index (they
    became error rows and inputs the promise counted)."""
    output = photo_dir / "predictions"
    spec = job([str(photo_dir)], str(output), input={"uris": [str(photo_dir)], "extensions": []})
    first = run_job(spec)
    second = run_job(spec.model_copy(update={"run": spec.run.model_copy(update={"id": "again"})}))
    assert first.inputs == second.inputs == len(direct_top_k)
    rows = pq.read_table(output / "run_date=2026-11-24", filters=[("run_id", "=", "again")])
    assert_matches_direct(rows.to_pylist(), direct_top_k)
