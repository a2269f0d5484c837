"""Predictors: plain callable classes that load a model once and score one uint8 batch a call."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

from vision_ops.config import ClassificationTask, DetectionTask, JobSpec, Preprocessing
from vision_ops.detection import (
    as_rows,
    configure_detector,
    instance_output,
    kept_indices,
    keypoint_arrays,
    mask_rles,
    pixel_budget_groups,
)
from vision_ops.models import LoadedModel, ModelError, class_ids, load_model
from vision_ops.registry import Registry
from vision_ops.schema import (
    DETECTIONS,
    INSTANCE_COLUMN,
    SEGMENT_FRACTIONS,
    SEGMENT_MASK,
    STAGE_PREFIX,
    STATUS_OK,
    TOP_K_IDS,
    TOP_K_SCORES,
    stage_times,
)

PREDICTORS: Registry[type[Predictor]] = Registry("task")
TaskT = TypeVar("TaskT", ClassificationTask, DetectionTask)


def task_settings(spec: JobSpec, kind: type[TaskT]) -> TaskT:
    """The spec's task, checked to be the one a predictor handles."""
    if not isinstance(spec.task, kind):
        raise ModelError(f"task.kind: expected {kind.__name__}, found {type(spec.task).__name__}")
    return spec.task


def normalise(batch: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """uint8 (N, H, W, 3) on the device -> float32 (N, 3, H, W), scaled to 0-1 and standardised."""
    images = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=batch.device).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


def pick_device(requested: str) -> torch.device:
    """`auto` is cuda when this process sees a GPU, else cpu; `cuda` without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is cuda but this worker sees no GPU")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


class Predictor:
    """Loads the spec's model on the actor's device; subclasses score the ok rows of a batch."""

    task = ""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.model: LoadedModel = load_model(spec.model, spec.storage_options, self.task)
        self.device = pick_device(spec.runtime.device)
        self.module = self.model.module.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        ok = np.asarray(batch["status"] == STATUS_OK, dtype=bool)
        out = {name: values for name, values in batch.items() if name != "image"}
        out.update(self.predict_rows(batch["image"], ok))
        out[f"{STAGE_PREFIX}inference"] = stage_times(len(ok), time.perf_counter() - started)
        out["model_name"] = np.full(len(ok), self.model.name, dtype=object)
        out["model_weights_sha256"] = np.full(len(ok), self.model.weights_sha256, dtype=object)
        return out

    def predict_rows(self, images: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """No autograd; mixed precision where the spec asks for it and the device is a GPU."""
        mode = self.spec.runtime.autocast
        with torch.inference_mode():
            if mode == "off" or self.device.type != "cuda":
                yield
                return
            with torch.autocast("cuda", dtype=getattr(torch, mode)):
                yield


@PREDICTORS.register("classification")
class Classifier(Predictor):
    """Top-k classification of fixed-size crops; adds top-k id and score columns."""

    task = "classification"

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        if self.model.preprocessing is None:
            raise ModelError("model.preprocessing: a classifier needs resize, crop, mean, std")
        self.preprocessing: Preprocessing = self.model.preprocessing
        self.num_classes = self._count_outputs()
        self.top_k = min(task_settings(spec, ClassificationTask).top_k, self.num_classes)
        self._check_labels()

    def predict_rows(self, images: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.full((len(ok), self.top_k), -1, dtype=np.int32)
        scores = np.full((len(ok), self.top_k), np.nan, dtype=np.float32)
        if ok.any():
            ids[ok], scores[ok] = self.predict(np.stack(list(images[ok])))
        return {TOP_K_IDS: ids, TOP_K_SCORES: scores}

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> top-k class ids and softmax scores."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        with self.inference():
            logits = self.module(normalise(pixels, self.preprocessing))
        top = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
        return top.indices.int().cpu().numpy(), top.values.cpu().numpy()

    def _count_outputs(self) -> int:
        size = self.preprocessing.crop
        probe = torch.zeros((1, size, size, 3), dtype=torch.uint8, device=self.device)
        with torch.inference_mode():
            logits = self.module(normalise(probe, self.preprocessing))
        if logits.ndim != 2:
            raise ModelError(f"expected logits of shape (N, classes), found {tuple(logits.shape)}")
        return int(logits.shape[1])

    def _check_labels(self) -> None:
        labels = self.model.labels
        if labels is not None and len(labels) < self.num_classes:
            raise ModelError(
                f"model.labels: the model has {self.num_classes} outputs, found only "
                f"{len(labels)} labels"
            )


@PREDICTORS.register("detection")
class Detector(Predictor):
    """Boxes for images of any size, in source pixels; adds one (boxes, 6) array per row."""

    task = "detection"

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.settings = task_settings(spec, DetectionTask)
        self.allowed_ids = class_ids(self.settings.classes, self.model.labels)
        self.instance = instance_output(getattr(spec.model, "architecture", None))
        configure_detector(self.module, self.settings, keep_all=self.allowed_ids is not None)

    def predict_rows(self, images: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
        detections = np.empty(len(ok), dtype=object)
        extras = np.empty(len(ok), dtype=object)
        for index in range(len(ok)):
            detections[index] = np.zeros((0, 6), dtype=np.float32)
        rows = np.flatnonzero(ok)
        shapes = [(images[i].shape[0], images[i].shape[1]) for i in rows]
        for group in pixel_budget_groups(shapes, self.settings.max_batch_pixels):
            members = rows[group]
            for index, output in zip(
                members, self.detect([images[i] for i in members]), strict=True
            ):
                found = as_rows(output)
                kept = kept_indices(found, self.settings, self.allowed_ids)
                detections[index] = found[kept]
                extras[index] = self._instance_extras(output, kept)
        out = {DETECTIONS: detections}
        if self.instance is not None:
            out[INSTANCE_COLUMN] = extras
        return out

    def detect(self, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """uint8 (H, W, 3) images of one size -> the model's per-image outputs, source pixels."""
        tensors = [self._to_tensor(image) for image in images]
        with self.inference():
            outputs = self.module(tensors)
        if isinstance(outputs, tuple):  # scripted torchvision detectors: (losses, detections)
            outputs = outputs[1]
        return list(outputs)

    def _instance_extras(self, output: dict[str, torch.Tensor], kept: np.ndarray) -> object:
        """The kept boxes' masks (JSON list of COCO RLEs) or keypoints ((boxes, K, 3) array)."""
        if self.instance == "mask":
            return json.dumps(mask_rles(output, kept))
        if self.instance == "keypoints":
            return keypoint_arrays(output)[kept]
        return None

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float (3, H, W) in 0-1 on the device (the model normalises)."""
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, non_blocking=True)
        return pixels.permute(2, 0, 1).float().div_(255.0)


@PREDICTORS.register("segmentation")
class Segmenter(Predictor):
    """A class per pixel of each model-input crop; adds its mask and class fractions."""

    task = "segmentation"

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        if self.model.preprocessing is None:
            raise ModelError("model.preprocessing: a segmenter needs resize, crop, mean, std")
        self.preprocessing: Preprocessing = self.model.preprocessing

    def predict_rows(self, images: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
        masks = np.empty(len(ok), dtype=object)
        fractions = np.empty(len(ok), dtype=object)
        for index in range(len(ok)):
            masks[index] = np.zeros((0, 0), dtype=np.uint8)
            fractions[index] = np.zeros((0, 2), dtype=np.float32)
        if ok.any():
            found = self.segment(np.stack(list(images[ok])))
            for row, mask in zip(np.flatnonzero(ok), found, strict=True):
                masks[row], fractions[row] = mask, class_fractions(mask)
        return {SEGMENT_MASK: masks, SEGMENT_FRACTIONS: fractions}

    def segment(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> the argmax class of each pixel, (N, H, W) uint8 or uint16."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        with self.inference():
            output = self.module(normalise(pixels, self.preprocessing))
        logits = output["out"] if isinstance(output, dict) else output
        classes = logits.argmax(dim=1).cpu().numpy()
        return classes.astype(np.uint8 if logits.shape[1] <= 256 else np.uint16)


def class_fractions(mask: np.ndarray) -> np.ndarray:
    """float32 (classes present, 2): label_id and share of the pixels, largest share first."""
    counts = np.bincount(mask.ravel().astype(np.int64))
    present = np.flatnonzero(counts)
    order = present[np.argsort(-counts[present], kind="stable")]
    shares = counts[order] / mask.size
    return np.stack([order, shares], axis=1).astype(np.float32)
