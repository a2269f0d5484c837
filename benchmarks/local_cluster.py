"""The embedded local cluster's footprint with and without Ray's dashboard.

Each round starts the cluster as `vision-ops run` does where RAY_ADDRESS is unset
(`connect_ray`, with `runtime.local_dashboard` off, then on), in a fresh process, waits for it to
settle, and reports `ray.init`'s seconds, the processes it started, their summed PSS and their
CPU seconds so far (summed as the bench sums a job's: vision_ops.benchmark.probes); medians
over the rounds, the two settings alternating.

    .venv/bin/python benchmarks/local_cluster.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

PROBE = """
import json, sys, time
import psutil, ray
from vision_ops.benchmark.probes import CpuTally, process_tree, tree_memory, tree_roles
from vision_ops.pipeline import connect_ray
root = psutil.Process()
started = time.perf_counter()
connect_ray(dashboard=sys.argv[1] == "on")
init_s = time.perf_counter() - started
time.sleep(float(sys.argv[2]))
roles = tree_roles(root, process_tree(root, frozenset()))
cluster = {process: role for process, role in roles.items() if role != "driver"}
memory = tree_memory(cluster)
tally = CpuTally(root)  # not begun: each process's CPU since it started
tally.sample(cluster)
print(json.dumps({"init_s": init_s, "processes": memory.processes,
                  "pss_mb": (memory.pss_bytes or 0) / 1e6, "cpu_s": sum(tally.by_role().values())}))
ray.shutdown()
"""


def one_round(dashboard: str, settle_s: float) -> dict[str, float]:
    """One start of the cluster in a fresh process with a Ray temp root of its own."""
    root = tempfile.mkdtemp(prefix="vlc", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": root}
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, dashboard, str(settle_s)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait before measuring")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for dashboard in runs:
            runs[dashboard].append(one_round(dashboard, args.settle_s))
    print(f"local_dashboard  ray.init s  processes  PSS MB  CPU s  (medians of {args.rounds})")
    medians = {
        dashboard: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for dashboard, rounds in runs.items()
    }
    for dashboard, m in medians.items():
        print(
            f"{dashboard:<16} {m['init_s']:>10.2f} {m['processes']:>10.0f} "
            f"{m['pss_mb']:>7.0f} {m['cpu_s']:>6.2f}"
        )
    off, on = medians["off"], medians["on"]
    print(
        f"off / on: ray.init {off['init_s'] / on['init_s']:.2f}x, "
        f"PSS {off['pss_mb'] / on['pss_mb']:.2f}x, CPU {off['cpu_s'] / on['cpu_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
