"""Segmentation masks written beside the table: staged with the run, moved into place at its
commit. PNG of class ids; a GeoTIFF with the tile's transform and CRS for georeferenced tiles."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
from fsspec import AbstractFileSystem

from vision_ops.schema import SEGMENT_MASK, STATUS_OK
from vision_ops.storage import StorageOptions, canonical_uri, filesystem, make_folder

# {root}/_masks/run_date=YYYY-MM-DD/{run_id}/{attempt}/{item_id}.png: underscore-prefixed, so
# readers of the table (pyarrow, Spark, Athena, DuckDB globs of part files) never take a mask for
# a part; one folder per commit attempt, so a rerun's masks never overwrite the committed run's.
MASKS = "_masks"
TILE_TRANSFORM = "tile_transform"  # a tile's pixel -> CRS affine as JSON (tiling jobs)


def staging_folder(root: str, run_id: str, attempt: str) -> str:
    """Where one attempt of a run stages its part files and masks until the commit."""
    return f"{run_staging_folder(root, run_id)}/{attempt}"


def run_staging_folder(root: str, run_id: str) -> str:
    """The folder of every attempt of a run."""
    return f"{root}/_staging/{run_id}"


def staged_masks_folder(root: str, run_id: str, attempt: str) -> str:
    return f"{staging_folder(root, run_id, attempt)}/{MASKS}"


def final_masks_folder(root: str, run_id: str, run_date: dt.date, attempt: str | None) -> str:
    """An attempt's committed masks (`attempt` None: the folder of runs committed before masks
    had one folder per attempt, which held the masks themselves)."""
    folder = f"{root}/{MASKS}/run_date={run_date.isoformat()}/{run_id}"
    return f"{folder}/{attempt}" if attempt else folder


def write_masks(
    batch: dict[str, np.ndarray],
    *,
    root_uri: str,
    run_id: str,
    run_date: dt.date,
    attempt: str,
    storage_options: StorageOptions,
) -> dict[str, np.ndarray]:
    """Stage each ok row's mask; the row gets the URI the mask will have once committed."""
    fs, root = filesystem(root_uri, storage_options)
    root = root.rstrip("/")
    staged = staged_masks_folder(root, run_id, attempt)
    final = final_masks_folder(root, run_id, run_date, attempt)
    make_folder(fs, staged)
    uris = np.full(len(batch["source_uri"]), None, dtype=object)
    files: dict[str, bytes] = {}
    for index in np.flatnonzero(np.asarray(batch["status"] == STATUS_OK, dtype=bool)):
        mask = np.asarray(batch[SEGMENT_MASK][index])
        data, suffix = encode_mask(mask, _georef(batch, int(index)))
        name = f"{batch['item_id'][index]}{suffix}"
        files[f"{staged}/{name}"] = data
        uris[index] = canonical_uri(fs, f"{final}/{name}")
    if files:
        fs.pipe(files)
    out = {name: values for name, values in batch.items() if name != SEGMENT_MASK}
    out["mask_uri"] = uris
    return out


def encode_mask(mask: np.ndarray, georef: tuple[Any, str] | None) -> tuple[bytes, str]:
    """PNG (8 or 16-bit grey of class ids), or a GeoTIFF where the unit has a transform and CRS."""
    if georef is None:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, format="PNG")
        return buffer.getvalue(), ".png"
    from rasterio.io import MemoryFile

    transform, crs = georef
    profile = {
        "driver": "GTiff", "width": mask.shape[1], "height": mask.shape[0], "count": 1,
        "dtype": str(mask.dtype), "crs": crs, "transform": transform, "compress": "deflate",
    }  # fmt: skip
    with MemoryFile() as memory:
        with memory.open(**profile) as out:
            out.write(mask[None])
        return bytes(memory.read()), ".tif"


def _georef(batch: dict[str, np.ndarray], index: int) -> tuple[Any, str] | None:
    """The mask's own affine: the tile's, scaled from the tile's size to the mask's."""
    if TILE_TRANSFORM not in batch or batch[TILE_TRANSFORM][index] is None:
        return None
    crs = batch["crs"][index]
    if not crs:
        return None
    from rasterio.transform import Affine

    a, b, c, d, e, f = json.loads(batch[TILE_TRANSFORM][index])
    size = float(batch["tile_size"][index])
    mask_side = np.asarray(batch[SEGMENT_MASK][index]).shape[1]
    scale = size / mask_side
    return Affine(a, b, c, d, e, f) @ Affine.scale(scale, scale), str(crs)


def in_mask_frame(
    pixels: np.ndarray, shape: tuple[int, ...], resize: int | None = None, nearest: bool = True
) -> np.ndarray:
    """An array over a source image (a ground-truth mask, the image itself) brought into the
    frame of a class mask of `shape` (the model's input): its shorter side resized to `resize`
    (default: the mask's side, as torchvision's segmentation weights resize) and centre-cropped
    to the mask, as the pipeline's reader does. Class ids resize `nearest`."""
    from PIL import Image

    from vision_ops.transforms import center_crop, resize_shorter_side

    if pixels.shape[:2] == tuple(shape[:2]):
        return pixels
    side = min(shape[:2])
    mode = "nearest" if nearest else "bilinear"
    resized = np.asarray(resize_shorter_side(Image.fromarray(pixels), resize or side, mode))
    flat = resized.ndim == 2
    cropped = center_crop(resized[..., None] if flat else resized, side)
    return cropped[..., 0] if flat else cropped


def earlier_masks(fs: AbstractFileSystem, run_staging: str, current: str) -> dict[str, str]:
    """The masks earlier attempts of a run staged (all attempts under `run_staging` but the
    `current` one's folder), by file name: what a resumed row's mask is found by."""
    found: dict[str, str] = {}
    if not fs.exists(run_staging):
        return found
    for path in sorted(fs.find(run_staging)):
        folder, _, name = path.rpartition("/")
        if folder.endswith(f"/{MASKS}") and not path.startswith(f"{current}/"):
            found.setdefault(name, path)
    return found


def mask_name(uri: str) -> str:
    """A mask's name: its URI's last part (the same in every folder it is moved to)."""
    return uri.rpartition("/")[2]


# What precedes a mask's name (`mask_name`) in its URI, as a regular expression (Arrow's and
# DuckDB's): replaced by a folder, it names the mask there (a copied table's masks).
MASK_FOLDER_PATTERN = "^.*/"


def mask_folder_replacement(folder: str) -> str:
    """What replaces `MASK_FOLDER_PATTERN` to name a mask in `folder`: the folder as a literal
    in a regular expression's replacement (its backslashes escaped), ending with a slash."""
    return folder.replace("\\", "\\\\") + "/"


def adopt_masks(
    fs: AbstractFileSystem, table: pa.Table, earlier: dict[str, str], staged: str, final: str
) -> pa.Table:
    """Resumed rows with their masks moved from an earlier attempt's staging into this
    attempt's (`staged`), each row naming the mask's URI once this attempt commits (`final`)."""
    uris: list[str | None] = []
    make_folder(fs, staged)
    for uri in table["mask_uri"].to_pylist():
        if uri is None:
            uris.append(None)
            continue
        name = mask_name(uri)
        fs.mv(earlier[name], f"{staged}/{name}")
        uris.append(canonical_uri(fs, f"{final}/{name}"))
    column = table.schema.get_field_index("mask_uri")
    return table.set_column(column, table.schema.field(column), pa.array(uris, pa.string()))
