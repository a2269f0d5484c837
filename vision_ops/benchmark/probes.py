"""Peak memory while an approach runs: the process tree's RSS and PSS, and Ray's object store;
and the CPU time its processes spent, by role.

A background thread samples them; RSS is summed over this process and every descendant.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

SAMPLE_INTERVAL_S = 0.2
# PSS walks each process's page tables (tens of ms a sweep of a Ray job's processes, on the
# cores it measures: 7 CPU seconds of a 55 s pipeline run at every 5th tick): every 10th tick.
PSS_EVERY = 10
TREE_DESCRIPTION = (
    "summed over the job's own process (the bench's, for the ceilings) and all its "
    "descendants (Ray's GCS, raylet, agents and workers; DataLoader and process-pool workers), "
    "the S3 server excepted"
)


@dataclass
class Peaks:
    """The largest values seen while sampling (bytes), and how many samples were taken."""

    rss_bytes: int = 0
    pss_bytes: int = 0
    object_store_bytes: int | None = None  # None: no Ray cluster was up while sampling
    processes: int = 0
    samples: int = 0
    # The sample of the peak PSS, by process role (process_role): where the memory was.
    pss_by_role: dict[str, int] = field(default_factory=dict)
    # CPU seconds (user + system) spent while sampling, by process role: where the cores went.
    # A process's last sample counts, so one that exits loses at most a tick's worth.
    cpu_seconds_by_role: dict[str, float] = field(default_factory=dict)
    # CPU seconds the sampling thread itself spent (part of the driver's): what measuring cost
    # the approach, more for a tree of many processes (PSS walks each one's page tables).
    sampler_cpu_seconds: float = 0.0


@dataclass(frozen=True)
class TreeMemory:
    rss_bytes: int
    pss_bytes: int | None
    processes: int
    pss_by_role: dict[str, int] = field(default_factory=dict)


def process_tree(root: psutil.Process, exclude: frozenset[int]) -> list[psutil.Process]:
    """`root` and its descendants, less the `exclude` pids and their descendants.

    One pass over the machine's processes a call: asking each process for its children would
    read every process's parent again per process of the tree, and the bench's own sampling
    would take a share of the cores it measures."""
    children: dict[int, list[tuple[int, int]]] = {}
    for pid, (parent, started) in _parents().items():
        children.setdefault(parent, []).append((pid, started))
    found, queue = [], [(root.pid, 0)]
    while queue:
        pid, started = queue.pop()
        if pid in exclude:
            continue
        with contextlib.suppress(psutil.Error):
            found.append(root if pid == root.pid else _process(pid, started))
        queue.extend(children.get(pid, []))
    return found


def _parents() -> dict[int, tuple[int, int]]:
    """Every process's parent pid and start time (clock ticks since boot), from
    /proc/PID/stat (Linux, as PSS is)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{name}/stat", "rb") as stat,
            ):
                # pid (comm) state ppid ... starttime (the 22nd): comm may hold spaces
                fields = stat.read().rsplit(b")", 1)[1].split()
                parents[int(name)] = (int(fields[1]), int(fields[19]))
    return parents


@functools.lru_cache(maxsize=4096)
def _process(pid: int, started: int) -> psutil.Process:
    """One psutil handle a process, cached by pid and start time (a reused pid is another
    process), so that its CPU times and role are followed from tick to tick."""
    return psutil.Process(pid)


def tree_memory(roles: dict[psutil.Process, str], with_pss: bool = True) -> TreeMemory:
    """RSS (and PSS, which shares shared pages out among the processes mapping them, summed
    by process role too) summed over the processes of a tree, given with their roles."""
    rss, count = 0, 0
    by_role: dict[str, int] = {}
    for process, role in roles.items():
        try:
            rss += process.memory_info().rss
            if with_pss:
                by_role[role] = by_role.get(role, 0) + proportional_set_size(process.pid)
        except (psutil.Error, OSError):
            continue  # a worker that exited between the listing and the read
        count += 1
    pss = sum(by_role.values()) if with_pss else None
    return TreeMemory(rss, pss, count, by_role)


def tree_roles(root: psutil.Process, processes: list[psutil.Process]) -> dict[psutil.Process, str]:
    """Each process of `root`'s tree with its role (`root` itself: the driver); a process that
    exited meanwhile is left out."""
    roles: dict[psutil.Process, str] = {}
    for process in processes:
        with contextlib.suppress(psutil.Error, OSError):
            roles[process] = "driver" if process.pid == root.pid else process_role(process)
    return roles


# Ray's own processes, by a word of their command line.
RAY_PROCESSES = {
    "gcs_server": "ray gcs_server",
    "raylet": "ray raylet",
    "dashboard": "ray dashboard and agents",
    "agent": "ray dashboard and agents",
    "monitor": "ray monitors",
    "client.server": "ray client server",
    "ray start": "ray start (a running head's keeper)",
}


ACTOR_METHOD = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*")


def process_role(process: psutil.Process) -> str:
    """What a process of the tree is: a Ray worker by its title (`ray::IDLE`, an actor's class,
    a task's stages), one of Ray's own processes, or another program by its name."""
    command = " ".join(process.cmdline())
    if command.startswith("ray::"):
        title = command.split()[0].removeprefix("ray::")
        if ")." in title:  # an actor running a method (`Class(...).submit`): the actor's role
            title = title.rsplit(").", 1)[0] + ")"
        elif ACTOR_METHOD.fullmatch(title):  # `Class.method`, an actor with no arguments shown
            title = title.split(".", 1)[0]
        return "ray worker " + (title if len(title) <= 48 else title[:45] + "...")
    program = " ".join(part for part in command.split() if not part.startswith("-"))
    for word, role in RAY_PROCESSES.items():
        if word in program:
            return role
    return process.name()


def proportional_set_size(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
        for line in rollup:
            if line.startswith(b"Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class ObjectStoreGauge:
    """Bytes used in the local Ray cluster's object store, read from the raylet; None while
    no cluster is up. Connects lazily, so it follows clusters started and stopped meanwhile."""

    def __init__(self) -> None:
        self._state: Any = None
        self._address: str | None = None

    def used_bytes(self) -> int | None:
        import ray
        from ray._private.internal_api import get_memory_info_reply

        if not ray.is_initialized():
            self.close()
            return None
        try:
            state = self._connect(ray.get_runtime_context().gcs_address)
            reply = get_memory_info_reply(state, timeout_seconds=2.0)
        except Exception:  # a cluster starting or shutting down between two samples
            self.close()
            return None
        return int(reply.store_stats.object_store_bytes_used)

    def _connect(self, address: str) -> Any:
        from ray._private.internal_api import get_state_from_address

        if self._state is None or address != self._address:
            self.close()
            self._state, self._address = get_state_from_address(address), address
        return self._state

    def close(self) -> None:
        if self._state is not None:
            with contextlib.suppress(Exception):
                self._state.disconnect()
        self._state, self._address = None, None


@dataclass
class CpuTally:
    """Each process's CPU seconds since the tally began, under its latest role (a Ray worker
    starts as `IDLE` and takes an actor's or a task's title)."""

    root: psutil.Process
    # keyed by the process (psutil tells processes apart by pid and start time)
    _start: dict[psutil.Process, float] = field(default_factory=dict)
    _latest: dict[psutil.Process, tuple[str, float]] = field(default_factory=dict)

    def begin(self, exclude: frozenset[int]) -> CpuTally:
        for process in process_tree(self.root, exclude):
            with contextlib.suppress(psutil.Error):
                self._start[process] = _cpu_seconds(process)
        return self

    def sample(self, roles: dict[psutil.Process, str]) -> None:
        """Each process's CPU seconds so far, under its role now (`tree_roles`)."""
        for process, role in roles.items():
            try:
                spent = _cpu_seconds(process) - self._start.get(process, 0.0)
                if process in self._latest and role == process.name():
                    role = self._latest[process][0]  # exiting, its command line gone: as it was
            except psutil.Error:
                continue  # exited meanwhile: its last sample stands
            self._latest[process] = (role, spent)

    def by_role(self) -> dict[str, float]:
        tally: dict[str, float] = {}
        for role, spent in self._latest.values():
            tally[role] = tally.get(role, 0.0) + spent
        return tally


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@dataclass
class PeakSampler:
    """Samples the tree's memory every `interval_s` until stopped; `peaks` holds the maxima."""

    interval_s: float = SAMPLE_INTERVAL_S
    exclude: frozenset[int] = frozenset()
    ray_object_store: bool = True
    peaks: Peaks = field(default_factory=Peaks)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _cpu: CpuTally | None = None

    def start(self) -> PeakSampler:
        self._cpu = CpuTally(psutil.Process(os.getpid())).begin(self.exclude)
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Peaks:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample(with_pss=True)  # a last reading, so a short run has at least one PSS
        if self._cpu is not None:
            self.peaks.cpu_seconds_by_role = self._cpu.by_role()
        return self.peaks

    def _run(self) -> None:
        gauge = ObjectStoreGauge() if self.ray_object_store else None
        tick = 0
        began = time.thread_time()
        try:
            while not self._stop.is_set():
                self.sample(with_pss=tick % PSS_EVERY == 0, gauge=gauge)
                tick += 1
                self.peaks.sampler_cpu_seconds = time.thread_time() - began
                self._stop.wait(self.interval_s)
        finally:
            if gauge is not None:
                gauge.close()

    def sample(self, with_pss: bool, gauge: ObjectStoreGauge | None = None) -> None:
        root = psutil.Process(os.getpid())
        roles = tree_roles(root, process_tree(root, self.exclude))  # once a tick, for both
        memory = tree_memory(roles, with_pss)
        if self._cpu is not None:
            self._cpu.sample(roles)
        peaks = self.peaks
        peaks.rss_bytes = max(peaks.rss_bytes, memory.rss_bytes)
        if (memory.pss_bytes or 0) > peaks.pss_bytes:
            peaks.pss_bytes, peaks.pss_by_role = memory.pss_bytes or 0, memory.pss_by_role
        peaks.processes = max(peaks.processes, memory.processes)
        peaks.samples += 1
        used = gauge.used_bytes() if gauge is not None else None
        if used is not None:
            peaks.object_store_bytes = max(peaks.object_store_bytes or 0, used)


@contextlib.contextmanager
def sampled_peaks(
    interval_s: float = SAMPLE_INTERVAL_S, exclude: frozenset[int] = frozenset()
) -> Iterator[Peaks]:
    """Peaks of everything run inside the block (the object is filled in when it ends)."""
    sampler = PeakSampler(interval_s, exclude).start()
    try:
        yield sampler.peaks
    finally:
        sampler.stop()
