"""Output formats: one record per format (its sink, its lock, its readers) in one registry.

Every reader of a table (query, report, verify, evaluate, backfill, --incremental) asks this
module, never the format's own module: `committed_runs`, `committed_run`, `read_run`,
`verify_run` and `sql_source` take the spec's `output` (or a Parquet table root as a string).
A run's manifest is a dict of the same shape in every format (run_id, run_date, task, rows,
ok, errors, skipped, units_digest, the run's digests and statistics; `files` where listed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import pyarrow as pa

from vision_ops import iceberg, runindex, sink
from vision_ops.config import JobSpec, OutputSpec
from vision_ops.errors import EXIT_BAD_SPEC, VisionOpsError
from vision_ops.lock import RunLock
from vision_ops.logs import log
from vision_ops.masks import MASK_FOLDER_PATTERN, mask_folder_replacement
from vision_ops.registry import Registry
from vision_ops.resume import UnitsOf, resume_key
from vision_ops.runindex import ROW_COLUMNS, index_problems
from vision_ops.schema import named_or_latest
from vision_ops.storage import StorageOptions
from vision_ops.tally import ExpectedUnits, Listed
from vision_ops.tasks import task_of_run

Manifest = dict[str, Any]
T = TypeVar("T")
Target = str | OutputSpec  # a Parquet table root, or a spec's output of any format


class Sink(Protocol):
    """Takes a run's rows as they come, then commits them at once."""

    attempt: str
    resumed: int  # units an earlier attempt of the run id made durable, reused
    # Set where opening the sink finished a commit that an earlier attempt of the run id (the
    # same resume key) took past its commit point before it was killed: the run is committed.
    finished_earlier: sink.CommitResult | None

    def write(self, table: pa.Table) -> None: ...

    def resume(self, units_of: UnitsOf) -> frozenset[str]: ...

    def staged(self, columns: list[str] | None = None) -> pa.Table: ...

    def commit(
        self,
        listed: Listed | ExpectedUnits | None = None,
        details: dict[str, Any] | None = None,
        held: Callable[[], None] | None = None,
    ) -> sink.CommitResult: ...


class RunGuard(Protocol):
    """What a run holds while it works (the table's lock, where the format needs one)."""

    def require_held(self) -> None: ...

    def confirm_held(self) -> None: ...


class Unlocked:
    """No lock: the format's commit settles concurrent runs itself (Iceberg)."""

    def require_held(self) -> None:
        return None

    def confirm_held(self) -> None:
        return None


class AsOfUnsupported(VisionOpsError, ValueError):
    """A point in time asked of a format that keeps no history."""

    exit_code = EXIT_BAD_SPEC


@dataclass(frozen=True)
class SqlSource:
    """The DuckDB relation of a table's committed rows ("" where there are none), and the
    manifest of the run it reads by (the given run id, else the latest; None where no such run
    is committed), from the one reading of the table's commits."""

    relation: str
    run: Manifest | None


@dataclass(frozen=True)
class OutputFormat:
    """How a format commits runs and how its committed runs are read."""

    open_sink: Callable[[JobSpec, str, dt.date, pa.Schema, Mapping[str, str]], Sink]
    needs_lock: bool  # one run at a time per table, through RunLock in the table root
    # Under the lock, before a run reads the table: commits other runs left half done settled.
    settle_other_runs: Callable[[OutputSpec, str, StorageOptions], None]
    committed_runs: Callable[[OutputSpec, StorageOptions], list[Manifest]]
    # committed_runs, and the run dates holding rows that no committed run names (Iceberg: a
    # run whose snapshot was expired; Parquet: none, a manifest is the commit), of one reading.
    runs_and_expired_dates: Callable[[OutputSpec, StorageOptions], tuple[list[Manifest], set[str]]]
    # A token that changes whenever a run commits, cheaper to get than the runs' manifests.
    commits_version: Callable[[OutputSpec, StorageOptions], str | None]
    committed_run: Callable[[OutputSpec, str | None, StorageOptions], Manifest | None]
    # One run's manifest, files left out where listing them costs (what check_run_date needs).
    run_manifest: Callable[[OutputSpec, str, StorageOptions], Manifest | None]
    read_run: Callable[[OutputSpec, Manifest, StorageOptions, list[str] | None], pa.Table]
    # A run's index (vision_ops.runindex), by the URI its manifest names.
    read_index: Callable[[OutputSpec, str, StorageOptions], pa.Table]
    verify_run: Callable[[OutputSpec, str | None, StorageOptions], tuple[Manifest, list[str]]]
    # The DuckDB relation of the committed rows: all runs, one run, or the table at a time.
    sql_source: Callable[
        [Any, OutputSpec, StorageOptions, str | None, dt.datetime | None], SqlSource
    ]


FORMATS: Registry[OutputFormat] = Registry("output format")


# --- parquet -------------------------------------------------------------------------------


def _parquet_sink(
    spec: JobSpec, run_id: str, run_date: dt.date, schema: pa.Schema, identity: Mapping[str, str]
) -> Sink:
    output = spec.output
    parquet = sink.ParquetSink(
        output.uri,
        run_id,
        run_date,
        schema,
        output.rows_per_file,
        spec.storage_options,
        durable_every_rows=spec.runtime.durable_every_rows,
        durable_every_s=spec.runtime.durable_every_s,
        resume_key=resume_key(run_id, run_date.isoformat(), identity),
    )
    return cast(Sink, parquet)


def sql_string(value: str) -> str:
    """`value` as a SQL string literal (DuckDB's: quotes doubled), whatever it holds: a path
    with an apostrophe, or a hostile manifest's."""
    return "'" + value.replace("'", "''") + "'"


def _parquet_read(
    output: OutputSpec, run: Manifest, options: StorageOptions, columns: list[str] | None
) -> pa.Table:
    tables = [sink.read_committed_file(f["uri"], options, columns) for f in run["files"]]
    return sink.masks_in_table(pa.concat_tables(tables), run) if tables else pa.table({})


def _parquet_sql(
    connection: Any,
    output: OutputSpec,
    options: StorageOptions,
    run_id: str | None,
    as_of: dt.datetime | None,
) -> SqlSource:
    if as_of is not None:
        raise AsOfUnsupported(
            "--as-of reads a table as it was: expected output.format: iceberg (Parquet tables "
            "keep each run's latest commit only), found parquet"
        )
    committed = sink.committed_runs(output.uri, options)
    runs = [run for run in committed if run["files"] and run_id in (None, run["run_id"])]
    return SqlSource(_parquet_relation(runs), named_or_latest(committed, run_id))


def _parquet_relation(runs: list[Manifest]) -> str:
    if not runs:
        return ""
    masked = [run for run in runs if run.get("masks_folder")]
    if not masked:
        return _read_parquet([f["uri"] for run in runs for f in run["files"]])
    # A segmentation run's rows name their masks in the folder its manifest names (the
    # table's own, in a copied table: as `sink.masks_in_table` reads them).
    plain = [f["uri"] for run in runs if not run.get("masks_folder") for f in run["files"]]
    selects = [f"SELECT * FROM {_read_parquet(plain)}"] if plain else []
    for run in masked:
        folder = sql_string(mask_folder_replacement(run["masks_folder"]))
        mask_uri = f"regexp_replace(mask_uri, {sql_string(MASK_FOLDER_PATTERN)}, {folder})"
        source = _read_parquet([f["uri"] for f in run["files"]])
        selects.append(f"SELECT * REPLACE ({mask_uri} AS mask_uri) FROM {source}")
    return f"({' UNION ALL BY NAME '.join(selects)})"


def _read_parquet(uris: list[str]) -> str:
    """DuckDB's relation of these Parquet files, read by name: runs of one table may differ in
    columns (output_schema, DICOM, tiles ...)."""
    listed = ", ".join(sql_string(uri) for uri in uris)
    return f"read_parquet([{listed}], hive_partitioning = true, union_by_name = true)"


FORMATS.register("parquet")(
    OutputFormat(
        open_sink=_parquet_sink,
        needs_lock=True,
        settle_other_runs=lambda output, run_id, options: sink.settle_other_runs(
            output.uri, run_id, options
        ),
        committed_runs=lambda output, options: sink.committed_runs(output.uri, options),
        runs_and_expired_dates=lambda output, options: (
            sink.committed_runs(output.uri, options),
            set(),
        ),
        commits_version=lambda output, options: sink.commits_version(output.uri, options),
        committed_run=lambda output, run_id, options: sink.committed_run(
            output.uri, run_id, options
        ),
        run_manifest=lambda output, run_id, options: sink.committed_run(
            output.uri, run_id, options
        ),
        read_run=_parquet_read,
        read_index=lambda output, uri, options: runindex.read_index(uri, options),
        verify_run=lambda output, run_id, options: sink.verify_run(output.uri, run_id, options),
        sql_source=_parquet_sql,
    )
)


# --- iceberg -------------------------------------------------------------------------------


def _iceberg_sink(
    spec: JobSpec, run_id: str, run_date: dt.date, schema: pa.Schema, identity: Mapping[str, str]
) -> Sink:
    table = iceberg.IcebergSink(
        spec.output,
        run_id,
        run_date,
        schema,
        spec.storage_options,
        durable_every_rows=spec.runtime.durable_every_rows,
        durable_every_s=spec.runtime.durable_every_s,
        resume_key=resume_key(run_id, run_date.isoformat(), identity),
    )
    return cast(Sink, table)


def _iceberg_sql(
    connection: Any,
    output: OutputSpec,
    options: StorageOptions,
    run_id: str | None,
    as_of: dt.datetime | None,
) -> SqlSource:
    location, runs = iceberg.located_runs(output)
    relation = _iceberg_relation(connection, output, location, runs, run_id, as_of)
    return SqlSource(relation, named_or_latest(runs, run_id))


def _iceberg_relation(
    connection: Any,
    output: OutputSpec,
    location: str | None,
    runs: list[Manifest],
    run_id: str | None,
    as_of: dt.datetime | None,
) -> str:
    from vision_ops.query import load_iceberg

    if location is None or not runs:
        return ""
    load_iceberg(connection)
    if run_id is not None:
        if as_of is not None:  # the run's rows as the table held them then
            run = iceberg.run_as_of(output, run_id, as_of)
            if run is None:
                raise LookupError(
                    f"{describe(output)}: run {run_id} was not committed at {as_of.isoformat()}"
                )
        else:
            run = next((r for r in runs if r["run_id"] == run_id), None)
        if run is None:
            return ""
        scan = f"iceberg_scan({sql_string(location)}, snapshot_from_id = {run['snapshot_id']:d})"
        return f"(SELECT * FROM {scan} WHERE run_id = {sql_string(run_id)})"
    if as_of is not None:
        snapshot = iceberg.snapshot_at(output, as_of)
        return f"iceberg_scan({sql_string(location)}, snapshot_from_id = {snapshot:d})"
    return f"iceberg_scan({sql_string(location)})"


FORMATS.register("iceberg")(
    OutputFormat(
        open_sink=_iceberg_sink,
        needs_lock=False,
        settle_other_runs=lambda output, run_id, options: None,  # a commit is one snapshot
        committed_runs=lambda output, options: iceberg.committed_runs(output),
        runs_and_expired_dates=lambda output, options: iceberg.runs_and_expired_dates(output),
        commits_version=lambda output, options: iceberg.metadata_location(output),
        committed_run=lambda output, run_id, options: iceberg.committed_run(output, run_id),
        run_manifest=lambda output, run_id, options: iceberg.run_manifest(output, run_id),
        read_run=lambda output, run, options, columns: iceberg.read_run(output, run, columns),
        read_index=lambda output, uri, options: iceberg.read_run_index(output, uri),
        verify_run=lambda output, run_id, options: iceberg.verify_run(output, run_id),
        sql_source=_iceberg_sql,
    )
)


# --- what the pipeline and the readers call --------------------------------------------------


def as_output(target: Target) -> OutputSpec:
    """A spec's output as it is; a string as the root of a Parquet table."""
    return target if isinstance(target, OutputSpec) else OutputSpec(uri=target)


def format_of(target: Target) -> OutputFormat:
    return FORMATS.get(as_output(target).format)


def open_sink(
    spec: JobSpec, run_id: str, run_date: dt.date, schema: pa.Schema, identity: Mapping[str, str]
) -> Sink:
    """The sink of the spec's output format for one run; `identity` (the digests of the spec,
    the model and the input snapshot) decides what an earlier attempt left that it may reuse."""
    return format_of(spec.output).open_sink(spec, run_id, run_date, schema, identity)


def check_run_date(spec: JobSpec, run_id: str, run_date: dt.date) -> None:
    """RunDateConflict, before any work, where the run id is committed on another date."""
    manifest = format_of(spec.output).run_manifest
    committed = manifest(spec.output, run_id, spec.storage_options)
    sink.check_run_date(committed, run_date, describe(spec.output))


@contextlib.contextmanager
def run_guard(spec: JobSpec, run_id: str) -> Iterator[RunGuard]:
    """The table's run lock where the format needs one, else nothing to hold; held, with the
    commits other runs left half done settled first, so that what the run reads of the table
    (an incremental run's committed inputs) is what readers will see."""
    output_format = format_of(spec.output)
    if not output_format.needs_lock:
        yield Unlocked()
        return
    with RunLock(spec.output.uri, run_id, spec.run.lock_lease_s, spec.storage_options) as lock:
        output_format.settle_other_runs(spec.output, run_id, spec.storage_options)
        yield lock


def runs_and_expired_dates(
    target: Target, options: StorageOptions | None = None
) -> tuple[list[Manifest], set[str]]:
    """A table's committed runs (`committed_runs`) and the run dates (ISO) holding rows that
    no committed run names (OutputFormat's field), of one reading of the table: what a
    backfill skips."""
    return format_of(target).runs_and_expired_dates(as_output(target), options or {})


def committed_runs(target: Target, options: StorageOptions | None = None) -> list[Manifest]:
    """The manifests of a table's committed runs, oldest run date first."""
    return format_of(target).committed_runs(as_output(target), options or {})


def committed_run(
    target: Target, run_id: str | None = None, options: StorageOptions | None = None
) -> Manifest | None:
    """One committed run's manifest, with its files: the given id, else the latest."""
    return format_of(target).committed_run(as_output(target), run_id, options or {})


def committed_run_or_raise(
    target: Target,
    run_id: str | None,
    options: StorageOptions | None,
    error: type[Exception],
) -> Manifest:
    """`committed_run`, or `error` (the reader's own, which its command catches) saying there is
    none (`no_committed_run`)."""
    manifest = committed_run(target, run_id, options)
    if manifest is None:
        raise error(no_committed_run(target, run_id))
    return manifest


def read_run(
    target: Target,
    run: Manifest,
    options: StorageOptions | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """A committed run's rows (the given columns, else all) as Arrow; a run that wrote nothing
    (no files to take columns from) as its task's empty table."""
    table = format_of(target).read_run(as_output(target), run, options or {}, columns)
    if table.num_rows == 0:
        empty = task_of_run(run).schema.empty_table()
        table = empty.select(columns) if columns is not None else empty
    return table


READS = 3  # a read of committed rows is made this many times at most (`read_committed`)

# What DuckDB says of a file named in a relation that is not there (local, S3's 404).
_GONE_IN_DUCKDB = ("No files found", "No such file", "HTTP 404", "Not Found")


def read_committed(
    read: Callable[[], T], target: Target, options: StorageOptions | None = None
) -> T:
    """`read()` of the table `target`, made again (READS in all at most) where a file it named
    is gone and the table's commits changed meanwhile: a rerun of a run it read committed and
    removed the files its commit replaced (a reader of the files has no snapshot). Made again,
    it reads the manifests afresh: the rerun's rows. A file gone with no commit since (deleted
    by hand, a path the SQL names) fails at once."""
    for _ in range(READS - 1):
        commits = _commits_now(target, options)
        try:
            return read()
        except Exception as err:
            if not _a_file_gone(err) or commits is None or _commits_now(target, options) == commits:
                raise
            log.warning(
                "%s: a commit replaced a file while it was read; reading again", describe(target)
            )
    return read()


def _commits_now(target: Target, options: StorageOptions | None) -> str | None:
    """The version of the table's commits (a listing of its manifests, Iceberg's metadata
    file); None where it cannot be read (then `read()` says why, and is not made again)."""
    try:
        return format_of(target).commits_version(as_output(target), options or {})
    except Exception:  # the store's errors are not one type (no credentials: `read` names it)
        return None


def _a_file_gone(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError):
        return True
    named = type(err).__name__ == "IOException" or "HTTP" in type(err).__name__
    return named and any(words in str(err) for words in _GONE_IN_DUCKDB)


def read_index(target: Target, uri: str, options: StorageOptions | None = None) -> pa.Table:
    """A committed run's index (its manifest's `index_uri`; FileNotFoundError where gone)."""
    return format_of(target).read_index(as_output(target), uri, options or {})


def verify_run(
    target: Target, run_id: str | None = None, options: StorageOptions | None = None
) -> tuple[Manifest, list[str]]:
    """Re-check a committed run; the manifest and the problems found (none: it holds). Where
    it holds and its manifest names an index (vision_ops.runindex), the index is checked
    against the run's rows too."""
    output, options = as_output(target), options or {}
    manifest, problems = format_of(output).verify_run(output, run_id, options)
    if not problems and manifest.get("index_uri"):
        problems += _index_problems(output, manifest, options)
    return manifest, problems


def _index_problems(output: OutputSpec, manifest: Manifest, options: StorageOptions) -> list[str]:
    """Where a run's index is unreadable or disagrees with its rows."""
    uri = manifest["index_uri"]
    try:
        index = read_index(output, uri, options)
    except (OSError, pa.ArrowException) as err:
        return [f"{uri}: the run's index is unreadable ({err})"]
    return index_problems(index, read_run(output, manifest, options, ROW_COLUMNS))


def sql_source(
    connection: Any,
    target: Target,
    options: StorageOptions | None = None,
    run_id: str | None = None,
    as_of: dt.datetime | None = None,
) -> SqlSource:
    """The DuckDB relation of the committed rows, and the run it reads by."""
    output = as_output(target)
    return format_of(output).sql_source(connection, output, options or {}, run_id, as_of)


def retried_of(manifest: Mapping[str, Any]) -> Mapping[str, int]:
    """What an incremental run's manifest records it retried (`retried`: sources, units,
    error_rows; vision_ops.pipeline.incremental.retried_rows); nothing for a full run, or one
    committed before runs recorded it."""
    return manifest.get("retried") or {}


def no_committed_run(target: Target, run_id: str | None = None) -> str:
    """A reader's message for a table with no committed run (of this id): where the table was
    named by a folder, what a table's folder holds, and how an Iceberg table is read (its
    folders beside it, `_index/` and `_metrics/`, read as no table at all)."""
    said = f"{describe(target)}: no committed run{f' {run_id}' if run_id else ''}"
    if isinstance(target, str) and run_id is None:
        said += " (a table's folder holds _manifests/; an Iceberg table is read through its spec)"
    return said


def describe(target: Target) -> str:
    """The table in words, for messages."""
    output = as_output(target)
    return output.uri if output.format == "parquet" else f"iceberg table {output.table}"
