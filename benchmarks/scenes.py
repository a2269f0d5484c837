"""Scene planning at archive scale: driver peak memory and time to the first tile at the read
stage, for a manifest of N Sentinel-2-sized scenes (10,980 px square, 1,849 tiles of 256 px).

Each case runs in a fresh driver process (its peak RSS, VmHWM, is its own) with its own
embedded Ray cluster. The scenes are real GeoTIFFs: one 10,980 x 10,980 uint8 file (tiled,
deflate, all zeros: a few hundred KB) hard-linked N times under distinct names, listed by a
text manifest. `value_range` is set, so planning reads headers only, as a 16-bit archive with
a fixed stretch would. Planning is what a run does before its first read: the listing, the
header pass and the summary pass (vision_ops.pipeline.planning: tally, one-CRS check,
bounds); then every tile is cut and streamed through a read-stage stand-in (one map task per
block of `--read-batch` tiles, counting them), so the tiles flow as in a run and the count is
checked. Ray's start-up is timed apart.

    nice .venv/bin/python benchmarks/scenes.py --tiles 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SIDE = 10_980  # a Sentinel-2 L1C/L2A 10 m band
TILE = 256
TILES_PER_SCENE = 43 * 43  # tile_offsets(10980, 256, 0, "shift"): 43 per axis


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--read-batch", type=int, default=4096, help="tiles per read block")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # manifest, batch, cpus
    return parser.parse_args(argv)


def write_scenes(folder: Path, count: int) -> Path:
    """`count` scene names (hard links of one GeoTIFF) and a text manifest listing them."""
    import rasterio
    from rasterio.transform import from_origin

    first = folder / "scene-000000.tif"
    if not first.exists():
        profile = {
            "driver": "GTiff", "width": SIDE, "height": SIDE, "count": 1, "dtype": "uint8",
            "crs": "EPSG:32632", "transform": from_origin(600_000.0, 5_200_000.0, 10.0, 10.0),
            "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate",
        }  # fmt: skip
        with rasterio.open(first, "w", **profile) as out:
            out.write(np.zeros((1, SIDE, SIDE), np.uint8))
    names = [folder / f"scene-{i:06d}.tif" for i in range(count)]
    for path in names[1:]:
        if not path.exists():
            os.link(first, path)
    manifest = folder / f"manifest-{count}.txt"
    manifest.write_text("".join(f"file://{path}\n" for path in names))
    return manifest


def peak_rss_mib() -> float:
    return _status("VmHWM:")


def current_rss_mib() -> float:
    return _status("VmRSS:")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def count_tiles(block: pa.Table) -> pa.Table:
    """The read stage's stand-in: how many tiles a read task got."""
    return pa.table({"tiles": [block.num_rows]})


def run_case(manifest: str, read_batch: int, cpus: int) -> dict[str, Any]:
    """In the child: plan the manifest's scenes, stream every tile through the stand-in."""
    import ray

    from vision_ops.config import InputSpec, TilingSpec
    from vision_ops.pipeline.listing import list_listing
    from vision_ops.pipeline.planning import plan_scenes
    from vision_ops.pipeline.run import unit_blocks
    from vision_ops.sources import plan_inputs

    started = time.perf_counter()
    for attempt in range(3):  # a loaded machine can miss Ray's 30 s raylet start-up wait
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            if attempt == 2:
                raise
            ray.shutdown()
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_s, before = time.perf_counter() - started, current_rss_mib()
    spec = InputSpec(manifest=manifest)
    tiling = TilingSpec(size=TILE, value_range=(0, 255))
    started = time.perf_counter()
    listing = list_listing(spec, plan_inputs(spec, {}), {})
    plan = plan_scenes(listing, tiling, {})
    planning_s = time.perf_counter() - started
    reads = unit_blocks(plan.units(), read_batch).map_batches(
        count_tiles, batch_format="pyarrow", batch_size=None
    )
    first_tile_s, seen = None, 0
    for table in reads.iter_batches(batch_format="pyarrow", batch_size=None):
        if first_tile_s is None:
            first_tile_s = time.perf_counter() - started
        seen += sum(table["tiles"].to_pylist())
    total_s = time.perf_counter() - started
    return {"scenes": listing.count, "tiles": plan.count, "streamed": seen, "ray_s": ray_s,
            "planning_s": planning_s, "first_tile_s": first_tile_s, "total_s": total_s,
            "rss_after_ray_mib": before, "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def spawn(manifest: Path, read_batch: int, cpus: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--case", str(manifest), str(read_batch), str(cpus)],
        capture_output=True, text=True, check=False, env=os.environ | {"RAY_DEDUP_LOGS": "0"},
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"case {manifest} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'scenes':>7} {'tiles':>10} {'ray init s':>10} {'planning s':>10} "
        f"{'first tile s':>12} {'all tiles s':>11} {'RSS after init MiB':>18} {'peak RSS MiB':>12}"
    ]
    for r in results:
        lines.append(
            f"{r['scenes']:7d} {r['tiles']:10d} {r['ray_s']:10.2f} {r['planning_s']:10.2f} "
            f"{r['first_tile_s']:12.2f} {r['total_s']:11.2f} {r['rss_after_ray_mib']:18.0f} "
            f"{r['peak_rss_mib']:12.0f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), int(args.case[2]))))
        return
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vision-ops-scenes-") as folder:
        for tiles in args.tiles:
            manifest = write_scenes(Path(folder), -(-tiles // TILES_PER_SCENE))
            results.append(spawn(manifest, args.read_batch, args.cpus))
            if results[-1]["streamed"] != results[-1]["tiles"]:
                raise SystemExit(f"streamed {results[-1]['streamed']} of {results[-1]['tiles']}")
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(results))
    if len(results) >= 2:
        low, high = results[0], results[-1]
        ratio = high["peak_rss_mib"] / low["peak_rss_mib"]
        print(
            f"\npeak driver RSS {high['tiles']} / {low['tiles']} tiles: {ratio:.3f} (target <= 1.2)"
        )


if __name__ == "__main__":
    main()
