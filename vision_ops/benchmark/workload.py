"""The fixed workload every approach gets: the same photos, weights, job spec and device."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vision_ops.benchmark.photos import PHOTO_SIZE, photo_set
from vision_ops.benchmark.spec import BenchSpec, job_spec
from vision_ops.benchmark.weights import weights_file
from vision_ops.config import JobSpec
from vision_ops.predictors import pick_device


@dataclass
class Workload:
    bench: BenchSpec
    photos: Path  # a folder holding exactly `bench.images` JPEGs
    weights: Path
    gpus: float  # GPUs this machine has (the pipeline's default pool takes one)
    exclude_pids: set[int] = field(default_factory=set)  # processes not counted (S3 server)

    @property
    def paths(self) -> list[Path]:
        return sorted(self.photos.glob("*.jpg"))

    @property
    def images(self) -> int:
        return self.bench.images

    @property
    def batch_size(self) -> int:
        """The job's batch size (the bench's, unless --spec overrides it): every approach's."""
        return self.job().runtime.images_per_call

    @property
    def excluded(self) -> frozenset[int]:
        return frozenset(self.exclude_pids)

    def job(
        self,
        input_uri: str | None = None,
        output_uri: str | None = None,
        run_id: str = "bench",
        storage_options: dict[str, dict[str, Any]] | None = None,
    ) -> JobSpec:
        """The pipeline's job on these photos (by default: the local folder)."""
        return job_spec(
            self.bench,
            input_uri=input_uri or str(self.photos),
            output_uri=output_uri or str(self.output_dir("unused", fresh=False)),
            weights=self.weights,
            run_id=run_id,
            gpus=self.gpus,
            storage_options=storage_options,
        )

    def device(self) -> torch.device:
        return pick_device(self.job().runtime.device)

    def autocast(self) -> str:
        return self.job().runtime.autocast

    def output_dir(self, name: str, fresh: bool = True) -> Path:
        """workdir/outputs/NAME, emptied first unless `fresh` is False."""
        folder = self.bench.workdir / "outputs" / name
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        return folder

    def with_images(self, count: int) -> Workload:
        """The same workload on `count` photos (the memory-scaling run)."""
        bench = self.bench.model_copy(update={"images": count})
        photos = photo_set(bench.workdir, count, bench.seed)
        return Workload(bench, photos, self.weights, self.gpus, self.exclude_pids)


def prepare(bench: BenchSpec) -> Workload:
    """Photos and weights on disk (cached in the workdir), the machine's GPUs counted."""
    photos = photo_set(bench.workdir, bench.images, bench.seed)
    weights = weights_file(bench.workdir, bench.architecture, bench.seed)
    return Workload(bench, photos, weights, float(torch.cuda.device_count()))


def photo_description() -> str:
    width, height = PHOTO_SIZE
    return f"{width}x{height} JPEG q90"
