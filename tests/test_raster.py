"""Raster reads: a tile equals the same window of the array the test wrote, scaled by hand;
bands in the asked order; nodata and the scene's edge are black and counted; s3:// works with
a custom endpoint (SeaweedFS) through fsspec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from vision_ops.raster import RasterError, open_raster, read_tile, scene_bands, scene_header
from vision_ops.tiling import Window

NODATA = 0
TRANSFORM = from_origin(500_000.0, 4_650_000.0, 10.0, 10.0)  # UTM 33N, 10 m pixels


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """Four 16-bit bands, 300 x 200 pixels, values 1..10000, a nodata corner."""
    rng = np.random.default_rng(0)
    bands = rng.integers(1, 10_001, (4, 200, 300)).astype(np.uint16)
    bands[:, :50, :60] = NODATA
    return bands


@pytest.fixture(scope="module")
def geotiff(tmp_path_factory: pytest.TempPathFactory, scene: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("scenes") / "scene.tif"
    profile = {
        "driver": "GTiff",
        "width": 300,
        "height": 200,
        "count": 4,
        "dtype": "uint16",
        "crs": "EPSG:32633",
        "transform": TRANSFORM,
        "nodata": NODATA,
        "tiled": True,
        "blockxsize": 64,
        "blockysize": 64,
    }
    with rasterio.open(path, "w", **profile) as out:
        out.write(scene)
    return path


def by_hand(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip(np.rint((values.astype(np.float64) - low) / (high - low) * 255), 0, 255)


def test_header(geotiff: Path) -> None:
    with open_raster(str(geotiff)) as dataset:
        header = scene_header(dataset)
    assert (header.width, header.height, header.band_count, header.dtype) == (300, 200, 4, "uint16")
    assert header.transform == (10.0, 0.0, 500_000.0, 0.0, -10.0, 4_650_000.0)
    assert header.nodata == 0 and "32633" in (header.crs_wkt or "")


def test_a_tile_is_its_window_in_band_order_scaled(geotiff: Path, scene: np.ndarray) -> None:
    window = Window(row_off=100, col_off=150, height=64, width=64)
    with open_raster(str(geotiff)) as dataset:
        tile, valid = read_tile(dataset, window, bands=(3, 2, 1), value_range=(0, 10_000))
    expected = by_hand(scene[[2, 1, 0], 100:164, 150:214], 0, 10_000)
    np.testing.assert_array_equal(tile, np.moveaxis(expected, 0, -1))
    assert tile.dtype == np.uint8 and valid == 1.0


def test_nodata_and_the_edge_are_black_and_counted(geotiff: Path, scene: np.ndarray) -> None:
    corner = Window(row_off=0, col_off=0, height=64, width=64)  # 50 x 60 of nodata
    edge = Window(row_off=160, col_off=270, height=64, width=64)  # 40 x 30 inside the scene
    with open_raster(str(geotiff)) as dataset:
        tile, valid = read_tile(dataset, corner, bands=(1,), value_range=(1, 10_000))
        assert valid == pytest.approx(1 - 50 * 60 / 64**2)
        assert (tile[:50, :60] == 0).all() and (tile[..., 0] == tile[..., 2]).all()
        np.testing.assert_array_equal(tile[50:, :, 0], by_hand(scene[0, 50:64, :64], 1, 10_000))
        tile, valid = read_tile(dataset, edge, bands=(4, 3, 2), value_range=(1, 10_000))
    assert valid == pytest.approx(40 * 30 / 64**2)
    assert (tile[40:] == 0).all() and (tile[:, 30:] == 0).all()
    expected = by_hand(scene[[3, 2, 1], 160:200, 270:300], 1, 10_000)
    np.testing.assert_array_equal(tile[:40, :30], np.moveaxis(expected, 0, -1))


def test_bad_bands_and_unreadable_files(geotiff: Path, tmp_path: Path) -> None:
    with open_raster(str(geotiff)) as dataset:
        with pytest.raises(RasterError, match=r"bands 1..4, found \[5\]"):
            read_tile(dataset, Window(0, 0, 8, 8), bands=(5, 1, 2), value_range=(0, 1))
        with pytest.raises(RasterError, match="1 or 3 band numbers"):
            read_tile(dataset, Window(0, 0, 8, 8), bands=(1, 2), value_range=(0, 1))
    broken = tmp_path / "broken.tif"
    broken.write_bytes(geotiff.read_bytes()[:500])
    said = r"pixels cannot be read \(a damaged or truncated file\?\): broken.tif, band 1: "
    with pytest.raises(RasterError, match=said), open_raster(str(broken)) as dataset:
        read_tile(dataset, Window(0, 0, 64, 64), bands=(1,), value_range=(0, 1))


@pytest.mark.s3
def test_s3_with_a_custom_endpoint_reads_the_same_tile(
    geotiff: Path, scene: np.ndarray, s3fs_client, s3_options
) -> None:
    """Opened again and again in one process, as a read worker opens a scene per block (a
    boundless read through the fsspec opener broke the third opening)."""
    s3fs_client.put_file(str(geotiff), "images/scenes/scene.tif")
    window = Window(row_off=64, col_off=128, height=64, width=64)
    edge = Window(row_off=160, col_off=270, height=64, width=64)
    for _ in range(4):
        with open_raster("s3://images/scenes/scene.tif", s3_options) as dataset:
            assert scene_header(dataset).width == 300
            tile, _ = read_tile(dataset, window, bands=(1, 2, 3), value_range=(0, 10_000))
            _, valid = read_tile(dataset, edge, bands=(1,), value_range=(1, 10_000))
        expected = by_hand(scene[[0, 1, 2], 64:128, 128:192], 0, 10_000)
        np.testing.assert_array_equal(tile, np.moveaxis(expected, 0, -1))
        assert valid == pytest.approx(40 * 30 / 64**2)


def test_a_float_scene_with_nan_nodata_is_stretched_over_its_data(tmp_path: Path) -> None:
    """NaN never equals itself, so a NaN nodata (common in float scenes) is matched as NaN: the
    stretch comes from the data alone, a tile of NaN holds no data (and is skipped), and a tile
    of data is scaled as by hand, a stray NaN in one band black. The same with no nodata set."""
    from vision_ops.config import TilingSpec
    from vision_ops.scenes import value_range

    rng = np.random.default_rng(1)
    values = rng.uniform(100.0, 200.0, (3, 64, 64)).astype(np.float32)
    values[:, :32] = np.nan  # the top half: no data
    values[1, 40, 5] = np.nan  # one band's value missing in a pixel with data
    for nodata in (float("nan"), None):
        path = tmp_path / f"float-{nodata}.tif"
        profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "float32",
                   "crs": "EPSG:32633", "transform": TRANSFORM, "nodata": nodata}  # fmt: skip
        with rasterio.open(path, "w", **profile) as out:
            out.write(values)
        with open_raster(str(path)) as dataset:
            low, high = value_range(dataset, scene_header(dataset), TilingSpec(size=32))
            data = values[~np.isnan(values)].astype(np.float64)
            assert (low, high) == pytest.approx(tuple(np.percentile(data, [2, 98])))
            _, empty = read_tile(dataset, Window(0, 0, 32, 32), (1, 2, 3), (low, high))
            tile, full = read_tile(dataset, Window(32, 0, 32, 32), (1, 2, 3), (low, high))
        assert (empty, full) == (0.0, 1.0)
        expected = by_hand(np.nan_to_num(values[:, 32:, :32], nan=low), low, high)
        np.testing.assert_array_equal(tile, np.moveaxis(expected, 0, -1))
        assert tile[8, 5, 1] == 0 and tile.max() == 255


def test_a_palette_image_is_read_as_the_colours_it_shows(tmp_path: Path) -> None:
    """A P-mode PNG is one band of colour indices; tiled with the default bands it is the RGB
    it shows (as the photo path decodes it), not an error nor grey indices."""
    from PIL import Image

    from vision_ops.config import TilingSpec
    from vision_ops.scenes import value_range

    indices = np.zeros((64, 80), dtype=np.uint8)
    indices[:, 40:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # 0: blue, 1: red
    image.save(tmp_path / "palette.png")
    expected = np.asarray(Image.open(tmp_path / "palette.png").convert("RGB"))
    tiling = TilingSpec(size=32)  # the default bands: 1, 2, 3 of the three it reads as
    with open_raster(str(tmp_path / "palette.png")) as dataset:
        header = scene_header(dataset)
        assert (header.band_count, header.dtype, header.nodata) == (3, "uint8", None)
        assert value_range(dataset, header, tiling) == (0.0, 255.0)
        bands = scene_bands(tiling.bands, dataset.count)
        assert bands == [1, 2, 3]
        tile, valid = read_tile(dataset, Window(16, 24, 32, 32), bands, (0.0, 255.0))
        grey, _ = read_tile(dataset, Window(0, 0, 32, 32), (1,), (0.0, 255.0))
    np.testing.assert_array_equal(tile, expected[16:48, 24:56])
    assert valid == 1.0 and tuple(tile[0, 0]) == (0, 0, 255) and tuple(tile[0, -1]) == (255, 0, 0)
    assert (grey == 0).all()  # band 1 alone: the red channel of blue


@pytest.mark.parametrize("masking", ["alpha", "internal mask"])
def test_a_files_own_mask_is_no_data(tmp_path: Path, masking: str) -> None:
    """An RGBA orthophoto, or RGB with GDAL's internal mask, and no nodata value: the masked
    half is no data (it was read as black data, the tile counted whole, never skipped)."""
    rgb = np.full((3, 32, 64), 200, dtype=np.uint8)
    seen = np.zeros((32, 64), dtype=np.uint8)
    seen[:, :32] = 255  # the left half holds data
    profile = {"driver": "GTiff", "width": 64, "height": 32, "dtype": "uint8"}
    path = tmp_path / "ortho.tif"
    if masking == "alpha":
        with rasterio.open(path, "w", count=4, photometric="RGB", alpha="YES", **profile) as out:
            out.write(np.concatenate([rgb, seen[None]]))
    else:
        internal = rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True)
        with internal, rasterio.open(path, "w", count=3, **profile) as out:
            out.write(rgb)
            out.write_mask(seen)
    with open_raster(str(path)) as dataset:
        assert dataset.nodata is None
        _, left = read_tile(dataset, Window(0, 0, 32, 32), [1, 2, 3], (0, 255))
        pixels, right = read_tile(dataset, Window(32, 0, 32, 32), [1, 2, 3], (0, 255))
    assert (left, right) == (1.0, 0.0) and pixels.max() == 0


def test_a_spec_nodata_matches_a_float32_scenes_pixels(tmp_path: Path) -> None:
    """-9999.9 stored as float32 is not float64's -9999.9: a spec's nodata matched no pixel of
    a float32 scene, and an all-nodata tile counted whole."""
    values = np.full((1, 16, 16), -9999.9, dtype=np.float32)
    profile = {"driver": "GTiff", "width": 16, "height": 16, "count": 1, "dtype": "float32"}
    with rasterio.open(tmp_path / "dem.tif", "w", **profile) as out:
        out.write(values)
    with open_raster(str(tmp_path / "dem.tif")) as dataset:
        _, fraction = read_tile(dataset, Window(0, 0, 16, 16), [1], (0, 1), nodata=-9999.9)
    assert fraction == 0.0
