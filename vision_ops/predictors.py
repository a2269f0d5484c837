"""Predictors: plain callable classes that load a model once and score one uint8 batch a call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from vision_ops.config import JobSpec, Preprocessing
from vision_ops.models import LoadedModel, ModelError, load_model
from vision_ops.registry import Registry
from vision_ops.schema import STATUS_OK, TOP_K_IDS, TOP_K_SCORES

PREDICTORS: Registry[type] = Registry("task")


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


@PREDICTORS.register("classification")
class Classifier:
    """Top-k classification. `__call__` takes the reader's columns and adds the top-k columns."""

    def __init__(self, spec: JobSpec) -> None:
        self.model: LoadedModel = load_model(spec.model, spec.storage_options)
        self.device = pick_device(spec.runtime.device)
        self.module = self.model.module.to(self.device)
        self.autocast = spec.runtime.autocast
        self.num_classes = self._count_outputs()
        self.top_k = min(spec.task.top_k, self.num_classes)
        self._check_labels()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["status"] == STATUS_OK
        rows = len(ok)
        ids = np.full((rows, self.top_k), -1, dtype=np.int32)
        scores = np.full((rows, self.top_k), np.nan, dtype=np.float32)
        if ok.any():
            ids[ok], scores[ok] = self.predict(batch["image"][ok])
        out = {name: values for name, values in batch.items() if name != "image"}
        out[TOP_K_IDS] = ids
        out[TOP_K_SCORES] = scores
        out["model_name"] = np.full(rows, self.model.name, dtype=object)
        out["model_weights_sha256"] = np.full(rows, self.model.weights_sha256, dtype=object)
        return out

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> top-k class ids and softmax scores."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            logits = self.module(normalise(pixels, self.model.preprocessing))
        top = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
        return top.indices.int().cpu().numpy(), top.values.cpu().numpy()

    def _count_outputs(self) -> int:
        size = self.model.preprocessing.crop
        probe = np.zeros((1, size, size, 3), dtype=np.uint8)
        pixels = torch.from_numpy(probe).to(self.device)
        with torch.inference_mode():
            logits = self.module(normalise(pixels, self.model.preprocessing))
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

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast == "off" or self.device.type != "cuda":
            yield
            return
        with torch.autocast("cuda", dtype=getattr(torch, self.autocast)):
            yield
