"""Detection throughput: the whole pipeline against the model alone, same batch, same device.

    .venv/bin/python benchmarks/detection.py --images 48 --batch-size 4

The model-only rate is the ceiling: decoded tensors already in memory, the model called on
batches of the same size, on as many threads as one predictor actor gets (its num_cpus). The
pipeline rate is `vision-ops run` on the same files (local Ray: read + decode tasks, one actor,
Parquet commit), rows / pipeline seconds, actor start-up and model load included.
"""

from __future__ import annotations

import argparse
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


def model_only_rate(
    model: torch.nn.Module, images: list[np.ndarray], batch: int, device: str, repeats: int
) -> list[float]:
    tensors = [torch.from_numpy(i).permute(2, 0, 1).float().div(255).to(device) for i in images]
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(tensors), batch):
                model(tensors[start : start + batch])
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(len(tensors) / (time.perf_counter() - started))
    return rates


def pipeline_rate(folder: Path, weights: Path, args: argparse.Namespace, run: int) -> float:
    from vision_ops.config import parse_spec
    from vision_ops.pipeline import run_job

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
            },
            "output": {"uri": str(folder / "table")},
            "run": {"id": f"bench-{run}"},
        }
    )
    return run_job(spec).images_per_second


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
        alone = model_only_rate(model, images, args.batch_size, args.device, args.repeats)
        piped = [pipeline_rate(folder, folder / "weights.pt", args, r) for r in range(args.repeats)]
    report(args, alone, piped)


def report(args: argparse.Namespace, alone: list[float], piped: list[float]) -> None:
    model_rate, pipe_rate = statistics.median(alone), statistics.median(piped)
    setup = f"batch {args.batch_size}, {args.device}, {args.actor_cpus} thread(s) per actor"
    print(f"\n{args.architecture}, {args.images} images {args.width}x{args.height}, {setup}")
    print(f"model only : {' '.join(f'{r:.2f}' for r in alone)} images/s, median {model_rate:.2f}")
    print(f"pipeline   : {' '.join(f'{r:.2f}' for r in piped)} images/s, median {pipe_rate:.2f}")
    print(f"pipeline / model-only (medians): {pipe_rate / model_rate:.2f}")


if __name__ == "__main__":
    main()
