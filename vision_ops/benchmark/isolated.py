"""A call in a fresh spawned process of its own: what this process imported, loaded and freed
before it neither counts in the call's memory nor spares it a start. The child logs as this
process does."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from vision_ops.logs import log, log_at

Result = TypeVar("Result")


def in_a_fresh_process(call: Callable[..., Result], *args: Any) -> Result:
    """`call(*args)` in a new spawned Python process; its result (or error) as it pickles."""
    spawn = multiprocessing.get_context("spawn")
    level = log.getEffectiveLevel()
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=log_at, initargs=(level,)) as child:
        return child.submit(call, *args).result()
