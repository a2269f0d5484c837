"""Freed host memory: kept for the next batch in a long-lived predictor process, or given back
as the rows pass in a run whose model runs in the driver's threads.

glibc's malloc hands every large block (a batch's activations: tens of MB) back to the kernel
when it is freed, and takes fresh zeroed pages for the next batch: on a CPU that costs page
faults and about a tenth of the model's time in the kernel. With mmap off and trimming only
past a high mark, freed blocks stay in the heap and the next batch reuses them. The process
then holds its peak working set, which a model actor does anyway. Elsewhere (musl, macOS)
this is a no-op.

The driver's threads are the other way round: its readers and predictors each take a glibc
arena, and the freed chunks left in them between batches are held by the process until the
arenas' tops happen to free, so a run in one process grew from 1.1 to 1.5 GB PSS over 4,000
photos. `heap_trimmed` gives them back (`malloc_trim`) every few seconds as the rows pass
(docs/performance.md, "Freed heap given back").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # give memory back only past 1 GiB of free heap
# A trim hands back the freed working set too, which the next batches fault in again. A run of
# 4,000 photos in one process peaked at 1.46-1.52 GB PSS untrimmed; trimmed every 0.5 s, at
# 1.20 GB for 8 % more CPU; every 5 s, at 1.29 GB for about 3 % (docs/performance.md).
TRIM_EVERY_S = 5.0

Item = TypeVar("Item")


@functools.cache
def retain_freed_memory() -> bool:
    """Keep this process's freed large blocks for reuse; True where glibc took the settings."""
    libc = _glibc()
    if libc is None:
        return False
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and (
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
    log.debug("glibc malloc keeps freed memory for reuse: %s", applied)
    return applied


def heap_trimmed(items: Iterable[Item], every_s: float = TRIM_EVERY_S) -> Iterator[Item]:
    """The items handed on unchanged, this process's freed heap given back to the kernel
    (glibc's `malloc_trim`, all arenas) as they pass, at most once every `every_s` seconds;
    elsewhere the items alone."""
    libc = _glibc()
    if libc is None:
        yield from items
        return
    iterator = iter(items)
    due = time.monotonic() + every_s
    try:
        for item in iterator:
            yield item
            if time.monotonic() >= due:
                libc.malloc_trim(0)
                due = time.monotonic() + every_s
    finally:  # a consumer that stops: the items closed now, as `yield from` would close them
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]  # the padding left at the heap's top
    return libc
