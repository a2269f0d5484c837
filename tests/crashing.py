"""A model entrypoint that kills its own worker process once: for the fault tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from toy_models import BrightSquares


class CrashOnce(torch.nn.Module):
    """Average-pools the image into `classes` logits; the first call after `marker` is missing
    creates it and exits the process without cleanup, as a segfaulting or OOM-killed worker."""

    def __init__(self, marker: str, classes: int) -> None:
        super().__init__()
        self.marker, self.classes = marker, classes
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3 and not Path(self.marker).exists():  # past the warm-up probe
            Path(self.marker).touch()
            os._exit(1)
        pooled = images.mean(dim=(2, 3))  # (N, 3)
        return pooled.repeat(1, self.classes)[:, : self.classes]


def crash_once(marker: str, classes: int = 3) -> torch.nn.Module:
    return CrashOnce(marker, classes)


class Stall(torch.nn.Module):
    """Answers the warm-up probe, then hangs: a stage that makes no progress."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            time.sleep(3600)
        return images.mean(dim=(2, 3))


def stall() -> torch.nn.Module:
    return Stall()


# What a model says on a device it has lost (CUDA's own words).
DEVICE_LOST = "CUDA error: an illegal memory access was encountered"


class LoseDevice(torch.nn.Module):
    """Answers the warm-up probe and the first batch, then fails every call, as a model on a
    device that stopped answering."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError(DEVICE_LOST)
        return images.mean(dim=(2, 3))


def lose_device() -> torch.nn.Module:
    return LoseDevice()


class SlowOnNodes(torch.nn.Module):
    """Average-pools like CrashOnce, slowly, noting the id of the node of each call in `marks`
    (a folder): the node-loss test removes a node once a call has run there."""

    def __init__(self, marks: str, classes: int, seconds: float) -> None:
        super().__init__()
        self.marks, self.classes, self.seconds = Path(marks), classes, seconds

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        import ray

        node = ray.get_runtime_context().get_node_id()
        (self.marks / f"{node}-{os.getpid()}-{time.monotonic_ns()}").write_text(node)
        time.sleep(self.seconds)
        pooled = images.mean(dim=(2, 3))
        return pooled.repeat(1, self.classes)[:, : self.classes]


def slow_on_nodes(marks: str, classes: int = 3, seconds: float = 0.2) -> torch.nn.Module:
    return SlowOnNodes(marks, classes, seconds)


class CountImages(torch.nn.Module):
    """Average-pools like CrashOnce, slowly, leaving one file per call in `marks` (a folder)
    that holds the number of images of the call (the warm-up probe's black image is not
    counted: it is one flat colour): the resume test counts what a run sent to the model."""

    def __init__(self, marks: str, classes: int, seconds: float) -> None:
        super().__init__()
        self.marks, self.classes, self.seconds = Path(marks), classes, seconds

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.count(images)
        pooled = images.mean(dim=(2, 3))
        return pooled.repeat(1, self.classes)[:, : self.classes]

    def count(self, images: torch.Tensor) -> None:
        if images.std() > 0:
            name = f"{os.getpid()}-{time.monotonic_ns()}"
            (self.marks / name).write_text(str(images.shape[0]))
            time.sleep(self.seconds)


def count_images(marks: str, classes: int = 3, seconds: float = 0.2) -> torch.nn.Module:
    return CountImages(marks, classes, seconds)


class CountSegments(CountImages):
    """CountImages as a segmenter: three classes per pixel, background (0.5), the first and the
    second channel."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        self.count(images)
        background = torch.full_like(images[:, :1], 0.5)
        return {"out": torch.cat([background, images[:, :1], images[:, 1:2]], dim=1)}


def count_segments(marks: str, seconds: float = 0.2) -> torch.nn.Module:
    return CountSegments(marks, 3, seconds)


class CountSquares(BrightSquares):
    """BrightSquares, slowly, leaving one file per call in `marks` that holds the number of
    its images with any contrast (the warm-up probe's flat image is not counted)."""

    def __init__(self, marks: str, seconds: float) -> None:
        super().__init__()
        self.marks, self.seconds = Path(marks), seconds

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        counted = sum(1 for image in images if image.std() > 0)
        if counted:
            (self.marks / f"{os.getpid()}-{time.monotonic_ns()}").write_text(str(counted))
            time.sleep(self.seconds)
        return super().forward(images)


def count_squares(marks: str, seconds: float = 0.2) -> torch.nn.Module:
    return CountSquares(marks, seconds)
