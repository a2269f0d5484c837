"""Decode image bytes (JPEG, PNG, WebP, BMP, GIF, TIFF) to RGB uint8 arrays, or say why not."""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Bit depth of the integer modes Pillow reports for high-bit-depth images.
HIGH_BIT_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 16}
ENCODED_COLUMN = "encoded"  # a photo's JPEG bytes left for the device, b"" where decoded here
DEVICE_MODES = frozenset({"RGB", "L"})  # JPEG colour spaces nvJPEG converts to RGB itself
EXIF_ORIENTATION = 0x0112


class DecodeError(ValueError):
    """An input that is not a decodable image; its class name becomes the row's error_type."""


class EmptyFile(DecodeError):
    pass


class NotAnImage(DecodeError):
    pass


class CorruptImage(DecodeError):
    pass


class ImageTooLarge(DecodeError):
    pass


def decode_image(data: bytes, max_pixels: int, bits_stored: int = 16) -> np.ndarray:
    """RGB uint8 (H, W, 3) of the first frame, EXIF orientation applied; a 16-bit image's
    values scaled from its `bits_stored` (`to_rgb`)."""
    if not data:
        raise EmptyFile("zero-byte file")
    with _pixel_limit(max_pixels):
        image = _open(data, max_pixels)
        try:
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return to_rgb(image, bits_stored)
        except Image.DecompressionBombError as err:
            raise _over_the_limit(err, max_pixels) from None
        except Exception as err:  # a malformed file breaks Pillow's decoders in many ways
            raise CorruptImage(
                f"cannot decode {image.format or 'image'}: {_describe(err)}"
            ) from None


class _PixelLimits:
    """Pillow's own bomb guard (a process-wide setting) set to the largest `max_pixels` of the
    decodes in progress, and set back once none is: decode threads overlap, and each saving and
    restoring the setting alone could leave one's limit behind for good. Pillow then refuses
    what passes twice our limit (`_over_the_limit` words it as ours; it warns below that, and
    ours is checked per image too, `_open`), and never what another decode in progress
    allows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: list[int] = []
        self._saved: int | None = None

    @contextlib.contextmanager
    def at_least(self, max_pixels: int) -> Iterator[None]:
        with self._lock:
            if not self._active:
                self._saved = Image.MAX_IMAGE_PIXELS
            self._active.append(max_pixels)
            Image.MAX_IMAGE_PIXELS = max(self._active)
        try:
            yield
        finally:
            with self._lock:
                self._active.remove(max_pixels)
                Image.MAX_IMAGE_PIXELS = max(self._active) if self._active else self._saved


# Pillow's bomb guard at `max_pixels` (or the largest limit of the decodes in progress).
_pixel_limit = _PixelLimits().at_least


# Pillow's warning for an image between its limit and twice it: one `_open` refuses anyway.
# Ignored for the process, once (`warnings.catch_warnings` around each decode is not safe for
# threads: one thread's exit drops another's filter).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise _over_the_limit(err, max_pixels) from None
    except UnidentifiedImageError:
        raise NotAnImage("not a recognised image format") from None
    except Exception as err:  # likewise for the header parsers
        raise CorruptImage(f"cannot read image header: {_describe(err)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    if width == 0 or height == 0:
        raise CorruptImage(f"image has no pixels ({width}x{height})")
    return image


# Pillow's refusal names the image's pixels and its own limit: twice ours (`_PixelLimits`).
BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")


def _over_the_limit(err: Image.DecompressionBombError, max_pixels: int) -> ImageTooLarge:
    """Pillow's refusal of an image past twice the limit, in our words, naming our limit
    (`input.max_pixels`), not Pillow's."""
    found = BOMB_PIXELS.search(str(err))
    size = f"{found.group(1)} pixels" if found else "the image"
    return ImageTooLarge(f"{size} exceeds the limit of {max_pixels} pixels")


def _describe(err: Exception) -> str:
    """The error's message, with its type where the message alone would not say much."""
    text = str(err)
    if isinstance(err, OSError | SyntaxError | ValueError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def to_rgb(image: Image.Image, bits_stored: int = 16) -> np.ndarray:
    """Any Pillow mode to RGB uint8: 16-bit scaled down from its `bits_stored` (12: values
    0..4095 of a 12-bit sensor or scanner in a 16-bit file), grey replicated, alpha dropped."""
    if image.mode in HIGH_BIT_MODES:
        return _grey_to_rgb(sixteen_to_eight_bits(np.asarray(image), bits_stored))
    if image.mode == "F":
        return _grey_to_rgb(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def sixteen_to_eight_bits(values: np.ndarray, bits_stored: int = 16) -> np.ndarray:
    """16-bit grey holding `bits_stored` significant bits (clipped to 0..top, top = 2^bits - 1)
    to 8 bits, `round(v * 255 / top)`, in integers: one int32 copy (4 bytes a pixel) where
    float64 took three of 8. `(v * 255 + top // 2) // top` is that rounding exactly: top is odd,
    so `v * 255 / top` is never halfway (at 16 bits, `round(v / 257)`)."""
    top = (1 << bits_stored) - 1
    wide = values.astype(np.int32)
    np.clip(wide, 0, top, out=wide)
    wide *= 255
    wide += top // 2
    wide //= top
    return wide.astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def device_jpeg_size(payload: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device can decode as is, from its header alone; None for
    anything else (other formats, CMYK, EXIF rotation, too large), which the CPU decodes."""
    if not payload.startswith(b"\xff\xd8"):
        return None
    try:
        image = Image.open(io.BytesIO(payload))
        width, height = image.size
        rotated = image.getexif().get(EXIF_ORIENTATION, 1) != 1
    except Exception:  # a broken header: the CPU path gives it its error row
        return None
    if image.format != "JPEG" or image.mode not in DEVICE_MODES or rotated:
        return None
    if not 0 < width * height <= max_pixels:
        return None
    return width, height
