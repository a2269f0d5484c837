"""Scenes into tile units: read each scene's header, cut it into tiles, fix its value range."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from vision_ops.config import TilingSpec
from vision_ops.errors import EXIT_BAD_SPEC, VisionOpsError
from vision_ops.georef import (
    Transform,
    box_polygon,
    footprint,
    geo_metadata,
    pixel_to_crs,
    polygon_wkb,
)
from vision_ops.raster import RasterError, Scene, open_raster, read_tile, scene_header
from vision_ops.storage import StorageOptions
from vision_ops.tiling import Window, tile_windows

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


class SceneError(VisionOpsError, ValueError):
    """Scenes that cannot go in one table (several CRSs)."""

    exit_code = EXIT_BAD_SPEC


@dataclass(frozen=True)
class TilePlan:
    units: pa.Table  # the listing's columns plus PLAN_FIELDS, one row per tile
    crs: Any  # the scenes' common rasterio CRS, or None for plain images
    bounds: tuple[float, float, float, float] | None  # all scenes, in that CRS
    transforms: dict[str, Transform]  # each readable scene's pixel -> CRS affine

    def parquet_metadata(self) -> dict[bytes, bytes]:
        """GeoParquet metadata for the table's `footprint` column."""
        projjson = self.crs.to_dict(projjson=True) if self.crs is not None else None
        return geo_metadata("footprint", projjson, self.bounds)


def plan_tiles(listing: pa.Table, tiling: TilingSpec, options: StorageOptions) -> TilePlan:
    """One unit per tile of each listed scene; a scene whose header cannot be read stays one
    unit carrying the reason (its error row)."""
    rows = listing.to_pylist()
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        scenes = list(pool.map(lambda row: _scene_plan(row["source_uri"], tiling, options), rows))
    readable = {
        row["source_uri"]: plan[0]
        for row, plan in zip(rows, scenes, strict=True)
        if isinstance(plan, tuple)
    }
    crs = _common_crs(readable)
    units = []
    for row, plan in zip(rows, scenes, strict=True):
        if isinstance(plan, str):
            units.append(row | dict.fromkeys(f.name for f in PLAN_FIELDS) | {"plan_error": plan})
            continue
        scene, low, high = plan
        for window in tile_windows(
            scene.width, scene.height, tiling.size, tiling.overlap, tiling.edge
        ):
            units.append(row | _tile(window.col_off, window.row_off, tiling.size, low, high))
    table = pa.Table.from_pylist(units, schema=pa.schema([*listing.schema, *PLAN_FIELDS]))
    bounds = _bounds(list(readable.values())) if crs else None
    transforms = {uri: scene.transform for uri, scene in readable.items()}
    return TilePlan(table, crs, bounds, transforms)


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
            low, high = value_range(dataset, scene, tiling)
    except (RasterError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return scene, low, high


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
    values = dataset.read(indexes=list(tiling.bands), out_shape=(len(tiling.bands), *shape))
    nodata = tiling.nodata if tiling.nodata is not None else scene.nodata
    valid = values[values != nodata] if nodata is not None else values.ravel()
    if valid.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(valid.astype(np.float64), [low_pct, high_pct])
    return float(low), (float(high) if high > low else float(low) + 1.0)


def _common_crs(scenes: dict[str, Scene]) -> Any:
    """The one CRS every readable scene shares; None where none has one (plain images). A run
    mixing CRSs, or scenes with a CRS and images without one (their pixel footprints would be
    labelled with the scenes' CRS), is refused before any work, naming an example of each."""
    by_crs: dict[str | None, str] = {}
    for uri, scene in scenes.items():
        by_crs.setdefault(scene.crs_wkt or None, uri)
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


def _bounds(scenes: list[Scene]) -> tuple[float, float, float, float] | None:
    if not scenes:
        return None
    rings = [box_polygon(s.transform, 0, 0, s.width, s.height) for s in scenes]
    xs = np.concatenate([r[:, 0] for r in rings])
    ys = np.concatenate([r[:, 1] for r in rings])
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def tile_unit(dataset: Any, unit: dict[str, Any], tiling: TilingSpec) -> dict[str, Any]:
    """One planned tile read: its RGB uint8 pixels, data coverage, scene and footprint."""
    size = int(unit["tile_size"])
    window = Window(int(unit["tile_y"]), int(unit["tile_x"]), size, size)
    value_range = (float(unit["value_low"]), float(unit["value_high"]))
    image, valid = read_tile(dataset, window, tiling.bands, value_range, tiling.nodata)
    transform = tuple(dataset.transform)[:6]
    ring = footprint(transform, window)
    tile_transform = pixel_to_crs(transform, np.array([window.col_off]), np.array([window.row_off]))
    a, b, _, d, e, _ = transform
    x0, y0 = tile_transform[0]
    return {
        "image": image,
        "valid_fraction": valid,
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
    return [(float(lon), float(lat)) for lon, lat in zip(lons, lats, strict=True)]


class SceneMerger:
    """The per-scene reduce after inference, for detection over tiled scenes: a scene's tile
    rows wait until all of them have arrived; then their boxes move from tile to scene pixels
    and the CRS, and a box found again by a neighbouring tile (on a seam, in the overlap) is
    kept once, the best-scoring one."""

    def __init__(self, plan: TilePlan, seam_overlap: float) -> None:
        self.plan, self.seam_overlap = plan, seam_overlap
        self.remaining: dict[str, int] = {}
        for uri in plan.units["source_uri"].to_pylist():
            self.remaining[uri] = self.remaining.get(uri, 0) + 1
        self.pending: dict[str, list[dict[str, Any]]] = {}

    def add(self, table: pa.Table) -> pa.Table:
        """The rows of the scenes this table completes (possibly none)."""
        ready: list[dict[str, Any]] = []
        for row in table.to_pylist():
            uri = row["source_uri"]
            self.pending.setdefault(uri, []).append(row)
            self.remaining[uri] -= 1
            if self.remaining[uri] == 0:
                ready += self._merged(uri, self.pending.pop(uri))
        return pa.Table.from_pylist(ready, schema=table.schema)

    def _merged(self, uri: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        transform = self.plan.transforms.get(uri)
        if transform is None:
            return rows  # an unreadable scene: its error row
        boxes = [
            (index, entry | _scene_box(entry, row))
            for index, row in enumerate(rows)
            for entry in (row["detections"] or [])
        ]
        kept = merge_across_tiles(boxes, self.seam_overlap)
        mapped = crs_boxes([entry for _, entry in kept], transform, self.plan.crs)
        for row in rows:
            if row["detections"] is not None:
                row["detections"] = []
        for (index, entry), extra in zip(kept, mapped, strict=True):
            rows[index]["detections"].append(entry | extra)
        for row in rows:
            if row["detections"] is not None:
                row["num_detections"] = len(row["detections"])
        return rows


def crs_boxes(
    entries: list[dict[str, Any]], transform: Transform, crs: Any
) -> list[dict[str, float | None]]:
    """Scene-pixel boxes in the CRS (bounds of the mapped corners) and their WGS84 centres,
    reprojected together."""
    bounds = []
    for entry in entries:
        ring = box_polygon(
            transform, entry["x_min"], entry["y_min"], entry["x_max"], entry["y_max"]
        )
        bounds.append((ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()))
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
    x, y = row["tile_x"], row["tile_y"]
    return {
        "x_min": entry["x_min"] + x,
        "y_min": entry["y_min"] + y,
        "x_max": entry["x_max"] + x,
        "y_max": entry["y_max"] + y,
    }


def merge_across_tiles(
    boxes: list[tuple[int, dict[str, Any]]], seam_overlap: float
) -> list[tuple[int, dict[str, Any]]]:
    """Greedy, best score first: a box is dropped when a kept box of the same class from
    another tile covers at least `seam_overlap` of the smaller of the two (intersection over
    the smaller box: a seam cuts an object into a part and a whole, whose IoU can be small)."""
    order = sorted(boxes, key=lambda item: -item[1]["score"])
    kept: list[tuple[int, dict[str, Any]]] = []
    for tile, box in order:
        duplicate = any(
            other_tile != tile
            and other["label_id"] == box["label_id"]
            and _overlap_of_smaller(box, other) >= seam_overlap
            for other_tile, other in kept
        )
        if not duplicate:
            kept.append((tile, box))
    return kept


def _overlap_of_smaller(a: dict[str, float], b: dict[str, float]) -> float:
    width = min(a["x_max"], b["x_max"]) - max(a["x_min"], b["x_min"])
    height = min(a["y_max"], b["y_max"]) - max(a["y_min"], b["y_min"])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min(_area(a), _area(b))
    return width * height / smaller if smaller > 0 else 0.0


def _area(box: dict[str, float]) -> float:
    return (box["x_max"] - box["x_min"]) * (box["y_max"] - box["y_min"])
