"""The benchmark's model: a torchvision classifier (ResNet-18 unless the bench names another)
with seeded random weights in a state_dict file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision

DEFAULT_ARCHITECTURE = "resnet18"
TOP_K = 5


def classification_architectures() -> list[str]:
    """torchvision's ImageNet classifiers (the models the bench can time), by builder name."""
    return torchvision.models.list_models(module=torchvision.models)


def weights_file(workdir: Path, architecture: str, seed: int) -> Path:
    """A state_dict of `architecture` with weights drawn from `seed` (no hub download), made
    once."""
    path = workdir / "weights" / f"{architecture}-seed{seed}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        partial = path.with_suffix(f".{os.getpid()}.part")
        torch.save(torchvision.models.get_model(architecture).state_dict(), partial)
        partial.replace(path)
    return path


def plain_model(weights: Path, architecture: str, device: torch.device) -> torch.nn.Module:
    """The same network the pipeline loads, built the way a plain PyTorch script builds it."""
    model = torchvision.models.get_model(architecture)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval().to(device)


def top_k(logits: torch.Tensor, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """(N, classes) logits -> int32 class ids and float32 softmax scores, best first."""
    top = logits.float().softmax(dim=-1).topk(k, dim=-1)
    return top.indices.int().cpu().numpy(), top.values.cpu().numpy()


@contextlib.contextmanager
def inference(device: torch.device, autocast: str) -> Iterator[None]:
    """No autograd; the job's mixed precision on a GPU (as the pipeline's predictor does)."""
    with torch.inference_mode():
        if autocast == "off" or device.type != "cuda":
            yield
            return
        with torch.autocast("cuda", dtype=getattr(torch, autocast)):
            yield
