"""The embedder: a classifier with its head removed, giving each unit's pooled features,
L2-normalised (the rows: vision_ops.embedding).

Removing the head, per architecture family: the classifier's last `nn.Linear` becomes
`nn.Identity`, so the model returns what that layer took in: the pooled (and, where the family
has them, normalised or pre-logit) features, D = its `in_features`. The head is looked up at
the first of these attributes the model has (HEAD_ATTRIBUTES):

- `fc` (a Linear): ResNet, ResNeXt, Wide ResNet, RegNet, ShuffleNet V2, GoogLeNet, Inception V3;
- `classifier`, a Linear: DenseNet; or an nn.Sequential ending in one (only that last Linear
  goes; dropout is inert in eval): MobileNet V2 / V3, EfficientNet / V2, MNASNet, ConvNeXt (its
  LayerNorm and Flatten stay), VGG and AlexNet (the 4096-d fc7 features), MaxViT;
- `heads` (a Sequential ending in a Linear): ViT; `head` (a Linear): Swin;
- `_fc` (a Linear): EfficientNet-Lite (efficientnet-lite-pytorch, vision_ops.zoo) and the
  lukemelas EfficientNet-PyTorch family.

A model without one of these (SqueezeNet's head is a convolution; a TorchScript or ONNX file
cannot be edited) is refused with HeadNotFound before any work: `check_job` builds the
architecture without weights (on the meta device, no memory) and removes its head.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from vision_ops.config import EntrypointModel, JobSpec, ModelSpec, TorchvisionModel
from vision_ops.embedding import VECTORS, sized_fields
from vision_ops.errors import ModelError
from vision_ops.models import (
    _entrypoint_function,
    _torchvision_builder,
    _untrained_kwargs,
)
from vision_ops.predictors import Pixels, Predictor, rows_of, stack_on_device, upload

HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head", "_fc")


class HeadNotFound(ModelError):
    """A model whose classification head cannot be found, so it cannot give embeddings."""


def find_head(module: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Linear]:
    """The classification head's final Linear, as (its parent, its name there, the layer)."""
    for name in HEAD_ATTRIBUTES:
        head = module._modules.get(name)
        if head is None:
            continue
        if isinstance(head, torch.nn.Linear):
            return module, name, head
        # by name: a Sequential of named layers (ViT's `heads.head`) is not indexed by "0"
        layers = list(head.named_children()) if isinstance(head, torch.nn.Sequential) else []
        last_name, last = layers[-1] if layers else ("", head)
        if isinstance(last, torch.nn.Linear):
            return head, last_name, last
        raise HeadNotFound(
            f"{type(module).__name__}.{name}: expected the classification head to be an "
            f"nn.Linear or an nn.Sequential ending in one, found {type(head).__name__} ending "
            f"in {type(last).__name__}"
        )
    children = ", ".join(module._modules) or "none"
    raise HeadNotFound(
        f"{type(module).__name__}: no classification head found; expected a final nn.Linear "
        f"at one of {', '.join(HEAD_ATTRIBUTES)} (or an nn.Sequential there ending in one), "
        f"found the children {children}"
    )


def remove_head(module: torch.nn.Module) -> int:
    """Replace the model's head Linear with Identity, in place; returns D, its in_features."""
    parent, name, linear = find_head(module)
    setattr(parent, name, torch.nn.Identity())
    return int(linear.in_features)


def feature_size(spec: ModelSpec) -> int:
    """D of the spec's model, without its weights: the architecture built on the meta device
    (on the CPU, untrained, where a builder computes with tensors), its head removed.
    HeadNotFound / ModelError if it cannot give embeddings."""
    if not isinstance(spec, TorchvisionModel | EntrypointModel):
        raise ModelError(
            f"model.kind: embedding needs a torchvision or entrypoint model (a module whose "
            f"head is replaced), found {spec.kind}"
        )
    try:
        with _quiet(), torch.device("meta"):
            skeleton = _skeleton(spec)
    except (NotImplementedError, RuntimeError):  # e.g. RegNet computes widths with tensors
        with _quiet():
            skeleton = _skeleton(spec)
    return remove_head(skeleton)


def job_fields(spec: JobSpec) -> tuple[pa.Field, ...]:
    """The embedding columns of a job: the vector sized for its model."""
    return sized_fields(feature_size(spec.model))


def _skeleton(spec: TorchvisionModel | EntrypointModel) -> torch.nn.Module:
    if isinstance(spec, TorchvisionModel):
        builder = _torchvision_builder(spec.architecture, "embedding")
        return builder(
            weights=None, **_untrained_kwargs(spec.num_classes, "embedding"), **spec.kwargs
        )
    module = _entrypoint_function(spec.entrypoint)(**spec.kwargs)
    if not isinstance(module, torch.nn.Module):
        raise ModelError(
            f"model.entrypoint: {spec.entrypoint} returned {type(module).__name__}, "
            "expected a torch.nn.Module"
        )
    return module


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings from building a skeleton (torchvision's init notices; weights loaded into
    meta tensors are dropped on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Embedder(Predictor):
    """The model without its head: one L2-normalised float32 vector of D features per unit."""

    task = "embedding"

    def __init__(self, spec: JobSpec, threads: int | None = None) -> None:
        super().__init__(spec, threads)
        self.dim = remove_head(self.module)
        self.preprocessing = self.fixed_size("embedder")
        found = tuple(self.probe().shape)
        if found != (1, self.dim):
            raise ModelError(
                f"model: without its head the model gives {found} per image, expected "
                f"(1, {self.dim}) pooled features"
            )

    def predict_rows(self, images: Sequence[Pixels], ok: np.ndarray) -> dict[str, np.ndarray]:
        vectors = np.full((len(ok), self.dim), np.nan, dtype=np.float32)
        if ok.any():
            vectors[ok] = self.embed(stack_on_device(rows_of(images, ok), self.device))
        return {VECTORS: vectors}

    def embed(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, H, W, 3), on the host or the device -> float32 (N, D), each of norm 1."""
        pixels = upload(images, self.device) if isinstance(images, np.ndarray) else images
        with self.inference():
            features = self.run_fixed(pixels)
        normalised = torch.nn.functional.normalize(features.float(), dim=1)
        return np.asarray(normalised.cpu().numpy(), dtype=np.float32)
