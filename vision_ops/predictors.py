"""Predictors: plain callable classes that load a model once and score one uint8 batch a call."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import torch

from vision_ops.batch_norms import fold_batch_norms
from vision_ops.compile_record import CompiledModel, compiled_here_before, remember_compiled
from vision_ops.config import JobSpec, Preprocessing
from vision_ops.decode import ENCODED_COLUMN
from vision_ops.detection import (
    RAW_FINITE,
    as_rows,
    configure_detector,
    instance_output,
    kept_indices,
    keypoint_arrays,
    mask_rles,
    pixel_budget_groups,
)
from vision_ops.device_decode import model_inputs
from vision_ops.errors import ModelError
from vision_ops.host_memory import retain_freed_memory
from vision_ops.models import (
    LoadedModel,
    check_classifier_labels,
    class_ids,
    load_model,
    main_output,
)
from vision_ops.schema import (
    DETECTIONS,
    INSTANCE_COLUMN,
    SEGMENT_FRACTIONS,
    SEGMENT_MASK,
    STAGE_PREFIX,
    STATUS_ERROR,
    STATUS_OK,
    TOP_K_IDS,
    TOP_K_SCORES,
    stage_times,
)
from vision_ops.tasks import ClassificationTask, DetectionTask, get_task

log = logging.getLogger(__name__)
ERROR_COLUMNS = ("status", "error_type", "error_message")
# The side of the black image a model of any input size is probed with before it took one.
ANY_SIZE_PROBE_SIDE = 64
TaskT = TypeVar("TaskT", ClassificationTask, DetectionTask)
Pixels = np.ndarray | torch.Tensor  # uint8 (H, W, 3): from a read task, or decoded on the device


def task_settings(spec: JobSpec, kind: type[TaskT]) -> TaskT:
    """The spec's task, checked to be the one a predictor handles."""
    if not isinstance(spec.task, kind):
        raise ModelError(f"task.kind: expected {kind.__name__}, found {type(spec.task).__name__}")
    return spec.task


class FromPixels(torch.nn.Module):
    """A fixed-size model that takes uint8 (N, H, W, 3) pixels: scaling to 0-1 and standardising
    are its first steps, so a compiled model fuses them into one pass."""

    def __init__(self, model: torch.nn.Module, spec: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> object:
        images = pixels.permute(0, 3, 1, 2).float().div(255.0)
        return self.model(images.sub(self.mean).div(self.std))


def pick_device(requested: str) -> torch.device:
    """`auto` is cuda when this process sees a GPU, else cpu; `cuda` without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is cuda but this worker sees no GPU")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def upload(images: np.ndarray | Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 host arrays of one shape as one new (N, ...) tensor on the device. For a GPU they
    are stacked straight into pinned memory (one host copy), then copied without blocking."""
    on_gpu = device.type == "cuda"
    batch = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=on_gpu)
    np.stack(list(images), out=batch.numpy())
    return batch.to(device, non_blocking=True) if on_gpu else batch


def stack_on_device(images: Sequence[Pixels], device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) images of one size, host arrays or device tensors -> (N, H, W, 3) on the
    device: host arrays uploaded in one copy, device tensors stacked where they are."""
    host = [i for i, image in enumerate(images) if isinstance(image, np.ndarray)]
    if len(host) == len(images):
        return upload(cast(Sequence[np.ndarray], images), device)
    if not host:
        return torch.stack([cast(torch.Tensor, image) for image in images])
    batch = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, device=device)
    batch[host] = upload([cast(np.ndarray, images[i]) for i in host], device)
    for index, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            batch[index] = image
    return batch


def mark_errors(out: dict[str, np.ndarray], failures: Sequence[tuple[int, BaseException]]) -> None:
    """The rows `failures` names (index, what failed) as error rows in `out`."""
    rows = len(out["status"])
    status, kinds, messages = (
        np.asarray(out.get(c, [None] * rows), dtype=object).copy() for c in ERROR_COLUMNS
    )
    for row, error in failures:
        status[row], kinds[row] = STATUS_ERROR, type(error).__name__
        messages[row] = str(error) or type(error).__name__
    out.update(zip(ERROR_COLUMNS, (status, kinds, messages), strict=True))


class NonFiniteOutput(ValueError):
    """The model's output for an image holds NaN or infinity (an overflow in float16, weights
    that diverged): an error row, never an ok row with a NaN score."""


# A column `predict_rows` may add: per row, whether the model's raw output for the image (a
# segmenter's logits, a detector's features before its score threshold and NMS drop NaN
# scores silently) held NaN or infinity where the rows it gives hold none.
RAW_NOT_FINITE = "_raw_not_finite"
RAW_OUTPUT = "its raw output"


def non_finite_rows(
    result: dict[str, np.ndarray], ok: np.ndarray
) -> list[tuple[int, NonFiniteOutput]]:
    """The ok rows whose numeric outputs (`result`'s float columns, or float arrays a row in
    its object columns: a detector's boxes) are not all finite, or whose raw output was not
    (`RAW_NOT_FINITE`)."""
    bad = np.zeros(len(ok), dtype=bool)
    named: dict[int, list[str]] = {}
    for name, values in result.items():
        if name == RAW_NOT_FINITE:
            rows = np.asarray(values, dtype=bool) & ok
            for row in np.flatnonzero(rows).tolist():
                named.setdefault(row, []).append(RAW_OUTPUT)
            bad |= rows
            continue
        finite = _finite_rows(values)
        if finite is None:
            continue
        rows = ~finite & ok
        for row in np.flatnonzero(rows).tolist():
            named.setdefault(row, []).append(name)
        bad |= rows
    return [
        (row, NonFiniteOutput(f"the model's output ({', '.join(named[row])}) holds NaN or "
                              "infinity for this image (an overflow in float16, or weights "
                              "that diverged)"))
        for row in np.flatnonzero(bad).tolist()
    ]  # fmt: skip


def _finite_rows(values: Any) -> np.ndarray | None:
    """Per row, whether its numbers are finite; None for a column of no numbers."""
    if not isinstance(values, np.ndarray) or not len(values):
        return None
    if values.dtype.kind == "f":
        return np.asarray(np.isfinite(values.reshape(len(values), -1)).all(axis=1))
    if values.dtype == object:
        return np.array([_finite(value) for value in values], dtype=bool)
    return None


def _finite(value: Any) -> bool:
    floats = isinstance(value, np.ndarray) and value.dtype.kind == "f"
    return not floats or bool(np.isfinite(value).all())


def _size(image: Pixels) -> int:
    return int(image.numel()) if isinstance(image, torch.Tensor) else int(image.size)


def rows_of(images: Sequence[Pixels], ok: np.ndarray) -> list[Pixels]:
    return [images[i] for i in np.flatnonzero(ok).tolist()]


class Predictor:
    """Loads the spec's model on the actor's device; subclasses score the ok rows of a batch.

    `threads` is the pipeline's torch thread count for this actor (the spec's
    `runtime.intra_op_threads` wins); None leaves torch's (Ray's OMP_NUM_THREADS).
    """

    task = ""
    preprocessing: Preprocessing | None = None  # fixed-size models' resize, crop, mean, std
    static_batch = 0  # a compiled fixed-size model's one batch size (0: any size)
    compile_seconds = 0.0  # spent in torch.compile and its first (compiling) call
    _good_image: Pixels | None = None  # the smallest image the model took (`_sure_input`)

    def __init__(self, spec: JobSpec, threads: int | None = None) -> None:
        threads = spec.runtime.intra_op_threads or threads
        if threads:
            torch.set_num_threads(threads)
        self.model: LoadedModel = load_model(spec.model, spec.storage_options, self.task)
        self.device = pick_device(spec.runtime.device)
        # The pipeline sizes the spec for its pool; one called directly sizes it for a whole
        # device.
        self.spec = spec.sized(1.0 if self.device.type == "cuda" else 0.0)
        self.module = self.model.module.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        out = {
            name: values for name, values in batch.items() if name not in ("image", ENCODED_COLUMN)
        }
        images = cast(Sequence[Pixels], batch["image"])
        if ENCODED_COLUMN in batch:
            images = self._decode_on_device(out, images, batch[ENCODED_COLUMN])
        ok = np.asarray(out["status"] == STATUS_OK, dtype=bool)
        predicted = self.predict_isolating(images, ok, out)
        out.update((k, v) for k, v in predicted.items() if k != RAW_NOT_FINITE)
        still_ok = np.asarray(out["status"] == STATUS_OK, dtype=bool)  # none failed alone
        failed = non_finite_rows(predicted, ok & still_ok)
        if failed:
            mark_errors(out, failed)
        out[f"{STAGE_PREFIX}inference"] = stage_times(len(ok), time.perf_counter() - started)
        out["model_name"] = np.full(len(ok), self.model.name, dtype=object)
        out["model_weights_sha256"] = np.full(len(ok), self.model.weights_sha256, dtype=object)
        return out

    def predict_rows(self, images: Sequence[Pixels], ok: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def predict_isolating(
        self, images: Sequence[Pixels], ok: np.ndarray, out: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """`predict_rows`; where the call fails, each image alone: an image the model fails on
        (a shape it cannot take, a size it has no memory for) becomes its error row in `out`,
        the others keep their predictions. Where every image fails, they are error rows only
        if the model still takes an image it is sure to take (`_still_works`); else the
        model's error is raised: it is the model's, not the inputs' (the run fails, nothing
        committed)."""
        try:
            result = self.predict_rows(images, ok)
        except Exception as err:
            failure = err
        else:
            self._keep_a_good_image(images, ok)
            return result
        merged = self.predict_rows(images, np.zeros_like(ok))  # the columns of rows not run
        if ok.sum() > 1:
            failed = self._each_alone(images, ok, merged)
        else:  # one image: its call was the one that failed
            failed = [(index, failure) for index in np.flatnonzero(ok).tolist()]
        if len(failed) == int(ok.sum()) and not self._still_works():
            raise failure
        log.warning("%d of %d images failed alone in a batch that failed", len(failed), ok.sum())
        mark_errors(out, failed)
        return merged

    def _each_alone(
        self, images: Sequence[Pixels], ok: np.ndarray, merged: dict[str, np.ndarray]
    ) -> list[tuple[int, Exception]]:
        """Each ok image run alone, its predictions put in `merged`; those that failed."""
        failed: list[tuple[int, Exception]] = []
        for index in np.flatnonzero(ok).tolist():
            alone = np.zeros_like(ok)
            alone[index] = True
            try:
                result = self.predict_rows(images, alone)
            except Exception as err:
                failed.append((index, err))
                continue
            self._keep_a_good_image(images, alone)
            for name, values in result.items():
                merged[name][index] = values[index]
        return failed

    def _keep_a_good_image(self, images: Sequence[Pixels], ok: np.ndarray) -> None:
        """A model of any input size (a detector, OCR): the smallest image it took, looking at
        each batch's first, copied (not a view of its batch). A fixed-size model needs none."""
        if self.preprocessing is not None or not ok.any():
            return
        image = images[int(np.flatnonzero(ok)[0])]
        if self._good_image is None or _size(image) < _size(self._good_image):
            self._good_image = image.clone() if isinstance(image, torch.Tensor) else np.array(image)

    def _sure_input(self) -> Pixels:
        """An image the model is sure to take: a black one at a fixed-size model's crop; for a
        model of any size (a detector, OCR) the smallest it took in this actor, and before it
        took one a small black one (so a first batch of images it cannot take is error rows
        too, not a failed run)."""
        if self.preprocessing is not None:
            side = self.preprocessing.crop
        elif self._good_image is not None:
            return self._good_image
        else:
            side = ANY_SIZE_PROBE_SIDE
        return np.zeros((side, side, 3), dtype=np.uint8)

    def _still_works(self) -> bool:
        """Whether the model still takes an image it is sure to take: where every image of a
        batch fails, this tells images it cannot take from a model that fails (a device lost,
        a sticky CUDA error)."""
        sure = self._sure_input()
        try:
            self.predict_rows([sure], np.ones(1, dtype=bool))
        except Exception:
            return False
        return True

    def fixed_size(self, role: str) -> Preprocessing:
        """A model of one input size (classifier, segmenter): its preprocessing, required, and
        the model in channels-last and compiled as the spec asks, compiled here, not in the
        first batch."""
        if self.model.preprocessing is None:
            raise ModelError(f"model.preprocessing: a {role} needs resize, crop, mean, std")
        self.preprocessing = preprocessing = self.model.preprocessing
        if self.spec.runtime.fold_batch_norm:
            self._fold_batch_norms(preprocessing.crop)
        if self.spec.runtime.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.module = FromPixels(self.module, preprocessing).to(self.device)
        as_compiled = self.compiled_model(preprocessing)
        if self.compiles(as_compiled):
            self._compile(as_compiled)
        return preprocessing

    def _fold_batch_norms(self, crop: int) -> None:
        """The model's BatchNorms folded into their convolutions (`batch_norms`), checked on
        a probe batch of one image of random standardised pixels, in float32 on the CPU (a
        GPU's TF32 convolutions move the output by more than a fold does), then moved back
        to the device."""
        module = self.module.cpu()
        probe = torch.randn((1, 3, crop, crop), generator=torch.Generator().manual_seed(0))
        fold_batch_norms(module, lambda: main_output(module(probe)))
        self.module = module.to(self.device)

    def _compile(self, as_compiled: CompiledModel) -> None:
        """The model compiled and its first (compiling) call timed. Freezing folds the weights
        into the graph (batch norm into the convolutions), and one static shape keeps one
        graph: run_fixed pads short batches to batch_size. Where inductor cannot build it (a
        CPU node without a C++ compiler or Python's headers), it runs uncompiled, with a
        warning saying why: compiling is for speed, never for the rows."""
        eager = self.module
        started = time.perf_counter()
        try:
            compiled = torch.compile(self.module, dynamic=False, options={"freezing": True})
            self.module = cast(torch.nn.Module, compiled)
            self.static_batch = self.spec.runtime.images_per_call
            self.probe()
        except Exception as err:
            self.module, self.static_batch = eager, 0
            cause = getattr(err, "inner_exception", None) or err  # inductor's, inside dynamo's
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            log.warning("%s: torch.compile failed, runs uncompiled: %s", as_compiled.model, reason)
            return
        self.compile_seconds = time.perf_counter() - started
        remember_compiled(as_compiled)

    def compiled_model(self, preprocessing: Preprocessing) -> CompiledModel:
        runtime = self.spec.runtime
        return CompiledModel(
            model=self.model.name,
            weights_sha256=self.model.weights_sha256,
            batch=runtime.images_per_call,
            crop=preprocessing.crop,
            channels_last=runtime.channels_last,
            fold_batch_norm=runtime.fold_batch_norm,
            device=self.device.type,
            threads=torch.get_num_threads(),
        )

    def compiles(self, compiled: CompiledModel) -> bool:
        """Whether this actor compiles its model: as the spec asks, and where the spec asks
        for it only on a node that compiled the model before, if this node did."""
        runtime = self.spec.runtime
        if not runtime.compile:
            return False
        if runtime.compile_only_where_cached and not compiled_here_before(compiled):
            log.info("%s was not compiled on this node before: it runs uncompiled", compiled.model)
            return False
        return True

    def probe(self) -> torch.Tensor:
        """The fixed-size model's output for one black image."""
        size = cast(Preprocessing, self.preprocessing).crop
        black = torch.zeros((1, size, size, 3), dtype=torch.uint8, device=self.device)
        with self.inference():
            return self.run_fixed(black)

    def run_fixed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The fixed-size model's raw output (logits, or a segmenter's `out`) for uint8
        (N, H, W, 3) on the device; call it inside `inference()`. A compiled
        model sees batches of its one static size: padded with black images, or split."""
        count = len(pixels)
        if self.static_batch and count > self.static_batch:
            return torch.cat([self.run_fixed(part) for part in pixels.split(self.static_batch)])
        if self.static_batch:  # a new tensor, even unpadded: the graph's guards want one kind
            padding = pixels.new_zeros((self.static_batch - count, *pixels.shape[1:]))
            pixels = torch.cat([pixels, padding])
        return main_output(self.module(pixels))[:count]

    def _decode_on_device(
        self, out: dict[str, np.ndarray], images: Sequence[Pixels], encoded: np.ndarray
    ) -> list[Pixels]:
        """Rows the read tasks left encoded, decoded and cropped on the device; a file no
        decoder can read becomes that row's error."""
        if self.preprocessing is None:  # config refuses device decoding for such models
            raise ModelError("runtime.decode: device needs model.preprocessing (resize and crop)")
        rows = [i for i, payload in enumerate(encoded) if payload]
        crops = model_inputs(
            [encoded[i] for i in rows],
            self.device,
            self.spec.input.max_pixels,
            self.preprocessing,
            threads=torch.get_num_threads(),
        )
        merged: list[Pixels] = list(images)
        undecoded = []
        for row, crop in zip(rows, crops, strict=True):
            if isinstance(crop, torch.Tensor):
                merged[row] = crop
            else:
                undecoded.append((row, crop))
        mark_errors(out, undecoded)
        return merged

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


class Classifier(Predictor):
    """Top-k classification of fixed-size crops; adds top-k id and score columns."""

    task = "classification"

    def __init__(self, spec: JobSpec, threads: int | None = None) -> None:
        super().__init__(spec, threads)
        self.preprocessing: Preprocessing = self.fixed_size("classifier")
        self.num_classes = self._count_outputs()
        self.top_k = min(task_settings(spec, ClassificationTask).top_k, self.num_classes)
        self._check_labels()

    def predict_rows(self, images: Sequence[Pixels], ok: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.full((len(ok), self.top_k), -1, dtype=np.int32)
        scores = np.full((len(ok), self.top_k), np.nan, dtype=np.float32)
        if ok.any():
            pixels = stack_on_device(rows_of(images, ok), self.device)
            ids[ok], scores[ok] = self.predict(pixels)
        return {TOP_K_IDS: ids, TOP_K_SCORES: scores}

    def predict(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3), on the host or the device -> top-k class ids and softmax scores."""
        pixels = upload(images, self.device) if isinstance(images, np.ndarray) else images
        with self.inference():
            logits = self.run_fixed(pixels)
        top = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
        return top.indices.int().cpu().numpy(), top.values.cpu().numpy()

    def _count_outputs(self) -> int:
        logits = self.probe()
        if logits.ndim != 2:
            raise ModelError(f"expected logits of shape (N, classes), found {tuple(logits.shape)}")
        return int(logits.shape[1])

    def _check_labels(self) -> None:
        check_classifier_labels(self.num_classes, self.model.labels)


class Detector(Predictor):
    """Boxes for images of any size, in source pixels; adds one (boxes, 6) array per row."""

    task = "detection"

    def __init__(self, spec: JobSpec, threads: int | None = None) -> None:
        super().__init__(spec, threads)
        self.settings = task_settings(spec, DetectionTask)
        self.allowed_ids = class_ids(self.settings.classes, self.model.labels)
        self.instance = instance_output(getattr(spec.model, "architecture", None))
        configure_detector(self.module, self.settings, keep_all=self.allowed_ids is not None)
        self.features = FeatureCheck(self.module)

    def predict_rows(self, images: Sequence[Pixels], ok: np.ndarray) -> dict[str, np.ndarray]:
        detections = np.empty(len(ok), dtype=object)
        extras = np.empty(len(ok), dtype=object)
        not_finite = np.zeros(len(ok), dtype=bool)
        for index in range(len(ok)):
            detections[index] = np.zeros((0, 6), dtype=np.float32)
        rows = np.flatnonzero(ok)
        shapes = [(images[i].shape[0], images[i].shape[1]) for i in rows.tolist()]
        for group in pixel_budget_groups(shapes, self.settings.max_batch_pixels):
            members = rows[group]
            pixels = stack_on_device([images[i] for i in members.tolist()], self.device)
            outputs, finite = self.detect_checked(pixels)
            for index, output, sure in zip(members, outputs, finite, strict=True):
                found = as_rows(output)
                kept = kept_indices(found, self.settings, self.allowed_ids)
                detections[index] = found[kept]
                extras[index] = self._instance_extras(output, kept)
                raw_finite = bool(output.get(RAW_FINITE, True))
                not_finite[index] = not (sure and raw_finite and np.isfinite(found).all())
        out = {DETECTIONS: detections, RAW_NOT_FINITE: not_finite}
        if self.instance is not None:
            out[INSTANCE_COLUMN] = extras
        return out

    def detect_checked(
        self, pixels: torch.Tensor
    ) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
        """uint8 (N, H, W, 3) images of one size on the device -> the model's per-image outputs,
        in source pixels, and per image whether its intermediate outputs were all finite
        (`FeatureCheck`). The model takes floats in 0-1 and normalises them itself."""
        tensors = list(pixels.permute(0, 3, 1, 2).contiguous().float().div_(255.0).unbind(0))
        with self.inference(), self.features.watching(len(tensors)) as finite:
            outputs = self.module(tensors)
        if isinstance(outputs, tuple):  # scripted torchvision detectors: (losses, detections)
            outputs = outputs[1]
        return list(outputs), finite

    def _instance_extras(self, output: dict[str, torch.Tensor], kept: np.ndarray) -> object:
        """The kept boxes' masks (JSON list of COCO RLEs) or keypoints ((boxes, K, 3) array)."""
        if self.instance == "mask":
            return json.dumps(mask_rles(output, kept))
        if self.instance == "keypoints":
            return keypoint_arrays(output)[kept]
        return None


class FeatureCheck:
    """Per image, whether a torchvision detector's intermediate outputs were all finite: its
    backbone's features and its dense heads' outputs (RetinaNet, FCOS and SSD's `head`, the
    region proposals' `rpn.head`), each batch-first. A NaN there (an overflow in float16)
    gives NaN scores that the model's own score threshold and NMS drop: zero boxes, an ok row,
    unless looked at here. Not looked at: the box head of a two-stage detector (its outputs
    are the batch's proposals together). The output adapters say so themselves (RAW_FINITE);
    a model without these parts, or a scripted one (its compiled code calls no hooks), has
    only the boxes and scores it returns checked."""

    WATCHED = ("backbone", "head", "rpn.head")

    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0  # in the batch being watched
        self.flags: list[torch.Tensor] | None = None  # per image, one tensor per watched output
        for name in self.WATCHED:
            self._hook(module, name)

    def _hook(self, module: torch.nn.Module, name: str) -> None:
        part: Any = module
        for attribute in name.split("."):
            part = getattr(part, attribute, None)
        if isinstance(part, torch.nn.Module) and not isinstance(part, torch.jit.ScriptModule):
            part.register_forward_hook(self._record)  # scripted parts' code calls no hooks

    @contextlib.contextmanager
    def watching(self, images: int) -> Iterator[np.ndarray]:
        """A per-image array, all True, that the watched parts' calls inside the block fill
        in as it ends: the flags stay on the device until then, one copy to the host a batch
        (not one per feature level and head call)."""
        finite = np.ones(images, dtype=bool)
        self.images, self.flags = images, []
        try:
            yield finite
            if self.flags:
                finite &= torch.stack(self.flags).all(dim=0).cpu().numpy()
        finally:
            self.flags = None

    def _record(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if self.flags is None:
            return
        for tensor in _tensors(output):
            if tensor.dim() and len(tensor) == self.images > 0:  # batch-first outputs only
                per_image = torch.isfinite(tensor).reshape(self.images, tensor[0].numel())
                self.flags.append(per_image.all(dim=1))


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """The tensors in a module's output, however nested in dicts, lists and tuples."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from _tensors(value)


class Segmenter(Predictor):
    """A class per pixel of each model-input crop; adds its mask and class fractions."""

    task = "segmentation"

    def __init__(self, spec: JobSpec, threads: int | None = None) -> None:
        super().__init__(spec, threads)
        self.preprocessing: Preprocessing = self.fixed_size("segmenter")

    def predict_rows(self, images: Sequence[Pixels], ok: np.ndarray) -> dict[str, np.ndarray]:
        masks = np.empty(len(ok), dtype=object)
        fractions = np.empty(len(ok), dtype=object)
        not_finite = np.zeros(len(ok), dtype=bool)
        for index in range(len(ok)):
            masks[index] = np.zeros((0, 0), dtype=np.uint8)
            fractions[index] = np.zeros((0, 2), dtype=np.float32)
        if ok.any():
            found, finite = self.segment_checked(stack_on_device(rows_of(images, ok), self.device))
            for row, mask, sure in zip(np.flatnonzero(ok), found, finite, strict=True):
                masks[row], fractions[row], not_finite[row] = mask, class_fractions(mask), not sure
        return {SEGMENT_MASK: masks, SEGMENT_FRACTIONS: fractions, RAW_NOT_FINITE: not_finite}

    def segment(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, H, W, 3) -> the argmax class of each pixel, (N, H, W) uint8 or uint16."""
        return self.segment_checked(images)[0]

    def segment_checked(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """`segment`, and per image whether its logits were all finite (an argmax over NaN
        is a mask of nothing: non_finite_rows makes its row an error row)."""
        pixels = upload(images, self.device) if isinstance(images, np.ndarray) else images
        with self.inference():
            logits = self.run_fixed(pixels)
        finite = torch.isfinite(logits).flatten(1).all(dim=1).cpu().numpy()
        classes = logits.argmax(dim=1).cpu().numpy()
        return classes.astype(np.uint8 if logits.shape[1] <= 256 else np.uint16), finite


def load_predictor(spec: JobSpec, threads: int | None = None) -> Predictor:
    """The spec's task predictor, in the long-lived process that will run it: that process
    keeps freed host memory for the next batch where the spec asks (`retain_host_memory`)."""
    if spec.runtime.retain_host_memory:
        retain_freed_memory()
    return get_task(spec.task.kind).predictor_class()(spec, threads)


def class_fractions(mask: np.ndarray) -> np.ndarray:
    """float32 (classes present, 2): label_id and share of the pixels, largest share first."""
    counts = np.bincount(mask.ravel().astype(np.int64))
    present = np.flatnonzero(counts)
    order = present[np.argsort(-counts[present], kind="stable")]
    shares = counts[order] / mask.size
    return np.stack([order, shares], axis=1).astype(np.float32)
