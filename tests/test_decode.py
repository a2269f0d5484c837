"""Decoding image bytes to RGB uint8: every format, every mode, and every way it can fail."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from vision_ops.decode import (
    CorruptImage,
    DecodeError,
    EmptyFile,
    ImageTooLarge,
    NotAnImage,
    decode_image,
    to_rgb,
)

LIMIT = 10_000_000
# Six flat 16x16 blocks of distinct colours: lossy codecs keep each block's mean colour.
BLOCK = 16
BLOCK_COLOURS = np.array(
    [
        [[230, 20, 20], [20, 200, 30], [30, 40, 220]],
        [[240, 230, 30], [20, 210, 220], [200, 40, 210]],
    ],
    dtype=np.uint8,
)


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def tiff(array: np.ndarray, **options: Any) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def rgb(seed: int, shape: tuple[int, ...] = (5, 7, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def blocks() -> np.ndarray:
    """A 32x48 RGB image of flat colour blocks."""
    return np.kron(BLOCK_COLOURS, np.ones((BLOCK, BLOCK, 1), dtype=np.uint8))


def block_means(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    grid = image.reshape(height // BLOCK, BLOCK, width // BLOCK, BLOCK, 3)
    return grid.astype(np.float64).mean(axis=(1, 3))


def palette_image(indices: np.ndarray, palette: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.flatten().tolist())
    return image


def png_bytes(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB pixels, with a tiny (truncated) IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


# --- lossless formats: exact pixels ------------------------------------------------------------


def _png_rgb() -> tuple[bytes, np.ndarray]:
    array = rgb(1)
    return encode(Image.fromarray(array), "PNG"), array


def _png_rgba() -> tuple[bytes, np.ndarray]:
    array = rgb(2, (5, 7, 4))
    return encode(Image.fromarray(array, "RGBA"), "PNG"), array[..., :3]


def _png_palette() -> tuple[bytes, np.ndarray]:
    indices = np.random.default_rng(3).integers(0, 4, (5, 7), dtype=np.uint8)
    palette = rgb(4, (4, 3))
    return encode(palette_image(indices, palette), "PNG"), palette[indices]


def _png_grey() -> tuple[bytes, np.ndarray]:
    grey = rgb(5, (5, 7))
    return encode(Image.fromarray(grey, "L"), "PNG"), np.repeat(grey[..., None], 3, axis=2)


def _png_grey16() -> tuple[bytes, np.ndarray]:
    grey = np.random.default_rng(6).integers(0, 65536, (5, 7), dtype=np.uint16)
    expected = np.rint(grey / 257).astype(np.uint8)
    return encode(Image.fromarray(grey), "PNG"), np.repeat(expected[..., None], 3, axis=2)


def _webp_lossless() -> tuple[bytes, np.ndarray]:
    array = rgb(7)
    return encode(Image.fromarray(array), "WEBP", lossless=True), array


def _bmp() -> tuple[bytes, np.ndarray]:
    array = rgb(8)
    return encode(Image.fromarray(array), "BMP"), array


def _gif() -> tuple[bytes, np.ndarray]:
    indices = np.random.default_rng(9).integers(0, 4, (5, 7), dtype=np.uint8)
    palette = rgb(10, (4, 3))
    return encode(palette_image(indices, palette), "GIF"), palette[indices]


def _tiff_rgb8() -> tuple[bytes, np.ndarray]:
    array = rgb(11)
    return tiff(array, photometric="rgb"), array


def _tiff_grey8() -> tuple[bytes, np.ndarray]:
    grey = rgb(12, (5, 7))
    return tiff(grey, photometric="minisblack"), np.repeat(grey[..., None], 3, axis=2)


def _tiff_grey16() -> tuple[bytes, np.ndarray]:
    grey = np.random.default_rng(13).integers(0, 65536, (5, 7), dtype=np.uint16)
    expected = np.rint(grey / 257).astype(np.uint8)
    return tiff(grey, photometric="minisblack"), np.repeat(expected[..., None], 3, axis=2)


def _tiff_rgba() -> tuple[bytes, np.ndarray]:
    array = rgb(14, (5, 7, 4))
    return tiff(array, photometric="rgb", extrasamples=["unassalpha"]), array[..., :3]


def _tiff_pillow_rgb() -> tuple[bytes, np.ndarray]:
    array = rgb(15)
    return encode(Image.fromarray(array), "TIFF", compression="tiff_lzw"), array


def _tiff_cmyk() -> tuple[bytes, np.ndarray]:
    cmyk = rgb(16, (5, 7, 4)).astype(np.float64)
    expected = np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)
    return encode(Image.fromarray(cmyk.astype(np.uint8), "CMYK"), "TIFF"), expected


LOSSLESS: dict[str, Callable[[], tuple[bytes, np.ndarray]]] = {
    "png-rgb": _png_rgb,
    "png-rgba": _png_rgba,
    "png-palette": _png_palette,
    "png-grey": _png_grey,
    "png-grey16": _png_grey16,
    "webp-lossless": _webp_lossless,
    "bmp": _bmp,
    "gif": _gif,
    "tiff-rgb8": _tiff_rgb8,
    "tiff-grey8": _tiff_grey8,
    "tiff-grey16": _tiff_grey16,
    "tiff-rgba": _tiff_rgba,
    "tiff-rgb-lzw": _tiff_pillow_rgb,
    "tiff-cmyk": _tiff_cmyk,
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_formats_decode_to_exact_pixels(name: str) -> None:
    data, expected = LOSSLESS[name]()
    decoded = decode_image(data, LIMIT)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (5, 7, 3)
    assert decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, expected)


def test_tiff_rgb16_scales_to_8_bits() -> None:
    array = np.random.default_rng(17).integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    decoded = decode_image(tiff(array, photometric="rgb"), LIMIT)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (5, 7, 3)
    expected = array.astype(np.float64) / 257
    assert np.abs(decoded - expected).max() <= 1.0


def test_animated_gif_gives_its_first_frame() -> None:
    rng = np.random.default_rng(18)
    palette = rgb(19, (4, 3))
    frames = [palette_image(rng.integers(0, 4, (5, 7), dtype=np.uint8), palette) for _ in range(3)]
    first = np.asarray(frames[0]).copy()
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    np.testing.assert_array_equal(decode_image(data, LIMIT), palette[first])


# --- lossy formats: flat blocks keep their colour ----------------------------------------------

# name -> (encoder, largest error of a block's mean colour)
LOSSY: dict[str, tuple[Callable[[Image.Image], bytes], float]] = {
    "jpeg": (lambda image: encode(image, "JPEG", quality=95, subsampling=0), 3),
    "webp": (lambda image: encode(image, "WEBP", quality=95), 10),
    "cmyk-jpeg": (
        lambda image: encode(image.convert("CMYK"), "JPEG", quality=95, subsampling=0),
        3,
    ),
}


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_formats_keep_block_colours(name: str) -> None:
    source = Image.fromarray(blocks())
    reference = source.convert("CMYK").convert("RGB") if name.startswith("cmyk") else source
    make, tolerance = LOSSY[name]
    decoded = decode_image(make(source), LIMIT)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (32, 48, 3)
    np.testing.assert_allclose(
        block_means(decoded), block_means(np.asarray(reference)), atol=tolerance
    )


def test_cmyk_jpeg_is_read_as_cmyk() -> None:
    data = encode(Image.fromarray(blocks()).convert("CMYK"), "JPEG", quality=95, subsampling=0)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert decode_image(data, LIMIT).shape == (32, 48, 3)


# --- EXIF orientation ---------------------------------------------------------------------------


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_jpeg_exif_orientation_6_is_rotated_clockwise() -> None:
    source = blocks()
    data = encode(
        Image.fromarray(source), "JPEG", quality=95, subsampling=0, exif=exif_orientation(6)
    )
    decoded = decode_image(data, LIMIT)
    assert decoded.shape == (48, 32, 3)
    expected = block_means(np.rot90(source, k=-1))
    np.testing.assert_allclose(block_means(decoded), expected, atol=3)
    # Not merely transposed: the wrong rotation is far off.
    assert np.abs(block_means(decoded) - block_means(np.rot90(source, k=1))).max() > 100


ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_png_exif_orientation_is_applied_exactly(orientation: int) -> None:
    source = rgb(20, (3, 4, 3))
    data = encode(Image.fromarray(source), "PNG", exif=exif_orientation(orientation))
    np.testing.assert_array_equal(decode_image(data, LIMIT), ORIENTATIONS[orientation](source))


# --- to_rgb on Pillow modes ---------------------------------------------------------------------


def test_to_rgb_scales_16_bit_with_rounding() -> None:
    grey = np.array([[0, 128, 129, 257], [385, 386, 65535, 32896]], dtype=np.uint16)
    image = Image.fromarray(grey)
    assert image.mode == "I;16"
    expected = np.array([[0, 0, 1, 1], [1, 2, 255, 128]], dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb(image), np.repeat(expected[..., None], 3, axis=2))


def test_to_rgb_scales_12_bit_data_from_its_bits_stored() -> None:
    grey = np.array([[0, 8, 9, 2047, 2048, 4095, 4096, 65535]], dtype=np.uint16)
    image = Image.fromarray(grey)
    expected = np.round(np.minimum(grey, 4095) / 4095 * 255).astype(np.uint8)
    assert expected.tolist() == [[0, 0, 1, 127, 128, 255, 255, 255]]
    np.testing.assert_array_equal(to_rgb(image, bits_stored=12)[..., 0], expected)
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # exact rounding, any depth
    for bits in (10, 12, 14, 16):
        top = (1 << bits) - 1
        want = np.round(np.minimum(every, top) / top * 255).astype(np.uint8)
        np.testing.assert_array_equal(to_rgb(Image.fromarray(every), bits)[..., 0], want)


def test_to_rgb_clips_32_bit_integers_as_16_bit() -> None:
    image = Image.fromarray(np.array([[0, 257, 70_000]], dtype=np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(to_rgb(image)[0, :, 0], [0, 1, 255])


def test_to_rgb_rounds_and_clips_float() -> None:
    image = Image.fromarray(np.array([[-5.0, 0.4, 0.6, 300.0]], dtype=np.float32))
    assert image.mode == "F"
    decoded = to_rgb(image)
    np.testing.assert_array_equal(decoded[0], [[0] * 3, [0] * 3, [1] * 3, [255] * 3])


@pytest.mark.parametrize(
    ("mode", "array", "expected"),
    [
        ("1", np.array([[True, False]]), [[255, 255, 255], [0, 0, 0]]),
        ("LA", np.array([[[10, 0], [200, 255]]], dtype=np.uint8), [[10] * 3, [200] * 3]),
        ("RGBA", np.array([[[1, 2, 3, 0], [4, 5, 6, 9]]], dtype=np.uint8), [[1, 2, 3], [4, 5, 6]]),
        ("RGB", np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8), [[1, 2, 3], [4, 5, 6]]),
    ],
)
def test_to_rgb_on_8_bit_modes(mode: str, array: np.ndarray, expected: list[list[int]]) -> None:
    image = Image.fromarray(array) if mode == "1" else Image.fromarray(array, mode)
    assert image.mode == mode
    decoded = to_rgb(image)
    assert decoded.dtype == np.uint8
    assert decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded[0], np.array(expected, dtype=np.uint8))


# --- inputs that are not decodable images -------------------------------------------------------


def _truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(rgb(21, (64, 64, 3))), "JPEG", quality=90)
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    data = encode(Image.fromarray(rgb(22, (64, 64, 3))), "PNG")
    return data[: len(data) // 2]


def _png_corrupt_idat() -> bytes:
    data = bytearray(encode(Image.fromarray(rgb(23, (16, 16, 3))), "PNG", compress_level=0))
    start = data.index(b"IDAT") + 4
    data[start + 100 : start + 110] = b"\xff" * 10  # CRC now wrong
    return bytes(data)


BAD_INPUTS: dict[str, tuple[Callable[[], bytes], type[DecodeError], str]] = {
    "zero-byte": (lambda: b"", EmptyFile, "zero-byte file"),
    "html-as-jpg": (
        lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        NotAnImage,
        "not a recognised image format",
    ),
    "text": (lambda: b"hello", NotAnImage, "not a recognised image format"),
    "truncated-jpeg": (_truncated_jpeg, CorruptImage, "cannot "),
    "truncated-png": (_truncated_png, CorruptImage, "cannot decode PNG: image file is truncated"),
    "corrupt-png-idat": (_png_corrupt_idat, CorruptImage, "cannot decode PNG: "),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_raise_their_decode_error(name: str) -> None:
    make, error, message = BAD_INPUTS[name]
    with pytest.raises(error) as caught:
        decode_image(make(), LIMIT)
    assert str(caught.value).startswith(message)
    assert type(caught.value).__name__ == error.__name__


@pytest.mark.parametrize("error", [EmptyFile, NotAnImage, CorruptImage, ImageTooLarge])
def test_decode_errors_are_value_errors(error: type[DecodeError]) -> None:
    assert issubclass(error, DecodeError)
    assert issubclass(error, ValueError)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything starts decoding (and so allocating) pixel data."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_png_bomb_header_fails_fast_without_decoding(no_pixel_decoding: None) -> None:
    data = png_bytes(100_000, 100_000)
    assert len(data) < 100
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge) as caught:
        decode_image(data, 178_956_970)
    assert time.perf_counter() - started < 1.0
    assert "10000000000 pixels" in str(caught.value)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((1_200, 1_000), "1200x1000 pixels exceeds the limit of 1000000 pixels"),
        # past twice the limit Pillow refuses it, naming twice ours (2000000) as its limit
        ((20_000, 20_000), "400000000 pixels exceeds the limit of 1000000 pixels"),
    ],
)
def test_header_over_max_pixels_fails_before_decoding(
    no_pixel_decoding: None, size: tuple[int, int], message: str
) -> None:
    with pytest.raises(ImageTooLarge) as caught:
        decode_image(png_bytes(*size), 1_000_000)
    assert str(caught.value).startswith(message)


def test_max_pixels_smaller_than_the_image() -> None:
    data = encode(Image.fromarray(blocks()), "PNG")
    with pytest.raises(ImageTooLarge) as caught:
        decode_image(data, 32 * 48 - 1)
    assert str(caught.value) == "48x32 pixels exceeds the limit of 1535 pixels"
    np.testing.assert_array_equal(decode_image(data, 32 * 48), blocks())


def test_max_pixels_is_not_capped_by_pillows_global_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    source = rgb(24, (20, 20, 3))
    decoded = decode_image(encode(Image.fromarray(source), "PNG"), 400)
    np.testing.assert_array_equal(decoded, source)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_overlapping_decodes_leave_pillows_limit_as_they_found_it() -> None:
    """Decode threads overlap: each saving and restoring Pillow's global alone left the limit
    of the decode that ended last behind for good."""
    from vision_ops.decode import _pixel_limit

    before = Image.MAX_IMAGE_PIXELS
    first, second = _pixel_limit(10**9), _pixel_limit(400)
    first.__enter__()
    second.__enter__()
    assert Image.MAX_IMAGE_PIXELS == 10**9  # the largest in progress: refuses neither's images
    first.__exit__(None, None, None)  # the first ends first
    assert Image.MAX_IMAGE_PIXELS == 400
    second.__exit__(None, None, None)
    assert before == Image.MAX_IMAGE_PIXELS


def test_sixteen_bits_become_eight_as_v_over_257_rounded() -> None:
    """Every 16-bit value (and values an `I` image may hold past either end) in integers, as
    the float computation gives it."""
    from vision_ops.decode import sixteen_to_eight_bits

    values = np.arange(-300, 66_000, dtype=np.int64).astype(np.int32).reshape(1, -1)
    expected = np.clip(np.rint(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(sixteen_to_eight_bits(values), expected)
    as_uint16 = np.arange(65_536, dtype=np.uint16).reshape(256, 256)
    np.testing.assert_array_equal(
        sixteen_to_eight_bits(as_uint16), np.rint(as_uint16 / 257.0).astype(np.uint8)
    )
