"""Planning at scale: time and driver peak memory from a spec to the Ray Dataset of units.

Cases, each in a fresh driver process (its peak RSS, VmHWM, is its own), each with its own
embedded Ray cluster:

- `manifest N`: a synthetic S3-Inventory-shaped Parquet manifest of N URIs (no objects exist:
  planning reads none);
- `list_inputs manifest N` (with `--baseline`): the same manifest through `list_inputs`, the
  driver-side table runs used before the listing moved into Ray;
- `s3 prefix N`: N real objects on a local SeaweedFS S3 server (`weed mini`), paged.

Planning is what a run does before its first read: `plan_inputs` (checks), then `list_listing`
(the listing into Ray's object store, the pass that counts it, tallies the expected units,
digests the snapshot and looks for repeated URIs), then the unit blocks the read stage takes.
Ray's start-up is timed apart.

    .venv/bin/python benchmarks/planning.py --sizes 100000 1000000 --objects 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 100_000
READ_BATCH = 16  # runtime.read_batch_size by default: rows per read task


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--objects", type=int, default=100_000, help="0 skips the S3 case")
    parser.add_argument("--baseline", action="store_true", help="also time list_inputs")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # kind, uri, endpoint
    return parser.parse_args(argv)


def write_inventory(path: Path, count: int) -> None:
    """An S3 Inventory Parquet export of `count` objects, as the report writes it."""
    stamp = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    with pq.ParquetWriter(path, inventory_schema()) as writer:
        for first in range(0, count, ROW_GROUP):
            rows = range(first, min(first + ROW_GROUP, count))
            keys = [f"tiles/{i // 1000:05d}/{i:08d}.jpg" for i in rows]
            writer.write_table(
                pa.table(
                    {
                        "bucket": ["bench"] * len(keys),
                        "key": keys,
                        "size": pa.array([50_000 + i % 997 for i in rows], pa.int64()),
                        "last_modified_date": pa.array(
                            [stamp] * len(keys), pa.timestamp("ms", "UTC")
                        ),
                        "e_tag": [f"{i:032x}" for i in rows],
                        "storage_class": ["STANDARD"] * len(keys),
                        "is_latest": [True] * len(keys),
                    },
                    schema=inventory_schema(),
                )
            )


def inventory_schema() -> pa.Schema:
    return pa.schema(
        [
            ("bucket", pa.string()),
            ("key", pa.string()),
            ("size", pa.int64()),
            ("last_modified_date", pa.timestamp("ms", "UTC")),
            ("e_tag", pa.string()),
            ("storage_class", pa.string()),
            ("is_latest", pa.bool_()),
        ]
    )


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_case(kind: str, uri: str, endpoint: str) -> dict[str, Any]:
    """In the child: one case, timed, its peak RSS read at the end."""
    import ray

    from vision_ops.config import InputSpec
    from vision_ops.pipeline.listing import list_listing
    from vision_ops.pipeline.run import unit_blocks
    from vision_ops.sources import list_inputs, plan_inputs

    options = {"s3": {"endpoint_url": endpoint}} if endpoint != "-" else {}
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_s, before = time.perf_counter() - started, current_rss_mib()
    spec = InputSpec(manifest=uri) if kind != "prefix" else InputSpec(uris=[uri])
    started = time.perf_counter()
    if kind == "baseline":
        count = list_inputs(spec, options).num_rows
    else:
        listing = list_listing(spec, plan_inputs(spec, options), options)
        unit_blocks(listing.dataset, READ_BATCH)  # the read stage's input, ready to run
        count = listing.count
    planning_s = time.perf_counter() - started
    return {"count": count, "ray_s": ray_s, "planning_s": planning_s,
            "rss_after_ray_mib": before, "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def spawn(kind: str, uri: str, endpoint: str = "-") -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--case", kind, uri, endpoint],
        capture_output=True, text=True, check=False, env=os.environ | {"RAY_DEDUP_LOGS": "0"},
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"case {kind} {uri} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def s3_case(objects: int) -> dict[str, Any]:
    """Upload `objects` with listing.py's uploader, then plan a run over the prefix."""
    sys.path.insert(0, str(Path(__file__).parent))
    from listing import BUCKET, PREFIX, upload

    from vision_ops.devstack import LOCAL_CREDENTIALS, SeaweedS3

    os.environ.update(LOCAL_CREDENTIALS)
    with SeaweedS3(buckets=(BUCKET,)) as server:
        print(f"uploading {objects} objects to SeaweedFS ...", flush=True)
        seconds = upload(server.endpoint_url, objects, 2000, "nested")
        print(f"uploaded in {seconds:.0f} s", flush=True)
        return spawn("prefix", f"s3://{PREFIX}/", server.endpoint_url)


def table(results: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [
        f"{'case':28} {'inputs':>9} {'ray init s':>10} {'planning s':>10} "
        f"{'RSS after init MiB':>18} {'peak RSS MiB':>12}"
    ]
    for name, r in results:
        lines.append(
            f"{name:28} {r['count']:9d} {r['ray_s']:10.2f} {r['planning_s']:10.2f} "
            f"{r['rss_after_ray_mib']:18.0f} {r['peak_rss_mib']:12.0f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return
    results: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="vision-ops-planning-") as folder:
        for size in args.sizes:
            path = Path(folder) / f"inventory-{size}.parquet"
            write_inventory(path, size)
            results.append((f"manifest {size}", spawn("manifest", str(path))))
            print(table(results[-1:]).splitlines()[-1], flush=True)
            if args.baseline:
                results.append((f"list_inputs manifest {size}", spawn("baseline", str(path))))
    if args.objects:
        results.append((f"s3 prefix {args.objects}", s3_case(args.objects)))
    print("\n" + table(results))
    manifests = {name: r for name, r in results if name.startswith("manifest ")}
    if len(manifests) >= 2:
        ordered = sorted(manifests.items(), key=lambda item: item[1]["count"])
        (small, low), (large, high) = ordered[0], ordered[-1]
        ratio = high["peak_rss_mib"] / low["peak_rss_mib"]
        print(f"\npeak RSS {large} / {small}: {ratio:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
