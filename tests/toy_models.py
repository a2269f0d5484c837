"""Toy models whose outputs are known in advance (a detector of bright squares for the scene-merge
tests, colour classifiers and segmenters), and a toy job per task for tests/test_tasks.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
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


class BrightSquaresOnNodes(BrightSquares):
    """BrightSquares that leaves one file per call in `marks` (a folder), named by the Ray
    node the call ran on: a multi-node test tells which nodes detected. Calls wait (up to
    `wait_s`) until a call has run on another node too, so that on a loaded machine one
    actor cannot detect every tile before the other is up."""

    def __init__(self, marks: str, wait_s: float = 120.0) -> None:
        super().__init__()
        self.marks, self.wait_s = Path(marks), wait_s

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        import os
        import time

        import ray

        node = ray.get_runtime_context().get_node_id()
        (self.marks / f"{node}-{os.getpid()}-{time.monotonic_ns()}").write_text(str(len(images)))
        deadline = time.monotonic() + self.wait_s
        while not self._other_nodes(node) and time.monotonic() < deadline:
            time.sleep(0.1)
        return super().forward(images)

    def _other_nodes(self, node: str) -> set[str]:
        return {mark.name.split("-")[0] for mark in self.marks.iterdir()} - {node}


def bright_squares_on_nodes(marks: str) -> torch.nn.Module:
    return BrightSquaresOnNodes(marks)


class ColourSegmenter(torch.nn.Module):
    """Three classes per pixel from its colour (inputs 0-1, unnormalised): background (0)
    scores 0.5, red (1) the red channel, green (2) the green channel; so red and green
    squares on black are segmented exactly."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        background = torch.full_like(images[:, :1], 0.5)
        return {"out": torch.cat([background, images[:, :1], images[:, 1:2]], dim=1)}


def colour_segmenter() -> torch.nn.Module:
    return ColourSegmenter()


class NanSegmenterOnBlack(ColourSegmenter):
    """ColourSegmenter, but NaN logits for an all-black image (as float16 overflows)."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = super().forward(images)["out"]
        black = (images.amax(dim=(1, 2, 3)) == 0)[:, None, None, None]
        return {"out": torch.where(black, torch.full_like(logits, float("nan")), logits)}


def nan_segmenter_on_black() -> torch.nn.Module:
    return NanSegmenterOnBlack()


class ColourClassifier(torch.nn.Module):
    """Three classes (red, green, blue) scored by each channel's mean (inputs 0-1)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def colour_classifier() -> torch.nn.Module:
    return ColourClassifier()


class NanOnBlack(ColourClassifier):
    """ColourClassifier, but NaN logits for an all-black image (as float16 overflows)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().forward(images)
        black = images.amax(dim=(1, 2, 3)) == 0
        return torch.where(black[:, None], torch.full_like(logits, float("nan")), logits)


def nan_on_black() -> torch.nn.Module:
    return NanOnBlack()


# --- a toy job per task, for tests/test_tasks.py -----------------------------------------------

SIDE = 64  # the toy images' size, and the fixed-size models' input: no resize, no crop
SQUARE = (slice(16, 40), slice(20, 44))  # rows, columns of each image's one coloured square
# name -> (folder, colour channel): images/<folder>/<name>; a broken file joins them
TOY_IMAGES = {"red.png": ("red", 0), "green.png": ("green", 1)}
FIXED_SIZE = {"resize": SIDE, "crop": SIDE, "mean": [0.0] * 3, "std": [1.0] * 3}


def toy_images(folder: Path) -> Path:
    """images/red/red.png (a red square on black), images/green/green.png, and
    images/broken/broken.png (not an image: an error row)."""
    root = folder / "images"
    for name, (colour, channel) in TOY_IMAGES.items():
        pixels = np.zeros((SIDE, SIDE, 3), np.uint8)
        pixels[(*SQUARE, channel)] = 255
        (root / colour).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / colour / name)
    (root / "broken").mkdir(parents=True, exist_ok=True)
    (root / "broken" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


@dataclass(frozen=True)
class ToyJob:
    """A tiny job of one task whose outcome is known, over `toy_images`: tests/test_tasks.py
    runs each through run, query, report, verify and evaluate, checking the values (every task
    is also run with its record's untrained example model, values unchecked).

    model: work folder -> the spec's `model` (writing the files it names there); None: the
      task's default model.
    task: the spec's `task` settings beyond its kind.
    truth: work folder -> (--truth, --truth-format) that the toy's predictions match; None: the
      task is not scored.
    metric: (name, value) the evaluation gives with that truth.
    """

    model: Callable[[Path], dict[str, Any]] | None = None
    task: dict[str, Any] = field(default_factory=dict)
    truth: Callable[[Path], tuple[str, str]] | None = None
    metric: tuple[str, float] | None = None


TOY_JOBS: dict[str, ToyJob] = {}


def _labelled(folder: Path, entrypoint: str, labels: list[str]) -> dict[str, Any]:
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    return {
        "kind": "entrypoint",
        "entrypoint": entrypoint,
        "labels": str(folder / "labels.txt"),
        "preprocessing": FIXED_SIZE,
    }


def _coco(folder: Path) -> tuple[str, str]:
    """The red square's box (the bright-squares detector's label 1) and no box in green.png."""
    rows, columns = SQUARE
    box = [columns.start, rows.start, columns.stop - columns.start, rows.stop - rows.start]
    coco = {
        "images": [{"id": 1, "file_name": "red.png"}, {"id": 2, "file_name": "green.png"}],
        "categories": [{"id": 1, "name": "1"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": box[2] * box[3]}
            | {"iscrowd": 0}
        ],
    }
    (folder / "coco.json").write_text(json.dumps(coco))
    return str(folder / "coco.json"), "coco"


def _masks(folder: Path) -> tuple[str, str]:
    """Each image's class mask (the colour segmenter's classes: 1 red, 2 green)."""
    (folder / "truth").mkdir(exist_ok=True)
    for name, (_, channel) in TOY_IMAGES.items():
        mask = np.zeros((SIDE, SIDE), np.uint8)
        mask[SQUARE] = channel + 1
        Image.fromarray(mask).save(folder / "truth" / name)
    return str(folder / "truth"), "masks"


# --truth-format -> work folder -> (--truth, --truth-format): ground truth for `toy_images` (the
# folder names are the image-folder format's labels)
TRUTHS: dict[str, Callable[[Path], tuple[str, str]]] = {
    "imagefolder": lambda folder: ("", "imagefolder"),
    "coco": _coco,
    "masks": _masks,
}

TOY_JOBS["classification"] = ToyJob(
    model=lambda folder: _labelled(
        folder, "toy_models:colour_classifier", ["red", "green", "blue"]
    ),
    task={"top_k": 2},
    truth=TRUTHS["imagefolder"],
    metric=("accuracy", 2 / 3),  # the broken file's row counts as wrong
)
TOY_JOBS["detection"] = ToyJob(
    model=lambda folder: {"kind": "entrypoint", "entrypoint": "toy_models:bright_squares"},
    truth=TRUTHS["coco"],
    metric=("map_50", 1.0),
)
TOY_JOBS["segmentation"] = ToyJob(
    model=lambda folder: _labelled(
        folder, "toy_models:colour_segmenter", ["background", "red", "green"]
    ),
    truth=TRUTHS["masks"],
    metric=("mean_iou", 1.0),
)
# The packaged PP-OCR pair (the task's default model); the squares hold no text: ok rows, no lines.
TOY_JOBS["ocr"] = ToyJob()


class ColourEmbedder(torch.nn.Module):
    """An image's mean colour (3 features), then a head `fc` that the embedding task removes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(images.mean(dim=(2, 3)))


def colour_embedder() -> torch.nn.Module:
    return ColourEmbedder()


TOY_JOBS["embedding"] = ToyJob(
    model=lambda folder: {
        "kind": "entrypoint",
        "entrypoint": "toy_models:colour_embedder",
        "preprocessing": FIXED_SIZE,
    },
)
