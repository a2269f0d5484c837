"""Listing throughput: how fast `list_inputs` turns an S3 prefix of N objects into its input table.

Starts a local SeaweedFS S3 server (`weed mini` on 127.0.0.1), uploads N tiny objects, then times
four ways of listing them, interleaved over `--repeats` rounds, each from a cold filesystem:

- `find`: a bare `s3fs.S3FileSystem.find(prefix, detail=True)`, the floor for a prefix;
- `glob`: a bare `s3fs.S3FileSystem.glob(prefix/**, detail=True)`, the floor for a glob;
- `list_inputs prefix` and `list_inputs glob`: `vision_ops.sources.list_inputs` on the same two;

and, apart, the one `info` call `list_inputs` makes on a prefix to tell file from directory.

It prints each time, the medians, objects per second, the ratios against the floors, and (with
`--profile`) where one `list_inputs` call spends its time.

    .venv/bin/python benchmarks/listing.py --objects 100000
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import s3fs

from vision_ops.config import InputSpec
from vision_ops.devstack import LOCAL_CREDENTIALS, SeaweedS3
from vision_ops.sources import list_inputs

BUCKET = "bench"
PREFIX = f"{BUCKET}/tiles"
PAYLOAD = b"\xff\xd8\xff\xd9"  # a few bytes: listing cost does not depend on object size
EXTENSIONS = [".jpg"]
UPLOAD_CONNECTIONS = 64  # aiobotocore's pool (default 10) caps how many PUTs are in flight

CHECKS = "info only"  # not a listing: the round trip list_inputs adds before a prefix's find
Timing = Callable[[], int]  # lists once, returns how many objects it found


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000, help="objects to upload")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each method")
    parser.add_argument("--batch", type=int, default=2000, help="objects per bulk pipe call")
    parser.add_argument(
        "--layout",
        choices=("nested", "flat"),
        default="nested",
        help="nested: tiles/{i//1000:03d}/{i:06d}.jpg; flat: tiles/{i:06d}.jpg",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one list_inputs call")
    return parser.parse_args(argv)


def object_key(index: int, layout: str) -> str:
    if layout == "flat":
        return f"{PREFIX}/{index:06d}.jpg"
    return f"{PREFIX}/{index // 1000:03d}/{index:06d}.jpg"


def cold_fs(endpoint: str, **config: Any) -> s3fs.S3FileSystem:
    """A new filesystem with an empty listing cache, as a fresh job process would have."""
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **config)
    fs.invalidate_cache()
    return fs


def upload(endpoint: str, count: int, batch: int, layout: str) -> float:
    """PUTs `count` objects with s3fs's concurrent bulk `pipe`; returns the seconds taken."""
    fs = cold_fs(endpoint, config_kwargs={"max_pool_connections": UPLOAD_CONNECTIONS})
    start = time.perf_counter()
    for first in range(0, count, batch):
        last = min(first + batch, count)
        fs.pipe({object_key(i, layout): PAYLOAD for i in range(first, last)})
    return time.perf_counter() - start


def bare_find(endpoint: str) -> int:
    return len(cold_fs(endpoint).find(PREFIX, detail=True))


def bare_glob(endpoint: str) -> int:
    found = cold_fs(endpoint).glob(f"{PREFIX}/**", detail=True)
    return sum(1 for info in found.values() if info.get("type") == "file")


def vision_ops_listing(uri: str, endpoint: str) -> int:
    """`list_inputs` as a job calls it; its filesystem comes from fsspec's instance cache."""
    s3fs.S3FileSystem.clear_instance_cache()
    spec = InputSpec(uris=[uri], extensions=EXTENSIONS)
    table = list_inputs(spec, {"s3": {"endpoint_url": endpoint}})
    return int(table.num_rows)


def existence_checks(endpoint: str) -> float:
    """The `info` call `list_inputs` makes on a prefix before its `find`."""
    fs = cold_fs(endpoint)
    start = time.perf_counter()
    if fs.info(PREFIX)["type"] != "directory":
        raise SystemExit(f"{PREFIX}: not a directory")
    return time.perf_counter() - start


def methods(endpoint: str) -> dict[str, Timing]:
    return {
        "find (s3fs floor)": lambda: bare_find(endpoint),
        "glob (s3fs floor)": lambda: bare_glob(endpoint),
        "list_inputs prefix": lambda: vision_ops_listing(f"s3://{PREFIX}/", endpoint),
        "list_inputs glob": lambda: vision_ops_listing(f"s3://{PREFIX}/**", endpoint),
    }


def timed(method: Timing, expected: int, name: str) -> float:
    start = time.perf_counter()
    found = method()
    elapsed = time.perf_counter() - start
    if found != expected:
        raise SystemExit(f"{name}: listed {found} objects, expected {expected}")
    return elapsed


def time_methods(endpoint: str, expected: int, repeats: int) -> dict[str, list[float]]:
    """Rounds of every method in turn, so drift on a noisy machine hits each one alike."""
    times: dict[str, list[float]] = {name: [] for name in [*methods(endpoint), CHECKS]}
    for _ in range(repeats):
        for name, method in methods(endpoint).items():
            times[name].append(timed(method, expected, name))
        times[CHECKS].append(existence_checks(endpoint))
    return times


def report(args: argparse.Namespace, upload_s: float, times: dict[str, list[float]]) -> str:
    medians = {name: statistics.median(values) for name, values in times.items()}
    lines = [
        "== listing benchmark " + "=" * 58,
        f"objects            {args.objects} ({args.layout} layout, {len(PAYLOAD)} bytes each)",
        f"upload             {upload_s:8.2f} s   {args.objects / upload_s:10.0f} objects/s",
        f"repeats            {args.repeats} (every row below was checked: {args.objects} rows)",
        "",
        f"{'method':20} {'times (s)':28} {'median s':>9} {'objects/s':>10}",
    ]
    for name, values in times.items():
        each = " ".join(f"{value:.3f}" for value in values)
        rate = "-" if name == CHECKS else f"{args.objects / medians[name]:.0f}"
        lines.append(f"{name:20} {each:28} {medians[name]:9.3f} {rate:>10}")
    lines += ["", *ratio_lines(medians), "=" * 79]
    return "\n".join(lines)


def ratio_lines(medians: dict[str, float]) -> list[str]:
    find, glob = medians["find (s3fs floor)"], medians["glob (s3fs floor)"]
    prefix, pattern = medians["list_inputs prefix"], medians["list_inputs glob"]
    return [
        f"list_inputs prefix / find   {prefix / find:6.2f}x   (+{prefix - find:.3f} s)",
        f"list_inputs glob / glob     {pattern / glob:6.2f}x   (+{pattern - glob:.3f} s)",
        f"list_inputs glob / find     {pattern / find:6.2f}x   (+{pattern - find:.3f} s)",
    ]


def profile_once(endpoint: str, top: int = 25) -> str:
    """One prefix `list_inputs` under cProfile (which inflates per-call Python costs)."""
    profiler = cProfile.Profile()
    profiler.runcall(vision_ops_listing, f"s3://{PREFIX}/", endpoint)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.update(LOCAL_CREDENTIALS)
    with SeaweedS3(buckets=(BUCKET,)) as server:
        endpoint = server.endpoint_url
        print(f"SeaweedFS S3 at {endpoint}; uploading {args.objects} objects ...", flush=True)
        upload_s = upload(endpoint, args.objects, args.batch, args.layout)
        print(f"uploaded in {upload_s:.1f} s; timing {args.repeats} rounds ...", flush=True)
        times = time_methods(endpoint, args.objects, args.repeats)
        print(report(args, upload_s, times), flush=True)
        if args.profile:
            print(profile_once(endpoint), flush=True)


if __name__ == "__main__":
    main()
