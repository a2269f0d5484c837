"""A scene run has one CRS: scenes in two CRSs, or a GeoTIFF beside a plain image (whose pixel
footprints would be labelled with the GeoTIFF's CRS), are refused before any work (exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from PIL import Image
from rasterio.transform import from_origin

from vision_ops.cli import EXIT_BAD_SPEC, main

pytestmark = pytest.mark.timeout(300)


def geotiff(path: Path, crs: str, origin: tuple[float, float], pixel: float) -> None:
    values = np.random.default_rng(3).integers(1, 255, (3, 96, 128), dtype=np.uint8)
    profile = {
        "driver": "GTiff", "width": 128, "height": 96, "count": 3, "dtype": "uint8",
        "crs": crs, "transform": from_origin(*origin, pixel, pixel),
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as out:
        out.write(values)


def written(table: Path) -> list[Path]:
    return [path for path in table.rglob("*") if path.is_file()]


def run_scenes(folder: Path, tiny_weights: Path, output: Path) -> int:
    spec = {
        "input": {"uris": [str(folder)], "tiling": {"size": 64, "value_range": [0, 255]}},
        "model": {
            "architecture": "mobilenet_v3_small",
            "weights": str(tiny_weights),
            "num_classes": 4,
            "preprocessing": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "output": {"uri": str(output)},
        "run": {"id": "crs", "date": "2026-11-24"},
    }
    path = folder.parent / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return main(["run", str(path)])


def test_a_geotiff_beside_a_plain_image_is_refused(ray_local, tmp_path, tiny_weights, capsys):
    folder = tmp_path / "scenes"
    folder.mkdir()
    geotiff(folder / "field.tif", "EPSG:32632", (600_000.0, 5_200_000.0), 20.0)
    pixels = np.random.default_rng(4).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "photo.png")
    assert run_scenes(folder, tiny_weights, tmp_path / "table") == EXIT_BAD_SPEC
    message = capsys.readouterr().err
    assert "expected every scene of a run in one CRS, found 2" in message
    assert f"EPSG:32632: file://{folder / 'field.tif'}" in message
    assert f"no CRS (pixel coordinates): file://{folder / 'photo.png'}" in message
    assert "Traceback" not in message
    assert written(tmp_path / "table") == []  # no rows, no staging, no manifest


def test_scenes_in_two_crss_are_refused(ray_local, tmp_path, tiny_weights, capsys) -> None:
    folder = tmp_path / "scenes"
    folder.mkdir()
    geotiff(folder / "utm.tif", "EPSG:32632", (600_000.0, 5_200_000.0), 20.0)
    geotiff(folder / "wgs84.tif", "EPSG:4326", (9.0, 47.0), 0.0002)
    assert run_scenes(folder, tiny_weights, tmp_path / "table") == EXIT_BAD_SPEC
    message = capsys.readouterr().err
    assert "expected every scene of a run in one CRS, found 2" in message
    assert f"EPSG:32632: file://{folder / 'utm.tif'}" in message
    assert f"EPSG:4326: file://{folder / 'wgs84.tif'}" in message
    assert written(tmp_path / "table") == []
