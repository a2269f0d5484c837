"""A run's inputs: as a Ray dataset (the planned parts listed into the object store, each URI
once, and summed in one pass: count, tally, snapshot digest, without the driver holding rows),
or, for a short run in this one process (`runtime.runner`), held here as one Arrow table."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.csv as pacsv
import ray
from ray.data.datasource import FileBasedDatasource

from vision_ops.config import InputSpec
from vision_ops.errors import in_one_line
from vision_ops.sources import (
    LISTING_BLOCK_ROWS,
    LISTING_SCHEMA,
    InputPlan,
    ManifestRead,
    SourceError,
    nothing_found,
)
from vision_ops.storage import StorageOptions, arrow_filesystem
from vision_ops.tally import (
    ListingSummary,
    RepeatFinder,
    Tally,
    rows_in_buckets,
    rows_outside,
    rows_with_hashes,
    rows_without,
    summarise_block,
)

log = logging.getLogger(__name__)
EMPTY_CSV = "Empty CSV file"  # Arrow's error for a CSV file of no bytes
MAX_REPEATED_URIS = 100_000  # URIs named more than once that a run sets right (else refuses)


class SummedInputs:
    """What a listing's summary tells of it: its count, and as the commit's ExpectedUnits its
    tally (one unit per source)."""

    summary: ListingSummary

    @property
    def count(self) -> int:
        return self.summary.count

    def tally(self) -> Tally:
        return self.summary.tally


@dataclass(frozen=True)
class Listing(SummedInputs):
    """A run's inputs as a dataset materialized in Ray's object store (each URI once; the
    driver holds block references, not rows) and the summary of one pass over it. As the
    commit's ExpectedUnits: one unit per source."""

    dataset: ray.data.Dataset
    summary: ListingSummary

    def in_buckets(self, buckets: Collection[int]) -> list[str]:
        select = functools.partial(rows_in_buckets, buckets=frozenset(buckets))
        found = self.dataset.map_batches(select, **BLOCKWISE)
        return [uri for table in _tables(found) for uri in table["source_uri"].to_pylist()]

    def table(self) -> pa.Table:
        """The whole listing here, sorted by URI (for work that keeps it on the driver)."""
        refs = self.dataset.to_arrow_refs()
        return pa.concat_tables([LISTING_SCHEMA.empty_table(), *ray.get(refs)]).sort_by(
            "source_uri"
        )

    def without(self, select: Callable[[pa.Table], pa.Table]) -> Listing:
        """The listing of the rows `select` keeps of each block (in Ray tasks), summed again."""
        kept = self.dataset.map_batches(select, **BLOCKWISE).materialize()
        return Listing(kept, summarise(kept, find_repeats=False))


@dataclass(frozen=True)
class HeldListing(SummedInputs):
    """A short run's inputs held in this process as one Arrow table (the listing schema, each
    URI once) and its summary: what a Listing is to a run, without Ray (`runtime.runner`)."""

    rows: pa.Table
    summary: ListingSummary

    @classmethod
    def of(cls, rows: pa.Table) -> HeldListing:
        summary = ListingSummary()
        summary.add(summarise_block(rows))
        return cls(rows, summary)

    def in_buckets(self, buckets: Collection[int]) -> list[str]:
        found = rows_in_buckets(self.rows, buckets=frozenset(buckets))
        return [str(uri) for uri in found["source_uri"].to_pylist()]

    def without(self, select: Callable[[pa.Table], pa.Table]) -> HeldListing:
        """The listing of the rows `select` keeps, summed again."""
        return HeldListing.of(select(self.rows))


# A run's inputs, listed: into Ray's object store, or held here.
AnyListing: TypeAlias = Listing | HeldListing


# Listing rows a map task takes at once, as Arrow tables.
BLOCKWISE: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": LISTING_BLOCK_ROWS}


def list_listing(
    spec: InputSpec, inputs: InputPlan, options: StorageOptions, table: str | None = None
) -> Listing:
    """The planned inputs into the object store: the driver's table, s3:// listings a page
    at a time (blocks put as they come), a manifest read by Ray Data where it lies; a URI
    that more than one of them names (or a manifest twice) is kept once, the first part's.
    Nothing `uris` list under the folder `table` (`sources.table_apart`): a table inside an
    input folder would otherwise list its own part files and masks as inputs."""
    parts = _listing_parts(inputs, options, table)
    dataset = _union(parts)
    summary = summarise(dataset, find_repeats=inputs.parts > 1 or inputs.manifest is not None)
    repeated = summary.repeats.repeated() if summary.repeats is not None else set()
    if repeated:
        dataset = _keep_first(parts, repeated)
        summary = summarise(dataset, find_repeats=False)
    if summary.count == 0:
        raise nothing_found(spec)
    return Listing(dataset, summary)


def held_listing(
    spec: InputSpec,
    inputs: InputPlan,
    table: str | None = None,
    most: int | None = None,
) -> HeldListing | None:
    """The planned inputs listed here, as `list_listing` lists them into Ray (a URI that more
    than one part names kept once, the first part's: each part names it once already;
    nothing under the folder `table`), or
    None once more than `most` distinct inputs are listed (the run is not short: Ray lists them
    again). Not a manifest's: Ray Data reads one (`InputPlan.manifest` is refused before
    this)."""
    if inputs.manifest is not None:
        raise ValueError("a manifest is listed by Ray Data (list_listing)")
    outside = _outside(table)
    blocks: list[pa.Table] = [LISTING_SCHEMA.empty_table()]
    seen: set[str] = set()
    named = 0
    parts = [iter([inputs.table])] + [listing.blocks() for listing in inputs.listings]
    for part in parts:
        for block in map(outside, part):
            named += block.num_rows
            blocks.append(_first_named(block, seen))
            if most is not None and len(seen) > most:
                return None
    rows = pa.concat_tables(blocks)
    if rows.num_rows == 0:
        raise nothing_found(spec)
    if rows.num_rows < named:
        log.info("inputs named more than once are kept once (%d rows)", named - rows.num_rows)
    return HeldListing.of(rows)


def _first_named(block: pa.Table, seen: set[str]) -> pa.Table:
    """The block's rows whose URI no row before them named (`seen`, which gains the block's)."""
    first: list[int] = []
    for row, uri in enumerate(block["source_uri"].to_pylist()):
        if uri not in seen:
            seen.add(uri)
            first.append(row)
    return block if len(first) == block.num_rows else block.take(pa.array(first, pa.int64()))


def summarise(dataset: ray.data.Dataset, find_repeats: bool) -> ListingSummary:
    """One pass over the listing (in Ray tasks), added up here in fixed memory: the count,
    the expected units' tally, the input snapshot digest and (where asked) repeated URIs."""
    summary = ListingSummary(repeats=RepeatFinder() if find_repeats else None)
    for table in _tables(dataset.map_batches(summarise_block, **BLOCKWISE)):
        summary.add(table)
    return summary


def _listing_parts(
    inputs: InputPlan, options: StorageOptions, table: str | None
) -> list[ray.data.Dataset]:
    parts: list[ray.data.Dataset] = []
    outside = _outside(table)
    if inputs.table.num_rows:
        parts.append(ray.data.from_arrow(outside(inputs.table)))
    for listing in inputs.listings:
        refs = [ray.put(outside(block)) for block in listing.blocks()]
        if refs:
            parts.append(ray.data.from_arrow_refs(refs))  # type: ignore[arg-type]
    if inputs.manifest is not None:
        parts.append(_manifest_dataset(inputs.manifest, options))
    return parts


def _outside(table: str | None) -> Callable[[pa.Table], pa.Table]:
    """A listing block less its rows under the folder `table` (None: the block as it is)."""
    if table is None:
        return lambda block: block
    return functools.partial(rows_outside, folder=table)


def _manifest_dataset(manifest: ManifestRead, options: StorageOptions) -> ray.data.Dataset:
    """The manifest (or the data files of the S3 Inventory report it names) read by Ray Data's
    reader for its format, as listing rows, materialized (an unreadable entry fails here,
    before any work)."""
    fs, _ = arrow_filesystem(manifest.data_uris[0], options)
    path = [arrow_filesystem(uri, options)[1] for uri in manifest.data_uris]
    where: dict[str, Any] = {"filesystem": fs, "file_extensions": None}
    if manifest.format == "parquet":
        rows = ray.data.read_parquet(path, partitioning=None, **where)
        rows = rows.select_columns(list(manifest.columns))
    elif manifest.format == "csv":
        rows = ray.data.read_datasource(CsvRows(path, manifest.csv_arguments(), **where))
    else:
        rows = ray.data.read_text(path, **where)
    rows = rows.map_batches(manifest.normalise, **BLOCKWISE)
    rows.context.raise_original_map_exception = True  # a bad entry's SourceError, as raised
    try:
        return rows.materialize()
    except Exception as err:
        raise _source_error(manifest.uri, err) from None


class CsvRows(FileBasedDatasource):
    """CSV files read in Arrow batches, each column as `arguments` name and type it, where a
    file with no bytes (a report's data file listing no objects) is no rows: Ray Data's CSV
    reader refuses one ("Empty CSV file"), failing the listing."""

    def __init__(self, paths: list[str], arguments: dict[str, Any], **kwargs: Any) -> None:
        no_hive: Any = None  # Ray's default would read key=value folders as columns
        super().__init__(paths, partitioning=no_hive, **kwargs)
        self.arguments = arguments

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        """The file's batches; Arrow's error where it cannot parse one, naming the file."""
        try:
            for batch in _csv_batches(f, self.arguments):
                yield pa.Table.from_batches([batch])
        except pa.ArrowInvalid as err:
            raise pa.ArrowInvalid(f"{path}: {err}") from None


def _csv_batches(f: pa.NativeFile, arguments: dict[str, Any]) -> Iterator[pa.RecordBatch]:
    """The CSV file's record batches; none where the file has no bytes."""
    try:
        reader = pacsv.open_csv(f, **arguments)
    except pa.ArrowInvalid as err:
        if str(err) == EMPTY_CSV:
            return
        raise
    yield from reader


def _source_error(uri: str, err: BaseException) -> SourceError:
    """The SourceError a Ray task raised (Ray's error carries it as `cause`), else one naming
    the manifest and the error at the root of Ray's (whose own text holds the task's
    traceback), in its first line."""
    found: BaseException | None = err
    root = err
    while found is not None:
        root = found
        original = getattr(found, "cause", None)
        if isinstance(original, SourceError):  # one line; Ray appends its retry advice
            return SourceError(str(original).splitlines()[0])
        found = original or found.__cause__
    return SourceError(f"manifest {uri}: cannot read: {in_one_line(root)}")


def _union(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    if not parts:
        return ray.data.from_arrow(LISTING_SCHEMA.empty_table())
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:]).materialize()


def _keep_first(parts: list[ray.data.Dataset], repeated: set[int]) -> ray.data.Dataset:
    """The listing with each repeated URI once: the row of the first part naming it. Too many
    repeats are refused before any is gathered here (one per distinct hash: per URI)."""
    if len(repeated) > MAX_REPEATED_URIS:
        raise SourceError(
            f"{len(repeated)} inputs are named more than once (by a manifest twice, or by more "
            f"than one of uris and manifest); expected at most {MAX_REPEATED_URIS}: "
            "deduplicate the manifest"
        )
    first: dict[str, dict[str, Any]] = {}
    for part in parts:
        select = functools.partial(rows_with_hashes, hashes=repeated)
        found = part.map_batches(select, **BLOCKWISE)
        for table in _tables(found):
            for row in table.to_pylist():
                first.setdefault(row["source_uri"], row)
    log.info("%d inputs named more than once are kept once", len(first))
    uris = frozenset(first)
    drop = functools.partial(rows_without, uris=uris)
    kept = [part.map_batches(drop, **BLOCKWISE) for part in parts]
    once = pa.Table.from_pylist([first[uri] for uri in sorted(first)], schema=LISTING_SCHEMA)
    return _union([*kept, ray.data.from_arrow(once)]).materialize()


def _tables(dataset: ray.data.Dataset) -> Any:
    return dataset.iter_batches(batch_format="pyarrow", batch_size=None)
