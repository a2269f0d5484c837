"""Detectors outside torchvision (YOLO-style TorchScript or ONNX) behind torchvision's detector
interface: letterbox in, raw output decoded by a registered layout, boxes back in source pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision

from vision_ops.config import OutputAdapter
from vision_ops.detection import RAW_FINITE
from vision_ops.registry import Registry

# A layout decoder: one image's raw output -> (boxes xyxy in letterboxed pixels, scores, labels).
LayoutDecoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
LAYOUTS: Registry[LayoutDecoder] = Registry("output layout")


@LAYOUTS.register("yolo")
def decode_yolo(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(4 + classes, cells): centre x, centre y, width, height, then one score per class (the
    anchor-free layout of YOLOv8 and later); each cell's best class is its label."""
    cells = raw.float().T
    centre, size = cells[:, :2], cells[:, 2:4]
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    scores, labels = cells[:, 4:].max(dim=1)
    return boxes, scores, labels


def letterbox_geometry(height: int, width: int, side: int) -> tuple[float, int, int, int, int]:
    """(scale, resized height, resized width, top pad, left pad) fitting an image in a square:
    scale = min(side / height, side / width), the image centred, pads rounded down."""
    scale = min(side / height, side / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return scale, new_h, new_w, (side - new_h) // 2, (side - new_w) // 2


def letterbox(image: torch.Tensor, side: int, pad_value: int) -> torch.Tensor:
    """A (3, H, W) 0-1 image resized (bilinear) into a side x side square, padded grey."""
    _, height, width = image.shape
    _, new_h, new_w, top, left = letterbox_geometry(height, width, side)
    resized = torch.nn.functional.interpolate(
        image[None], size=(new_h, new_w), mode="bilinear", align_corners=False
    )[0]
    canvas = torch.full((3, side, side), pad_value / 255.0, dtype=image.dtype, device=image.device)
    canvas[:, top : top + new_h, left : left + new_w] = resized
    return canvas


def to_source_pixels(boxes: torch.Tensor, height: int, width: int, side: int) -> torch.Tensor:
    """Letterboxed xyxy boxes back in the source image: x = (x' - left) / scale, clipped."""
    scale, _, _, top, left = letterbox_geometry(height, width, side)
    offset = torch.tensor([left, top, left, top], dtype=boxes.dtype, device=boxes.device)
    mapped = (boxes - offset) / scale
    limit = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(mapped.clamp(min=0), limit)


class AdaptedDetector(torch.nn.Module):
    """torchvision's detector call: a list of (3, H, W) 0-1 images in, one dict of boxes,
    labels, scores per image out (and RAW_FINITE: whether the raw predictions were all
    finite; NaN scores fail the threshold). `score_thresh`, `nms_thresh` and
    `detections_per_img` are set from the task like a torchvision detector's."""

    def __init__(self, inner: Any, adapter: OutputAdapter) -> None:
        super().__init__()
        self.inner, self.adapter = inner, adapter
        self.decode = LAYOUTS.get(adapter.layout)
        self.score_thresh, self.nms_thresh, self.detections_per_img = 0.25, adapter.nms_iou, 300

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        side = self.adapter.input_size
        batch = torch.stack([letterbox(image, side, self.adapter.pad_value) for image in images])
        raw = self.inner(batch)
        return [
            self._detections(raw[index], image.shape[1], image.shape[2])
            for index, image in enumerate(images)
        ]

    def _detections(self, raw: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        boxes, scores, labels = self.decode(raw)
        keep = scores > self.score_thresh
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        kept = torchvision.ops.batched_nms(boxes, scores, labels, self.nms_thresh)
        kept = kept[: self.detections_per_img]
        side = self.adapter.input_size
        return {
            "boxes": to_source_pixels(boxes[kept], height, width, side),
            "scores": scores[kept],
            "labels": labels[kept].long(),
            RAW_FINITE: torch.isfinite(raw).all(),
        }


class OnnxModule(torch.nn.Module):
    """An onnxruntime session called like a module: one float32 NCHW batch in, the first output
    out as a tensor (on the CPU provider here; the GPU build's CUDA provider on GPU nodes)."""

    def __init__(self, model_bytes: bytes) -> None:
        super().__init__()
        # torch's thread count, which the actor set to its share of the node: onnxruntime's
        # default would take every core of the node in each actor
        self.session = onnx_session(model_bytes, threads=torch.get_num_threads())
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (output, *_) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(output)


def onnx_session(model_bytes: bytes, threads: int | None = None, device: str = "auto") -> Any:
    """An onnxruntime session for a model file's bytes: on the CUDA provider where the installed
    build has one (onnxruntime-gpu on GPU nodes) and `device` is not cpu, else the CPU;
    `threads` intra-op threads (None: onnxruntime's default). ImportError without onnxruntime."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    wanted = ["CPUExecutionProvider"]
    if device != "cpu":
        wanted.insert(0, "CUDAExecutionProvider")
    providers = [p for p in wanted if p in onnxruntime.get_available_providers()]
    return onnxruntime.InferenceSession(model_bytes, sess_options=options, providers=providers)


def check_layout(adapter: OutputAdapter | None) -> None:
    if adapter is not None:
        LAYOUTS.get(adapter.layout)  # a registry error names the known layouts
