"""Nightly operations: backfill runs only the missing dates; query reads committed runs only,
from SeaweedFS over DuckDB's httpfs, and exports csv / json / parquet."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from vision_ops.cli import (
    EXIT_BAD_SPEC,
    EXIT_DRIFT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TOO_MANY_ERRORS,
    main,
)
from vision_ops.sink import committed_runs

pytestmark = pytest.mark.timeout(900)


def spec_file(folder: Path, inputs: str, output: str, weights: Path, **extra: object) -> Path:
    spec = {
        "input": {"uris": [inputs]},
        "model": {
            "architecture": "mobilenet_v3_small",
            "weights": str(weights),
            "num_classes": 4,
            "preprocessing": {"resize": 72, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "task": {"kind": "classification", "top_k": 2},
        "runtime": {"batch_size": 8, "max_actors": 1},
        "output": {"uri": output},
        **extra,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def photos(tmp_path: Path, photo_paths: list[Path]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in photo_paths[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_backfill_runs_only_the_dates_without_a_committed_run(
    ray_local, photos, tmp_path, tiny_weights, capsys
) -> None:
    output = tmp_path / "table"
    spec = spec_file(tmp_path, str(photos), str(output), tiny_weights)
    for day in ("2026-11-02", "2026-11-04"):
        assert main(["run", str(spec), "--run-date", day]) == EXIT_OK
    before = {run["run_date"]: run["committed_at"] for run in committed_runs(str(output))}
    capsys.readouterr()
    args = ["backfill", str(spec), "--from", "2026-11-01", "--to", "2026-11-05"]
    assert main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("committed already, skipped") == 2 and out.count("\nrun ") == 3
    runs = committed_runs(str(output))
    assert [run["run_date"] for run in runs] == [f"2026-11-0{d}" for d in range(1, 6)]
    untouched = {r["run_date"]: r["committed_at"] for r in runs if r["run_date"] in before}
    assert untouched == before
    partitions = sorted(p.name for p in output.glob("run_date=*"))
    assert partitions == [f"run_date=2026-11-0{d}" for d in range(1, 6)]
    # a date over the error ratio (1 broken of 4) is committed, the next one still runs,
    # and the backfill exits 4 naming both
    over = ["backfill", str(spec), "--from", "2026-11-06", "--to", "2026-11-07"]
    assert main([*over, "--max-error-ratio", "0.2"]) == EXIT_TOO_MANY_ERRORS
    assert "error: committed over --max-error-ratio: 2026-11-06, 2026-11-07" in (
        capsys.readouterr().err
    )
    assert [run["run_date"] for run in committed_runs(str(output))][-2:] == [
        "2026-11-06",
        "2026-11-07",
    ]


def test_backfill_check_checks_each_run_it_committed_once(
    ray_local, photos, tmp_path, tiny_weights, capsys
) -> None:
    """`backfill --check` (the schedules' one command) checks the drift of the runs it
    committed, a night it caught up on included, and never a date it skipped: a drifted night
    alerts the night it commits, not again each night it stays in the schedule's range (as
    `report --check --since` did). Where the backfill itself exits non-zero, that is its exit,
    the drift figures printed all the same."""
    output = tmp_path / "table"
    spec = spec_file(tmp_path, str(photos), str(output), tiny_weights)
    for day in ("2026-11-01", "2026-11-02"):
        assert main(["run", str(spec), "--run-date", day]) == EXIT_OK
    for index in range(3):  # a camera gone bad: 4 of 7 inputs error rows, not 1 of 4
        (photos / f"broken-{index}.png").write_bytes(b"not a png")
    capsys.readouterr()
    nights = ["backfill", str(spec), "--from", "2026-11-01", "--to", "2026-11-04", "--check"]
    assert main(nights) == EXIT_DRIFT
    captured = capsys.readouterr()
    runs = {run["run_date"]: run["run_id"] for run in committed_runs(str(output))}
    alerts = [line for line in captured.err.splitlines() if line.startswith("alert: ")]
    assert [line.split()[1] for line in alerts] == ["error_rate_rise"] * 2
    assert (
        f"run {runs['2026-11-03']} against {runs['2026-11-01']}, {runs['2026-11-02']}"
        in (alerts[0])
    )
    assert f"run {runs['2026-11-04']} against " in alerts[1]
    assert f"run {runs['2026-11-01']} against" not in captured.out + captured.err
    # the next night: every date of its range committed already, nothing checked again
    later = ["backfill", str(spec), "--from", "2026-11-02", "--to", "2026-11-04", "--check"]
    assert main(later) == EXIT_OK
    captured = capsys.readouterr()
    assert "drift: this backfill committed no run; none checked" in captured.out
    assert "alert:" not in captured.err
    # a night over --max-error-ratio exits 4, its drift figures said too
    over = ["backfill", str(spec), "--from", "2026-11-05", "--to", "2026-11-05", "--check"]
    assert main([*over, "--max-error-ratio", "0.2"]) == EXIT_TOO_MANY_ERRORS
    captured = capsys.readouterr()
    runs = {run["run_date"]: run["run_id"] for run in committed_runs(str(output))}
    assert "drift: error_rate_rise" in captured.out and runs["2026-11-05"] in captured.out
    # a run the check compares with is damaged (a part file gone): the night commits, and the
    # failed check says so (it was a bare "[Errno 2] No such file", read as nothing committed)
    for part in (output / "run_date=2026-11-05").glob("*.parquet"):
        part.unlink()
    damaged = ["backfill", str(spec), "--from", "2026-11-06", "--to", "2026-11-06", "--check"]
    assert main(damaged) == EXIT_FAILED
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: the drift check failed (FileNotFoundError: ")
    assert err.endswith(
        "`vision-ops verify` names a damaged run); the backfill's runs are committed: 2026-11-06"
    )


def test_a_backfill_into_the_future_is_refused_before_any_work(
    photos, tmp_path, tiny_weights, capsys
) -> None:
    output = tmp_path / "table"
    spec = spec_file(tmp_path, str(photos), str(output), tiny_weights)
    today = dt.datetime.now(dt.timezone.utc).date()
    tomorrow = today + dt.timedelta(days=1)
    args = ["backfill", str(spec), "--from", str(today), "--to", str(tomorrow)]
    assert main(args) == EXIT_BAD_SPEC
    assert capsys.readouterr().err.startswith(
        f"error: --to {tomorrow} is after today ({today} UTC): a date not yet begun would be "
    )
    assert not output.exists()


def test_a_run_id_is_bound_to_its_date_before_any_work(
    ray_local, photos, tmp_path, tiny_weights, capsys
) -> None:
    """`--run-id nightly` committed on the 28th: the 29th under the same id is refused with
    exit 2 (no partition, the 28th untouched), and so is a backfill of several dates that
    would give each the same id."""
    output = tmp_path / "table"
    spec = str(spec_file(tmp_path, str(photos), str(output), tiny_weights))
    assert main(["run", spec, "--run-id", "nightly", "--run-date", "2026-11-28"]) == EXIT_OK
    before = committed_runs(str(output))
    capsys.readouterr()
    assert main(["run", spec, "--run-id", "nightly", "--run-date", "2026-11-29"]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert "'nightly' is committed for 2026-11-28" in err and "Traceback" not in err
    dates = ["--from", "2026-11-28", "--to", "2026-11-30"]
    assert main(["backfill", spec, "--set", "run.id=nightly", *dates]) == EXIT_BAD_SPEC
    assert "run.id 'nightly' is fixed" in capsys.readouterr().err
    assert committed_runs(str(output)) == before
    assert sorted(p.name for p in output.glob("run_date=*")) == ["run_date=2026-11-28"]
    assert main(["verify", str(output), "--run-id", "nightly"]) == EXIT_OK


@pytest.mark.s3
def test_query_reads_committed_runs_from_s3_over_httpfs(
    ray_local, photos, tmp_path, tiny_weights, seaweed, s3fs_client, s3_options, capsys
) -> None:
    for path in photos.iterdir():
        s3fs_client.put_file(str(path), f"images/ops/{path.name}")
    output = "s3://out/ops"
    spec = spec_file(tmp_path, "s3://images/ops/", output, tiny_weights, storage_options=s3_options)
    assert main(["run", str(spec), "--run-id", "ops-1", "--run-date", "2026-11-20"]) == EXIT_OK
    [part] = committed_runs(output, s3_options)[0]["files"]
    committed = pq.read_table(s3fs_client.open(part["uri"].removeprefix("s3://"), "rb"))
    # Stray files readers must not see: an uncommitted run's part and a staged file.
    for stray in ("out/ops/run_date=2026-11-20/crashed-part-00000.parquet",
                  "out/ops/_staging/crashed/crashed-part-00000.parquet"):  # fmt: skip
        with s3fs_client.open(stray, "wb") as handle:
            pq.write_table(committed, handle)
    os.environ["AWS_ENDPOINT_URL"] = seaweed.endpoint_url
    try:
        capsys.readouterr()
        sql = "SELECT status, count(*) AS n FROM predictions GROUP BY status ORDER BY status"
        assert main(["query", output, sql, "--format", "csv"]) == EXIT_OK
        assert capsys.readouterr().out.splitlines() == ["status,n", "error,1", "ok,3"]
        assert main(["query", output, "SELECT item_id FROM predictions", "--format", "json"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert sorted(json.loads(line)["item_id"] for line in lines) == sorted(
            committed["item_id"].to_pylist()
        )
        exported = tmp_path / "export.parquet"
        sql = "SELECT source_uri, label FROM predictions WHERE status = 'ok'"
        assert main(["query", output, sql, "--format", "parquet", "--out", str(exported)]) == 0
        assert pq.read_table(exported).num_rows == 3
        assert main(["query", "s3://out/nothing-here", "SELECT 1"]) == EXIT_FAILED
        assert "no committed run" in capsys.readouterr().err
    finally:
        os.environ.pop("AWS_ENDPOINT_URL")
