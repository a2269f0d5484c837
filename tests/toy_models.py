"""A detector whose boxes are known in advance: for the scene-merge tests."""

from __future__ import annotations

import numpy as np
import torch
from skimage.measure import label, regionprops


class BrightSquares(torch.nn.Module):
    """One box per connected bright region (first channel > 0.5), label 1, scored by area
    (area / (area + 100)), so a whole object outscores a part of it cut by a tile's edge."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self._detect(image) for image in images]

    def _detect(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        regions = regionprops(label(image[0].cpu().numpy() > 0.5))
        boxes = [(r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in regions]
        areas = np.array([r.area for r in regions], dtype=np.float32)
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.ones(len(boxes), dtype=torch.int64),
            "scores": torch.from_numpy(areas / (areas + 100)),
        }


def bright_squares() -> torch.nn.Module:
    return BrightSquares()


class ColourSegmenter(torch.nn.Module):
    """Three classes per pixel from its colour (inputs 0-1, unnormalised): background (0)
    scores 0.5, red (1) the red channel, green (2) the green channel; so red and green
    squares on black are segmented exactly."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        background = torch.full_like(images[:, :1], 0.5)
        return {"out": torch.cat([background, images[:, :1], images[:, 1:2]], dim=1)}


def colour_segmenter() -> torch.nn.Module:
    return ColourSegmenter()
