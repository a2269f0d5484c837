"""Predictor processes keep freed host memory: a second batch of the same size reuses the first
one's pages instead of faulting in fresh ones (glibc; measured in a fresh process each)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from vision_ops.host_memory import _glibc, heap_trimmed

PAGE_FAULTS_OF_REPEATED_BATCHES = """
import resource, sys
import numpy as np
from vision_ops.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
np.ones(64 << 20, dtype=np.uint8).sum()  # the first batch: its pages are new either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    np.ones(64 << 20, dtype=np.uint8).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def printed_by(snippet: str, argument: str) -> str:
    """What `snippet` prints, run with `argument` in a fresh interpreter (its heap its own)."""
    run = subprocess.run(
        [sys.executable, "-c", snippet, argument], capture_output=True, text=True, check=True
    )
    return run.stdout.strip()


def page_faults(mode: str) -> int:
    return int(printed_by(PAGE_FAULTS_OF_REPEATED_BATCHES, mode))


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")
def test_freed_batches_are_reused_not_faulted_in_again() -> None:
    huge_pages = (64 << 20) // (2 << 20)  # numpy asks for 2 MiB pages; 4 KiB ones fault more
    assert page_faults("default") >= 5 * huge_pages  # every batch faults in fresh pages
    assert page_faults("retain") < huge_pages  # the first batch's pages serve the other five


FREED_HEAP_GIVEN_BACK = """
import ctypes, resource, sys
from vision_ops.host_memory import _glibc, heap_trimmed
libc = ctypes.CDLL(_glibc()._name)  # its own handle: the raw calls below declare their types
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
chunks = [libc.malloc(64 << 10) for _ in range(3200)]  # 200 MiB of heap, under mmap's threshold
for chunk in chunks:
    ctypes.memset(chunk, 1, 64 << 10)
used = rss_mb()
for chunk in chunks[:-1]:  # the last one stays above them: free() cannot shrink the heap's top
    libc.free(chunk)
held = rss_mb()
assert used - held < 20, f"free() gave back {used - held:.0f} MB: the heap's top moved"
passed = list(heap_trimmed(iter(range(3)), every_s=float(sys.argv[1])))
assert passed == [0, 1, 2], passed
print(held - rss_mb())
"""


def given_back_mb(every_s: float) -> float:
    return float(printed_by(FREED_HEAP_GIVEN_BACK, str(every_s)))


@pytest.mark.skipif(_glibc() is None, reason="malloc_trim is glibc's")
def test_freed_heap_is_given_back_as_the_rows_pass() -> None:
    assert given_back_mb(0.0) > 150  # of the 200 MiB freed, kept by the heap until trimmed
    assert given_back_mb(3600.0) < 20  # none due within the hour: the heap keeps them


def test_a_consumer_that_stops_closes_the_items_at_once() -> None:
    """The rows' own generator is closed as the trimmed rows are (its finally stops the
    driver's reader and predictor threads), not when it is collected."""
    closed: list[bool] = []

    def rows() -> Iterator[int]:
        try:
            yield from range(10)
        finally:
            closed.append(True)

    items = rows()  # held here: no collection closes it
    trimmed = heap_trimmed(items, every_s=0.0)
    assert next(trimmed) == 0 and next(trimmed) == 1
    trimmed.close()
    assert closed == [True]
