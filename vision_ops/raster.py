"""Rasters (GeoTIFF, COG, large plain TIFF/PNG): scene headers and windowed tile reads to uint8.

A tile reads only its window: rasterio is handed an fsspec opener (a local file: its path),
so GDAL asks the store for the byte ranges of the blocks it needs (a Cloud-Optimised
GeoTIFF's tiles), never the scene.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vision_ops.config import DEFAULT_BANDS
from vision_ops.storage import StorageOptions, filesystem, is_local
from vision_ops.tiling import Window

INSTALL_HINT = "raster input needs rasterio: pip install 'vision-ops[geo]'"


class RasterError(ValueError):
    """A raster that cannot be read as asked (bad bands, unreadable file)."""


@dataclass(frozen=True)
class Scene:
    """What tiling and georeferencing need from a scene's header."""

    width: int
    height: int
    band_count: int
    dtype: str
    crs_wkt: str | None  # None: a plain image, pixel coordinates only
    transform: tuple[float, float, float, float, float, float]  # affine a, b, c, d, e, f
    nodata: float | None


@contextlib.contextmanager
def open_raster(uri: str, options: StorageOptions | None = None) -> Iterator[Any]:
    """A rasterio dataset reading through fsspec (local, s3:// with a custom endpoint...)."""
    rasterio = _rasterio()
    fs, path = filesystem(uri, options)
    # A local file by its path: through fsspec's opener GDAL lists the folder for sidecar
    # files in Python, where a name that is not UTF-8 left an error pending (SystemError on a
    # later scene's read).
    opener = None if is_local(fs) else fs
    try:
        with rasterio.open(path, opener=opener) as dataset:
            yield PaletteExpanded(dataset) if _is_palette(dataset) else dataset
    except rasterio.errors.RasterioIOError as err:
        raise RasterError(f"cannot read {uri} as a raster: {err}") from None


class PaletteExpanded:
    """A palette image (one band of colour indices and its colour map, e.g. a P-mode PNG) read
    as the RGB bands 1, 2, 3 it shows; otherwise the dataset itself. A nodata index names no
    colour once expanded, so the view has no nodata."""

    count = 3
    nodata = None
    dtypes = ("uint8",) * 3

    def __init__(self, dataset: Any) -> None:
        self._dataset = dataset
        colours = dataset.colormap(1)  # index -> (r, g, b, a)
        self._lut = np.zeros((max(256, max(colours) + 1), 3), dtype=np.uint8)
        for index, rgba in colours.items():
            self._lut[index] = rgba[:3]

    def read(self, indexes: list[int], window: Any = None, out_shape: Any = None) -> np.ndarray:
        shape = None if out_shape is None else (1, *out_shape[-2:])
        [index] = self._dataset.read(indexes=[1], window=window, out_shape=shape)
        rgb = self._lut[index]
        return np.stack([rgb[..., band - 1] for band in indexes])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)


def _is_palette(dataset: Any) -> bool:
    from rasterio.enums import ColorInterp

    return dataset.count == 1 and dataset.colorinterp[0] == ColorInterp.palette


def scene_header(dataset: Any) -> Scene:
    crs = dataset.crs
    return Scene(
        width=int(dataset.width),
        height=int(dataset.height),
        band_count=int(dataset.count),
        dtype=str(dataset.dtypes[0]),
        crs_wkt=crs.to_wkt() if crs else None,
        transform=tuple(dataset.transform)[:6],
        nodata=None if dataset.nodata is None else float(dataset.nodata),
    )


def read_tile(
    dataset: Any,
    window: Window,
    bands: Sequence[int],
    value_range: tuple[float, float],
    nodata: float | None = None,
) -> tuple[np.ndarray, float]:
    """One tile as RGB uint8 (height, width, 3) and the fraction of its pixels holding data.

    `bands` are 1-based band numbers in output order (e.g. 4, 3, 2 for RGB from Sentinel-2);
    one band is replicated to grey. Values map linearly from `value_range` (low, high) onto
    0..255, clipped. Pixels past the scene's edge, or with no data (`no_data`: `nodata`, the
    file's when None, or not finite) in every band, count as no data and are black.
    """
    check_bands(bands, dataset.count)
    fill = as_stored(dataset.nodata if nodata is None else nodata, dataset.dtypes[bands[0] - 1])
    values = read_window(dataset, window, bands, fill if fill is not None else 0.0)
    valid = _valid_mask(values, fill, window, dataset.width, dataset.height)
    masked = masked_out(dataset, bands[0], window)
    if masked is not None:
        valid &= ~masked
    low, high = value_range
    values = np.where(np.isfinite(values), values, low)  # a band's NaN in a valid pixel: black
    scaled = np.clip(np.rint((values - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)
    scaled[:, ~valid] = 0
    rgb = np.repeat(scaled, 3, axis=0) if len(bands) == 1 else scaled
    return np.ascontiguousarray(np.moveaxis(rgb, 0, -1)), float(valid.mean())


def read_window(
    dataset: Any, window: Window, bands: Sequence[int], fill: float = 0.0
) -> np.ndarray:
    """A window's values of `bands` (bands, height, width) as float64, `fill` past the scene's
    edge. A plain read of the part inside the scene: rasterio's boundless read wraps the
    dataset in a VRT that opens the file again, and through an fsspec opener on s3:// that
    breaks a process's third opening of the same object (rasterio 1.4, GDAL 3.10)."""
    values = np.full((len(bands), window.height, window.width), fill, dtype=np.float64)
    part = _inside(dataset, window)
    if part is not None:
        inside, rows, columns = part
        try:
            values[:, rows, columns] = dataset.read(indexes=list(bands), window=inside)
        except _rasterio().errors.RasterioIOError as err:
            raise unreadable_window(err) from err
    return values


def unreadable_window(err: BaseException) -> RasterError:
    """A window read that failed, in GDAL's words: rasterio says only "Read failed. See
    previous exception for details.", the previous one (its cause) says what (a truncated
    file: "IReadBlock failed at X offset 0, Y offset 0: TIFFReadEncodedStrip() failed")."""
    found = err.__cause__ or err
    return RasterError(f"the scene's pixels cannot be read (a damaged or truncated file?): {found}")


def _inside(dataset: Any, window: Window) -> tuple[Any, slice, slice] | None:
    """The part of `window` inside the scene, as a window of the scene and as the rows and
    columns of `window` it fills; None where none of it is."""
    left, top = max(window.col_off, 0), max(window.row_off, 0)
    right = min(window.col_off + window.width, dataset.width)
    bottom = min(window.row_off + window.height, dataset.height)
    if right <= left or bottom <= top:
        return None
    inside = _rasterio().windows.Window(left, top, right - left, bottom - top)
    rows = slice(top - window.row_off, bottom - window.row_off)
    columns = slice(left - window.col_off, right - window.col_off)
    return inside, rows, columns


def masked_out(
    dataset: Any, band: int, window: Window | None = None, out_shape: Any = None
) -> np.ndarray | None:
    """Where the file's own mask says a pixel holds no data: an alpha band, or GDAL's internal
    mask (an orthophoto's, a JPEG COG's), which a scene without a nodata value uses instead.
    Of `window` (past the edge: False), or of the whole scene read at `out_shape`; None where
    the file has no such mask (its nodata value, if any, says it all)."""
    flags = {flag.name for flag in dataset.mask_flag_enums[band - 1]}
    if not flags & {"per_dataset", "alpha"}:
        return None
    if window is None:
        return np.asarray(dataset.read_masks(band, out_shape=out_shape)) == 0
    masked = np.zeros((window.height, window.width), dtype=bool)
    part = _inside(dataset, window)
    if part is not None:
        inside, rows, columns = part
        masked[rows, columns] = dataset.read_masks(band, window=inside) == 0
    return masked


def as_stored(nodata: float | None, dtype: str) -> float | None:
    """`nodata` as a scene of `dtype` stores it: -9999.9 in float32 is not float64's -9999.9,
    so a spec's value would match none of a float32 scene's pixels, read as float64."""
    if nodata is None or not np.issubdtype(np.dtype(dtype), np.floating):
        return nodata
    return float(np.asarray(nodata, dtype=dtype))


def _valid_mask(
    values: np.ndarray, nodata: float | None, window: Window, width: int, height: int
) -> np.ndarray:
    rows = np.arange(window.row_off, window.row_off + window.height)[:, None]
    cols = np.arange(window.col_off, window.col_off + window.width)[None, :]
    inside = (rows < height) & (cols < width) & (rows >= 0) & (cols >= 0)
    return inside & ~np.all(no_data(values, nodata), axis=0)


def valid_values(
    dataset: Any,
    values: np.ndarray,
    bands: Sequence[int],
    nodata: float | None,
    window: Window | None = None,
    out_shape: Any = None,
) -> np.ndarray:
    """The values (bands, height, width) of `bands` read from `dataset` (of `window`, or the
    whole scene at `out_shape`) that hold data: not `no_data`, not masked out by the file's
    own mask (`masked_out`); what a stretch's percentiles are taken over."""
    missing = no_data(values, nodata)
    masked = masked_out(dataset, bands[0], window, out_shape)
    if masked is not None:
        missing |= masked[None]
    return values[~missing]


def no_data(values: np.ndarray, nodata: float | None) -> np.ndarray:
    """Where `values` hold no data: equal to `nodata` (a NaN nodata matches NaN, which never
    equals itself), or not finite (a float scene's NaN or infinity, whatever its nodata)."""
    missing = ~np.isfinite(values)
    if nodata is not None and not np.isnan(nodata):
        missing |= values == nodata
    return missing


def scene_bands(bands: Sequence[int] | None, count: int) -> list[int]:
    """The bands read from a raster of `count` bands: `bands` as given, else (`tiling.bands`
    not set) 1, 2, 3 where it has three or more, and band 1 as grey where it has fewer."""
    if bands is not None:
        return list(bands)
    return list(DEFAULT_BANDS) if count >= len(DEFAULT_BANDS) else [1]


def check_bands(bands: Sequence[int], count: int) -> None:
    if len(bands) not in (1, 3):
        raise RasterError(f"bands: expected 1 or 3 band numbers, found {list(bands)}")
    outside = [band for band in bands if not 1 <= band <= count]
    if outside:
        raise RasterError(f"bands: the raster has bands 1..{count}, found {outside}")


def _rasterio() -> Any:
    try:
        import rasterio
        import rasterio.errors
        import rasterio.windows
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return rasterio
