"""Model-input geometry on the CPU (resize, centre crop) and normalisation on the device."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from vision_ops.config import Preprocessing

INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def resize_and_crop(image: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (crop, crop, 3) uint8, as torchvision's classification transforms.

    Resizing goes through Pillow exactly as `weights.transforms()` does on a PIL image, so the
    pipeline's inputs equal a direct torchvision call's bit for bit.
    """
    pil = Image.fromarray(image)
    resized = F.resize(pil, [spec.resize], interpolation=INTERPOLATIONS[spec.interpolation])
    cropped = F.center_crop(resized, [spec.crop])
    return np.asarray(cropped, dtype=np.uint8)


def normalise(batch: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """uint8 (N, H, W, 3) on the device -> float32 (N, 3, H, W), scaled to 0-1 and standardised."""
    images = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=batch.device).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)
