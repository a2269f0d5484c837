"""Pixel -> CRS arithmetic against hand-computed coordinates and rasterio's own transform; WKB
read back by shapely; a GeoParquet file read as geometries by DuckDB spatial."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin, xy

from vision_ops.georef import box_polygon, footprint, geo_metadata, pixel_to_crs, polygon_wkb
from vision_ops.query import load_spatial
from vision_ops.tiling import Window, tile_windows

TRANSFORM = tuple(from_origin(500_000.0, 4_650_000.0, 10.0, 10.0))[:6]  # UTM 33N, 10 m pixels


def test_pixel_centres_agree_with_rasterio() -> None:
    rows, cols = np.array([0, 7, 199]), np.array([0, 13, 299])
    ours = pixel_to_crs(TRANSFORM, cols + 0.5, rows + 0.5)
    theirs = np.array(xy(from_origin(500_000.0, 4_650_000.0, 10.0, 10.0), rows, cols)).T
    np.testing.assert_allclose(ours, theirs)


def test_a_tile_footprint_is_the_expected_polygon_exactly() -> None:
    ring = footprint(TRANSFORM, Window(row_off=64, col_off=128, height=64, width=64))
    # x: 500000 + 10 * 128 = 501280 .. + 640 = 501920; y: 4650000 - 10 * 64 = 4649360 .. 4648720
    expected = [
        (501280.0, 4648720.0),
        (501920.0, 4648720.0),
        (501920.0, 4649360.0),
        (501280.0, 4649360.0),
        (501280.0, 4648720.0),
    ]
    polygon = shapely.from_wkb(polygon_wkb(ring))
    assert polygon.normalize().equals_exact(shapely.Polygon(expected).normalize(), tolerance=0)
    assert polygon.exterior.is_ccw and polygon.area == 640.0 * 640.0


def test_a_box_at_known_pixels_maps_to_known_coordinates() -> None:
    ring = box_polygon(TRANSFORM, x_min=10.5, y_min=20.0, x_max=30.5, y_max=25.0)
    xs, ys = ring[:, 0], ring[:, 1]
    assert (xs.min(), xs.max()) == (500_105.0, 500_305.0)
    assert (ys.min(), ys.max()) == (4_649_750.0, 4_649_800.0)


def test_geoparquet_is_read_as_geometries_by_duckdb_spatial(tmp_path: Path) -> None:
    """Footprints of a 3 x 3 tiling written with the metadata; DuckDB spatial counts the tiles
    that intersect a polygon."""
    windows = tile_windows(width=300, height=300, size=100)
    rings = [footprint(TRANSFORM, w) for w in windows]
    bounds = [(r[:, 0].min(), r[:, 1].min(), r[:, 0].max(), r[:, 1].max()) for r in rings]
    bbox_type = pa.struct([(n, pa.float64()) for n in ("xmin", "ymin", "xmax", "ymax")])
    table = pa.table(
        {
            "tile": list(range(len(windows))),
            "footprint": pa.array([polygon_wkb(r) for r in rings], pa.binary()),
            "footprint_bbox": pa.array(
                [dict(zip(("xmin", "ymin", "xmax", "ymax"), b, strict=True)) for b in bounds],
                bbox_type,
            ),
        }
    )
    crs = CRS.from_epsg(32633).to_dict(projjson=True)
    scene_bbox = [min(b[0] for b in bounds), min(b[1] for b in bounds)]
    scene_bbox += [max(b[2] for b in bounds), max(b[3] for b in bounds)]
    table = table.replace_schema_metadata(geo_metadata("footprint", crs, scene_bbox))
    pq.write_table(table, tmp_path / "tiles.parquet")
    assert json.loads(pq.read_schema(tmp_path / "tiles.parquet").metadata[b"geo"])["version"]

    connection = duckdb.connect()
    load_spatial(connection)
    columns = connection.sql(f"DESCRIBE SELECT * FROM '{tmp_path / 'tiles.parquet'}'")
    described = {row[0]: row[1] for row in columns.fetchall()}
    assert described["footprint"].startswith("GEOMETRY")
    # Tiles are 1 km: the centre one (4) spans x 501000..502000, y 4648000..4649000. A polygon
    # from its middle into its right neighbour (5) intersects those two only.
    probe = (
        "POLYGON((501400 4648400, 502300 4648400, 502300 4648600, 501400 4648600, 501400 4648400))"
    )
    count = connection.sql(
        f"SELECT list(tile ORDER BY tile) FROM '{tmp_path / 'tiles.parquet'}' "
        f"WHERE ST_Intersects(footprint, ST_GeomFromText('{probe}'))"
    ).fetchone()
    assert count == ([4, 5],)


@pytest.mark.parametrize("flip", [False, True])
def test_rings_are_counter_clockwise_whatever_the_transform(flip: bool) -> None:
    transform = (10.0, 0.0, 0.0, 0.0, 10.0 if flip else -10.0, 0.0)  # south-up when flipped
    ring = footprint(transform, Window(0, 0, 4, 4))
    assert shapely.Polygon(ring).exterior.is_ccw


def test_a_tables_geo_metadata_covers_its_runs() -> None:
    """The table's `geo`: the first run's; a run in the same CRS widens the bbox; a run that
    cut no scene keeps it; a run in another CRS leaves the table's CRS and bbox undefined."""
    from vision_ops.georef import GEO_KEY, geo_metadata, table_geo

    def geo(crs: dict | None, bbox: list[float] | None) -> str:
        return geo_metadata("footprint", crs, bbox)[GEO_KEY.encode()].decode()

    def footprint(text: str) -> dict:
        return json.loads(text)["columns"]["footprint"]

    utm, wgs = {"id": {"code": 32633}}, {"id": {"code": 4326}}
    first = geo(utm, [0.0, 0.0, 10.0, 10.0])
    assert table_geo(None, first) == first
    wider = table_geo(first, geo(utm, [5.0, -5.0, 20.0, 5.0]))
    assert footprint(wider) == footprint(first) | {"bbox": [0.0, -5.0, 20.0, 10.0]}
    assert table_geo(wider, geo(None, None)) == wider
    mixed = table_geo(wider, geo(wgs, [1.0, 1.0, 2.0, 2.0]))
    assert mixed is not None and footprint(mixed)["crs"] is None
    assert "bbox" not in footprint(mixed)
    assert table_geo(mixed, geo(utm, [0.0, 0.0, 1.0, 1.0])) == mixed  # and so it stays
    assert table_geo(None, geo(None, None)) is None  # a first run that cut no scene: none
