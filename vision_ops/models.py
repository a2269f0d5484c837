"""Classification models by kind (torchvision, TorchScript, entrypoint), with weights and labels."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision

from vision_ops.config import (
    EntrypointModel,
    ModelSpec,
    Preprocessing,
    TorchScriptModel,
    TorchvisionModel,
)
from vision_ops.registry import Registry
from vision_ops.storage import StorageOptions, read_bytes

WEIGHTS_ENUM_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
BUILTIN_LABELS = {"imagenet-1k": lambda: list(torchvision.models._meta._IMAGENET_CATEGORIES)}


class ModelError(ValueError):
    """A model the spec names that cannot be built or loaded; says what was expected."""


@dataclass(frozen=True)
class BuiltModel:
    """What a model kind's builder returns."""

    module: torch.nn.Module
    weights_sha256: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict, with the identity written to every row."""

    module: torch.nn.Module
    name: str
    weights_sha256: str
    labels: list[str] | None
    preprocessing: Preprocessing


ModelBuilder = Callable[[Any, StorageOptions], BuiltModel]
MODEL_KINDS: Registry[ModelBuilder] = Registry("model kind")


def load_model(spec: ModelSpec, options: StorageOptions | None = None) -> LoadedModel:
    """Build the model on the CPU in eval mode, with its labels and preprocessing."""
    options = options or {}
    built = MODEL_KINDS.get(spec.kind)(spec, options)
    module = built.module.eval()
    return LoadedModel(
        module=module,
        name=model_name(spec),
        weights_sha256=built.weights_sha256 or state_dict_sha256(module),
        labels=resolve_labels(spec, options),
        preprocessing=resolve_preprocessing(spec),
    )


def check_model(spec: ModelSpec) -> None:
    """Everything about the model that can be checked without loading weights; ModelError if not."""
    resolve_preprocessing(spec)
    if isinstance(spec, TorchvisionModel):
        _torchvision_builder(spec.architecture)
        if spec.weights and is_weights_enum_name(spec.weights):
            _weights_enum(spec.architecture, spec.weights)
    elif isinstance(spec, EntrypointModel):
        _entrypoint_function(spec.entrypoint)


def model_name(spec: ModelSpec) -> str:
    if spec.name:
        return spec.name
    if isinstance(spec, TorchvisionModel):
        return spec.architecture
    if isinstance(spec, EntrypointModel):
        return spec.entrypoint.rpartition(":")[2]
    return posixpath.splitext(posixpath.basename(spec.uri))[0]


def resolve_preprocessing(spec: ModelSpec) -> Preprocessing:
    """The spec's preprocessing, else the torchvision weights' own transforms."""
    if spec.preprocessing is not None:
        return spec.preprocessing
    if isinstance(spec, TorchvisionModel):
        name = spec.weights if spec.weights and is_weights_enum_name(spec.weights) else "DEFAULT"
        return _preprocessing_of(_weights_enum(spec.architecture, name))
    raise ModelError(
        f"model.preprocessing: required for a {spec.kind} model (no weights metadata to take "
        "it from); expected resize, crop, mean and std"
    )


def resolve_labels(spec: ModelSpec, options: StorageOptions | None = None) -> list[str] | None:
    """The spec's labels file, else the torchvision weights' categories, else None (ids)."""
    if spec.labels:
        return load_labels(spec.labels, options)
    if isinstance(spec, TorchvisionModel) and spec.weights and is_weights_enum_name(spec.weights):
        return list(_weights_enum(spec.architecture, spec.weights).meta["categories"])
    return None


def is_weights_enum_name(weights: str) -> bool:
    return WEIGHTS_ENUM_NAME.match(weights) is not None


# --- model kinds -----------------------------------------------------------------------------


@MODEL_KINDS.register("torchvision")
def build_torchvision(spec: TorchvisionModel, options: StorageOptions) -> BuiltModel:
    builder = _torchvision_builder(spec.architecture)
    if spec.weights and is_weights_enum_name(spec.weights):
        weights = _weights_enum(spec.architecture, spec.weights)
        classes = len(weights.meta["categories"])
        if spec.num_classes not in (None, classes):
            raise ModelError(
                f"model.num_classes: {spec.weights} has {classes} classes, found "
                f"{spec.num_classes}; a fine-tuned head loads from a weights file"
            )
        module = builder(weights=weights)
        return BuiltModel(module, _cached_download_sha256(weights.url))
    module = builder(weights=None, **_num_classes_kwargs(spec.num_classes))
    if spec.weights is None:
        return BuiltModel(module)
    digest = load_state_dict_file(module, spec.weights, spec.weights_sha256, options)
    return BuiltModel(module, digest)


@MODEL_KINDS.register("torchscript")
def build_torchscript(spec: TorchScriptModel, options: StorageOptions) -> BuiltModel:
    data, digest = read_pinned(spec.uri, spec.sha256, options)
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except RuntimeError as err:
        raise ModelError(f"model.uri: {spec.uri} is not a TorchScript file: {err}") from None
    return BuiltModel(module, digest)


@MODEL_KINDS.register("entrypoint")
def build_entrypoint(spec: EntrypointModel, options: StorageOptions) -> BuiltModel:
    module = _entrypoint_function(spec.entrypoint)(**spec.kwargs)
    if not isinstance(module, torch.nn.Module):
        raise ModelError(
            f"model.entrypoint: {spec.entrypoint} returned {type(module).__name__}, "
            "expected a torch.nn.Module"
        )
    if spec.weights is None:
        return BuiltModel(module)
    return BuiltModel(
        module, load_state_dict_file(module, spec.weights, spec.weights_sha256, options)
    )


# --- weights ---------------------------------------------------------------------------------


def read_pinned(uri: str, sha256: str | None, options: StorageOptions) -> tuple[bytes, str]:
    """The file's bytes and sha256; ModelError if a pinned hash differs."""
    try:
        data = read_bytes(uri, options)
    except FileNotFoundError:
        raise ModelError(f"model weights {uri}: not found") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ModelError(
            f"model weights {uri}: sha256 mismatch, the spec pins {sha256}, the file has {digest}"
        )
    return data, digest


def load_state_dict_file(
    module: torch.nn.Module, uri: str, sha256: str | None, options: StorageOptions
) -> str:
    """Load a state_dict or checkpoint (weights_only) into `module`; returns the file's sha256."""
    data, digest = read_pinned(uri, sha256, options)
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"model weights {uri}: not a loadable state_dict: {err}") from None
    state_dict = _unwrap_checkpoint(checkpoint)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ModelError(f"model weights {uri} do not fit the architecture: {err}") from None
    return digest


def _unwrap_checkpoint(checkpoint: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping):
        raise ModelError(f"expected a state_dict mapping, found {type(checkpoint).__name__}")
    return {name.removeprefix("module."): tensor for name, tensor in checkpoint.items()}


def state_dict_sha256(module: torch.nn.Module) -> str:
    """A content hash of the weights, for models whose weights came from no single file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _cached_download_sha256(url: str) -> str | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / posixpath.basename(url)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


# --- labels ----------------------------------------------------------------------------------


def load_labels(ref: str, options: StorageOptions | None = None) -> list[str]:
    """Labels from `imagenet-1k`, a .json list / {id: label} map, or a text file (one a line)."""
    if ref in BUILTIN_LABELS:
        return BUILTIN_LABELS[ref]()
    try:
        text = read_bytes(ref, options).decode("utf-8-sig")
    except FileNotFoundError:
        raise ModelError(f"model.labels: {ref} not found") from None
    if ref.lower().endswith(".json"):
        return _json_labels(ref, json.loads(text))
    return [line.strip() for line in text.splitlines() if line.strip()]


def _json_labels(ref: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(label) for label in value]
    if isinstance(value, dict):
        by_id = {int(key): str(label) for key, label in value.items()}
        return [by_id.get(i, str(i)) for i in range(max(by_id) + 1)] if by_id else []
    raise ModelError(f"model.labels: {ref} holds {type(value).__name__}, expected list or object")


# --- lookups ---------------------------------------------------------------------------------


def _torchvision_builder(architecture: str) -> Callable[..., torch.nn.Module]:
    known = torchvision.models.list_models(module=torchvision.models)
    if architecture not in known:
        raise ModelError(
            f"model.architecture: expected a torchvision classification model "
            f"(e.g. resnet50, efficientnet_b0, vit_b_16), found {architecture!r}"
        )
    return torchvision.models.get_model_builder(architecture)


def _weights_enum(architecture: str, name: str) -> Any:
    enum = torchvision.models.get_model_weights(architecture)
    try:
        return enum[name]
    except KeyError:
        known = ", ".join(["DEFAULT", *enum.__members__])
        raise ModelError(
            f"model.weights: {architecture} has no weights {name!r}; expected one of {known} "
            "or the URI of a weights file"
        ) from None


def _preprocessing_of(weights: Any) -> Preprocessing:
    transform = weights.transforms()
    return Preprocessing(
        resize=transform.resize_size[0],
        crop=transform.crop_size[0],
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )


def _num_classes_kwargs(num_classes: int | None) -> dict[str, int]:
    return {} if num_classes is None else {"num_classes": num_classes}


def _entrypoint_function(entrypoint: str) -> Callable[..., Any]:
    module_name, _, function_name = entrypoint.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"model.entrypoint: cannot import {entrypoint}: {err}") from None
    if not callable(function):
        raise ModelError(f"model.entrypoint: {entrypoint} is not callable")
    return function
