"""What a benchmark run measures (BenchSpec), and the job spec the pipeline gets from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vision_ops.benchmark.weights import (
    DEFAULT_ARCHITECTURE,
    TOP_K,
    classification_architectures,
)
from vision_ops.config import JobSpec, SpecError, parse_spec
from vision_ops.pool import gpus_per_actor

# The approaches, by the letter the command line names them with.
APPROACHES = {
    "a": "decode + preprocess ceiling",
    "b": "model-only ceiling",
    "c": "vision-ops pipeline (end to end)",
    "g": "vision-ops pipeline, the model in the driver (runtime.predict_in: driver)",
    "h": "vision-ops pipeline on a running cluster (joined, not started; predict_in: auto)",
    "i": "vision-ops pipeline in one process, Ray not started (runtime.runner: in_process)",
    "d": "naive Ray Data",
    "e": "PyTorch DataLoader",
    "f": "Daft",
}
# torchvision's ImageNet preprocessing (what ResNet-18's weights declare), spelled out so every
# approach uses the same numbers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224


def default_workdir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vision-ops-bench"


class BenchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    images: int = Field(default=64, gt=0, description="Photos every approach classifies (N).")
    architecture: str = Field(
        default=DEFAULT_ARCHITECTURE,
        description="The torchvision classifier every approach runs (random weights), e.g. "
        "resnet18, resnet50, vit_b_16.",
    )
    batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Images per model call, everywhere; by default the job's own, derived from "
        "the device (runtime.batch_size).",
    )
    only: tuple[str, ...] = Field(
        default=tuple(APPROACHES), description="Approaches to run, by letter (a-i)."
    )
    s3: bool = Field(default=True, description="Also run the pipeline from s3:// (SeaweedFS).")
    scale: int = Field(
        default=1,
        ge=1,
        description="Also run the pipeline and its peers (c-i) on scale x images, and compare "
        "the pipeline's peak RSS at both sizes (1: don't).",
    )
    workdir: Path = Field(
        default_factory=default_workdir, description="Photos and weights (cached), outputs."
    )
    out: Path = Field(default=Path("bench.json"), description="The JSON report.")
    runtime: dict[str, Any] = Field(
        default_factory=dict,
        description="runtime.* settings over the bench's own (from --spec FILE), validated by "
        "the job spec's RuntimeSpec.",
    )
    repeats: int = Field(default=3, gt=0, description="Timed repeats of the model-only ceiling.")
    seed: int = Field(default=0, ge=0, description="Seeds the photos and the random weights.")
    cores: int = Field(
        default_factory=lambda: os.cpu_count() or 1, gt=0, description="CPU cores to use."
    )
    sample_interval_s: float = Field(default=0.2, gt=0, description="Memory sampling period.")

    @field_validator("architecture")
    @classmethod
    def _a_torchvision_classifier(cls, value: str) -> str:
        known = classification_architectures()
        if value not in known:
            raise ValueError(
                f"expected a torchvision classification model such as resnet18, resnet50 or "
                f"efficientnet_b0 ({len(known)} in torchvision.models.list_models("
                f"module=torchvision.models)); found {value!r}"
            )
        return value

    @field_validator("only")
    @classmethod
    def _known_approaches(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [key for key in value if key not in APPROACHES]
        if unknown or not value:
            known = ", ".join(f"{k} ({v})" for k, v in APPROACHES.items())
            raise ValueError(f"expected letters among {known}; found {list(value)}")
        return tuple(key for key in APPROACHES if key in value)  # run in a fixed order


def parse_bench_spec(values: dict[str, Any]) -> BenchSpec:
    """A BenchSpec from plain values (the command line's); SpecError says what is wrong."""
    try:
        return BenchSpec.model_validate(values)
    except ValidationError as err:
        problems = [
            f"  {'.'.join(str(p) for p in e['loc']) or '(bench)'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        ]
        raise SpecError("invalid bench settings:\n" + "\n".join(problems)) from None


def runtime_overrides(path: Path) -> dict[str, Any]:
    """The `runtime:` mapping of a job spec file (the bench sets input, model and output)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"--spec {path}: cannot read: {err}") from None
    runtime = raw.get("runtime") if isinstance(raw, dict) else None
    if not isinstance(runtime, dict):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise SpecError(f"--spec {path}: expected a `runtime:` mapping, found {found}")
    return runtime


def default_runtime(bench: BenchSpec, gpus: float) -> dict[str, Any]:
    """On a GPU machine one actor holds the device and 1 CPU, and every other core decodes in
    the read tasks. On CPUs only there is one single-threaded actor per core, each decoding its
    own batches (`decode: device`), holding half the cores' logical CPUs between them; the other
    half is reserved for the read tasks, which only fetch bytes. Several single-threaded model
    processes outrun one multi-threaded one there (no thread barrier stalls when another
    process takes a core), and decoding between batches leaves no decoder competing with the
    model for the cores."""
    if gpus >= 1:
        actors, per_actor, reserved, decode = 1, 1.0, max(1, bench.cores - 1), "tasks"
    else:
        reserved = max(1, bench.cores // 2)
        actors = bench.cores
        per_actor = max(1, bench.cores - reserved) / actors
        decode = "device"
    batch = {} if bench.batch_size is None else {"batch_size": bench.batch_size}
    return batch | {
        "decode": decode,
        "min_actors": actors,
        "max_actors": actors,
        "num_cpus_per_actor": per_actor,
        "reserved_cpus": reserved,
        "compile": True,
    }


def job_spec(
    bench: BenchSpec,
    *,
    input_uri: str,
    output_uri: str,
    weights: Path,
    run_id: str,
    gpus: float,
    storage_options: dict[str, dict[str, Any]] | None = None,
) -> JobSpec:
    """The job every pipeline run of the bench executes: the bench's classifier, top-5 at
    224 px, sized for an actor of the pool it gets on this machine."""
    runtime = default_runtime(bench, gpus) | bench.runtime
    job = parse_spec(
        {
            "input": {"uris": [input_uri], "extensions": [".jpg"]},
            "task": {"kind": "classification", "top_k": TOP_K},
            "model": {
                "kind": "torchvision",
                "architecture": bench.architecture,
                "weights": str(weights),
                "name": f"{bench.architecture}-random-seed{bench.seed}",
                "preprocessing": {
                    "resize": RESIZE,
                    "crop": CROP,
                    "mean": list(IMAGENET_MEAN),
                    "std": list(IMAGENET_STD),
                    "interpolation": "bilinear",
                },
            },
            "runtime": runtime,
            "output": {"uri": output_uri},
            "run": {"id": run_id, "date": "2026-01-01"},
            "storage_options": storage_options or {},
        }
    )
    return job.sized(gpus_per_actor(job.runtime, gpus))
