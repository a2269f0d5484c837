"""The Parquet commit as a transaction: journal, new files beside the old, manifest, cleanup.

A run's commit (`publish`) goes through these steps, each one durable before the next (on local
disk and NFS flushed to the disk, `storage.synced`, so a power loss is a crash like another):

1. the journal `_commits/{run_id}.{attempt}.json` records the plan: the attempt's files and
   where they go, and the files of the committed run it replaces;
2. the attempt's part files (and masks) move from `_staging/` into the partition under names
   of their own (`{run_id}-{attempt}-part-NNNNN.parquet`), and its index (vision_ops.runindex)
   to `_index/{run_id}-{attempt}.parquet`: nothing committed is overwritten;
3. the journal is rewritten `fenced`, with the manifest in it, over the version the run wrote
   (a compare-and-swap, vision_ops.lock_file): the commit point;
4. the manifest `_manifests/{run_id}.json` is replaced in one write, over the version the
   commit replaces (read before its fence) only: readers switch to the run;
5. `_SUCCESS` is written in the partition, the replaced run's files are removed, and the
   journal last.

A failure before the commit point undoes steps 1-2 (the old run stays committed, whole; the
attempt's files move back to its staging, where a rerun of the run id resumes from them); a
failure after it leaves the new run committed and its cleanup to finish. When a failure leaves
the outcome unknown, or the driver is killed, the journal stays: the next run on the table
(`resolve_unfinished`, under the table's run lock) finishes a fenced commit (its manifest
written from the journal) and undoes any other. Whoever settles a journal first claims it, by
rewriting it over the version it read: so a run whose lock was taken over while it stalled at
its commit point either fences first (and the run that took over finishes its commit) or finds
its journal claimed (and commits nothing): never a manifest naming files another run moved
back. Nothing is ever deleted by pattern: only files a journal or a manifest names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fsspec import AbstractFileSystem

from vision_ops.errors import VisionOpsError
from vision_ops.lock_file import LockFile, Raced, lock_file
from vision_ops.storage import (
    TABLE_IS_A_FILE,
    TEMPORARY_INFIX,
    StorageError,
    is_local,
    make_folder,
    synced,
)
from vision_ops.written import CommitRefused

log = logging.getLogger(__name__)
JOURNAL = "_commits"  # one JSON per commit in progress: what to finish or undo after a crash
MANIFESTS = "_manifests"  # one JSON per committed run, written last: the commit itself
SUCCESS_MARKER = "_SUCCESS"  # in a partition once a run has committed there (Hadoop's marker)
# A journal's keys beside its plan: whether its commit passed the commit point, the manifest
# to write and the version of the manifest it replaces, and the last settler's claim
# (journals written before fencing have none of them).
FENCED, MANIFEST, REPLACED, CLAIM = "fenced", "manifest", "replaced_manifest", "claim"


class CommitUnknown(RuntimeError):
    """The commit failed at its commit point and whether it took could not be read back; the
    next run on the table settles it (finishes or undoes it, from the journal)."""


@dataclass(frozen=True)
class CommitPlan:
    """Everything needed to finish or to undo one attempt's commit, paths within the store."""

    run_id: str
    attempt: str
    partition: str  # the run_date=... folder its part files go to
    moves: list[tuple[str, str]]  # (staged, final) for each part file and mask
    staging: str  # the attempt's staging folder, removed once the commit is settled
    replaces: list[str]  # the files of the committed run this one replaces

    def to_json(self, root: str) -> bytes:
        """The plan with its paths relative to the table's `root`: a copied or replicated
        table's journal names the copy's files, never the original's."""
        plan = _with_paths(asdict(self), lambda path: _relative(root, path))
        return json.dumps(plan | {ROOT_RELATIVE: True}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, root: str) -> CommitPlan:
        """The plan `to_json` wrote, its paths under `root` (a journal from before paths were
        relative names them as written); the journal's other keys left aside."""
        raw = json.loads(data)
        if raw.pop(ROOT_RELATIVE, False):
            raw = _with_paths(raw, lambda path: f"{root}/{path}")
        raw["moves"] = [tuple(move) for move in raw["moves"]]
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


ROOT_RELATIVE = "root_relative"  # a journal's paths are relative to its table's root


def _with_paths(plan: dict[str, Any], change: Callable[[str], str]) -> dict[str, Any]:
    """A plan's fields with `change` applied to each path in them."""
    return plan | {
        "partition": change(plan["partition"]),
        "moves": [[change(source), change(target)] for source, target in plan["moves"]],
        "staging": change(plan["staging"]),
        "replaces": [change(path) for path in plan["replaces"]],
    }


def _relative(root: str, path: str) -> str:
    """`path` relative to `root`; every path of a commit is in its table."""
    if not path.startswith(f"{root}/"):
        raise ValueError(f"{path} is not in the table at {root}")
    return path[len(root) + 1 :]


def journal_path(root: str, run_id: str, attempt: str) -> str:
    """One journal an attempt: where a run whose lock was taken over undoes its own commit, it
    removes its own journal, never that of the attempt of the same run id that took over."""
    return f"{root}/{JOURNAL}/{run_id}.{attempt}.json"


def journals(fs: AbstractFileSystem, root: str) -> list[str]:
    """The journals of the commits in progress (or interrupted) in the table at `root`,
    as named now or before (`{run_id}.json`)."""
    try:
        names = fs.ls(f"{root}/{JOURNAL}", detail=False)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.endswith(".json"))


def unsettled_commits(
    fs: AbstractFileSystem, root: str, run_id: str | None = None
) -> list[CommitPlan]:
    """The unsettled commits (in progress, or interrupted: their journals are there) in the
    table at `root`: run `run_id`'s, else every run's."""
    plans = []
    for path in journals(fs, root):
        with contextlib.suppress(FileNotFoundError):  # settled since it was listed
            plans.append(CommitPlan.from_json(fs.cat_file(path), root))
    return [plan for plan in plans if run_id is None or plan.run_id == run_id]


def manifest_path(root: str, run_id: str) -> str:
    return f"{root}/{MANIFESTS}/{run_id}.json"


class CorruptManifest(VisionOpsError, ValueError):
    """A manifest that is not the JSON object a commit writes (edited or cut short since)."""


def read_manifest(fs: AbstractFileSystem, root: str, run_id: str) -> dict[str, Any] | None:
    """The committed run's manifest; None where the run id has none."""
    path = manifest_path(root, run_id)
    try:
        return manifest_of(fs.cat_file(path), path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise StorageError(f"{root} {TABLE_IS_A_FILE}") from None


def manifest_of(data: bytes, path: str) -> dict[str, Any]:
    """A manifest's JSON; CorruptManifest naming `path` where it is not a JSON object."""
    try:
        manifest = json.loads(data)
    except ValueError as err:  # not JSON, or not UTF-8
        raise CorruptManifest(f"manifest {path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise CorruptManifest(f"manifest {path}: expected a JSON object")
    return manifest


def publish(
    fs: AbstractFileSystem,
    root: str,
    plan: CommitPlan,
    manifest: Callable[[], dict[str, Any]],
    held: Callable[[], None] | None = None,
) -> None:
    """Commit `plan`: journal, moves, the journal fenced (the commit point), `manifest()`
    written, then the cleanup. Raises (the old run still committed) when a step before the
    commit point fails, `held()` included (the run's lock, asked last), or where another run
    claimed the journal first (its lock taken over while this one stalled: that run undid it)."""
    make_folder(fs, f"{root}/{JOURNAL}")
    journal = lock_file(fs, journal_path(root, plan.run_id, plan.attempt))
    unfenced = json.dumps(json.loads(plan.to_json(root)) | {FENCED: False}, indent=1).encode()
    tag = _swap(journal, unfenced, None)
    try:
        _move(fs, plan.moves)
        synced(fs, [final for _, final in plan.moves])  # on disk before the manifest names them
        make_folder(fs, f"{root}/{MANIFESTS}")
        content = manifest() | {"attempt": plan.attempt}
        if held is not None:
            held()
        replaced = _manifest_file(fs, root, plan.run_id).read()[1]
        fenced = json.loads(unfenced) | {FENCED: True, MANIFEST: content, REPLACED: replaced}
        tag = _swap(journal, json.dumps(fenced, indent=1).encode(), tag)
    except Raced:
        outcome = _outcome_settled_elsewhere(fs, root, plan)
        if outcome:
            return  # the fence took, and the run that claimed it since finished the commit
        fenced = _journal_fenced(fs, root, plan) if outcome is None else False
        if fenced is None and _outcome_settled_elsewhere(fs, root, plan):
            return  # settled since it was read: finished by the run that claimed it
        if fenced is not False:
            raise CommitUnknown(
                f"run {plan.run_id}: its commit point may have been reached, and the run that "
                "took the table's lock over (it claimed the journal) settles this commit from "
                "it: finished where the fence landed"
            ) from None
        raise _settled_by_another(plan) from None
    except Exception:
        stands = _settle_or_leave(fs, root, plan, committed=None)
        if stands is None:  # the journal gone: another run settled it, or it is left
            stands = _outcome_settled_elsewhere(fs, root, plan)
            if stands is False:
                raise _settled_by_another(plan) from None
        if not stands:
            raise
        return  # the fence took (its answer lost): the commit is finished
    try:
        _write_manifest(fs, root, plan, content, replaced)
    except Exception as err:
        if _committed_attempt(fs, root, plan, err) != plan.attempt:
            _unfence_or_leave(fs, root, plan, journal, unfenced, tag)
            raise
    _settle_or_leave(fs, root, plan, committed=True)


def _settled_by_another(plan: CommitPlan) -> CommitRefused:
    return CommitRefused(
        f"run {plan.run_id}: another run settled this commit (the table's lock was taken over "
        "while this run stalled): not committed, the table keeps the run it had"
    )


def _journal_fenced(fs: AbstractFileSystem, root: str, plan: CommitPlan) -> bool | None:
    """Whether the commit's journal, claimed by another settler, holds its fence: the fence
    landed before the claim (a write retried after its answer was lost), so the settler
    finishes the commit; not fenced, it undoes it. None where it is gone (settled since it was
    last read) or cannot be read."""
    try:
        data = lock_file(fs, journal_path(root, plan.run_id, plan.attempt)).read()[0]
        return None if data is None else bool(json.loads(data).get(FENCED))
    except Exception:  # unreadable (not JSON, or the store's error of any type): not known
        return None


def _outcome_settled_elsewhere(fs: AbstractFileSystem, root: str, plan: CommitPlan) -> bool | None:
    """Where a commit's journal is gone before its fence was known to take (another run, which
    took the table's lock over, settled it): whether that run finished it (the manifest names
    the attempt). Where it undid it, the files this run moved in after that go back to its
    staging: no journal or manifest names them, and they would stay in the partition for good.
    None where the journal is still there (the next run settles it) or cannot be read."""
    try:
        if lock_file(fs, journal_path(root, plan.run_id, plan.attempt)).read()[0] is not None:
            return None
        if (read_manifest(fs, root, plan.run_id) or {}).get("attempt") == plan.attempt:
            return True
        _move(fs, [(final, staged) for staged, final in plan.moves], missing_ok=True)
    except Exception as err:  # a store's errors are not all OSErrors (botocore's, unwrapped)
        log.warning("run %s: its commit's outcome could not be read (%s)", plan.run_id, err)
        return None
    return False


def resolve_unfinished(
    fs: AbstractFileSystem, root: str, leaving: str | None = None
) -> dict[str, bool]:
    """Finish or undo every commit a crash left half done (its journal says which: fenced, or
    from before fencing the manifest naming its attempt), but those of run `leaving`; returns
    the run ids settled, each with whether its commit was finished. Call it holding the
    table's run lock. Where one cannot be settled, StorageError: a run must not start (its
    commit would write over the journal, the only record of the files the interrupted commit
    moved)."""
    _remove_temporaries(fs, root)
    settled: dict[str, bool] = {}
    for path in journals(fs, root):
        try:
            plan = CommitPlan.from_json(fs.cat_file(path), root)
        except FileNotFoundError:  # settled meanwhile (its run finished it)
            continue
        if plan.run_id == leaving:
            continue
        try:
            finished = _settle_claimed(fs, root, path, interrupted=True)
        except Exception as err:  # a store's errors are not all OSErrors (botocore's)
            raise StorageError(
                f"run {plan.run_id}: an interrupted commit (attempt {plan.attempt}) could not "
                f"be settled ({type(err).__name__}: {err}); nothing was started: run again "
                "when the store answers"
            ) from None
        if finished is not None:  # None: settled meanwhile by another
            settled[plan.run_id] = finished
    return settled


def _swap(journal: LockFile, data: bytes, expected: str | None) -> str:
    """`data` written over the journal's version `expected`; a write whose answer was lost,
    retried and refused (the first try took) counts as written: the journal holds `data`."""
    try:
        return journal.write(data, expected)
    except Raced:
        found, tag = journal.read()
        if found != data or tag is None:
            raise
        return tag


def _manifest_file(fs: AbstractFileSystem, root: str, run_id: str) -> LockFile:
    return lock_file(fs, manifest_path(root, run_id))


def _write_manifest(
    fs: AbstractFileSystem,
    root: str,
    plan: CommitPlan,
    content: dict[str, Any],
    replaced: str | None,
) -> None:
    """The manifest written over the version the commit replaces (`replaced`, read before its
    fence), the only one it may replace: where it moved on, written by another settler of this
    commit (it names this attempt: the same manifest) or by a later commit of the run id (this
    one superseded: its files already removed by that one), nothing is written."""
    try:
        data = json.dumps(content, indent=2).encode()
        _swap(_manifest_file(fs, root, plan.run_id), data, replaced)
    except Raced:
        named = (read_manifest(fs, root, plan.run_id) or {}).get("attempt")
        if named != plan.attempt:
            log.warning(
                "run %s: attempt %s committed, and a later commit (attempt %s) replaced it since",
                plan.run_id,
                plan.attempt,
                named,
            )


def _claim(journal: LockFile) -> dict[str, Any] | None:
    """The journal as this settler claims it: rewritten with a claim of its own over the
    version it read (read again where another came between), so that of two settlers, or a
    settler and a commit at its fence, one goes on; None where it is gone (settled)."""
    while True:
        data, tag = journal.read()
        if data is None or tag is None:
            return None
        raw: dict[str, Any] = json.loads(data)
        claimed = raw | {CLAIM: uuid.uuid4().hex}
        try:
            journal.write(json.dumps(claimed, indent=1).encode(), expected=tag)
        except Raced:
            continue
        except FileNotFoundError:  # removed since it was read (a store may answer 404)
            return None
        return claimed


def _settle_claimed(
    fs: AbstractFileSystem, root: str, path: str, interrupted: bool = False
) -> bool | None:
    """Claim the journal at `path`, then finish its commit (fenced: its manifest written, where
    it is not yet) or undo it; a journal from before fencing is finished where the manifest
    names its attempt. Returns whether it was finished (None: gone, settled by another)."""
    raw = _claim(lock_file(fs, path))
    if raw is None:
        return None
    plan = CommitPlan.from_json(json.dumps(raw).encode(), root)
    named = (read_manifest(fs, root, plan.run_id) or {}).get("attempt") == plan.attempt
    committed = bool(raw[FENCED]) if FENCED in raw else named
    if interrupted:
        log.warning(
            "run %s: a commit (attempt %s) was interrupted; %s it",
            plan.run_id,
            plan.attempt,
            "finishing" if committed else "undoing",
        )
    if committed and not named:
        _write_manifest(fs, root, plan, raw[MANIFEST], raw.get(REPLACED))
    _settle(fs, root, plan, committed, path)
    return committed


def _remove_temporaries(fs: AbstractFileSystem, root: str) -> None:
    """The temporary files of journal and manifest writes a killed driver left (local disk)."""
    if is_local(fs):
        for folder in (JOURNAL, MANIFESTS):
            for path in fs.glob(f"{root}/{folder}/*.json{TEMPORARY_INFIX}*"):
                _remove(fs, path)
        _prune_empty_folders(fs, root, [f"{root}/{JOURNAL}/_"])


def _move(fs: AbstractFileSystem, moves: list[tuple[str, str]], missing_ok: bool = False) -> None:
    """Each (from, to) pair moved, each target folder made once; `missing_ok`: a file that is
    not there is passed over (undoing: it had not moved yet, or it moved back already)."""
    made: set[str] = set()
    for source, target in moves:
        folder = target.rpartition("/")[0]
        if folder not in made:
            make_folder(fs, folder)
            made.add(folder)
        try:
            fs.mv(source, target)
        except FileNotFoundError:
            if not missing_ok:
                raise


def _committed_attempt(
    fs: AbstractFileSystem, root: str, plan: CommitPlan, err: Exception
) -> str | None:
    """The attempt the manifest names after a failed step: a write reported as failed may have
    taken (a response lost on the way back). CommitUnknown where the manifest cannot be read."""
    try:
        return (read_manifest(fs, root, plan.run_id) or {}).get("attempt")
    except Exception as read_err:
        raise CommitUnknown(
            f"the commit of run {plan.run_id} failed ({err}), and whether it took could not be "
            f"read back ({read_err}); the next run on this table finishes or undoes it"
        ) from err


def _settle(
    fs: AbstractFileSystem, root: str, plan: CommitPlan, committed: bool, journal: str
) -> None:
    """Finish (`committed`: marker, the replaced run's files and the staging removed) or undo
    (the attempt's files moved back to its staging, for a rerun of the run id to resume from)
    a commit, then drop its `journal`. Where a step fails, the journal stays, and a committed
    run is committed regardless."""
    if committed:
        _mark_success(fs, plan)
        for path in plan.replaces:
            _remove(fs, path)
        _remove(fs, plan.staging, recursive=True)
        emptied = [*plan.replaces, plan.staging]
    else:
        _move(fs, [(final, staged) for staged, final in plan.moves], missing_ok=True)
        emptied = [final for _, final in plan.moves]
    _remove(fs, journal)
    _prune_empty_folders(fs, root, [*emptied, journal])


def _unfence_or_leave(
    fs: AbstractFileSystem,
    root: str,
    plan: CommitPlan,
    journal: LockFile,
    unfenced: bytes,
    fenced_tag: str,
) -> None:
    """After a manifest write that did not take: the fence taken back over the version this
    run wrote, then the commit undone. Where another run claimed the journal since (its lock
    taken over), that run finishes the commit: CommitUnknown."""
    try:
        journal.write(unfenced, expected=fenced_tag)
    except Raced:
        raise CommitUnknown(
            f"the manifest of run {plan.run_id} was not written, and the run that took the "
            "table's lock over finishes this commit from its journal"
        ) from None
    except OSError as err:
        raise CommitUnknown(
            f"the manifest of run {plan.run_id} was not written, nor its commit taken back "
            f"({err}): it stands, and the next run on this table writes its manifest"
        ) from None
    _settle_or_leave(fs, root, plan, committed=False)


def _settle_or_leave(
    fs: AbstractFileSystem, root: str, plan: CommitPlan, committed: bool | None
) -> bool | None:
    """`_settle` the run's own commit (`committed` None: as its journal says: claimed, then
    finished where its fence took); where a step fails, the journal stays for the next run on
    the table to settle (`resolve_unfinished`) before it starts. Returns whether the commit
    stands (None: not known)."""
    path = journal_path(root, plan.run_id, plan.attempt)
    try:
        if committed is None:
            return _settle_claimed(fs, root, path)
        _settle(fs, root, plan, committed, path)
        return committed
    except Exception as err:  # a store's errors are not all OSErrors (botocore's, unwrapped)
        log.warning(
            "run %s: %s, but cleaning up failed (%s); the next run on this table finishes it",
            plan.run_id,
            {True: "committed", False: "not committed", None: "interrupted"}[committed],
            err,
        )
        return committed


def _mark_success(fs: AbstractFileSystem, plan: CommitPlan) -> None:
    """Hadoop's marker, for tools that look for it; the manifest is what readers switch on.
    On local disk the partition's folder is made where the run wrote no file (an incremental
    night with nothing new: a scheduler waiting for the date's marker waited for ever)."""
    try:
        if is_local(fs):  # (an object store has no folders)
            fs.makedirs(plan.partition, exist_ok=True)
        fs.pipe_file(f"{plan.partition}/{SUCCESS_MARKER}", b"")
    except Exception as err:  # as `_settle_or_leave`: committed whatever the store says
        log.warning("run %s committed, but %s not written: %s", plan.run_id, SUCCESS_MARKER, err)


def _prune_empty_folders(fs: AbstractFileSystem, root: str, removed: list[str]) -> None:
    """Local disk only (an object store has no empty folders): the folders that `removed`
    paths left empty, up to the table's root."""
    if not is_local(fs):
        return
    for folder in sorted({path.rpartition("/")[0] for path in removed}, reverse=True):
        while folder.startswith(f"{root}/") and fs.exists(folder) and not fs.ls(folder):
            fs.rmdir(folder)
            folder = folder.rpartition("/")[0]


def _remove(fs: AbstractFileSystem, path: str, recursive: bool = False) -> None:
    """One file (one DELETE of its key on S3), or a folder with what it holds; gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        if not recursive:
            fs.rm_file(path)
        elif fs.exists(path):
            fs.rm(path, recursive=True)
