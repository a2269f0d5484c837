"""The per-scene merge in Ray: a scene's tiles read in blocks of one tile each, detected on two
raylets, merged by the merge actor as each scene's last tile comes in (seams as on one machine);
the driver gets merged rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import yaml
from cluster_script import run_cluster_script
from test_scenes import SQUARES, TRANSFORM

pytestmark = pytest.mark.timeout(600)

TWO_RAYLETS = """
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from vision_ops.config import load_spec
from vision_ops.pipeline import run_job

spec_path, marks, temp = sys.argv[1:4]
# Each node fits one predictor actor (2 CPUs) and one read task beside it.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "temp_dir": temp})
cluster.add_node(num_cpus=3)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
ray.data.DataContext.get_current().enable_progress_bars = False
summary = run_job(load_spec(spec_path))
nodes = sorted({p.name.split("-")[0] for p in Path(marks).iterdir()})
print(json.dumps({"rows": summary.commit.rows, "nodes": nodes}))
ray.shutdown()
cluster.shutdown()
"""


def squares_scene(path: Path, shift: int, background: np.ndarray | int = 0) -> None:
    """320 x 128 pixels, SQUARES moved down by `shift` rows (each scene its own pixels), on
    `background` (one value, or a row of 320 repeated down the scene)."""
    pixels = np.broadcast_to(np.asarray(background), (1, 128, 320)).astype(np.uint8)
    for x_min, y_min, x_max, y_max in SQUARES.values():
        pixels[0, y_min + shift : y_max + shift, x_min:x_max] = 255
    profile = {
        "driver": "GTiff", "width": 320, "height": 128, "count": 1, "dtype": "uint8",
        "crs": "EPSG:32632", "transform": TRANSFORM,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as out:
        out.write(pixels)


@pytest.mark.slow
def test_seams_merge_across_blocks_and_nodes_on_two_raylets(tmp_path: Path) -> None:
    """Three scenes of 3 tiles each (128 px, 32 overlap), one tile per read block, detected by
    two actors on two raylets: each scene's squares come back once each, in scene pixels and
    the CRS, exactly as one machine merges them (test_scenes' seam test)."""
    folder = tmp_path / "scenes"
    folder.mkdir()
    shifts = {"s0.tif": 0, "s1.tif": 10, "s2.tif": 20}
    for name, shift in shifts.items():
        squares_scene(folder / name, shift)
    marks = tmp_path / "marks"
    marks.mkdir()
    spec = {
        "input": {"uris": [str(folder)], "tiling": {"size": 128, "overlap": 32, "bands": [1]}},
        "task": {"kind": "detection", "score_threshold": 0.1},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "toy_models:bright_squares_on_nodes",
            "kwargs": {"marks": str(marks)},
        },
        "runtime": {
            "batch_size": 1,
            "read_batch_size": 1,
            "min_actors": 2,
            "max_actors": 2,
            "num_cpus_per_actor": 2,
        },
        "output": {"uri": str(tmp_path / "table")},
        "run": {"id": "seams-2n", "date": "2026-11-24"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    outcome = run_cluster_script(TWO_RAYLETS, str(path), str(marks))
    assert outcome["rows"] == 9 and len(outcome["nodes"]) == 2, outcome
    rows = pq.read_table(tmp_path / "table" / "run_date=2026-11-24").to_pylist()
    for name, shift in shifts.items():
        scene = [r for r in rows if r["source_uri"].endswith(name)]
        assert sorted(r["tile_x"] for r in scene) == [0, 96, 192]
        boxes = [e for r in scene for e in r["detections"]]
        found = sorted((e["x_min"], e["y_min"], e["x_max"], e["y_max"]) for e in boxes)
        expected = [(x0, y0 + shift, x1, y1 + shift) for x0, y0, x1, y1 in SQUARES.values()]
        assert found == sorted(expected), name
        assert sum(r["num_detections"] for r in scene) == 3
        for entry in boxes:
            left, top = TRANSFORM * (entry["x_min"], entry["y_min"])
            assert (entry["crs_x_min"], entry["crs_y_max"]) == (left, top)


def tile_row(x: int, entries: list[dict]) -> dict:
    """A tile row of a 200 x 100 scene (tiles of 128 at x = 0 and 72: 56 pixels overlap)."""
    return {
        "source_uri": "file:///scene.tif", "tile_x": x, "tile_y": 0, "tile_size": 128,
        "scene_width": 200, "scene_height": 100, "status": "ok",
        "detections": entries, "num_detections": len(entries),
    }  # fmt: skip


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as coco_mask

    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode()}


def entry(x_min: int, y_min: int, x_max: int, y_max: int, score: float, **extra: object) -> dict:
    box = {"x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}
    return {"label_id": 1, "label": "thing", "score": score, **box, **extra}


@pytest.mark.parametrize("instance", ["mask", "keypoints"])
def test_masks_and_keypoints_move_to_the_scene_with_their_boxes(instance: str) -> None:
    """An object on the seam: seen whole by the right tile (at x = 72) and cut by the left
    tile's edge. The whole one stays, its mask or keypoints moved by the tile's offset into
    the scene's pixels (mask size = the scene's); the cut one goes, its mask with it."""
    from pycocotools import mask as coco_mask

    from vision_ops.scenes import merge_scene
    from vision_ops.schema import output_schema

    def extra(x0: int, x1: int, tile_x: int) -> dict:
        if instance == "keypoints":
            points = [{"name": "nose", "x": float(x0 - tile_x + 1), "y": 31.0, "score": 0.9}]
            return {"keypoints": points}
        tile = np.zeros((128, 128), bool)
        tile[30:60, x0 - tile_x : x1 - tile_x] = True
        return {"mask": rle(tile)}

    cut = entry(110, 30, 128, 60, 0.5, **extra(110, 128, 0))  # the left tile's part
    whole = entry(110 - 72, 30, 150 - 72, 60, 0.9, **extra(110, 150, 72))
    schema = output_schema("detection", tiles=True, instance=instance)
    rows = pa.Table.from_pylist([tile_row(0, [cut]), tile_row(72, [whole])], schema=schema)
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    merged = merge_scene(rows, 0.5, None, {"file:///scene.tif": identity}).to_pylist()
    kept = [e for row in merged for e in row["detections"]]
    assert [(e["x_min"], e["x_max"], e["score"]) for e in kept] == [(110, 150, pytest.approx(0.9))]
    assert [row["num_detections"] for row in merged] == [0, 1]
    if instance == "keypoints":
        assert [(p["name"], p["x"], p["y"]) for p in kept[0]["keypoints"]] == [("nose", 111, 31)]
        return
    mask = kept[0]["mask"]
    assert mask["size"] == [100, 200]
    scene = coco_mask.decode({"size": mask["size"], "counts": mask["counts"].encode()})
    expected = np.zeros((100, 200), np.uint8)
    expected[30:60, 110:150] = 1
    assert np.array_equal(scene, expected)


def test_a_box_two_tiles_score_alike_is_kept_in_the_same_tiles_row_whatever_the_arrival() -> None:
    """An object wholly inside the overlap, found by both tiles with the same score: the kept
    box is the left tile's on every run, however the tiles reached the merge (it was the
    first to arrive's, so a rerun could move it to the other tile's row)."""
    from vision_ops.scenes import merge_scene
    from vision_ops.schema import output_schema

    left = tile_row(0, [entry(90, 30, 110, 50, 0.8)])
    right = tile_row(72, [entry(90 - 72, 30, 110 - 72, 50, 0.8)])
    schema = output_schema("detection", tiles=True)
    identity = {"file:///scene.tif": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}
    for arrival in ([left, right], [right, left]):
        rows = pa.Table.from_pylist(arrival, schema=schema)
        merged = merge_scene(rows, 0.5, None, identity).to_pylist()
        assert [(row["tile_x"], row["num_detections"]) for row in merged] == [(0, 1), (72, 0)]


def test_a_padded_tiles_boxes_are_cut_at_the_scenes_edge() -> None:
    """The scene of tile_row is 200 x 100 and its tiles 128 high: rows 100..128 of each tile
    and columns 200..200 + 72 of the right tile are padding. A box running into the padding
    ends at the scene's edge, in pixels and in the CRS; one wholly in the padding is no
    object of the scene and is dropped (the row's count with it)."""
    from vision_ops.scenes import merge_scene
    from vision_ops.schema import output_schema

    across = entry(100, 80, 140, 120, 0.9)  # right tile: scene x 172..212, y 80..120
    padding = entry(10, 105, 40, 125, 0.8)  # right tile, below the scene's last row
    row = tile_row(72, [across, padding])
    rows = pa.Table.from_pylist([row], schema=output_schema("detection", tiles=True))
    identity = {"file:///scene.tif": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}
    (merged,) = merge_scene(rows, 0.5, None, identity).to_pylist()

    assert merged["num_detections"] == 1
    (box,) = merged["detections"]
    sides = ("x_min", "y_min", "x_max", "y_max")
    assert [box[side] for side in sides] == [172, 80, 200, 100]
    assert [box[f"crs_{side}"] for side in sides] == [172, 80, 200, 100]


def test_a_padded_tiles_mask_is_cut_at_the_scenes_edge() -> None:
    """A mask running past the scene (a padded edge tile) keeps only the scene's pixels; runs
    that go on from one column's bottom into the next column's top stay one run."""
    from pycocotools import mask as coco_mask

    from vision_ops.scenes import mask_in_scene

    tile = np.ones((64, 64), np.uint8)
    moved = mask_in_scene(rle(tile), 40, 0, 50, 70)  # the scene: 50 rows, 70 columns
    scene = coco_mask.decode({"size": moved["size"], "counts": moved["counts"].encode()})
    expected = np.zeros((50, 70), np.uint8)
    expected[:, 40:] = 1
    assert moved["size"] == [50, 70] and np.array_equal(scene, expected)


def test_a_scene_leaves_the_stream_merged_as_soon_as_its_last_tile_is_in() -> None:
    """Scene a (2 tiles) and scene b (2 tiles) interleaved over three calls, a tile of a sent
    twice: a leaves merged with the call that brings its last tile, b with the next, each
    exactly as merge_scene merges the scene's rows at once; an unreadable scene (its one error
    row) leaves at once; nothing is held after."""
    from vision_ops.pipeline.planning import SceneMerge
    from vision_ops.scenes import merge_scene
    from vision_ops.schema import output_schema

    schema = output_schema("detection", tiles=True)
    cut, whole = entry(110, 30, 128, 60, 0.5), entry(110 - 72, 30, 150 - 72, 60, 0.9)

    def tile(scene: str, x: int, entries: list[dict]) -> dict:
        return tile_row(x, entries) | {"source_uri": scene, "item_id": f"{scene}#{x}"}

    a0, a72 = tile("file:///a.tif", 0, [cut]), tile("file:///a.tif", 72, [whole])
    b0, b72 = tile("file:///b.tif", 0, []), tile("file:///b.tif", 72, [whole])
    broken = {"source_uri": "file:///c.tif", "item_id": "c", "status": "error"}
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    transforms = {"file:///a.tif": identity, "file:///b.tif": identity}
    tiles = {"file:///a.tif": 2, "file:///b.tif": 2, "file:///c.tif": 1}
    stream = SceneMerge(tiles, transforms, seam_overlap=0.5, crs_wkt=None)

    def call(*rows: dict) -> list[dict]:
        return stream(pa.Table.from_pylist(list(rows), schema=schema)).to_pylist()

    def merged(*rows: dict) -> list[dict]:
        table = pa.Table.from_pylist(list(rows), schema=schema)
        return merge_scene(table, 0.5, None, transforms).to_pylist()

    assert call(a0, b0) == []
    assert call(a0, a72, broken) == merged(a0, a72) + merged(broken)
    assert call(b72) == merged(b0, b72)
    assert [e["x_min"] for row in merged(a0, a72) for e in row["detections"]] == [110]
    assert stream.waiting == {} and stream.units_in == {}


def every_pair_merge(boxes: list[tuple[int, dict]], seam_overlap: float) -> list[tuple[int, dict]]:
    """The seam rule as stated, each box against every kept one: best score first, a box goes
    when a kept box of its class from another tile covers `seam_overlap` of the smaller."""

    def covered(a: dict, b: dict) -> float:
        width = min(a["x_max"], b["x_max"]) - max(a["x_min"], b["x_min"])
        height = min(a["y_max"], b["y_max"]) - max(a["y_min"], b["y_min"])
        areas = [(x["x_max"] - x["x_min"]) * (x["y_max"] - x["y_min"]) for x in (a, b)]
        return width * height / min(areas) if width > 0 and height > 0 and min(areas) > 0 else 0

    kept: list[tuple[int, dict]] = []
    for tile, box in sorted(boxes, key=lambda item: -item[1]["score"]):
        if not any(
            other_tile != tile
            and other["label_id"] == box["label_id"]
            and covered(box, other) >= seam_overlap
            for other_tile, other in kept
        ):
            kept.append((tile, box))
    return kept


@pytest.mark.parametrize("seam_overlap", [0.05, 0.5, 1.0])
def test_the_indexed_seam_merge_keeps_what_comparing_every_pair_keeps(seam_overlap) -> None:
    """Crowded random boxes of 3 classes from 12 tiles over 1,200 px, 2 to 600 px a side (many
    span several cells of the merge's grid), boxes sitting on cell lines, inverted ones, boxes
    too wide to index and boxes with a side that is not a number."""
    from vision_ops.scenes import SEAM_GRID_PX, merge_across_tiles

    rng = np.random.default_rng(11)
    boxes = []
    for index in range(700):
        x, y = rng.uniform(-50, 1200, 2)
        w, h = rng.choice([rng.uniform(2, 40, 2), rng.uniform(40, 600, 2)])
        if index % 50 == 0:
            w = -w  # inverted: overlaps nothing
        if index % 7 == 0:
            x = SEAM_GRID_PX * int(rng.integers(0, 5))  # on a cell line
        if index % 97 == 0:
            w = 500_000.0  # too wide to index: compared with every kept box
        if index % 131 == 0:
            x = float("nan")  # a model's garbage: merged by the same rule, never an error
        box = {"x_min": x, "y_min": y, "x_max": x + w, "y_max": y + h}
        label = int(rng.integers(0, 3))
        boxes.append((int(rng.integers(0, 12)), box | {"label_id": label, "score": rng.random()}))
    kept = merge_across_tiles(boxes, seam_overlap)
    assert kept == every_pair_merge(boxes, seam_overlap)
    assert 0 < len(kept) < len(boxes)


def test_boxes_map_to_the_crs_as_their_rings_do() -> None:
    """crs_boxes maps every box at once: the bounds of each box's ring (box_polygon) under a
    rotated affine, and an empty list maps to none."""
    from vision_ops.georef import box_polygon
    from vision_ops.scenes import crs_boxes

    rotated = (8.66, -5.0, 500_000.0, -5.0, -8.66, 4_650_000.0)
    entries = [
        {"x_min": 0.0, "y_min": 0.0, "x_max": 10.0, "y_max": 20.0},
        {"x_min": 300.5, "y_min": 12.25, "x_max": 333.0, "y_max": 90.0},
    ]
    mapped = crs_boxes(entries, rotated, None)
    for entry, got in zip(entries, mapped, strict=True):
        ring = box_polygon(rotated, entry["x_min"], entry["y_min"], entry["x_max"], entry["y_max"])
        expected = [ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()]
        assert [got[k] for k in ("crs_x_min", "crs_y_min", "crs_x_max", "crs_y_max")] == expected
    assert crs_boxes([], rotated, None) == []
