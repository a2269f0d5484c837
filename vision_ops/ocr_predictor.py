"""The OCR predictor: the spec's PP-OCR detector and recogniser on onnxruntime, once per actor."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vision_ops.adapters import onnx_session
from vision_ops.config import JobSpec, PpOcrModel
from vision_ops.errors import ModelError
from vision_ops.models import LoadedModel, model_name, read_pinned
from vision_ops.ocr import Line, OcrError, TextReader, characters, line_columns, packaged_model
from vision_ops.predictors import RAW_NOT_FINITE, Pixels, Predictor, pick_device
from vision_ops.storage import StorageOptions
from vision_ops.tasks import OcrTask


class TextPredictor(Predictor):
    """Reads the text of images of any size: each ok row gets its lines (text, score, polygon
    in source pixels), in reading order. The pair runs on onnxruntime: CUDA where the actor has
    a GPU (onnxruntime-gpu), else its CPU threads."""

    task = "ocr"

    def __init__(self, spec: JobSpec, threads: int | None = None) -> None:
        if not isinstance(spec.task, OcrTask) or not isinstance(spec.model, PpOcrModel):
            raise ModelError(
                "task.kind ocr with model.kind ppocr expected, found "
                f"{spec.task.kind} with {spec.model.kind}"
            )
        threads = spec.runtime.intra_op_threads or threads
        self.device = pick_device(spec.runtime.device)
        self.spec = spec.sized(1.0 if self.device.type == "cuda" else 0.0)
        self.reader, digest = load_reader(
            spec.model, spec.task, spec.storage_options, threads, self.device.type
        )
        # The sessions live in the reader; the rows take the pair's identity from here.
        self.model = LoadedModel(
            module=torch.nn.Identity(),
            name=model_name(spec.model),
            weights_sha256=digest,
            labels=None,
            preprocessing=None,
        )

    def predict_rows(self, images: Sequence[Pixels], ok: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.flatnonzero(ok).tolist()
        pixels = [_host(images[i]) for i in rows]
        found: list[list[Line] | None] = [None] * len(ok)
        not_finite = np.zeros(len(ok), dtype=bool)
        read, finite = self.reader.read_checked(pixels) if rows else ([], [])
        for row, lines, sure in zip(rows, read, finite, strict=True):
            found[row], not_finite[row] = lines, not sure
        return line_columns(found) | {RAW_NOT_FINITE: not_finite}


def load_reader(
    model: PpOcrModel,
    settings: OcrTask,
    options: StorageOptions,
    threads: int | None = None,
    device: str = "cpu",
) -> tuple[TextReader, str]:
    """The spec's detector, recogniser and dictionary as a TextReader, and one sha256 over the
    three files (the rows' model_weights_sha256)."""
    det_bytes, det_sha = _model_file(model.detector, "detector", options)
    rec_bytes, rec_sha = _model_file(model.recognizer, "recognizer", options)
    dictionary, dict_sha = None, ""
    if model.dictionary is not None:
        data, dict_sha = read_pinned(model.dictionary, None, options)
        dictionary = data.decode("utf-8-sig")
    try:
        detector = _session(det_bytes, "detector", threads, device)
        recognizer = _session(rec_bytes, "recognizer", threads, device)
        reader = TextReader(detector, recognizer, characters(recognizer, dictionary), settings)
    except OcrError as err:
        raise ModelError(f"model: {err}") from None
    digest = hashlib.sha256(f"{det_sha}:{rec_sha}:{dict_sha}".encode()).hexdigest()
    return reader, digest


def check_files(spec: JobSpec) -> None:
    """Where the spec names its own detector, recogniser or dictionary: the two load as ONNX
    models and the dictionary gives the recogniser's classes (ModelError), before any work
    rather than in each actor as the pool starts. The packaged pair is not loaded here: it
    holds together."""
    model = spec.model
    if not isinstance(model, PpOcrModel) or not isinstance(spec.task, OcrTask):
        return
    if any(uri is not None for uri in (model.detector, model.recognizer, model.dictionary)):
        load_reader(model, spec.task, spec.storage_options, threads=1)


def _model_file(uri: str | None, role: str, options: StorageOptions) -> tuple[bytes, str]:
    if uri is None:
        try:
            uri = str(packaged_model(role))
        except OcrError as err:
            raise ModelError(f"model.{role}: {err}") from None
    return read_pinned(uri, None, options)


def _session(data: bytes, role: str, threads: int | None, device: str) -> Any:
    try:
        return onnx_session(data, threads, device)
    except ImportError:
        raise ModelError(
            "model.kind ppocr needs onnxruntime: pip install 'vision-ops[ocr]'"
        ) from None
    except Exception as err:  # onnxruntime's own errors for a file that is not a model
        raise ModelError(f"model.{role}: not an ONNX model: {err}") from None


def _host(image: Pixels) -> np.ndarray:
    return image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
