"""What `--incremental` costs before any work: 1 committed run vs many of the same total
size, then the Ray-side filter of a listing of new + old units (issue 20, item 2).

    .venv/bin/python benchmarks/incremental.py --old 1000000 --new 10000 --runs 100

Builds two Parquet tables of synthetic committed rows with the real sink (one run of OLD units;
RUNS runs of OLD / RUNS units each, all with the same model fingerprint), each run with the
index its commit writes (vision_ops.runindex). Then, each in a fresh process with a local 2-CPU
Ray: the driver's planning (`incremental.done_sources` over every committed run's index: the
done set as one Arrow array), and the filter of a listing of OLD + NEW
units made in Ray tasks (`incremental.without_done`, as `--incremental` runs it), which must keep
exactly the NEW units. Each table is measured REPEAT times, alternating; prints the medians of
the seconds of each and the driver's peak RSS, and their ratios RUNS runs / 1 run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vision_ops.pipeline.incremental import done_sources
from vision_ops.schema import PREDICTION_SCHEMA, STATUS_OK
from vision_ops.sink import ParquetSink, committed_runs
from vision_ops.sources import LISTING_BLOCK_ROWS, LISTING_SCHEMA

FINGERPRINT = "f" * 64


def identity(start: int, count: int) -> dict[str, pa.Array]:
    """Unit i's source: its URI and ETag (the same in the committed rows and the listing)."""
    index = np.arange(start, start + count)
    return {
        "source_uri": pa.array([f"s3://archive/{i // 1000:05d}/{i:09d}.jpg" for i in index]),
        "source_etag": pa.array([f"{i * 2654435761 % (1 << 32):08x}" for i in index]),
    }


def listing_block(batch: dict[str, np.ndarray]) -> pa.Table:
    """In a Ray task: listing rows [start, start + count) for each (start, count) asked."""
    parts = []
    for start, count in zip(batch["start"], batch["count"], strict=True):
        columns = identity(int(start), int(count))
        parts.append(pa.table({f.name: columns.get(f.name, pa.nulls(int(count), f.type))
                               for f in LISTING_SCHEMA}, schema=LISTING_SCHEMA))  # fmt: skip
    return pa.concat_tables(parts)


def rows(run_id: str, start: int, count: int) -> pa.Table:
    index = np.arange(start, start + count)
    columns = {
        **identity(start, count),
        "run_id": pa.array([run_id] * count),
        "item_id": pa.array([f"{i:016x}" for i in index]),
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


def measure(root: str, old: int, new: int, planning_only: bool = False) -> dict[str, float]:
    """In this process: the driver's incremental planning over the table at `root`, then the
    Ray-side filter of an OLD + NEW listing made in Ray tasks (not with `planning_only`)."""
    if planning_only:
        return measure_planning(root, new)
    import ray

    from vision_ops.pipeline.incremental import without_done
    from vision_ops.pipeline.listing import Listing, summarise

    temp = Path(tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))  # not the host's Ray root
    (temp / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(temp)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(temp))
    ray.data.DataContext.get_current().enable_progress_bars = False
    starts = list(range(0, old + new, LISTING_BLOCK_ROWS))
    counts = [min(LISTING_BLOCK_ROWS, old + new - start) for start in starts]
    made = ray.data.from_items(
        [{"start": a, "count": b} for a, b in zip(starts, counts, strict=True)]
    )
    listed = made.map_batches(listing_block, batch_size=1).materialize()
    listing = Listing(listed, summarise(listed, find_repeats=False))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    runs, done = planned_done(root)
    planned = time.perf_counter()
    left = without_done(listing, done)
    filtered = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    return {"runs": len(runs), "done": len(done), "listed": listing.count, "kept": left.count,
            "planning_s": planned - started, "filter_s": filtered - planned,
            "peak_rss_mb": peak / 1024, "added_rss_mb": (peak - before) / 1024}  # fmt: skip


def planned_done(root: str) -> tuple[list[dict[str, Any]], pa.Array]:
    """The table's committed runs and the source keys they did (from their indexes)."""
    runs = committed_runs(root)
    done = done_sources(root, runs, {}, ())
    if not all(run.get("index_uri") for run in runs):
        raise SystemExit("a committed run has no index: the sink wrote none")
    return runs, done


def measure_planning(root: str, new: int) -> dict[str, float]:
    """The driver's incremental planning alone (no Ray: for a machine too loaded to start one)."""
    started = time.perf_counter()
    runs, done = planned_done(root)
    planned = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"runs": len(runs), "done": len(done), "listed": 0, "kept": new,
            "planning_s": planned - started, "filter_s": 0.0,
            "peak_rss_mb": peak / 1024, "added_rss_mb": 0.0}  # fmt: skip


def measured(root: Path, old: int, new: int, planning_only: bool = False) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--measure",
        str(root),
        "--old",
        str(old),
        "--new",
        str(new),
        *(["--planning-only"] if planning_only else []),
    ]
    # A loaded machine may start Ray's node slowly: more patience, and one more try.
    env = os.environ | {"RAY_raylet_start_wait_time_s": "180"}
    for attempt in range(2):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode == 0:
            return dict(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"the measuring process failed (try {attempt + 1}):\n{done.stderr[-1500:]}")
    raise SystemExit("the measuring process failed twice")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=int, default=1_000_000, help="committed units in all")
    parser.add_argument("--new", type=int, default=10_000, help="new units in the listing")
    parser.add_argument("--runs", type=int, default=100, help="runs they are spread over")
    parser.add_argument("--repeat", type=int, default=3, help="trials per table (medians)")
    parser.add_argument("--tables", help="keep the built tables here and reuse them")
    parser.add_argument("--planning-only", action="store_true", help="no Ray, no filter")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.old, args.new, args.planning_only)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.tables or scratch)
        roots = {runs: folder / f"runs-{runs}-of-{args.old}" for runs in (1, args.runs)}
        for runs, root in roots.items():
            if (root / "_built").exists():  # whole, by an earlier call with --tables
                continue
            started = time.perf_counter()
            build(root, args.old, runs)
            (root / "_built").touch()
            print(f"built {runs} run(s) of {args.old // runs:,} units in "
                  f"{time.perf_counter() - started:.1f}s", flush=True)  # fmt: skip
        trials: dict[int, list[dict[str, float]]] = {runs: [] for runs in roots}
        for _ in range(args.repeat):  # alternated, so both tables see the same machine
            for runs, root in roots.items():
                found = measured(root, args.old, args.new, args.planning_only)
                if found["kept"] != args.new:
                    raise SystemExit(f"the filter kept {found['kept']} units, not {args.new}")
                trials[runs].append(found)
    report(trials, args.runs)


def report(trials: dict[int, list[dict[str, float]]], many_runs: int) -> None:
    """The medians of each table's trials, then the ratios many runs / 1 run."""
    medians = {
        runs: {key: float(np.median([t[key] for t in found])) for key in found[0]}
        for runs, found in trials.items()
    }
    print("\n| committed runs | done units | listed | kept | planning s | filter s | "
          "driver peak RSS MB |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for runs, median in medians.items():
        print(f"| {runs} | {int(median['done']):,} | {int(median['listed']):,} | "
              f"{int(median['kept']):,} | {median['planning_s']:.2f} | "
              f"{median['filter_s']:.2f} | {median['peak_rss_mb']:.0f} |")  # fmt: skip
    for runs, each in trials.items():
        print(f"{runs} run(s), each trial: planning "
              + " ".join(f"{t['planning_s']:.2f}" for t in each) + " s, filter "
              + " ".join(f"{t['filter_s']:.2f}" for t in each) + " s")  # fmt: skip
    one, many = medians[1], medians[many_runs]
    ratio = {key: many[key] / one[key] for key in ("planning_s", "filter_s", "peak_rss_mb")
             if one[key]}  # fmt: skip
    print(f"\n{many_runs} runs / 1 run (medians): planning {ratio['planning_s']:.2f}x, "
          + (f"filter {ratio['filter_s']:.2f}x, " if "filter_s" in ratio else "")
          + f"driver peak RSS {ratio['peak_rss_mb']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
