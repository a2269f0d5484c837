"""Peers: the same job written the usual way in naive Ray Data (d), PyTorch (e) and Daft (f).

Each writes path + top-5 to Parquet with the time each batch left the model, from which its
steady-state rate is measured.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vision_ops.benchmark.local_ray import local_ray
from vision_ops.benchmark.probes import Peaks, sampled_peaks
from vision_ops.benchmark.rates import points_from_times, steady_rate
from vision_ops.benchmark.report import SCALE_SUFFIX, Measurement
from vision_ops.benchmark.spec import APPROACHES, CROP, IMAGENET_MEAN, IMAGENET_STD, RESIZE
from vision_ops.benchmark.weights import inference, plain_model, top_k
from vision_ops.benchmark.workload import Workload
from vision_ops.storage import read_parquet

DONE_AT = "done_at"  # when the row's batch left the model (seconds since the epoch)


def imagenet_transform(from_pil: bool) -> Callable[[Any], torch.Tensor]:
    """torchvision's ImageNet eval transform: on a PIL image (the DataLoader way), or on a
    numpy HWC array converted to a float tensor first (the way Ray's guide writes it)."""
    from torchvision import transforms as T

    geometry = [T.Resize(RESIZE), T.CenterCrop(CROP)]
    normalise = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if from_pil:
        return T.Compose([*geometry, T.ToTensor(), normalise])
    return T.Compose([T.ToTensor(), *geometry, normalise])


def prediction_columns(paths: list[str], logits: torch.Tensor) -> dict[str, Any]:
    ids, scores = top_k(logits)
    return {
        "path": paths,
        "label_id": ids[:, 0],
        "top5_label_id": ids,
        "top5_score": scores,
        DONE_AT: np.full(len(paths), time.time()),
    }


def predictions_table(columns: dict[str, Any]) -> pa.Table:
    """Columns of one or more batches -> a plain Arrow table (top-5 as lists)."""
    return pa.table(
        {
            "path": pa.array(columns["path"], pa.string()),
            "label_id": pa.array(columns["label_id"], pa.int32()),
            "top5_label_id": pa.array(list(columns["top5_label_id"]), pa.list_(pa.int32())),
            "top5_score": pa.array(list(columns["top5_score"]), pa.list_(pa.float32())),
            DONE_AT: pa.array(columns[DONE_AT], pa.float64()),
        }
    )


@dataclass(frozen=True)
class PeerOutput:
    """What an approach wrote, read back: rows, distinct photos, top-1 by file name, timing."""

    rows: int
    distinct: int
    top1: dict[str, int]
    steady: float | None

    @classmethod
    def read(cls, folder: Path) -> PeerOutput:
        """The Parquet files under `folder` (as a dataset scan would find them: none whose
        name, or a folder's on the way, starts with `_` or `.`), read file by file on this
        thread: a scan's threads aborted short-lived processes (storage.ParquetFile)."""
        files = sorted(
            path
            for path in folder.rglob("*.parquet")
            if not any(part.startswith(("_", ".")) for part in path.relative_to(folder).parts)
        )
        if not files:
            raise ValueError(f"{folder}: the approach wrote no Parquet file")
        columns = ["path", "label_id", DONE_AT]
        tables = [read_parquet(path.read_bytes(), columns) for path in files]
        table = pa.concat_tables(tables, promote_options="permissive")
        names = [os.path.basename(str(p)) for p in table["path"].to_pylist()]
        top1 = dict(zip(names, table["label_id"].to_pylist(), strict=True))
        steady = steady_rate(points_from_times(table[DONE_AT].to_pylist()))
        return cls(table.num_rows, len(set(names)), top1, steady)


def peer_measurement(
    work: Workload, key: str, output: PeerOutput, wall: float, peaks: Peaks, includes: str
) -> Measurement:
    return Measurement(
        key=key,
        approach=APPROACHES[key.removesuffix(SCALE_SUFFIX)],
        rows=output.rows,
        expected_rows=work.images,
        images_per_second=output.steady or output.rows / wall,
        steady_state=output.steady is not None,
        wall_seconds=wall,
        peaks=peaks,
        includes=includes,
        details={"distinct_photos": output.distinct},
    )


# --- (d) naive Ray Data ------------------------------------------------------------------------


def ray_guide_preprocess(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decoded images -> float32 normalised (N, 3, 224, 224), on the CPU (Ray's guide)."""
    transform = imagenet_transform(from_pil=False)
    tensors = [transform(np.asarray(image)).numpy() for image in batch["image"]]
    return {"path": batch["path"], "transformed_image": np.stack(tensors)}


class RayGuideClassifier:
    """The guide's callable class: loads the model once, scores float32 batches."""

    def __init__(self, weights: str, architecture: str, device: str, autocast: str) -> None:
        self.device, self.autocast = torch.device(device), autocast
        self.model = plain_model(Path(weights), architecture, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images = torch.as_tensor(batch["transformed_image"], device=self.device)
        with inference(self.device, self.autocast):
            logits = self.model(images)
        return prediction_columns(list(batch["path"]), logits)


def naive_ray(work: Workload, key: str = "d") -> tuple[Measurement, dict[str, int]]:
    """(d) read_images -> map_batches float32 preprocessing -> a 1-actor model pool (1 CPU, and
    the GPU where there is one) -> write_parquet."""
    import ray
    from ray.data import ActorPoolStrategy

    folder = work.output_dir(f"naive-ray-{key}")
    device, gpus = work.device(), 1 if work.device().type == "cuda" else 0
    with sampled_peaks(work.bench.sample_interval_s, work.excluded) as peaks:
        started = time.perf_counter()
        with local_ray(work.bench.cores):
            images = ray.data.read_images(str(work.photos), mode="RGB", include_paths=True)
            tensors = images.map_batches(ray_guide_preprocess, batch_format="numpy")
            predictions = tensors.map_batches(
                RayGuideClassifier,
                fn_constructor_kwargs={
                    "weights": str(work.weights),
                    "architecture": work.bench.architecture,
                    "device": device.type,
                    "autocast": work.autocast(),
                },
                compute=ActorPoolStrategy(size=1),
                num_cpus=1,
                num_gpus=gpus,
                batch_size=work.batch_size,
                batch_format="numpy",
            )
            predictions.write_parquet(str(folder))
            wall = time.perf_counter() - started
    output = PeerOutput.read(folder)
    includes = (
        "ray.init, read_images, torchvision ToTensor/Resize/CenterCrop/Normalize to float32 in "
        "CPU tasks, 1 model actor (1 CPU), write_parquet; img/s after the first batch left "
        "the model"
    )
    return peer_measurement(work, key, output, wall, peaks, includes), output.top1


# --- (e) PyTorch DataLoader --------------------------------------------------------------------


class PhotoFiles(torch.utils.data.Dataset):
    """File paths -> (normalised float tensor, index), decoded with PIL in the loader's workers."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.transform = imagenet_transform(from_pil=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), index


def dataloader_loop(work: Workload, key: str = "e") -> tuple[Measurement, dict[str, int]]:
    """(e) DataLoader with one worker per core, the model in this process on every core."""
    folder = work.output_dir(f"dataloader-{key}")
    paths, device = work.paths, work.device()
    with sampled_peaks(work.bench.sample_interval_s, work.excluded) as peaks:
        started = time.perf_counter()
        torch.set_num_threads(work.bench.cores)
        model = plain_model(work.weights, work.bench.architecture, device)
        loader = torch.utils.data.DataLoader(
            PhotoFiles(paths),
            batch_size=work.batch_size,
            num_workers=work.bench.cores,
            pin_memory=device.type == "cuda",
        )
        tables = []
        for images, indexes in loader:
            with inference(device, work.autocast()):
                logits = model(images.to(device, non_blocking=True))
            batch_paths = [str(paths[i]) for i in indexes.tolist()]
            tables.append(predictions_table(prediction_columns(batch_paths, logits)))
        folder.mkdir(parents=True)
        pq.write_table(pa.concat_tables(tables), folder / "predictions.parquet")
        wall = time.perf_counter() - started
    output = PeerOutput.read(folder)
    includes = (
        f"model load, {work.bench.cores} loader workers (PIL decode, Resize/CenterCrop/"
        "ToTensor/Normalize), model in the main process, Parquet; img/s after the first batch"
    )
    return peer_measurement(work, key, output, wall, peaks, includes), output.top1


# --- (f) Daft ----------------------------------------------------------------------------------


def daft_classifier(work: Workload) -> Any:
    """A `@daft.cls` whose batch method scores uint8 (N, 224, 224, 3) image tensors."""
    import daft
    from daft import DataType

    result = DataType.struct(
        {
            "label_id": DataType.int32(),
            "top5_label_id": DataType.list(DataType.int32()),
            "top5_score": DataType.list(DataType.float32()),
            DONE_AT: DataType.float64(),
        }
    )
    gpus = 1 if work.device().type == "cuda" else 0

    @daft.cls(gpus=gpus, max_concurrency=1)
    class DaftClassifier:
        def __init__(self, weights: str, architecture: str, device: str, autocast: str) -> None:
            self.device, self.autocast = torch.device(device), autocast
            self.model = plain_model(Path(weights), architecture, self.device)
            self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
            self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

        @daft.method.batch(return_dtype=result, batch_size=work.batch_size, unnest=True)
        def predict(self, images: daft.Series) -> list[dict[str, Any]]:
            arrays = np.array(images.to_arrow().to_numpy_ndarray())  # a writable copy
            pixels = torch.from_numpy(arrays).to(self.device)
            floats = pixels.permute(0, 3, 1, 2).float().div(255.0).sub(self.mean).div(self.std)
            with inference(self.device, self.autocast):
                ids, scores = top_k(self.model(floats))
            now = time.time()
            return [
                {
                    "label_id": int(i[0]),
                    "top5_label_id": i.tolist(),
                    "top5_score": s.tolist(),
                    DONE_AT: now,
                }
                for i, s in zip(ids, scores, strict=True)
            ]

    return DaftClassifier(
        str(work.weights), work.bench.architecture, work.device().type, work.autocast()
    )


def daft_job(work: Workload, key: str = "f") -> tuple[Measurement, dict[str, int]]:
    """(f) glob -> download -> decode -> resize to 224 x 224 -> batch UDF -> write_parquet, on
    Daft's native (local, multi-threaded) runner."""
    os.environ.setdefault("DO_NOT_TRACK", "1")  # no telemetry call from an offline machine
    logging.getLogger("tracing.span").setLevel(logging.WARNING)  # Daft's per-operator spans
    try:
        import daft
        import daft.functions as F
    except ImportError:
        raise RuntimeError("approach f needs Daft: pip install 'vision-ops[bench]'") from None
    folder = work.output_dir(f"daft-{key}")
    with sampled_peaks(work.bench.sample_interval_s, work.excluded) as peaks:
        started = time.perf_counter()
        frame = daft.from_glob_path(str(work.photos / "*.jpg"))
        image = F.resize(F.decode_image(F.download(daft.col("path"))), CROP, CROP)
        frame = frame.with_column("pixels", F.image_to_tensor(image))
        frame = frame.select("path", daft_classifier(work).predict(daft.col("pixels")))
        frame.write_parquet(str(folder), write_mode="overwrite")
        wall = time.perf_counter() - started
    output = PeerOutput.read(folder)
    includes = (
        "Daft native runner: glob, url download, decode, resize to 224x224 (Daft's resize "
        "squashes the 4:3 photo; no centre crop), @daft.cls batch UDF normalising on the "
        "device, write_parquet; img/s after the first batch"
    )
    return peer_measurement(work, key, output, wall, peaks, includes), output.top1
