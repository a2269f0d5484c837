"""Detection throughput: the whole pipeline against the model alone, same batch, same device.

    .venv/bin/python benchmarks/detection.py --images 48 --batch-size 4
    python3 benchmarks/detection.py --architecture fasterrcnn_resnet50_fpn_v2 --device cuda \
        --autocast bfloat16 --images 500 --batch-size 16 --out detection.json   # on a GPU

The model-only rate is the ceiling: decoded tensors already on the device, the model called on
batches of the same size at the same precision, on as many threads as one predictor actor gets
(its num_cpus). The pipeline is `run_job` on the same files (local Ray: read + decode tasks,
one actor, Parquet commit). Its rate is given two ways: rows / pipeline seconds (actor
start-up and model load included), and the steady rate from the run's progress between the
actor's first output block and its last (start-up and drain left out), as `vision-ops bench`
measures its pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image


def write_images(folder: Path, count: int, height: int, width: int) -> list[np.ndarray]:
    """Seeded smooth-noise JPEGs (compress like photos); returns their decoded pixels."""
    rng = np.random.default_rng(0)
    decoded = []
    for index in range(count):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        image.save(folder / f"img{index:04d}.jpg", quality=90)
        decoded.append(np.asarray(Image.open(folder / f"img{index:04d}.jpg").convert("RGB")))
    return decoded


def precision(device: str, autocast: str) -> contextlib.AbstractContextManager[None]:
    """The pipeline's mixed precision (runtime.autocast), which applies on a GPU only."""
    if autocast == "off" or device != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, autocast))


def model_only_rate(
    model: torch.nn.Module, images: list[np.ndarray], args: argparse.Namespace
) -> list[float]:
    device, batch = args.device, args.batch_size
    tensors = [torch.from_numpy(i).permute(2, 0, 1).float().div(255).to(device) for i in images]
    rates = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        with torch.inference_mode(), precision(device, args.autocast):
            for start in range(0, len(tensors), batch):
                model(tensors[start : start + batch])
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(len(tensors) / (time.perf_counter() - started))
    return rates


def pipeline_rates(
    folder: Path, weights: Path, args: argparse.Namespace, run: int
) -> tuple[float, float | None]:
    """(rows / pipeline seconds, steady rows/s or None) of one committed run of the job."""
    from vision_ops.benchmark.e2e import pool_blocks
    from vision_ops.benchmark.rates import steady_rate
    from vision_ops.config import parse_spec
    from vision_ops.pipeline import run_job
    from vision_ops.pool import gpus_per_actor
    from vision_ops.sink import committed_run

    spec = parse_spec(
        {
            "input": {"uris": [str(folder / "images")]},
            "task": {"kind": "detection", "score_threshold": 0.5},
            "model": {"architecture": args.architecture, "weights": str(weights)},
            "runtime": {
                "batch_size": args.batch_size,
                "min_actors": 1,
                "max_actors": 1,
                "num_cpus_per_actor": args.actor_cpus,
                "device": args.device,
                "autocast": args.autocast,
            },
            "output": {"uri": str(folder / "table")},
            "run": {"id": f"bench-{run}"},
        }
    )
    summary = run_job(spec)
    manifest = committed_run(spec.output.uri, spec.run.id, {}) or {}
    progress = [(float(t), int(rows)) for t, rows in manifest.get("progress", [])]
    sized = spec.sized(gpus_per_actor(spec.runtime, float(torch.cuda.device_count())))
    return summary.images_per_second, steady_rate(progress, edge_rows=pool_blocks(sized))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="fasterrcnn_mobilenet_v3_large_fpn")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--actor-cpus", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--autocast", default="off", choices=["off", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()

    import ray

    ray.init(include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.set_num_threads(args.actor_cpus)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        images = write_images(folder / "images", args.images, args.height, args.width)
        torch.manual_seed(0)
        builder = torchvision.models.get_model_builder(args.architecture)
        model = builder(weights=None, weights_backbone=None).eval().to(args.device)
        torch.save(model.state_dict(), folder / "weights.pt")
        alone = model_only_rate(model, images, args)
        runs = [pipeline_rates(folder, folder / "weights.pt", args, r) for r in range(args.repeats)]
    figures = summarise(args, alone, [whole for whole, _ in runs], [s for _, s in runs])
    print(report(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


def summarise(
    args: argparse.Namespace, alone: list[float], piped: list[float], steady: list[float | None]
) -> dict:
    """Every rate, their medians and the pipeline's ratios to the model alone."""
    model_rate, pipe_rate = statistics.median(alone), statistics.median(piped)
    measured = [rate for rate in steady if rate is not None]
    steady_median = statistics.median(measured) if measured else None
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_only_images_per_second": alone,
        "pipeline_images_per_second": piped,
        "pipeline_steady_images_per_second": steady,
        "medians": {"model_only": model_rate, "pipeline": pipe_rate, "steady": steady_median},
        "pipeline_over_model_only": pipe_rate / model_rate,
        "steady_over_model_only": steady_median / model_rate if steady_median else None,
    }


def report(figures: dict) -> str:
    args, medians = figures["settings"], figures["medians"]
    setup = f"batch {args['batch_size']}, {args['device']}, autocast {args['autocast']}"
    threads = f"{args['actor_cpus']} thread(s) per actor"
    images = f"{args['images']} images {args['width']}x{args['height']}"

    def rates(values: list[float | None]) -> str:
        return " ".join("-" if rate is None else f"{rate:.2f}" for rate in values)

    def ratio(value: float | None) -> str:
        return "- (no steady state: too few blocks)" if value is None else f"{value:.2f}"

    steady = medians["steady"]
    return "\n".join(
        [
            f"\n{args['architecture']}, {images}, {setup}, {threads}",
            f"model only : {rates(figures['model_only_images_per_second'])} images/s, "
            f"median {medians['model_only']:.2f}",
            f"pipeline   : {rates(figures['pipeline_images_per_second'])} images/s, "
            f"median {medians['pipeline']:.2f} (start-up included)",
            f"steady     : {rates(figures['pipeline_steady_images_per_second'])} images/s, "
            f"median {'-' if steady is None else f'{steady:.2f}'} (start-up and drain left out)",
            f"pipeline / model-only (medians): {figures['pipeline_over_model_only']:.2f}",
            f"steady / model-only (medians): {ratio(figures['steady_over_model_only'])}",
        ]
    )


if __name__ == "__main__":
    main()
