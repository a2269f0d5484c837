"""A short job in this one process, Ray not started (`runtime.runner`: in_process, or auto for a
short run on one machine).

Ray's start (about 4 s of `ray.init` on 2 cores) and its processes (about 1 GB PSS) are most of
what a short run pays beyond its peers' (docs/performance.md, "A run in one process").
Here the driver lists the inputs into one Arrow table (`listing.held_listing`), reads and
decodes them in threads as the read tasks would (Pillow and torch let go of the GIL as they
decode and resize), and runs the model in threads of its own as `predict_in: driver` does
(`in_driver.predicted_in_threads`); the rows are committed as any run's.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import ray
from ray.data._internal.batcher import Batcher
from ray.data.block import Block, BlockAccessor

from vision_ops.config import JobSpec, RuntimeSpec
from vision_ops.errors import ReadFailed, VisionOpsError
from vision_ops.pipeline.in_driver import Batch
from vision_ops.pipeline.listing import HeldListing, held_listing
from vision_ops.pool import PoolPlan, plan_pool, units_for_the_driver
from vision_ops.sources import InputPlan

log = logging.getLogger(__name__)


def listed_in_process(spec: JobSpec, inputs: InputPlan, table: str | None) -> HeldListing | None:
    """The run's inputs held here where the run goes in this process: `runtime.runner:
    in_process`, or auto where nothing sends it to Ray (`ray_chosen_for`) and the listing holds
    at most `units_for_the_driver` inputs; else None: the run goes to Ray."""
    runner = spec.runtime.runner
    if runner == "ray":
        return None
    if runner == "in_process":
        return held_listing(spec.input, inputs, table)
    found = ray_chosen_for(spec)
    if found is not None:
        log.info("runtime.runner: auto: the run goes to Ray (%s)", found)
        return None
    most = units_for_the_driver(spec.runtime)
    held = held_listing(spec.input, inputs, table, most)
    log.info(
        "runtime.runner: auto: %s inputs listed (runtime.driver_max_inputs%s: %d): the run goes %s",
        f"over {most}" if held is None else held.count,
        ", under compile_min_inputs with compile on" if spec.runtime.compile else "",
        most,
        "to Ray" if held is None else "in this process",
    )
    return held


def may_run_in_process(spec: JobSpec) -> bool:
    """Whether the run may go in this process (`listed_in_process` decides once it lists):
    the command line then starts no Ray while it imports the model stack."""
    runner = spec.runtime.runner
    return runner == "in_process" or (runner == "auto" and ray_chosen_for(spec) is None)


def ray_chosen_for(spec: JobSpec) -> str | None:
    """Why `runtime.runner: auto` takes Ray whatever the run's size, as found; None: the
    listing's count decides."""
    found = spec.ray_needed_for()
    if found is not None:
        return found
    if os.environ.get("RAY_ADDRESS"):
        return "RAY_ADDRESS names a cluster to join"
    if ray.is_initialized():
        return "Ray is up in this process already"
    if spec.runtime.device == "auto" and _has_a_gpu():
        return "this machine has a GPU"
    return None


def _has_a_gpu() -> bool:
    import torch  # the run's model stack: imported by the model's check already

    return bool(torch.cuda.is_available())


def process_plan(runtime: RuntimeSpec) -> PoolPlan:
    """The predictors as threads of this process, on the CPUs it may use (`usable_cpus`),
    sized as `plan_pool` sizes a pool on a one-node cluster of them; the rest of the CPUs
    read."""
    node = {"CPU": float(usable_cpus()), "GPU": 0.0}
    return plan_pool(runtime, node, None, [(node, 1.0)])


def usable_cpus() -> int:
    """The CPUs this process may use: those it may run on, within its container's CPU limit
    (as Ray counts a node's CPUs: a pod's `limits.cpu`, not the host's cores)."""
    from ray._private.utils import get_num_cpus  # the cgroup-aware count Ray's own node uses

    on = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(on or 1, int(get_num_cpus())))


def read_in_threads(
    rows: pa.Table, read: Callable[[Batch], Iterable[Batch]], files: int, threads: int
) -> Generator[Block, None, None]:
    """The listing's units read (`read`: `reader.unit_reader`'s, on `files` listing rows at a
    time, as a read task takes them) in `threads` threads, at most twice as many reads under
    way or waiting to be handed on, in the listing's order; each block as Ray Data keeps a read
    task's (`BlockAccessor.batch_to_block`), so its columns reach the predictors as from Ray.
    A read that fails (not an input's error row: the store gone) ends them as ReadFailed."""
    starts = range(0, rows.num_rows, files)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="reader")
    reading: deque[Future[list[Block]]] = deque()

    def read_blocks(start: int) -> list[Block]:
        listed = BlockAccessor.for_block(rows.slice(start, files)).to_batch_format("numpy")
        try:
            return [BlockAccessor.batch_to_block(block) for block in read(listed)]
        except VisionOpsError:  # a bad spec or input: its own message and exit code
            raise
        except Exception as err:  # what a read task's failure would be
            raise ReadFailed.of(err) from err

    try:
        for start in starts:
            reading.append(pool.submit(read_blocks, start))
            if len(reading) >= 2 * threads:
                yield from reading.popleft().result()
        while reading:
            yield from reading.popleft().result()
    finally:  # a failure, Ctrl-C or a consumer that stops: no queued read starts
        pool.shutdown(wait=True, cancel_futures=True)


def model_batches(blocks: Iterable[Block], size: int) -> Generator[Batch, None, None]:
    """The read blocks cut and joined into batches of `size` units (the last one fewer), in
    numpy, as Ray Data's `iter_batches(batch_size=size, batch_format="numpy")` hands them on."""
    batcher = Batcher(size)
    for block in blocks:
        batcher.add(block)
        while batcher.has_batch():
            yield _numpy(batcher.next_batch())
    batcher.done_adding()
    while batcher.has_any():
        yield _numpy(batcher.next_batch())


def _numpy(block: Block) -> Batch:
    batch: Batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    return batch
