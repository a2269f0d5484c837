"""A classifier's rate on CPU cores by images per call: what a larger CPU batch buys.

The model alone (random weights, channels-last, inference mode, random 224 px inputs), on
`--threads` torch threads, eager and (with `--compile`) compiled; each batch size in turn,
`--rounds` times, so the sizes share the machine's moods; the median per size.

    nice .venv/bin/python benchmarks/cpu_batch.py --batches 8 16 32 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--images", type=int, default=256, help="images a timed pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    import torch
    import torchvision

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = torchvision.models.get_model(args.architecture).eval()
    model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if args.compile else model
    rates: dict[int, list[float]] = {batch: [] for batch in args.batches}
    with torch.inference_mode():
        inputs = {
            batch: torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
            for batch in args.batches
        }
        for batch in args.batches:
            run(inputs[batch])  # warm: the first call (and a compile) is not timed
        for _ in range(args.rounds):
            for batch in args.batches:
                done, begun = 0, time.perf_counter()
                while done < args.images:
                    run(inputs[batch])
                    done += batch
                rates[batch].append(done / (time.perf_counter() - begun))
    mode = "compiled" if args.compile else "eager"
    print(f"{args.architecture}, {mode}, {args.threads} thread(s): images/s by images per call")
    for batch, runs in rates.items():
        figures = " ".join(f"{rate:.1f}" for rate in runs)
        print(f"  {batch:>4}  {figures}  median {statistics.median(runs):.1f}")


if __name__ == "__main__":
    main()
