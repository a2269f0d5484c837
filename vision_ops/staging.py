"""An attempt's staged part files: its rows made durable as they come, in either output format.

A commit attempt stages its rows as Parquet part files in `{root}/_staging/{run_id}/{attempt}/`
(`part-NNNNN.parquet`), at least every `durable_every_rows` rows or `durable_every_s` seconds,
each carrying the run's resume key where there is one. The Parquet sink moves them into the
partition at its commit; the Iceberg sink writes them into the table's data files. What an
attempt killed before its commit staged is what a rerun of the run id resumes from
(vision_ops.resume).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from vision_ops.masks import MASKS, adopt_masks, earlier_masks
from vision_ops.resume import (
    Resumable,
    UnitsOf,
    find_resumable,
    part_file,
    resumed_rows,
    with_resume_key,
)
from vision_ops.runindex import ROW_COLUMNS, index_of, merged
from vision_ops.storage import ParquetFile, make_folder, read_parquet
from vision_ops.tally import bucket_of
from vision_ops.written import CommitRefused, UnitRows

log = logging.getLogger(__name__)


@dataclass
class StagedParts:
    """The part files one attempt stages under `folder`, and the rows not yet in one."""

    fs: AbstractFileSystem
    folder: str  # the attempt's staging folder
    rows_per_file: int
    durable_every_rows: int = 100_000
    durable_every_s: float = 120.0
    resume_key: str | None = None  # in every part's metadata: what a rerun may reuse
    files: list[tuple[str, int]] = field(default_factory=list)  # (path, rows), in order
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    _parts: int = 0  # part files staged so far, compacted ones included
    _durable_at: float = field(default_factory=time.monotonic)

    @property
    def run_folder(self) -> str:
        """The folder of every attempt of the run."""
        return self.folder.rpartition("/")[0]

    def add(self, table: pa.Table) -> None:
        """Rows in: staged once a file's worth is pending, or once durability is due."""
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)
        if self._durability_due():
            self._flush(self.pending_rows)

    def resume(
        self,
        schema: pa.Schema,
        units_of: UnitsOf,
        write: Callable[[pa.Table], None],
        final_masks: str | None = None,
    ) -> Resumable | None:
        """Reuse what earlier attempts of the run made durable (see vision_ops.resume): the
        rows of the sources they hold whole go through `write` (the sink's: counted, staged
        again for this attempt), then the earlier attempts' staging is removed. Where rows
        name masks (`final_masks`: this attempt's committed masks folder), the masks of the
        reused rows move into this attempt's staging and the rows name them there. Nothing is
        reused without a resume key."""
        found = None
        masks = None
        if self.resume_key is not None:
            if final_masks is not None:
                masks = earlier_masks(self.fs, self.run_folder, self.folder)
            found = find_resumable(
                self.fs, self.run_folder, self.folder, schema, self.resume_key, units_of, masks
            )
        for table in resumed_rows(self.fs, found) if found else ():
            if masks is not None and final_masks is not None:
                staged = f"{self.folder}/{MASKS}"
                table = adopt_masks(self.fs, table, masks, staged, final_masks)
            write(table)
        self.flush()
        self.remove_earlier()
        if found and found.units:
            log.info("%s: resuming %d units of earlier attempts", self.run_folder, found.units)
        return found

    def flush(self) -> None:
        """Every pending row into part files."""
        while self.pending_rows:
            self._flush(self.rows_per_file)

    def compact(self, rows: int) -> None:
        """The small part files made for durability rewritten as `rows_per_file` files, so
        that readers do not pay for many small files (nothing to do where they are already)."""
        self.flush()
        if len(self.files) <= max(1, -(-rows // self.rows_per_file)):
            return
        small, self.files = self.files, []
        for path, _ in small:
            self.pending.append(self.read(path))
            self.pending_rows += self.pending[-1].num_rows
            while self.pending_rows >= self.rows_per_file:
                self._flush(self.rows_per_file)
        self.flush()
        for path, _ in small:
            self.fs.rm_file(path)

    def tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The staged rows (the given columns, else all), file by file."""
        for path, _ in self.files:
            yield self.read(path, columns)

    def staged(self, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """Every row added so far (the staged files' and those pending; the given columns,
        else all), as one table."""
        if columns is not None:
            schema = pa.schema([schema.field(name) for name in columns])
        pending = [table.select(schema.names) for table in self.pending]
        tables = [table.cast(schema) for table in [*self.tables(columns), *pending]]
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as handle:
            return read_parquet(handle, columns)

    def index(self) -> pa.Table:
        """The run index (vision_ops.runindex) of the staged rows, one file's columns at a time."""
        return merged([index_of(self.read(path, ROW_COLUMNS)) for path, _ in self.files])

    def require_own(self, run_id: str) -> None:
        """CommitRefused where this attempt's staged files are gone: another attempt of the run
        id, started while this one ran, resumed from them and removed them (it commits them)."""
        if not self.files:
            return
        first = self.files[0][0]  # the other attempt removed the folder whole, this file too
        if not self.fs.exists(first):
            raise CommitRefused(
                f"refusing to commit run {run_id}: its staged rows are gone from {self.folder}; "
                "another attempt of the same run id resumed from them (and commits them), so "
                "this attempt commits nothing"
            )

    def check_footers(self, rows_written: int) -> None:
        """CommitRefused where a staged file's footer does not hold the rows written to it, or
        the staged files together do not hold the `rows_written` the run counted (a file
        missing from the staging would leave its rows out of the commit)."""
        staged = 0
        for path, rows in self.files:
            with self.fs.open(path, "rb") as handle, ParquetFile(handle) as parquet:
                found = parquet.num_rows
            if found != rows:
                raise CommitRefused(f"staged file {path}: footer says {found} rows, wrote {rows}")
            staged += found
        if staged != rows_written:
            raise CommitRefused(
                f"refusing to commit: the staged files hold {staged} rows, the run wrote "
                f"{rows_written}"
            )

    def units(self, buckets: Collection[int]) -> UnitRows:
        """(item id, source, frame count) of the staged rows whose source is in `buckets`."""
        found = []
        for path, _ in self.files:
            table = self.read(path, ["item_id", "source_uri", "frame_count"])
            columns = [table[name].to_pylist() for name in table.column_names]
            found += [row for row in zip(*columns, strict=True) if bucket_of(row[1]) in buckets]
        return found

    def remove_earlier(self) -> None:
        """What earlier attempts of the run staged and never committed."""
        if not self.fs.exists(self.run_folder):
            return
        for folder in self.fs.ls(self.run_folder, detail=False):
            if folder.rstrip("/") != self.folder:
                self.fs.rm(folder, recursive=True)

    def _durability_due(self) -> bool:
        if not self.pending_rows:
            return False
        overdue = time.monotonic() - self._durable_at >= self.durable_every_s
        return overdue or self.pending_rows >= self.durable_every_rows

    def _flush(self, limit: int) -> None:
        table = pa.concat_tables(self.pending)
        head, rest = table.slice(0, limit), table.slice(limit)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows
        path = f"{self.folder}/{part_file(self._parts)}"
        self._parts += 1
        if self.resume_key is not None:
            head = with_resume_key(head, self.resume_key)
        make_folder(self.fs, self.folder)
        with self.fs.open(path, "wb") as handle:
            pq.write_table(head, handle, compression="zstd")
        self.files.append((path, head.num_rows))
        self._durable_at = time.monotonic()


def remove_attempt(fs: AbstractFileSystem, folder: str) -> None:
    """A committed attempt's staging folder (best effort: the table is right without it)."""
    with contextlib.suppress(OSError):
        fs.rm(folder, recursive=True)
