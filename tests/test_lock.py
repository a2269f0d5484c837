"""The table's run lock: its lease renewed from a thread while a run holds it, a lock taken
over or left unrenewed refused at the commit, an unreadable lock named, a lock that cannot be
removed after a commit only warned about, a holder judged gone only where it surely is, and the
lock object written only over the version its writer read (S3, local disk, memory)."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vision_ops.lock import LOCK_NAME, LockHeld, LockLost, RunLock, this_process
from vision_ops.lock_file import LockFile, Raced, lock_file
from vision_ops.storage import filesystem

OTHER_RUN = {
    "owner": "another-owner",
    "run_id": "nightly-elsewhere",
    "host": "elsewhere",
    "pid": "1",
    "since": "2026-12-04T00:00:00+00:00",
    "expires": "2099-01-01T00:00:00+00:00",
}


def held_lock(root: Path) -> dict[str, str]:
    return dict(json.loads((root / LOCK_NAME).read_text()))


def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def lost(lock: RunLock) -> bool:
    try:
        lock.require_held()
    except LockLost:
        return True
    return False


def test_the_lease_is_renewed_while_the_run_holds_the_lock(tmp_path: Path) -> None:
    with RunLock(str(tmp_path), "r1", lease_s=1) as lock:
        first = held_lock(tmp_path)["expires"]
        assert eventually(lambda: held_lock(tmp_path)["expires"] != first)
        time.sleep(1.5)  # past the first lease: renewed, so still held
        lock.require_held()
        assert held_lock(tmp_path)["owner"] == lock.owner
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_taken_over_is_found_by_the_renewal_and_left_to_its_taker(tmp_path: Path) -> None:
    with RunLock(str(tmp_path), "r1", lease_s=1) as lock:
        (tmp_path / LOCK_NAME).write_text(json.dumps(OTHER_RUN))
        assert eventually(lambda: lost(lock))
        with pytest.raises(
            LockLost,
            match=r"taken over while run r1 held it .*run "
            r"nightly-elsewhere \(host elsewhere\)\); this run does not commit",
        ):
            lock.require_held()
    assert held_lock(tmp_path) == OTHER_RUN  # the taker's lock is not removed


def test_a_lock_not_renewed_for_its_whole_lease_is_no_longer_held(tmp_path: Path) -> None:
    lock = RunLock(str(tmp_path), "r1", lease_s=1)
    lock.acquire()  # no renewal thread: as if every renewal had failed
    lock.require_held()
    time.sleep(1.1)
    with pytest.raises(LockLost, match=r"not renewed for 1 s, its whole lease"):
        lock.require_held()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "Expecting property name"),
        (json.dumps({"owner": "x"}), "no run_id, host, pid, since, expires"),
        (json.dumps(OTHER_RUN | {"expires": "soon"}), "Invalid isoformat string"),
        ("[1, 2]", "dictionary update sequence"),
    ],
)
def test_an_unreadable_lock_is_named(tmp_path: Path, content: str, reason: str) -> None:
    (tmp_path / LOCK_NAME).write_text(content)
    with pytest.raises(LockHeld) as raised:
        RunLock(str(tmp_path), "r1", lease_s=60).acquire()
    message = str(raised.value)
    assert message.startswith(f"{tmp_path}: its lock {LOCK_NAME} cannot be read (")
    assert reason in message and message.endswith("remove it if no run is writing the table")


def test_a_lock_that_cannot_be_removed_after_the_run_is_a_warning(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / LOCK_NAME
    warnings = caplog.at_level(logging.WARNING, logger="vision_ops.lock")
    with warnings, RunLock(str(tmp_path), "r1", lease_s=600):
        path.unlink()
        path.mkdir()  # what release finds cannot be read or removed
    assert "run r1: the table's lock could not be removed" in caplog.text
    caplog.clear()
    path.rmdir()
    failing = pytest.raises(ZeroDivisionError)  # the run's own error, not the lock's
    with failing, RunLock(str(tmp_path), "r2", lease_s=600):
        path.unlink()
        path.mkdir()
        1 / 0  # noqa: B018
    assert caplog.text == ""


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def holder_here(pid: int, **recorded: str) -> dict[str, str]:
    """A lock whose lease runs long, held by `pid` on this host, with what else it recorded."""
    return OTHER_RUN | {"host": socket.gethostname(), "pid": str(pid), **recorded}


def taken_over(root: Path, held: dict[str, str]) -> bool:
    (root / LOCK_NAME).write_text(json.dumps(held))
    lock = RunLock(str(root), "r1", lease_s=60)
    try:
        lock.acquire()
    except LockHeld:
        return False
    return held_lock(root)["owner"] == lock.owner


def test_the_holder_is_judged_gone_only_wherethis_process_can_tell(tmp_path: Path) -> None:
    here = {k: v for k, v in this_process().items() if v}
    assert set(here) == {"boot", "pid_namespace", "started"}  # Linux: all three recorded
    boot, namespace, started = here["boot"], here["pid_namespace"], here["started"]
    me, gone = os.getpid(), dead_pid()
    assert not taken_over(tmp_path, holder_here(me, **here))  # alive: this very process
    assert taken_over(tmp_path, holder_here(gone, boot=boot, pid_namespace=namespace))
    assert taken_over(tmp_path, holder_here(gone))  # a lock that recorded host and pid only
    # a pid of another container on this host (same host name, a pid namespace of its own)
    assert not taken_over(tmp_path, holder_here(gone, boot=boot, pid_namespace="pid:[1]"))
    # this pid, but a process started at another time: the holder's pid was reused
    assert taken_over(tmp_path, holder_here(me, **(here | {"started": str(int(started) - 1)})))
    # another boot of this host: its processes are all gone (the lock written before it)
    assert taken_over(tmp_path, holder_here(me, **(here | {"boot": "an-earlier-boot"})))
    # another machine of the same name (its boot, a lock written since this one booted): alive
    renewed = dt.datetime.now(dt.timezone.utc).isoformat()
    elsewhere = holder_here(gone, **(here | {"boot": "another-machine", "since": renewed}))
    assert not taken_over(tmp_path, elsewhere)


@pytest.fixture(params=["local", "s3", "memory"])
def lock_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A table root on each kind of store the lock knows: (URI, storage options)."""
    if request.param == "local":
        return str(tmp_path / "table"), {}
    if request.param == "memory":
        return f"memory://locks/{uuid.uuid4().hex[:8]}", {}
    seaweed = request.getfixturevalue("seaweed")
    return f"s3://out/locks-{uuid.uuid4().hex[:8]}", {"s3": seaweed.storage_options()}


def test_the_lock_object_is_written_only_over_the_version_read(
    lock_root: tuple[str, dict[str, Any]],
) -> None:
    uri, options = lock_root
    fs, root = filesystem(uri, options)
    mine, theirs = (lock_file(fs, f"{root}/{LOCK_NAME}") for _ in range(2))
    assert mine.read() == (None, None)
    first = theirs.write(b"theirs", expected=None)  # written after `mine` found no lock
    with pytest.raises(Raced):
        mine.write(b"mine", expected=None)
    assert mine.read() == (b"theirs", first)
    second = theirs.write(b"theirs again", expected=first)  # a renewal after `mine` read
    with pytest.raises(Raced):
        mine.write(b"mine", expected=first)
    assert mine.write(b"mine", expected=second) != second  # over the version now there
    assert theirs.read()[0] == b"mine"


def test_of_two_runs_that_found_no_lock_only_the_first_to_write_holds_it(
    lock_root: tuple[str, dict[str, Any]],
) -> None:
    uri, options = lock_root
    first, second = (RunLock(uri, run_id, 600, options) for run_id in ("r1", "r2"))
    found_by_second = second.file.read()  # no lock yet: both runs start in the same instant
    first.acquire()
    real_read = second.file.read
    reads = iter([found_by_second])
    second.file.read = lambda: next(reads, None) or real_read()  # type: ignore[method-assign]
    with pytest.raises(LockHeld, match="another run took the lock at the same moment"):
        second.acquire()
    first.require_held()
    first.renew()  # the first run's lease is still its own to renew
    first.require_held()
    assert first._read()[0]["run_id"] == "r1"  # type: ignore[index]
    first.release()
    assert first.file.read() == (None, None)


def test_local_writers_of_one_lock_take_turns(tmp_path: Path) -> None:
    """Local disk: the compare and the write are made under an flock of the table's folder, so a
    writer waits while another process of this host holds it, then compares with what that
    writer left."""
    fs, root = filesystem(str(tmp_path))
    lock = lock_file(fs, f"{root}/{LOCK_NAME}")
    results: list[object] = []
    folder = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # another writer's turn
        writer = threading.Thread(target=lambda: results.append(_outcome(lock, b"mine")))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and results == []  # it waits for its turn
        (tmp_path / LOCK_NAME).write_bytes(b"theirs")  # what the other writer wrote in its turn
    finally:
        os.close(folder)
    writer.join(10)
    assert results == ["raced"] and (tmp_path / LOCK_NAME).read_bytes() == b"theirs"


def test_a_file_system_without_flock_gets_compare_then_write_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """NFS and others refuse an flock of a folder (ENOLCK): the lock is still compared, then
    written (a version not read is refused), and the run is warned once, not per write."""
    import errno

    from vision_ops import lock_file as lock_file_module

    def no_flock(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_file_module.fcntl, "flock", no_flock)
    monkeypatch.setattr(lock_file_module, "_warned", set())
    fs, root = filesystem(str(tmp_path))
    lock = lock_file(fs, f"{root}/{LOCK_NAME}")
    with caplog.at_level(logging.WARNING, logger="vision_ops"):
        version = lock.write(b"mine", expected=None)
        assert _outcome(lock, b"theirs") == "raced"  # a writer that read no lock is refused
        lock.write(b"mine again", expected=version)
    assert (tmp_path / LOCK_NAME).read_bytes() == b"mine again"
    warned = [r.getMessage() for r in caplog.records if "takes no flock" in r.getMessage()]
    assert warned == [
        f"{root}: the file system takes no flock ([Errno {errno.ENOLCK}] No locks available); the "
        "run lock is compared, then written, so two runs starting in the same instant could "
        "both take it"
    ]


def _outcome(lock: LockFile, data: bytes) -> str:
    try:
        lock.write(data, expected=None)
    except Raced:
        return "raced"
    return "written"


def test_a_store_without_conditional_writes_gets_compare_then_write(seaweed, caplog) -> None:  # type: ignore[no-untyped-def]
    """An S3 store that answers conditional writes 501 NotImplemented: the lock is compared,
    then written (with a warning once per run), and still refuses a version since replaced."""
    from faulty_s3 import FaultyS3

    uri = f"s3://out/locks-{uuid.uuid4().hex[:8]}"
    with FaultyS3(seaweed.endpoint_url, conditional_writes=False) as proxy:
        options = {"s3": proxy.storage_options()}
        warnings = caplog.at_level(logging.WARNING, logger="vision_ops.lock_file")
        with warnings, RunLock(uri, "r1", 600, options) as lock:
            lock.renew()
            lock.require_held()
            assert lock._read()[0]["owner"] == lock.owner  # type: ignore[index]
            other = RunLock(uri, "r2", 600, options)
            with pytest.raises(LockHeld, match="is being written by run r1"):
                other.acquire()
        assert caplog.text.count("the store has no conditional writes (NotImplemented)") == 1
        assert ("PUT", f"/{uri.removeprefix('s3://')}/{LOCK_NAME}", "not_implemented") in proxy.log
        fs, root = filesystem(uri, options)
        assert lock_file(fs, f"{root}/{LOCK_NAME}").read() == (None, None)  # released
        mine, theirs = (lock_file(fs, f"{root}/{LOCK_NAME}") for _ in range(2))
        first = theirs.write(b"theirs", expected=None)
        with pytest.raises(Raced):
            mine.write(b"mine", expected=None)
        with pytest.raises(Raced):
            mine.write(b"mine", expected='"not-the-version-there"')
        assert mine.write(b"mine", expected=first) != first


def test_a_lock_put_that_landed_though_its_answer_was_lost_holds_the_lock(seaweed) -> None:  # type: ignore[no-untyped-def]
    """The first PUT of the lock lands, its answer is lost, the client's retry is refused (the
    object exists now): the run holds the lock, and its lease runs from that write."""
    from faulty_s3 import FaultyS3

    uri = f"s3://out/locks-{uuid.uuid4().hex[:8]}"
    dropped: list[str] = []

    def first_lock_put(request: Any) -> bool:
        if request.method == "PUT" and request.key.endswith(LOCK_NAME) and not dropped:
            dropped.append(request.key)
            return True
        return False

    with FaultyS3(seaweed.endpoint_url, drop_response_every=1, faulty=first_lock_put) as proxy:
        with RunLock(uri, "r1", 60, {"s3": proxy.storage_options()}) as lock:
            lock.require_held()  # not "not renewed for ... s": its write landed
            assert lock._read()[0]["owner"] == lock.owner  # type: ignore[index]
        assert proxy.fault_count("dropped_response", "PUT") == 1
        assert lock.file.read() == (None, None)  # released


def test_a_renewal_finding_an_earlier_write_of_its_own_writes_its_lease_again(
    lock_root: tuple[str, dict[str, Any]],
) -> None:
    """An earlier renewal of this run's that landed late (after its client gave up) is found
    by the next renewal, which writes its own fresh lease over it rather than keeping the old."""
    uri, options = lock_root
    lock = RunLock(uri, "r1", 600, options)
    lock.acquire()
    data, version = lock.file.read()
    stale = json.loads(data or b"{}") | {"expires": "2026-12-04T00:00:00+00:00"}
    lock.file.write(json.dumps(stale).encode(), expected=version)  # the late landing
    lock.renew()
    lock.require_held()
    held = lock._read()[0] or {}
    assert held["owner"] == lock.owner and held["expires"] > stale["expires"]
    lock.release()


def test_release_leaves_a_lock_another_run_wrote_since_it_was_read(
    lock_root: tuple[str, dict[str, Any]],
) -> None:
    uri, options = lock_root
    lock = RunLock(uri, "r1", 600, options)
    lock.acquire()
    mine = lock._read()
    other = json.dumps(OTHER_RUN).encode()
    lock.file.write(other, expected=mine[1])  # taken over between the release's read and delete
    lock._read = lambda: mine  # type: ignore[method-assign]
    lock.release()
    assert lock.file.read()[0] == other


def test_a_botocore_without_conditional_writes_gets_compare_then_write(
    seaweed, monkeypatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    """s3fs drops, without a word, the headers its botocore does not know: such a botocore
    is found up front and the lock compared, then written, with a warning."""
    import vision_ops.lock_file as lock_file_module

    monkeypatch.setattr(lock_file_module, "_botocore_sends", lambda method, headers: False)
    uri = f"s3://out/locks-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="vision_ops.lock_file"):
        lock = RunLock(uri, "r1", 600, {"s3": seaweed.storage_options()})
    assert "this botocore sends no conditional writes" in caplog.text
    assert lock.file.unconditional == {"put_object", "delete_object"}  # type: ignore[attr-defined]
    lock.acquire()
    with pytest.raises(Raced):
        lock.file.write(b"mine", expected='"not-the-version-there"')
    lock.release()
    assert lock.file.read() == (None, None)
