"""What a compile costs an actor on a cold node and on a warm one, by torch thread count.

The pipeline's `Classifier` (random ResNet-18 weights, the bench's preprocessing, channels-last,
`runtime.compile` on), built in a fresh process for each step, as an actor builds it; every
step shares one new inductor cache folder, so the first step compiles from nothing and each
later one finds what the steps before it left. Prints each step's `compile_seconds`
(torch.compile and the first, compiling call) and whether the compile record
(`vision_ops/compile_record.py`) held the model before the step.

    .venv/bin/python benchmarks/compile_cache.py --threads 1 1 2 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

IMAGENET = {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# One step, in an interpreter of its own, as an actor: the compile seconds.
STEP = """
import json, sys
from vision_ops.config import parse_spec
from vision_ops.predictors import Classifier

classifier = Classifier(parse_spec(json.loads(sys.argv[1])))
print(json.dumps({"compile_seconds": classifier.compile_seconds}))
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--batch", type=int, default=8, help="the static batch compiled")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 1, 2, 2], help="one step per entry"
    )
    return parser.parse_args(argv)


def step_spec(architecture: str, weights: Path, batch: int, threads: int) -> dict:
    return {
        "input": {"uris": ["/unused"]},
        "task": {"kind": "classification"},
        "model": {"architecture": architecture, "weights": str(weights), "preprocessing": IMAGENET},
        "runtime": {"compile": True, "batch_size": batch, "intra_op_threads": threads},
        "output": {"uri": "/unused"},
    }


def main(argv: Sequence[str] | None = None) -> None:
    import torch
    import torchvision

    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="compile-cache-"))
    weights = folder / f"{args.architecture}.pt"
    torch.save(torchvision.models.get_model(args.architecture).state_dict(), weights)
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor")}
    print(f"{'step':>4} {'threads':>7} {'recorded before':>15} {'compile s':>9}")
    for step, threads in enumerate(args.threads, start=1):
        recorded = recorded_before(folder / "inductor", threads)
        spec = json.dumps(step_spec(args.architecture, weights, args.batch, threads))
        done = subprocess.run(
            [sys.executable, "-c", STEP, spec], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            sys.exit(f"step {step} failed:\n{done.stderr[-2000:]}")
        seconds = json.loads(done.stdout.splitlines()[-1])["compile_seconds"]
        print(
            f"{step:>4} {threads:>7} {'yes' if recorded else 'no':>15} {seconds:>9.1f}", flush=True
        )


def recorded_before(cache: Path, threads: int) -> bool:
    """Whether the record holds a compile at this thread count (one model per run here)."""
    from vision_ops.compile_record import RECORD_FOLDER

    records = (cache / RECORD_FOLDER).glob("[0-9a-f]*")
    return any(json.loads(path.read_text())["threads"] == threads for path in records)


if __name__ == "__main__":
    main()
