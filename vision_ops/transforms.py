"""Model-input geometry on the CPU: resize the shorter side, then centre-crop (numpy + Pillow).

The arithmetic is torchvision's (`transforms.Resize(n)` then `CenterCrop(m)` on a PIL image), so
the pipeline's inputs equal a direct torchvision call's bit for bit, without importing torch in
the read workers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vision_ops.config import Preprocessing

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def resize_and_crop(image: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (crop, crop, 3) uint8."""
    resized = resize_shorter_side(Image.fromarray(image), spec.resize, spec.interpolation)
    return center_crop(np.asarray(resized, dtype=np.uint8), spec.crop)


def resize_shorter_side(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size == image.size:
        return image
    return image.resize(new_size, RESAMPLING[interpolation])


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """A centred size x size window; an image smaller than that is zero-padded around."""
    height, width = image.shape[:2]
    if size > height or size > width:
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        padding = ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        image = np.pad(image, padding)
        height, width = image.shape[:2]
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return np.ascontiguousarray(image[top : top + size, left : left + size])
