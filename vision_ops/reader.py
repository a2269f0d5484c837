"""Listed inputs -> model-ready units: fetch, decode, resize; a failure becomes an error row."""

from __future__ import annotations

import contextlib
import errno
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from vision_ops.config import DicomSpec, JobSpec, Preprocessing, TilingSpec
from vision_ops.decode import ENCODED_COLUMN, ImageTooLarge, decode_image, device_jpeg_size
from vision_ops.dicom import DICOM_COLUMNS, decode_frame, is_dicom, open_instance
from vision_ops.raster import RasterError, open_raster
from vision_ops.scenes import tile_place, tile_unit
from vision_ops.schema import (
    STAGE_PREFIX,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_SKIPPED,
    item_id,
    stage_times,
)
from vision_ops.sources import GLOB_CHARS, undecodable_name, with_store_identity
from vision_ops.storage import StorageOptions, filesystem
from vision_ops.transforms import resize_and_crop

# Columns every read batch carries beside the image, whatever the source.
UNIT_COLUMNS = (
    "image_width",
    "image_height",
    "frame_index",
    "frame_count",
    "status",
    "error_type",
    "error_message",
)
MB = 1024**2
# A read task's units leave it in blocks of about this many bytes of images, so the frames of
# a DICOM instance are never held all at once (Ray Data gathers a task's blocks up to its
# target block size, 128 MiB, before handing them on).
READ_BLOCK_BYTES = 32 * MB
# Columns a tile read adds (the plan's tile_x, tile_y, tile_size ride along from the listing).
TILE_COLUMNS = (
    "valid_fraction",
    "tile_transform",
    "scene_width",
    "scene_height",
    "crs",
    "footprint",
    "center_lon",
    "center_lat",
)


def unit_reader(
    spec: JobSpec, preprocessing: Preprocessing | None
) -> Callable[[dict[str, np.ndarray]], Iterator[dict[str, np.ndarray]]]:
    """`read_unit_blocks` as a run of `spec` reads (its input and decode settings), each image
    made ready for `preprocessing` (the model's, `models.resolve_preprocessing`)."""
    return functools.partial(
        read_unit_blocks,
        preprocessing=preprocessing,
        max_pixels=spec.input.max_pixels,
        bits_stored=spec.input.bits_stored,
        max_file_bytes=spec.input.max_file_mb * 2**20,
        storage_options=spec.storage_options,
        dicom=spec.input.dicom,
        tiling=spec.input.tiling,
        decode_on_device=spec.runtime.decode == "device",
        max_block_bytes=READ_BLOCK_BYTES,
    )


def read_unit_blocks(
    batch: dict[str, np.ndarray],
    *,
    preprocessing: Preprocessing | None,
    max_pixels: int,
    storage_options: StorageOptions,
    bits_stored: int = 16,
    dicom: DicomSpec | None = None,
    tiling: TilingSpec | None = None,
    decode_on_device: bool = False,
    max_file_bytes: int | None = None,
    max_block_bytes: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One listing batch -> one row per unit (an image, each frame of a DICOM instance, or a
    planned tile) with image, size, frame, status and error columns, and the DICOM or tile
    columns where the spec reads them; in blocks whose images pass `max_block_bytes` by one
    unit at most (None: one block). A unit is decoded as its block is built, so the frames of
    a DICOM instance are never all held at once, however many it declares.
    A file the listing found larger than `max_file_bytes` is an error row, never fetched.

    With `preprocessing` each image is resized and cropped for the model; without, it keeps its
    source size (detectors take any size and resize on the device). With `decode_on_device`
    a JPEG the device can take keeps its bytes (the `encoded` column) and an empty image.
    """
    started = time.perf_counter()
    uris = [str(uri) for uri in batch["source_uri"]]
    reading = UnitReader(preprocessing, max_pixels, dicom, decode_on_device, bits_stored)
    batch = dict(batch)
    _fill_missing_identity(batch, uris, storage_options)  # once per source, not per unit
    if tiling is not None:
        units = tile_units(batch, tiling, reading, storage_options)
    else:
        payloads = fetch_capped(uris, batch["source_size"], max_file_bytes, storage_options)
        units = (
            (index, row)
            for index, uri in enumerate(uris)
            for row in reading.units(uri, payloads[uri])
        )
    extra = (*(DICOM_COLUMNS if dicom else ()), *(TILE_COLUMNS if tiling else ()))
    for block in _blocks(units, max_block_bytes):
        out = _columns(batch, uris, block, extra, decode_on_device)
        out[f"{STAGE_PREFIX}read_decode"] = stage_times(len(block), time.perf_counter() - started)
        yield out
        started = time.perf_counter()


def _blocks(
    units: Iterator[tuple[int, dict[str, Any]]], max_bytes: int | None
) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """(source index, row) pairs in lists whose images pass `max_bytes` by one unit at most;
    one list (perhaps empty) where there is no bound or no unit."""
    block: list[tuple[int, dict[str, Any]]] = []
    held, yielded = 0, False
    for unit in units:
        block.append(unit)
        held += _unit_bytes(unit[1])
        if max_bytes is not None and held >= max_bytes:
            yield block
            block, held, yielded = [], 0, True
    if block or not yielded:
        yield block


def _unit_bytes(row: dict[str, Any]) -> int:
    return int(row["image"].nbytes) + len(row.get(ENCODED_COLUMN, b""))


def _columns(
    batch: dict[str, np.ndarray],
    uris: list[str],
    block: list[tuple[int, dict[str, Any]]],
    extra: tuple[str, ...],
    decode_on_device: bool,
) -> dict[str, np.ndarray]:
    """A block's units as columns: their sources' listing columns, then their own."""
    source_of = np.array([index for index, _ in block], dtype=np.int64)
    rows = [row for _, row in block]
    out = {name: np.asarray(values)[source_of] for name, values in batch.items()}
    out["item_id"] = np.array(
        [
            item_id(uris[source], row.get("frame_index"), _tile_of(out, index))
            for index, (source, row) in enumerate(zip(source_of.tolist(), rows, strict=True))
        ],
        dtype=object,
    )
    out["image"] = image_column([row.pop("image") for row in rows])  # held once, as a column
    if decode_on_device:
        out[ENCODED_COLUMN] = np.array([row.get(ENCODED_COLUMN, b"") for row in rows], dtype=object)
    for column in (*UNIT_COLUMNS, *extra):
        out[column] = np.array([row.get(column) for row in rows], dtype=object)
    return out


def tile_units(
    batch: dict[str, np.ndarray],
    tiling: TilingSpec,
    reading: UnitReader,
    options: StorageOptions,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Planned tiles -> (listing index, row) each; a scene stays open across its consecutive
    tiles (and until the last block is built)."""
    with contextlib.ExitStack() as stack:
        scenes: dict[str, Any] = {}  # an open dataset, or the error opening it gave
        for index, uri in enumerate(str(u) for u in batch["source_uri"]):
            unit = {name: values[index] for name, values in batch.items()}
            if unit["plan_error"] is not None:
                scenes.setdefault(uri, undecodable_name(uri) or RasterError(unit["plan_error"]))
            if uri not in scenes:
                try:
                    scenes[uri] = stack.enter_context(open_raster(uri, options))
                except Exception as err:
                    scenes[uri] = err
            try:
                if isinstance(scenes[uri], Exception):
                    raise scenes[uri]
                row = reading.tile(tile_unit(scenes[uri], unit, tiling))
            except Exception as err:  # the tile's own error row; the other tiles go on
                row = reading.error(err) | _place_of(scenes[uri], unit)
            yield index, row


def _place_of(scene: Any, unit: dict[str, Any]) -> dict[str, Any]:
    """A failed tile's place (`scenes.tile_place`) where its scene opened and was planned;
    nothing where it did not."""
    if isinstance(scene, Exception) or _is_null(unit.get("tile_x")):
        return {}
    try:
        return tile_place(scene, unit)
    except Exception:  # a header that gives no place either: the error row alone
        return {}


def _tile_of(out: dict[str, np.ndarray], index: int) -> tuple[int, int] | None:
    if "tile_x" not in out or _is_null(out["tile_x"][index]):
        return None
    return int(out["tile_x"][index]), int(out["tile_y"][index])


class FileTooLarge(Exception):
    """The file is larger than the job reads whole (`input.max_file_mb`)."""


def fetch_capped(
    uris: list[str], sizes: np.ndarray, max_file_bytes: int | None, options: StorageOptions
) -> dict[str, bytes | BaseException]:
    """`fetch_all`, under the cap (None: none): a file the listing found larger than
    `max_file_bytes` is FileTooLarge without a byte read; of a file whose size it did not
    find (a manifest entry with an ETag only) no more than `max_file_bytes + 1` bytes are read,
    and FileTooLarge where that many came."""
    if max_file_bytes is None:
        return fetch_all(uris, options)
    unsized = {uri for uri, size in zip(uris, sizes, strict=True) if _is_null(size)}
    too_large = _too_large(uris, sizes, max_file_bytes)
    sized = [uri for uri in uris if uri not in too_large and uri not in unsized]
    heads = fetch_heads(sorted(unsized), options, up_to=max_file_bytes + 1)
    return fetch_all(sized, options) | too_large | _over_the_cap(heads, max_file_bytes)


def _too_large(uris: list[str], sizes: np.ndarray, max_file_bytes: int) -> dict[str, BaseException]:
    """FileTooLarge for each URI whose listed size passes `max_file_bytes`."""
    return {
        uri: FileTooLarge(f"{int(size):,} bytes, over {_the_cap(max_file_bytes)}: not read")
        for uri, size in zip(uris, sizes, strict=True)
        if not _is_null(size) and int(size) > max_file_bytes
    }


def _over_the_cap(
    heads: dict[str, bytes | BaseException], max_file_bytes: int
) -> dict[str, bytes | BaseException]:
    """The first bytes of files of no listed size, FileTooLarge where they pass the cap."""
    return {
        uri: FileTooLarge(f"no size listed, and over {_the_cap(max_file_bytes)}: read no further")
        if isinstance(head, bytes) and len(head) > max_file_bytes
        else head
        for uri, head in heads.items()
    }


def _the_cap(max_file_bytes: int) -> str:
    return f"input.max_file_mb={max_file_bytes // 2**20} ({max_file_bytes:,} bytes)"


def fetch_all(uris: list[str], options: StorageOptions) -> dict[str, bytes | BaseException]:
    """Bytes of each URI, fetched concurrently per filesystem; an exception where a read
    failed."""
    payloads: dict[str, bytes | BaseException] = {}
    for fs, paths in _by_filesystem(uris, options):
        plain = [path for path in paths if not GLOB_CHARS & set(path)]
        results = fs.cat(plain, on_error="return") if plain else {}
        if not isinstance(results, dict):  # a single path comes back as bare bytes
            results = {plain[0]: results}
        for path, uri in paths.items():
            if path in results:
                payloads[uri] = results[path]
            elif GLOB_CHARS & set(path):  # `cat` of a list would glob it: `a [1].jpg`
                payloads[uri] = _cat_one(fs, path)
            else:
                payloads[uri] = FileNotFoundError(uri)
    return payloads


def fetch_heads(
    uris: list[str], options: StorageOptions, up_to: int
) -> dict[str, bytes | BaseException]:
    """The first `up_to` bytes of each URI, in one concurrent range read per filesystem (a
    range read takes each name literally); an exception where a read failed. S3 refuses any
    range of an empty object (416, which s3fs raises as EINVAL): an object the store then says
    is empty is no bytes."""
    heads: dict[str, bytes | BaseException] = {}
    for fs, paths in _by_filesystem(uris, options):
        names = list(paths)
        for name, head in zip(
            names, fs.cat_ranges(names, 0, up_to, on_error="return"), strict=True
        ):
            heads[paths[name]] = b"" if _unsatisfiable(head) and _is_empty(fs, name) else head
    return heads


def _by_filesystem(uris: list[str], options: StorageOptions) -> list[tuple[Any, dict[str, str]]]:
    """The URIs grouped by the filesystem that reads them: (filesystem, {path: URI})."""
    groups: dict[int, tuple[Any, dict[str, str]]] = {}
    for uri in uris:
        fs, path = filesystem(uri, options)
        groups.setdefault(id(fs), (fs, {}))[1][path] = uri
    return list(groups.values())


def _unsatisfiable(head: bytes | BaseException) -> bool:
    return isinstance(head, OSError) and head.errno == errno.EINVAL


def _is_empty(fs: Any, path: str) -> bool:
    try:
        return fs.size(path) == 0
    except OSError:
        return False


def _cat_one(fs: Any, path: str) -> bytes | BaseException:
    """One file's bytes, its name taken literally; the exception where the read failed."""
    try:
        return bytes(fs.cat_file(path))
    except Exception as err:  # the store's errors are not one type: an error row names it
        return err


def image_column(images: list[np.ndarray]) -> np.ndarray:
    """One (N, H, W, 3) array when all images share a size, else an object array of images."""
    if len({image.shape for image in images}) == 1:
        return np.stack(images)
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return column


@dataclass(frozen=True)
class UnitReader:
    """Bytes of one source -> its units' rows: decoded, resized, or an error row each."""

    preprocessing: Preprocessing | None
    max_pixels: int
    dicom: DicomSpec | None
    decode_on_device: bool = False
    bits_stored: int = 16  # of a 16-bit image (decode.to_rgb)

    def units(self, uri: str, payload: bytes | BaseException) -> Iterator[dict[str, Any]]:
        """The file's units, each decoded as it is taken (a DICOM instance's frames)."""
        if isinstance(payload, FileNotFoundError):
            yield self.error(undecodable_name(uri) or payload)
        elif isinstance(payload, BaseException):
            yield self.error(payload)
        elif is_dicom(uri, payload):
            yield from self._dicom_units(payload)
        else:
            yield self._image_unit(payload)

    def _image_unit(self, payload: bytes) -> dict[str, Any]:
        size = device_jpeg_size(payload, self.max_pixels) if self.decode_on_device else None
        try:
            if size is not None:
                return self._encoded_unit(payload, *size)
            return self._unit(decode_image(payload, self.max_pixels, self.bits_stored))
        except Exception as err:  # undecodable, or no size the model can take (1 x 10^7)
            return self.error(err)

    def _check_resized(self, width: int, height: int, side: int) -> None:
        """ImageTooLarge where resizing the shorter side to `side` would pass `max_pixels` (a
        1 x 10^5 strip: gigabytes), before any pixel is allocated."""
        short, long = sorted((width, height))
        resized = side * int(side * long / max(short, 1))
        if resized > self.max_pixels:
            raise ImageTooLarge(
                f"{width}x{height} resized to a shorter side of {side} would be {resized} "
                f"pixels, over the limit of {self.max_pixels}"
            )

    def _dicom_units(self, payload: bytes) -> Iterator[dict[str, Any]]:
        spec = self.dicom or DicomSpec()
        try:
            instance = open_instance(payload, spec, self.max_pixels)
        except Exception as err:
            yield self.error(err)
            return
        for index in range(instance.frame_count):
            try:
                row = self._unit(decode_frame(instance, index, spec))
            except Exception as err:
                row = self.error(err)
            yield row | instance.columns | {"frame_index": index}

    def _unit(self, image: np.ndarray) -> dict[str, Any]:
        height, width = image.shape[:2]
        if self.preprocessing:
            self._check_resized(width, height, self.preprocessing.resize)
        model_input = resize_and_crop(image, self.preprocessing) if self.preprocessing else image
        return {"image": model_input, "image_width": width, "image_height": height} | _OK

    def _encoded_unit(self, payload: bytes, width: int, height: int) -> dict[str, Any]:
        """A JPEG left for the predictor's device to decode (its image is empty), checked as a
        decoded image is: a strip too thin to resize is refused here, not on the device."""
        if self.preprocessing:
            self._check_resized(width, height, self.preprocessing.resize)
        empty = np.zeros((0, 0, 3), dtype=np.uint8)
        encoded = {ENCODED_COLUMN: payload, "image_width": width, "image_height": height}
        return {"image": empty} | encoded | _OK

    def tile(self, tile: dict[str, Any]) -> dict[str, Any]:
        """A tile read: the model's unit, or a `skipped` row when it holds no data at all."""
        image = tile.pop("image")
        if tile["valid_fraction"] == 0:
            skipped = {"status": STATUS_SKIPPED, "error_message": "no data in the tile"}
            return {"image": self._placeholder(), "error_type": None} | tile | skipped
        return self._unit(image) | tile

    def error(self, err: BaseException) -> dict[str, Any]:
        """The error row of a unit the input made fail. An ImportError (a decoder this worker
        lacks) is the cluster's, not the input's: raised, to stop the run before every such
        input becomes an error row of a committed run."""
        if isinstance(err, ImportError):
            raise err
        return {
            "image": self._placeholder(),
            "status": STATUS_ERROR,
            "error_type": type(err).__name__,
            "error_message": str(err) or type(err).__name__,
        }

    def _placeholder(self) -> np.ndarray:
        """The image of a row the model never sees (the batch keeps one array shape)."""
        side = self.preprocessing.crop if self.preprocessing else 1
        return np.zeros((side, side, 3), dtype=np.uint8)


_OK = {"status": STATUS_OK, "error_type": None, "error_message": None}


def _fill_missing_identity(
    out: dict[str, np.ndarray], uris: list[str], options: StorageOptions
) -> None:
    """Manifest entries without ETag or size given the store's (`with_store_identity`, the
    rule an incremental run's listing follows too; already done there for its inputs). A
    modification time comes as Ray Data hands this column to a batch: UTC, naive."""
    etags, sizes = out["source_etag"], out["source_size"]
    if not any(etags[i] is None and _is_null(sizes[i]) for i in range(len(uris))):
        return
    listed = {
        "source_uri": pa.array(uris, pa.string()),
        "source_etag": pa.array(list(etags), pa.string()),
        "source_size": pa.array([None if _is_null(s) else int(s) for s in sizes], pa.int64()),
    }
    if "source_mtime" in out:  # datetime64 with NaT for none (or objects, None for none)
        mtimes = pa.array(out["source_mtime"], from_pandas=True)
        listed["source_mtime"] = mtimes.cast(pa.timestamp("us", tz="UTC"))
    filled = with_store_identity(pa.table(listed), options)
    for name in ("source_etag", "source_size"):
        out[name] = np.array(filled[name].to_pylist(), dtype=object)
    if "source_mtime" in out:
        naive = filled["source_mtime"].cast(pa.timestamp("us"))
        out["source_mtime"] = naive.to_numpy(zero_copy_only=False)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))
