"""A scene run's files read by the tools the README names: geopandas (pyogrio installed) gets the
footprints as geometries in the scene's CRS, filters on the bbox covering, and the `geo`
metadata validates against the GeoParquet 1.1 JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas
import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from pyproj import CRS
from rasterio.transform import from_origin

from vision_ops.cli import EXIT_OK, main
from vision_ops.georef import geo_metadata, polygon_wkb

pytestmark = pytest.mark.timeout(600)
SCHEMA = json.loads((Path(__file__).parent / "data" / "geoparquet-1.1.0.schema.json").read_text())
TRANSFORM = from_origin(600_000.0, 5_200_000.0, 20.0, 20.0)  # UTM 32N, 20 m pixels
WIDTH, HEIGHT, TILE = 192, 128, 64  # 3 x 2 tiles


@pytest.fixture(scope="module")
def scene_table(ray_local, tmp_path_factory, tiny_weights) -> Path:  # type: ignore[no-untyped-def]
    import yaml

    folder = tmp_path_factory.mktemp("geoparquet")
    values = np.random.default_rng(8).integers(1, 255, (3, HEIGHT, WIDTH), dtype=np.uint8)
    profile = {
        "driver": "GTiff", "width": WIDTH, "height": HEIGHT, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32632", "transform": TRANSFORM,
    }  # fmt: skip
    (folder / "scenes").mkdir()
    with rasterio.open(folder / "scenes" / "field.tif", "w", **profile) as out:
        out.write(values)
    spec = {
        "input": {"uris": [str(folder / "scenes")], "tiling": {"size": TILE}},
        "model": {
            "architecture": "mobilenet_v3_small",
            "weights": str(tiny_weights),
            "num_classes": 4,
            "preprocessing": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "output": {"uri": str(folder / "table")},
        "run": {"id": "geo", "date": "2026-11-24"},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(folder / "job.yaml")]) == EXIT_OK
    return folder / "table"


def expected_footprints() -> dict[tuple[int, int], shapely.Polygon]:
    boxes = {}
    for x in range(0, WIDTH, TILE):
        for y in range(0, HEIGHT, TILE):
            left, top = TRANSFORM * (x, y)
            right, bottom = TRANSFORM * (x + TILE, y + TILE)
            boxes[(x, y)] = shapely.box(left, bottom, right, top)
    return boxes


def part_files(table: Path) -> list[Path]:
    files = sorted(table.glob("run_date=*/*.parquet"))
    assert files
    return files


def test_geopandas_reads_the_footprints_in_the_scenes_crs(scene_table) -> None:
    expected = expected_footprints()
    for path in part_files(scene_table):
        frame = geopandas.read_parquet(path)
        assert frame.geometry.name == "footprint"
        assert frame.crs == CRS.from_epsg(32632)
        for row in frame.itertuples():
            box = expected.pop((row.tile_x, row.tile_y))
            assert row.footprint.normalize().equals_exact(box.normalize(), tolerance=0)
    assert expected == {}  # every tile read, once


def test_the_bbox_covering_filters_rows_in_geopandas(scene_table) -> None:
    # A 200 m x 200 m field inside tile (64, 0) only (x 601280..602560, y 5198720..5200000).
    field = (601_500.0, 5_199_000.0, 601_700.0, 5_199_200.0)
    found = geopandas.read_parquet(part_files(scene_table), bbox=field)
    assert sorted(zip(found["tile_x"], found["tile_y"], strict=True)) == [(64, 0)]
    everything = geopandas.read_parquet(part_files(scene_table), bbox=(0, 0, 1e7, 1e7))
    assert len(everything) == 6


def test_geo_metadata_is_valid_geoparquet_1_1(scene_table) -> None:
    validator = jsonschema.Draft7Validator(SCHEMA)
    for path in part_files(scene_table):
        geo = json.loads(pq.read_schema(path).metadata[b"geo"])
        assert list(validator.iter_errors(geo)) == []
        column = geo["columns"][geo["primary_column"]]
        assert CRS.from_json_dict(column["crs"]) == CRS.from_epsg(32632)
        left, top = TRANSFORM * (0, 0)
        right, bottom = TRANSFORM * (WIDTH, HEIGHT)
        assert column["bbox"] == [left, bottom, right, top]
    # The schema is not vacuous: what the spec forbids fails it.
    wrong = json.loads(json.dumps(geo))
    wrong["columns"]["footprint"]["covering"]["bbox"]["xmin"] = ["footprint_bbox", "ymin"]
    wrong["columns"]["footprint"]["encoding"] = "WKT"
    assert len(list(validator.iter_errors(wrong))) == 2


def test_pixel_footprints_say_they_have_no_crs(tmp_path) -> None:
    """Plain images' footprints are pixel coordinates: `crs` is null (undefined), never left
    out (GeoParquet reads a missing crs as OGC:CRS84, longitude/latitude)."""
    ring = np.array([[0, 0], [64, 0], [64, 64], [0, 64], [0, 0]], dtype=np.float64)
    table = pa.table({"footprint": [polygon_wkb(ring)]})
    table = table.replace_schema_metadata(geo_metadata("footprint", None, (0, 0, 64, 64)))
    pq.write_table(table, tmp_path / "pixels.parquet")
    geo = json.loads(pq.read_schema(tmp_path / "pixels.parquet").metadata[b"geo"])
    assert geo["columns"]["footprint"]["crs"] is None
    assert list(jsonschema.Draft7Validator(SCHEMA).iter_errors(geo)) == []
    frame = geopandas.read_parquet(tmp_path / "pixels.parquet")
    assert frame.crs is None and frame.geometry[0].bounds == (0, 0, 64, 64)
