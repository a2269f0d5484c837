"""Iceberg output: the prediction table in a catalog, one snapshot per run, and its readers.

A run stages its rows as they come (vision_ops.staging: durable part files beside the table,
which a rerun of a run that did not commit resumes from), writes them into the table's data
files at its commit, and commits those in one OVERWRITE snapshot that also drops the earlier
rows of the same run id: the table moves from the old run to the new one in one catalog
commit, or not at all.
Concurrent commits are retried by PyIceberg against the table's new head; the retry checks,
with the run id as its conflict filter, that no other attempt of the same run id committed
meanwhile (then this one fails, saying so). Snapshot summaries carry the run's identity.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from vision_ops.config import OutputSpec, SpecError
from vision_ops.errors import EXIT_BAD_SPEC, InterruptedDuringCommit, VisionOpsError
from vision_ops.georef import GEO_KEY
from vision_ops.masks import (
    final_masks_folder,
    run_staging_folder,
    staged_masks_folder,
    staging_folder,
)
from vision_ops.resume import PART_FILES, UnitsOf
from vision_ops.runindex import INDEX_SCHEMA, index_path, write_index
from vision_ops.schema import (
    PARTITION_COLUMN,
    SCHEMA_VERSION,
    named_or_latest,
    run_order,
    task_of,
)
from vision_ops.sink import CommitResult, check_run_date, units_sum_digest
from vision_ops.staging import StagedParts, remove_attempt
from vision_ops.storage import (
    StorageError,
    StorageOptions,
    canonical_uri,
    filesystem,
    make_folder,
    read_parquet,
    writing_to,
)
from vision_ops.tally import ExpectedUnits, Listed, expected_from
from vision_ops.written import CommitRefused, WrittenRows

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table

log = logging.getLogger(__name__)
SUMMARY_PREFIX = "vision_ops."  # snapshot summary properties a run's commit adds
RUN_ID = f"{SUMMARY_PREFIX}run_id"
DETAILS = f"{SUMMARY_PREFIX}details"  # the rest of the run's manifest, as JSON
# Table properties set at creation: exact run_id bounds in the file metrics (so a file of one
# run is told apart from another's without reading it), and patient commit retries.
TABLE_PROPERTIES = {
    "write.metadata.metrics.column.run_id": "full",
    "commit.retry.num-retries": "10",
}
SUMMARY_FIELDS = ("run_id", "run_date", "task", "rows", "ok", "errors", "skipped")


class CatalogError(StorageError):
    """The catalog or its table cannot be used: says which and why; nothing was committed."""


class CatalogNotInstalled(VisionOpsError, RuntimeError):
    """The catalog's type needs a package this machine lacks (PyIceberg's SQL catalog needs
    SQLAlchemy): found as the table is opened, before any row is staged, so refused as a spec
    this machine cannot run is."""

    exit_code = EXIT_BAD_SPEC


class RunCommittedMeanwhile(CommitRefused):
    """Another attempt of the same run id committed while this one ran."""


NEEDS_PYICEBERG = "output.format: iceberg needs PyIceberg: pip install 'vision-ops[iceberg]'"


class PyIcebergMissing(SpecError, ImportError):
    """An Iceberg table asked of a machine without PyIceberg: nothing was begun."""


def require_pyiceberg() -> None:
    """PyIcebergMissing where this machine lacks PyIceberg (`run`, `validate`: before any
    work; a machine that only submits the job need not have it)."""
    try:
        import pyiceberg.catalog  # noqa: F401
    except ImportError:
        raise PyIcebergMissing(NEEDS_PYICEBERG) from None


def load_catalog(output: OutputSpec) -> Catalog:
    """The spec's catalog (PyIceberg properties; credentials from the standard chains)."""
    require_pyiceberg()
    from pyiceberg.catalog import load_catalog as pyiceberg_catalog
    from pyiceberg.exceptions import NotInstalledError

    try:
        return pyiceberg_catalog("vision_ops", **output.catalog)
    except NotInstalledError as err:  # e.g. type sql without SQLAlchemy: nothing was begun
        raise CatalogNotInstalled(f"cannot open catalog {_where(output)}: {err}") from None
    except Exception as err:  # PyIceberg raises ValueError, requests' and the catalog's errors
        raise CatalogError(f"cannot open catalog {_where(output)}: {err}") from err


def table_schema(schema: pa.Schema) -> pa.Schema:
    """The run's row schema with `run_date` as a column (the Hive partition key of Parquet)."""
    run_date = pa.field(PARTITION_COLUMN, pa.date32(), nullable=False)
    return pa.schema([run_date, *schema], metadata=schema.metadata)


def open_table(output: OutputSpec, schema: pa.Schema) -> Table:
    """The spec's table, created (with its namespace) partitioned by run_date when missing;
    CatalogError when it exists with other columns."""
    from pyiceberg.exceptions import NamespaceAlreadyExistsError

    catalog = load_catalog(output)
    namespace = output_table(output).rpartition(".")[0]
    try:
        with contextlib.suppress(NamespaceAlreadyExistsError):
            catalog.create_namespace_if_not_exists(namespace)
        iceberg, spec = _iceberg_schema(table_schema(schema))
        table = catalog.create_table_if_not_exists(
            output_table(output), schema=iceberg, partition_spec=spec, properties=TABLE_PROPERTIES
        )
    except Exception as err:
        raise CatalogError(f"cannot open table {_where(output)}: {err}") from err
    _check_columns(output, table, table_schema(schema))
    return table


def load_table(output: OutputSpec) -> Table | None:
    """The spec's table for reading; None where it does not exist yet."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    catalog = load_catalog(output)
    try:
        return catalog.load_table(output_table(output))
    except (NoSuchTableError, NoSuchNamespaceError):
        return None
    except Exception as err:
        raise CatalogError(f"cannot read table {_where(output)}: {err}") from err


def output_table(output: OutputSpec) -> str:
    if output.table is None:
        raise ValueError("output.format: iceberg expects output.table")
    return output.table


def _where(output: OutputSpec) -> str:
    return f"{output.table} in catalog {output.catalog.get('uri', output.catalog.get('type'))}"


def _iceberg_schema(schema: pa.Schema) -> tuple[Any, Any]:
    """The Iceberg schema (fresh field ids) and its identity partition on run_date."""
    from pyiceberg.catalog import Catalog
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.schema import assign_fresh_schema_ids
    from pyiceberg.transforms import IdentityTransform

    iceberg = assign_fresh_schema_ids(Catalog._convert_schema_if_needed(schema))
    source = iceberg.find_field(PARTITION_COLUMN).field_id
    partition = PartitionField(source, 1000, IdentityTransform(), PARTITION_COLUMN)
    return iceberg, PartitionSpec(partition)


def _check_columns(output: OutputSpec, table: Table, schema: pa.Schema) -> None:
    """CatalogError where the table cannot take this job's rows: other columns, or other
    fields or types within them (a detection table made without masks or keypoints)."""
    from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible

    found = [f.name for f in table.schema().fields]
    if found != schema.names:
        raise CatalogError(
            f"table {output.table} has columns {found}; this job writes {schema.names} "
            "(another task or input kind): expected a table of this job's schema"
        )
    try:
        _check_pyarrow_schema_compatible(
            table.schema(), schema, format_version=table.format_version
        )
    except ValueError as err:
        differences = str(err).partition(". Update the schema")[0]
        raise CatalogError(
            f"table {output.table} cannot take this job's rows: {differences} (another model "
            "output, such as masks or keypoints): expected a table of this job's schema; "
            "write to a new table"
        ) from None


@dataclass
class IcebergSink:
    """Stages a run's rows as they come (durably, for a rerun to resume from), then writes
    them as data files of the table and commits those in one snapshot that replaces the run
    id's earlier rows (the same interface as ParquetSink)."""

    output: OutputSpec
    run_id: str
    run_date: dt.date
    schema: pa.Schema
    storage_options: StorageOptions = field(default_factory=dict)
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Staged rows are made durable at least this often (rows or seconds, whichever first),
    # and a rerun of the run id resumes from them where `resume_key` is set (see `resume`).
    durable_every_rows: int = 100_000
    durable_every_s: float = 120.0
    resume_key: str | None = None
    _files: list[DataFile] = field(default_factory=list)
    written: WrittenRows = field(default_factory=WrittenRows)
    resumed: int = 0  # units an earlier attempt made durable, reused
    # The run, where an earlier attempt of this run id and resume key was killed past its
    # snapshot (the commit point) before it tidied up: opening the sink tidies up for it, and
    # nothing is left to process.
    finished_earlier: CommitResult | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.table = open_table(self.output, self.schema)
        current = self.table.current_snapshot()
        self._base = current.snapshot_id if current else None  # the table as this run began
        self._check_run_date()
        self._write_uuid = uuid.uuid4()
        self._counter = itertools.count(0)
        self.fs, root = filesystem(self.output.files_uri, self.storage_options)
        self.root = root.rstrip("/")
        self.parts = StagedParts(
            self.fs,
            staging_folder(self.root, self.run_id, self.attempt),
            self.output.rows_per_file,
            self.durable_every_rows,
            self.durable_every_s,
            self.resume_key,
        )
        if self.resume_key is None:
            with writing_to(self.output.uri):
                self.parts.remove_earlier()
        else:
            self.finished_earlier = self._finish_killed_commit()
        self._warn_of_the_earlier_layout()

    def _finish_killed_commit(self) -> CommitResult | None:
        """The run, where its latest snapshot is an attempt of this resume key (the same run,
        spec, model and inputs) killed after that snapshot, before its tidying up (its staged
        part files are still there): that tidying is done now, and the attempt's commit is
        this run, with nothing processed again. A run committed whole (its staged part files
        removed) is replaced by its rerun, as ever."""
        committed = self._committed
        if committed is None or committed.get("resume_key") != self.resume_key:
            return None
        attempt = committed["attempt"]
        staging = staging_folder(self.root, self.run_id, attempt)
        with writing_to(self.output.uri):
            if not self.fs.glob(f"{staging}/{PART_FILES}"):  # (a store may keep the folder)
                return None
        replaced = _replaced_commit(self.table, self.run_id)
        self._tidy_up(replaced, committed.get("index_uri"), staging)
        log.warning(
            "run %s: attempt %s committed snapshot %s and had not finished tidying up (it was "
            "stopped, or is finishing now: both remove the same files, at most once); tidied up "
            "now",
            self.run_id,
            attempt,
            committed["snapshot_id"],
        )
        files = [data.file_path for data in _run_data_files(self.table, committed)]
        return self._result(committed["snapshot_id"], files, committed, resumed=committed["rows"])

    def _tidy_up(self, replaced: dict[str, Any] | None, index: str | None, staging: str) -> None:
        """After a snapshot: the masks and the index of the commit of the run id it `replaced`
        (its snapshot's summary; `index`, the snapshot's own), then its staging (best effort:
        the table is right without). Only what that summary names: a later commit's, beside
        them, is never touched."""
        if replaced is not None:
            self._remove_masks_of(replaced)
            _remove_index(replaced.get("index_uri"), index, self.storage_options)
        with writing_to(self.output.uri):
            remove_attempt(self.fs, staging)

    def _result(
        self, snapshot: int, files: list[str], counts: dict[str, Any], resumed: int
    ) -> CommitResult:
        """This run as committed in `snapshot`: its data `files`, with the row `counts` a
        snapshot summary records."""
        partition = (
            f"iceberg table {self.output.table} ({PARTITION_COLUMN}="
            f"{self.run_date.isoformat()}, snapshot {snapshot})"
        )
        return CommitResult.of((partition, self.table.metadata_location), files, counts, resumed)

    def _warn_of_the_earlier_layout(self) -> None:
        """Attempts of this run id staged in `uri` itself, before each table had a folder of
        its own there (OutputSpec.files_uri), are neither resumed from nor removed (another
        table's may lie beside them): say so, once, as the run starts."""
        _, uri_root = filesystem(self.output.uri, self.storage_options)
        folder = run_staging_folder(uri_root.rstrip("/"), self.run_id)
        with contextlib.suppress(OSError), writing_to(self.output.uri):
            if self.fs.exists(folder):
                log.warning(
                    "%s holds attempts of run %s staged by an earlier version (before each "
                    "table kept its files in %s): this run does not resume from them; remove "
                    "the folder once no run of that version is going on",
                    folder,
                    self.run_id,
                    self.output.files_uri,
                )

    def _check_run_date(self) -> None:
        """RunDateConflict where the run id is committed on another date (as for Parquet: a
        run id names one run on one date; its rerun must not move it)."""
        self._committed = _runs_in(self.table).get(self.run_id)
        check_run_date(self._committed, self.run_date, f"table {self.output.table}")

    def resume(self, units_of: UnitsOf) -> frozenset[str]:
        """Reuse what earlier attempts of this run id made durable (StagedParts.resume): the
        rows of the sources they hold whole (with their masks, where the table has masks)
        are staged again for this attempt; returns those sources, for the run to leave out.
        Nothing is reused without a `resume_key`."""
        final = final_masks_folder(self.root, self.run_id, self.run_date, self.attempt)
        masks = final if "mask_uri" in self.schema.names else None
        with writing_to(self.output.uri):
            found = self.parts.resume(self.schema, units_of, self.write, masks)
        self.resumed = found.units if found else 0
        return found.sources if found else frozenset()

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)  # none of another run id (an empty block holds none)
        if table.num_rows and not pc.all(pc.equal(table["run_id"], self.run_id)).as_py():
            raise CommitRefused(f"refusing to commit: rows of another run id in run {self.run_id}")
        self.written.add(table)
        with writing_to(self.output.uri):
            self.parts.add(table)

    def staged(self, columns: list[str] | None = None) -> pa.Table:
        """The rows written so far (what a commit now would add to the table): the given
        columns, else all."""
        with writing_to(self.output.uri):
            return self.parts.staged(self.schema, columns)

    def commit(
        self,
        listed: Listed | ExpectedUnits | None = None,
        details: dict[str, Any] | None = None,
        held: Callable[[], None] | None = None,
    ) -> CommitResult:
        """Check exactly-once against the `listed` units and the staged files, write them as
        the table's data files, then commit one snapshot: this run's files in, the run id's
        earlier files out. CommitRefused (or CatalogError), with the table at its previous
        snapshot, when anything fails (the staged files stay for a rerun to resume); `held` is
        asked last before the snapshot's commit (no lock of ours guards an Iceberg table)."""
        with writing_to(self.output.uri):
            self.parts.require_own(self.run_id)
            self.parts.flush()
        masks = self._staged_masks()
        published: list[str] = []  # masks copied into place, for an undo to remove
        index = None
        try:
            self._check(listed, masks)
            self._reload()
            self._write_data_files()
            self._publish_masks(masks, published)
            index = self._write_index()
            if held is not None:
                held()
        except Exception:
            self._undo(published, index)
            raise
        try:
            uri = canonical_uri(self.fs, index)
            snapshot = self._commit_snapshot((details or {}) | {"index_uri": uri})
        except _NotCommitted as failed:
            if failed.sure:  # else the files may be the table's now: leave them
                self._undo(published, index)
            raise failed.error from None
        self._tidy_up(self._committed, uri, self.parts.folder)  # the run id's commit before
        files = [f.file_path for f in self._files]
        return self._result(snapshot, files, self.written.counts(), resumed=self.resumed)

    # --- writing ---------------------------------------------------------------------------

    def _write_data_files(self) -> None:
        """The staged rows as the table's data files, `rows_per_file` rows each."""
        from pyiceberg.io.pyarrow import _dataframe_to_data_files

        for rows in rechunked(self.parts.tables(), self.output.rows_per_file):
            rows = rows.replace_schema_metadata(self.schema.metadata)
            dated = rows.add_column(0, table_schema(self.schema).field(0), self._dates(len(rows)))
            try:
                self._files += _dataframe_to_data_files(
                    self.table.metadata, dated, self.table.io, self._write_uuid, self._counter
                )
            except OSError as err:
                raise StorageError(f"cannot write table {self.output.table}'s data: {err}") from err
        found = sum(f.record_count for f in self._files)
        if found != self.written.rows:
            raise CommitRefused(
                f"refusing to commit: data files hold {found} rows, wrote {self.written.rows}"
            )

    def _dates(self, rows: int) -> pa.Array:
        return pa.array([self.run_date] * rows, pa.date32())

    # --- checking --------------------------------------------------------------------------

    def _check(self, listed: Listed | ExpectedUnits | None, masks: list[str]) -> None:
        """Exactly once against the listing, every staged footer readable and the staged files
        holding every row written."""
        with writing_to(self.output.uri):
            self.parts.check_footers(self.written.rows)
            expected = None if listed is None else expected_from(listed)
            self.written.check(expected, self.parts.units, len(masks))

    # --- committing ------------------------------------------------------------------------

    def _commit_snapshot(self, details: dict[str, Any]) -> int:
        """One catalog commit: the run's files in, its earlier files out. PyIceberg retries a
        commit that lost a race, checking with the run id as its conflict filter."""
        from pyiceberg.exceptions import CommitFailedException, ValidationException

        properties = self._summary(details)
        try:  # nothing is sent to the catalog yet: a failure here surely did not land
            self._reload()
            self._check_not_committed_meanwhile()
        except _NotCommitted:
            raise
        except Exception as err:
            raise _NotCommitted(err) from None
        try:
            from vision_ops.iceberg_geo import GeoTransaction

            metadata = {k.decode(): v.decode() for k, v in (self.schema.metadata or {}).items()}
            # the table's extent, not this run's alone: set again at each commit attempt
            transaction = GeoTransaction(self.table, metadata.pop(GEO_KEY, None))
            if metadata:
                transaction.set_properties(metadata)
            snapshot = transaction.update_snapshot(snapshot_properties=properties).overwrite()
            with snapshot as producer:
                producer.delete_by_predicate(_run_filter(self.run_id))
                for old, replacements in self._previous_files():
                    producer.delete_data_file(old)
                    for kept in replacements:
                        producer.append_data_file(kept)
                for new in self._files:
                    producer.append_data_file(new)
            try:
                transaction.commit_transaction()
            except KeyboardInterrupt:  # sent to the catalog, or not: nobody can say
                raise InterruptedDuringCommit from None
        except _NotCommitted:
            raise
        except ValidationException as err:
            raise _NotCommitted(self._meanwhile(err)) from None
        except CommitFailedException as err:
            raise _NotCommitted(CatalogError(f"{self._failed()}: {err}")) from None
        except Exception as err:
            if self._landed(properties):  # a lost response: the commit itself went through
                log.warning("run %s: commit reported %r but landed", self.run_id, err)
            else:
                raise _NotCommitted(CatalogError(f"{self._failed()}: {err}"), sure=False) from None
        current = self.table.current_snapshot()
        return current.snapshot_id if current else -1

    def _reload(self) -> None:
        """The table as the catalog holds it now. Where two runs created the table at the same
        instant, the catalog kept one of the two and this run may hold the other (PyIceberg's
        refresh then fails: `Table UUID does not match`); the run's files go to the kept one,
        whose columns it checks again."""
        try:
            self.table = self.table.catalog.load_table(self.table.name())
        except Exception as err:  # the catalog's and requests' errors
            raise CatalogError(f"{self._failed()}: cannot reload the table: {err}") from None
        _check_columns(self.output, self.table, table_schema(self.schema))

    def _check_not_committed_meanwhile(self) -> None:
        """RunCommittedMeanwhile where a snapshot after this run began holds this run id."""
        for snapshot in _history(self.table):
            if snapshot.snapshot_id == self._base:
                return
            if snapshot.summary and snapshot.summary.get(RUN_ID) == self.run_id:
                raise _NotCommitted(self._meanwhile(None))

    def _previous_files(self) -> Iterator[tuple[DataFile, list[DataFile]]]:
        """The files holding the run id's earlier rows, each with what replaces it: nothing
        where the file is that run's alone (as this sink writes them), else its other rows."""
        scan = self.table.scan(row_filter=_run_filter(self.run_id))
        for task in scan.plan_files():
            if self._only_this_run(task.file):
                yield task.file, []
            else:
                yield task.file, self._without_this_run(task)

    def _only_this_run(self, data_file: DataFile) -> bool:
        from pyiceberg.conversions import from_bytes
        from pyiceberg.types import StringType

        field_id = self.table.schema().find_field("run_id").field_id
        lower, upper = data_file.lower_bounds.get(field_id), data_file.upper_bounds.get(field_id)
        bounds = {from_bytes(StringType(), b) for b in (lower, upper) if b is not None}
        return bounds == {self.run_id}

    def _without_this_run(self, task: Any) -> list[DataFile]:
        """A shared file's rows of other runs, rewritten (files of other writers only)."""
        from pyiceberg.expressions import AlwaysTrue
        from pyiceberg.io.pyarrow import ArrowScan, _dataframe_to_data_files

        metadata = self.table.metadata
        rows = ArrowScan(metadata, self.table.io, metadata.schema(), AlwaysTrue()).to_table([task])
        kept = rows.filter(pc.not_equal(rows["run_id"], self.run_id))
        if not kept.num_rows:
            return []
        written = _dataframe_to_data_files(
            metadata, kept, self.table.io, self._write_uuid, self._counter
        )
        return list(written)

    def _summary(self, details: dict[str, Any]) -> dict[str, str]:
        """The snapshot's summary properties: the run's identity, counts and digests."""
        core = {
            "run_id": self.run_id,
            "run_date": self.run_date.isoformat(),
            "attempt": self.attempt,
            **({"resume_key": self.resume_key} if self.resume_key else {}),
            "schema_version": SCHEMA_VERSION,
            "task": task_of(self.schema),
            **self.written.counts(),
            "resumed_units": self.resumed,
            "processed_units": self.written.rows - self.resumed,
        }
        flat = {k: v for k, v in details.items() if isinstance(v, str | int | float)}
        summary = {f"{SUMMARY_PREFIX}{k}": str(v) for k, v in (flat | core).items()}
        rest = {k: v for k, v in details.items() if k not in flat}
        return summary | {DETAILS: json.dumps(rest, separators=(",", ":"))}

    def _landed(self, properties: dict[str, str]) -> bool:
        """After an unclear failure: whether a snapshot of this very attempt is in the table."""
        key = f"{SUMMARY_PREFIX}attempt"
        try:
            self.table.refresh()
        except Exception:
            return False
        return any(
            s.summary and s.summary.get(key) == properties[key] for s in self.table.snapshots()
        )

    def _meanwhile(self, err: Exception | None) -> CommitRefused:
        for snapshot in reversed(self.table.snapshots()):
            summary = snapshot.summary
            if summary and summary.get(RUN_ID) == self.run_id:
                when = dt.datetime.fromtimestamp(snapshot.timestamp_ms / 1000, dt.timezone.utc)
                return RunCommittedMeanwhile(
                    f"refusing to commit run {self.run_id}: another attempt of the same run id "
                    f"committed snapshot {snapshot.snapshot_id} at {when.isoformat()} while this "
                    "one ran; the table keeps that attempt's rows, this attempt's were discarded"
                )
        return CommitRefused(f"{self._failed()}: a concurrent change conflicts: {err}")

    def _failed(self) -> str:
        return f"run {self.run_id} not committed to {self.output.table} (table unchanged)"

    def _undo(self, published: list[str], index: str | None) -> None:
        """Best effort, after a commit that surely did not land: this attempt's data files,
        index and published copies of its masks go (the masks and rows a rerun resumes stay
        in its staging)."""
        for path in [f.file_path for f in self._files]:
            with contextlib.suppress(Exception):
                self.table.io.delete(path)
        with contextlib.suppress(OSError), writing_to(self.output.uri):
            if published:
                self.fs.rm(published)
            if index is not None:
                self.fs.rm(index)

    # --- the run's index ---------------------------------------------------------------------

    def _write_index(self) -> str:
        """The run's index (vision_ops.runindex) of its staged rows, written before the commit
        that names it in the snapshot summary (`index_uri`); its path within the store."""
        path = index_path(self.root, self.run_id, self.attempt)
        with writing_to(self.output.uri):
            write_index(self.fs, path, self.parts.index())
        return path

    # --- masks -----------------------------------------------------------------------------

    def _staged_masks(self) -> list[str]:
        if "mask_uri" not in self.schema.names:
            return []
        staged = staged_masks_folder(self.root, self.run_id, self.attempt)
        with writing_to(self.output.uri):
            return sorted(self.fs.find(staged)) if self.fs.exists(staged) else []

    def _publish_masks(self, staged: list[str], published: list[str]) -> None:
        """Copied into this attempt's own final folder, before the commit that makes rows name
        them; each path in `published` as it lands there. The staged masks stay until the
        snapshot is in (removed with the staging): an attempt stopped at any point before it
        (a SIGKILL, Ctrl-C, a commit that failed) leaves every mask where a rerun resumes
        from. No rows name the copies until then; a later commit removes them."""
        final = final_masks_folder(self.root, self.run_id, self.run_date, self.attempt)
        if not staged:
            return
        with writing_to(self.output.uri):
            make_folder(self.fs, final)
            for path in staged:
                target = f"{final}/{path.rpartition('/')[2]}"
                self.fs.cp_file(path, target)  # one file: no listing of the target first
                published.append(target)

    def _remove_masks_of(self, replaced: dict[str, Any]) -> None:
        """The masks of a replaced commit (best effort): its attempt's folder; a commit from
        before masks had one folder per attempt held them in the run's folder itself, beside
        the attempts' folders: its files alone."""
        if "mask_uri" not in self.schema.names:
            return
        attempt = replaced.get("attempt")
        folder = final_masks_folder(self.root, self.run_id, self.run_date, attempt)
        with contextlib.suppress(OSError):
            if attempt is not None:
                self.fs.rm(folder, recursive=True)
                return
            for info in self.fs.ls(folder, detail=True):
                if info["type"] == "file":
                    self.fs.rm_file(info["name"])


def _remove_index(replaced: str | None, ours: str | None, options: StorageOptions) -> None:
    """After a commit: the index of the run id's commit it `replaced` (best effort)."""
    if replaced and replaced != ours:
        fs, path = filesystem(replaced, options)
        with contextlib.suppress(OSError):
            fs.rm_file(path)


def _replaced_commit(table: Table, run_id: str) -> dict[str, Any] | None:
    """The run id's commit before its latest one (its snapshot's summary), if any."""
    commits = (s for s in _history(table) if s.summary and s.summary.get(RUN_ID) == run_id)
    next(commits, None)
    earlier = next(commits, None)
    return _manifest(earlier) if earlier is not None else None


def rechunked(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The tables' rows again, `rows` at a time (the last chunk what is left)."""
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        pending.append(table)
        count += table.num_rows
        while count >= rows:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, rows)
            rest = joined.slice(rows)
            pending, count = ([rest] if rest.num_rows else []), rest.num_rows
    if count:
        yield pa.concat_tables(pending)


@dataclass
class _NotCommitted(Exception):
    """The commit failed; `sure`: it certainly did not land (this attempt's files can go)."""

    error: Exception
    sure: bool = True


def _run_filter(run_id: str) -> Any:
    """The rows of one run (run ids are letters, digits and `._-`: nothing to escape)."""
    from pyiceberg.expressions.parser import parse

    return parse(f"run_id = '{run_id}'")


def committed_runs(output: OutputSpec) -> list[dict[str, Any]]:
    """Each run's latest commit in the current snapshot's history (its summary as a
    manifest), oldest run date first."""
    return located_runs(output)[1]


def located_runs(output: OutputSpec) -> tuple[str | None, list[dict[str, Any]]]:
    """The table's metadata file and its `committed_runs`, of one loading of the table (None
    and none where it is not there)."""
    table = load_table(output)
    if table is None:
        return None, []
    return table.metadata_location, _runs_in_order(table)


def run_manifest(output: OutputSpec, run_id: str) -> dict[str, Any] | None:
    """One run's latest commit (its summary as a manifest) without its data files: nothing
    planned, only the snapshot summaries read."""
    table = load_table(output)
    return _runs_in(table).get(run_id) if table is not None else None


def _runs_in_order(table: Table) -> list[dict[str, Any]]:
    """`_runs_in`'s manifests, oldest run date first (`committed_runs`' order)."""
    return sorted(_runs_in(table).values(), key=run_order)


def _runs_in(table: Table) -> dict[str, dict[str, Any]]:
    """Each run id's latest commit in the current snapshot's history, as a manifest."""
    found: dict[str, dict[str, Any]] = {}
    for snapshot in _history(table):
        summary = snapshot.summary
        run_id = summary.get(RUN_ID) if summary else None
        if run_id and run_id not in found:
            found[run_id] = _manifest(snapshot)
    return found


def committed_run(output: OutputSpec, run_id: str | None = None) -> dict[str, Any] | None:
    """One committed run's manifest (the given id, else the latest) with its data files."""
    runs = committed_runs(output)
    run = named_or_latest(runs, run_id)
    if run is None:
        return None
    table = load_table(output)
    if table is not None:
        run["files"] = [
            {"uri": data.file_path, "rows": data.record_count}
            for data in _run_data_files(table, run)
        ]
    return run


def read_run(output: OutputSpec, run: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
    """A committed run's rows as its commit left them (its snapshot, its run id)."""
    table = load_table(output)
    if table is None:
        raise CatalogError(f"table {output.table} does not exist")
    fields = tuple(columns) if columns else ("*",)
    return _run_scan(table, run, fields).to_arrow()


def verify_run(output: OutputSpec, run_id: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Re-check a committed run: each data file reads with its recorded row count, no unit
    twice, the units and the row count its snapshot summary recorded."""
    run = committed_run(output, run_id)
    if run is None:
        return {}, [f"{output.table}: no committed run {run_id or ''}".rstrip()]
    table = load_table(output)
    if table is None:
        return run, [f"table {output.table} does not exist"]
    problems: list[str] = []
    item_ids: list[str] = []
    for entry in run["files"]:
        try:
            with table.io.new_input(entry["uri"]).open() as handle:
                rows = read_parquet(handle, ["run_id", "item_id"])
        except (OSError, pa.ArrowException) as err:
            problems.append(f"{entry['uri']}: unreadable ({err})")
            continue
        if rows.num_rows != entry["rows"]:
            problems.append(f"{entry['uri']}: {rows.num_rows} rows, metadata says {entry['rows']}")
        mine = rows.filter(pc.equal(rows["run_id"], run["run_id"]))
        item_ids += mine["item_id"].to_pylist()
    if len(item_ids) != run["rows"]:
        problems.append(f"{len(item_ids)} rows, the run committed {run['rows']}")
    if len(item_ids) != len(set(item_ids)):
        problems.append(f"{len(item_ids) - len(set(item_ids))} unit(s) appear twice")
    if not problems and units_sum_digest(item_ids) != run.get("units_digest"):
        problems.append("the units differ from those the run committed (units_digest)")
    return run, problems


def read_run_index(output: OutputSpec, uri: str) -> pa.Table:
    """A run's index (its snapshot summary's `index_uri`), read through the table's own file
    IO, as its data files are (FileNotFoundError where it is gone)."""
    table = load_table(output)
    if table is None:
        raise FileNotFoundError(f"table {output.table} does not exist")
    with table.io.new_input(uri).open() as handle:
        return read_parquet(handle).cast(INDEX_SCHEMA)


def metadata_location(output: OutputSpec) -> str | None:
    table = load_table(output)
    return table.metadata_location if table is not None else None


def snapshot_at(output: OutputSpec, moment: dt.datetime) -> int:
    """The id of the table's current snapshot at `moment` (LookupError if none was)."""
    table = load_table(output)
    entries = table.history() if table is not None else []
    stamp = moment.timestamp() * 1000
    before = [entry for entry in entries if entry.timestamp_ms <= stamp]
    if not before:
        raise LookupError(f"table {output.table} had no snapshot at {moment.isoformat()}")
    return before[-1].snapshot_id


def run_as_of(output: OutputSpec, run_id: str, moment: dt.datetime) -> dict[str, Any] | None:
    """Run `run_id`'s latest commit in the history of the table's snapshot at `moment` (its
    summary as a manifest); None where the run was not committed by then."""
    from pyiceberg.table.snapshots import ancestors_of

    table = load_table(output)
    if table is None:
        return None
    then = table.snapshot_by_id(snapshot_at(output, moment))
    for snapshot in ancestors_of(then, table.metadata) if then is not None else []:
        if snapshot.summary and snapshot.summary.get(RUN_ID) == run_id:
            return _manifest(snapshot)
    return None


def runs_and_expired_dates(output: OutputSpec) -> tuple[list[dict[str, Any]], set[str]]:
    """`committed_runs`, and the run dates (ISO) the table's current snapshot holds rows of
    that no run in its history names: their runs' snapshots were expired (the rows stay;
    `committed_runs` reads the history); of one loading of the table. The dates from the
    partitions' metadata: no data file is read."""
    table = load_table(output)
    if table is None or table.current_snapshot() is None:
        return [], set()
    runs = _runs_in_order(table)
    partitions = table.inspect.partitions().column("partition").to_pylist()
    held = {str(found[PARTITION_COLUMN]) for found in partitions if found.get(PARTITION_COLUMN)}
    return runs, held - {run["run_date"] for run in runs}


def _history(table: Table) -> Iterable[Any]:
    """The current snapshot and its ancestors, newest first."""
    from pyiceberg.table.snapshots import ancestors_of

    current = table.current_snapshot()
    return ancestors_of(current, table.metadata) if current is not None else []


def _run_data_files(table: Table, run: dict[str, Any]) -> list[DataFile]:
    """The data files holding a committed run's rows in its snapshot."""
    return [task.file for task in _run_scan(table, run).plan_files()]


def _run_scan(table: Table, run: dict[str, Any], fields: tuple[str, ...] = ("*",)) -> Any:
    return table.scan(
        row_filter=_run_filter(run["run_id"]),
        selected_fields=fields,
        snapshot_id=run["snapshot_id"],
    )


def _manifest(snapshot: Any) -> dict[str, Any]:
    """A run's manifest from its snapshot's summary (the shape of a Parquet manifest)."""
    summary = snapshot.summary
    values = {
        key.removeprefix(SUMMARY_PREFIX): value
        for key, value in summary.additional_properties.items()
        if key.startswith(SUMMARY_PREFIX) and key != DETAILS
    }
    for key in ("rows", "ok", "errors", "skipped"):
        values[key] = int(values.get(key, 0))
    details = json.loads(summary.get(DETAILS) or "{}")
    committed = dt.datetime.fromtimestamp(snapshot.timestamp_ms / 1000, dt.timezone.utc)
    return (
        _numbers(values)
        | details
        | {"snapshot_id": snapshot.snapshot_id, "committed_at": committed.isoformat()}
    )


# Summary values kept as text, though some may look like numbers (as digests are).
TEXT_FIELDS = ("run_id", "run_date", "attempt", "resume_key", "schema_version")


def _numbers(values: dict[str, str]) -> dict[str, Any]:
    """Summary values back to numbers where they were numbers (float stats of the run)."""
    converted: dict[str, Any] = {}
    for key, value in values.items():
        if key in TEXT_FIELDS or key.endswith("digest"):
            converted[key] = value
            continue
        try:
            converted[key] = int(value)
        except (TypeError, ValueError):
            try:
                converted[key] = float(value)
            except (TypeError, ValueError):
                converted[key] = value
    return converted
