"""Builders of hostile files for the tests: headers that lie, truncations, bombs, odd modes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from vision_ops.synthetic import dicom_bytes

IMAGE_ERRORS = frozenset({"EmptyFile", "NotAnImage", "CorruptImage", "ImageTooLarge"})
DICOM_ERRORS = frozenset({"NotDicom", "NoPixelData", "UnsupportedTransferSyntax", "CorruptDicom"})
ALLOWED_ERRORS = IMAGE_ERRORS | DICOM_ERRORS


def encode(array: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif_with_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height around a 1x1 frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 6
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b";"


def tiff(entries: list[tuple[int, int, int, int]], pixels: bytes = b"\x00" * 16) -> bytes:
    """A little-endian TIFF with one IFD of (tag, type, count, value) entries and some pixels."""
    ifd_offset = 8 + len(pixels)
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in sorted(entries):
        ifd += struct.pack("<HHII", tag, kind, count, value)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + pixels + ifd + b"\x00\x00\x00\x00"


def tiff_sized(width: int, height: int, extra_tags: int = 0) -> bytes:
    """A grey 8-bit strip TIFF declaring width x height, optionally padded with private tags."""
    entries = [
        (256, 4, 1, width),  # ImageWidth
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: black is zero
        (273, 4, 1, 8),  # StripOffsets
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
    ]
    entries += [(40000 + i, 3, 1, i) for i in range(extra_tags)]
    return tiff(entries)


def animated(fmt: str, frames: list[np.ndarray]) -> bytes:
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format=fmt, save_all=True, append_images=images[1:], duration=100, loop=0
    )
    return buffer.getvalue()


def exif_rotated_jpeg(array: np.ndarray, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(array, "JPEG", exif=exif.tobytes(), quality=95)


def dicom_corpus(seed: int = 0) -> dict[str, tuple[bytes, str | tuple[int, int]]]:
    """The DICOM part of the corpus: no preamble, broken pixel data, lying headers."""
    rng = np.random.default_rng(seed)
    ct = rng.integers(0, 3000, (32, 32)).astype(np.int16)  # J2K wants 32 pixels a side
    good = dicom_bytes(ct)
    header_end = len(good) - ct.nbytes
    return {
        "no-preamble.dcm": (dicom_bytes(ct, preamble=False), (32, 32)),
        "broken-pixels.dcm": (garbled_fragment(ct, JPEG2000_LOSSLESS, 100, rng), "CorruptDicom"),
        "rle-bad-header.dcm": (garbled_fragment(ct, RLE_LOSSLESS, 0, rng), "CorruptDicom"),
        "cut-pixels.dcm": (good[: header_end + 100], "CorruptDicom"),
        "huge-dims.dcm": (
            dicom_bytes(ct, tags={"Rows": 65_535, "Columns": 65_535}),
            "ImageTooLarge",
        ),
        "frame-liar.dcm": (dicom_bytes(ct, tags={"NumberOfFrames": 2**31 - 1}), "CorruptDicom"),
        "jpeg-named.dcm": (encode(np.zeros((8, 8, 3), np.uint8), "JPEG"), "NotDicom"),
    }


JPEG2000_LOSSLESS, RLE_LOSSLESS = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"
ITEM_TAG = b"\xfe\xff\x00\xe0"


def garbled_fragment(
    pixels: np.ndarray, syntax: str, offset: int, rng: np.random.Generator, length: int = 64
) -> bytes:
    """A compressed instance whose (last) frame fragment has `length` random bytes at `offset`
    into it: the encapsulation stays valid, the codestream does not."""
    data = bytearray(dicom_bytes(pixels, transfer_syntax=syntax))
    start = data.rfind(ITEM_TAG) + 8 + offset
    data[start : start + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    return bytes(data)


def corpus(seed: int = 0) -> dict[str, tuple[bytes, str | tuple[int, int]]]:
    """File name -> (bytes, expected): an error type, or the (height, width) it decodes to."""
    rng = np.random.default_rng(seed)
    photo = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    jpeg, png = encode(photo, "JPEG", quality=90), encode(photo, "PNG")
    grey16 = (rng.integers(0, 65535, (40, 30))).astype(np.uint16)
    frames = [np.full((20, 30, 3), value, dtype=np.uint8) for value in (10, 200, 90)]
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, format="JPEG")
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "CorruptImage"),
        "truncated.png": (png[: len(png) // 2], "CorruptImage"),
        "zero.jpg": (b"", "EmptyFile"),
        "png-named.jpg": (png, (48, 64)),
        "jpeg-named.png": (jpeg, (48, 64)),
        "error-page.jpg": (
            b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
            "NotAnImage",
        ),
        "bomb.png": (png_declaring(100_000, 100_000), "ImageTooLarge"),
        "wide-screen.gif": (gif_with_screen(65_535, 65_535), "ImageTooLarge"),
        "many-tags.tif": (tiff_sized(4, 4, extra_tags=3000), (4, 4)),
        "absurd.tif": (tiff_sized(1_000_000, 1_000_000), "ImageTooLarge"),
        "cmyk.jpg": (cmyk.getvalue(), (48, 64)),
        "grey16.png": (encode(grey16, "PNG"), (40, 30)),
        "exif-rotated.jpg": (exif_rotated_jpeg(photo), (64, 48)),
        "animated.gif": (animated("GIF", frames), (20, 30)),
        "animated.webp": (animated("WEBP", frames), (20, 30)),
    } | dicom_corpus(seed)
