"""A run's index: one row per source it read, which the next `--incremental` run reads instead
of the run's rows.

Each committed run names its index in its manifest (`index_uri`): a small Parquet file at
`{table}/_index/{run_id}-{attempt}.parquet`, written from the staged rows before the commit
point (a crash in between leaves a file no manifest names, never read). One row per source
(every frame of a DICOM instance, every tile of a scene: one row), two columns:

- `source_key`: the input and its version (`source_keys`: its URI, then its ETag, else its
  size and modification time);
- `error_types`: the distinct `error_type`s of the source's error rows (empty: none; an error
  row without a type counts as ''). The types, not a retry flag, so that `run.skip_errors` is
  the reading run's: an incremental run processes a source again where one of its types is
  not in its `skip_errors` (`retry_flags`).

A run committed before indexes existed has no `index_uri`; its index is built from its rows
(`index_of`), with the same result.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from vision_ops.schema import STATUS_ERROR
from vision_ops.storage import StorageOptions, filesystem, make_folder, read_parquet

INDEX_FOLDER = "_index"  # under the table's root, in either output format
KEY_SEPARATOR = "\x00"  # between an input's URI and its version in a source key
IDENTITY_COLUMNS = ["source_uri", "source_etag", "source_size", "source_mtime"]
ROW_COLUMNS = [*IDENTITY_COLUMNS, "status", "error_type"]  # the rows' columns an index needs
INDEX_SCHEMA = pa.schema(
    [
        pa.field("source_key", pa.string(), nullable=False),
        pa.field("error_types", pa.list_(pa.string()), nullable=False),
    ]
)


def index_path(root: str, run_id: str, attempt: str) -> str:
    """Where a commit attempt's index goes, within the table's store."""
    return f"{root}/{INDEX_FOLDER}/{run_id}-{attempt}.parquet"


def index_of(rows: pa.Table) -> pa.Table:
    """The index of a run's rows (ROW_COLUMNS at least), computed column-wise: one row per
    source key with the distinct error types of its error rows."""
    if rows.num_rows == 0:  # a run that wrote nothing (its files may hold no columns either)
        return INDEX_SCHEMA.empty_table()
    error = pc.fill_null(pc.equal(rows["status"], STATUS_ERROR), False)
    kind = pc.if_else(error, pc.fill_null(rows["error_type"], ""), pa.scalar(None, pa.string()))
    return _grouped(source_keys(rows), kind)


def merged(indexes: Sequence[pa.Table]) -> pa.Table:
    """One index of several (of one run's part files: a source in more than one gets its
    error types together)."""
    if not indexes:
        return INDEX_SCHEMA.empty_table()
    if len(indexes) == 1:
        return indexes[0]
    both = pa.concat_tables(indexes)
    keys = both["source_key"].combine_chunks()
    types = both["error_types"].combine_chunks()
    owners = pc.take(keys, pc.list_parent_indices(types))
    nothing = pa.nulls(len(keys), pa.string())
    return _grouped(
        pa.concat_arrays([keys, owners]), pa.concat_arrays([nothing, pc.list_flatten(types)])
    )


def _grouped(keys: pa.Array, kinds: pa.Array) -> pa.Table:
    """Each key once, with the distinct non-null `kinds` beside it."""
    pairs = pa.table({"source_key": keys, "error_type": kinds})
    only_valid = pc.CountOptions(mode="only_valid")
    grouped = pairs.group_by("source_key").aggregate([("error_type", "distinct", only_valid)])
    columns = [grouped["source_key"], grouped["error_type_distinct"]]
    return pa.Table.from_arrays(columns, schema=INDEX_SCHEMA)


def retry_flags(index: pa.Table, skip_errors: Collection[str]) -> pa.Array:
    """For each row of an index: whether the source is to be processed again, that is one of
    its error types is not in `skip_errors`."""
    types = index["error_types"].combine_chunks()
    skipped = pa.array(sorted(skip_errors), pa.string())
    retried = pc.invert(pc.is_in(pc.list_flatten(types), value_set=skipped))
    owners = pc.filter(pc.list_parent_indices(types), retried).to_numpy()
    flags = np.zeros(index.num_rows, dtype=bool)
    flags[owners] = True
    return pa.array(flags)


def write_index(fs: AbstractFileSystem, path: str, index: pa.Table) -> None:
    """An index as its Parquet file (in one write)."""
    make_folder(fs, path.rpartition("/")[0])
    with fs.open(path, "wb") as handle:
        pq.write_table(index.cast(INDEX_SCHEMA), handle, compression="zstd")


def read_index(uri: str, options: StorageOptions | None = None) -> pa.Table:
    """The index a manifest names (FileNotFoundError where it is gone)."""
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as handle:
        return read_parquet(handle).cast(INDEX_SCHEMA)


def index_problems(index: pa.Table, rows: pa.Table) -> list[str]:
    """Where a run's index does not say what its rows (ROW_COLUMNS) do: none when it does."""
    expected = _as_dict(index_of(rows))
    found = _as_dict(index)
    if found == expected:
        return []
    missing = len(expected.keys() - found.keys())
    extra = len(found.keys() - expected.keys())
    differ = sum(found[key] != expected[key] for key in found.keys() & expected.keys())
    return [
        f"the run's index disagrees with its rows: {missing} source(s) missing, {extra} not in "
        f"the rows, {differ} with other error types"
    ]


def _as_dict(index: pa.Table) -> dict[str, frozenset[str]]:
    keys = index["source_key"].to_pylist()
    return dict(zip(keys, map(frozenset, index["error_types"].to_pylist()), strict=True))


def source_keys(table: pa.Table) -> pa.Array:
    """Each row's input as one string: its URI, then its version (its ETag, else its size and
    modification time in microseconds since the epoch), computed column-wise."""
    etag = table["source_etag"]
    has_etag = pc.fill_null(pc.not_equal(etag, ""), False)
    mtime = pc.cast(pc.cast(table["source_mtime"], pa.timestamp("us", tz="UTC")), pa.int64())
    stamped = pc.binary_join_element_wise(
        "size:",
        pc.fill_null(pc.cast(table["source_size"], pa.string()), "None"),
        "|mtime:",
        pc.fill_null(pc.cast(mtime, pa.string()), "None"),
        "",
    )
    version = pc.if_else(has_etag, pc.binary_join_element_wise("etag:", etag, ""), stamped)
    keys = pc.binary_join_element_wise(table["source_uri"], version, KEY_SEPARATOR)
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def source_key(uri: str, version: str) -> str:
    """One input's source key, as `source_keys` writes it."""
    return f"{uri}{KEY_SEPARATOR}{version}"
