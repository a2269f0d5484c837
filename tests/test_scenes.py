"""Scenes through the job: a GeoTIFF cut into tiles across the cluster, one row per tile with
its window and exact footprint, nodata tiles skipped and counted, a broken raster an error row,
predictions equal a direct model call on the hand-read tile, and GeoParquet that DuckDB
spatial reads as geometries."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
import torch
import torchvision
from rasterio.transform import from_origin
from rasterio.warp import transform as reproject
from scene_plans import plan_tiles

from vision_ops.cli import main
from vision_ops.config import parse_spec
from vision_ops.pipeline import run_job
from vision_ops.query import load_spatial
from vision_ops.sink import committed_run
from vision_ops.sources import list_inputs
from vision_ops.tiling import tile_windows

pytestmark = pytest.mark.timeout(600)
TRANSFORM = from_origin(600_000.0, 5_200_000.0, 20.0, 20.0)  # UTM 32N, 20 m pixels
WIDTH, HEIGHT, TILE = 300, 200, 64
PREP = {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def bands() -> np.ndarray:
    """Four 16-bit bands; rows 0..69 are nodata (0), so the first row of tiles has none."""
    rng = np.random.default_rng(1)
    values = rng.integers(1, 4_000, (4, HEIGHT, WIDTH)).astype(np.uint16)
    values[:, :70, :] = 0
    return values


@pytest.fixture
def scenes(tmp_path: Path, bands: np.ndarray) -> Path:
    folder = tmp_path / "scenes"
    folder.mkdir()
    profile = {
        "driver": "GTiff", "width": WIDTH, "height": HEIGHT, "count": 4, "dtype": "uint16",
        "crs": "EPSG:32632", "transform": TRANSFORM, "nodata": 0, "tiled": True,
        "blockxsize": 64, "blockysize": 64,
    }  # fmt: skip
    with rasterio.open(folder / "scene.tif", "w", **profile) as out:
        out.write(bands)
    (folder / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 40)
    return folder


def spec_for(
    scenes: Path, output: Path, tiny_weights: Path, predict_in: str = "actors", **tiling: object
):
    return parse_spec(spec_data(scenes, output, tiny_weights, predict_in, **tiling))


def spec_data(
    scenes: Path, output: Path, tiny_weights: Path, predict_in: str = "actors", **tiling: object
) -> dict[str, object]:
    return {
        "input": {
            "uris": [str(scenes)],
            "tiling": {"size": TILE, "bands": [3, 2, 1], "value_range": [0, 4000]} | tiling,
        },
        "model": {
            "architecture": "mobilenet_v3_small",
            "weights": str(tiny_weights),
            "num_classes": 4,
            "preprocessing": PREP,
        },
        "task": {"top_k": 2},
        "runtime": {"batch_size": 8, "max_actors": 1, "predict_in": predict_in},
        "output": {"uri": str(output)},
        "run": {"id": "tiles", "date": "2026-11-24"},
    }


def test_the_error_ratio_is_of_the_tiles_sent_to_the_model(
    ray_local, scenes, tmp_path, tiny_weights, capsys
) -> None:
    """--max-error-ratio bounds the error rows of the units the model was sent: the scene's 5
    tiles with no data are neither errors nor answers (1 error in 16, over 0.05; counted in,
    1 in 21 passed)."""
    from vision_ops.errors import EXIT_TOO_MANY_ERRORS

    spec_file = tmp_path / "scene.yaml"
    spec_file.write_text(json.dumps(spec_data(scenes, tmp_path / "table", tiny_weights)))
    assert main(["run", str(spec_file), "--max-error-ratio", "0.05"]) == EXIT_TOO_MANY_ERRORS
    assert (
        "error: error rows 1/16 (of new inputs, sent to the model) exceed --max-error-ratio"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("predict_in", ["actors", "driver"])
def test_a_scene_becomes_tiles_with_exact_footprints(
    ray_local, scenes, bands, tmp_path, tiny_weights, capsys, predict_in
) -> None:
    """Tiles, their footprints and their skipped and error rows, the model's top-k on each
    tile as a direct call gives it; the same with the model in the driver's threads."""
    from test_pipeline import predictor_actors

    spec = spec_for(scenes, tmp_path / "table", tiny_weights, predict_in)
    before = predictor_actors()
    summary = run_job(spec)
    assert len(predictor_actors() - before) == (predict_in == "actors")  # max_actors: 1
    windows = tile_windows(WIDTH, HEIGHT, TILE, 0, "shift")  # 5 columns x 4 rows
    assert len(windows) == 20
    table = pq.read_table(tmp_path / "table" / "run_date=2026-11-24")
    rows = table.to_pylist()
    assert summary.commit.rows == len(rows) == 21  # 20 tiles + the broken file
    assert committed_run(str(tmp_path / "table"), "tiles")["tile_bands"] == [3, 2, 1]  # report
    broken = [r for r in rows if r["source_uri"].endswith("broken.tif")]
    assert len(broken) == 1 and broken[0]["status"] == "error"
    assert broken[0]["error_type"] == "RasterError" and broken[0]["tile_x"] is None
    tiles = {(r["tile_x"], r["tile_y"]): r for r in rows if r["source_uri"].endswith("scene.tif")}
    assert sorted(tiles) == sorted((w.col_off, w.row_off) for w in windows)
    for (x, y), row in tiles.items():
        left, top = TRANSFORM * (x, y)
        right, bottom = TRANSFORM * (x + TILE, y + TILE)
        expected = shapely.box(left, bottom, right, top)
        assert (
            shapely.from_wkb(row["footprint"])
            .normalize()
            .equals_exact(expected.normalize(), tolerance=0)
        )
        bbox = {"xmin": left, "ymin": bottom, "xmax": right, "ymax": top}
        assert row["footprint_bbox"] == bbox
        assert (row["crs"], row["scene_width"], row["scene_height"]) == ("EPSG:32632", 300, 200)
        lon, lat = reproject("EPSG:32632", "EPSG:4326", [(left + right) / 2], [(top + bottom) / 2])
        assert row["center_lon"] == pytest.approx(lon[0]) and row["center_lat"] == pytest.approx(
            lat[0]
        )
    # Rows 0..63 are all nodata: the first row of tiles is skipped, never sent to the model.
    skipped = sorted(xy for xy, r in tiles.items() if r["status"] == "skipped")
    assert skipped == sorted((w.col_off, 0) for w in windows if w.row_off == 0)
    assert all(tiles[xy]["valid_fraction"] == 0 and tiles[xy]["top_k"] is None for xy in skipped)
    assert summary.commit.skipped == 5 and summary.commit.errors == 1
    partial = tiles[(0, 64)]  # rows 64..127: rows 64..69 nodata
    assert partial["status"] == "ok"
    assert partial["valid_fraction"] == pytest.approx(1 - 6 / 64)

    # The model on hand-read tiles: bands 3, 2, 1 scaled from 0..4000, nodata black.
    model = torchvision.models.mobilenet_v3_small(num_classes=4)
    model.load_state_dict(torch.load(tiny_weights, weights_only=True))
    model.eval()
    chosen = [(0, 64), (128, 128), (236, 136)]
    crops = []
    for x, y in chosen:
        values = bands[[2, 1, 0], y : y + TILE, x : x + TILE].astype(np.float64)
        scaled = np.clip(np.rint(values / 4000 * 255), 0, 255)
        scaled[:, (values == 0).all(axis=0)] = 0
        crops.append(torch.from_numpy(scaled / 255).float().sub(0.5).div(0.5))
    with torch.inference_mode():
        top = model(torch.stack(crops)).softmax(-1).topk(2)
    for (x, y), ids, scores in zip(chosen, top.indices, top.values, strict=True):
        row = tiles[(x, y)]
        assert [e["label_id"] for e in row["top_k"]] == ids.tolist()
        np.testing.assert_allclose([e["score"] for e in row["top_k"]], scores, atol=1e-5)

    # GeoParquet: DuckDB spatial reads the footprints as geometries.
    connection = duckdb.connect()
    load_spatial(connection)
    files = f"{tmp_path / 'table'}/run_date=*/*.parquet"
    described = connection.sql(f"DESCRIBE SELECT * FROM '{files}'").fetchall()
    kinds = {row[0]: row[1] for row in described}
    assert kinds["footprint"].startswith("GEOMETRY")
    # A field 600 m x 600 m in the middle of the scene.
    field = shapely.box(602_500.0, 5_196_500.0, 603_100.0, 5_197_100.0)
    expected = sum(
        shapely.from_wkb(r["footprint"]).intersects(field)
        for r in rows
        if r["footprint"] is not None
    )
    assert expected > 1
    where = f"ST_Intersects(footprint, ST_GeomFromText('{field.wkt}'))"
    count = connection.sql(f"SELECT count(*) FROM '{files}' WHERE {where}").fetchone()
    assert count == (expected,)
    # The same through the documented read path: `vision-ops query` over committed runs.
    capsys.readouterr()
    sql = f"SELECT count(*) AS n FROM predictions WHERE {where}"
    assert main(["query", str(tmp_path / "table"), sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", str(expected)]


def test_a_run_of_unreadable_scenes_alone_commits_their_error_rows(
    ray_local, tmp_path, tiny_weights
) -> None:
    """A model batch of error units only (every scene unreadable, or an incremental night
    retrying broken scenes): their tile columns are all null, which Ray Data hands on as NaN.
    The run commits each scene's error row, its footprint null (it failed: ValueError in the
    footprint's bounding box, and a footprint of b"" would have been written)."""
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 40)
    (folder / "notatiff.tif").write_bytes(b"hello world")
    summary = run_job(spec_for(folder, tmp_path / "table", tiny_weights, "driver"))
    assert (summary.commit.rows, summary.commit.errors) == (2, 2)
    rows = pq.read_table(tmp_path / "table").to_pylist()
    assert sorted((r["source_uri"].rpartition("/")[2], r["error_type"]) for r in rows) == [
        ("broken.tif", "RasterError"), ("notatiff.tif", "RasterError")
    ]  # fmt: skip
    assert {(r["footprint"], r["footprint_bbox"], r["crs"], r["scene_width"]) for r in rows} == {
        (None, None, None, None)
    }


def test_the_pool_is_sized_by_the_scenes_tiles_not_by_their_files(
    ray_local, scenes, tmp_path, tiny_weights, caplog
) -> None:
    """Two files are one model call of 4, but the scene cuts into 6 tiles: 7 units, 2 calls.
    With min_actors left open both half-CPU actors start at once, as for 7 photos (counted
    as files, one actor would start and take both calls, as in
    test_a_pool_left_open_starts_whole_on_a_fixed_cluster)."""
    from test_pipeline import predictor_actors

    spec = spec_for(scenes, tmp_path / "table", tiny_weights, size=128)
    runtime = {"batch_size": 4, "num_cpus_per_actor": 0.5, "reserved_cpus": 1}
    spec = spec.model_copy(update={"runtime": type(spec.runtime)(**runtime)})
    tiles = len(tile_windows(WIDTH, HEIGHT, 128, 0, "shift"))
    before = predictor_actors()
    with caplog.at_level(logging.INFO, logger="vision_ops.pipeline.run"):
        summary = run_job(spec)
    assert summary.commit.rows == tiles + 1 == 7
    assert len(predictor_actors() - before) == 2
    assert "run tiles: 7 units to process, predictor pool" in caplog.text


def test_planning_reads_headers_only_and_fixes_each_scenes_range(scenes, tmp_path) -> None:
    spec = parse_spec(
        {
            "input": {
                "uris": [str(scenes / "scene.tif")],
                "tiling": {"size": 100, "percentile": [2, 98]},
            },
            "model": {"architecture": "resnet18"},
            "output": {"uri": str(tmp_path / "t")},
        }
    )
    plan = plan_tiles(list_inputs(spec.input), spec.input.tiling, {})
    assert plan.units.num_rows == 6
    low, high = plan.units["value_low"][0].as_py(), plan.units["value_high"][0].as_py()
    assert 0 < low < 200 and 3_700 < high < 4_000  # the valid pixels' 2nd and 98th percentiles
    assert plan.crs.to_epsg() == 32632
    assert plan.bounds == (600_000.0, 5_196_000.0, 606_000.0, 5_200_000.0)


@pytest.mark.parametrize(("size", "edge"), [(128, "pad"), (256, "shift"), (128, "drop")])
def test_the_bounds_hold_every_tiles_footprint(scenes, tmp_path, size: int, edge: str) -> None:
    """GeoParquet's bbox covers every geometry: a padded tile's footprint runs past the scene
    (`pad`; `shift` where the scene is smaller than a tile), and the bounds take it in."""
    from vision_ops.georef import footprint

    tiling = {"size": size, "edge": edge, "value_range": [0, 4000]}
    spec = spec_for(scenes, tmp_path / "t", tmp_path / "weights.pt", **tiling)
    plan = plan_tiles(list_inputs(spec.input), spec.input.tiling, {})
    transform = tuple(TRANSFORM)[:6]
    rings = [footprint(transform, w) for w in tile_windows(WIDTH, HEIGHT, size, 0, edge)]
    xs = np.concatenate([ring[:, 0] for ring in rings] + [[600_000.0, 606_000.0]])
    ys = np.concatenate([ring[:, 1] for ring in rings] + [[5_196_000.0, 5_200_000.0]])
    assert plan.bounds == (xs.min(), ys.min(), xs.max(), ys.max())


SQUARES = {  # x_min, y_min, x_max, y_max in scene pixels
    "on the seam at 128": (118, 40, 138, 60),
    "near C, on the seam at 192": (180, 70, 195, 85),
    "near B, in two tiles' overlap": (198, 70, 213, 85),
}


def test_detections_on_tile_seams_are_merged_and_mapped_to_the_crs(ray_local, tmp_path) -> None:
    """Tiles of 128 with 32 overlap start at x = 0, 96, 192: square A is cut by tile 0's edge,
    B by tile 2's start, C lies whole in tiles 1 and 2. Each is reported once, in scene pixels
    and CRS coordinates; B and C, 3 pixels apart, stay two."""
    pixels = np.zeros((1, 128, 320), dtype=np.uint8)
    for x_min, y_min, x_max, y_max in SQUARES.values():
        pixels[0, y_min:y_max, x_min:x_max] = 255
    folder = tmp_path / "scenes"
    folder.mkdir()
    profile = {
        "driver": "GTiff", "width": 320, "height": 128, "count": 1, "dtype": "uint8",
        "crs": "EPSG:32632", "transform": TRANSFORM,
    }  # fmt: skip
    with rasterio.open(folder / "squares.tif", "w", **profile) as out:
        out.write(pixels)
    spec = parse_spec(
        {
            "input": {"uris": [str(folder)], "tiling": {"size": 128, "overlap": 32, "bands": [1]}},
            "task": {"kind": "detection", "score_threshold": 0.1},
            "model": {"kind": "entrypoint", "entrypoint": "toy_models:bright_squares"},
            "runtime": {"batch_size": 2, "max_actors": 1},
            "output": {"uri": str(tmp_path / "table")},
            "run": {"id": "seams", "date": "2026-11-24"},
        }
    )
    run_job(spec)
    rows = pq.read_table(tmp_path / "table" / "run_date=2026-11-24").to_pylist()
    assert sorted(r["tile_x"] for r in rows) == [0, 96, 192]
    boxes = [entry for row in rows for entry in row["detections"]]
    found = sorted((e["x_min"], e["y_min"], e["x_max"], e["y_max"]) for e in boxes)
    assert found == sorted(SQUARES.values())
    assert sum(r["num_detections"] for r in rows) == 3
    for entry in boxes:
        left, top = TRANSFORM * (entry["x_min"], entry["y_min"])
        right, bottom = TRANSFORM * (entry["x_max"], entry["y_max"])
        assert (entry["crs_x_min"], entry["crs_y_min"]) == (left, bottom)
        assert (entry["crs_x_max"], entry["crs_y_max"]) == (right, top)
        lon, lat = reproject("EPSG:32632", "EPSG:4326", [(left + right) / 2], [(top + bottom) / 2])
        assert entry["lon"] == pytest.approx(lon[0]) and entry["lat"] == pytest.approx(lat[0])


# Peak RSS from /proc (VmHWM) of a process that plans and reads every tile of a scene, as a
# read task does: the scene is never decoded whole.
SCENE_MEMORY_PROBE = """
import json, sys
from pathlib import Path
import numpy as np
from vision_ops.config import Preprocessing, TilingSpec
from vision_ops.reader import read_unit_blocks
from scene_plans import plan_tiles
from vision_ops.sources import list_inputs
from vision_ops.config import InputSpec
tiling = TilingSpec(size=512, value_range=(0, 255))
spec = InputSpec(uris=[sys.argv[1]], tiling=tiling)
units = plan_tiles(list_inputs(spec), tiling, {}).units
prep = Preprocessing(resize=64, crop=64, mean=(0.5,) * 3, std=(0.5,) * 3)
ok = 0
for start in range(0, units.num_rows, 32):
    batch = {k: np.array(v, dtype=object) for k, v in units.slice(start, 32).to_pydict().items()}
    [out] = read_unit_blocks(
        batch, preprocessing=prep, max_pixels=10**9, storage_options={}, tiling=tiling
    )
    ok += int((out["status"] == "ok").sum())
status = Path("/proc/self/status").read_text().splitlines()
peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_mb": peak_kb / 1024, "tiles": units.num_rows, "ok": ok}))
"""


@pytest.mark.timeout(600)
def test_a_16k_scene_is_read_tile_by_tile_in_bounded_memory(tmp_path) -> None:
    """16384 x 16384 x 3 bands is 768 MiB decoded; every tile is read with the process
    staying far below that. The file is tiled, deflated, and mostly sparse (GDAL writes no
    block that was never written), so making it is quick; data sits along the diagonal."""
    import subprocess
    import sys

    side = 16_384
    path = tmp_path / "big.tif"
    profile = {
        "driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32632", "transform": TRANSFORM, "tiled": True, "blockxsize": 512,
        "blockysize": 512, "compress": "deflate", "sparse_ok": True,
    }  # fmt: skip
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as out:
        for index in range(0, side, 2048):
            block = rng.integers(0, 256, (3, 512, 512), dtype=np.uint8)
            out.write(block, window=rasterio.windows.Window(index, index, 512, 512))
    decoded_mb = side * side * 3 / 2**20
    done = subprocess.run(
        [sys.executable, "-c", SCENE_MEMORY_PROBE, str(path)],
        capture_output=True, text=True, timeout=500, check=True,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tiles"] == result["ok"] == 32 * 32
    assert decoded_mb == 768
    assert result["peak_mb"] < 300, result  # measured ~210 MB; the scene alone is 768 MB


def test_the_read_and_planning_modules_import_no_torch() -> None:
    """Read tasks and the scene planning stay light: torch alone takes ~450 MB a process (the
    16k-scene probe above holds all of a read task in 300)."""
    import subprocess
    import sys

    code = "import sys, vision_ops.reader, vision_ops.scenes; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False"


def test_a_large_plain_image_tiles_the_same_way_in_pixel_coordinates(tmp_path) -> None:
    from PIL import Image

    from vision_ops.config import InputSpec, TilingSpec
    from vision_ops.reader import read_unit_blocks

    rng = np.random.default_rng(3)
    photo = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "plain.png")
    tiling = TilingSpec(size=128, edge="pad")
    spec = InputSpec(uris=[str(tmp_path / "plain.png")], tiling=tiling)
    plan = plan_tiles(list_inputs(spec), tiling, {})
    assert plan.crs is None and plan.units.num_rows == 3 * 2
    batch = {k: np.array(v, dtype=object) for k, v in plan.units.to_pydict().items()}
    [out] = read_unit_blocks(
        batch, preprocessing=None, max_pixels=10**8, storage_options={}, tiling=tiling
    )
    assert list(out["status"]) == ["ok"] * 6 and set(out["crs"]) == {None}
    last = next(i for i in range(6) if (out["tile_x"][i], out["tile_y"][i]) == (256, 128))
    # The padded corner tile: 44 x 72 of the photo, the rest no data (black).
    assert out["valid_fraction"][last] == pytest.approx(44 * 72 / 128**2)
    np.testing.assert_array_equal(out["image"][last][:72, :44], photo[128:200, 256:300])
    assert (out["image"][last][72:] == 0).all() and (out["image"][last][:, 44:] == 0).all()
    ring = shapely.from_wkb(out["footprint"][last])
    assert ring.bounds == (256.0, 128.0, 384.0, 256.0)  # pixel coordinates, y down


def test_without_bands_a_grey_scene_tiles_as_grey_beside_a_colour_one(tmp_path) -> None:
    """`tiling.bands` left out: a scene of three bands or more reads 1, 2, 3; a grey PNG, a
    grey PNG with alpha and a one-band GeoTIFF read band 1 as grey, in one folder (they were
    error rows: the default asked each for bands 2 and 3)."""
    from PIL import Image

    from vision_ops.config import InputSpec, TilingSpec
    from vision_ops.reader import read_unit_blocks

    rng = np.random.default_rng(4)
    colour = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (100, 100), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=-1), "LA").save(
        tmp_path / "grey_alpha.png"
    )
    profile = {"driver": "GTiff", "width": 100, "height": 100, "count": 1, "dtype": "uint8"}
    with rasterio.open(tmp_path / "band.tif", "w", **profile) as out:
        out.write(grey[None])
    tiling = TilingSpec(size=100)
    plan = plan_tiles(list_inputs(InputSpec(uris=[str(tmp_path)], tiling=tiling)), tiling, {})
    assert plan.units.num_rows == 4 and plan.units["plan_error"].null_count == 4
    batch = {k: np.array(v, dtype=object) for k, v in plan.units.to_pydict().items()}
    [out] = read_unit_blocks(
        batch, preprocessing=None, max_pixels=10**8, storage_options={}, tiling=tiling
    )
    images = {
        str(uri).rpartition("/")[2]: image
        for uri, image in zip(out["source_uri"], out["image"], strict=True)
    }
    assert list(out["status"]) == ["ok"] * 4
    np.testing.assert_array_equal(images["colour.png"], colour)
    for name in ("grey.png", "grey_alpha.png", "band.tif"):
        np.testing.assert_array_equal(images[name], np.repeat(grey[:, :, None], 3, axis=2))


def test_value_range_defaults_by_data_type(tmp_path) -> None:
    """Integers: the type's range; floats: the valid pixels' 2nd..98th percentiles."""
    from vision_ops.config import TilingSpec
    from vision_ops.raster import open_raster, scene_header
    from vision_ops.scenes import value_range

    values = np.linspace(-1.0, 1.0, 100 * 100, dtype=np.float32).reshape(1, 100, 100)
    profile = {"driver": "GTiff", "width": 100, "height": 100, "count": 1, "dtype": "float32"}
    with rasterio.open(tmp_path / "ndvi.tif", "w", **profile) as out:
        out.write(values)
    with rasterio.open(tmp_path / "u8.tif", "w", **profile | {"dtype": "uint8"}) as out:
        out.write((values * 0).astype(np.uint8))
    tiling = TilingSpec(bands=[1])
    with open_raster(str(tmp_path / "ndvi.tif")) as dataset:
        low, high = value_range(dataset, scene_header(dataset), tiling)
    expected = np.percentile(values.astype(np.float64), [2, 98])
    assert (low, high) == pytest.approx(tuple(expected))
    with open_raster(str(tmp_path / "u8.tif")) as dataset:
        assert value_range(dataset, scene_header(dataset), tiling) == (0.0, 255.0)


def test_tiling_settings_are_part_of_the_model_fingerprint(tmp_path) -> None:
    """An incremental run must not skip scenes committed with other bands or ranges."""
    from vision_ops.pipeline.incremental import model_fingerprint

    def fingerprint(**tiling: object) -> str:
        raw = {
            "input": {"uris": ["s3://scenes/"]} | ({"tiling": tiling} if tiling else {}),
            "model": {"architecture": "resnet18"},
            "output": {"uri": str(tmp_path)},
        }
        return model_fingerprint(parse_spec(raw))

    assert fingerprint(bands=[4, 3, 2]) != fingerprint(bands=[3, 2, 1]) != fingerprint()
    assert fingerprint(bands=[3, 2, 1]) == fingerprint(bands=[3, 2, 1])
    # bands left out: the same rows as [1, 2, 3], their default before grey scenes were read;
    # and the same spec digest, so the same default run id and resume key as before
    assert fingerprint(size=256) == fingerprint(size=256, bands=[1, 2, 3])

    def digest(**tiling: object) -> str:
        raw = {
            "input": {"uris": ["s3://scenes/"], "tiling": tiling},
            "model": {"architecture": "resnet18"},
            "output": {"uri": str(tmp_path)},
        }
        return parse_spec(raw).fingerprint()

    assert digest(size=256) == digest(size=256, bands=[1, 2, 3]) != digest(size=256, bands=[1])


def test_longitudes_past_the_antimeridian_are_wrapped() -> None:
    """A geographic scene past 180 (or in 0..360) holds 180.14: it is -179.86."""
    from vision_ops.scenes import to_lonlat

    [(lon, lat)] = to_lonlat("EPSG:4326", [180.14], [-17.5])
    assert (lon, lat) == (pytest.approx(-179.86), pytest.approx(-17.5))
    [(lon, _)] = to_lonlat("EPSG:4326", [-179.86], [-17.5])
    assert lon == pytest.approx(-179.86)


def test_a_scene_whose_name_is_not_utf8_is_an_undecodable_name_row(tmp_path) -> None:
    """A GeoTIFF named in Latin-1 beside one that tiles: listed %-encoded, planned as one unit
    that cannot be read, and its row the UndecodableName error a photo of such a name gets
    (it was a RasterError saying the raster was not there). The scene beside it reads: through
    fsspec's opener GDAL listed the folder in Python, and the name left an error pending
    (SystemError on that scene's read, seen under pytest)."""
    import os

    from vision_ops.reader import UnitReader, tile_units

    profile = {"driver": "GTiff", "width": 100, "height": 100, "count": 3, "dtype": "uint8"}
    for name in ("latin1.tif", "scene.tif"):  # GDAL takes no such name: renamed after
        with rasterio.open(tmp_path / name, "w", **profile) as out:
            out.write(np.zeros((3, 100, 100), dtype=np.uint8))
    os.rename(bytes(tmp_path / "latin1.tif"), bytes(tmp_path) + b"/sc\xe8ne.tif")
    spec = parse_spec(
        {
            "input": {"uris": [str(tmp_path)], "tiling": {"size": 100}},
            "model": {"architecture": "resnet18"},
            "output": {"uri": str(tmp_path / "t")},
        }
    )
    units = plan_tiles(list_inputs(spec.input), spec.input.tiling, {}).units
    batch = {name: np.asarray(units[name].to_pylist(), dtype=object) for name in units.column_names}
    reading = UnitReader(None, 10**9, None)
    rows = dict(tile_units(batch, spec.input.tiling, reading, {}))
    found = {str(batch["source_uri"][i]).rpartition("/")[2]: row for i, row in rows.items()}
    assert found["sc%E8ne.tif"]["error_type"] == "UndecodableName"
    assert found["scene.tif"]["status"] == "ok", found["scene.tif"]["error_message"]


def test_a_truncated_scene_whose_header_reads_gives_tile_rows_saying_why_and_where(
    tmp_path,
) -> None:
    """A GeoTIFF cut short after its header plans its tiles; each tile's read fails. Its row
    says GDAL's finding (it said rasterio's "Read failed. See previous exception for
    details.", the exception nowhere to be seen) and keeps where the tile lies: scene size,
    CRS, footprint (they were null, though the header gave them)."""
    from vision_ops.config import InputSpec, TilingSpec
    from vision_ops.reader import read_unit_blocks

    profile = {
        "driver": "GTiff", "width": 300, "height": 200, "count": 3, "dtype": "uint16",
        "crs": "EPSG:32632", "transform": TRANSFORM,
    }  # fmt: skip
    whole = tmp_path / "whole.tif"
    with rasterio.open(whole, "w", **profile) as out:
        out.write(np.random.default_rng(2).integers(1, 4000, (3, 200, 300)).astype(np.uint16))
    (tmp_path / "cut.tif").write_bytes(whole.read_bytes()[:3000])
    whole.unlink()
    tiling = TilingSpec(size=TILE)
    plan = plan_tiles(list_inputs(InputSpec(uris=[str(tmp_path)], tiling=tiling)), tiling, {})
    batch = {k: np.array(v, dtype=object) for k, v in plan.units.to_pydict().items()}
    [out] = read_unit_blocks(
        batch, preprocessing=None, max_pixels=10**8, storage_options={}, tiling=tiling
    )
    assert len(out["status"]) == len(tile_windows(300, 200, TILE, 0, "shift")) == 20
    assert set(out["status"]) == {"error"} and set(out["error_type"]) == {"RasterError"}
    for message in out["error_message"]:
        assert message.startswith("the scene's pixels cannot be read (a damaged or truncated ")
        assert "cut.tif, band" in message and "IReadBlock failed" in message
    assert set(out["scene_width"]) == {300} and set(out["crs"]) == {"EPSG:32632"}
    first = next(i for i in range(20) if (out["tile_x"][i], out["tile_y"][i]) == (0, 0))
    assert shapely.from_wkb(out["footprint"][first]).bounds == (
        600_000.0, 5_200_000.0 - TILE * 20, 600_000.0 + TILE * 20, 5_200_000.0
    )  # fmt: skip


def test_a_scene_the_tiling_cannot_read_is_one_error_row_not_a_failed_run(tmp_path) -> None:
    """A one-band float scene (a DEM) under three bands asked for, and a scene smaller than
    one tile under `edge: drop`: each stays one unit carrying why (its error row), beside a
    scene that tiles; before, the first failed the whole planning and the second vanished. So
    for complex values (a SAR SLC): a complex_int16 one failed its whole planning block."""
    profile = {"driver": "GTiff", "width": 120, "height": 120, "count": 1, "dtype": "float32"}
    with rasterio.open(tmp_path / "dem.tif", "w", **profile) as out:
        out.write(np.linspace(0, 1, 120 * 120, dtype=np.float32).reshape(1, 120, 120))
    small = profile | {"width": 50, "height": 40, "count": 3, "dtype": "uint8"}
    with rasterio.open(tmp_path / "small.tif", "w", **small) as out:
        out.write(np.zeros((3, 40, 50), dtype=np.uint8))
    whole = small | {"width": 200, "height": 100}
    with rasterio.open(tmp_path / "whole.tif", "w", **whole) as out:
        out.write(np.zeros((3, 100, 200), dtype=np.uint8))
    for kind in ("complex64", "complex_int16"):  # a SAR SLC's: numpy knows no complex_int16
        slc = whole | {"dtype": kind}
        with rasterio.open(tmp_path / f"{kind}.tif", "w", **slc) as out:
            out.write(np.zeros((3, 100, 200), dtype=np.complex64))
    tiling = {"size": 100, "edge": "drop", "bands": [1, 2, 3]}  # asked for: the DEM has one
    spec = parse_spec(
        {
            "input": {"uris": [str(tmp_path)], "tiling": tiling},
            "model": {"architecture": "resnet18"},
            "output": {"uri": str(tmp_path / "t")},
        }
    )
    units = plan_tiles(list_inputs(spec.input), spec.input.tiling, {}).units.to_pylist()
    errors = {u["source_uri"].rpartition("/")[2]: u["plan_error"] for u in units if u["plan_error"]}
    assert errors == {  # (the error row's type is RasterError: its message does not repeat it)
        "dem.tif": "bands: the raster has bands 1..1, found [2, 3]",
        "small.tif": "50x40 is smaller than one 100-pixel tile, so edge: drop "
        "covers none of it (edge: shift or pad reads it)",
        **{
            f"{kind}.tif": f"{kind} values: expected real bands (a SAR SLC's "
            "complex values: convert them to amplitude first)"
            for kind in ("complex64", "complex_int16")
        },
    }
    tiles = [(u["tile_x"], u["tile_y"]) for u in units if u["source_uri"].endswith("whole.tif")]
    assert tiles == [(0, 0), (100, 0)]
