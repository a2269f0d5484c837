"""Synthetic DICOM instances built from arrays, for the demo and the tests (no patient data)."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np


def dicom_bytes(
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    tags: dict[str, Any] | None = None,
    transfer_syntax: str | None = None,
    preamble: bool = True,
) -> bytes:
    """A DICOM Part 10 file holding `pixels`: (rows, cols) or (frames, rows, cols) grey values
    (int16 is stored signed, uint8/uint16 unsigned), or (..., 3) uint8 RGB.

    `tags` sets or overrides elements by keyword (RescaleSlope, WindowCenter, PatientName...).
    `transfer_syntax` compresses with pydicom's encoders (e.g. RLE Lossless, JPEG 2000
    Lossless). Without `preamble` the file starts directly with the dataset (no 128-byte
    preamble, no `DICM`, no file meta), as some old archives hold them.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    colour = pixels.shape[-1] == 3 and pixels.dtype == np.uint8 and pixels.ndim >= 3
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    bits_allocated = pixels.dtype.itemsize * 8
    dataset = Dataset()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = modality
    dataset.InstanceNumber = 1
    dataset.Rows, dataset.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    dataset.SamplesPerPixel = 3 if colour else 1
    dataset.PhotometricInterpretation = "RGB" if colour else photometric
    if colour:
        dataset.PlanarConfiguration = 0
    dataset.BitsAllocated = bits_allocated
    dataset.BitsStored = bits_stored or bits_allocated
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    with warnings.catch_warnings():  # tests plant invalid values on purpose
        warnings.simplefilter("ignore")
        for keyword, value in (tags or {}).items():
            setattr(dataset, keyword, value)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if transfer_syntax:
        dataset.compress(pydicom.uid.UID(transfer_syntax))
    buffer = io.BytesIO()
    if preamble:
        dataset.save_as(buffer, enforce_file_format=True)
    else:
        del dataset.file_meta
        dataset.save_as(buffer, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def phantom_ct(frames: int = 1, size: int = 128, seed: int = 0) -> np.ndarray:
    """Head-phantom slices in Hounsfield units as stored int16 values (slope 1, intercept
    -1024): air, soft tissue and bone, with a little noise."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    phantom = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)
    slices = []
    for index in range(frames):
        scale = 1.0 - 0.1 * index / max(frames, 1)
        hounsfield = -1000 + phantom * 2000 * scale + rng.normal(0, 10, phantom.shape)
        slices.append(np.rint(hounsfield + 1024).astype(np.int16))
    return np.stack(slices) if frames > 1 else slices[0]
