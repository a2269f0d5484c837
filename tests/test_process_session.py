"""tests/process_session.py: a killed run leaves no process that can still write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from process_session import kill_session, live_members

# A writer that moves to a process group of its own (as the raylet puts a Ray worker) and
# appends a line every 20 ms; a leader that starts it and waits.
WRITER = """
import os, sys, time
os.setpgrp()
while True:
    with open(sys.argv[1], "a") as out:
        out.write("x\\n")
    time.sleep(0.02)
"""
LEADER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(600)
"""


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_killed_session_leaves_no_writer(tmp_path: Path) -> None:
    out = tmp_path / "writes"
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER, WRITER, str(out)], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while lines(out) < 3:
            assert time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.02)
        assert len(live_members(leader.pid)) == 2  # the leader and its writer
        os.killpg(leader.pid, signal.SIGKILL)  # the leader's group: the writer is not in it
        leader.wait(timeout=30)
        before = lines(out)
        time.sleep(0.2)
        assert lines(out) > before, "the writer was in the leader's group after all"
        kill_session(leader.pid)
        assert live_members(leader.pid) == []
        after = lines(out)
        time.sleep(0.2)
        assert lines(out) == after  # nothing of the session writes any more
    finally:
        kill_session(leader.pid)
