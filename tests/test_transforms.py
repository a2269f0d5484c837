"""The CPU geometry equals torchvision's Resize + CenterCrop on a PIL image, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from vision_ops.config import Preprocessing
from vision_ops.transforms import center_crop, resize_and_crop

MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@pytest.mark.parametrize(
    ("height", "width", "resize", "crop", "interpolation"),
    [
        (300, 451, 256, 224, "bilinear"),
        (451, 300, 232, 224, "bilinear"),
        (97, 97, 256, 224, "bicubic"),
        (480, 640, 224, 224, "nearest"),
        (50, 120, 40, 64, "bilinear"),  # crop larger than the resized image: zero padding
        (33, 17, 17, 20, "bilinear"),
    ],
)
def test_equals_torchvision(height, width, resize, crop, interpolation) -> None:
    rng = np.random.default_rng(height * width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    spec = Preprocessing(resize=resize, crop=crop, interpolation=interpolation, **MEAN_STD)
    mode = transforms.InterpolationMode(interpolation)
    reference = transforms.Compose(
        [transforms.Resize(resize, interpolation=mode), transforms.CenterCrop(crop)]
    )(Image.fromarray(image))
    result = resize_and_crop(image, spec)
    assert result.shape == (crop, crop, 3) and result.dtype == np.uint8
    np.testing.assert_array_equal(result, np.asarray(reference))


def test_center_crop_offsets() -> None:
    image = np.arange(5 * 6).reshape(5, 6, 1).repeat(3, axis=2).astype(np.uint8)
    np.testing.assert_array_equal(center_crop(image, 3)[:, :, 0], image[1:4, 2:5, 0])
