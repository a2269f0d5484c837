"""Pixels to map coordinates: tile footprints and boxes in a scene's CRS, as WKB, with the
GeoParquet 1.1 metadata that lets DuckDB spatial, GDAL/QGIS and geopandas read them."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from vision_ops.tiling import Window

# Affine (a, b, c, d, e, f): x = a * col + b * row + c, y = d * col + e * row + f (GDAL order,
# as rasterio's Affine lists it).
Transform = tuple[float, float, float, float, float, float]
WKB_POLYGON = 3
GEOPARQUET_VERSION = "1.1.0"
GEO_KEY = "geo"  # the Parquet metadata key (and Iceberg table property) GeoParquet reads


def pixel_to_crs(transform: Transform, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Map coordinates (N, 2) of pixel positions (col, row); pixel (0, 0) is the top-left
    corner of the top-left pixel, (0.5, 0.5) its centre."""
    a, b, c, d, e, f = transform
    cols, rows = np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64)
    return np.stack([a * cols + b * rows + c, d * cols + e * rows + f], axis=-1)


def box_polygon(
    transform: Transform, x_min: float, y_min: float, x_max: float, y_max: float
) -> np.ndarray:
    """The closed ring (5, 2) of a pixel box in the CRS, corners in pixel order
    top-left, top-right, bottom-right, bottom-left (counter-clockwise on a north-up map)."""
    cols = np.array([x_min, x_max, x_max, x_min, x_min])
    rows = np.array([y_min, y_min, y_max, y_max, y_min])
    ring = pixel_to_crs(transform, cols, rows)
    return ring if _signed_area(ring) > 0 else ring[::-1]


def footprint(transform: Transform, window: Window) -> np.ndarray:
    """The ring of a tile's window in the CRS."""
    return box_polygon(
        transform,
        window.col_off,
        window.row_off,
        window.col_off + window.width,
        window.row_off + window.height,
    )


def polygon_wkb(ring: np.ndarray) -> bytes:
    """ISO WKB (little endian) of a one-ring polygon."""
    ring = np.asarray(ring, dtype="<f8")
    header = struct.pack("<BII", 1, WKB_POLYGON, 1) + struct.pack("<I", len(ring))
    return header + ring.tobytes()


def geo_metadata(
    column: str, crs_projjson: dict[str, Any] | None, bbox: Sequence[float] | None
) -> dict[bytes, bytes]:
    """The Parquet key-value metadata of GeoParquet 1.1 for one WKB polygon column with a
    `{column}_bbox` covering struct (xmin, ymin, xmax, ymax). No CRS (pixel coordinates) is
    written as `"crs": null` (undefined): GeoParquet reads a missing `crs` as OGC:CRS84."""
    spec: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "covering": {
            "bbox": {name: [f"{column}_bbox", name] for name in ("xmin", "ymin", "xmax", "ymax")}
        },
        "crs": crs_projjson,
    }
    if bbox is not None:
        spec["bbox"] = [float(v) for v in bbox]
    content = {"version": GEOPARQUET_VERSION, "primary_column": column, "columns": {column: spec}}
    return {GEO_KEY.encode(): json.dumps(content).encode()}


def table_geo(held: str | None, run: str) -> str | None:
    """The `geo` metadata of a table that holds `held`'s rows and one run's (`run`), None where
    there is none to set. A run that cut no scene (no bbox: an incremental night with nothing
    new) adds nothing. The first run's is the table's; a later run in its CRS widens its bbox;
    a run in another CRS leaves CRS and bbox undefined (no bbox), and so they stay."""
    added = json.loads(run)
    column = added["primary_column"]
    now = added["columns"][column]
    if "bbox" not in now:
        return held
    if held is None:
        return run
    before = json.loads(held)["columns"].get(column, {})
    if "bbox" not in before:  # undefined: rows in more than one CRS
        return held
    if before.get("crs") != now.get("crs"):
        now["crs"] = None
        del now["bbox"]
    else:
        now["bbox"] = list(union_bounds(tuple(before["bbox"]), tuple(now["bbox"])))
    return json.dumps(added)


def union_bounds(
    a: tuple[float, ...] | None, b: tuple[float, ...]
) -> tuple[float, float, float, float]:
    """The bounds (xmin, ymin, xmax, ymax) that cover both (`b` alone where `a` is None)."""
    if a is None:
        return b[0], b[1], b[2], b[3]
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)
