"""One run at a time per output table: a lock object with a lease in the table's root.

The lock is only ever written over the version its writer read (`lock_file`: conditional
writes on S3, an `flock` of the folder on local disk), so of two runs that start in the same
instant, or that take over one stale lock together, one gets it; the other is told another run
took it. A run that dies leaves the lock until its lease runs out (`run.lock_lease_s`), then
the next run takes it over; a holder sure to be gone is taken over at once (it ran on this same
host, and its process is gone or its pid now another process's, or the host rebooted since the
lock was last written; a holder in another container of the host, whose pids this process
cannot see, or on another machine of the same name, is left to its lease). The holder renews
its lease from a thread for as long as it holds the lock, its commit included, each renewal
written over its own last version only, and reads the lock back right before its commit point:
a run whose lock was taken over (its lease ran out while the store did not answer, or its host
was misjudged gone) does not commit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType

from vision_ops.errors import EXIT_FAILED, VisionOpsError
from vision_ops.lock_file import Raced, lock_file
from vision_ops.storage import StorageError, StorageOptions, filesystem, writing_to

LOCK_NAME = "_lock.json"
LOCK_FIELDS = ("owner", "run_id", "host", "pid", "since", "expires")
RENEWALS_PER_LEASE = 4  # the holder renews its lease this often within it

log = logging.getLogger(__name__)


class LockHeld(VisionOpsError, RuntimeError):
    """Another run holds the table's lock."""

    exit_code = EXIT_FAILED


class LockLost(VisionOpsError, RuntimeError):
    """The run no longer holds the table's lock: another run took it over, or the lease ran
    out while the store did not answer. The run must not commit."""

    exit_code = EXIT_FAILED


@dataclass
class RunLock:
    """The table's lock for one run, held from `__enter__` to `__exit__`: a thread renews the
    lease a few times within it for as long as the run holds the lock (its commit included)."""

    root_uri: str
    run_id: str
    lease_s: int
    storage_options: StorageOptions = field(default_factory=dict)
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    _written_at: float = 0.0  # time.monotonic() of the last write of the lease
    _version: str | None = None  # the lock object's version this run last wrote
    _lost: str | None = None  # why the lock is no longer this run's, once a renewal found out
    _stop: threading.Event = field(default_factory=threading.Event)
    _renewer: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.fs, root = filesystem(self.root_uri, self.storage_options)
        self.path = f"{root.rstrip('/')}/{LOCK_NAME}"
        self.file = lock_file(self.fs, self.path)

    def acquire(self) -> None:
        with writing_to(self.root_uri):
            self._acquire()

    def _acquire(self) -> None:
        held, version = self._read()
        if held and held["owner"] != self.owner and _now() < _expiry(held) and _alive(held):
            raise LockHeld(
                f"{self.root_uri} is being written by run {held['run_id']} "
                f"(host {held['host']}, pid {held['pid']}, since {held['since']}; lease until "
                f"{held['expires']}): wait for it, or remove {LOCK_NAME} if that run is dead"
            )
        raced = LockHeld(f"{self.root_uri}: another run took the lock at the same moment")
        try:
            self._write(over=version)
        except Raced:
            raise raced from None
        held, _ = self._read()  # a store without an atomic swap keeps the last writer's lock
        if (held or {}).get("owner") != self.owner:
            raise raced

    def require_held(self) -> None:
        """LockLost where the lock is no longer this run's (another run took it over), or may
        not be (not renewed for a whole lease: the store did not answer). No I/O: call it as
        often as the run likes, and right before its commit point."""
        if self._lost is not None:
            raise LockLost(self._lost)
        unrenewed = time.monotonic() - self._written_at
        if unrenewed >= self.lease_s:
            raise LockLost(
                f"{self.root_uri}: the run's lock was not renewed for {unrenewed:.0f} s, its "
                f"whole lease (run.lock_lease_s={self.lease_s}); another run may have taken the "
                "table over, so this run does not commit"
            )

    def confirm_held(self) -> None:
        """`require_held`, and the lock read back to be sure it still names this run (one read:
        call it right before the commit point). A takeover between two renewals is caught
        here, not at the next renewal, after the commit."""
        self.require_held()
        with writing_to(self.root_uri):
            held, _ = self._read()
        if (held or {}).get("owner") != self.owner:
            self._lost = self._taken_over(held)
            raise LockLost(self._lost)

    def renew(self) -> None:
        """Extend the lease, written over this run's own last version of the lock only; where
        another run wrote the lock since, note it lost (for `require_held`) and stop renewing."""
        with writing_to(self.root_uri):
            try:
                self._write(over=self._version)
            except Raced:
                self._lost = self._taken_over(self._read()[0])

    def _taken_over(self, held: dict[str, str] | None) -> str:
        """Why the run lost the lock, `held` being the lock as it is now."""
        taker = f"run {held['run_id']} (host {held['host']})" if held else "no run"
        return (
            f"{self.root_uri}: the table's lock was taken over while run {self.run_id} held it "
            f"({LOCK_NAME} now names {taker}); this run does not commit"
        )

    def release(self) -> None:
        """Remove the lock where it is still this run's: over the version read only (another
        run that took it over since keeps its lock)."""
        with writing_to(self.root_uri):
            held, version = self._read()
            if held and held["owner"] == self.owner and version is not None:
                with contextlib.suppress(Raced):
                    self.file.remove(expected=version)

    def _keep_renewing(self) -> None:
        """The renewal thread: a lease's quarter apart, until the run ends or loses the lock.
        A renewal that fails is retried at the next turn (`require_held` refuses the commit
        once a whole lease has passed without one)."""
        while not self._stop.wait(self.lease_s / RENEWALS_PER_LEASE) and self._lost is None:
            try:
                self.renew()
            except Exception as err:  # the store's errors are not one type
                log.warning("run %s: its lock's lease was not renewed: %s", self.run_id, err)

    def _read(self) -> tuple[dict[str, str] | None, str | None]:
        """The lock as held now (None: no lock) and the version of the object it was read from."""
        data, version = self.file.read()
        if data is None:
            return None, version
        try:
            held = dict(json.loads(data))
            missing = [name for name in LOCK_FIELDS if name not in held]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            _expiry(held)
        except (ValueError, TypeError) as err:  # not JSON, not an object, no date
            raise LockHeld(
                f"{self.root_uri}: its lock {LOCK_NAME} cannot be read ({err}); remove it if "
                "no run is writing the table"
            ) from None
        return held, version

    def _write(self, over: str | None) -> None:
        """Write this run's lock with a fresh lease, over the lock object's version `over`
        only (None: only where there is none); Raced where another run's lock is there. A
        refused write that finds the lock this run's all the same (a retried PUT whose first
        try had landed, or an earlier renewal of this run's that landed late) is this write
        landed, or is written again over it: the lease runs from this write either way."""
        started = time.monotonic()  # the lease written runs from no earlier than this
        data = self._content()
        try:
            self._version = self.file.write(data, expected=over)
        except Raced:
            there, version = self.file.read()
            if there is None or _owner(there) != self.owner:
                raise
            self._version = version if there == data else self.file.write(data, version)
        self._written_at = started

    def _content(self) -> bytes:
        now = _now()
        return json.dumps(
            {
                "owner": self.owner,
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": str(os.getpid()),
                **{name: value for name, value in this_process().items() if value},
                "since": now.isoformat(),
                "expires": (now + dt.timedelta(seconds=self.lease_s)).isoformat(),
            }
        ).encode()

    def __enter__(self) -> RunLock:
        self.acquire()
        self._renewer = threading.Thread(
            target=self._keep_renewing, name="vision-ops-lock", daemon=True
        )
        self._renewer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self.release()
        except (StorageError, LockHeld) as err:  # the lease ends the lock all the same
            if exc is None:  # the run committed: say so, not that it failed
                log.warning(
                    "run %s: the table's lock could not be removed (%s); it lapses with its lease",
                    self.run_id,
                    err,
                )


def _owner(data: bytes) -> str | None:
    """The owner a lock object names; None where it names none or cannot be read."""
    try:
        return str(json.loads(data)["owner"])
    except (ValueError, TypeError, KeyError):
        return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _alive(held: dict[str, str]) -> bool:
    """False only where the holder is sure to be gone: it ran on this host since its last boot,
    in this pid namespace (containers sharing the host's name have pids of their own), and its
    pid is no process now, or a process started at another time (the pid reused). A lock
    written before these were recorded is judged on its host and pid alone."""
    if held.get("host") != socket.gethostname():
        return True
    here = this_process()
    if _differs(held, here, "boot"):
        # Another boot: of this host, whose processes are then all gone, where the lock was
        # last written before this boot began; else another machine of the same name (cloned
        # VMs, containers given one hostname), alive as far as anyone here can tell.
        return not _written_before_this_boot(held)
    if _differs(held, here, "pid_namespace"):
        return True  # another container's pid: not one this process can look up
    try:
        pid = int(held["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return not _differs(held, {"started": _started(pid)}, "started")


def _written_before_this_boot(held: dict[str, str]) -> bool:
    """Whether the lock was last written (its `since`) before this host last booted."""
    stat = _read_text("/proc/stat") or ""
    boot = next((line.split()[1] for line in stat.splitlines() if line.startswith("btime ")), None)
    if boot is None:
        return False
    written = dt.datetime.fromisoformat(held["since"])
    return written < dt.datetime.fromtimestamp(int(boot), dt.timezone.utc)


def _differs(held: dict[str, str], here: dict[str, str | None], name: str) -> bool:
    """Both sides know `name`, and it differs."""
    return bool(held.get(name)) and bool(here.get(name)) and held[name] != here[name]


def this_process() -> dict[str, str | None]:
    """What tells this process apart beyond host and pid (Linux; None elsewhere): the boot, the
    pid namespace, and the process's start time."""
    return {
        "boot": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": _read_link("/proc/self/ns/pid"),
        "started": _started(os.getpid()),
    }


def _started(pid: int) -> str | None:
    """The process's start time, in clock ticks after boot (/proc/PID/stat's 22nd field)."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[19] if stat else None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _read_link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _expiry(held: dict[str, str]) -> dt.datetime:
    return dt.datetime.fromisoformat(held["expires"])
