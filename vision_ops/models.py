"""Models by kind (torchvision, TorchScript, entrypoint, ONNX) for a task, weights and labels."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import posixpath
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch
import torchvision

from vision_ops.adapters import AdaptedDetector, OnnxModule, check_layout
from vision_ops.config import (
    IMAGENET_LABELS,
    MODEL_FILE_FIELDS,
    WEIGHTS_ENUM_NAME,
    EntrypointModel,
    JobSpec,
    ModelSpec,
    OnnxModel,
    OutputAdapter,
    PpOcrModel,
    Preprocessing,
    TorchScriptModel,
    TorchvisionModel,
)
from vision_ops.errors import ModelError, in_one_line
from vision_ops.registry import Registry
from vision_ops.storage import StorageOptions, missing_file, read_bytes, store_error_text
from vision_ops.tasks import DetectionTask, get_task


def torchvision_architectures(task: str) -> list[str]:
    """The torchvision architecture names a task accepts: the builders of its record's module
    (detection: the box detectors and Mask / Keypoint R-CNN, whose masks and keypoints ride with
    their boxes); none for a task that takes no torchvision architecture."""
    module = get_task(task).architectures
    if module is None:
        return []
    return list(torchvision.models.list_models(module=importlib.import_module(module)))


BUILTIN_LABELS = {IMAGENET_LABELS: lambda: list(torchvision.models._meta._IMAGENET_CATEGORIES)}


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
    preprocessing: Preprocessing | None  # None: the model resizes and normalises itself


ModelBuilder = Callable[[Any, StorageOptions, str], BuiltModel]
MODEL_KINDS: Registry[ModelBuilder] = Registry("model kind")


def load_model(
    spec: ModelSpec, options: StorageOptions | None = None, task: str = "classification"
) -> LoadedModel:
    """Build the model for `task` on the CPU in eval mode, with its labels and preprocessing."""
    options = options or {}
    built = MODEL_KINDS.get(spec.kind)(spec, options, task)
    module = built.module.eval()
    return LoadedModel(
        module=module,
        name=model_name(spec),
        weights_sha256=built.weights_sha256 or state_dict_sha256(module),
        labels=resolve_labels(spec, options),
        preprocessing=resolve_preprocessing(spec, task),
    )


def check_model(spec: ModelSpec, task: str = "classification") -> int | None:
    """Everything about the model that can be checked without loading weights; ModelError if
    not. The model's outputs per crop where a run on the meta device gave them (a fixed-size
    torchvision model: a classifier's classes), else None."""
    outputs = None
    if isinstance(spec, TorchvisionModel):
        builder = _torchvision_builder(spec.architecture, task)
        weights = _weights_of(spec)  # the enum's name and its classes checked
        fixed = get_task(task).input_size == "fixed"
        if spec.kwargs or fixed:  # built on the meta device: no memory, no weights
            skeleton = _meta_skeleton(builder, weights, spec, task)
            if fixed and skeleton is not None:
                outputs = _check_crop(skeleton, spec, task)
    elif isinstance(spec, EntrypointModel):
        _entrypoint_function(spec.entrypoint)
    adapter = getattr(spec, "adapter", None)
    if adapter is not None:
        if isinstance(spec, OnnxModel) and not get_task(task).adapters:
            raise ModelError(
                f"model.kind onnx: ONNX models run as detectors, their output decoded by "
                f"model.adapter; the task is {task}: expected a torchvision, torchscript or "
                "entrypoint model"
            )
        if not get_task(task).adapters:
            raise ModelError(f"model.adapter: output adapters decode detectors; the task is {task}")
        try:
            check_layout(adapter)
        except KeyError as err:
            raise ModelError(f"model.adapter.layout: {err.args[0]}") from None
    resolve_preprocessing(spec, task)
    return outputs


def check_job(spec: JobSpec, files: bool = True) -> None:
    """The model checks, its files there and its labels readable, the task's label names
    against the model's labels, and the task's columns sized for the model where they depend
    on it (embedding: refused if the model's head cannot be found); OCR files the spec names
    loaded, the dictionary against the recogniser (`ocr_predictor.check_files`).
    `files=False` (a job submitted to a cluster whose storage this machine may not reach): the
    model's files are the cluster's to find."""
    outputs = check_model(spec.model, spec.task.kind)
    if files:
        check_model_files(spec.model, spec.storage_options)
    if files or isinstance(spec.task, DetectionTask):  # read once: they may be in storage
        labels = resolve_labels(spec.model, spec.storage_options)
        if isinstance(spec.task, DetectionTask):
            check_detector_labels(spec.model, labels)
            check_class_ids(spec.task.classes, spec.model, labels)
        elif spec.task.kind == "classification":
            check_classifier_labels(outputs, labels)
    if files and isinstance(spec.model, PpOcrModel):
        from vision_ops.ocr_predictor import check_files  # onnxruntime: only for OCR

        check_files(spec)
    get_task(spec.task.kind).job_fields(spec)


def check_classifier_labels(outputs: int | None, labels: list[str] | None) -> None:
    """A classifier's labels name each of its `outputs` (more are allowed: a label set wider
    than the head); ModelError where they are fewer, as each actor would find at start-up."""
    if outputs is not None and labels is not None and len(labels) < outputs:
        raise ModelError(
            f"model.labels: the model has {outputs} outputs, found only {len(labels)} labels"
        )


def check_class_ids(
    classes: Sequence[str | int] | None, spec: ModelSpec, labels: list[str] | None
) -> None:
    """The allow-list's ids and names (`class_ids`), its ids within a torchvision detector's
    classes where the spec fixes their count (its weights' categories, or num_classes): an id
    past them keeps no box. Another model's labels file may name only some of its ids."""
    ids = class_ids(classes, labels) or frozenset()
    count = _torchvision_classes(spec)
    if count is not None and ids and max(ids) >= count:
        raise ModelError(
            f"task.classes: no class id {max(ids)}; expected ids 0 to {count - 1} (the model's "
            f"{count} classes)"
        )


def _torchvision_classes(spec: ModelSpec) -> int | None:
    """A torchvision model's class count where the spec fixes it, else None."""
    if not isinstance(spec, TorchvisionModel):
        return None
    if spec.num_classes is not None:
        return spec.num_classes
    weights = _weights_of(spec)
    return len(weights.meta["categories"]) if weights is not None else None


def check_detector_labels(spec: ModelSpec, labels: list[str] | None) -> None:
    """A torchvision detector counts the background as class 0 (`num_classes` includes it):
    a labels file of a fine-tuned one must name it first, or every box would be named after
    the class above its own. ModelError where the count differs."""
    if not isinstance(spec, TorchvisionModel) or spec.num_classes is None or labels is None:
        return
    if len(labels) != spec.num_classes:
        raise ModelError(
            f"model.labels: a torchvision detector's class ids count the background as 0; "
            f"expected {spec.num_classes} labels (model.num_classes), the first for the "
            f"background (e.g. __background__), found {len(labels)}"
        )


def check_model_files(spec: ModelSpec, options: StorageOptions | None = None) -> None:
    """Each file the model loads from (weights, a TorchScript or ONNX file, OCR models) is
    there; ModelError naming the field if not. Whether it loads is the actors' to find."""
    for field, uri in spec.files().items():
        if field not in MODEL_FILE_FIELDS:  # the labels: read as the spec is checked
            continue
        problem = missing_file(uri, options)
        if problem:
            raise ModelError(f"model.{field}: {uri} {problem}")


def model_name(spec: ModelSpec) -> str:
    if spec.name:
        return spec.name
    if isinstance(spec, TorchvisionModel):
        return spec.architecture
    if isinstance(spec, EntrypointModel):
        return spec.entrypoint.rpartition(":")[2]
    if isinstance(spec, PpOcrModel):
        return ocr_model_name(spec)
    return posixpath.splitext(posixpath.basename(spec.uri))[0]


def resolve_preprocessing(spec: ModelSpec, task: str = "classification") -> Preprocessing | None:
    """The spec's preprocessing, else the torchvision weights' own transforms; None for the tasks
    that take each image at its own size (detection, OCR: the model, or its reader, sizes it)."""
    if get_task(task).input_size == "any":
        if spec.preprocessing is not None:
            raise ModelError(
                f"model.preprocessing: {task} models resize and normalise inside the model; "
                "expected no preprocessing, found one"
            )
        return None
    if spec.preprocessing is not None:
        return _mask_covering_its_input(spec.preprocessing, task)
    if isinstance(spec, TorchvisionModel):
        name = spec.weights if spec.weights and is_weights_enum_name(spec.weights) else "DEFAULT"
        return _preprocessing_of(_weights_enum(spec.architecture, name))
    raise ModelError(
        f"model.preprocessing: required for a {spec.kind} model (no weights metadata to take "
        "it from); expected resize, crop, mean and std"
    )


def _mask_covering_its_input(preprocessing: Preprocessing, task: str) -> Preprocessing:
    """The preprocessing, where a task's masks can be placed on their source: a mask covers
    the model's input, which is the whole (resized) image only where nothing is cropped off
    (the evaluation's truth, a tile's GeoTIFF mask and the report's overlay assume so)."""
    if get_task(task).masks and preprocessing.resize != preprocessing.crop:
        raise ModelError(
            f"model.preprocessing: a {task} model's masks cover its input, so expected resize "
            f"equal to crop (nothing cut off the resized image), found resize "
            f"{preprocessing.resize} and crop {preprocessing.crop}"
        )
    return preprocessing


def ocr_model_name(spec: PpOcrModel) -> str:
    """PP-OCRv4 for the packaged pair, else the detector's and recogniser's file names."""
    if spec.detector is None and spec.recognizer is None:
        return "PP-OCRv4"
    files = [
        posixpath.splitext(posixpath.basename(uri))[0]
        for uri in (spec.detector, spec.recognizer)
        if uri
    ]
    return "+".join(files)


def resolve_labels(spec: ModelSpec, options: StorageOptions | None = None) -> list[str] | None:
    """The spec's labels file, else the torchvision weights' categories, else None (ids)."""
    if spec.labels:
        return load_labels(spec.labels, options)
    if isinstance(spec, TorchvisionModel) and spec.weights and is_weights_enum_name(spec.weights):
        return list(_weights_enum(spec.architecture, spec.weights).meta["categories"])
    return None


def is_weights_enum_name(weights: str) -> bool:
    return WEIGHTS_ENUM_NAME.match(weights) is not None


UNTRAINED_SEED = 0  # an architecture built without weights draws them from this seed

# --- model kinds -----------------------------------------------------------------------------


@MODEL_KINDS.register("torchvision")
def build_torchvision(spec: TorchvisionModel, options: StorageOptions, task: str) -> BuiltModel:
    builder = _torchvision_builder(spec.architecture, task)
    weights = _weights_of(spec)
    if weights is not None:
        module = _built(builder, weights=weights, **spec.kwargs)
        return BuiltModel(module, _cached_download_sha256(weights.url))
    with torch.random.fork_rng(devices=[]):  # no weights: the same random ones on every worker
        torch.manual_seed(UNTRAINED_SEED)
        module = _untrained(builder, spec, task)
    if spec.weights is None:
        return BuiltModel(module)
    digest = load_state_dict_file(module, spec.weights, spec.weights_sha256, options)
    return BuiltModel(module, digest)


@MODEL_KINDS.register("torchscript")
def build_torchscript(spec: TorchScriptModel, options: StorageOptions, task: str) -> BuiltModel:
    data, digest = read_pinned(spec.uri, spec.sha256, options)
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except RuntimeError as err:
        raise ModelError(f"model.uri: {spec.uri} is not a TorchScript file: {err}") from None
    if spec.adapter is not None:
        return BuiltModel(_adapted(module, spec.adapter, task), digest)
    return BuiltModel(module, digest)


@MODEL_KINDS.register("onnx")
def build_onnx(spec: OnnxModel, options: StorageOptions, task: str) -> BuiltModel:
    data, digest = read_pinned(spec.uri, spec.sha256, options)
    try:
        module = OnnxModule(data)
    except ImportError:
        raise ModelError("model.kind onnx needs onnxruntime: pip install onnxruntime") from None
    except Exception as err:  # onnxruntime's own errors for a file that is not a model
        raise ModelError(f"model.uri: {spec.uri} is not an ONNX model: {err}") from None
    return BuiltModel(_adapted(module, spec.adapter, task), digest)


def _adapted(module: Any, adapter: OutputAdapter, task: str) -> torch.nn.Module:
    if not get_task(task).adapters:
        raise ModelError(f"model.adapter: output adapters decode detectors; the task is {task}")
    return AdaptedDetector(module, adapter)


def _weights_of(spec: TorchvisionModel) -> Any:
    """The torchvision weights enum member `spec.weights` names, its classes checked against
    model.num_classes; None where the weights come from a file (or nowhere)."""
    if not (spec.weights and is_weights_enum_name(spec.weights)):
        return None
    weights = _weights_enum(spec.architecture, spec.weights)
    if not weights.meta.get("categories"):
        raise ModelError(
            f"model.weights: {spec.weights} of {spec.architecture} holds no classifier (its "
            "features only); expected weights with their classes, or a weights file"
        )
    classes = len(weights.meta["categories"])
    if spec.num_classes not in (None, classes):
        raise ModelError(
            f"model.num_classes: {spec.weights} has {classes} classes, found "
            f"{spec.num_classes}; a fine-tuned head loads from a weights file"
        )
    return weights


class _WeightsReached(Exception):
    """A builder given a weights enum went as far as fetching its state_dict."""


def _built_until_its_weights(
    builder: Callable[..., Any], weights: Any, kwargs: Mapping[str, Any]
) -> torch.nn.Module | None:
    """Build `builder(weights=weights, **kwargs)` up to where it would fetch the weights (its
    state_dict is not downloaded): torchvision refuses keywords the weights fix otherwise
    (num_classes, image_size) as it builds, so the real build, in every actor, would fail.
    The module built so far (found in the frame that asked for the weights); None if none."""
    enum = type(weights)
    own = enum.__dict__.get("get_state_dict")  # None: WeightsEnum's, inherited

    def reached(*_: Any, **__: Any) -> Any:
        raise _WeightsReached

    enum.get_state_dict = reached
    try:
        return cast(torch.nn.Module | None, _built(builder, weights=weights, **kwargs))
    except _WeightsReached as reach:
        return _module_in_frames(reach.__traceback__)
    finally:
        if own is None:
            del enum.get_state_dict
        else:
            enum.get_state_dict = own


def _module_in_frames(trace: TracebackType | None) -> torch.nn.Module | None:
    """The module a frame of `trace` names `model`, the innermost frame first (a torchvision
    builder's, about to load its weights); None if none does."""
    frames = []
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    for frame in reversed(frames):  # the builder's `model` (a segmenter builds its backbone,
        found = frame.f_locals.get("model")  # a classifier, first)
        if isinstance(found, torch.nn.Module):
            return found
    return None


def _meta_skeleton(
    builder: Callable[..., Any], weights: Any, spec: TorchvisionModel, task: str
) -> torch.nn.Module | None:
    """The model built on the meta device without its weights (its keywords checked as it
    builds); None where the architecture cannot be built there (RegNet computes its widths
    with tensors)."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # torchvision's init notices
            if weights is not None:
                return _built_until_its_weights(builder, weights, spec.kwargs)
            return cast(torch.nn.Module, _untrained(builder, spec, task))
    except NotImplementedError:
        return None


def _check_crop(skeleton: torch.nn.Module, spec: TorchvisionModel, task: str) -> int | None:
    """ModelError where the model refuses the task's crops (a ViT takes its one image_size;
    a network shrinks a small crop to nothing): the skeleton run once on a meta batch of one
    crop. Its outputs per crop (dimension 1); None where an operation the meta device cannot
    run leaves it unchecked."""
    crop = cast(Preprocessing, resolve_preprocessing(spec, task)).crop
    try:
        with torch.no_grad():
            output = skeleton.eval()(torch.zeros((1, 3, crop, crop), device="meta"))
    except NotImplementedError:
        return None
    except (AssertionError, RuntimeError, ValueError) as err:
        raise ModelError(
            f"model.preprocessing.crop: {spec.architecture} cannot take {crop} x {crop} "
            f"crops ({err}); expected a crop it takes (model.preprocessing), or model.kwargs "
            "that build it for this one"
        ) from None
    logits = main_output(output)
    return int(logits.shape[1]) if isinstance(logits, torch.Tensor) and logits.ndim >= 2 else None


def main_output(output: object) -> torch.Tensor:
    """A fixed-size model's output the predictions come from: its logits, or a segmenter's
    `out` (not its `aux`)."""
    return cast(torch.Tensor, output["out"] if isinstance(output, dict) else output)


@MODEL_KINDS.register("entrypoint")
def build_entrypoint(spec: EntrypointModel, options: StorageOptions, task: str) -> BuiltModel:
    module = _entrypoint_built(spec.entrypoint, spec.kwargs)
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
    except OSError as err:  # a folder, access refused ...
        raise ModelError(
            f"model weights {uri}: cannot be read: {type(err).__name__}: {err}"
        ) from None
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
        raise ModelError(
            f"model weights {uri}: not a loadable state_dict: {_why_not_loaded(err)} (read "
            "with weights_only=True: nothing in the file is run)"
        ) from None
    state_dict = _unwrap_checkpoint(checkpoint)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        misfit = _misfit(err, _head_of(module))
        raise ModelError(f"model weights {uri} do not fit the architecture: {misfit}") from None
    return digest


# torch's weights_only error: advice this tool cannot take (to load with weights_only=False),
# the finding (after UNPICKLER_SAYS, or in a paragraph of its own), a pointer to the docs.
UNSAFE_ADVICE = "Weights only load failed"
UNPICKLER_SAYS = "WeightsUnpickler error:"  # where torch gives it, the finding follows this
MISFITS_SHOWN = 3  # load_state_dict's findings a message names (each up to MISFIT_CHARS)
MISFIT_CHARS = 300


def _why_not_loaded(err: Exception) -> str:
    """What torch.load found, in one line, without torch's advice to load unsafely or to
    allow-list a global."""
    text = str(err)
    if not text.startswith(UNSAFE_ADVICE):
        return in_one_line(err)
    marked = text.partition(UNPICKLER_SAYS)[2]
    rest = marked or text.partition("\n\n")[2]
    paragraphs = [part.strip() for part in rest.split("\n\n") if part.strip()]
    found = [part for part in paragraphs if not part.startswith("Check the documentation")]
    if found:
        return found[0].splitlines()[0].split(" Please use")[0]
    # a form of one line, e.g. "Weights only load failed. ``torch.distributed.tensor`` must
    # be imported to load DTensors"
    return text.splitlines()[0].removeprefix(f"{UNSAFE_ADVICE}.").strip() or UNSAFE_ADVICE


def _misfit(err: RuntimeError, head: str | None) -> str:
    """load_state_dict's findings (missing or unexpected keys, a tensor of another size) in
    one line, the first MISFITS_SHOWN of them; where only the `head` (the module's last
    Linear layer) is of another size, the hint to set num_classes."""
    lines = [line.strip().rstrip(".") for line in str(err).splitlines()[1:] if line.strip()]
    if not lines:
        return in_one_line(err)
    shown = "; ".join(line[:MISFIT_CHARS] for line in lines[:MISFITS_SHOWN])
    more = f" (and {len(lines) - MISFITS_SHOWN} more)" if len(lines) > MISFITS_SHOWN else ""
    heads = (f"size mismatch for {head}.weight:", f"size mismatch for {head}.bias:")
    hint = (
        "; the classifier's head is of another size: set model.num_classes to the weights'"
        if head is not None and all(line.startswith(heads) for line in lines)
        else ""
    )
    return f"{shown}{more}{hint}"


def _head_of(module: torch.nn.Module) -> str | None:
    """The name of the module's last Linear layer (a classifier's head), if it has one."""
    names = [name for name, layer in module.named_modules() if isinstance(layer, torch.nn.Linear)]
    return names[-1] if names else None


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
    path = _hub_cache_path(url)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _hub_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / posixpath.basename(url)


def weights_unavailable(spec: ModelSpec, timeout_s: float = 10.0) -> str | None:
    """Why a torchvision weights enum cannot be had here (not cached, hub unreachable), or None.

    Only enum weights download; files and other kinds are checked when they load.
    """
    if not (isinstance(spec, TorchvisionModel) and spec.weights):
        return None
    if not is_weights_enum_name(spec.weights):
        return None
    url = _weights_enum(spec.architecture, spec.weights).url
    if _hub_cache_path(url).exists():
        return None
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s)
    except OSError as err:
        return (
            f"{spec.architecture} {spec.weights} weights are not cached in "
            f"{_hub_cache_path(url).parent} and {url} cannot be reached ({err})"
        )
    return None


# --- labels ----------------------------------------------------------------------------------


def load_labels(ref: str, options: StorageOptions | None = None) -> list[str]:
    """Labels from `imagenet-1k`, a .json list / {id: label} map, or a text file (one a line)."""
    if ref in BUILTIN_LABELS:
        return BUILTIN_LABELS[ref]()
    try:
        text = read_bytes(ref, options).decode("utf-8-sig")
        values = json.loads(text) if ref.lower().endswith(".json") else None
    except FileNotFoundError:
        raise ModelError(f"model.labels: {ref} not found") from None
    except ValueError as err:  # not UTF-8, or not JSON
        raise ModelError(
            f"model.labels: {ref}: expected UTF-8 text (one label a line) or JSON: {err}"
        ) from None
    except Exception as err:  # a folder, access refused, no credentials: not one type
        raise ModelError(f"model.labels: {ref} cannot be read: {store_error_text(err)}") from None
    if values is not None:
        return _json_labels(ref, values)
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_ids(
    classes: Sequence[str | int] | None, labels: Sequence[str] | None
) -> frozenset[int] | None:
    """An allow-list as label ids: ids as given, names looked up in the labels."""
    if classes is None:
        return None
    by_name = {name: index for index, name in enumerate(labels or [])}
    unknown = [c for c in classes if isinstance(c, str) and c not in by_name]
    if unknown:
        known = ", ".join(list(by_name)[:12]) or "none: the model has no labels, use ids"
        raise ModelError(f"task.classes: no label {unknown[0]!r}; expected one of {known}, ...")
    negative = [c for c in classes if isinstance(c, int) and c < 0]
    if negative:
        raise ModelError(f"task.classes: no class id {negative[0]}; expected ids 0 or more")
    return frozenset(c if isinstance(c, int) else by_name[c] for c in classes)


def _json_labels(ref: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(label) for label in value]
    if isinstance(value, dict):
        if not all(str(key).isdigit() for key in value):
            raise ModelError(f"model.labels: {ref}: expected class ids as the object's keys")
        by_id = {int(key): str(label) for key, label in value.items()}
        return [by_id.get(i, str(i)) for i in range(max(by_id) + 1)] if by_id else []
    raise ModelError(f"model.labels: {ref} holds {type(value).__name__}, expected list or object")


# --- lookups ---------------------------------------------------------------------------------


def _torchvision_builder(architecture: str, task: str) -> Callable[..., torch.nn.Module]:
    if architecture not in torchvision_architectures(task):
        examples = get_task(task).architecture_examples
        raise ModelError(
            f"model.architecture: expected a torchvision {task} model"
            f"{f' (e.g. {examples})' if examples else ''}, found {architecture!r}"
        )
    return torchvision.models.get_model_builder(architecture)


def _untrained(builder: Callable[..., torch.nn.Module], spec: TorchvisionModel, task: str) -> Any:
    fixed = _untrained_kwargs(spec.num_classes, task)
    both = sorted(fixed.keys() & spec.kwargs.keys())
    if both:
        raise ModelError(
            f"model.kwargs: {', '.join(both)} is set by the job already ({fixed}): leave it out"
        )
    return _built(builder, weights=None, **fixed, **spec.kwargs)


def _built(builder: Callable[..., Any], **kwargs: Any) -> Any:
    """A torchvision builder's `builder(**kwargs)`; a keyword it does not take, or a value it
    refuses (torchvision raises TypeError, ValueError or AssertionError for them: num_classes
    other than the weights', a ViT's image_size not a multiple of its patches) is a ModelError
    naming model.kwargs."""
    try:
        return builder(**kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise ModelError(f"model.kwargs: {err or type(err).__name__}") from None


def _entrypoint_built(entrypoint: str, kwargs: Mapping[str, Any]) -> Any:
    """`entrypoint(**kwargs)`. A keyword it does not take is a ModelError naming model.kwargs
    (bound against its signature first: the spec is wrong, exit 2); what it raises itself is
    its own (a download that failed, a bug of its own: exit 1), never called the keywords'."""
    function = _entrypoint_function(entrypoint)
    try:
        inspect.signature(function).bind(**kwargs)
    except TypeError as err:
        raise ModelError(f"model.kwargs: {entrypoint}: {err}") from None
    except ValueError:  # no signature to read (a builtin): the call says
        pass
    return function(**kwargs)


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
    resize = transform.resize_size[0]
    return Preprocessing(
        resize=resize,
        crop=getattr(transform, "crop_size", [resize])[0],  # segmentation weights: no crop
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )


def _untrained_kwargs(num_classes: int | None, task: str) -> dict[str, Any]:
    """Builder arguments for an architecture whose weights come from a file (or nowhere)."""
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    # e.g. weights_backbone None (the file holds the backbone too: download nothing), aux_loss
    # None (a segmenter's inference head only, as the weights file holds it)
    return kwargs | dict(get_task(task).untrained_kwargs)


def _entrypoint_function(entrypoint: str) -> Callable[..., Any]:
    module_name, _, function_name = entrypoint.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"model.entrypoint: cannot import {entrypoint}: {err}") from None
    if not callable(function):
        raise ModelError(f"model.entrypoint: {entrypoint} is not callable")
    return function
