"""The Parquet commit as a transaction: a failure or a kill at every step of a rerun's commit
leaves manifest-aware readers the old run or the new one, whole; the next run on the table
leaves plain glob readers exactly the committed run's files."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vision_ops.cli import interrupted
from vision_ops.config import parse_spec
from vision_ops.lock import LOCK_NAME, LockLost, RunLock
from vision_ops.lock_file import Raced
from vision_ops.publish import JOURNAL, SUCCESS_MARKER, CommitUnknown, journal_path
from vision_ops.resume import image_units
from vision_ops.runindex import INDEX_FOLDER
from vision_ops.schema import PREDICTION_SCHEMA, STATUS_OK, item_id
from vision_ops.sink import (
    ParquetSink,
    RunDateConflict,
    check_run_date,
    committed_run,
    committed_runs,
    verify_run,
)
from vision_ops.storage import StorageError
from vision_ops.written import CommitRefused

DATE = dt.date(2026, 11, 24)
PARTITION = "run_date=2026-11-24"
OLD_ROWS, NEW_ROWS = 4, 3  # the committed run, and its rerun (one input fewer)
# What changes the store: a step of the commit is one call of these on the sink's filesystem.
UNFINISHED = (
    "a commit of run {run_id} is unsettled (in progress, or interrupted): plain readers of the "
    "partition may see files of two attempts until it finishes or the next run on this table "
    "settles it"
)
MUTATIONS = frozenset({"pipe_file", "mv", "rm", "rm_file", "rmdir", "open", "makedirs", "mkdir"})


class Fault(OSError):
    """The injected failure (an OSError, as a store's)."""


class FaultyFs:
    """Delegates to a filesystem; calls `at_step(n)` before its n-th mutating call."""

    def __init__(self, fs: Any, at_step: Callable[[int, str, tuple[Any, ...]], None]) -> None:
        self._fs, self._at_step, self.steps = fs, at_step, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._fs, name)
        if name not in MUTATIONS:
            return method

        def step(*args: Any, **kwargs: Any) -> Any:
            if name != "open" or "w" in (args[1] if len(args) > 1 else kwargs.get("mode", "rb")):
                self.steps += 1
                self._at_step(self.steps, name, args)
            return method(*args, **kwargs)

        return step


def rows(count: int, run_id: str = "r1") -> pa.Table:
    columns = {
        "run_id": [run_id] * count,
        "item_id": [item_id(f"file:///x/{i}.jpg") for i in range(count)],
        "source_uri": [f"file:///x/{i}.jpg" for i in range(count)],
        "model_name": ["m"] * count,
        "model_weights_sha256": ["h"] * count,
        "task": ["classification"] * count,
        "status": [STATUS_OK] * count,
        "score": np.linspace(0, 1, count, dtype=np.float32),
    }
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(count, f.type)
        for f in PREDICTION_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=PREDICTION_SCHEMA)


def commit(root: Path, count: int, run_id: str = "r1", **sink: Any) -> ParquetSink:
    writer = ParquetSink(str(root), run_id, DATE, PREDICTION_SCHEMA, rows_per_file=2, **sink)
    writer.write(rows(count, run_id))
    writer.commit()
    return writer


def rerun_with(
    root: Path, at_step: Callable[[int, str, tuple[Any, ...]], None], resume_key: str | None = None
) -> ParquetSink:
    """A rerun of r1 with NEW_ROWS rows, its commit's filesystem calls passed to `at_step`."""
    writer = ParquetSink(
        str(root), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2, resume_key=resume_key
    )
    writer.write(rows(NEW_ROWS))
    writer.fs = FaultyFs(writer.fs, at_step)
    writer.commit()
    return writer


def commit_steps(tmp_path: Path) -> list[str]:
    """The mutating calls a rerun's commit makes, in order (a dry run)."""
    calls: list[str] = []
    root = tmp_path / "dry"
    commit(root, OLD_ROWS)
    rerun_with(root, lambda n, name, args: calls.append(f"{name} {args[0]}"))
    return calls


def seen_by_manifest_readers(root: Path) -> int:
    """The committed run of r1, checked whole (every file it lists, its rows, each unit once):
    the number of rows it holds."""
    manifest, problems = verify_run(str(root), "r1")
    assert set(problems) <= {UNFINISHED.format(run_id="r1")}  # whole, if not yet tidied
    return int(manifest["rows"])


def parquet_files(root: Path) -> set[str]:
    return {f"file://{path}" for path in (root / PARTITION).glob("*.parquet")}


def settle(root: Path) -> None:
    """What the next run on the table does first: opening its sink settles unfinished commits."""
    ParquetSink(str(root), "next", DATE, PREDICTION_SCHEMA)


def assert_settled(root: Path, rows_committed: int) -> None:
    """After the next run: plain glob readers see exactly the committed run's files."""
    settle(root)
    assert verify_run(str(root), "r1")[1] == []
    manifest = committed_run(str(root), "r1")
    assert manifest is not None and manifest["rows"] == rows_committed
    assert parquet_files(root) == {entry["uri"] for entry in manifest["files"]}
    assert pq.read_table(root / PARTITION).num_rows == rows_committed
    assert (root / PARTITION / SUCCESS_MARKER).exists()
    assert not (root / JOURNAL).exists()


def test_a_rerun_whose_manifest_write_fails_keeps_the_run_it_replaces(tmp_path: Path) -> None:
    """The issue's first reproduction: r1 committed with 4 rows, its rerun's manifest write
    fails: r1's 4 rows stay committed and readable, and nothing of the rerun is left."""
    old = commit(tmp_path, OLD_ROWS)
    before = parquet_files(tmp_path)

    def fail_manifest(n: int, name: str, args: tuple[Any, ...]) -> None:
        if name == "mv" and "/_manifests/" in args[1]:
            raise Fault("503 Slow Down")

    with pytest.raises(StorageError, match="503 Slow Down"):
        rerun_with(tmp_path, fail_manifest)
    assert committed_run(str(tmp_path), "r1")["attempt"] == old.attempt
    assert seen_by_manifest_readers(tmp_path) == OLD_ROWS
    assert parquet_files(tmp_path) == before  # nothing of the rerun, nothing of the old lost
    assert (tmp_path / PARTITION / SUCCESS_MARKER).exists()
    assert not (tmp_path / JOURNAL).exists()


def take_the_lock(root: Path, run_id: str = "r9") -> None:
    """Another run's lock, with a long lease, written over whatever lock the table holds."""
    taker = {"owner": "x", "run_id": run_id, "host": "h", "pid": "1", "since": "2026-12-04"}
    (root / LOCK_NAME).write_text(json.dumps(taker | {"expires": "2099-01-01T00:00:00"}))


def test_a_rerun_whose_lock_is_taken_over_during_its_moves_does_not_commit(
    tmp_path: Path,
) -> None:
    """r1 committed; its rerun holds the table's lock, and another run takes the lock over
    while the rerun moves its files in (the rerun's lease ran out while the store did not
    answer, say): the rerun's renewal finds it, its commit stops right before the manifest,
    and r1 stays whole, with nothing of the rerun left."""
    old = commit(tmp_path, OLD_ROWS)
    before = parquet_files(tmp_path)
    with RunLock(str(tmp_path), "r1", lease_s=600) as lock:
        writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
        writer.write(rows(NEW_ROWS))

        def take_over(n: int, name: str, args: tuple[Any, ...]) -> None:
            if name == "mv" and f"/{PARTITION}/" in args[1] and (tmp_path / LOCK_NAME).exists():
                take_the_lock(tmp_path)
                lock.renew()  # the renewal thread's next turn

        writer.fs = FaultyFs(writer.fs, take_over)
        with pytest.raises(LockLost, match="taken over while run r1 held it"):
            writer.commit(None, None, lock.require_held)
    assert committed_run(str(tmp_path), "r1")["attempt"] == old.attempt
    assert seen_by_manifest_readers(tmp_path) == OLD_ROWS
    assert parquet_files(tmp_path) == before
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "r9"  # the taker's


def test_a_rerun_whose_journal_the_taker_undoes_during_its_moves_leaves_no_file_behind(
    tmp_path: Path,
) -> None:
    """As above, and the run that took the lock over settles the rerun's journal between two of
    its moves (it undoes it: moves back what was in): the rerun's later moves go back to its
    staging too, as it finds its commit settled by another, so plain-glob readers see r1 alone
    (they were left in the partition, named by no journal or manifest, for good)."""
    old = commit(tmp_path, OLD_ROWS)
    before = parquet_files(tmp_path)
    with RunLock(str(tmp_path), "r1", lease_s=600) as lock:
        writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
        writer.write(rows(NEW_ROWS))
        moved_in: list[str] = []

        def take_over_and_settle(n: int, name: str, args: tuple[Any, ...]) -> None:
            if name == "mv" and f"/{PARTITION}/" in args[1]:
                moved_in.append(args[1])
                if len(moved_in) == 2:  # the first file is in, the second about to be
                    take_the_lock(tmp_path)
                    settle(tmp_path)  # the taker opens its sink
                    lock.renew()

        writer.fs = FaultyFs(writer.fs, take_over_and_settle)
        with pytest.raises(CommitRefused, match="another run settled this commit"):
            writer.commit(None, None, lock.require_held)
    assert len(moved_in) == 2
    assert committed_run(str(tmp_path), "r1")["attempt"] == old.attempt
    assert parquet_files(tmp_path) == before
    assert pq.read_table(tmp_path / PARTITION).num_rows == OLD_ROWS
    assert seen_by_manifest_readers(tmp_path) == OLD_ROWS


def test_a_lock_taken_over_between_renewals_stops_the_commit_at_its_commit_point(
    tmp_path: Path,
) -> None:
    """Another run takes the lock over (its host judged this run gone) and no renewal has run
    since: the commit point reads the lock back, and the rerun does not commit."""
    old = commit(tmp_path, OLD_ROWS)
    before = parquet_files(tmp_path)
    with RunLock(str(tmp_path), "r1", lease_s=600) as lock:
        writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
        writer.write(rows(NEW_ROWS))
        take_the_lock(tmp_path)
        lock.require_held()  # no renewal ran: without a read, the lock looks held
        with pytest.raises(LockLost, match=r"taken over while run r1 held it \(.* run r9"):
            writer.commit(None, None, lock.confirm_held)
    assert committed_run(str(tmp_path), "r1")["attempt"] == old.attempt
    assert parquet_files(tmp_path) == before
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "r9"  # the taker's


def fenced(root: Path, attempt: str) -> bool:
    """Whether the attempt's journal has passed its commit point."""
    journal = root / JOURNAL / f"r1.{attempt}.json"
    return journal.exists() and json.loads(journal.read_text()).get("fenced") is True


def test_a_run_that_stalls_past_its_commit_point_is_finished_by_the_run_that_took_over(
    tmp_path: Path,
) -> None:
    """The rerun passes its lock check and its fence, then stalls before its manifest lands
    (its lease running out meanwhile): the run that takes the table over finishes its commit
    from the journal (it undid it before: the late manifest then named files moved back to the
    rerun's staging, r1's old files deleted, every row of r1 gone)."""
    commit(tmp_path, OLD_ROWS)
    writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
    writer.write(rows(NEW_ROWS))

    taken: list[bool] = []

    def taken_over_as_the_manifest_goes(n: int, name: str, args: tuple[Any, ...]) -> None:
        if not taken and fenced(tmp_path, writer.attempt):  # the next step after the fence
            taken.append(True)
            settle(tmp_path)  # the run that took the lapsed lock opens its sink

    writer.fs = FaultyFs(writer.fs, taken_over_as_the_manifest_goes)
    writer.commit()  # its late manifest write lands: the same manifest
    assert committed_run(str(tmp_path), "r1")["attempt"] == writer.attempt
    assert_settled(tmp_path, NEW_ROWS)


def test_a_stalled_runs_late_manifest_never_replaces_a_later_commit(tmp_path: Path) -> None:
    """As above, and the run that took over then commits r1 again (5 rows, replacing the
    stalled run's files): the stalled run's manifest, written late, would name files deleted.
    It is written only over the manifest version its commit replaced, so nothing is written."""
    commit(tmp_path, OLD_ROWS)
    writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
    writer.write(rows(NEW_ROWS))

    def taken_over_and_committed_again(n: int, name: str, args: tuple[Any, ...]) -> None:
        if not later and fenced(tmp_path, writer.attempt):  # the next step after the fence
            later.append(commit(tmp_path, 5))  # opening its sink finishes the stalled one

    later: list[ParquetSink] = []
    writer.fs = FaultyFs(writer.fs, taken_over_and_committed_again)
    writer.commit()
    assert committed_run(str(tmp_path), "r1")["attempt"] == later[0].attempt
    assert_settled(tmp_path, 5)


def test_a_run_whose_journal_was_claimed_before_its_fence_commits_nothing(
    tmp_path: Path,
) -> None:
    """The rerun stalls between its lock check and its fence, and the run that took the table
    over undoes its commit first: the fence finds the journal claimed, the rerun commits
    nothing, r1 stays whole and the rerun's rows wait in its staging for a rerun."""
    old = commit(tmp_path, OLD_ROWS)
    writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
    writer.write(rows(NEW_ROWS))
    with pytest.raises(CommitRefused, match="another run settled this commit"):
        writer.commit(None, None, lambda: settle(tmp_path))  # held, then taken over
    assert committed_run(str(tmp_path), "r1")["attempt"] == old.attempt
    assert_settled(tmp_path, OLD_ROWS)
    staged = list((tmp_path / "_staging" / "r1" / writer.attempt).glob("part-*.parquet"))
    assert len(staged) == 2  # moved back by the run that undid the commit


def test_a_run_whose_fence_took_and_whose_taker_finished_it_reports_it_committed(
    tmp_path: Path,
) -> None:
    """The fence lands but its answer is lost (the write fails as the store answers), and the
    run that took the table over finishes the fenced commit before the rerun looks again: the
    rerun finds its journal settled and the manifest naming its attempt, and reports the
    commit it made (it said it was not committed)."""
    commit(tmp_path, OLD_ROWS)
    writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
    writer.write(rows(NEW_ROWS))
    real = writer.fs
    landed: list[str] = []

    def fence_lands_then_taker_finishes(n: int, name: str, args: tuple[Any, ...]) -> None:
        fence = name == "mv" and f"/{JOURNAL}/" in args[1]
        if fence and json.loads(Path(args[0]).read_bytes()).get("fenced"):
            real.mv(args[0], args[1])  # the fence lands
            landed.append(args[1])
            raise Fault("the fence's answer was lost")
        if landed and name == "makedirs" and len(landed) == 1:  # the rerun claims it next
            landed.append("settled")
            settle(tmp_path)  # but the taker, first, finishes the commit

    writer.fs = FaultyFs(real, fence_lands_then_taker_finishes)
    result = writer.commit()
    assert result.rows == NEW_ROWS and landed[1:] == ["settled"]
    assert committed_run(str(tmp_path), "r1")["attempt"] == writer.attempt
    assert_settled(tmp_path, NEW_ROWS)


def test_a_run_whose_fence_landed_before_a_takers_claim_does_not_say_not_committed(
    tmp_path: Path,
) -> None:
    """The fence lands, its answer is lost, and the run that took the table over claims the
    journal before the retried write is refused: that run finishes the commit (the journal is
    fenced), so the rerun says its outcome is the taker's to settle (it said "not committed",
    and the commit then stood)."""
    commit(tmp_path, OLD_ROWS)
    writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
    writer.write(rows(NEW_ROWS))
    real = writer.fs

    def fence_lands_then_a_taker_claims(n: int, name: str, args: tuple[Any, ...]) -> None:
        fence = name == "mv" and f"/{JOURNAL}/" in args[1]
        if fence and json.loads(Path(args[0]).read_bytes()).get("fenced"):
            real.mv(args[0], args[1])  # the fence lands
            journal = Path(args[1])
            journal.write_text(json.dumps(json.loads(journal.read_text()) | {"claim": "taker"}))
            raise Raced(args[1])  # the retried write, refused: the journal moved on

    writer.fs = FaultyFs(real, fence_lands_then_a_taker_claims)
    with pytest.raises(CommitUnknown, match="settles this commit from it"):
        writer.commit()
    settle(tmp_path)  # the taker finishes it
    assert committed_run(str(tmp_path), "r1")["attempt"] == writer.attempt
    assert_settled(tmp_path, NEW_ROWS)


def test_a_run_whose_taker_finishes_between_its_two_reads_reports_it_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the taker finishes the fenced commit and removes its journal between the
    rerun's reading of the outcome (journal there) and of the fence (journal gone): the rerun
    reads the outcome again and reports its commit (it said "not committed")."""
    from vision_ops import publish

    commit(tmp_path, OLD_ROWS)
    writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
    writer.write(rows(NEW_ROWS))
    real = writer.fs

    def fence_lands_then_a_taker_claims(n: int, name: str, args: tuple[Any, ...]) -> None:
        fence = name == "mv" and f"/{JOURNAL}/" in args[1]
        if fence and json.loads(Path(args[0]).read_bytes()).get("fenced"):
            real.mv(args[0], args[1])
            journal = Path(args[1])
            journal.write_text(json.dumps(json.loads(journal.read_text()) | {"claim": "taker"}))
            raise Raced(args[1])

    outcome = publish._outcome_settled_elsewhere

    def then_the_taker_finishes(*args: Any) -> bool | None:
        found = outcome(*args)
        settle(tmp_path)
        return found

    writer.fs = FaultyFs(real, fence_lands_then_a_taker_claims)
    monkeypatch.setattr(publish, "_outcome_settled_elsewhere", then_the_taker_finishes)
    assert writer.commit().rows == NEW_ROWS
    assert committed_run(str(tmp_path), "r1")["attempt"] == writer.attempt
    assert_settled(tmp_path, NEW_ROWS)


def test_a_run_that_lost_its_lock_leaves_the_takers_journal(tmp_path: Path) -> None:
    """Another attempt of r1 took the lock over and began its own commit (its journal written)
    while this one moved its files in: this one undoes its own commit and removes its own
    journal only; the taker's stays, the record of the files the taker moves."""
    commit(tmp_path, OLD_ROWS)
    taker = tmp_path / JOURNAL / Path(journal_path("", "r1", "taker000000")).name
    with RunLock(str(tmp_path), "r1", lease_s=600) as lock:
        writer = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2)
        writer.write(rows(NEW_ROWS))

        def taken_over_with_a_commit_begun(n: int, name: str, args: tuple[Any, ...]) -> None:
            if name == "mv" and f"/{PARTITION}/" in args[1] and not taker.exists():
                take_the_lock(tmp_path, "r1")
                taker.write_text("{}")  # what the taker's own commit wrote

        writer.fs = FaultyFs(writer.fs, taken_over_with_a_commit_begun)
        with pytest.raises(LockLost):
            writer.commit(None, None, lock.confirm_held)
    assert [path.name for path in (tmp_path / JOURNAL).iterdir()] == [taker.name]


def test_a_journal_named_as_before_is_settled(tmp_path: Path) -> None:
    """A journal a crash left as `_commits/r1.json` (its name before there was one an
    attempt) is settled, and removed, by the next run."""
    commit(tmp_path, OLD_ROWS)

    def crash_at_the_first_move_in(n: int, name: str, args: tuple[Any, ...]) -> None:
        if name == "mv" and f"/{PARTITION}/" in args[1]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rerun_with(tmp_path, crash_at_the_first_move_in)
    (journal,) = (tmp_path / JOURNAL).glob("r1.*.json")
    journal.rename(tmp_path / JOURNAL / "r1.json")
    assert_settled(tmp_path, OLD_ROWS)


def test_on_local_disk_the_committed_files_reach_the_disk_before_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync, as the kernel is asked: every file the manifest names, and the folders their
    names are in, before the manifest is written (after a power loss it names whole files);
    the manifest's own folder after its rename (the commit itself is on the disk)."""
    import vision_ops.storage

    manifest = tmp_path / "_manifests" / "r1.json"
    flushed: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        flushed.append((os.readlink(f"/proc/self/fd/{descriptor}"), manifest.exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(vision_ops.storage.os, "fsync", fsync)
    commit(tmp_path, OLD_ROWS)
    before_the_manifest = {path for path, after in flushed if not after}
    named = {
        entry["uri"].removeprefix("file://")
        for entry in committed_run(str(tmp_path), "r1")["files"]
    }
    assert len(named) == 2 and named <= before_the_manifest
    assert str(tmp_path / PARTITION) in before_the_manifest
    assert (str(manifest.parent), True) in flushed


def test_a_rerun_in_a_copied_table_replaces_the_copys_files_only(tmp_path: Path) -> None:
    """A table copied elsewhere holds manifests naming the original's files: a rerun of r1 in
    the copy replaces the copy's files of r1 and leaves the original whole."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    commit(original, OLD_ROWS)
    before = parquet_files(original)
    shutil.copytree(original, copy)
    commit(copy, NEW_ROWS)
    assert parquet_files(original) == before and seen_by_manifest_readers(original) == OLD_ROWS
    assert len(list((original / INDEX_FOLDER).glob("*.parquet"))) == 1
    assert_settled(copy, NEW_ROWS)  # the copy's old files of r1 gone, its new ones committed
    assert len(list((copy / INDEX_FOLDER).glob("*.parquet"))) == 1


def test_a_copy_of_a_table_with_an_interrupted_commit_settles_its_own_files(
    tmp_path: Path,
) -> None:
    """A table copied (or replicated) while a crashed commit's journal is in it: the copy's
    next run undoes the commit in the copy, and the original's files stay as they were until
    the original's next run settles them."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    commit(original, OLD_ROWS)

    def crash_after_the_first_move_in(n: int, name: str, args: tuple[Any, ...]) -> None:
        if name == "mv" and f"/{PARTITION}/" in args[1] and not args[1].endswith("00000.parquet"):
            raise KeyboardInterrupt  # the driver gone after one part file moved in

    with pytest.raises(KeyboardInterrupt):
        rerun_with(original, crash_after_the_first_move_in)
    shutil.copytree(original, copy)
    left_in_original = parquet_files(original)
    assert len(left_in_original) == 3  # the old run's two, and the new attempt's first
    assert_settled(copy, OLD_ROWS)
    assert parquet_files(original) == left_in_original
    assert list((original / JOURNAL).glob("r1.*.json"))
    assert_settled(original, OLD_ROWS)


def test_a_copied_table_reads_and_verifies_its_own_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A copy's manifests name the original's files; every reader takes them by name in the
    table it was given: with the original gone the copy's run reads, queries and verifies, and
    a file of the copy cut short is the copy's problem, named in it. The same table through a
    link, and a partition linked in from elsewhere, verify clean."""
    from vision_ops.cli import EXIT_FAILED, EXIT_OK, main
    from vision_ops.outputs import read_run

    original, copy = tmp_path / "original", tmp_path / "copy"
    commit(original, OLD_ROWS)
    (tmp_path / "link").symlink_to(original)
    assert verify_run(str(tmp_path / "link"), "r1")[1] == []
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    manifest, problems = verify_run(str(copy), "r1")
    assert problems == [] and manifest["rows"] == OLD_ROWS
    assert {f["uri"] for f in manifest["files"]} == parquet_files(copy)
    assert manifest["index_uri"].startswith(f"file://{copy}/{INDEX_FOLDER}/")
    assert (
        read_run(str(copy), manifest)["item_id"].to_pylist()
        == rows(OLD_ROWS)["item_id"].to_pylist()
    )
    capsys.readouterr()
    sql = "SELECT count(*) AS n FROM predictions"
    assert main(["query", str(copy), sql, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.split() == ["n", str(OLD_ROWS)]
    [part, *_] = sorted((copy / PARTITION).glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    [problem] = verify_run(str(copy), "r1")[1]
    assert problem.startswith(f"file://{part}: unreadable"), problem
    assert main(["verify", str(copy), "--run-id", "r1"]) == EXIT_FAILED
    commit(original, OLD_ROWS)
    moved = tmp_path / "other-volume"  # a partition linked in from elsewhere is the table's
    shutil.move(original / PARTITION, moved)
    (original / PARTITION).symlink_to(moved)
    assert verify_run(str(original), "r1")[1] == []
    assert verify_run(f"file://{original}/", "r1")[1] == []


def test_a_commit_failed_before_its_commit_point_leaves_its_rows_to_resume(
    tmp_path: Path,
) -> None:
    """A rerun's commit fails after one file moved in: its files move back to its staging, r1
    stays as it was, and the next rerun of r1 resumes every unit instead of starting over."""
    commit(tmp_path, OLD_ROWS)
    written = rows(NEW_ROWS)
    failing = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2,
                          resume_key="key")  # fmt: skip
    failing.write(written)

    def fail_the_second_move_in(n: int, name: str, args: tuple[Any, ...]) -> None:
        moved_in = list((tmp_path / PARTITION).glob(f"r1-{failing.attempt}-*"))
        if name == "mv" and f"/{PARTITION}/" in args[1] and moved_in:
            raise Fault("503 Slow Down")

    failing.fs = FaultyFs(failing.fs, fail_the_second_move_in)
    with pytest.raises(StorageError, match="503 Slow Down"):
        failing.commit()
    assert seen_by_manifest_readers(tmp_path) == OLD_ROWS
    assert not list((tmp_path / PARTITION).glob(f"r1-{failing.attempt}-*"))
    rerun = ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, rows_per_file=2,
                        resume_key="key")  # fmt: skip
    sources = written["source_uri"].to_pylist()
    assert rerun.resume(image_units) == frozenset(sources)
    assert rerun.resumed == NEW_ROWS
    rerun.commit()
    assert_settled(tmp_path, NEW_ROWS)
    assert committed_run(str(tmp_path), "r1")["resumed_units"] == NEW_ROWS


def test_ctrl_c_inside_a_commit_is_not_called_nothing_committed(tmp_path: Path) -> None:
    """`run` interrupted: outside a commit nothing was committed; inside one (its journal is
    there) the message says the next run on the table settles it."""
    spec = parse_spec({
        "input": {"uris": ["photos/"]},
        "model": {"architecture": "resnet18", "weights": "IMAGENET1K_V1"},
        "output": {"uri": str(tmp_path)},
        "run": {"id": "r1", "date": DATE.isoformat()},
    })  # fmt: skip
    commit(tmp_path, OLD_ROWS)
    assert interrupted(spec).startswith("interrupted: nothing was committed; ")

    def ctrl_c_at_the_first_move_in(n: int, name: str, args: tuple[Any, ...]) -> None:
        if name == "mv" and f"/{PARTITION}/" in args[1]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rerun_with(tmp_path, ctrl_c_at_the_first_move_in)
    assert interrupted(spec) == (
        "interrupted during the commit of run r1: the next run on this table finishes the "
        "commit or undoes it (its manifest says which; `vision-ops verify` shows the committed "
        "run)"
    )
    assert_settled(tmp_path, OLD_ROWS)  # which the next run does: the old run, whole


@pytest.mark.parametrize("fault", ["Fault", "Unreachable"])  # an OSError, and one not
def test_a_run_that_cannot_settle_an_interrupted_commit_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The next run meets a store error while undoing a crashed commit: it stops before any work
    (its own commit would write over the journal, the only record of the moved files, and
    leave them in the partition for good); the run after it settles the commit."""
    commit(tmp_path, OLD_ROWS)

    def crash_at_the_first_move_in(n: int, name: str, args: tuple[Any, ...]) -> None:
        if name == "mv" and f"/{PARTITION}/" in args[1]:
            raise KeyboardInterrupt  # the driver gone, its journal left

    with pytest.raises(KeyboardInterrupt):
        rerun_with(tmp_path, crash_at_the_first_move_in)
    import vision_ops.sink

    real = vision_ops.sink.filesystem

    def a_store_that_slows_down(n: int, name: str, args: tuple[Any, ...]) -> None:
        raise {"Fault": Fault, "Unreachable": Unreachable}[fault]("503 SlowDown")

    monkeypatch.setattr(
        vision_ops.sink,
        "filesystem",
        lambda *a: (FaultyFs(real(*a)[0], a_store_that_slows_down), real(*a)[1]),
    )
    with pytest.raises(StorageError) as refused:
        settle(tmp_path)
    assert str(refused.value) == (
        f"run r1: an interrupted commit (attempt {journal_attempt(tmp_path)}) could not be "
        f"settled ({fault}: 503 SlowDown); nothing was started: run again when the store answers"
    )
    assert list((tmp_path / JOURNAL).glob("r1.*.json"))
    monkeypatch.setattr(vision_ops.sink, "filesystem", real)
    assert_settled(tmp_path, OLD_ROWS)


def journal_attempt(root: Path) -> str:
    (journal,) = (root / JOURNAL).glob("r1.*.json")
    return str(json.loads(journal.read_text())["attempt"])


def test_the_commit_steps_are_journal_moves_manifest_marker_cleanup(tmp_path: Path) -> None:
    """The order every guarantee below rests on."""
    kinds = [
        "journal" if f"/{JOURNAL}/" in call and "pipe_file" in call
        else "move" if call.startswith("mv ") and "/_staging/" in call
        else "manifest" if "/_manifests/" in call
        else "marker" if call.endswith(SUCCESS_MARKER)
        else "remove old" if call.startswith("rm_file ") and (
            f"/{PARTITION}/" in call or f"/{INDEX_FOLDER}/" in call
        )
        else "other"
        for call in commit_steps(tmp_path)
    ]  # fmt: skip
    firsts = ["journal", "move", "manifest", "marker", "remove old"]
    assert [kinds.index(kind) for kind in firsts] == sorted(kinds.index(kind) for kind in firsts)
    # two part files and the run's index (vision_ops.runindex), each way
    assert kinds.count("move") == 3 and kinds.count("remove old") == 3


class Unreachable(Exception):
    """A store's failure that is not an OSError (botocore's EndpointConnectionError, raised
    through s3fs as it is)."""


@pytest.mark.parametrize("fault", [Fault, Unreachable])
def test_a_failure_at_any_step_leaves_the_old_run_or_the_new_one(
    tmp_path: Path, fault: type[Exception]
) -> None:
    """A failure at each step of a rerun's commit, an OSError or another (botocore's): readers
    see the old run or the new one whole, and the next run settles the table. One after the
    commit point (the marker's folder not made) leaves the run committed and said so: an error
    other than an OSError there failed the committed run."""
    steps = commit_steps(tmp_path)
    assert len(steps) >= 10
    for failing in range(1, len(steps) + 1):
        root = tmp_path / f"fail-{failing}"
        commit(root, OLD_ROWS)

        def fail(n: int, name: str, args: tuple[Any, ...], failing: int = failing) -> None:
            if n == failing:
                raise fault(f"injected at step {n}: {name}")

        try:
            rerun_with(root, fail)
            committed_rows = NEW_ROWS
        except (StorageError, Unreachable):
            committed_rows = OLD_ROWS
        assert seen_by_manifest_readers(root) == committed_rows, steps[failing - 1]
        assert_settled(root, committed_rows)


class Killed(BaseException):
    """A SIGKILL, in process: nothing after it runs, no `except Exception` undoes anything."""


def test_verify_names_an_unsettled_commit_of_any_run_in_the_table(tmp_path: Path) -> None:
    """Run r2 killed while it moved its files in: plain-glob readers of the table see them,
    whichever run is verified, so `verify` names r2's unsettled commit for r1 too (it checked
    the verified run's journal only, and said r1 held), and for r2, which has no committed
    run; once the next run settles it, r1 holds again."""
    commit(tmp_path, OLD_ROWS)
    killed = ParquetSink(str(tmp_path), "r2", DATE, PREDICTION_SCHEMA, rows_per_file=1)
    killed.write(rows(NEW_ROWS, "r2"))
    moved: list[str] = []

    def kill_at_the_second_move(n: int, name: str, args: tuple[Any, ...]) -> None:
        if name == "mv" and f"/{PARTITION}/" in args[1]:
            moved.append(args[1])
            if len(moved) == 2:
                raise Killed

    killed.fs = FaultyFs(killed.fs, kill_at_the_second_move)
    with pytest.raises(Killed):
        killed.commit()
    assert pq.read_table(tmp_path / PARTITION).num_rows == OLD_ROWS + 1  # a glob sees r2's
    unsettled = UNFINISHED.format(run_id="r2")
    assert verify_run(str(tmp_path), "r1")[1] == [unsettled]
    assert verify_run(str(tmp_path), "r2") == ({}, [f"{tmp_path}: no committed run r2", unsettled])
    settle(tmp_path)
    assert verify_run(str(tmp_path), "r1")[1] == []
    assert pq.read_table(tmp_path / PARTITION).num_rows == OLD_ROWS


KILLER = """
import datetime as dt, os, signal, sys
sys.path.insert(0, {tests!r})
from test_publish import rerun_with
from pathlib import Path

def kill(n, name, args):
    if n == {step}:
        os.kill(os.getpid(), signal.SIGKILL)

rerun_with(Path({root!r}), kill, {key!r})
"""


def test_a_driver_killed_at_any_step_leaves_the_old_run_or_the_new_one(tmp_path: Path) -> None:
    """SIGKILL at each step of the commit: readers see the old run or the new one whole; the
    next run on the table finishes or undoes the commit from its journal (past the fence it
    finishes it, though the manifest readers switch on was not written yet)."""
    steps = commit_steps(tmp_path)
    outcomes = set()
    for step in range(1, len(steps) + 1):
        root = tmp_path / f"kill-{step}"
        commit(root, OLD_ROWS)
        script = KILLER.format(
            tests=str(Path(__file__).parent), step=step, root=str(root), key=None
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
        problems = verify_run(str(root), "r1")[1]
        assert problems in ([], [UNFINISHED.format(run_id="r1")]), problems
        seen = committed_run(str(root), "r1")["rows"]
        assert seen in (OLD_ROWS, NEW_ROWS), steps[step - 1]
        settle(root)
        committed_rows = committed_run(str(root), "r1")["rows"]
        assert committed_rows in (seen, NEW_ROWS), steps[step - 1]  # never back to the old
        outcomes.add(committed_rows)
        assert_settled(root, committed_rows)
    assert outcomes == {OLD_ROWS, NEW_ROWS}  # kills fell before and after the commit point


def test_the_same_run_after_a_kill_past_its_commit_point_is_that_commit(tmp_path: Path) -> None:
    """SIGKILL at each step of a rerun's commit, then the same run again (its resume key: the
    same run, spec, model and inputs). Where opening its sink finishes the killed attempt's
    commit (past the fence), the run is that commit (`finished_earlier`: its files and rows)
    and nothing is processed again (before, every unit was); where it undoes it, nothing is
    finished (the staged rows are resumed). A run of another key never takes it as its own."""
    steps = commit_steps(tmp_path)
    outcomes = set()
    for step in range(1, len(steps) + 1):
        for key in ("k", "another"):
            root = tmp_path / f"kill-{step}-{key}"
            commit(root, OLD_ROWS, resume_key="k")
            here = str(Path(__file__).parent)
            script = KILLER.format(tests=here, step=step, root=str(root), key="k")
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
            assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
            # else killed tidying up, its journal removed: a committed run, rerun as ever
            unsettled = any((root / JOURNAL).glob("*.json"))
            again = ParquetSink(str(root), "r1", DATE, PREDICTION_SCHEMA, resume_key=key)
            manifest = committed_run(str(root), "r1")
            assert manifest is not None
            finished = manifest["rows"] == NEW_ROWS
            outcomes.add(finished)
            if key == "another" or not finished or not unsettled:
                assert again.finished_earlier is None, steps[step - 1]
                continue
            result = again.finished_earlier
            assert result is not None, steps[step - 1]
            assert (result.rows, result.ok, result.errors, result.resumed) == (NEW_ROWS,) * 2 + (
                0,
                NEW_ROWS,
            )
            assert result.files == [entry["uri"] for entry in manifest["files"]]
            assert (
                sum(pq.read_table(uri.removeprefix("file://")).num_rows for uri in result.files)
                == NEW_ROWS
            )
    assert outcomes == {True, False}  # kills fell before and after the commit point


def test_a_rerun_of_a_committed_run_is_never_taken_for_a_finished_commit(tmp_path: Path) -> None:
    """Only a commit this sink's opening finished is the run's: a run committed whole before
    is replaced by a rerun of the same key, as always."""
    commit(tmp_path, OLD_ROWS, resume_key="k")
    assert (
        ParquetSink(str(tmp_path), "r1", DATE, PREDICTION_SCHEMA, resume_key="k").finished_earlier
        is None
    )


def test_a_manifest_write_reported_failed_that_took_is_a_commit(tmp_path: Path) -> None:
    """A store can carry out a write and lose the response: the commit reads the manifest back
    and, finding its own attempt there, finishes instead of undoing a committed run."""
    commit(tmp_path, OLD_ROWS)

    def lose_response(n: int, name: str, args: tuple[Any, ...]) -> None:
        if name == "mv" and "/_manifests/" in args[1]:
            os.replace(args[0], args[1])  # carried out, then reported as failed
            raise Fault("connection reset after the request was sent")

    rerun = rerun_with(tmp_path, lose_response)
    assert committed_run(str(tmp_path), "r1")["attempt"] == rerun.attempt
    assert seen_by_manifest_readers(tmp_path) == NEW_ROWS
    assert_settled(tmp_path, NEW_ROWS)


def test_a_run_id_committed_on_one_date_is_refused_on_another(tmp_path: Path) -> None:
    """The issue's second reproduction: `nightly` on the 28th, then on the 29th. Refused before
    the sink stages anything; the 28th stays committed, its files listed."""
    first = ParquetSink(str(tmp_path), "nightly", dt.date(2026, 11, 28), PREDICTION_SCHEMA)
    first.write(rows(2, "nightly"))
    first.commit()
    expected = r"'nightly' is committed for 2026-11-28 .* cannot commit 2026-11-29"
    with pytest.raises(RunDateConflict, match=expected):
        check_run_date(committed_run(str(tmp_path), "nightly"), dt.date(2026, 11, 29), "t")
    with pytest.raises(RunDateConflict, match=expected):
        ParquetSink(str(tmp_path), "nightly", dt.date(2026, 11, 29), PREDICTION_SCHEMA)
    [run] = committed_runs(str(tmp_path))
    assert run["run_date"] == "2026-11-28" and run["rows"] == 2
    assert not (tmp_path / "run_date=2026-11-29").exists()
    check_run_date(committed_run(str(tmp_path), "nightly"), dt.date(2026, 11, 28), "t")  # rerun


def test_the_journal_names_the_plan_and_is_gone_after_the_commit(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def read_journal(n: int, name: str, args: tuple[Any, ...]) -> None:
        if name == "mv" and "/_manifests/" in args[1]:  # just before the commit point
            [journal] = (tmp_path / JOURNAL).glob("*.json")
            seen.append(json.loads(journal.read_text()))

    old = commit(tmp_path, OLD_ROWS)
    old_files = sorted(str(path) for path in (tmp_path / PARTITION).glob("*.parquet"))
    assert len(old_files) == 2 and all(f"r1-{old.attempt}-part-" in f for f in old_files)
    rerun = rerun_with(tmp_path, read_journal)
    [plan] = seen
    assert (plan["run_id"], plan["attempt"]) == ("r1", rerun.attempt)
    old_index = f"{tmp_path}/{INDEX_FOLDER}/r1-{old.attempt}.parquet"  # vision_ops.runindex
    in_table = sorted(path.removeprefix(f"{tmp_path}/") for path in [*old_files, old_index])
    assert plan["root_relative"] and sorted(plan["replaces"]) == in_table  # a copy's own
    assert len(plan["moves"]) == 3 and all(rerun.attempt in final for _, final in plan["moves"])
    assert not (tmp_path / JOURNAL).exists()


# --- on S3: the fault proxy in front of SeaweedFS denies one step of the commit ---------------

FINISHED, UNDONE = "new run committed", "old run kept"
S3_STEPS = {
    "journal write": (lambda r: r.method == "PUT" and f"/{JOURNAL}/" in r.key, UNDONE),
    "copies into the partition": (lambda r: r.is_write and "/run_date=" in r.key, UNDONE),
    "manifest write": (lambda r: r.is_write and "/_manifests/" in r.key, UNDONE),
    "marker": (lambda r: r.is_write and r.key.endswith(SUCCESS_MARKER), FINISHED),
    "old files' removal": (lambda r: r.method == "DELETE" and "/run_date=" in r.key, FINISHED),
    "journal removal": (lambda r: r.method == "DELETE" and f"/{JOURNAL}/" in r.key, FINISHED),
}


def s3_commit(output: str, endpoint: str, count: int, run_id: str = "r1") -> ParquetSink:
    writer = ParquetSink(
        output, run_id, DATE, PREDICTION_SCHEMA, 2, {"s3": {"endpoint_url": endpoint}}
    )
    writer.write(rows(count, run_id))
    writer.commit()
    return writer


def s3_parts(s3fs_client: Any, output: str) -> set[str]:
    s3fs_client.invalidate_cache()
    root = output.removeprefix("s3://")
    return {f"s3://{path}" for path in s3fs_client.glob(f"{root}/{PARTITION}/*.parquet")}


def assert_s3_settled(seaweed: Any, s3fs_client: Any, output: str, rows_committed: int) -> None:
    """The next run on the table (with access) settles the commit: glob readers see exactly
    the committed run's files, no journal is left."""
    direct = {"s3": {"endpoint_url": seaweed.endpoint_url}}
    ParquetSink(output, "next", DATE, PREDICTION_SCHEMA, storage_options=direct)
    manifest, problems = verify_run(output, "r1", direct)
    assert problems == [] and manifest["rows"] == rows_committed
    assert s3_parts(s3fs_client, output) == {entry["uri"] for entry in manifest["files"]}
    assert s3fs_client.glob(f"{output.removeprefix('s3://')}/{JOURNAL}/*") == []


@pytest.mark.s3
@pytest.mark.parametrize("step", list(S3_STEPS))
def test_a_denied_step_of_an_s3_commit_keeps_the_old_run_or_commits_the_new(
    seaweed: Any, s3fs_client: Any, step: str
) -> None:
    from faulty_s3 import FaultyS3

    output = f"s3://out/publish-{step.replace(' ', '-').replace(chr(39), '')}"
    s3_commit(output, seaweed.endpoint_url, OLD_ROWS)
    deny, outcome = S3_STEPS[step]
    with FaultyS3(seaweed.endpoint_url, deny=deny) as proxy:
        try:
            s3_commit(output, proxy.endpoint_url, NEW_ROWS)
            committed = FINISHED
        except StorageError as err:
            assert "access denied" in str(err).lower()
            committed = UNDONE
        assert proxy.fault_count("denied") >= 1  # the step was really reached and denied
    assert committed == outcome
    direct = {"s3": {"endpoint_url": seaweed.endpoint_url}}
    manifest, problems = verify_run(output, "r1", direct)  # manifest readers: whole, at once
    assert set(problems) <= {UNFINISHED.format(run_id="r1")} and manifest["rows"] == (
        NEW_ROWS if outcome == FINISHED else OLD_ROWS
    )
    assert_s3_settled(seaweed, s3fs_client, output, manifest["rows"])


@pytest.mark.s3
def test_an_s3_manifest_write_whose_responses_are_lost_is_a_commit(
    seaweed: Any, s3fs_client: Any
) -> None:
    """Every manifest PUT is carried out and its response dropped: the client gives up, reads
    the manifest back, finds its own attempt and finishes the commit rather than undo it."""
    from faulty_s3 import FaultyS3

    output = "s3://out/publish-lost-response"
    s3_commit(output, seaweed.endpoint_url, OLD_ROWS)
    manifest_put = lambda r: r.method == "PUT" and "/_manifests/" in r.key  # noqa: E731
    with FaultyS3(seaweed.endpoint_url, drop_response_every=1, faulty=manifest_put) as proxy:
        rerun = s3_commit(output, proxy.endpoint_url, NEW_ROWS)
        assert proxy.fault_count("dropped_response", "PUT") >= 1
    direct = {"s3": {"endpoint_url": seaweed.endpoint_url}}
    assert committed_run(output, "r1", direct)["attempt"] == rerun.attempt
    assert_s3_settled(seaweed, s3fs_client, output, NEW_ROWS)
