"""Predictor processes keep freed host memory: a second batch of the same size reuses the first
one's pages instead of faulting in fresh ones (glibc; measured in a fresh process each)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vision_ops.host_memory import _glibc

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


def page_faults(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", PAGE_FAULTS_OF_REPEATED_BATCHES, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(run.stdout.strip())


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")
def test_freed_batches_are_reused_not_faulted_in_again() -> None:
    huge_pages = (64 << 20) // (2 << 20)  # numpy asks for 2 MiB pages; 4 KiB ones fault more
    assert page_faults("default") >= 5 * huge_pages  # every batch faults in fresh pages
    assert page_faults("retain") < huge_pages  # the first batch's pages serve the other five
