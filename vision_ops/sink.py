"""Commit prediction rows as Hive-partitioned Parquet: stage, move into place, manifest last."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vision_ops.masks import final_masks_folder, staged_masks_folder
from vision_ops.schema import PARTITION_COLUMN, SCHEMA_VERSION, STATUS_OK, STATUS_SKIPPED, item_id
from vision_ops.storage import (
    StorageOptions,
    canonical_uri,
    filesystem,
    make_folder,
    writing_to,
)
from vision_ops.tally import (
    ExpectedUnits,
    Listed,
    MultisetDigest,
    Tally,
    bucket_of,
    expected_from,
    row_tallies,
)

log = logging.getLogger(__name__)
MAX_RESCAN_BUCKETS = 16  # a refused commit names examples from at most this many buckets
UNITS_DIGEST_METHOD = "sha256-sum"  # how `units_digest` is computed (absent: sorted ids)
MANIFESTS = "_manifests"  # one JSON per committed run, written last: the commit itself
SUCCESS_MARKER = "_SUCCESS"  # in a partition once a run has committed there (Hadoop's marker)


class CommitRefused(RuntimeError):
    """The rows are not exactly the listed units once each; nothing was committed."""


def units_digest(item_ids: list[str]) -> str:
    """One hash of a run's unit ids, whatever their order (sorted: manifests before
    `units_digest_method`)."""
    return hashlib.sha256("\n".join(sorted(item_ids)).encode()).hexdigest()


def units_sum_digest(item_ids: Iterable[str]) -> str:
    """One hash of a run's unit ids, whatever their order, computed as they stream by."""
    digest = MultisetDigest()
    digest.update(item_ids)
    return digest.hexdigest()


def expected_units(listed: Listed, frame_counts: Mapping[str, int]) -> set[str]:
    """The unit ids a run must write: one per listed source or planned tile, or one per frame
    of a source its reader found to hold `frame_counts[uri]` frames (multi-frame DICOM)."""
    expected: set[str] = set()
    for entry in listed:
        uri, tile = (entry, None) if isinstance(entry, str) else entry
        if tile is not None:
            expected.add(item_id(uri, tile=tile))
            continue
        count = frame_counts.get(uri)
        if count is None:
            expected.add(item_id(uri))
        else:
            expected.update(item_id(uri, frame) for frame in range(count))
    return expected


def check_units(listed: Listed, written: Iterable[tuple[str, str, int | None]]) -> None:
    """The exact check, in memory, of `written` rows (item id, source, frame count) against
    the `listed` units: no frame count disputed, then each unit once."""
    frame_counts: dict[str, int] = {}
    conflicts: set[str] = set()
    ids = []
    for unit, uri, count in written:
        ids.append(unit)
        if count is not None and frame_counts.setdefault(uri, count) != count:
            conflicts.add(uri)
    if conflicts:
        some = sorted(conflicts)[:3]
        raise CommitRefused(f"refusing to commit: rows disagree on the frame count of {some}")
    check_exactly_once(expected_units(listed, frame_counts), ids)


def check_exactly_once(expected: set[str], written: list[str]) -> None:
    """Anti-join both ways, and no unit twice; CommitRefused naming a few of each problem."""
    seen: set[str] = set()
    twice: set[str] = set()
    for item in written:
        (twice if item in seen else seen).add(item)
    missing, unexpected = expected - seen, seen - expected
    if missing or unexpected or twice:
        parts = [
            f"{len(found)} {what} (e.g. {sorted(found)[:3]})"
            for what, found in (("missing", missing), ("unexpected", unexpected), ("twice", twice))
            if found
        ]
        raise CommitRefused("refusing to commit: " + "; ".join(parts))


def committed_runs(root_uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """The manifests of a table's committed runs, oldest run date first."""
    fs, root = filesystem(root_uri, options)
    folder = f"{root.rstrip('/')}/{MANIFESTS}"
    if not fs.exists(folder):
        return []
    runs = [json.loads(fs.cat_file(path)) for path in fs.glob(f"{folder}/*.json")]
    return sorted(runs, key=lambda run: (run["run_date"], run["run_id"]))


def committed_run(
    root_uri: str, run_id: str | None = None, options: StorageOptions | None = None
) -> dict[str, Any] | None:
    """One committed run's manifest: the given id (its manifest alone is read), else the latest."""
    if run_id is None:
        runs = committed_runs(root_uri, options)
        return runs[-1] if runs else None
    fs, root = filesystem(root_uri, options)
    try:
        return dict(json.loads(fs.cat_file(f"{root.rstrip('/')}/{MANIFESTS}/{run_id}.json")))
    except FileNotFoundError:
        return None


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


@dataclass
class ParquetSink:
    """Collects row tables into part files under a staging prefix, then commits them at once.

    Files are named `{run_id}-part-{n:05d}.parquet` in `run_date=YYYY-MM-DD/`; a rerun of the same
    run id replaces that run's files. The manifest `_manifests/{run_id}.json` is written last.
    """

    root_uri: str
    run_id: str
    run_date: dt.date
    schema: pa.Schema
    rows_per_file: int = 250_000
    storage_options: StorageOptions = field(default_factory=dict)
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0
    _staged: list[tuple[str, int]] = field(default_factory=list)
    _written: Tally = field(default_factory=Tally)  # the rows' unit tokens
    _frames: Tally = field(default_factory=Tally)  # what the rows' frames add to the expected
    _ids_digest: MultisetDigest = field(default_factory=MultisetDigest)
    _masks_expected: int = 0
    rows: int = 0
    ok: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.fs, root = filesystem(self.root_uri, self.storage_options)
        self.root = root.rstrip("/")
        self.staging = f"{self.root}/_staging/{self.run_id}"
        self.partition = f"{self.root}/{PARTITION_COLUMN}={self.run_date.isoformat()}"
        with writing_to(self.root_uri):
            self._remove_staging()

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)
        self.rows += table.num_rows
        self.ok += pc.sum(pc.equal(table["status"], STATUS_OK)).as_py() or 0
        self.skipped += pc.sum(pc.equal(table["status"], STATUS_SKIPPED)).as_py() or 0
        self._count_units(table)
        if "mask_uri" in table.column_names:
            self._masks_expected += table.num_rows - table["mask_uri"].null_count
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_file:
            with writing_to(self.root_uri):
                self._flush(self.rows_per_file)

    def commit(
        self,
        listed: Listed | ExpectedUnits | None = None,
        details: dict[str, Any] | None = None,
    ) -> CommitResult:
        """Check exactly-once against the `listed` units (a list, or ExpectedUnits that tally
        them where they are) and the staged footers, then replace this run's files in the
        partition and write the manifest (with `details`) and `_SUCCESS`. CommitRefused, with
        nothing visible to readers, when a check fails."""
        with writing_to(self.root_uri):
            return self._commit(listed, details)

    @property
    def errors(self) -> int:
        return self.rows - self.ok - self.skipped

    def _commit(
        self, listed: Listed | ExpectedUnits | None, details: dict[str, Any] | None
    ) -> CommitResult:
        while self._pending_rows:
            self._flush(self.rows_per_file)
        masks = self._staged_masks()
        self._check(listed, masks)
        manifest = f"{self.root}/{MANIFESTS}/{self.run_id}.json"
        files = self._publish(manifest, details or {}, masks)
        return CommitResult(
            partition_uri=canonical_uri(self.fs, self.partition),
            manifest_uri=canonical_uri(self.fs, manifest),
            files=files,
            rows=self.rows,
            ok=self.ok,
            errors=self.errors,
            skipped=self.skipped,
        )

    def _check(self, listed: Listed | ExpectedUnits | None, masks: list[str]) -> None:
        """Exactly once against the listing, and every staged footer readable."""
        self._check_staged_footers()
        if listed is not None:
            self._check_tally(expected_from(listed))
        if self._masks_expected != len(masks):
            raise CommitRefused(
                f"refusing to commit: {self._masks_expected} rows name a mask, "
                f"{len(masks)} masks were staged"
            )

    def _publish(self, manifest: str, details: dict[str, Any], masks: list[str]) -> list[str]:
        """Replace this run's files in the partition, then write the manifest and _SUCCESS.
        Where a write fails before the manifest, the files already moved are taken back out
        (best effort), so that plain Parquet readers of the partition do not see them."""
        if self.fs.exists(manifest):
            self.fs.rm(manifest)  # the old run stops being visible before its files go
        self._remove_previous_files()
        make_folder(self.fs, self.partition)
        moved: list[str] = []
        try:
            for staged, _ in self._staged:
                moved.append(f"{self.partition}/{staged.rpartition('/')[2]}")
                self.fs.mv(staged, moved[-1])
            files = [canonical_uri(self.fs, path) for path in moved]
            moved += self._publish_masks(masks)
            self._remove_staging()
            make_folder(self.fs, f"{self.root}/{MANIFESTS}")
            content = self._manifest(files) | details
            self.fs.pipe_file(manifest, json.dumps(content, indent=2).encode())
        except Exception:
            self._withdraw(moved)
            raise
        self._mark_success()
        return files

    def _publish_masks(self, staged: list[str]) -> list[str]:
        """Segmentation masks, staged by the workers, into _masks/run_date=.../{run_id}/."""
        final = final_masks_folder(self.root, self.run_id, self.run_date)
        if staged:
            make_folder(self.fs, final)
        moved = []
        for path in staged:
            moved.append(f"{final}/{path.rpartition('/')[2]}")
            self.fs.mv(path, moved[-1])
        return moved

    def _staged_masks(self) -> list[str]:
        """The masks the workers staged (only a table with masks lists the store for them)."""
        if "mask_uri" not in self.schema.names:
            return []
        staged = staged_masks_folder(self.root, self.run_id)
        return sorted(self.fs.find(staged)) if self.fs.exists(staged) else []

    def _withdraw(self, paths: list[str]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                self.fs.rm(path)

    def _mark_success(self) -> None:
        """Hadoop's marker, for tools that look for it; the manifest is the commit itself."""
        try:
            self.fs.pipe_file(f"{self.partition}/{SUCCESS_MARKER}", b"")
        except OSError as err:
            log.warning(
                "run %s committed, but %s could not be written: %s",
                self.run_id,
                SUCCESS_MARKER,
                err,
            )

    def _count_units(self, table: pa.Table) -> None:
        written, frames = row_tallies(table)
        self._written, self._frames = self._written.merge(written), self._frames.merge(frames)
        self._ids_digest.update(table["item_id"].to_pylist())

    def _check_tally(self, listed: ExpectedUnits) -> None:
        """Equal tallies: each expected unit once. Else re-scan the differing buckets (the
        listing's and the staged files') to name what is missing, unexpected or twice."""
        differing = listed.tally().merge(self._frames).differing(self._written)
        if not differing:
            return
        scanned = set(differing[:MAX_RESCAN_BUCKETS])
        written = self._staged_units(scanned)
        try:
            check_units(listed.in_buckets(scanned), written)
        except CommitRefused as err:
            if len(scanned) < len(differing):
                raise CommitRefused(
                    f"{err} (in {len(scanned)} of the {len(differing)} buckets that differ)"
                ) from None
            raise
        raise CommitRefused(
            f"refusing to commit: the unit tallies differ in {len(differing)} bucket(s), "
            "yet their units re-read show no difference"
        )

    def _staged_units(self, buckets: Collection[int]) -> list[tuple[str, str, int | None]]:
        """(item id, source, frame count) of the staged rows whose source is in `buckets`."""
        found = []
        for path, _ in self._staged:
            with self.fs.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=["item_id", "source_uri", "frame_count"])
            columns = [table[name].to_pylist() for name in table.column_names]
            found += [row for row in zip(*columns, strict=True) if bucket_of(row[1]) in buckets]
        return found

    def _flush(self, limit: int) -> None:
        table = pa.concat_tables(self._pending)
        head, rest = table.slice(0, limit), table.slice(limit)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        path = f"{self.staging}/{self.run_id}-part-{len(self._staged):05d}.parquet"
        make_folder(self.fs, self.staging)
        with self.fs.open(path, "wb") as handle:
            pq.write_table(head, handle, compression="zstd")
        self._staged.append((path, head.num_rows))

    def _check_staged_footers(self) -> None:
        for path, rows in self._staged:
            with self.fs.open(path, "rb") as handle:
                found = pq.read_metadata(handle).num_rows
            if found != rows:
                raise CommitRefused(f"staged file {path}: footer says {found} rows, wrote {rows}")

    def _remove_staging(self) -> None:
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        parent = self.staging.rpartition("/")[0]
        if self.fs.exists(parent) and not self.fs.ls(parent):
            self.fs.rmdir(parent)

    def _remove_previous_files(self) -> None:
        pattern = f"{self.partition}/{self.run_id}-part-*.parquet"
        for old in self.fs.glob(pattern):
            self.fs.rm(old)
        masks = final_masks_folder(self.root, self.run_id, self.run_date)
        if self.fs.exists(masks):
            self.fs.rm(masks, recursive=True)

    def _manifest(self, files: list[str]) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "run_date": self.run_date.isoformat(),
            "schema_version": SCHEMA_VERSION,
            "task": _task_of(self.schema),
            "rows": self.rows,
            "ok": self.ok,
            "errors": self.errors,
            "skipped": self.skipped,
            "units_digest": self._ids_digest.hexdigest(),
            "units_digest_method": UNITS_DIGEST_METHOD,
            "files": [
                {"uri": uri, "rows": rows}
                for uri, (_, rows) in zip(files, self._staged, strict=True)
            ],
            "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }


def _task_of(schema: pa.Schema) -> str:
    if "detections" in schema.names:
        return "detection"
    return "segmentation" if "class_fractions" in schema.names else "classification"


def read_committed_file(
    uri: str, options: StorageOptions | None = None, columns: list[str] | None = None
) -> pa.Table:
    """One file a manifest lists, read through its filesystem."""
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def verify_run(
    root_uri: str, run_id: str | None = None, options: StorageOptions | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Re-check a committed run (the given id, else the latest): its files exist with readable
    footers and the manifest's row counts, no unit twice, the units its manifest recorded.
    Returns the manifest and the problems found (none: the run holds)."""
    manifest = committed_run(root_uri, run_id, options)
    if manifest is None:
        return {}, [f"{root_uri}: no committed run {run_id or ''}".rstrip()]
    problems, item_ids = [], []
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
