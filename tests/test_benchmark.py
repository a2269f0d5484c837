"""`vision-ops bench`: deterministic photos, memory probes that see a child's allocation, the
rate arithmetic, and a tiny run of every approach whose JSON holds what the table printed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from process_session import kill_session
from toolchain import cannot_compile

from vision_ops.benchmark.e2e import queued_share
from vision_ops.benchmark.photos import JPEG_QUALITY, PHOTO_SIZE, ensure_photos, photo_set
from vision_ops.benchmark.probes import Peaks, sampled_peaks
from vision_ops.benchmark.rates import points_from_times, shared_core_ceiling, steady_rate
from vision_ops.benchmark.report import (
    CEILING,
    GPU_CEILING,
    LABEL_WIDTH,
    RATIOS,
    SCALED_RATIOS,
    BenchReport,
    Measurement,
    format_table,
)
from vision_ops.benchmark.spec import BenchSpec, job_spec, parse_bench_spec, runtime_overrides
from vision_ops.config import SpecError

MB = 1024**2
TINY = 6  # photos in the end-to-end run of the command
SCALE = 2  # ... and its jobs again on SCALE x TINY photos


def quantization_at(quality: int) -> dict[int, list[int]]:
    """Pillow's JPEG quantization tables at `quality` (what a photo saved at it carries)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG", quality=quality)
    with Image.open(buffer) as image:
        return {k: list(v) for k, v in image.quantization.items()}


def test_photos_are_deterministic_500x375_quality_90_jpegs(tmp_path: Path) -> None:
    first = ensure_photos(tmp_path / "one", 4, seed=0)
    again = ensure_photos(tmp_path / "two", 4, seed=0)
    other = ensure_photos(tmp_path / "three", 4, seed=1)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]
    assert len({p.read_bytes() for p in first}) == 4  # four different crops
    for path in first:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", PHOTO_SIZE)
            assert {k: list(v) for k, v in image.quantization.items()} == quantization_at(
                JPEG_QUALITY
            )
            pixels = image.convert("L").getextrema()
        assert pixels[1] - pixels[0] > 100  # a photograph, not a flat fill


def test_photo_sets_are_cached_and_hold_exactly_n(tmp_path: Path) -> None:
    folder = photo_set(tmp_path, 5, seed=0)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert sorted(stamps) == [f"photo-{i:06d}.jpg" for i in range(5)]
    assert photo_set(tmp_path, 5, seed=0) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # not rewritten
    bigger = photo_set(tmp_path, 7, seed=0)
    assert len(list(bigger.glob("*.jpg"))) == 7
    assert (bigger / "photo-000004.jpg").read_bytes() == (folder / "photo-000004.jpg").read_bytes()


ALLOCATE = "import time; block = b'x' * ({size}); print('ready', flush=True); time.sleep({hold})"


def test_probes_see_a_child_process_allocation() -> None:
    import psutil

    size = 200 * MB
    # this process alone: an earlier test's Ray workers may exit meanwhile, freeing more
    driver = psutil.Process(os.getpid()).memory_info().rss
    with sampled_peaks(interval_s=0.05) as peaks:
        child = subprocess.run(
            [sys.executable, "-c", ALLOCATE.format(size=size, hold=2.0)],
            capture_output=True,
            text=True,
            check=True,
        )
    assert child.stdout.strip() == "ready"
    assert peaks.processes >= 2
    assert peaks.rss_bytes >= driver + size
    # the peak's sample by process role: this process and the child, which held the 200 MB
    assert sum(peaks.pss_by_role.values()) == peaks.pss_bytes
    assert max(v for role, v in peaks.pss_by_role.items() if role != "driver") >= size
    assert peaks.pss_bytes >= size  # PSS is sampled every PSS_EVERY ticks: 0.5 s here
    if ray.is_initialized():  # an earlier test's cluster: its store is read, not this child's
        assert peaks.object_store_bytes is not None and peaks.object_store_bytes >= 0
    else:
        assert peaks.object_store_bytes is None
    # the child holds its memory for 2 s; a loaded machine (or an earlier test's Ray processes
    # to walk) stretches a tick well past 0.05 s, so only repeated sampling is asserted
    assert peaks.samples >= 3


# Run in a process of its own: this process's tree holds the Ray workers of earlier tests,
# whose memory moves between two windows by more than the child's 100 MB.
EXCLUSION_PROBE = """
import json, subprocess, sys, time
import ray  # imported by the sampler's object-store gauge: loaded before either window
from vision_ops.benchmark.probes import sampled_peaks
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
try:
    assert child.stdout.readline().strip() == "ready"
    with sampled_peaks(interval_s=0.05, exclude=frozenset({child.pid})) as left_out:
        time.sleep(0.3)
    with sampled_peaks(interval_s=0.05) as counted:
        time.sleep(0.3)
finally:
    child.kill()
    child.wait()
fields = ("rss_bytes", "processes")
print(json.dumps([{f: getattr(p, f) for f in fields} for p in (left_out, counted)]))
"""


def test_probes_leave_out_excluded_processes() -> None:
    allocate = ALLOCATE.format(size=100 * MB, hold=60.0)
    probe = subprocess.run(
        [sys.executable, "-c", EXCLUSION_PROBE, allocate], capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr
    left_out, counted = json.loads(probe.stdout)
    assert (left_out["processes"], counted["processes"]) == (1, 2)
    assert counted["rss_bytes"] - left_out["rss_bytes"] >= 100 * MB


# A child that spends a second of CPU time, and a grandchild (`sleep`) that spends none.
BUSY = """
import subprocess, time
sleeper = subprocess.Popen(["sleep", "3"])
while time.process_time() < 1.0:
    pass
sleeper.wait()
"""
# Run in a process of its own, as EXCLUSION_PROBE is: this process's tree may hold an earlier
# test's Ray processes or S3 server, whose CPU would be counted too.
CPU_PROBE = """
import json, subprocess, sys, time
import ray  # imported by the sampler's object-store gauge: loaded before the window
from vision_ops.benchmark.probes import sampled_peaks
before = time.process_time()
with sampled_peaks(interval_s=0.05) as peaks:
    subprocess.run([sys.executable, "-c", sys.argv[1]], check=True)
driver = time.process_time() - before
found = {"by_role": peaks.cpu_seconds_by_role, "sampler": peaks.sampler_cpu_seconds}
print(json.dumps(found | {"driver": driver}))
"""


def test_probes_count_where_the_cpu_went() -> None:
    probe = subprocess.run([sys.executable, "-c", CPU_PROBE, BUSY], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    by_role = found["by_role"]
    assert len(by_role) == 3 and {"driver", "sleep"} < set(by_role), by_role
    (busy,) = [v for role, v in by_role.items() if role not in ("driver", "sleep")]  # the child
    # its second and its start-up; /proc counts in clock ticks (0.01 s), rounded down
    assert 0.98 <= busy < 1.5, by_role
    assert 0.0 <= by_role["sleep"] < 0.1, by_role  # a grandchild, seen and idle
    assert by_role["driver"] == pytest.approx(found["driver"], abs=0.2), found  # its own
    assert 0 < found["sampler"] <= by_role["driver"] + 0.02, found  # the sampling's share


@pytest.mark.parametrize(
    ("command", "role"),
    [
        ("ray::MapWorker(MapBatches(Rows)).submit", "ray worker MapWorker(MapBatches(Rows))"),
        ("ray::_StatsActor.update_iteration_metrics", "ray worker _StatsActor"),
        ("ray::_StatsActor", "ray worker _StatsActor"),
        ("ray::IDLE", "ray worker IDLE"),
        ("ray::ReadFiles->MapBatches(fetch)", "ray worker ReadFiles->MapBatches(fetch)"),
        ("/venv/bin/python /venv/bin/ray start --head", "ray start (a running head's keeper)"),
        ("/venv/bin/python -m ray.util.client.server --address=x", "ray client server"),
        ("/venv/lib/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/x", "ray gcs_server"),
    ],
)  # fmt: skip
def test_a_process_is_named_by_its_role(command: str, role: str) -> None:
    """A Ray worker by its title (an actor running a method as the actor), Ray's own
    processes by a word of their command line."""
    from types import SimpleNamespace

    from vision_ops.benchmark.probes import process_role

    process = SimpleNamespace(cmdline=command.split, name=lambda: "python")
    assert process_role(process) == role  # type: ignore[arg-type]


def test_steady_rate_excludes_start_up() -> None:
    # first batch of 4 at 10 s (after start-up), then 16 more by 12 s: 8 rows/s
    assert steady_rate([(10.0, 4), (11.0, 12), (12.0, 20)]) == pytest.approx(8.0)
    assert steady_rate([(10.0, 20)]) is None  # one piece: no steady state
    assert steady_rate([(10.0, 4), (10.2, 20)]) is None  # a burst, not a rate
    # two actors, 4-row blocks each 1 s of work: 8 rows/s; their first blocks arrive at 10.0
    # and 10.1 (the second made before the first arrived), and as the pool drains its last
    # blocks (made while the window was open) arrive at 13.3 and 13.4
    two = [(10.0, 4), (10.1, 8), (11.0, 12), (11.1, 16), (12.0, 20), (12.1, 24)]
    two += [(13.0, 28), (13.1, 32), (13.3, 36), (13.4, 40)]
    assert steady_rate(two) == pytest.approx(36 / 3.4)  # biased: counts the 2nd first block
    assert steady_rate(two, edge_rows=8) == pytest.approx(24 / 3.0)  # 8 -> 32 rows
    assert steady_rate(two[:7], edge_rows=8) is None  # 8 -> 20 rows: under two rounds
    assert steady_rate(two, edge_rows=20) is None  # the window holds one point
    points = points_from_times([5.0, 5.0, 7.0, 6.0, 6.0, 7.0])
    assert points == [(5.0, 2), (6.0, 4), (7.0, 6)]
    assert shared_core_ceiling(300.0, 60.0) == pytest.approx(50.0)


def measurement(key: str, rate: float, steady: bool = True) -> Measurement:
    return Measurement(key, key, 8, 8, rate, steady, 2.0, Peaks(rss_bytes=MB), "")


def test_report_ratios_follow_the_rates() -> None:
    report = BenchReport({})
    report.measurements = [
        measurement("a", 300.0),
        measurement("b", 60.0),
        measurement("c", 40.0),
        measurement("d", 20.0),
        measurement("e", 50.0, steady=False),
    ]
    ratios = report.ratios()
    assert report.rates()[CEILING] == pytest.approx(50.0)
    assert ratios == {
        "e2e / naive Ray Data": pytest.approx(2.0),
        "e2e / DataLoader": pytest.approx(0.8),
        "e2e / shared-core ceiling 1/(1/a+1/b)": pytest.approx(0.8),
        "e2e / model-only": pytest.approx(40 / 60),
    }
    assert report.unsteady_ratios() == ["e2e / DataLoader"]
    assert report.measurements[0].wall_images_per_second == pytest.approx(4.0)


def test_the_scaled_run_gives_the_pipelines_ratios_where_n_images_are_too_few() -> None:
    report = BenchReport({"model": "m", "images": 8, "photo": "p", "batch_size": 8})
    report.settings |= {"device": "cpu", "cores": 2, "sample_interval_s": 0.2}
    report.measurements = [
        measurement("a", 300.0),
        measurement("b", 60.0),
        measurement("c", 20.0, steady=False),
        measurement("c-scale", 45.0),
        measurement("f", 50.0),
        measurement("f-scale", 60.0),
        measurement("c-s3", 18.0, steady=False),
    ]
    ratios = report.ratios()
    assert ratios["e2e / Daft"] == pytest.approx(0.4)
    assert ratios["e2e at scale / Daft"] == pytest.approx(0.75)  # Daft at scale x N too
    assert ratios["e2e at scale / shared-core ceiling 1/(1/a+1/b)"] == pytest.approx(0.9)
    assert ratios["e2e at scale / model-only"] == pytest.approx(0.75)
    assert not any(label.startswith("e2e at scale / e2e") for label in ratios)  # no S3 twin
    unsteady = report.unsteady_ratios()
    assert "e2e / Daft" in unsteady and "e2e at scale / Daft" not in unsteady
    table = format_table(report)
    assert f"{'e2e at scale / Daft':<{LABEL_WIDTH}}    0.75x\n" in table
    assert f"{'e2e / Daft':<{LABEL_WIDTH}}    0.40x *\n" in table


def test_wall_and_pss_ratios_set_each_job_against_its_peers_at_the_same_size() -> None:
    """Wall img/s and peak PSS of the pipeline over each peer's, never across sizes."""
    report = BenchReport({"model": "m", "images": 8, "photo": "p", "batch_size": 8})
    report.settings |= {"device": "cpu", "cores": 2, "sample_interval_s": 0.2}
    sized = []
    for key, rows, wall, pss in (
        ("c", 8, 4.0, 300),
        ("f", 8, 2.0, 200),
        ("e", 8, 8.0, 100),
        ("c-scale", 32, 8.0, 330),
        ("f-scale", 32, 5.0, 220),
    ):
        m = measurement(key, 10.0)
        m.rows = m.expected_rows = rows
        m.wall_seconds, m.peaks = wall, Peaks(rss_bytes=2 * pss * MB, pss_bytes=pss * MB)
        sized.append(m)
    report.measurements = sized
    assert report.wall_ratios() == {
        "e2e / Daft": pytest.approx(0.5),  # 2 img/s over Daft's 4
        "e2e / DataLoader": pytest.approx(2.0),
        "e2e at scale / Daft": pytest.approx(5 / 8),  # 4 img/s over 6.4
    }
    assert report.pss_ratios() == {
        "e2e PSS / Daft": pytest.approx(1.5),
        "e2e PSS / DataLoader": pytest.approx(3.0),
        "e2e at scale PSS / Daft": pytest.approx(1.5),
    }
    sizes = report.same_size()
    assert [s["images"] for s in sizes] == [8, 32]
    assert sorted(sizes[0]["approaches"]) == ["c", "e", "f"]
    assert sorted(sizes[1]["approaches"]) == ["c-scale", "f-scale"]
    assert sizes[1]["approaches"]["f-scale"]["wall_images_per_second"] == pytest.approx(6.4)
    table = format_table(report)
    wall_at = table.index("ratios of wall img/s")
    assert wall_at < table.index("ratios of steady img/s") < table.index("ratios of peak PSS")
    assert f"{'e2e at scale / Daft':<{LABEL_WIDTH}}    0.62x\n" in table[wall_at:]


def test_the_model_in_the_driver_is_set_against_the_pool_and_the_peers_at_each_size() -> None:
    """g (the pipeline with `predict_in: driver`) gets the pipeline's ratios against each
    peer, and its own against the actor pool (c), at N and at scale x N, never across."""
    report = BenchReport({"model": "m", "images": 8, "photo": "p", "batch_size": 8})
    report.settings |= {"device": "cpu", "cores": 2, "sample_interval_s": 0.2}
    sized = []
    for key, rows, rate, wall, pss in (
        ("c", 8, 10.0, 4.0, 300),
        ("g", 8, 12.0, 2.0, 150),
        ("f", 8, 10.0, 2.0, 200),
        ("c-scale", 32, 10.0, 8.0, 330),
        ("g-scale", 32, 11.0, 4.0, 165),
        ("f-scale", 32, 10.0, 5.0, 220),
    ):
        m = measurement(key, rate)
        m.rows = m.expected_rows = rows
        m.wall_seconds, m.peaks = wall, Peaks(rss_bytes=2 * pss * MB, pss_bytes=pss * MB)
        sized.append(m)
    report.measurements = sized
    wall = report.wall_ratios()
    assert {label: wall[label] for label in wall if label.startswith("e2e in driver")} == {
        "e2e in driver / Daft": pytest.approx(1.0),  # 4 img/s over Daft's 4
        "e2e in driver at scale / Daft": pytest.approx(8 / 6.4),
        "e2e in driver / e2e": pytest.approx(2.0),
        "e2e in driver at scale / e2e at scale": pytest.approx(2.0),
    }
    assert wall["e2e / Daft"] == pytest.approx(0.5)  # the pool's, as before
    pss = report.pss_ratios()
    assert pss["e2e in driver PSS / e2e"] == pytest.approx(0.5)
    assert pss["e2e in driver at scale PSS / Daft"] == pytest.approx(0.75)
    steady = report.ratios()
    assert steady["e2e in driver / e2e"] == pytest.approx(1.2)
    assert steady["e2e in driver at scale / e2e at scale"] == pytest.approx(1.1)
    assert "e2e in driver / Daft" not in steady  # its steady rate against the pool's only
    assert sorted(report.same_size()[1]["approaches"]) == ["c-scale", "f-scale", "g-scale"]
    table = format_table(report)
    assert f"{'e2e in driver / e2e':<{LABEL_WIDTH}}    2.00x\n" in table


def test_on_a_gpu_the_ceiling_is_the_slower_of_decode_and_model() -> None:
    """The CPUs decode while the GPU runs the model: the pipeline can reach min(a, b)."""
    settings = {"model": "m", "images": 8, "photo": "p", "batch_size": 8, "device": "cuda"}
    report = BenchReport(settings | {"cores": 16, "sample_interval_s": 0.2})
    report.measurements = [measurement(k, r) for k, r in (("a", 3000.0), ("b", 4000.0))]
    report.measurements.append(measurement("c", 2700.0))
    assert report.rates()[GPU_CEILING] == pytest.approx(3000.0)
    assert CEILING not in report.rates()
    assert report.ratios()["e2e / GPU ceiling min(a, b)"] == pytest.approx(0.9)
    assert "e2e / shared-core ceiling 1/(1/a+1/b)" not in report.ratios()
    table = format_table(report)
    assert f"{'GPU ceiling min(a, b)':<{LABEL_WIDTH}}  3000.0 img/s" in table
    assert report.as_json()["gpu_ceiling_images_per_second"] == pytest.approx(3000.0)


def test_a_pipeline_rate_on_crops_decoded_ahead_is_marked() -> None:
    """Where the read tasks decoded most of the run while the actors started (a GPU node, a
    compile), or the rate beat decoding's own ceiling, the steady window timed the actors
    alone: the row, the ratios using it and the JSON say so, with the evidence."""
    settings = {"model": "m", "images": 8, "photo": "p", "batch_size": 8, "device": "cuda"}
    report = BenchReport(settings | {"cores": 16, "sample_interval_s": 0.2})
    report.measurements = [measurement(k, r) for k, r in (("a", 2600.0), ("b", 11700.0))]
    c = measurement("c", 3800.0)
    report.measurements.append(c)
    c.queued_share = 1.003  # the H200 run: every crop queued, other objects besides
    marked = ["e2e / GPU ceiling min(a, b)", "e2e / model-only"]
    assert report.ran_ahead_ratios() == marked == report.as_json()["ratios_ran_ahead"]
    assert report.ran_ahead() == {"c": "c held 100% of its crops"}
    table = format_table(report)
    assert "  3800.0^" in table and "(c held 100% of its crops)" in table
    assert f"{'e2e / GPU ceiling min(a, b)':<{LABEL_WIDTH}}    1.46x ^\n" in table
    c.queued_share = 0.1  # a bounded queue: the rate above a gives it away
    assert report.ran_ahead() == {"c": "c beat a"}
    c.images_per_second = 2400.0  # decoding in step
    assert report.ran_ahead() == {} and "ran ahead" not in format_table(report)
    c.queued_share, c.steady_state = 1.0, False  # no steady window: marked * alone
    assert report.ran_ahead() == {} and "  2400.0*" in format_table(report)
    c.queued_share, c.steady_state = None, True  # the actors decode: no evidence either way
    c.images_per_second = 3800.0
    assert report.ran_ahead() == {}


def test_the_queued_share_is_the_object_stores_peak_over_the_decoded_crops() -> None:
    """With the read tasks decoding (a GPU node's default), the share of the run's 224 x 224 x
    3 crops the object store held at its peak; with the actors decoding, none."""
    for gpus, decode, share in ((1, "tasks", 0.5), (1, "device", None), (0, "device", None)):
        bench = parse_bench_spec({"runtime": {"decode": decode}} if gpus else {})
        paths = {"input_uri": "/p", "output_uri": "/o", "weights": Path("/w")}
        spec = job_spec(bench, **paths, run_id="r", gpus=gpus)
        assert spec.runtime.decode == decode
        assert queued_share(spec, 10, 5 * 224 * 224 * 3) == share
        assert queued_share(spec, 10, None) is None  # the store's use not seen


def test_runtime_comes_from_a_spec_file_and_is_validated(tmp_path: Path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("input: {uris: [x]}\nruntime:\n  batch_size: 8\n  read_batch_size: 4\n")
    bench = parse_bench_spec({"images": 4, "runtime": runtime_overrides(spec_file)})
    job = job_spec(
        bench,
        input_uri="/photos",
        output_uri="/out",
        weights=Path("/w.pt"),
        run_id="bench",
        gpus=0,
    )
    assert (job.runtime.batch_size, job.runtime.read_batch_size) == (8, 4)
    runtime = job.runtime  # CPU only: one single-threaded actor per core, half the CPUs reserved
    assert runtime.min_actors == runtime.max_actors == bench.cores
    held = runtime.max_actors * runtime.num_cpus_per_actor
    assert held + runtime.reserved_cpus == pytest.approx(max(2, bench.cores))
    assert runtime.reserved_cpus == max(1, bench.cores // 2) and runtime.compile
    assert runtime.decode == "device"  # the actors decode their own batches
    bad = parse_bench_spec({"runtime": {"batch_sise": 8}})
    with pytest.raises(SpecError, match="batch_sise"):
        job_spec(bad, input_uri="/p", output_uri="/o", weights=Path("/w"), run_id="r", gpus=0)
    with pytest.raises(SpecError, match="expected letters among a"):
        parse_bench_spec({"only": ("a", "z")})
    (tmp_path / "flat.yaml").write_text("batch_size: 8\n")
    with pytest.raises(SpecError, match="expected a `runtime:` mapping"):
        runtime_overrides(tmp_path / "flat.yaml")


@pytest.mark.parametrize(("gpus", "batch", "read_batch"), [(0, 8, 4 * 8), (1, 256, 16)])
def test_bench_batch_is_the_jobs_derived_one_unless_given(
    gpus: float, batch: int, read_batch: int
) -> None:
    """CPUs: the actors decode (4 batches a read task); a GPU: one actor, read tasks decode."""

    def sized(bench: BenchSpec) -> tuple[int | None, int | None]:
        where = {"input_uri": "/p", "output_uri": "/o", "weights": Path("/w"), "run_id": "r"}
        runtime = job_spec(bench, **where, gpus=gpus).runtime
        return runtime.batch_size, runtime.read_batch_size

    assert sized(parse_bench_spec({})) == (batch, read_batch)
    given = sized(parse_bench_spec({"batch_size": 24}))
    assert given == (24, 4 * 24 if gpus == 0 else 16)


def test_bench_runs_the_classifier_it_names_like_plain_pytorch(tmp_path: Path) -> None:
    """--architecture reaches the job spec, the weights file and the peers' plain model: the
    pipeline's Classifier on the bench's crops ranks like the network loaded by hand."""
    from vision_ops.benchmark.ceilings import model_batches
    from vision_ops.benchmark.spec import IMAGENET_MEAN, IMAGENET_STD
    from vision_ops.benchmark.weights import plain_model, top_k
    from vision_ops.benchmark.workload import prepare
    from vision_ops.predictors import Classifier
    from vision_ops.schema import TOP_K_IDS, TOP_K_SCORES

    bench = parse_bench_spec({"images": 3, "architecture": "mobilenet_v3_small"})
    work = prepare(bench.model_copy(update={"workdir": tmp_path}))
    assert work.job().model.architecture == "mobilenet_v3_small"
    assert work.weights.name == "mobilenet_v3_small-seed0.pt"
    (batch,) = model_batches(work, 3)
    predicted = Classifier(work.job())(batch)
    pixels = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float().div(255)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    model = plain_model(work.weights, "mobilenet_v3_small", torch.device("cpu"))
    with torch.inference_mode():
        ids, scores = top_k(model((pixels - mean) / std))
    np.testing.assert_array_equal(predicted[TOP_K_IDS], ids)
    np.testing.assert_allclose(predicted[TOP_K_SCORES], scores, atol=1e-5)
    for wrong in ("fasterrcnn_resnet50_fpn_v2", "resnet5"):
        with pytest.raises(SpecError, match=f"expected a torchvision classification.*{wrong}"):
            parse_bench_spec({"architecture": wrong})


def test_s3_source_serves_the_photos_and_its_server_is_not_counted(tmp_path: Path) -> None:
    import s3fs

    from vision_ops.benchmark.e2e import s3_source
    from vision_ops.benchmark.workload import prepare

    work = prepare(parse_bench_spec({"images": 3, "workdir": tmp_path}))
    with s3_source(work) as source:
        (server_pid,) = work.exclude_pids
        options = source.storage_options["s3"]
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls(source.input_uri.removeprefix("s3://")))
        served = fs.cat_file(source.input_uri.removeprefix("s3://") + "photo-000001.jpg")
        assert os.environ["AWS_ACCESS_KEY_ID"] == "vision-ops-local"  # for Ray's workers
    assert listed == [p.name for p in work.paths]
    assert served == work.paths[1].read_bytes()
    assert source.output_uri.startswith("s3://")
    assert work.exclude_pids == set() and server_pid > 0


@pytest.mark.usefixtures("own_ray_root")  # no connection of the suite's meanwhile
def test_a_running_cluster_is_up_before_it_is_joined_and_gone_after(monkeypatch) -> None:
    """The head `running_cluster` starts has run a job before it yields, is a child of this
    process (so a measurement of its tree holds it), takes this process as a driver though
    it joined a cluster with a token before (the suite's), and leaves no process behind and
    RAY_ADDRESS as it was."""
    import psutil

    from vision_ops.benchmark.local_ray import joined_ray, running_cluster

    monkeypatch.setenv("RAY_ADDRESS", "elsewhere:6379")  # a user's, restored after
    with running_cluster(1) as address:
        assert os.environ["RAY_ADDRESS"] == address
        head = psutil.Process(os.getpid()).children(recursive=True)
        commands = [" ".join(process.cmdline()) for process in head]
        assert any("ray start --head --block" in command for command in commands), commands
        assert any("gcs_server" in command for command in commands), commands
        with joined_ray(address):
            assert ray.cluster_resources()["CPU"] == 1.0
            assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
    assert not [process for process in head if process.is_running()]
    assert os.environ["RAY_ADDRESS"] == "elsewhere:6379"


JOINS_A_HEAD = """
import ray
from vision_ops.benchmark.local_ray import joined_ray, running_cluster
with running_cluster(1) as address, joined_ray(address):
    print(ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=120), flush=True)
"""


@pytest.mark.parametrize("mode", ["token", "disabled", None])
def test_a_running_cluster_takes_this_processs_token_authentication(
    mode: str | None, tmp_path: Path
) -> None:
    """The head authenticates as the process that starts it, so that process's driver runs
    tasks on it: with token authentication on (as a test session's clusters turn it on), off,
    and unset. (With the head's off and the driver's on, the driver's first task never came
    back: its worker answered without a token.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.pop("RAY_ADDRESS", None)
    env["HOME"] = str(tmp_path)  # ~/.ray/auth_token: this test's own
    if mode is not None:
        env["RAY_AUTH_MODE"] = mode
    if mode == "token":
        env["RAY_AUTH_TOKEN"] = "a" * 32
    done = subprocess.run(
        [sys.executable, "-c", JOINS_A_HEAD], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "42"


HOLDS_A_HEAD = """
import os, sys, time, psutil
from vision_ops.benchmark.local_ray import running_cluster
with running_cluster(1):
    tree = psutil.Process(os.getpid()).children(recursive=True)
    print(" ".join(str(process.pid) for process in tree), flush=True)
    time.sleep(600)
"""


def test_a_running_cluster_does_not_outlive_a_killed_measurement(tmp_path: Path) -> None:
    """The process that started the head killed outright (no `finally` runs): the head is told
    to stop all the same, and its processes are gone."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDS_A_HEAD], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None
        pids = [int(pid) for pid in holder.stdout.readline().split()]
        tree = []
        for pid in pids:  # less a worker that ended meanwhile (the first job's)
            with contextlib.suppress(psutil.NoSuchProcess):
                tree.append(psutil.Process(pid))
        assert any("gcs_server" in " ".join(process.cmdline()) for process in tree)
    finally:
        holder.kill()
        holder.wait()
    _, alive = psutil.wait_procs(tree, timeout=90)
    for process in alive:  # the test's own clean-up: the assertion says what was left
        process.kill()
    assert not alive, [" ".join(process.cmdline())[:80] for process in alive]


def test_scaling_compares_peak_memory_at_n_and_k_n() -> None:
    from vision_ops.benchmark.e2e import scaling

    base, scaled = measurement("c", 10.0), measurement("c-scale", 10.0)
    base.peaks, scaled.peaks = Peaks(1000 * MB, 800 * MB), Peaks(1100 * MB, 820 * MB)
    scaled.rows = 32
    found = scaling(base, scaled)
    assert found["images"] == [8, 32]
    assert found["rss_ratio"] == pytest.approx(1.1) and found["within_target"]
    assert found["pss_ratio"] == pytest.approx(1.025)
    scaled.peaks = Peaks(1200 * MB, 900 * MB)
    assert not scaling(base, scaled)["within_target"]


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """`vision-ops bench` on 6 photos and every job again on 12, every approach, in its own
    process (the S3 run is left out to keep this file within ~150 s on 2 cores; the S3 source
    is tested apart)."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "bench.json"
    always_compile = folder / "compile.yaml"  # 6 photos are too few for compiling to pay
    always_compile.write_text("runtime: {compile_min_inputs: 0, compile_min_inputs_cold: 0}\n")
    command = [sys.executable, "-m", "vision_ops.cli", "bench", "--images", str(TINY)]
    command += ["--batch-size", "2", "--only", "a,b,c,d,e,f,g,h,i", "--no-s3", "--repeats", "1"]
    command += ["--scale", str(SCALE), "--spec", str(always_compile)]
    command += ["--workdir", str(folder / "work"), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    bench = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:  # a hang guard, not a speed check: the bench takes ~200 s alone, more on a busy machine
        stdout, stderr = bench.communicate(timeout=1200)
    finally:
        kill_session(bench.pid)  # the bench's job processes too, where it hung (and the head
        # a job started, told to stop as its starter dies)
    assert bench.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return json.loads(out.read_text()), stdout


@pytest.mark.timeout(1300)  # the first to ask runs the bench
def test_bench_measures_every_approach_on_the_same_photos(tiny_bench) -> None:
    report, _ = tiny_bench
    found = {m["key"]: m for m in report["measurements"]}
    jobs = ["c", "c-scale", "g", "g-scale", "h", "h-scale", "i", "i-scale"]
    jobs += ["d", "d-scale", "e", "e-scale", "f", "f-scale"]
    assert list(found) == ["a", "b", *jobs]  # every job at N and at SCALE x N
    processes = {found[key]["details"]["process_id"] for key in jobs}
    assert len(processes) == len(jobs)  # each job in a fresh process of its own
    assert not {"process_id"} & (found["a"]["details"].keys() | found["b"]["details"].keys())
    for m in found.values():
        size = TINY * SCALE if m["key"].endswith("-scale") else TINY
        assert m["rows"] == m["expected_rows"] == size, m["key"]
        assert m["images_per_second"] > 0 and m["wall_seconds"] > 0, m["key"]
        assert m["wall_images_per_second"] == pytest.approx(size / m["wall_seconds"])
        assert m["peaks"]["rss_bytes"] >= m["peaks"]["pss_bytes"] > 50 * MB, m["key"]
    for key in ("c", "d", "h", "c-scale", "d-scale", "h-scale"):  # the object store held batches
        assert found[key]["peaks"]["object_store_bytes"] > 0
        assert found[key]["peaks"]["processes"] >= 5  # GCS, raylet, workers
        roles = found[key]["peaks"]["pss_by_role"]  # where the peak PSS was
        assert sum(roles.values()) == found[key]["peaks"]["pss_bytes"], key
        assert {"driver", "ray gcs_server", "ray raylet"} <= set(roles), roles
        assert any(role.startswith("ray worker MapWorker") for role in roles), roles
        assert not any(")." in role for role in roles), roles  # an actor, not its method
        cpu = found[key]["peaks"]["cpu_seconds_by_role"]  # where the cores went
        actors = [v for role, v in cpu.items() if role.startswith("ray worker MapWorker")]
        assert actors and sum(actors) > 0 and cpu["driver"] > 0, cpu
        assert 0 < found[key]["peaks"]["sampler_cpu_seconds"] < cpu["driver"]
    for key in ("a", "b", "e", "f", "e-scale", "f-scale"):
        assert found[key]["peaks"]["object_store_bytes"] is None
        assert found[key]["queued_share"] is None
    assert found["a"]["peaks"]["processes"] >= 2  # this process and its readers
    compiles = cannot_compile() is None  # the spec compiles: b is, where torch.compile can
    assert found["b"]["details"]["compiled"] is compiles
    assert f", {'compiled' if compiles else 'eager'}: median of" in found["b"]["includes"]
    assert found["e"]["top1_agreement"] == found["e-scale"]["top1_agreement"] == 1.0
    for key in ("c", "c-scale", "g", "g-scale", "h", "h-scale", "i", "i-scale"):  # same pixels
        assert found[key]["queued_share"] is None  # on CPUs the actors decode, in the window
        assert found[key]["top1_agreement"] >= (TINY - 1) / TINY
        assert found[key]["details"]["error_rows"] == 0
    for key in ("c", "c-scale"):
        assert found[key]["details"]["predict_in"] == "actors"  # where the manifest says it ran
        startup = found[key]["details"]["startup_seconds"]  # the bench's job compiled
        assert startup["compile"] > 0 and startup["model_load"] > 0, startup
        assert startup["first_batch"] >= startup["compile"] + startup["model_load"]
    for key in ("g", "g-scale"):  # the model in the driver's threads: no actor, uncompiled
        assert found[key]["details"]["runtime"]["predict_in"] == "driver"
        assert found[key]["details"]["predict_in"] == "driver"
        roles = found[key]["peaks"]["cpu_seconds_by_role"]
        assert not any(role.startswith("ray worker MapWorker") for role in roles), roles
        startup = found[key]["details"]["startup_seconds"]
        assert startup["compile"] == 0 and startup["model_load"] > 0, startup
    for key in ("h", "h-scale"):  # joined a head started before it, which the tree holds
        roles = found[key]["peaks"]["pss_by_role"]
        assert {"ray start (a running head's keeper)", "ray client server"} <= set(roles), roles
        assert found[key]["details"]["runtime"]["predict_in"] == "auto"
        # `auto` as the run's size settles it: the spec compiles from 0 inputs on, which the
        # driver's threads never do, so the pool
        assert found[key]["details"]["predict_in"] == "actors"
    for key in ("i", "i-scale"):  # no Ray: the job's one process, its reads and model inside
        assert found[key]["peaks"]["object_store_bytes"] is None
        assert set(found[key]["peaks"]["pss_by_role"]) == {"driver"}
        assert found[key]["details"]["runtime"]["runner"] == "in_process"
        assert found[key]["details"]["predict_in"] == "driver"
        assert "ray_connect" not in found[key]["details"]["startup_seconds"]
    for key in ("c", "c-scale", "g", "g-scale"):  # each started a cluster of its own
        assert "ray start (a running head's keeper)" not in found[key]["peaks"]["pss_by_role"]
    for key in ("d", "f", "d-scale", "f-scale"):
        assert 0.0 <= found[key]["top1_agreement"] <= 1.0
    assert report["scaling"]["images"] == [TINY, TINY * SCALE]
    assert report["passed"] and report["problems"] == []


@pytest.mark.timeout(1300)  # the first to ask runs the bench
def test_bench_gives_each_size_its_jobs_figures(tiny_bench) -> None:
    report, _ = tiny_bench
    found = {m["key"]: m for m in report["measurements"]}
    sizes = report["same_size"]
    assert [s["images"] for s in sizes] == [TINY, TINY * SCALE]
    assert list(sizes[0]["approaches"]) == ["c", "g", "h", "i", "d", "e", "f"]
    scaled_jobs = ["c-scale", "g-scale", "h-scale", "i-scale", "d-scale", "e-scale", "f-scale"]
    assert list(sizes[1]["approaches"]) == scaled_jobs
    for size in sizes:
        for key, figures in size["approaches"].items():
            m = found[key]
            assert figures["wall_seconds"] == m["wall_seconds"]
            assert figures["steady_images_per_second"] == m["images_per_second"]
            assert figures["peak_pss_bytes"] == m["peaks"]["pss_bytes"]


@pytest.mark.timeout(1300)  # the first to ask runs the bench
def test_bench_ratios_are_those_of_the_printed_rates(tiny_bench) -> None:
    report, printed = tiny_bench
    rates = {m["key"]: m["images_per_second"] for m in report["measurements"]}
    walls = {m["key"]: m["wall_images_per_second"] for m in report["measurements"]}
    pss = {m["key"]: m["peaks"]["pss_bytes"] for m in report["measurements"]}
    ceiling = 1 / (1 / rates["a"] + 1 / rates["b"])
    assert report["shared_core_ceiling_images_per_second"] == pytest.approx(ceiling)
    rates[CEILING] = ceiling
    expected = {
        label: rates[top] / rates[bottom]
        for label, top, bottom in RATIOS + SCALED_RATIOS
        if top in rates and bottom in rates
    }
    assert report["ratios"] == pytest.approx(expected)
    # all but S3 / local and the GPU ceiling, at N and at scale
    assert len(report["ratios"]) == 2 * (len(RATIOS) - 2)
    assert report["ratios"]["e2e at scale / Daft"] == pytest.approx(
        rates["c-scale"] / rates["f-scale"]
    )
    names = {"f": "Daft", "d": "naive Ray Data", "e": "DataLoader"}
    for peer, name in names.items():
        assert report["wall_ratios"][f"e2e / {name}"] == pytest.approx(walls["c"] / walls[peer])
        assert report["wall_ratios"][f"e2e at scale / {name}"] == pytest.approx(
            walls["c-scale"] / walls[f"{peer}-scale"]
        )
        assert report["pss_ratios"][f"e2e at scale PSS / {name}"] == pytest.approx(
            pss["c-scale"] / pss[f"{peer}-scale"]
        )
        assert report["wall_ratios"][f"e2e in driver / {name}"] == pytest.approx(
            walls["g"] / walls[peer]
        )
        assert report["wall_ratios"][f"e2e on a running cluster / {name}"] == pytest.approx(
            walls["h"] / walls[peer]
        )
        assert report["wall_ratios"][f"e2e in one process / {name}"] == pytest.approx(
            walls["i"] / walls[peer]
        )
    assert report["wall_ratios"]["e2e in driver / e2e"] == pytest.approx(walls["g"] / walls["c"])
    assert report["wall_ratios"]["e2e on a running cluster at scale / e2e at scale"] == (
        pytest.approx(walls["h-scale"] / walls["c-scale"])
    )
    assert report["pss_ratios"]["e2e in one process at scale PSS / e2e at scale"] == (
        pytest.approx(pss["i-scale"] / pss["c-scale"])
    )
    # c, g, h and i against each peer at both sizes, g, h and i against c at both
    assert len(report["wall_ratios"]) == len(report["pss_ratios"]) == 4 * 2 * 3 + 3 * 2
    assert report["gpu_ceiling_images_per_second"] is None  # a CPU machine
    wall_at = printed.index("ratios of wall img/s")
    assert wall_at < printed.index("ratios of steady img/s")  # wall time first
    for kind in ("wall_ratios", "ratios", "pss_ratios"):
        for label, value in report[kind].items():
            assert f"{label:<{LABEL_WIDTH}}{value:>8.2f}x" in printed[wall_at:]
    for m in report["measurements"]:
        assert f"{m['rows']:>6}" in printed and m["approach"] in printed


def test_a_peers_output_is_read_from_every_part_file_a_dataset_scan_would_read(
    tmp_path: Path,
) -> None:
    """Part files in nested folders, one with large strings (a writer of its own), are read
    together; a file or folder named with `_` or `.` is left out (here unreadable, so reading
    it would fail); a folder with no Parquet file is a clear error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vision_ops.benchmark.peers import DONE_AT, PeerOutput

    def part(paths: list[str], labels: list[int], done: list[float], text: pa.DataType) -> pa.Table:
        return pa.table(
            {
                "path": pa.array(paths, text),
                "label_id": pa.array(labels, pa.int32()),
                DONE_AT: pa.array(done, pa.float64()),
            }
        )

    (tmp_path / "run" / "a").mkdir(parents=True)
    pq.write_table(
        part(["/p/1.jpg", "/p/2.jpg"], [7, 8], [1.0, 2.0], pa.string()),
        tmp_path / "run" / "a" / "x.parquet",
    )
    pq.write_table(
        part(["/p/3.jpg"], [9], [3.0], pa.large_string()), tmp_path / "run" / "y.parquet"
    )
    (tmp_path / "run" / "_tmp").mkdir()
    (tmp_path / "run" / "_tmp" / "z.parquet").write_bytes(b"not parquet")
    (tmp_path / "run" / ".w.parquet").write_bytes(b"not parquet")

    output = PeerOutput.read(tmp_path / "run")

    assert (output.rows, output.distinct) == (3, 3)
    assert output.top1 == {"1.jpg": 7, "2.jpg": 8, "3.jpg": 9}
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="none: the approach wrote no Parquet file"):
        PeerOutput.read(tmp_path / "none")


def test_a_jobs_error_in_its_own_process_reaches_the_bench_in_one_line(tmp_path: Path) -> None:
    """A job's error comes back from its process as it was where it pickles (a VisionOpsError
    keeps its type and exit code), else as `Type: first line` (never a pickling error)."""
    import threading

    from vision_ops.benchmark.runner import step_alone
    from vision_ops.benchmark.workload import prepare
    from vision_ops.errors import ModelError

    work = prepare(parse_bench_spec({"images": 1, "workdir": tmp_path}))

    def bad_model(run, work, key):  # type: ignore[no-untyped-def]
        raise ModelError("model.weights: expected a state_dict")

    class HoldsALock(Exception):
        def __init__(self) -> None:
            super().__init__("a lock inside\nand more")
            self.lock = threading.Lock()

    def unpicklable(run, work, key):  # type: ignore[no-untyped-def]
        raise HoldsALock()

    with pytest.raises(ModelError, match="expected a state_dict"):
        step_alone(work, bad_model, "c")
    with pytest.raises(RuntimeError) as caught:
        step_alone(work, unpicklable, "c")
    assert str(caught.value) == "bench c: HoldsALock: a lock inside"
