"""The run report: its figures equal the Parquet's, and its HTML page renders in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from vision_ops.cli import EXIT_FAILED, EXIT_OK, main
from vision_ops.report import SCORE_BINS, build_report, render_html, throughput_series

pytestmark = pytest.mark.timeout(600)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def committed(ray_local, tmp_path_factory, photo_paths) -> Path:  # type: ignore[no-untyped-def]
    """One committed classification run over photos, their copies and two broken files."""
    folder = tmp_path_factory.mktemp("report")
    photos = folder / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    for index in range(12):
        pixels = rng.integers(0, 256, (48 + index, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"noise{index:02d}.png")
    for path in photo_paths:
        (photos / path.name).write_bytes(path.read_bytes())
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "page.jpg").write_bytes(b"<html></html>")
    torch.manual_seed(2)
    model = torchvision.models.mobilenet_v3_small(num_classes=5)
    torch.nn.init.normal_(model.classifier[-1].weight, std=2.0)
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "labels.txt").write_text("road\nriver\nforest\nfield\nroof\n")
    spec = {
        "input": {"uris": [str(photos)]},
        "model": {
            "architecture": "mobilenet_v3_small",
            "weights": str(folder / "weights.pt"),
            "num_classes": 5,
            "labels": str(folder / "labels.txt"),
            "preprocessing": {"resize": 72, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "runtime": {"batch_size": 4, "read_batch_size": 4, "max_actors": 1},
        "output": {"uri": str(folder / "table")},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(folder / "job.yaml"), "--run-id", "nightly"]) == EXIT_OK
    return folder


def test_report_figures_equal_the_parquet(committed) -> None:
    table = pq.read_table(committed / "table")
    report = build_report(str(committed / "table"))
    assert (report.run_id, report.task, report.rows) == ("nightly", "classification", 19)
    ok = table.filter(pc.equal(table["status"], "ok"))
    assert (report.ok, report.errors) == (ok.num_rows, 2)
    counted: dict[str, int] = {}
    for label in ok["label"].to_pylist():
        counted[label] = counted.get(label, 0) + 1
    assert dict(report.labels) == counted
    assert dict(report.error_types) == {"EmptyFile": 1, "NotAnImage": 1}
    expected, _ = np.histogram(ok["score"].to_numpy(), bins=SCORE_BINS, range=(0, 1))
    assert report.score_histogram == expected.tolist()
    assert report.score_quantiles["p50"] == pytest.approx(float(np.median(ok["score"])), 1e-4)
    assert set(report.stage_seconds) == {"read_decode", "inference", "commit"}
    assert report.slowest_stage == max(report.stage_seconds, key=report.stage_seconds.get)
    assert report.progress[-1][1] == 19 and report.images_per_second > 0


def test_report_command_prints_and_writes_html(committed, capsys) -> None:
    page = committed / "report.html"
    assert main(["report", str(committed / "job.yaml"), "--html", str(page)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "run nightly" in out and "items: 19  ok: 17  errors: 2" in out
    assert "<svg" in page.read_text() and "http" not in page.read_text().split("<body>")[1]
    assert main(["report", str(committed / "table"), "--run-id", "no-such-run"]) == EXIT_FAILED


# The commands that read a committed table, each in a fresh interpreter: none loads torch
# (several seconds of imports before the first line of output).
READ_COMMANDS_WITHOUT_TORCH = """
import contextlib, io, json, sys
from vision_ops.cli import main
commands = [
    ["report", sys.argv[1]], ["query", sys.argv[1]], ["verify", sys.argv[1]],
    ["report", sys.argv[1], "--trend"],
]
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main(command) for command in commands]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def test_reading_a_table_does_not_load_torch(committed) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", READ_COMMANDS_WITHOUT_TORCH, str(committed / "table")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout.splitlines()[-1]) == {"codes": [EXIT_OK] * 4, "torch": False}


def test_throughput_series_is_images_per_second_between_points() -> None:
    assert throughput_series([(0.0, 0), (2.0, 10), (4.0, 30)]) == [(2.0, 5.0), (4.0, 10.0)]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run has it)")
def test_html_renders_in_headless_chromium(committed, tmp_path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(build_report(str(committed / "table"))))
    shot = tmp_path / "report.png"
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,700",
        f"--screenshot={shot}", page.as_uri(),
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (700, 1000)
    colours = {tuple(c) for c in image.reshape(-1, 3)[::97]}
    bar_blue = np.all(np.abs(image.astype(int) - (0x4C, 0x78, 0xA8)) < 12, axis=2)
    assert len(colours) > 20 and bar_blue.sum() > 500  # text and the label bars were drawn
    shutil.copy(shot, committed / "report.png")


def test_the_report_counts_skipped_tiles_beside_ok_and_error_rows(tmp_path, capsys) -> None:
    """A tiled run's no-data tiles are `skipped` rows: the report counts them, as the run's
    summary does (it gave ok and errors only, which did not add up to the items)."""
    from committed_rows import classified, commit_rows, failed

    rows = [
        classified("/x/a.tif", ("field", 0.8)),
        classified("/x/b.tif", ("field", 0.7)),
        failed("/x/c.tif", "RasterError", "bad"),
        {"source_uri": "/x/d.tif", "status": "skipped"},
    ]
    commit_rows(tmp_path / "table", "classification", rows, "r1")
    assert main(["report", str(tmp_path / "table"), "--html", str(tmp_path / "r.html")]) == 0
    assert "items: 4  ok: 2  errors: 1  skipped: 1" in capsys.readouterr().out
    assert "<td>skipped</td><td><b>1</b></td>" in (tmp_path / "r.html").read_text()


def test_the_reports_figures_are_words_not_python_reprs(tmp_path, capsys) -> None:
    """Score quantiles as `p05 0.7, ...`; a quiet night's (no rows, no stages) as `none` (it
    printed `{}` and nothing after the stage seconds' colon)."""
    from committed_rows import classified, commit_rows

    table = tmp_path / "table"
    rows = [classified(f"/x/{i}.jpg", ("cat", 0.5 + 0.1 * i)) for i in range(3)]
    commit_rows(table, "classification", rows, "r1", "2026-12-01")
    commit_rows(table, "classification", [], "quiet", "2026-12-02")
    assert main(["report", str(table), "--run-id", "r1"]) == 0
    assert "scores (top-1 score): p05 0.51, p50 0.6, p95 0.69\n" in capsys.readouterr().out
    assert main(["report", str(table)]) == 0
    out = capsys.readouterr().out
    assert "scores (top-1 score): none\n" in out and "stage seconds (all workers): none\n" in out
    assert "{" not in out


def test_a_report_made_while_a_rerun_replaces_the_run_reads_the_rerun(
    tmp_path, capsys, monkeypatch
) -> None:
    """A rerun of the reported run commits between the report's reading of its manifest and
    of its files, and removes the files it replaced: the report reads again and shows the
    rerun (it failed: file not found)."""
    from committed_rows import classified, commit_rows

    from vision_ops import report

    table = tmp_path / "table"
    first = [classified(f"/x/{name}.jpg", ("cat", 0.9)) for name in "ab"]
    commit_rows(table, "classification", first, "r1")
    real = report.read_run
    reads: list[str] = []

    def a_rerun_commits_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append("read")
        if len(reads) == 1:
            rerun = [classified(f"/x/{name}.jpg", ("dog", 0.8)) for name in "abc"]
            commit_rows(table, "classification", rerun, "r1")
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "read_run", a_rerun_commits_meanwhile)
    assert main(["report", str(table)]) == EXIT_OK
    out = capsys.readouterr().out
    assert reads == ["read", "read"] and "items: 3  ok: 3" in out and "3  dog" in out, out


def test_a_run_without_errors_says_none_under_errors_and_trend_takes_run_id_only_to_check(
    tmp_path, capsys
) -> None:
    """The text report of a run without errors says `errors by type: none` (a bare header
    before); `--trend --run-id` without --check is refused (the run id was ignored: the trend
    showed every run)."""
    from committed_rows import classified, commit_rows

    from vision_ops.cli import EXIT_BAD_SPEC

    table = str(tmp_path / "table")
    commit_rows(tmp_path / "table", "classification", [classified("/x/a.jpg", ("cat", 0.9))], "r1")
    assert main(["report", table]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1] == "errors by type: none"
    assert main(["report", table, "--trend", "--run-id", "r1"]) == EXIT_BAD_SPEC
    assert capsys.readouterr().err.strip() == (
        "error: --run-id: with --trend, expected --check (the run checked); the trend shows all"
    )


def test_the_command_line_keeps_botocore_to_its_warnings(monkeypatch) -> None:
    """botocore said "Found credentials in environment variables." at INFO 8 to 20 times a
    command on S3, above the one `error:` line; at VISION_OPS_LOG_LEVEL=ERROR its warnings
    are quiet too (the levels are put back after)."""
    import logging

    from vision_ops.logs import QUIET_LIBRARIES, log_at

    for name in ("", "vision_ops", *QUIET_LIBRARIES):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    log_at(logging.INFO)
    assert logging.getLogger("botocore.credentials").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("vision_ops").getEffectiveLevel() == logging.INFO
    log_at(logging.ERROR)
    assert logging.getLogger("botocore.credentials").getEffectiveLevel() == logging.ERROR
