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
