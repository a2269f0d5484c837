"""DICOM instances -> 8-bit RGB frames (modality LUT, window, photometric) and safe tag columns."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vision_ops.config import WINDOW_PRESETS, DicomSpec, Window
from vision_ops.decode import DecodeError, ImageTooLarge

PREAMBLE_BYTES = 128
MAGIC = b"DICM"
DICOM_SUFFIXES = (".dcm", ".dicom")
# The columns DICOM units fill: the join keys, the window used, and the allow-listed extras.
COLUMN_NAMES = {
    "StudyInstanceUID": "study_instance_uid",
    "SeriesInstanceUID": "series_instance_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "Modality": "modality",
    "BodyPartExamined": "body_part_examined",
    "InstanceNumber": "instance_number",
}
TAGS_COLUMN = "dicom_tags"  # the allow-listed extra tags, as JSON text between stages
DICOM_COLUMNS = (*COLUMN_NAMES.values(), "window_center", "window_width", TAGS_COLUMN)
# Decoder plugins to prefer per transfer syntax: pylibjpeg-rle panics (a pyo3 PanicException,
# which is not an Exception) on some corrupt RLE streams; pydicom's own RLE decoder raises.
PLUGIN_PREFERENCE = {"1.2.840.10008.1.2.5": {"decoding_plugin": "pydicom"}}
SUPPORTED = "uncompressed, deflated, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000"
INSTALL_HINT = "DICOM input needs pydicom and its pixel handlers: pip install 'vision-ops[dicom]'"


class NotDicom(DecodeError):
    """Named as DICOM (.dcm) but not a DICOM instance."""


class NoPixelData(DecodeError):
    pass


class UnsupportedTransferSyntax(DecodeError):
    pass


class CorruptDicom(DecodeError):
    pass


@dataclass(frozen=True)
class Instance:
    """A parsed instance: its frames decode lazily, its columns are already allow-listed."""

    dataset: Any
    frame_count: int
    columns: dict[str, Any]


def is_dicom(uri: str, data: bytes) -> bool:
    """The `DICM` magic after the 128-byte preamble, or a DICOM file name."""
    return data[PREAMBLE_BYTES : PREAMBLE_BYTES + 4] == MAGIC or uri.lower().endswith(
        DICOM_SUFFIXES
    )


def open_instance(data: bytes, spec: DicomSpec, max_pixels: int) -> Instance:
    """Parse an instance and check it has pixels this installation can decode."""
    pydicom = _pydicom()
    with quiet_pydicom():
        try:
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as err:
            raise _unreadable(data, err) from None
        try:
            _check_pixels(dataset, data, max_pixels)
            frame_count = _frame_count(dataset)
            columns = tag_columns(dataset, spec) | {"frame_count": frame_count}
        except DecodeError:
            raise
        except Exception as err:  # a header element of the wrong type or shape
            raise CorruptDicom(f"malformed DICOM header: {scrubbed(err)}") from None
    return Instance(dataset, frame_count, columns)


def decode_frame(instance: Instance, index: int, spec: DicomSpec) -> np.ndarray:
    """Frame `index` as RGB uint8 (rows, columns, 3); only that frame is decoded."""
    dataset = instance.dataset
    options = PLUGIN_PREFERENCE.get(str(_transfer_syntax(dataset)), {})
    with quiet_pydicom():
        try:
            values = _pydicom().pixels.pixel_array(dataset, index=index, **options)
            return to_display(values, dataset, spec)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # Rust decoders panic with a BaseException (pyo3)
            raise CorruptDicom(
                f"cannot decode frame {index} of the {_syntax_name(dataset)} pixel data: "
                f"{scrubbed(err)}"
            ) from None


def is_grey(dataset: Any) -> bool:
    """Whether the instance's frames are grey (MONOCHROME1 or 2, one sample per pixel; a file
    naming no interpretation is MONOCHROME2): only those are windowed; a colour frame (RGB,
    YBR, a palette, or three samples a pixel) is scaled to 8 bits as it is (`to_display`)."""
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    return _photometric(dataset).startswith("MONOCHROME") and samples == 1


def _photometric(dataset: Any) -> str:
    return str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()


def to_display(values: np.ndarray, dataset: Any, spec: DicomSpec) -> np.ndarray:
    """One decoded frame -> RGB uint8: grey windowed (`is_grey`), palette applied, or colour
    scaled."""
    photometric = _photometric(dataset)
    if is_grey(dataset):
        grey = window_frame(values, dataset, spec)
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if photometric == "PALETTE COLOR":
        rgb = _pydicom().pixels.apply_color_lut(values, dataset)
        return _scale_to_uint8(rgb, 16 if rgb.dtype == np.uint16 else 8)
    if values.ndim != 3:
        raise ValueError(f"{photometric} names colour, but the frame has one sample per pixel")
    return _scale_to_uint8(values, int(dataset.get("BitsStored", 8)))  # RGB (YBR converted)


def window_frame(values: np.ndarray, dataset: Any, spec: DicomSpec) -> np.ndarray:
    """Stored values -> modality LUT -> the spec's VOI window -> uint8 (before MONOCHROME1)."""
    pixels = _pydicom().pixels
    modality = pixels.apply_modality_lut(values, dataset).astype(np.float64)
    center_width = chosen_window(dataset, spec)
    if center_width is not None:
        center, width, function = center_width
        return apply_window(modality, center, width, function)
    if spec.window == "file" and "VOILUTSequence" in dataset:
        lut = dataset.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        return _scale_to_uint8(pixels.apply_voi_lut(modality, dataset, prefer_lut=True), bits)
    return full_range(modality)


def chosen_window(dataset: Any, spec: DicomSpec) -> tuple[float, float, str] | None:
    """(centre, width, VOI LUT function) from the spec, else the file's first window."""
    if isinstance(spec.window, Window):
        return spec.window.center, spec.window.width, "LINEAR"
    if spec.window in WINDOW_PRESETS:
        preset = WINDOW_PRESETS[spec.window]
        return preset[0], preset[1], "LINEAR"
    if spec.window != "file" or "VOILUTSequence" in dataset:
        return None
    center, width = _first(dataset.get("WindowCenter")), _first(dataset.get("WindowWidth"))
    if center is None or width is None:  # absent or empty: the frame's full range
        return None
    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return center, width, function


def apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto 0..255.

    LINEAR:       y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped to 0..255
                  (x <= c - 0.5 - (w - 1) / 2 gives 0, x > c - 0.5 + (w - 1) / 2 gives 255)
    LINEAR_EXACT: y = ((x - c) / w + 0.5) * 255, clipped
    SIGMOID:      y = 255 / (1 + exp(-4 (x - c) / w))
    """
    if width <= 0 and function in ("SIGMOID", "LINEAR_EXACT"):  # invalid: both tend to a step
        scaled = np.where(values > center, 255.0, 0.0)
    elif function == "SIGMOID":
        scaled = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        scaled = ((values - center) / width + 0.5) * 255.0
    elif width <= 1:  # a one-value window is a threshold
        scaled = np.where(values > center - 0.5, 255.0, 0.0)
    else:
        scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def full_range(values: np.ndarray) -> np.ndarray:
    """The frame's own min..max onto 0..255 (a flat frame is black)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) / (high - low) * 255.0).astype(np.uint8)


def tag_columns(dataset: Any, spec: DicomSpec) -> dict[str, Any]:
    """The fixed identifying columns and the spec's allow-listed extras; nothing else."""
    columns: dict[str, Any] = {
        column: _text(dataset.get(keyword)) for keyword, column in COLUMN_NAMES.items()
    }
    number = columns["instance_number"]
    columns["instance_number"] = int(number) if number and number.lstrip("-").isdigit() else None
    extras = {keyword: _text(dataset.get(keyword)) for keyword in (*spec.tags, *spec.phi_tags)}
    columns[TAGS_COLUMN] = json.dumps({k: v for k, v in extras.items() if v is not None})
    window = chosen_window(dataset, spec) if is_grey(dataset) else None  # colour: no window
    columns["window_center"] = window[0] if window else None
    columns["window_width"] = window[1] if window else None
    return columns


def scrubbed(err: BaseException, limit: int = 200) -> str:
    """An exception's text safe for an error row: quoted values (which may be a patient's
    name or id from the file) replaced by `'…'`, and capped in length."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", " ".join(str(err).split()))
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records while it reads: they quote element values,
    and worker output goes to the cluster's logs."""
    logger = logging.getLogger("pydicom")
    disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _check_pixels(dataset: Any, data: bytes, max_pixels: int) -> None:
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        if data[PREAMBLE_BYTES : PREAMBLE_BYTES + 4] != MAGIC and "SOPClassUID" not in dataset:
            raise NotDicom("not a DICOM instance (no DICM preamble, no DICOM elements)")
        raise NoPixelData("DICOM instance without pixel data (PixelData is absent)")
    rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
    if rows * columns == 0:
        raise CorruptDicom(f"DICOM pixel data with no pixels ({columns}x{rows})")
    if rows * columns > max_pixels:
        raise ImageTooLarge(f"{columns}x{rows} pixels exceeds the limit of {max_pixels} pixels")
    syntax = _transfer_syntax(dataset)
    if not syntax.is_transfer_syntax:  # a vendor's private UID, or one newer than pydicom
        raise UnsupportedTransferSyntax(
            f"transfer syntax {syntax} is not one pydicom knows (supported: {SUPPORTED})"
        )
    if syntax.is_compressed and not _can_decode(syntax):
        raise UnsupportedTransferSyntax(
            f"transfer syntax {syntax.name} ({syntax}) has no pixel decoder installed "
            f"(supported: {SUPPORTED})"
        )


def _can_decode(syntax: Any) -> bool:
    try:
        return bool(_pydicom().pixels.get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def _unreadable(data: bytes, err: Exception) -> DecodeError:
    if data[PREAMBLE_BYTES : PREAMBLE_BYTES + 4] != MAGIC:
        return NotDicom(f"not a DICOM instance: {scrubbed(err)}")
    return CorruptDicom(f"malformed DICOM: {scrubbed(err)}")


def _frame_count(dataset: Any) -> int:
    """NumberOfFrames, checked against the pixel data's size so that a lying header cannot
    turn one file into millions of units."""
    value = dataset.get("NumberOfFrames")
    try:
        count = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        raise CorruptDicom("NumberOfFrames is not a number") from None
    if count < 1:
        raise CorruptDicom(f"NumberOfFrames is {count}: expected at least 1")
    room = _frames_room(dataset)
    if count > room:
        raise CorruptDicom(f"{count} frame(s) declared, but the pixel data holds {room}")
    return count


def _frames_room(dataset: Any) -> int:
    """How many frames the pixel data can hold: its size over one frame's size, or for
    encapsulated (compressed) data its fragment count (a frame takes one or more)."""
    pixel_data = dataset.get("PixelData") or dataset.get("FloatPixelData") or b""
    if _transfer_syntax(dataset).is_encapsulated:
        try:
            offset_table_end = 8 + int.from_bytes(pixel_data[4:8], "little")
            return int(_pydicom().encaps.parse_fragments(pixel_data[offset_table_end:])[0])
        except Exception as err:
            raise CorruptDicom(f"malformed encapsulated pixel data: {scrubbed(err)}") from None
    bits = int(dataset.get("BitsAllocated") or 8)
    samples = int(dataset.get("SamplesPerPixel") or 1)
    frame_bits = int(dataset.Rows) * int(dataset.Columns) * samples * bits
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422":
        frame_bits = frame_bits * 2 // 3  # two chroma samples shared by each pair of pixels
    return (len(pixel_data) * 8) // max(frame_bits, 1)


def _transfer_syntax(dataset: Any) -> Any:
    """The file meta's transfer syntax; for a file without meta (no preamble), the encoding
    pydicom found while reading it, recorded in the meta so that the pixel decoders see it."""
    pydicom = _pydicom()
    meta = dataset.file_meta if hasattr(dataset, "file_meta") else None
    if meta is None:
        meta = dataset.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = dataset.original_encoding
        uid = pydicom.uid
        syntax = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
        meta.TransferSyntaxUID = syntax if little else uid.ExplicitVRBigEndian
    return meta.TransferSyntaxUID


def _syntax_name(dataset: Any) -> str:
    return str(_transfer_syntax(dataset).name)


def _scale_to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    top = float(2**bits - 1)
    scaled = np.rint(np.clip(values.astype(np.float64), 0, top) / top * 255.0)
    return np.ascontiguousarray(scaled.astype(np.uint8))


def _first(value: Any) -> float | None:
    """A window value, which DICOM allows to be multi-valued (several windows): the first; None
    where the element is absent or empty (a value that is not a number is a malformed header)."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None or value == "" else float(value)


def _text(element_value: Any) -> str | None:
    if element_value is None:
        return None
    text = str(element_value).strip()
    return text or None


def _pydicom() -> Any:
    try:
        import pydicom
        import pydicom.encaps
        import pydicom.pixels
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom
