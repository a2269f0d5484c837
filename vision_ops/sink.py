"""Commit prediction rows as Hive-partitioned Parquet: stage part files, check, then publish."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import posixpath
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from fsspec import AbstractFileSystem

from vision_ops.errors import EXIT_BAD_SPEC, VisionOpsError
from vision_ops.masks import (
    MASK_FOLDER_PATTERN,
    final_masks_folder,
    mask_folder_replacement,
    staged_masks_folder,
    staging_folder,
)
from vision_ops.publish import (
    MANIFESTS,
    CommitPlan,
    manifest_of,
    manifest_path,
    publish,
    read_manifest,
    resolve_unfinished,
    unsettled_commits,
)
from vision_ops.resume import UnitsOf
from vision_ops.runindex import INDEX_FOLDER, index_path, write_index
from vision_ops.schema import PARTITION_COLUMN, SCHEMA_VERSION, named_or_latest, run_order, task_of
from vision_ops.staging import StagedParts
from vision_ops.storage import (
    StorageOptions,
    canonical_uri,
    filesystem,
    read_parquet,
    writing_to,
)
from vision_ops.tally import (
    ExpectedUnits,
    Listed,
    MultisetDigest,
    expected_from,
)
from vision_ops.written import (
    UNITS_DIGEST_METHOD,
    CommitRefused,
    WrittenRows,
)

log = logging.getLogger(__name__)
__all__ = ["MANIFESTS", "CommitRefused", "ParquetSink", "RunDateConflict", "committed_runs"]


class CorruptFile(VisionOpsError, OSError):
    """A file a committed run lists that no longer reads as Parquet (`vision-ops verify`
    checks every file of a run)."""


class RunDateConflict(VisionOpsError, ValueError):
    """The run id is committed on another date: a run id names one run, on one date."""

    exit_code = EXIT_BAD_SPEC


def check_run_date(committed: Mapping[str, Any] | None, run_date: dt.date, table: str) -> None:
    """RunDateConflict where `committed`, the manifest of the run id about to run, is of a date
    other than `run_date` (committing it again would strand that date's rows), in any format."""
    if committed is not None and committed["run_date"] != run_date.isoformat():
        raise RunDateConflict(
            f"run id {committed['run_id']!r} is committed for {committed['run_date']} in "
            f"{table}; a run id names one run on one date, so it cannot commit "
            f"{run_date.isoformat()}: give this date its own --run-id (the default, the date "
            "plus the spec's hash, is one per date), or rerun that date"
        )


def new_attempt() -> str:
    """A commit attempt's id: its staging folder and the names of the files it publishes."""
    return uuid.uuid4().hex[:12]


def units_digest(item_ids: list[str]) -> str:
    """One hash of a run's unit ids, whatever their order (sorted: manifests before
    `units_digest_method`)."""
    return hashlib.sha256("\n".join(sorted(item_ids)).encode()).hexdigest()


def units_sum_digest(item_ids: Iterable[str]) -> str:
    """One hash of a run's unit ids, whatever their order, computed as they stream by."""
    digest = MultisetDigest()
    digest.update(item_ids)
    return digest.hexdigest()


def committed_runs(root_uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """The manifests of a table's committed runs, oldest run date first."""
    fs, root = filesystem(root_uri, options)
    folder = f"{root.rstrip('/')}/{MANIFESTS}"
    if not fs.exists(folder):
        return []
    runs = [manifest_of(fs.cat_file(path), path) for path in fs.glob(f"{folder}/*.json")]
    return sorted((in_table(fs, root, run) for run in runs), key=run_order)


# What a listing says of a manifest that changes when it is written again: local disk (its
# inode: a write is a rename), S3, GCS, Azure (each names them its own way).
_VERSIONED = (
    "name", "size", "mtime", "ino", "LastModified", "ETag", "generation", "updated", "etag",
    "last_modified",
)  # fmt: skip


def commits_version(root_uri: str, options: StorageOptions | None = None) -> str:
    """A digest of the table's manifests as its store lists them (name, size, time, ETag): it
    changes whenever a run commits, is rerun or is removed. One listing, no manifest read."""
    fs, root = filesystem(root_uri, options)
    try:
        entries = fs.ls(f"{root.rstrip('/')}/{MANIFESTS}", detail=True)
    except FileNotFoundError:
        entries = []
    listed = sorted(
        json.dumps([entry.get(key) for key in _VERSIONED], default=str) for entry in entries
    )
    return hashlib.sha256("\n".join(listed).encode()).hexdigest()


def settle_other_runs(root_uri: str, run_id: str, options: StorageOptions | None = None) -> None:
    """Finish or undo the commits other runs left half done (`resolve_unfinished`), so that a
    run reads the table as committed (an incremental run, the inputs it leaves out: a run
    killed past its commit point holds its inputs). Run `run_id`'s own are its sink's to settle
    (it resumes from them). Call it holding the table's run lock."""
    fs, root = filesystem(root_uri, options)
    with writing_to(root_uri):
        resolve_unfinished(fs, root.rstrip("/"), leaving=run_id)


def committed_run(
    root_uri: str, run_id: str | None = None, options: StorageOptions | None = None
) -> dict[str, Any] | None:
    """One committed run's manifest: the given id (its manifest alone is read), else the latest."""
    if run_id is None:
        return named_or_latest(committed_runs(root_uri, options), None)
    fs, root = filesystem(root_uri, options)
    manifest = read_manifest(fs, root.rstrip("/"), run_id)
    return None if manifest is None else in_table(fs, root, manifest)


def in_table(fs: AbstractFileSystem, root: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """A run's manifest as the table at `root` holds it: the part files, index and masks folder
    it names, each by name in this table's folder for it. A table copied elsewhere (a bucket
    synced to another, a folder moved) keeps manifests naming the original's files; read so,
    the copy reads and verifies its own, and a manifest cannot lead a reader out of its table."""
    named = NamedInTable.of(root, manifest)
    found = dict(manifest)
    found["files"] = [
        entry | {"uri": canonical_uri(fs, path)}
        for entry, path in zip(manifest["files"], named.files, strict=True)
    ]
    if named.index is not None:
        found["index_uri"] = canonical_uri(fs, named.index)
    if manifest.get("masks_folder"):
        found["masks_folder"] = canonical_uri(fs, named.masks_folder)
    return found


def masks_in_table(rows: pa.Table, manifest: dict[str, Any]) -> pa.Table:
    """A run's rows with their `mask_uri` in the masks folder `manifest` names (as `in_table`
    read it): a copied table's rows name the original's masks."""
    folder = manifest.get("masks_folder")
    if not folder or "mask_uri" not in rows.column_names:
        return rows
    named = pc.replace_substring_regex(
        rows["mask_uri"], pattern=MASK_FOLDER_PATTERN, replacement=mask_folder_replacement(folder)
    )
    return rows.set_column(rows.schema.get_field_index("mask_uri"), "mask_uri", named)


@dataclass(frozen=True)
class NamedInTable:
    """The paths, in the table at a root, of what a run's manifest names."""

    files: list[str]  # its part files, in the manifest's order
    index: str | None  # its index, where it names one
    masks_folder: str  # its masks' folder (there or not)

    @classmethod
    def of(cls, root: str, manifest: dict[str, Any]) -> NamedInTable:
        root = root.rstrip("/")
        run_date = dt.date.fromisoformat(manifest["run_date"])
        partition = f"{root}/{PARTITION_COLUMN}={run_date.isoformat()}"
        index = manifest.get("index_uri")
        return cls(
            files=[f"{partition}/{posixpath.basename(e['uri'])}" for e in manifest["files"]],
            index=f"{root}/{INDEX_FOLDER}/{posixpath.basename(index)}" if index else None,
            masks_folder=final_masks_folder(
                root, manifest["run_id"], run_date, manifest.get("attempt")
            ),
        )


@dataclass
class CommitResult:
    """What a committed run wrote."""

    partition_uri: str
    manifest_uri: str
    files: list[str]
    rows: int
    ok: int
    errors: int
    skipped: int = 0  # tiles with no data, recorded and never sent to the model
    resumed: int = 0  # units an earlier attempt of the run id made durable, reused

    @classmethod
    def of(
        cls,
        where: tuple[str, str],
        files: list[str],
        counts: Mapping[str, Any],
        resumed: int,
    ) -> CommitResult:
        """A run as committed: `where` (its partition, its manifest), its `files`, with the
        row `counts` a manifest (or a snapshot summary) records."""
        partition_uri, manifest_uri = where
        return cls(
            partition_uri=partition_uri,
            manifest_uri=manifest_uri,
            files=files,
            rows=counts["rows"],
            ok=counts["ok"],
            errors=counts["errors"],
            skipped=counts.get("skipped", 0),
            resumed=resumed,
        )


@dataclass
class ParquetSink:
    """Collects row tables into part files under a staging prefix, then commits them at once.

    Files are named `{run_id}-{attempt}-part-{n:05d}.parquet` in `run_date=YYYY-MM-DD/`; a rerun
    of the same run id replaces that run's files. The commit is a transaction (`publish`): its
    journal fenced is the commit point, then readers switch on the manifest
    `_manifests/{run_id}.json`. Opening a sink first settles any
    commit a crash left half done and refuses a run id committed on another date.
    """

    root_uri: str
    run_id: str
    run_date: dt.date
    schema: pa.Schema
    rows_per_file: int = 250_000
    storage_options: StorageOptions = field(default_factory=dict)
    attempt: str = field(default_factory=new_attempt)
    # Staged rows are made durable at least this often (rows or seconds, whichever first),
    # and a rerun of the run id resumes from them where `resume_key` is set (see `resume`).
    durable_every_rows: int = 100_000
    durable_every_s: float = 120.0
    resume_key: str | None = None
    written: WrittenRows = field(default_factory=WrittenRows)
    resumed: int = 0  # units an earlier attempt made durable, reused
    # The run, where opening the sink finished the commit of an earlier attempt of this run id
    # and resume key that was killed past its commit point: nothing is left to process.
    finished_earlier: CommitResult | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.fs, root = filesystem(self.root_uri, self.storage_options)
        self.root = root.rstrip("/")
        self.staging = staging_folder(self.root, self.run_id, self.attempt)
        self.parts = StagedParts(
            self.fs,
            self.staging,
            self.rows_per_file,
            self.durable_every_rows,
            self.durable_every_s,
            self.resume_key,
        )
        self.partition = f"{self.root}/{PARTITION_COLUMN}={self.run_date.isoformat()}"
        with writing_to(self.root_uri):
            settled = resolve_unfinished(self.fs, self.root)
            committed = read_manifest(self.fs, self.root, self.run_id)
            check_run_date(committed, self.run_date, self.root_uri)
            if self.resume_key is None:
                self.parts.remove_earlier()
            elif settled.get(self.run_id) and committed is not None:
                self.finished_earlier = self._finished(committed)

    def _finished(self, manifest: dict[str, Any]) -> CommitResult | None:
        """The run the commit settled just now committed, where its attempt had the same
        resume key (the same run, spec, model and inputs): a rerun after a kill past the commit
        point has the run it was asked for, and processes nothing again."""
        if manifest.get("resume_key") != self.resume_key:
            return None
        found = in_table(self.fs, self.root, manifest)
        files = [entry["uri"] for entry in found["files"]]
        return self._result(files, manifest, resumed=manifest["rows"])

    def _result(self, files: list[str], counts: Mapping[str, Any], resumed: int) -> CommitResult:
        where = (
            canonical_uri(self.fs, self.partition),
            canonical_uri(self.fs, manifest_path(self.root, self.run_id)),
        )
        return CommitResult.of(where, files, counts, resumed)

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)
        self.written.add(table)
        with writing_to(self.root_uri):
            self.parts.add(table)

    def resume(self, units_of: UnitsOf) -> frozenset[str]:
        """Reuse what earlier attempts of this run id made durable (StagedParts.resume): the
        rows of the sources they hold whole (with their masks, where the table has masks)
        are staged again for this attempt; returns those sources, for the run to leave out.
        Nothing is reused without a `resume_key`."""
        final = final_masks_folder(self.root, self.run_id, self.run_date, self.attempt)
        masks = final if "mask_uri" in self.schema.names else None
        with writing_to(self.root_uri):
            found = self.parts.resume(self.schema, units_of, self.write, masks)
        self.resumed = found.units if found else 0
        return found.sources if found else frozenset()

    def staged(self, columns: list[str] | None = None) -> pa.Table:
        """The rows written so far (what a commit now would publish): the given columns, else
        all."""
        with writing_to(self.root_uri):
            return self.parts.staged(self.schema, columns)

    def commit(
        self,
        listed: Listed | ExpectedUnits | None = None,
        details: dict[str, Any] | None = None,
        held: Callable[[], None] | None = None,
    ) -> CommitResult:
        """Check exactly-once against the `listed` units (a list, or ExpectedUnits that tally
        them where they are) and the staged footers, then replace this run's files in the
        partition and write the manifest (with `details`) and `_SUCCESS`. CommitRefused, with
        nothing visible to readers, when a check fails; `held` (the run's lock) raises to stop
        the commit right before its commit point."""
        with writing_to(self.root_uri):
            return self._commit(listed, details, held)

    def _commit(
        self,
        listed: Listed | ExpectedUnits | None,
        details: dict[str, Any] | None,
        held: Callable[[], None] | None,
    ) -> CommitResult:
        self.parts.require_own(self.run_id)
        self.parts.compact(self.written.rows)
        masks = self._staged_masks()
        self._check(listed, masks)
        plan = self._plan(masks, self._stage_index())
        files = [canonical_uri(self.fs, final) for _, final in plan.moves[: len(self.parts.files)]]
        index = canonical_uri(self.fs, plan.moves[-1][1])
        publish(
            self.fs, self.root, plan, lambda: self._manifest(files, index) | (details or {}), held
        )
        return self._result(files, self.written.counts(), resumed=self.resumed)

    def _check(self, listed: Listed | ExpectedUnits | None, masks: list[str]) -> None:
        """Exactly once against the listing, every staged footer readable and the staged files
        holding every row written."""
        self.parts.check_footers(self.written.rows)
        expected = None if listed is None else expected_from(listed)
        self.written.check(expected, self.parts.units, len(masks))

    def _stage_index(self) -> str:
        """The run's index (vision_ops.runindex) of its staged rows, staged beside them."""
        staged = f"{self.staging}/{INDEX_FOLDER}.parquet"
        write_index(self.fs, staged, self.parts.index())
        return staged

    def _plan(self, masks: list[str], index: str) -> CommitPlan:
        """The commit: the staged part files, then the masks, then the run's index (last) to
        their final names; the files of the run of this id committed before (if any) to
        remove once this one is."""
        parts = [
            (staged, f"{self.partition}/{self.run_id}-{self.attempt}-{staged.rpartition('/')[2]}")
            for staged, _ in self.parts.files
        ]
        final = final_masks_folder(self.root, self.run_id, self.run_date, self.attempt)
        mask_moves = [(path, f"{final}/{path.rpartition('/')[2]}") for path in masks]
        return CommitPlan(
            run_id=self.run_id,
            attempt=self.attempt,
            partition=self.partition,
            moves=[*parts, *mask_moves, (index, index_path(self.root, self.run_id, self.attempt))],
            staging=self.staging,
            replaces=self._committed_files(),
        )

    def _committed_files(self) -> list[str]:
        """The files of this run id's committed run: its manifest's part files, its index and
        its masks, by name in this table (a table copied from elsewhere has manifests that
        name the original's files: those are never removed from here)."""
        manifest = read_manifest(self.fs, self.root, self.run_id)
        if manifest is None:
            return []
        named = NamedInTable.of(self.root, manifest)
        files = named.files + ([named.index] if named.index else [])
        try:  # one listing gives each entry's type (no request per mask)
            entries = self.fs.ls(named.masks_folder, detail=True)
        except FileNotFoundError:
            entries = []
        return files + [entry["name"] for entry in entries if entry["type"] == "file"]

    def _staged_masks(self) -> list[str]:
        """The masks the workers staged (only a table with masks lists the store for them)."""
        if "mask_uri" not in self.schema.names:
            return []
        staged = staged_masks_folder(self.root, self.run_id, self.attempt)
        return sorted(self.fs.find(staged)) if self.fs.exists(staged) else []

    def _manifest(self, files: list[str], index: str) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "run_date": self.run_date.isoformat(),
            "schema_version": SCHEMA_VERSION,
            "task": task_of(self.schema),
            **self.written.counts(),
            "resumed_units": self.resumed,
            "processed_units": self.written.rows - self.resumed,
            "resume_key": self.resume_key,
            "files": [
                {"uri": uri, "rows": rows}
                for uri, (_, rows) in zip(files, self.parts.files, strict=True)
            ],
            "masks_folder": canonical_uri(
                self.fs, final_masks_folder(self.root, self.run_id, self.run_date, self.attempt)
            )
            if "mask_uri" in self.schema.names
            else None,
            "index_uri": index,
            "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }


def read_committed_file(
    uri: str, options: StorageOptions | None = None, columns: list[str] | None = None
) -> pa.Table:
    """One file a manifest lists, read through its filesystem."""
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as handle:
        try:
            return read_parquet(handle, columns)
        except pa.ArrowException as err:  # cut short or overwritten since the commit
            raise CorruptFile(f"{uri}: not a readable Parquet file ({err})") from None


def unfinished_commit(
    root_uri: str, run_id: str | None = None, options: StorageOptions | None = None
) -> list[str]:
    """A problem per run whose commit is unsettled (its journal is there: in progress, or
    interrupted; `verify` takes no lock to tell): `run_id`'s, else any run's in the table
    (plain readers of the table see its files, whatever run is verified)."""
    fs, root = filesystem(root_uri, options)
    plans = unsettled_commits(fs, root.rstrip("/"), run_id)
    return [
        f"a commit of run {unsettled} is unsettled (in progress, or interrupted): plain readers "
        "of the partition may see files of two attempts until it finishes or the next run on "
        "this table settles it"
        for unsettled in sorted({plan.run_id for plan in plans})
    ]


def verify_run(
    root_uri: str, run_id: str | None = None, options: StorageOptions | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Re-check a committed run (the given id, else the latest): its files exist with readable
    footers and the manifest's row counts, no unit twice, the units its manifest recorded, and
    no unfinished commit in the table, of this run or another. Returns the manifest and the
    problems found (none: it holds)."""
    manifest = committed_run(root_uri, run_id, options)
    problems = unfinished_commit(root_uri, None, options)  # any run's: glob readers see it
    if manifest is None:
        return {}, [f"{root_uri}: no committed run {run_id or ''}".rstrip(), *problems]
    item_ids: list[str] = []
    for entry in manifest["files"]:
        try:
            table = read_committed_file(entry["uri"], options, ["item_id"])
        except (OSError, pa.ArrowException) as err:
            problems.append(f"{entry['uri']}: unreadable ({err})")
            continue
        if table.num_rows != entry["rows"]:
            problems.append(f"{entry['uri']}: {table.num_rows} rows, manifest says {entry['rows']}")
        item_ids += table["item_id"].to_pylist()
    if len(item_ids) != len(set(item_ids)):
        problems.append(f"{len(item_ids) - len(set(item_ids))} unit(s) appear twice")
    summed = manifest.get("units_digest_method") == UNITS_DIGEST_METHOD
    digest = units_sum_digest(item_ids) if summed else units_digest(item_ids)
    if not problems and digest != manifest.get("units_digest"):
        problems.append("the units differ from those the run committed (units_digest)")
    return manifest, problems
