"""The per-scene merge's rate: how many tiles and boxes a second the merge actor
(`vision_ops.pipeline.planning.SceneMerge`, one per run) moves into scene pixels and merges
across seams, against the tile rate a predictor pool feeds it.

Each scene is a square grid of 256 px tiles cut with 32 px of overlap (the merge's own
arithmetic needs no pixels). Objects of 5 classes, 8 to 32 px a side, lie about `--boxes` to a
tile, none overlapping another; every tile that holds an object whole reports it (the seam
duplicates the merge removes). The rows go through the streaming merge in blocks of
`--block` tiles, as the actor receives them; the boxes kept must equal the objects placed.

    nice .venv/bin/python benchmarks/scene_merge.py --side 10 43 --boxes 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

TILE, OVERLAP = 256, 32
STRIDE = TILE - OVERLAP
SLOT = 64  # one object at most a slot
CLASSES = 5
IDENTITY = (10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)  # a 10 m UTM grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, nargs="*", default=[10, 43], help="tiles a side")
    parser.add_argument("--boxes", type=int, default=10, help="boxes a tile")
    parser.add_argument("--scenes", type=int, default=2, help="scenes per case")
    parser.add_argument("--block", type=int, default=32, help="tiles per call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args(argv)


def scene_rows(uri: str, side: int, boxes: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    """One scene's tile rows and how many distinct objects they show. Objects lie one to a
    64 px slot (so no two overlap), 8 to 32 px a side (so each lies whole in some tile); every
    tile that holds an object whole reports it, with a score of its own."""
    rng = np.random.default_rng(seed)
    width = STRIDE * (side - 1) + TILE
    share = min(boxes / (TILE // SLOT) ** 2, 1.0)
    objects = []
    for left in range(0, width - SLOT + 1, SLOT):
        for top in range(0, width - SLOT + 1, SLOT):
            if rng.random() < share:
                w, h = rng.integers(8, 33, 2)
                x, y = left + rng.integers(0, SLOT - w + 1), top + rng.integers(0, SLOT - h + 1)
                objects.append(((x, y, x + w, y + h), int(rng.integers(0, CLASSES))))
    rows = []
    for x in range(0, width - TILE + 1, STRIDE):
        for y in range(0, width - TILE + 1, STRIDE):
            found = [
                _entry(box, (x, y), label, float(rng.uniform(0.3, 0.99)))
                for box, label in objects
                if x <= box[0] and box[2] <= x + TILE and y <= box[1] and box[3] <= y + TILE
            ]
            rows.append(_tile_row(uri, (x, y), width, found))
    return rows, len(objects)


def _tile_row(uri: str, at: tuple[int, int], width: int, found: list[dict]) -> dict[str, Any]:
    x, y = at
    return {
        "source_uri": uri, "item_id": f"{uri}#{x},{y}", "run_id": "bench", "status": "ok",
        "tile_x": x, "tile_y": y, "tile_size": TILE, "scene_width": width,
        "scene_height": width, "detections": found, "num_detections": len(found),
    }  # fmt: skip


def _entry(box: tuple[int, ...], tile: tuple[int, int], label: int, score: float) -> dict:
    x, y = tile
    return {
        "label_id": label, "label": f"class{label}", "score": score,
        "x_min": float(box[0] - x), "y_min": float(box[1] - y),
        "x_max": float(box[2] - x), "y_max": float(box[3] - y),
    }  # fmt: skip


def merge_case(side: int, args: argparse.Namespace) -> dict[str, Any]:
    from rasterio.crs import CRS

    from vision_ops.pipeline.planning import SceneMerge
    from vision_ops.schema import output_schema

    schema = output_schema("detection", tiles=True)
    scenes = [scene_rows(f"file:///scene{i}.tif", side, args.boxes, i) for i in range(args.scenes)]
    rows = [row for scene, _ in scenes for row in scene]
    objects = sum(count for _, count in scenes)
    boxes = sum(row["num_detections"] for row in rows)
    blocks = [
        pa.Table.from_pylist(rows[i : i + args.block], schema=schema)
        for i in range(0, len(rows), args.block)
    ]
    tiles = {f"file:///scene{i}.tif": side * side for i in range(args.scenes)}
    transforms = dict.fromkeys(tiles, IDENTITY)
    crs_wkt = CRS.from_epsg(32632).to_wkt()
    seconds = []
    for _ in range(args.repeat):
        stream = SceneMerge(tiles, transforms, seam_overlap=0.5, crs_wkt=crs_wkt)
        started = time.perf_counter()
        out = [stream(block) for block in blocks]
        seconds.append(time.perf_counter() - started)
        kept = sum(pc_sum(table) for table in out)
        assert kept == objects, f"kept {kept} boxes of {objects} objects"
        assert stream.waiting == {}
    median = statistics.median(seconds)
    return {
        "tiles_a_scene": side * side,
        "scenes": args.scenes,
        "boxes": boxes,
        "objects": objects,
        "seconds": seconds,
        "median_s": median,
        "tiles_per_s": len(rows) / median,
        "boxes_per_s": boxes / median,
    }


def pc_sum(table: pa.Table) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(table["num_detections"]).as_py() or 0)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cases = [merge_case(side, args) for side in args.side]
    print(f"{'tiles/scene':>11} {'scenes':>6} {'boxes':>8} {'median s':>9} {'tiles/s':>9} "
          f"{'boxes/s':>9}")  # fmt: skip
    for case in cases:
        print(
            f"{case['tiles_a_scene']:>11} {case['scenes']:>6} {case['boxes']:>8} "
            f"{case['median_s']:>9.2f} {case['tiles_per_s']:>9.0f} {case['boxes_per_s']:>9.0f}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"settings": vars(args), "cases": cases}, out, indent=1)


if __name__ == "__main__":
    main()
