"""Scenes into tile units: read each scene's header, cut it into tiles, fix its value range."""

from __future__ import annotations

import functools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vision_ops.config import TilingSpec
from vision_ops.errors import EXIT_BAD_SPEC, VisionOpsError
from vision_ops.georef import (
    Transform,
    box_polygon,
    footprint,
    geo_metadata,
    pixel_to_crs,
    polygon_wkb,
    union_bounds,
)
from vision_ops.raster import (
    RasterError,
    Scene,
    check_bands,
    open_raster,
    read_tile,
    scene_bands,
    scene_header,
    valid_values,
)
from vision_ops.schema import item_id
from vision_ops.storage import StorageOptions
from vision_ops.tally import Tally, bucket_of, token_sum
from vision_ops.tiling import Window, tile_offsets, tile_windows, tiled_length

# Columns the plan adds to each listing row: one row per tile.
PLAN_FIELDS = [
    pa.field("tile_x", pa.int32()),
    pa.field("tile_y", pa.int32()),
    pa.field("tile_size", pa.int32()),
    pa.field("value_low", pa.float64()),
    pa.field("value_high", pa.float64()),
    pa.field("plan_error", pa.string()),
]
STRETCH_SIDE = 1024  # the longer side of the reduced read a percentile stretch is measured on
HEADER_THREADS = 16
SEAM_GRID_PX = 256  # the cells of the index that finds a box's neighbours across seams
WIDE_BOX_CELLS = 256  # a box over more cells is compared with every kept box instead


class SceneError(VisionOpsError, ValueError):
    """Scenes that cannot go in one table (several CRSs)."""

    exit_code = EXIT_BAD_SPEC


def parquet_metadata(crs: Any, bounds: tuple[float, float, float, float] | None) -> dict:
    """GeoParquet metadata for a tiled table's `footprint` column."""
    projjson = crs.to_dict(projjson=True) if crs is not None else None
    return geo_metadata("footprint", projjson, bounds)


# Columns the header pass adds to each listing row: one row per scene.
SCENE_FIELDS = [
    pa.field("scene_width", pa.int64()),
    pa.field("scene_height", pa.int64()),
    pa.field("scene_transform", pa.list_(pa.float64())),  # pixel -> CRS affine (a..f)
    pa.field("scene_crs", pa.string()),  # WKT; null for plain images and unreadable scenes
    pa.field("value_low", pa.float64()),
    pa.field("value_high", pa.float64()),
    pa.field("plan_error", pa.string()),
    pa.field("scene_tiles", pa.int64()),  # its units: tiles, or 1 (its error row)
    pa.field("scene_token_sum", pa.uint64()),  # its units' tally tokens summed modulo 2**64
]
_SCENE_ONLY = [f.name for f in SCENE_FIELDS if f.name not in {p.name for p in PLAN_FIELDS}]


def scene_rows(listing: pa.Table, tiling: TilingSpec, options: StorageOptions) -> pa.Table:
    """A block of listing rows -> the same rows plus SCENE_FIELDS: each scene's header read
    (threads, as reads wait on storage), its value range, and its tiles counted and tallied
    (a scene's units all fall in its source's tally bucket, so two numbers carry them)."""
    uris = listing["source_uri"].to_pylist()
    with ThreadPoolExecutor(max(1, min(HEADER_THREADS, len(uris)))) as pool:
        plans = list(pool.map(lambda uri: _scene_plan(uri, tiling, options), uris))
    records = [_scene_record(uri, plan, tiling) for uri, plan in zip(uris, plans, strict=True)]
    table = listing
    for added in SCENE_FIELDS:
        table = table.append_column(added, pa.array([r[added.name] for r in records], added.type))
    return table


def _scene_record(
    uri: str, plan: tuple[Scene, float, float] | str, tiling: TilingSpec
) -> dict[str, Any]:
    if isinstance(plan, str):
        record: dict[str, Any] = dict.fromkeys(f.name for f in SCENE_FIELDS)
        token = token_sum([item_id(uri)])
        return record | {"plan_error": plan, "scene_tiles": 1, "scene_token_sum": token}
    scene, low, high = plan
    windows = tile_windows(scene.width, scene.height, tiling.size, tiling.overlap, tiling.edge)
    tokens = token_sum(item_id(uri, tile=(w.col_off, w.row_off)) for w in windows)
    return {
        "scene_width": scene.width,
        "scene_height": scene.height,
        "scene_transform": [float(v) for v in scene.transform],
        "scene_crs": scene.crs_wkt or None,
        "value_low": low,
        "value_high": high,
        "plan_error": None,
        "scene_tiles": len(windows),
        "scene_token_sum": tokens,
    }


def cut_tiles(scenes: pa.Table, tiling: TilingSpec) -> pa.Table:
    """Scene rows (scene_rows) -> one row per tile (the listing's columns plus PLAN_FIELDS),
    scene by scene, row by row; an unreadable scene stays one row carrying its plan_error."""
    index: list[np.ndarray] = []
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    widths, heights = scenes["scene_width"].to_pylist(), scenes["scene_height"].to_pylist()
    for row, (width, height) in enumerate(zip(widths, heights, strict=True)):
        if width is None:
            index.append(np.array([row]))
            xs.append(np.array([-1]))
            ys.append(np.array([-1]))
            continue
        cols = np.asarray(tile_offsets(width, tiling.size, tiling.overlap, tiling.edge))
        rows = np.asarray(tile_offsets(height, tiling.size, tiling.overlap, tiling.edge))
        index.append(np.full(len(cols) * len(rows), row))
        xs.append(np.tile(cols, len(rows)))
        ys.append(np.repeat(rows, len(cols)))
    take = np.concatenate(index) if index else np.zeros(0, np.int64)
    tiles = scenes.take(pa.array(take, pa.int64())).drop_columns(_SCENE_ONLY)
    planned = pc.is_null(tiles["plan_error"])
    x = np.concatenate(xs) if xs else np.zeros(0, np.int64)
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    size = np.full(len(take), tiling.size)
    columns = {
        "tile_x": pa.array(x, pa.int32()),
        "tile_y": pa.array(y, pa.int32()),
        "tile_size": pa.array(size, pa.int32()),
    }
    listing = tiles.drop_columns(["value_low", "value_high", "plan_error"])
    for planned_field in PLAN_FIELDS:
        name = planned_field.name
        if name in columns:
            nulls = pa.nulls(len(take), planned_field.type)
            column = pc.if_else(planned, columns[name], nulls)
        else:
            column = tiles[name]
        listing = listing.append_column(planned_field, column)
    return listing


SCENE_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("scenes", pa.int64()),
        pa.field("tiles", pa.int64()),
        pa.field("counts", pa.list_(pa.int64())),
        pa.field("sums", pa.list_(pa.uint64())),
        pa.field("crs", pa.list_(pa.string())),  # each CRS (WKT, or "" for none) ...
        pa.field("crs_uri", pa.list_(pa.string())),  # ... and its first scene (by URI)
        pa.field("bounds", pa.list_(pa.float64())),  # the readable scenes' (4 values; or none)
    ]
)


def summarise_scenes(scenes: pa.Table, tiling: TilingSpec) -> pa.Table:
    """A block of scene rows -> one row (SCENE_SUMMARY_SCHEMA): its scenes and tiles, their
    tally, each CRS with its first scene, and the bounds of the readable scenes' tiles."""
    uris = scenes["source_uri"].to_pylist()
    counts = scenes["scene_tiles"].to_pylist()
    buckets = np.asarray([bucket_of(uri) for uri in uris], np.int64)
    tally = Tally()
    np.add.at(tally.counts, buckets, np.asarray(counts, np.int64))
    np.add.at(tally.sums, buckets, np.asarray(scenes["scene_token_sum"].to_pylist(), np.uint64))
    first: dict[str, str] = {}
    readable: list[Scene] = []
    for row in scenes.select(
        ["source_uri", "scene_width", "scene_height", "scene_transform", "scene_crs"]
    ).to_pylist():
        if row["scene_width"] is None:
            continue
        wkt = row["scene_crs"] or ""
        first[wkt] = min(first.get(wkt, row["source_uri"]), row["source_uri"])
        a, b, c, d, e, f = row["scene_transform"]
        size = row["scene_width"], row["scene_height"]
        readable.append(Scene(*size, 0, "", row["scene_crs"], (a, b, c, d, e, f), None))
    bounds = _bounds(readable, tiling)
    return pa.Table.from_pylist(
        [
            {
                "scenes": len(uris),
                "tiles": sum(counts),
                "counts": tally.counts.tolist(),
                "sums": tally.sums.tolist(),
                "crs": list(first),
                "crs_uri": list(first.values()),
                "bounds": list(bounds) if bounds else None,
            }
        ],
        schema=SCENE_SUMMARY_SCHEMA,
    )


@dataclass
class SceneSummary:
    """What one pass over the scene rows' blocks adds up to, in fixed memory: the scenes and
    tiles, the tiles' tally, each CRS found with its first scene, the scenes' bounds."""

    scenes: int = 0
    tiles: int = 0
    tally: Tally = field(default_factory=Tally)
    first: dict[str, str] = field(default_factory=dict)  # CRS WKT ("" for none) -> URI
    bounds: tuple[float, float, float, float] | None = None

    def add(self, summaries: pa.Table) -> None:
        """Rows of SCENE_SUMMARY_SCHEMA."""
        for row in summaries.to_pylist():
            self.scenes += row["scenes"]
            self.tiles += row["tiles"]
            part = Tally(np.asarray(row["counts"], np.int64), np.asarray(row["sums"], np.uint64))
            self.tally = self.tally.merge(part)
            for wkt, uri in zip(row["crs"], row["crs_uri"], strict=True):
                self.first[wkt] = min(self.first.get(wkt, uri), uri)
            if row["bounds"]:
                self.bounds = union_bounds(self.bounds, tuple(row["bounds"]))

    def common_crs(self) -> Any:
        """The scenes' one CRS (else SceneError, before any work)."""
        return _common_crs({wkt or None: uri for wkt, uri in self.first.items()})

    def scene_bounds(self) -> tuple[float, float, float, float] | None:
        return self.bounds if self.common_crs() is not None else None


def _tile(x: int, y: int, size: int, low: float, high: float) -> dict[str, Any]:
    return {
        "tile_x": x,
        "tile_y": y,
        "tile_size": size,
        "value_low": low,
        "value_high": high,
        "plan_error": None,
    }


def _scene_plan(
    uri: str, tiling: TilingSpec, options: StorageOptions
) -> tuple[Scene, float, float] | str:
    try:
        with open_raster(uri, options) as dataset:
            scene = scene_header(dataset)
            check_bands(scene_bands(tiling.bands, dataset.count), dataset.count)
            _check_real(scene)
            _check_covered(scene, tiling)
            low, high = value_range(dataset, scene, tiling)
    except ImportError:
        raise
    except Exception as err:  # one scene's error row, never its planning block's failure
        return str(err) if isinstance(err, RasterError) else f"{type(err).__name__}: {err}"
    return scene, low, high


def _check_real(scene: Scene) -> None:
    """RasterError for complex values (a SAR SLC's): a tile shows real values, and numpy does
    not even know GDAL's complex integer types."""
    if "complex" in scene.dtype:
        raise RasterError(
            f"{scene.dtype} values: expected real bands (a SAR SLC's complex values: convert "
            "them to amplitude first)"
        )


def _check_covered(scene: Scene, tiling: TilingSpec) -> None:
    """RasterError where the tiling covers no pixel of the scene (`edge: drop` and a scene
    smaller than one tile): the scene is an error row, not left out of the table."""
    if not tile_windows(scene.width, scene.height, tiling.size, tiling.overlap, tiling.edge):
        raise RasterError(
            f"{scene.width}x{scene.height} is smaller than one {tiling.size}-pixel tile, so "
            "edge: drop covers none of it (edge: shift or pad reads it)"
        )


def value_range(dataset: Any, scene: Scene, tiling: TilingSpec) -> tuple[float, float]:
    """The spec's range; else the integer type's full range; else (floats, or a percentile
    asked for) the percentiles of the valid pixels of a reduced read of the scene."""
    if tiling.value_range is not None:
        return tiling.value_range
    if tiling.percentile is None and np.issubdtype(np.dtype(scene.dtype), np.integer):
        info = np.iinfo(np.dtype(scene.dtype))
        return float(info.min), float(info.max)
    low_pct, high_pct = tiling.percentile or (2.0, 98.0)
    scale = max(scene.width, scene.height) / STRETCH_SIDE
    shape = (
        max(1, round(scene.height / max(scale, 1))),
        max(1, round(scene.width / max(scale, 1))),
    )
    bands = scene_bands(tiling.bands, dataset.count)
    values = dataset.read(indexes=bands, out_shape=(len(bands), *shape))
    nodata = tiling.nodata if tiling.nodata is not None else scene.nodata
    valid = valid_values(dataset, values, bands, nodata, out_shape=shape)
    if valid.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(valid.astype(np.float64), [low_pct, high_pct])
    return float(low), (float(high) if high > low else float(low) + 1.0)


def _common_crs(by_crs: dict[str | None, str]) -> Any:
    """The one CRS every readable scene shares (`by_crs`: each CRS's WKT, None for none, and
    its first scene); None where none has one (plain images). A run mixing CRSs, or scenes
    with a CRS and images without one (their pixel footprints would be labelled with the
    scenes' CRS), is refused before any work, naming an example of each."""
    if len(by_crs) > 1:
        examples = "; ".join(
            f"{_crs_name(wkt)}: {uri}" for wkt, uri in sorted(by_crs.items(), key=lambda e: e[1])
        )
        raise SceneError(
            f"expected every scene of a run in one CRS, found {len(by_crs)} ({examples}); a "
            "table's footprints share one CRS: run one job per CRS, reproject the scenes, or "
            "keep plain images (no CRS) in a job of their own"
        )
    wkt = next(iter(by_crs), None)
    if wkt is None:
        return None
    from rasterio.crs import CRS

    return CRS.from_wkt(wkt)


def _crs_name(wkt: str | None) -> str:
    if wkt is None:
        return "no CRS (pixel coordinates)"
    from rasterio.crs import CRS

    crs = CRS.from_wkt(wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def _bounds(scenes: list[Scene], tiling: TilingSpec) -> tuple[float, float, float, float] | None:
    """The box holding every scene and its tiles' footprints (a padded tile's run past the
    scene's edge): GeoParquet's bbox covers every geometry."""
    if not scenes:
        return None
    reach = functools.partial(
        tiled_length, size=tiling.size, overlap=tiling.overlap, edge=tiling.edge
    )
    rings = [box_polygon(s.transform, 0, 0, reach(s.width), reach(s.height)) for s in scenes]
    xs = np.concatenate([r[:, 0] for r in rings])
    ys = np.concatenate([r[:, 1] for r in rings])
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def tile_unit(dataset: Any, unit: dict[str, Any], tiling: TilingSpec) -> dict[str, Any]:
    """One planned tile read: its RGB uint8 pixels, data coverage, scene and footprint."""
    value_range = (float(unit["value_low"]), float(unit["value_high"]))
    bands = scene_bands(tiling.bands, dataset.count)
    image, valid = read_tile(dataset, tile_window_of(unit), bands, value_range, tiling.nodata)
    return {"image": image, "valid_fraction": valid, **tile_place(dataset, unit)}


def tile_window_of(unit: dict[str, Any]) -> Window:
    size = int(unit["tile_size"])
    return Window(int(unit["tile_y"]), int(unit["tile_x"]), size, size)


def tile_place(dataset: Any, unit: dict[str, Any]) -> dict[str, Any]:
    """Where a planned tile lies, from its scene's header alone (no pixel read): its transform,
    the scene's size and CRS, its footprint and centre; a tile whose pixels cannot be read
    keeps them on its error row."""
    window = tile_window_of(unit)
    transform = tuple(dataset.transform)[:6]
    ring = footprint(transform, window)
    tile_transform = pixel_to_crs(transform, np.array([window.col_off]), np.array([window.row_off]))
    a, b, _, d, e, _ = transform
    x0, y0 = tile_transform[0]
    return {
        "tile_transform": json.dumps([a, b, float(x0), d, e, float(y0)]),
        "scene_width": int(dataset.width),
        "scene_height": int(dataset.height),
        "crs": dataset.crs.to_string() if dataset.crs else None,
        "footprint": polygon_wkb(ring),
        **_center_lonlat(dataset, transform, window),
    }


def _center_lonlat(dataset: Any, transform: Any, window: Window) -> dict[str, float | None]:
    col, row = window.col_off + window.width / 2, window.row_off + window.height / 2
    x, y = pixel_to_crs(transform, np.array([col]), np.array([row]))[0]
    points = to_lonlat(dataset.crs, [float(x)], [float(y)])
    if not points:
        return {"center_lon": None, "center_lat": None}
    return {"center_lon": points[0][0], "center_lat": points[0][1]}


def to_lonlat(crs: Any, xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    """WGS84 longitude and latitude of CRS points, in one reprojection; none without a CRS."""
    if not crs or not xs:
        return []
    from rasterio.warp import transform as reproject

    lons, lats = reproject(crs, "EPSG:4326", xs, ys)
    return [(_wrapped(lon), float(lat)) for lon, lat in zip(lons, lats, strict=True)]


def _wrapped(lon: float) -> float:
    """A longitude within [-180, 180): a geographic scene past the antimeridian (or in 0..360)
    holds 180.1, which is -179.9."""
    return (float(lon) + 180.0) % 360.0 - 180.0


def merge_scene(
    rows: pa.Table, seam_overlap: float, crs_wkt: str | None, transforms: dict[str, Transform]
) -> pa.Table:
    """The per-scene reduce after inference, for detection over tiled scenes (`rows`: every
    tile row of one scene; `transforms`: each readable scene's pixel -> CRS affine): boxes
    (and their masks or keypoints) move from tile to scene pixels, cut at the scene's edge (a
    box wholly in a padded tile's padding is dropped), boxes to the CRS too, and a box found
    again by a neighbouring tile (on a seam, in the overlap) is kept once, the
    best-scoring one, with its mask or keypoints. An unreadable scene (its error row) comes
    back as it is. The tiles are taken in their place's order, not as they arrived, so a box
    two tiles found with the same score is kept in the same tile's row on every run."""
    records = sorted(rows.to_pylist(), key=_tile_place)
    transform = transforms.get(records[0]["source_uri"]) if records else None
    if transform is None:
        return rows
    boxes = [
        (index, entry | box)
        for index, row in enumerate(records)
        for entry in (row["detections"] or [])
        if _in_scene(box := _scene_box(entry, row))
    ]
    kept = [
        (index, entry | _scene_instance(entry, records[index]))
        for index, entry in merge_across_tiles(boxes, seam_overlap)
    ]
    mapped = crs_boxes([entry for _, entry in kept], transform, _crs(crs_wkt))
    for row in records:
        if row["detections"] is not None:
            row["detections"] = []
    for (index, entry), extra in zip(kept, mapped, strict=True):
        records[index]["detections"].append(entry | extra)
    for row in records:
        if row["detections"] is not None:
            row["num_detections"] = len(row["detections"])
    return pa.Table.from_pylist(records, schema=rows.schema)


def scene_transforms(scenes: pa.Table) -> dict[str, Transform]:
    """Each readable scene's pixel -> CRS affine, from scene rows (scene_rows)."""
    uris, affines = scenes["source_uri"].to_pylist(), scenes["scene_transform"].to_pylist()
    return {
        uri: (a[0], a[1], a[2], a[3], a[4], a[5])
        for uri, a in zip(uris, affines, strict=True)
        if a is not None
    }


def _crs(wkt: str | None) -> Any:
    if wkt is None:
        return None
    from rasterio.crs import CRS

    return CRS.from_wkt(wkt)


def crs_boxes(
    entries: list[dict[str, Any]], transform: Transform, crs: Any
) -> list[dict[str, float | None]]:
    """Scene-pixel boxes in the CRS (bounds of the mapped corners) and their WGS84 centres,
    reprojected together."""
    sides = ("x_min", "y_min", "x_max", "y_max")
    pixels = np.array([[entry[side] for side in sides] for entry in entries], np.float64)
    pixels = pixels.reshape(-1, 4)
    # each box's four corners, all boxes at once (box_polygon's corners, less the closing one)
    corners = pixel_to_crs(transform, pixels[:, [0, 2, 2, 0]], pixels[:, [1, 1, 3, 3]])
    low, high = corners.min(axis=1), corners.max(axis=1)  # (N, 2): x and y
    bounds = [(x0, y0, x1, y1) for (x0, y0), (x1, y1) in zip(low, high, strict=True)]
    centres = to_lonlat(
        crs, [(b[0] + b[2]) / 2 for b in bounds], [(b[1] + b[3]) / 2 for b in bounds]
    )
    names = ("crs_x_min", "crs_y_min", "crs_x_max", "crs_y_max")
    mapped: list[dict[str, float | None]] = []
    for index, box in enumerate(bounds):
        lon, lat = centres[index] if centres else (None, None)
        mapped.append({name: float(v) for name, v in zip(names, box, strict=True)})
        mapped[-1] |= {"lon": lon, "lat": lat}
    return mapped


def _scene_box(entry: dict[str, Any], row: dict[str, Any]) -> dict[str, float]:
    """A tile's box in scene pixels, cut at the scene's edge: a padded tile's box may run into
    the padding past it (the mask is cut there too, `mask_in_scene`)."""
    x, y = row["tile_x"], row["tile_y"]
    width, height = float(row["scene_width"]), float(row["scene_height"])
    return {
        "x_min": min(max(entry["x_min"] + x, 0.0), width),
        "y_min": min(max(entry["y_min"] + y, 0.0), height),
        "x_max": min(max(entry["x_max"] + x, 0.0), width),
        "y_max": min(max(entry["y_max"] + y, 0.0), height),
    }


def _in_scene(box: dict[str, float]) -> bool:
    """Whether a box cut at the scene's edge (`_scene_box`) holds any of the scene: one found
    wholly in a padded tile's padding (no data) holds none."""
    return box["x_max"] > box["x_min"] and box["y_max"] > box["y_min"]


def mask_in_scene(
    rle: dict[str, Any], x: int, y: int, height: int, width: int
) -> dict[str, object]:
    """A tile's mask (COCO RLE in tile pixels) moved to its scene of `height` x `width`
    pixels, the tile's top-left at (x, y); pixels past the scene's edge (a padded tile) are
    cut off. Built from the tile's runs, column by column (COCO RLE is column-major), never a
    scene-sized array."""
    from pycocotools import mask as coco_mask

    tile = coco_mask.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()})
    tile = tile[: max(0, height - y), : max(0, width - x)]
    runs: list[list[int]] = []  # [start, end) of each run of 1s, column-major scene offsets
    for col in np.flatnonzero(tile.any(axis=0)):
        column = np.concatenate([[0], tile[:, col].astype(np.int8), [0]])
        changes = np.flatnonzero(np.diff(column)).reshape(-1, 2)  # each run's start, end
        for start, end in (x + int(col)) * height + y + changes:
            if runs and runs[-1][1] == start:  # a run going on at the top of the next column
                runs[-1][1] = int(end)
            else:
                runs.append([int(start), int(end)])
    counts, at = [], 0
    for start, end in runs:
        counts += [start - at, end - start]
        at = end
    counts.append(height * width - at)
    encoded = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": encoded["counts"].decode()}


def _scene_instance(entry: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A kept box's mask (Mask R-CNN) or keypoints (Keypoint R-CNN) moved, like the box, from
    tile to scene pixels."""
    x, y = row["tile_x"], row["tile_y"]
    moved: dict[str, Any] = {}
    if entry.get("mask") is not None:
        size = int(row["scene_height"]), int(row["scene_width"])
        moved["mask"] = mask_in_scene(entry["mask"], x, y, *size)
    if entry.get("keypoints") is not None:
        moved["keypoints"] = [
            point | {"x": point["x"] + x, "y": point["y"] + y} for point in entry["keypoints"]
        ]
    return moved


def _tile_place(row: dict[str, Any]) -> tuple[int, int]:
    """A tile row's place in its scene: top to bottom, then left to right."""
    return (row.get("tile_y") or 0, row.get("tile_x") or 0)


def merge_across_tiles(
    boxes: list[tuple[int, dict[str, Any]]], seam_overlap: float
) -> list[tuple[int, dict[str, Any]]]:
    """Greedy, best score first: a box is dropped when a kept box of the same class from
    another tile covers at least `seam_overlap` of the smaller of the two (intersection over
    the smaller box: a seam cuts an object into a part and a whole, whose IoU can be small).

    Boxes that overlap share a grid cell (the corner of their intersection lies in both), so
    a box is compared only with the kept boxes of its class in its cells, and with the few
    kept boxes too wide to index: a scene's merge grows with its boxes, not with their square
    (benchmarks/scene_merge.py). A box too wide to index is compared with every kept box."""
    order = sorted(boxes, key=lambda item: -item[1]["score"])
    kept: list[tuple[int, dict[str, Any]]] = []
    wide: list[tuple[int, dict[str, Any]]] = []
    by_cell: dict[tuple[Any, int, int], list[tuple[int, dict[str, Any]]]] = {}
    for tile, box in order:
        cells = _grid_cells(box)
        keys = [] if cells is None else [(box["label_id"], *cell) for cell in cells]
        near = kept if cells is None else chain(wide, *(by_cell.get(key, ()) for key in keys))
        duplicate = any(
            other_tile != tile
            and other["label_id"] == box["label_id"]
            and _overlap_of_smaller(box, other) >= seam_overlap
            for other_tile, other in near
        )
        if duplicate:
            continue
        kept.append((tile, box))
        if cells is None:
            wide.append((tile, box))
        for key in keys:
            by_cell.setdefault(key, []).append((tile, box))
    return kept


def _grid_cells(box: dict[str, float]) -> list[tuple[int, int]] | None:
    """The SEAM_GRID_PX cells a box touches (none for a box inverted on an axis, which
    overlaps nothing); None for a box over WIDE_BOX_CELLS cells or with a side not finite."""
    sides = (box["x_min"], box["y_min"], box["x_max"], box["y_max"])
    if not all(math.isfinite(side) for side in sides):
        return None
    x0, y0, x1, y1 = (int(side // SEAM_GRID_PX) for side in sides)
    if (x1 - x0 + 1) * (y1 - y0 + 1) > WIDE_BOX_CELLS:
        return None
    return [(column, row) for column in range(x0, x1 + 1) for row in range(y0, y1 + 1)]


def _overlap_of_smaller(a: dict[str, float], b: dict[str, float]) -> float:
    width = min(a["x_max"], b["x_max"]) - max(a["x_min"], b["x_min"])
    height = min(a["y_max"], b["y_max"]) - max(a["y_min"], b["y_min"])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min(_area(a), _area(b))
    return width * height / smaller if smaller > 0 else 0.0


def _area(box: dict[str, float]) -> float:
    return (box["x_max"] - box["x_min"]) * (box["y_max"] - box["y_min"])
