"""Freed host memory kept for the next batch, in a long-lived predictor process.

glibc's malloc hands every large block (a batch's activations: tens of MB) back to the kernel
when it is freed, and takes fresh zeroed pages for the next batch: on a CPU that costs page
faults and about a tenth of the model's time in the kernel. With mmap off and trimming only
past a high mark, freed blocks stay in the heap and the next batch reuses them. The process
then holds its peak working set, which a model actor does anyway. Elsewhere (musl, macOS)
this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # give memory back only past 1 GiB of free heap


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


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None
