"""Which compiled models a node has compiled before: a record kept inside torch's compile cache.

torch.compile caches what it built on the node (inductor's FX-graph and AOT caches, keyed on the
graph, its shapes, the torch version, inductor's settings and on a CPU the thread count), so
compiling a model a second time takes seconds where the first took tens of seconds. Whether
compiling pays for a run therefore depends on the node, and only the node can tell: each actor
looks here before it compiles, and records a compile once it is done. The record lives in the
cache's own folder, so clearing the cache clears the record with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir

log = logging.getLogger(__name__)
RECORD_FOLDER = "vision-ops-compiled"


@dataclass(frozen=True)
class CompiledModel:
    """What a compiled graph depends on: the model's weights, its one static input shape, its
    memory format, whether its BatchNorms are folded, the device, the torch that compiled it
    and its thread count (inductor's CPU kernels are built for it, and its cache keys on it: a
    compile with 2 threads leaves one with 1 thread cold)."""

    model: str
    weights_sha256: str
    batch: int
    crop: int
    channels_last: bool
    fold_batch_norm: bool  # the spec's: BatchNorms folded where they fold
    device: str
    threads: int
    torch: str = torch.__version__

    def digest(self) -> str:
        content = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(content).hexdigest()


def record_folder() -> Path:
    """This node's record: a folder in torch's inductor cache (TORCHINDUCTOR_CACHE_DIR, by default
    under the temp folder)."""
    return Path(cache_dir()) / RECORD_FOLDER


def compiled_here_before(compiled: CompiledModel) -> bool:
    return (record_folder() / compiled.digest()).is_file()


def remember_compiled(compiled: CompiledModel) -> None:
    """Records a finished compile; a record that cannot be written costs only the next run's
    choice (it compiles as on a cold node), so it is a warning, not a failure."""
    folder = record_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as file:
            json.dump(asdict(compiled), file)
        os.replace(file.name, folder / compiled.digest())  # whole, even with actors side by side
    except OSError as error:
        log.warning("could not record the compiled model in %s: %s", folder, error)
