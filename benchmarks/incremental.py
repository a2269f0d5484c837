"""What `--incremental` costs the driver before any work: 1 committed run vs many of the same
total size, then an incremental listing of new + old units (issue 20, item 2).

    .venv/bin/python benchmarks/incremental.py --old 1000000 --runs 100

Builds two Parquet tables of synthetic committed rows with the real sink (one run of OLD units;
RUNS runs of OLD / RUNS units each, all with the same model fingerprint), then, each in a fresh
process, times the incremental planning the pipeline does on the driver
(`incremental.done_versions` over every committed run's rows) and reads its peak RSS. Prints
both and their ratio (wall seconds and peak RSS, 100 runs / 1 run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from vision_ops.pipeline.incremental import committed_versions, done_versions
from vision_ops.schema import PREDICTION_SCHEMA, STATUS_OK
from vision_ops.sink import ParquetSink, committed_runs

FINGERPRINT = "f" * 64


def rows(run_id: str, start: int, count: int) -> pa.Table:
    index = np.arange(start, start + count)
    columns = {
        "run_id": pa.array([run_id] * count),
        "item_id": pa.array([f"{i:016x}" for i in index]),
        "source_uri": pa.array([f"s3://archive/{i // 1000:05d}/{i:09d}.jpg" for i in index]),
        "source_etag": pa.array([f"{i * 2654435761 % (1 << 32):08x}" for i in index]),
        "model_name": pa.array(["m"] * count),
        "model_weights_sha256": pa.array(["h"] * count),
        "task": pa.array(["classification"] * count),
        "status": pa.array([STATUS_OK] * count),
    }
    return pa.Table.from_arrays(
        [columns.get(f.name, pa.nulls(count, f.type)) for f in PREDICTION_SCHEMA],
        schema=PREDICTION_SCHEMA,
    )


def build(root: Path, old: int, runs: int) -> None:
    """`runs` committed runs that hold `old` units between them, one date each."""
    per_run = old // runs
    for run in range(runs):
        date = dt.date(2026, 1, 1) + dt.timedelta(days=run)
        sink = ParquetSink(str(root), f"night-{run:03d}", date, PREDICTION_SCHEMA)
        sink.write(rows(f"night-{run:03d}", run * per_run, per_run))
        sink.commit(None, {"model_fingerprint": FINGERPRINT})


def measure(root: str) -> dict[str, float]:
    """In this process: the driver's incremental planning over the table at `root`."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    runs = committed_runs(root)
    done = done_versions((committed_versions(root, run, {}) for run in runs), ())
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"runs": len(runs), "done": len(done), "seconds": seconds,
            "peak_rss_mb": peak / 1024, "added_rss_mb": (peak - before) / 1024}  # fmt: skip


def measured(root: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--measure", str(root)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=int, default=1_000_000, help="committed units in all")
    parser.add_argument("--runs", type=int, default=100, help="runs they are spread over")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    with tempfile.TemporaryDirectory() as folder:
        results = {}
        for runs in (1, args.runs):
            root = Path(folder, f"runs-{runs}")
            started = time.perf_counter()
            build(root, args.old, runs)
            print(f"built {runs} run(s) of {args.old // runs:,} units in "
                  f"{time.perf_counter() - started:.1f}s", flush=True)  # fmt: skip
            results[runs] = measured(root)
    print("\n| committed runs | units | planning s | peak RSS MB | RSS added MB |")
    print("|---|---|---|---|---|")
    for runs, found in results.items():
        print(f"| {runs} | {int(found['done']):,} | {found['seconds']:.2f} | "
              f"{found['peak_rss_mb']:.0f} | {found['added_rss_mb']:.0f} |")  # fmt: skip
    one, many = results[1], results[args.runs]
    print(f"\n{args.runs} runs / 1 run: planning {many['seconds'] / one['seconds']:.2f}x, "
          f"peak RSS {many['peak_rss_mb'] / one['peak_rss_mb']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
