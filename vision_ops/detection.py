"""Detection specifics: the model's own thresholds, pixel-budget batches, and the box filters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vision_ops.tasks import DetectionTask

# Where torchvision detectors keep their post-processing settings: Faster R-CNN in roi_heads
# (score_thresh, nms_thresh, detections_per_img), RetinaNet / FCOS / SSD on the model itself.
HEAD_ATTRIBUTES = ("roi_heads", None)
# A key a detector's per-image output may add: whether its raw predictions, before its score
# threshold dropped NaN scores, were all finite (the output adapters add it).
RAW_FINITE = "raw_finite"


def configure_detector(module: torch.nn.Module, task: DetectionTask, keep_all: bool) -> None:
    """Set the model's score threshold, NMS IoU and per-image cap from the task.

    With `keep_all` (a class allow-list is applied afterwards) the model's cap is left at least
    at its own default, so allowed boxes are not crowded out by classes filtered later.
    """
    head: Any = _postprocess_owner(module)
    if head is None:
        return
    head.score_thresh = just_below(task.score_threshold)
    if task.nms_iou is not None:
        head.nms_thresh = task.nms_iou
    own_cap = int(getattr(head, "detections_per_img", task.max_detections))
    head.detections_per_img = max(own_cap, task.max_detections) if keep_all else task.max_detections


def just_below(threshold: float) -> float:
    """The float32 just under `threshold`: torchvision keeps scores strictly above its
    threshold, the task keeps scores at or above it (ties at the threshold stay)."""
    if threshold <= 0:
        return threshold
    return float(np.nextafter(np.float32(threshold), np.float32(0)))


def _postprocess_owner(module: torch.nn.Module) -> torch.nn.Module | None:
    for name in HEAD_ATTRIBUTES:
        owner = getattr(module, name, None) if name else module
        if owner is not None and hasattr(owner, "score_thresh"):
            return owner
    return None


def pixel_budget_groups(shapes: Sequence[tuple[int, int]], budget: int) -> list[list[int]]:
    """Indices grouped for model calls: same-size images together, each call within `budget`
    pixels (a single image larger than the budget goes alone).

    Grouping by size keeps every image's result independent of its batch-mates: detectors pad
    a batch to its largest image, which would otherwise change a smaller image's features.
    """
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(index)
    groups: list[list[int]] = []
    for (height, width), indices in by_shape.items():
        per_call = max(1, budget // (height * width))
        groups += [indices[i : i + per_call] for i in range(0, len(indices), per_call)]
    return groups


def filter_detections(
    detections: np.ndarray, task: DetectionTask, allowed_ids: frozenset[int] | None
) -> np.ndarray:
    """(boxes, 6) rows of label_id, score, x_min, y_min, x_max, y_max: threshold, allow-list,
    then the best `max_detections` by score."""
    return detections[kept_indices(detections, task, allowed_ids)]


def kept_indices(
    detections: np.ndarray, task: DetectionTask, allowed_ids: frozenset[int] | None
) -> np.ndarray:
    """The rows `filter_detections` keeps, in its order (to pick a box's mask or keypoints)."""
    keep = detections[:, 1] >= task.score_threshold
    if allowed_ids is not None:
        keep &= np.isin(detections[:, 0].astype(np.int64), list(allowed_ids))
    candidates = np.flatnonzero(keep)
    order = np.argsort(-detections[candidates, 1], kind="stable")
    return candidates[order][: task.max_detections]


def as_rows(output: dict[str, torch.Tensor]) -> np.ndarray:
    """A torchvision detector's per-image dict -> float32 (boxes, 6) rows."""
    labels = output["labels"].float().unsqueeze(1)
    scores = output["scores"].float().unsqueeze(1)
    rows = torch.cat([labels, scores, output["boxes"].float()], dim=1)
    return rows.cpu().numpy().astype(np.float32, copy=False)


# Instance outputs some torchvision detectors add to each box, by architecture prefix.
INSTANCE_OUTPUTS = {"maskrcnn": "mask", "keypointrcnn": "keypoints"}
MASK_THRESHOLD = 0.5  # torchvision's mask probabilities -> a binary mask, as its docs do


def instance_output(architecture: str | None) -> str | None:
    """`mask`, `keypoints` or None: what the detector gives per box beyond the box."""
    for prefix, output in INSTANCE_OUTPUTS.items():
        if architecture and architecture.startswith(prefix):
            return output
    return None


def mask_rles(output: dict[str, torch.Tensor], kept: np.ndarray) -> list[dict[str, object]]:
    """The `kept` boxes' masks, thresholded, as COCO run-length encoding ({size, counts})."""
    from pycocotools import mask as coco_mask

    chosen = output["masks"][torch.as_tensor(kept, dtype=torch.long), 0]
    binary = (chosen > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
    encoded = coco_mask.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return [{"size": list(rle["size"]), "counts": rle["counts"].decode()} for rle in encoded]


def keypoint_arrays(output: dict[str, torch.Tensor]) -> np.ndarray:
    """(boxes, K, 3): each keypoint's x, y (source pixels) and score."""
    points = output["keypoints"][:, :, :2].float()
    scores = output["keypoints_scores"].float().unsqueeze(-1)
    return torch.cat([points, scores], dim=-1).cpu().numpy().astype(np.float32)
