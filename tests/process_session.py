"""Killing a run the way a crash does: every process it started, at once, and nothing left.

A test starts a run's driver with `start_new_session=True` so that it can kill the run whole.
Killing the driver's process group is not enough: Ray starts each worker in a process group of
its own (the raylet's per-worker groups), so an actor outlives the kill until it notices its
raylet is gone, and in that window it can finish a model call and write. A killed run's
leftovers then race whatever the test does next. Every process keeps the session it was born
in, so the session is what names the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

PROC = Path("/proc")
GONE_STATES = frozenset("ZXx")  # a zombie or a dead task runs nothing


def live_members(session: int) -> list[int]:
    """The pids of the processes of `session` that still run (zombies left out)."""
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended while we looked
            continue
        state, _parent, _group, its_session = stat.rsplit(")", 1)[1].split()[:4]
        if int(its_session) == session and state not in GONE_STATES:
            members.append(int(entry.name))
    return members


def kill_session(leader: int, timeout: float = 60.0) -> None:
    """SIGKILL every process of the session `leader` leads and wait until none of them runs."""
    deadline = time.monotonic() + timeout
    while members := live_members(leader):
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes {members} outlived the kill"
        time.sleep(0.02)
