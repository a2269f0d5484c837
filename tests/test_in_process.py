"""A short run in this one process (`runtime.runner`): what sends a run to Ray, the listing held
here, the reads in threads, the model batches; the command itself starts no Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from vision_ops.config import SpecError, parse_spec
from vision_ops.errors import ReadFailed
from vision_ops.pipeline.in_process import (
    model_batches,
    ray_chosen_for,
    read_in_threads,
)
from vision_ops.pipeline.listing import held_listing
from vision_ops.sink import committed_run
from vision_ops.sources import SourceError, plan_inputs

pytestmark = pytest.mark.timeout(300)
IN_PROCESS = {"runner": "in_process"}


def spec_of(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "input": {"uris": ["/data/photos"]},
        "model": {"architecture": "resnet18", "weights": None},
        "runtime": dict(IN_PROCESS),
        "output": {"uri": "/data/out"},
    }
    for key, value in changes.items():
        raw[key] = raw.get(key, {}) | value
    return raw


@pytest.mark.parametrize(
    ("changes", "found"),
    [
        ({"input": {"uris": [], "manifest": "s3://b/list.csv"}}, "a manifest, which Ray Data"),
        ({"input": {"tiling": {"size": 256}}}, "cut into tiles, planned in Ray tasks"),
        ({"input": {"dicom": {}}}, "DICOM instance's frames are read in blocks that Ray Data"),
        ({"runtime": {"device": "cuda"}}, "asked onto a GPU"),
        ({"runtime": {"num_gpus_per_actor": 1}}, "asked onto a GPU"),
        ({"runtime": {"autoscaling": True}}, "runtime.autoscaling is set"),
    ],
)
def test_what_needs_ray_is_refused_in_process_as_the_spec_is_read(
    changes: dict[str, Any], found: str
) -> None:
    with pytest.raises(SpecError, match=f"{found}.*: expected runner: ray \\(or auto\\)"):
        parse_spec(spec_of(**changes))
    auto = spec_of(**changes)
    auto["runtime"] = auto["runtime"] | {"runner": "auto"}
    assert found in (ray_chosen_for(parse_spec(auto)) or "")  # auto takes Ray instead


def test_auto_takes_ray_where_a_cluster_is_named_or_up_or_the_frames_are_uncounted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    auto = spec_of(runtime={"runner": "auto", "device": "cpu"})
    assert ray_chosen_for(parse_spec(auto)) is None
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert ray_chosen_for(parse_spec(auto)) == "RAY_ADDRESS names a cluster to join"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert ray_chosen_for(parse_spec(auto)) == "Ray is up in this process already"


def photos(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for index in range(count):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:02d}.png")
    return sorted((folder / f"img{index:02d}.png").as_uri() for index in range(count))


def test_a_listing_held_here_keeps_each_uri_once_and_leaves_out_its_table(tmp_path: Path) -> None:
    """Two parts naming the same photos: each once, the first part's row; nothing under the
    run's own table; none listed: the spec's own error."""
    uris = photos(tmp_path / "in", 4)
    table = tmp_path / "in" / "table"
    table.mkdir()
    Image.new("RGB", (4, 4)).save(table / "mask.png")
    spec = parse_spec(
        spec_of(input={"uris": [str(tmp_path / "in"), str(tmp_path / "in" / "img01.png")]})
    )
    held = held_listing(spec.input, plan_inputs(spec.input), table.as_uri() + "/")
    assert held is not None
    assert held.rows["source_uri"].to_pylist() == [uris[1], uris[0], uris[2], uris[3]]
    assert held.count == 4
    named = plan_inputs(spec.input)  # img01 twice: 5 rows, 4 inputs
    assert held_listing(spec.input, named, table.as_uri() + "/", most=3) is None
    assert held_listing(spec.input, plan_inputs(spec.input), table.as_uri() + "/", most=4)
    (tmp_path / "empty").mkdir()
    empty = parse_spec(spec_of(input={"uris": [str(tmp_path / "empty")]}))
    with pytest.raises(SourceError, match="no input"):
        held_listing(empty.input, plan_inputs(empty.input))


def block(first: int, count: int) -> dict[str, np.ndarray]:
    return {"status": np.full(count, "ok"), "n": np.arange(first, first + count)}


def test_model_batches_are_cut_and_joined_across_read_blocks() -> None:
    from ray.data.block import BlockAccessor

    sizes = [3, 1, 5, 2]
    starts = np.cumsum([0, *sizes[:-1]])
    blocks = [BlockAccessor.batch_to_block(block(s, n)) for s, n in zip(starts, sizes, strict=True)]
    batches = list(model_batches(blocks, 4))
    assert [batch["n"].tolist() for batch in batches] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10],
    ]


def test_reads_run_in_threads_ahead_in_order_and_a_failure_ends_them() -> None:
    rows = pa.table({"source_uri": [f"u{i}" for i in range(10)]})
    seen: list[int] = []
    lock = threading.Lock()

    def read(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        with lock:
            seen.append(threading.get_ident())
        first = int(batch["source_uri"][0][1:])
        time.sleep(0.01 * (10 - first))  # later reads finish first
        return [block(first, len(batch["source_uri"]))]

    reads = read_in_threads(rows, read, files=1, threads=2)
    next(reads)
    time.sleep(0.3)  # the consumer holds back: the reads stop at twice the threads
    assert len(seen) == 4
    reads.close()
    seen.clear()
    blocks = list(read_in_threads(rows, read, files=3, threads=2))
    from ray.data.block import BlockAccessor

    got = [BlockAccessor.for_block(b).to_batch_format("numpy")["n"].tolist() for b in blocks]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert len(set(seen)) == 2 and threading.get_ident() not in seen

    def failing(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        raise OSError("the store went away")

    before = threading.active_count()
    with pytest.raises(ReadFailed, match=r"^OSError: the store went away$") as failed:
        list(read_in_threads(rows, failing, files=3, threads=2))
    assert isinstance(failed.value.__cause__, OSError)
    assert threading.active_count() == before  # no reader left behind


def test_the_command_runs_a_short_job_without_starting_ray(tmp_path: Path) -> None:
    """`vision-ops run` with `runner: auto`, no cluster named: a short run commits in the one
    process, and Ray's temp root ($TMPDIR/ray) is never made: no Ray started."""
    uris = photos(tmp_path / "photos", 3)
    raw = {
        "input": {"uris": [str(tmp_path / "photos")]},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "vision_ops.zoo:efficientnet_lite0",
            "labels": "imagenet-1k",
            "preprocessing": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "runtime": {"runner": "auto", "batch_size": 2},
        "output": {"uri": str(tmp_path / "table")},
        "run": {"id": "short", "date": "2026-11-24"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    temp = tmp_path / "temp"
    temp.mkdir()
    drop = {"RAY_ADDRESS", "RAY_TMPDIR"}
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"TMPDIR": str(temp)}
    command = [sys.executable, "-m", "vision_ops.cli", "run", str(tmp_path / "job.yaml")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "run short: 3 items, 3 ok, 0 errors" in done.stdout
    assert "Ray connect" not in done.stdout
    assert not (temp / "ray").exists()
    manifest = committed_run(str(tmp_path / "table"), "short")
    assert manifest is not None and manifest["runner"] == "in_process"
    rows = pq.read_table(tmp_path / "table" / "run_date=2026-11-24")
    assert sorted(rows["source_uri"].to_pylist()) == uris


def test_a_run_in_process_runs_on_the_cpus_whatever_the_device_says(tmp_path: Path) -> None:
    """`device: auto` on a machine with a GPU would pick it in the driver's threads, while the
    run's numerics (and resume key) say CPU: the run in process is set to the CPUs."""
    from vision_ops.pipeline.run import in_process

    spec = parse_spec(spec_of(runtime={"device": "auto", "autocast": "float16"}))
    placed = in_process(spec).runtime
    assert (placed.device, placed.predict_in) == ("cpu", "driver")
    assert placed.numerics(0) == spec.sized(0).runtime.numerics(0)


def test_the_processs_own_sigterm_handler_outlasts_rays_start(own_ray_root: None) -> None:
    """`ray.init` sets Ray's SIGTERM handler; where the process had set its own (the command
    line's, before `auto` found the listing too long for one process) it is put back."""
    import signal

    from vision_ops.pipeline.connect import connect_ray

    def ours(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    before = signal.signal(signal.SIGTERM, ours)
    try:
        connect_ray()
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)
