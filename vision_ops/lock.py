"""One run at a time per output table: a lock object with a lease in the table's root.

Taking the lock is check-then-write with a read-back of the owner: two runs starting in the
same instant on a store without conditional writes could both pass. A run that dies leaves the
lock until its lease runs out (`run.lock_lease_s`), then the next run takes it over; a holder
that ran on this same host and whose process is gone is taken over at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType

from vision_ops.errors import EXIT_FAILED, VisionOpsError
from vision_ops.storage import StorageError, StorageOptions, filesystem, make_folder, writing_to

LOCK_NAME = "_lock.json"


class LockHeld(VisionOpsError, RuntimeError):
    """Another run holds the table's lock."""

    exit_code = EXIT_FAILED


@dataclass
class RunLock:
    root_uri: str
    run_id: str
    lease_s: int
    storage_options: StorageOptions = field(default_factory=dict)
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    _written_at: float = 0.0

    def __post_init__(self) -> None:
        self.fs, root = filesystem(self.root_uri, self.storage_options)
        self.path = f"{root.rstrip('/')}/{LOCK_NAME}"

    def acquire(self) -> None:
        with writing_to(self.root_uri):
            self._acquire()

    def _acquire(self) -> None:
        held = self._read()
        if held and held["owner"] != self.owner and _now() < _expiry(held) and _alive(held):
            raise LockHeld(
                f"{self.root_uri} is being written by run {held['run_id']} "
                f"(host {held['host']}, pid {held['pid']}, since {held['since']}; lease until "
                f"{held['expires']}): wait for it, or remove {LOCK_NAME} if that run is dead"
            )
        self._write()
        if (self._read() or {}).get("owner") != self.owner:
            raise LockHeld(f"{self.root_uri}: another run took the lock at the same moment")

    def renew_if_due(self) -> None:
        """Extend the lease once a quarter of it has passed (call it as the run goes)."""
        if time.monotonic() - self._written_at > self.lease_s / 4:
            with writing_to(self.root_uri):
                self._write()

    def release(self) -> None:
        with writing_to(self.root_uri):
            held = self._read()
            if held and held["owner"] == self.owner:
                self.fs.rm(self.path)

    def _read(self) -> dict[str, str] | None:
        try:
            return dict(json.loads(self.fs.cat_file(self.path)))
        except FileNotFoundError:
            return None

    def _write(self) -> None:
        now = _now()
        content = {
            "owner": self.owner,
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "since": now.isoformat(),
            "expires": (now + dt.timedelta(seconds=self.lease_s)).isoformat(),
        }
        make_folder(self.fs, self.path.rpartition("/")[0])
        self.fs.pipe_file(self.path, json.dumps(content).encode())
        self._written_at = time.monotonic()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.release()
            return
        with contextlib.suppress(StorageError):  # report the run's own error; a lock expires
            self.release()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _alive(held: dict[str, str]) -> bool:
    """False only when the holder ran on this host and its process is gone."""
    if held.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(held["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _expiry(held: dict[str, str]) -> dt.datetime:
    return dt.datetime.fromisoformat(held["expires"])
