"""A test's script run in a process of its own that starts a `ray.cluster_utils.Cluster` (two
raylets) in a Ray temp root of its own, so that no cluster address is left for later tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_cluster_script(script: str, *args: str, timeout: int = 540) -> dict[str, Any]:
    """Run `script` (`python -c`, argv: `args`, then its Cluster's temp root) with the tests'
    folder on its path; the JSON object its last line of output prints. Fails the test with
    its stderr where it exits non-zero."""
    ray_temp = Path(tempfile.mkdtemp(prefix="vos", dir="/tmp"))  # short: Ray's socket paths
    (ray_temp / "ray").mkdir()  # where the Cluster records its address (ray_current_cluster)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(ray_temp), "PYTHONPATH": str(Path(__file__).parent)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, *args, str(ray_temp / "ray")],
            env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return outcome
