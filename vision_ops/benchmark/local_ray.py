"""A fresh local Ray cluster for one measurement: every core, an isolated temp dir, shut after."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def local_ray(cores: int) -> Iterator[None]:
    """Ray started here and stopped on exit; RAY_ADDRESS is ignored meanwhile (the bench
    measures this machine, never a remote cluster)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    address = os.environ.pop("RAY_ADDRESS", None)
    # Short and private: no stale `ray_current_cluster`, and unix socket paths stay short.
    temp_dir = tempfile.mkdtemp(prefix="vob", dir="/tmp")
    try:
        ray.init(num_cpus=cores, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if address is not None:
            os.environ["RAY_ADDRESS"] = address
