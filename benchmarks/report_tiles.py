"""A report's scene-tile thumbnails from S3: the scene opened once for the report against once
per tile, in one run.

One Sentinel-2-sized GeoTIFF (10,980 px a side, 3 bands of uint16, 512 px blocks, deflate) on
a local SeaweedFS server; the report's gallery draws `--tiles` tiles of it (512 px, spread
over the scene). "once per report" is `gallery.Sources` as the report uses it; "once per tile"
gives each tile a `Sources` of its own, which opens the scene for that tile alone (what every
tile did before the report kept its scenes open). Both must give the same pixels.

    nice .venv/bin/python benchmarks/report_tiles.py --tiles 64 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCENE_SIDE, BLOCK, TILE = 10_980, 512, 512
URI = "s3://scenes/scene.tif"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64, help="thumbnails drawn")
    parser.add_argument("--repeat", type=int, default=3, help="passes of each way, alternating")
    return parser.parse_args(argv)


def write_scene(path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    values = np.random.default_rng(0).integers(0, 4_000, (3, SCENE_SIDE, SCENE_SIDE), np.uint16)
    profile = {"driver": "GTiff", "width": SCENE_SIDE, "height": SCENE_SIDE, "count": 3}
    profile |= {"dtype": "uint16", "crs": "EPSG:32633", "tiled": True, "compress": "deflate"}
    profile |= {"blockxsize": BLOCK, "blockysize": BLOCK}
    with rasterio.open(
        path, "w", transform=from_origin(500_000, 4_000_000, 10, 10), **profile
    ) as out:
        out.write(values)


def tile_rows(count: int) -> list[dict[str, Any]]:
    """`count` tiles on a grid spread over the scene."""
    side = int(np.ceil(np.sqrt(count)))
    step = (SCENE_SIDE - TILE) // max(side - 1, 1)
    return [
        {"source_uri": URI, "tile_x": (i % side) * step, "tile_y": (i // side) * step}
        | {"tile_size": TILE}
        for i in range(count)
    ]


def once_per_report(rows: list[dict[str, Any]], options: dict[str, Any]) -> list[np.ndarray]:
    from vision_ops.gallery import Sources

    with Sources(options) as sources:
        return [sources.pixels(row) for row in rows]


def once_per_tile(rows: list[dict[str, Any]], options: dict[str, Any]) -> list[np.ndarray]:
    from vision_ops.gallery import Sources

    shown = []
    for row in rows:
        with Sources(options) as sources:
            shown.append(sources.pixels(row))
    return shown


def timed(way: Callable[..., list[np.ndarray]], *args: Any) -> tuple[float, list[np.ndarray]]:
    begun = time.perf_counter()
    shown = way(*args)
    return time.perf_counter() - begun, shown


def main(argv: Sequence[str] | None = None) -> None:
    from vision_ops.devstack import LOCAL_CREDENTIALS, SeaweedS3
    from vision_ops.storage import filesystem

    args = parse_args(argv)
    os.environ.update(LOCAL_CREDENTIALS)
    rows = tile_rows(args.tiles)
    with tempfile.TemporaryDirectory() as folder, SeaweedS3(buckets=("scenes",)) as server:
        write_scene(Path(folder) / "scene.tif")
        options = {"s3": server.storage_options()}
        fs, path = filesystem(URI, options)
        fs.put(str(Path(folder) / "scene.tif"), path)
        seconds: dict[str, list[float]] = {"once per tile": [], "once per report": []}
        for _ in range(args.repeat):
            per_tile, expected = timed(once_per_tile, rows, options)
            per_report, shown = timed(once_per_report, rows, options)
            assert all(np.array_equal(a, b) for a, b in zip(expected, shown, strict=True))
            seconds["once per tile"].append(per_tile)
            seconds["once per report"].append(per_report)
    print(f"{args.tiles} thumbnails of one {SCENE_SIDE} px scene on S3 (SeaweedFS), seconds:")
    for way, runs in seconds.items():
        figures = " ".join(f"{s:.2f}" for s in runs)
        print(f"  scene opened {way:<16} {figures}  median {statistics.median(runs):.2f}")
    ratio = statistics.median(seconds["once per tile"]) / statistics.median(
        seconds["once per report"]
    )
    print(f"  ratio of the medians: {ratio:.1f}x")


if __name__ == "__main__":
    main()
