"""Listed inputs -> model-ready units: fetch, decode, resize; a failure becomes an error row."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from vision_ops.config import Preprocessing
from vision_ops.decode import decode_image
from vision_ops.schema import STAGE_PREFIX, STATUS_ERROR, STATUS_OK, item_id, stage_times
from vision_ops.storage import StorageOptions, filesystem
from vision_ops.transforms import resize_and_crop


def read_units(
    batch: dict[str, np.ndarray],
    *,
    preprocessing: Preprocessing | None,
    max_pixels: int,
    storage_options: StorageOptions,
) -> dict[str, np.ndarray]:
    """One listing batch -> the same rows with image, size, status and error columns.

    With `preprocessing` each image is resized and cropped for the model; without, it keeps its
    source size (detectors take any size and resize on the device).
    """
    started = time.perf_counter()
    uris = [str(uri) for uri in batch["source_uri"]]
    payloads = fetch_all(uris, storage_options)
    rows = [_unit(payloads[uri], preprocessing, max_pixels) for uri in uris]
    out = dict(batch)
    out["item_id"] = np.array([item_id(uri) for uri in uris], dtype=object)
    out["image"] = image_column([row.pop("image") for row in rows])
    for column in ("image_width", "image_height", "status", "error_type", "error_message"):
        out[column] = np.array([row[column] for row in rows], dtype=object)
    _fill_missing_identity(out, uris, storage_options)
    out[f"{STAGE_PREFIX}read_decode"] = stage_times(len(uris), time.perf_counter() - started)
    return out


def fetch_all(uris: list[str], options: StorageOptions) -> dict[str, bytes | BaseException]:
    """Bytes of each URI, fetched concurrently per filesystem; an exception where a read failed."""
    payloads: dict[str, bytes | BaseException] = {}
    by_fs: dict[int, tuple[Any, dict[str, str]]] = {}
    for uri in uris:
        fs, path = filesystem(uri, options)
        by_fs.setdefault(id(fs), (fs, {}))[1][path] = uri
    for fs, paths in by_fs.values():
        results = fs.cat(list(paths), on_error="return")
        if not isinstance(results, dict):  # a single path comes back as bare bytes
            results = {next(iter(paths)): results}
        for path, uri in paths.items():
            payloads[uri] = results.get(path, FileNotFoundError(uri))
    return payloads


def image_column(images: list[np.ndarray]) -> np.ndarray:
    """One (N, H, W, 3) array when all images share a size, else an object array of images."""
    if len({image.shape for image in images}) == 1:
        return np.stack(images)
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return column


def _unit(
    payload: bytes | BaseException, prep: Preprocessing | None, max_pixels: int
) -> dict[str, Any]:
    try:
        if isinstance(payload, BaseException):
            raise payload
        image = decode_image(payload, max_pixels)
        model_input = resize_and_crop(image, prep) if prep else image
    except Exception as err:
        return _error_unit(err, prep)
    height, width = image.shape[:2]
    return {
        "image": model_input,
        "image_width": width,
        "image_height": height,
        "status": STATUS_OK,
        "error_type": None,
        "error_message": None,
    }


def _error_unit(err: Exception, prep: Preprocessing | None) -> dict[str, Any]:
    side = prep.crop if prep else 1
    return {
        "image": np.zeros((side, side, 3), dtype=np.uint8),
        "image_width": None,
        "image_height": None,
        "status": STATUS_ERROR,
        "error_type": type(err).__name__,
        "error_message": str(err) or type(err).__name__,
    }


def _fill_missing_identity(
    out: dict[str, np.ndarray], uris: list[str], options: StorageOptions
) -> None:
    """Manifest entries without ETag or size: ask the store (one HEAD each, only for those)."""
    etags, sizes = out["source_etag"], out["source_size"]
    missing = [i for i in range(len(uris)) if etags[i] is None and _is_null(sizes[i])]
    if not missing:
        return
    etags, sizes = etags.astype(object), sizes.astype(object)
    for i in missing:
        fs, path = filesystem(uris[i], options)
        try:
            info = fs.info(path)
        except OSError:
            continue
        etag = info.get("ETag") or info.get("etag")
        etags[i] = str(etag).strip('"') if etag else None
        sizes[i] = info.get("size")
    out["source_etag"], out["source_size"] = etags, sizes


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))
