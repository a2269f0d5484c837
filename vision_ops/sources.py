"""Inputs: list files, globs and manifests into rows of URIs with their version identity."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import functools
import io
import logging
import math
import os
import posixpath
import re
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from fsspec.utils import glob_translate

from vision_ops.config import InputSpec
from vision_ops.errors import EXIT_BAD_SPEC, VisionOpsError, in_one_line
from vision_ops.inventory import (
    InventoryError,
    InventoryReport,
    csv_record,
    inventory_key,
    is_inventory_manifest,
    read_report,
)
from vision_ops.storage import (
    CREDENTIALS_IN_URI,
    ParquetFile,
    StorageOptions,
    canonical_uri,
    credentials_for,
    filesystem,
    folder_uri,
    holds_credentials,
    masked_url,
    protocol_of,
    read_bytes,
    read_parquet,
    unreached,
)
from vision_ops.tally import rows_outside

LISTING_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_etag", pa.string()),
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
    ]
)
GLOB_CHARS = frozenset("*?[")
S3_PAGE_KEYS = 1000  # keys a ListObjectsV2 page holds (the S3 maximum)
LISTING_BLOCK_ROWS = 65_536  # listing rows handed on at once: pages are gathered up to this


log = logging.getLogger(__name__)


class SourceError(VisionOpsError, ValueError):
    """Inputs that cannot be listed: a missing path, an unreadable manifest, nothing found."""

    exit_code = EXIT_BAD_SPEC


def list_inputs(
    spec: InputSpec, options: StorageOptions | None = None, table: str | None = None
) -> pa.Table:
    """Every input the spec names, once, sorted by URI, filtered by extension, in one table
    on this process (`plan_inputs` is what a run uses: it leaves large listings where they are);
    what `uris` list under the folder `table` (`table_apart`) left out, as a run leaves it.
    """
    rows: dict[str, dict[str, Any]] = {}
    for uri in spec.uris:
        listed = pa.Table.from_pylist(list(_list_uri(uri, options)), schema=LISTING_SCHEMA)
        for row in (listed if table is None else rows_outside(listed, table)).to_pylist():
            rows.setdefault(row["source_uri"], row)
    if spec.manifest is not None:
        for row in read_manifest(spec.manifest, options):
            rows.setdefault(row["source_uri"], row)
    kept = [rows[uri] for uri in sorted(rows) if has_extension(uri, spec.extensions)]
    if not kept:
        raise nothing_found(spec)
    return pa.Table.from_pylist(kept, schema=LISTING_SCHEMA)


def table_apart(spec: InputSpec, output_uri: str, options: StorageOptions | None) -> str | None:
    """The output's folder (`folder_uri`), whose files a listing of folders leaves out (the
    table's parts, manifests and masks are never inputs of a later run); None where an input
    the spec names lies in it (a table at the bucket's root: the inputs asked for are kept).
    A manifest names its inputs one by one: they are kept wherever they lie."""
    table = folder_uri(output_uri, options)
    if any(folder_uri(uri, options).startswith(table) for uri in spec.uris):
        return None
    return table


def nothing_found(spec: InputSpec) -> SourceError:
    named = ", ".join([*spec.uris, *([spec.manifest] if spec.manifest else [])])
    wanted = " ".join(spec.extensions) or "any extension"
    return SourceError(f"no input files found in {named} (looked for: {wanted})")


@dataclass(frozen=True)
class InputPlan:
    """What a run reads, checked before any work, without listing large collections here:
    the inputs listed on this process (single files and objects, and globs outside s3://:
    sorted, once each), directories, s3:// prefixes and globs to page through, and a manifest
    to stream."""

    table: pa.Table
    listings: list[PagedListing] = field(default_factory=list)
    manifest: ManifestRead | None = None

    @property
    def parts(self) -> int:
        """How many separately listed parts; with more than one, a URI may repeat."""
        return int(self.table.num_rows > 0) + len(self.listings) + int(self.manifest is not None)


def plan_inputs(spec: InputSpec, options: StorageOptions | None = None) -> InputPlan:
    """The spec's inputs as an InputPlan: SourceError now for a missing path or a manifest that
    cannot be read (its format, columns and first rows are checked)."""
    rows: dict[str, dict[str, Any]] = {}
    listings = []
    for uri in spec.uris:
        with credentials_for(f"input {uri}", SourceError):
            listing = paged_listing(uri, spec.extensions, options)
            found = [] if listing is not None else _list_uri(uri, options)
        if listing is not None:
            listings.append(listing)
        for row in found:
            rows.setdefault(row["source_uri"], row)
    kept = [rows[uri] for uri in sorted(rows) if has_extension(uri, spec.extensions)]
    manifest = None
    if spec.manifest is not None:
        with credentials_for(f"input.manifest {spec.manifest}", SourceError):
            manifest = check_manifest(spec.manifest, spec.extensions, options)
    table = pa.Table.from_pylist(kept, schema=LISTING_SCHEMA)
    if not listings and manifest is None and not kept:
        raise nothing_found(spec)
    return InputPlan(table, listings, manifest)


def has_extension(uri: str, extensions: Iterable[str]) -> bool:
    """Whether the name ends in one of `extensions`; "" matches a name without one, or whose
    last dot is followed by digits only (DICOM files named by their UID: 1.2.840.10008.7)."""
    allowed = tuple(extensions)
    if uri[:8].lower().startswith(("http://", "https://")):  # x.jpg?v=2: the path's own name
        uri = uri.partition("#")[0].partition("?")[0]
    suffix = posixpath.splitext(uri)[1].lower()
    if suffix[1:].isdigit():
        suffix = ""
    return not allowed or suffix in allowed


def _is_glob(fs: Any, path: str) -> bool:
    """Whether `path` is a pattern: it holds * ? or [ and names nothing as written (a file
    named `img[1].jpg` is that file, not the pattern `img1.jpg`)."""
    if not GLOB_CHARS & set(path):
        return False
    try:
        fs.info(path)
    except OSError:  # not found (or not readable as written): a pattern
        return True
    return False


def _list_uri(uri: str, options: StorageOptions | None) -> list[dict[str, Any]]:
    fs, path = filesystem(uri, options)
    if _is_glob(fs, path):
        with _listing_folders_of(uri):
            found = _glob(fs, path)
    else:
        found = _find(fs, path, uri)
    return [_listing_row(canonical_uri(fs, name), info) for name, info in _files(fs, found)]


def _find(fs: Any, path: str, uri: str) -> dict[str, dict[str, Any]]:
    """A file, or everything under a directory. One `info` call tells which: on an object
    store `exists` + `isdir` of a big prefix can cost a second full listing."""
    info = _find_info(fs, path, uri)
    if info.get("type") != "directory":
        return {path: info}
    with _listing_folders_of(uri):
        return {name: info for files in _walk(fs, path) for name, info in files.items()}


def _glob(fs: Any, path: str) -> dict[str, dict[str, Any]]:
    """fsspec's glob (its pattern syntax, through `glob_translate`) over `_walk` from the
    folder before the first wildcard; nothing where that folder is not there."""
    first = min(path.index(char) for char in GLOB_CHARS if char in path)
    root = path[:first].rpartition("/")[0] or "/"
    below = path[len(root) :].lstrip("/")
    depth = None if "**" in below else below.count("/") + 1  # folders the pattern reaches
    pattern = re.compile(glob_translate(path))
    if not fs.exists(root):
        return {}
    return {
        name: info
        for files in _walk(fs, root, depth)
        for name, info in files.items()
        if pattern.match(name)
    }


def _walk(fs: Any, path: str, depth: int | None = None) -> Iterator[dict[str, dict[str, Any]]]:
    """The entries of each folder under `path` (`depth` levels of folders, `path` the first;
    None: all) that are not folders (files, links), by full name, a folder at a time, depth
    first in name order: fsspec's walk, except that a folder that cannot be listed raises
    (fsspec passes `on_error` to the top folder only, so a folder below it that cannot be
    listed would be left out without a word)."""
    own = path.rstrip("/")
    entries = sorted(
        (info for info in fs.ls(path, detail=True) if info["name"].rstrip("/") != own),
        key=lambda info: str(info["name"]),
    )
    yield {info["name"]: info for info in entries if info["type"] != "directory"}
    if depth is not None and depth <= 1:
        return
    for info in entries:
        if info["type"] == "directory":
            yield from _walk(fs, info["name"], None if depth is None else depth - 1)


@contextlib.contextmanager
def _listing_folders_of(uri: str) -> Iterator[None]:
    """A folder under `uri` that cannot be listed (access denied, a store error) as a
    SourceError naming it: fsspec's walk would otherwise leave it out without a word."""
    try:
        yield
    except OSError as err:
        raise SourceError(f"input {uri}: a folder under it cannot be listed ({err})") from None


def _files(fs: Any, found: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The files among listed entries. A symbolic link (a local listing shows it as "other")
    to a file is listed with its target's size and time, and one that leads nowhere as
    itself (reading it gives an error row); a link to a folder is not followed (it could
    loop): a warning names it, to be listed as an input of its own."""
    for name, info in found.items():
        if info.get("type") == "file":
            yield name, info
        elif info.get("islink"):
            try:
                target = dict(fs.info(name))
            except FileNotFoundError:
                yield name, info
                continue
            if target.get("type") == "file":
                yield name, target
            elif target.get("type") == "directory":
                log.warning("%s: a link to a folder, not followed (name it as an input)", name)


def _names_a_prefix(fs: Any, path: str, uri: str) -> bool:
    """Whether an s3:// URI names a prefix to list: one ending in / does (even where an object
    has the folder's name, which `info` would find first) where anything is under it; else
    where `info` says it is a folder. SourceError where nothing is there."""
    if not uri.endswith("/"):
        return _find_info(fs, path, uri).get("type") == "directory"
    try:
        found = fs.isdir(path)
    except PermissionError as err:
        raise SourceError(f"input {uri}: access denied ({err})") from None
    if not found:
        raise SourceError(f"input {uri}: not found")
    return True


def _find_info(fs: Any, path: str, uri: str) -> dict[str, Any]:
    try:
        return dict(fs.info(path))
    except FileNotFoundError as err:
        raise _not_found(uri, err) from None
    except PermissionError as err:
        raise SourceError(f"input {uri}: access denied ({err})") from None


def _not_found(uri: str, err: FileNotFoundError) -> SourceError:
    """`input URI: not found`; where the store was not reached at all (`storage.unreached`),
    that, and why."""
    cause = unreached(err)
    if cause is not None:
        return SourceError(f"input {uri}: cannot be reached ({in_one_line(cause)})")
    return SourceError(f"input {uri}: not found")


# --- directories, s3:// prefixes and globs, page by page ----------------------------------------


class PagedListing:
    """Inputs listed a page at a time, so that no process holds the whole listing."""

    def pages(self) -> Iterator[pa.Table]:
        """Each page's inputs as listing rows (the extension filter applied)."""
        raise NotImplementedError

    def blocks(self, rows: int = LISTING_BLOCK_ROWS) -> Iterator[pa.Table]:
        """Pages gathered into tables of at least `rows` rows (but the last)."""
        gathered: list[pa.Table] = []
        count = 0
        for page in self.pages():
            gathered.append(page)
            count += page.num_rows
            if count >= rows:
                yield pa.concat_tables(gathered)
                gathered, count = [], 0
        if count:
            yield pa.concat_tables(gathered)


def paged_listing(
    uri: str, extensions: Iterable[str], options: StorageOptions | None
) -> PagedListing | None:
    """An s3:// prefix or glob as an ObjectListing, a directory elsewhere as a FolderWalk; None
    for a single file or object, or a glob outside s3:// (listed at once)."""
    if protocol_of(uri) == "s3":
        return object_listing(uri, extensions, options)
    fs, path = filesystem(uri, options)
    if _is_glob(fs, path) or _find_info(fs, path, uri).get("type") != "directory":
        return None
    return FolderWalk(uri, path, tuple(extensions), dict(options or {}))


@dataclass(frozen=True)
class FolderWalk(PagedListing):
    """A directory on a filesystem other than s3:// (local, gs://, az://, memory://) listed a
    folder at a time (`_walk`): a folder's files come together, folders depth first."""

    uri: str
    path: str
    extensions: tuple[str, ...]
    options: StorageOptions

    def pages(self) -> Iterator[pa.Table]:
        fs, _ = filesystem(self.uri, self.options)
        with _listing_folders_of(self.uri):
            for files in _walk(fs, self.path):
                rows = [
                    _listing_row(canonical_uri(fs, name), info)
                    for name, info in _files(fs, files)
                    if has_extension(name, self.extensions)
                ]
                yield pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)


@dataclass(frozen=True)
class ObjectListing(PagedListing):
    """An s3:// prefix or glob listed a page (ListObjectsV2) at a time: keys come in key
    order, each once."""

    uri: str
    bucket: str
    prefix: str  # the keys listed start with this
    pattern: str | None  # a glob's regular expression, matched on "bucket/key"
    extensions: tuple[str, ...]
    options: StorageOptions
    page_keys: int = S3_PAGE_KEYS

    def pages(self) -> Iterator[pa.Table]:
        """Each page's objects as listing rows (the extension filter and the glob applied)."""
        fs, _ = filesystem(self.uri, self.options)
        pattern = re.compile(self.pattern) if self.pattern else None
        request = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxKeys": self.page_keys}
        while True:
            try:
                page = fs.call_s3("list_objects_v2", **request)
            except PermissionError as err:
                raise SourceError(f"input {self.uri}: access denied ({err})") from None
            except FileNotFoundError as err:  # no such bucket
                raise SourceError(f"input {self.uri}: not found ({err})") from None
            yield self._rows(page.get("Contents", []), pattern)
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def _rows(self, contents: list[dict[str, Any]], pattern: re.Pattern[str] | None) -> pa.Table:
        rows = []
        for entry in contents:
            name = f"{self.bucket}/{entry['Key']}"
            if name.endswith("/") or (pattern is not None and not pattern.match(name)):
                continue  # a folder marker, or a key the glob does not match
            uri = f"s3://{name}"
            if has_extension(uri, self.extensions):
                info = {k: entry.get(k) for k in ("ETag", "LastModified")}
                rows.append(_listing_row(uri, info | {"size": entry.get("Size")}))
        return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)


def object_listing(
    uri: str, extensions: Iterable[str], options: StorageOptions | None
) -> ObjectListing | None:
    """An s3:// prefix or glob as an ObjectListing; None for anything else (a single object,
    a glob in the bucket name, another store)."""
    if protocol_of(uri) != "s3":
        return None
    fs, path = filesystem(uri, options)
    bucket, _, key = path.partition("/")
    if _is_glob(fs, path):
        first = min(path.find(c) for c in GLOB_CHARS if c in path)
        root = path[:first].rpartition("/")[0]
        if not root:
            return None  # a glob in the bucket name
        folder = root.partition("/")[2]
        prefix, pattern = f"{folder}/" if folder else "", glob_translate(path)
    elif _names_a_prefix(fs, path, uri):
        prefix, pattern = f"{key.rstrip('/')}/" if key else "", None
    else:
        return None
    return ObjectListing(uri, bucket, prefix, pattern, tuple(extensions), dict(options or {}))


# The columns that name an input's version, as the store gives them (`store_identity`).
STORE_IDENTITY = ("source_etag", "source_size", "source_mtime")


def store_identity(uri: str, options: StorageOptions | None) -> dict[str, Any]:
    """The ETag, size and modification time the store gives `uri` (one HEAD), for an input a
    manifest names without them; all None where the store cannot tell (the read then names
    why)."""
    try:
        return version_of(uri, options)
    except Exception:  # the store's errors are not one type (botocore's NoCredentialsError)
        return dict.fromkeys(STORE_IDENTITY)


def version_of(uri: str, options: StorageOptions | None) -> dict[str, Any]:
    """The ETag, size and modification time the store gives `uri` (one HEAD); the store's
    error where it gives none."""
    fs, path = filesystem(uri, options)
    row = _listing_row(uri, fs.info(path))
    return {name: row[name] for name in STORE_IDENTITY}


def with_store_identity(rows: pa.Table, options: StorageOptions | None) -> pa.Table:
    """Listing rows with neither an ETag nor a size (a manifest naming URIs only) given the
    store's (`store_identity`, one HEAD each, only for those; a modification time only where
    the row has none, and only where it has the column): the version a run's rows record and
    an incremental run compares, so both see the same, and a file rewritten at the same size
    on a store without ETags (local disk) is a new version."""
    unknown = pc.and_(pc.is_null(rows["source_etag"]), pc.is_null(rows["source_size"]))
    if not pc.any(unknown).as_py():
        return rows
    names = [name for name in STORE_IDENTITY if name in rows.schema.names]
    columns = {name: rows[name].to_pylist() for name in names}
    uris = rows["source_uri"].to_pylist()
    for i in pc.indices_nonzero(unknown).to_pylist():
        found = store_identity(uris[i], options)
        for name in names:
            if columns[name][i] is None:
                columns[name][i] = found[name]
    for name in names:
        field = rows.schema.field(name)
        rows = rows.set_column(
            rows.schema.get_field_index(name), field, pa.array(columns[name], field.type)
        )
    return rows


def _listing_row(uri: str, info: dict[str, Any]) -> dict[str, Any]:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return {
        "source_uri": listed_uri(uri),
        "source_etag": str(etag).strip('"') if etag else None,
        "source_size": info.get("size"),
        "source_mtime": _as_utc(
            info.get("LastModified")
            or info.get("mtime")
            or info.get("last_modified")
            or info.get("updated")
            or info.get("created")
        ),
    }


# The lone surrogates Python decodes a file name's non-UTF-8 bytes to (0x80 to 0xFF, PEP 383).
ESCAPED_BYTES = range(0xDC80, 0xDD00)


class UndecodableName(Exception):
    """A listed file whose name is not UTF-8: no table can name it as it is, so it is not read
    (its row is this error, naming it as `listed_uri` does)."""


def listed_uri(uri: str) -> str:
    """A listed name as a table holds it: the bytes of a local file's name that are not UTF-8
    (which Python holds as lone surrogates) percent-encoded, `caf%E9.jpg`, and a `%` in such a
    name too; any other name as it is. Arrow refused the name, and with it the whole listing.
    (A UTF-8 file named `caf%E9.jpg` beside it would share its URI: it is read, once.)"""
    if uri.isascii() or not any(ord(char) in ESCAPED_BYTES for char in uri):
        return uri
    return "".join(_escaped(char) for char in uri)


def _escaped(char: str) -> str:
    """A character of a name `listed_uri` escapes: a non-UTF-8 byte and `%` itself (so the
    name's bytes come back from it whole) %-encoded."""
    if ord(char) in ESCAPED_BYTES:
        return f"%{ord(char) - 0xDC00:02X}"
    return "%25" if char == "%" else char


def undecodable_name(uri: str) -> UndecodableName | None:
    """UndecodableName where `uri` is a local file `listed_uri` percent-encoded (the name its
    percent-decoded bytes make exists); None for any other URI (e.g. a file of that literal
    name, removed since it was listed)."""
    if not uri.startswith("file://"):
        return None
    name = unquote_to_bytes(uri.removeprefix("file://"))
    if name.isascii() or _is_utf8(name) or not os.path.lexists(name):
        return None
    return UndecodableName(
        f"{uri}: the file's name is not UTF-8 (shown with those bytes %-encoded), so no table "
        "can name it: not read; rename it in UTF-8 and rerun"
    )


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# An epoch time's unit, told by its size: seconds up to 1e11 (the year 5138), then milliseconds,
# microseconds, nanoseconds (an S3 Inventory or a Spark export writes any of them).
EPOCH_DIVISORS = ((1e11, 1), (1e14, 1e3), (1e17, 1e6), (float("inf"), 1e9))


def _as_utc(value: Any) -> dt.datetime | None:
    """A time as UTC: a datetime (naive: UTC), ISO 8601 text, or an epoch number in seconds,
    milliseconds, microseconds or nanoseconds (EPOCH_DIVISORS); ValueError if it is none."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"time {value!r}: expected an epoch time or ISO 8601")
        divisor = next(d for limit, d in EPOCH_DIVISORS if abs(value) < limit)
        try:
            return dt.datetime.fromtimestamp(value / divisor, dt.timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"time {value!r}: expected an epoch time or ISO 8601") from None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)
    return None


# --- manifests -------------------------------------------------------------------------------

URI_COLUMNS = ("uri", "url", "path")
ETAG_COLUMNS = ("e_tag", "etag")
SIZE_COLUMNS = ("size",)
MTIME_COLUMNS = ("last_modified_date", "last_modified", "mtime")
# An S3 Inventory of a versioned bucket lists every version of a key and its delete markers:
# only a key's current version is an input (a deleted key is none).
VERSION_COLUMNS = ("is_latest", "is_delete_marker")
# What reading a manifest or an inventory's data file raises where it is not what it says
# (a bad CSV or Parquet file, bad text, a truncated or corrupt gzip).
UNREADABLE = (ValueError, csv.Error, pa.ArrowException, OSError, EOFError, zlib.error)
# Any of these in a CSV's first row makes it a header (else it is a headerless S3 Inventory CSV).
HEADER_COLUMNS = frozenset(
    {*URI_COLUMNS, "bucket", "key", *ETAG_COLUMNS, *SIZE_COLUMNS, *MTIME_COLUMNS}
)


def read_manifest(uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """Rows of a manifest: text (a URI a line), CSV or Parquet (uri, or S3 Inventory columns),
    or an S3 Inventory report's manifest.json (its data files' rows)."""
    try:
        if is_inventory_manifest(uri):
            records = _report_records(read_report(uri, options), options)
        else:
            records = _records(read_bytes(uri, options), posixpath.splitext(uri)[1].lower())
    except FileNotFoundError:
        raise SourceError(f"manifest {uri}: not found") from None
    except IsADirectoryError:
        raise _a_folder(uri) from None
    except InventoryError as err:
        raise SourceError(f"manifest {uri}: {err}") from None
    except UNREADABLE as err:
        raise SourceError(f"manifest {uri}: cannot read: {err}") from None
    return [
        _manifest_row(uri, f"entry {index}", record)
        for index, record in enumerate(records)
        if _is_current(record)
    ]


def _a_folder(uri: str) -> SourceError:
    return SourceError(
        f"manifest {uri}: a folder; expected a file (a URI a line, CSV, Parquet, or an S3 "
        "Inventory manifest.json)"
    )


def _data_file(uri: str, options: StorageOptions | None) -> bytes:
    """A report's data file, gunzipped where its name says so (fsspec's `infer`, as the run's
    check and Ray Data's reader do)."""
    fs, path = filesystem(uri, options)
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            return bytes(handle.read())
    except FileNotFoundError:
        raise InventoryError(f"its data file {uri}: not found") from None


def _whole_lines(head: bytes) -> bytes:
    """The first HEAD_BYTES of a text file read HEAD_BYTES + 1 long, cut after a whole line."""
    return head[: head.rfind(b"\n", 0, HEAD_BYTES) + 1] if len(head) > HEAD_BYTES else head


def _report_records(
    report: InventoryReport, options: StorageOptions | None
) -> list[dict[str, Any]]:
    """Every data file's entries, named by the report's schema (CSV) or their own (Parquet)."""
    records: list[dict[str, Any]] = []
    for uri in report.files:
        data = _data_file(uri, options)
        if report.format == "parquet":
            records += read_parquet(data).to_pylist()
            continue
        rows = csv.reader(io.StringIO(data.decode("utf-8")))
        records += [csv_record(report.columns, row) for row in rows if row]
    return records


def _is_current(record: dict[str, Any]) -> bool:
    """Not an old version of a key nor a delete marker (`VERSION_COLUMNS`, where given)."""
    fields = {str(name).lower(): str(value).lower() for name, value in record.items()}
    return fields.get("is_latest") != "false" and fields.get("is_delete_marker") != "true"


def _current_versions(block: pa.Table) -> pa.Table:
    """`_is_current`, column-wise."""
    names = {name.lower(): name for name in block.column_names}
    keep = pa.chunked_array([pa.array([True] * block.num_rows, pa.bool_())])
    for column, excluded in (("is_latest", "false"), ("is_delete_marker", "true")):
        if column in names:
            text = pc.utf8_lower(pc.cast(block[names[column]], pa.string()))
            keep = pc.and_(keep, pc.invert(pc.fill_null(pc.equal(text, excluded), False)))
    return block.filter(keep)


def _records(data: bytes, extension: str) -> list[dict[str, Any]]:
    """The manifest's entries as dicts: Parquet, CSV, else text (a URI a line, # comments)."""
    if extension == ".parquet":
        return read_parquet(data).to_pylist()
    text = data.decode("utf-8-sig")
    if extension == ".csv":
        return _csv_records(text)
    lines = (line.strip() for line in text.splitlines())
    return [{"uri": line} for line in lines if line and not line.startswith("#")]


def _leading_comments(text: str) -> int:
    """How many lines a CSV manifest starts with that are `#` comments or blank (lines as
    Arrow's CSV reader counts them, at each newline)."""
    lines = text.split("\n")
    return next(
        (n for n, line in enumerate(lines) if line.strip() and not line.startswith("#")),
        len(lines),
    )


def _without_leading_comments(text: str) -> str:
    return "\n".join(text.split("\n")[_leading_comments(text) :])


def _csv_records(text: str) -> list[dict[str, Any]]:
    text = _without_leading_comments(text)
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if not rows:
        return []
    header = [name.strip().lower() for name in rows[0]]
    if set(header) & HEADER_COLUMNS:
        return [dict(zip(header, row, strict=False)) for row in rows[1:]]
    # S3 Inventory CSV: no header, Bucket then URL-encoded Key first.
    return [{"bucket": row[0], "key": inventory_key(row[1])} for row in rows if len(row) >= 2]


def _manifest_row(
    manifest: str, entry: str, record: dict[str, Any], cwd: str | None = None
) -> dict[str, Any]:
    try:
        fields = {str(name).lower(): _decoded(value) for name, value in record.items()}
    except UnicodeDecodeError as err:
        raise SourceError(f"manifest {manifest}: {entry}: a value is not UTF-8 ({err})") from None
    uri = _first(fields, URI_COLUMNS)
    _check_listed(manifest, entry, [] if uri is None else [str(uri)])
    if uri is None and fields.get("bucket") and fields.get("key"):
        uri = f"s3://{fields['bucket']}/{fields['key']}"
    if not uri:
        empty = {name for name, value in fields.items() if value in (None, "")}
        raise SourceError(f"manifest {manifest}: {entry} has no URI; {_no_uri(fields, empty)}")
    size = _first(fields, SIZE_COLUMNS)
    etag = _first(fields, ETAG_COLUMNS)
    try:
        return {
            "source_uri": _canonical_manifest_uri(str(uri), cwd),
            "source_etag": str(etag).strip('"') if etag else None,
            "source_size": int(size) if size is not None else None,
            "source_mtime": _as_utc(_first(fields, MTIME_COLUMNS)),
        }
    except ValueError as err:
        raise SourceError(f"manifest {manifest}: {entry} ({uri}): {err}") from None


def _decoded(value: Any) -> Any:
    """A manifest's value, binary text (a Parquet `binary` column) read as UTF-8."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


@functools.cache
def _known_protocols() -> frozenset[str]:
    return frozenset(fsspec.available_protocols())


def _check_listed(manifest: str, entry: str, uris: Iterable[str | None]) -> None:
    """SourceError, before any work, where a listed URI names a protocol fsspec does not know
    (`s4://`: every read of its batch would fail), or holds credentials
    (`storage.holds_credentials`: they would reach the table's `source_uri`, logs and error
    rows, as a spec's would; the message shows it masked)."""
    known = _known_protocols()
    for uri in uris:
        if uri is None:
            continue
        if ("@" in uri or "?" in uri) and holds_credentials(uri):
            raise SourceError(
                f"manifest {manifest}: {entry} ({masked_url(uri)}): {CREDENTIALS_IN_URI}"
            )
        if "://" in uri and protocol_of(uri) not in known:
            raise SourceError(
                f"manifest {manifest}: {entry} ({uri}): unknown protocol {protocol_of(uri)}://; "
                "expected s3://, gs://, az://, https://, a path ..."
            )


def _no_uri(present: Collection[str], empty: Collection[str]) -> str:
    """Why an entry has no URI: the `empty` cells of its URI columns (bucket and key counted
    only as a pair), or no such column among those `present`."""
    columns = [name for name in URI_COLUMNS if name in present]
    if {"bucket", "key"} <= set(present):
        columns += ["bucket", "key"]
    if not columns:
        return _uri_columns(present)
    named = [name for name in columns if name in empty] or columns
    return f"its {' and '.join(f'`{name}`' for name in named)} cell is empty"


def _uri_columns(fields: Iterable[str]) -> str:
    return f"expected a `uri` column or `bucket` + `key` columns, found columns {sorted(fields)}"


def _canonical_manifest_uri(uri: str, cwd: str | None = None) -> str:
    if "://" in uri:
        return uri
    return "file://" + posixpath.normpath(posixpath.join(cwd or os.getcwd(), uri))


def _first(fields: dict[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        if fields.get(name) not in (None, ""):
            return fields[name]
    return None


# --- a manifest read in blocks where it lies ------------------------------------------------------

FIRST_ROWS = 64  # rows of a manifest checked before any work
HEAD_BYTES = 1 << 16  # bytes of a CSV or text manifest read to check its first rows
KNOWN_COLUMNS = (
    *URI_COLUMNS,
    "bucket",
    "key",
    *ETAG_COLUMNS,
    *SIZE_COLUMNS,
    *MTIME_COLUMNS,
    *VERSION_COLUMNS,
)
_NO_TEXT = pa.scalar(None, pa.string())


@dataclass(frozen=True)
class ManifestRead:
    """A manifest checked up front, to be read in blocks by whoever reads it (Ray Data's
    Parquet, CSV or text reader): its format, the columns to read and how a block of them
    becomes listing rows, by the same rules as `read_manifest`."""

    uri: str
    format: str  # "parquet", "csv" or "text"
    columns: tuple[str, ...]  # Parquet: the columns to read; CSV: every column's name
    header: bool  # CSV: the first line names the columns (else an S3 Inventory CSV)
    extensions: tuple[str, ...]
    cwd: str  # relative paths in the manifest are relative to the run's directory
    files: tuple[str, ...] = ()  # an S3 Inventory report's data files (else the manifest)
    comments: int = 0  # CSV: the lines of `#` comments (and blank ones) before the header

    @property
    def data_uris(self) -> tuple[str, ...]:
        """The files whose rows are the inputs: the report's data files, or the manifest."""
        return self.files or (self.uri,)

    def csv_arguments(self) -> dict[str, Any]:
        """Arrow CSV options: every column as text, named as checked."""
        return {
            "read_options": pacsv.ReadOptions(
                column_names=list(self.columns), skip_rows=self.comments + self.header
            ),
            "convert_options": pacsv.ConvertOptions(
                column_types=dict.fromkeys(self.columns, pa.string()), strings_can_be_null=False
            ),
        }

    def normalise(self, block: pa.Table) -> pa.Table:
        """A block of the manifest as listing rows, filtered by extension. Column arithmetic
        where it can; row by row where a value needs it (that also names a bad entry)."""
        if self.format == "text":
            rows = self._lines(block)
        else:
            block = _current_versions(block)
            try:
                rows = self._columns(block)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                rows = self._rows(block)
        keep = [has_extension(uri, self.extensions) for uri in rows["source_uri"].to_pylist()]
        return rows.filter(pa.array(keep, pa.bool_()))

    def _fields(self, block: pa.Table) -> dict[str, pa.ChunkedArray]:
        fields = {name.lower(): block[name] for name in block.column_names}
        if self.format == "csv" and not self.header:  # S3 Inventory CSV: URL-encoded keys
            keys = [inventory_key(k) for k in fields["key"].to_pylist()]
            fields["key"] = pa.chunked_array([pa.array(keys, pa.string())])
        return fields

    def _columns(self, block: pa.Table) -> pa.Table:
        fields = self._fields(block)
        uri = _coalesce([_text(fields[name]) for name in URI_COLUMNS if name in fields])
        if uri is not None:
            _check_listed(self.uri, "an entry", uri.to_pylist())
        if "bucket" in fields and "key" in fields:
            joined = pc.binary_join_element_wise(
                "s3:/", _text(fields["bucket"]), _text(fields["key"]), "/"
            )
            uri = joined if uri is None else pc.coalesce(uri, joined)
        if uri is None or uri.null_count:
            empty = {name for name, cells in fields.items() if _text(cells).null_count}
            raise SourceError(f"manifest {self.uri}: an entry has no URI; {_no_uri(fields, empty)}")
        uris = [_canonical_manifest_uri(u, self.cwd) for u in uri.to_pylist()]
        etag = _coalesce([_text(fields[name]) for name in ETAG_COLUMNS if name in fields])
        size = _text(fields["size"]) if "size" in fields else None
        mtime = _coalesce([_timestamps(fields[n]) for n in MTIME_COLUMNS if n in fields])
        rows = block.num_rows
        return pa.table(
            {
                "source_uri": pa.array(uris, pa.string()),
                "source_etag": pa.nulls(rows, pa.string())
                if etag is None
                else pc.utf8_trim(etag, '"'),
                "source_size": pa.nulls(rows, pa.int64())
                if size is None
                else pc.cast(size, pa.int64()),
                "source_mtime": pa.nulls(rows, LISTING_SCHEMA.field("source_mtime").type)
                if mtime is None
                else mtime,
            },
            schema=LISTING_SCHEMA,
        )

    def _rows(self, block: pa.Table) -> pa.Table:
        fields = self._fields(block)
        names, columns = list(fields), [fields[name].to_pylist() for name in fields]
        rows = [
            _manifest_row(self.uri, "an entry", dict(zip(names, values, strict=True)), self.cwd)
            for values in zip(*columns, strict=True)
        ]
        return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)

    def _lines(self, block: pa.Table) -> pa.Table:
        lines = pc.utf8_trim_whitespace(pc.utf8_ltrim(block["text"], "\ufeff"))
        lines = lines.filter(pc.invert(pc.or_(pc.equal(lines, ""), pc.starts_with(lines, "#"))))
        _check_listed(self.uri, "an entry", lines.to_pylist())
        uris = [_canonical_manifest_uri(line, self.cwd) for line in lines.to_pylist()]
        rows = len(uris)
        return pa.table(
            {
                "source_uri": pa.array(uris, pa.string()),
                "source_etag": pa.nulls(rows, pa.string()),
                "source_size": pa.nulls(rows, pa.int64()),
                "source_mtime": pa.nulls(rows, LISTING_SCHEMA.field("source_mtime").type),
            },
            schema=LISTING_SCHEMA,
        )


def check_manifest(
    uri: str, extensions: Iterable[str], options: StorageOptions | None = None
) -> ManifestRead:
    """A manifest's format, columns and first rows, checked by reading its footer (Parquet)
    or first bytes (CSV, text): SourceError now, naming what was expected and found."""
    base = {"uri": uri, "extensions": tuple(extensions), "cwd": os.getcwd()}
    try:
        if is_inventory_manifest(uri):
            return _check_report(read_report(uri, options), base, options)
        fs, path = filesystem(uri, options)
        extension = posixpath.splitext(uri)[1].lower()
        with fs.open(path, "rb") as handle:
            if extension == ".parquet":
                return _check_parquet(ParquetFile(handle), base)
            return _check_text(handle.read(HEAD_BYTES + 1), extension, base)
    except FileNotFoundError:
        raise SourceError(f"manifest {uri}: not found") from None
    except IsADirectoryError:
        raise _a_folder(uri) from None
    except InventoryError as err:
        raise SourceError(f"manifest {uri}: {err}") from None
    except SourceError:
        raise
    except UNREADABLE as err:
        raise SourceError(f"manifest {uri}: cannot read: {err}") from None


def _check_report(
    report: InventoryReport, base: dict[str, Any], options: StorageOptions | None
) -> ManifestRead:
    """An S3 Inventory report: its first data file's first rows, read as its schema names them."""
    first = report.files[0]
    fs, path = filesystem(first, options)
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            if report.format == "parquet":
                checked = _check_parquet(ParquetFile(handle), base)
                return dataclasses.replace(checked, files=report.files)
            head = _whole_lines(handle.read(HEAD_BYTES + 1))
    except FileNotFoundError:
        raise InventoryError(f"its data file {first}: not found") from None
    for index, row in enumerate(list(csv.reader(io.StringIO(head.decode("utf-8"))))[:FIRST_ROWS]):
        record = csv_record(report.columns, row)
        _manifest_row(base["uri"], f"entry {index} of {first}", record, base["cwd"])
    return ManifestRead(
        format="csv", columns=report.columns, header=False, files=report.files, **base
    )


def _check_parquet(parquet: ParquetFile, base: dict[str, Any]) -> ManifestRead:
    names = parquet.schema.names
    columns = tuple(name for name in names if name.lower() in KNOWN_COLUMNS)
    for index, record in enumerate(parquet.first_rows(FIRST_ROWS)):
        _manifest_row(base["uri"], f"entry {index}", record, base["cwd"])
    lower = {name.lower() for name in names}
    if not lower & set(URI_COLUMNS) and not {"bucket", "key"} <= lower:
        raise SourceError(f"manifest {base['uri']}: {_uri_columns(lower)}")
    return ManifestRead(format="parquet", columns=columns, header=False, **base)


def _check_text(head: bytes, extension: str, base: dict[str, Any]) -> ManifestRead:
    """The first lines (up to HEAD_BYTES) as `read_manifest` would read them."""
    head = _whole_lines(head)
    records = _records(head, extension)[:FIRST_ROWS]
    for index, record in enumerate(records):
        _manifest_row(base["uri"], f"entry {index}", record, base["cwd"])
    if extension != ".csv":
        return ManifestRead(format="text", columns=("text",), header=False, **base)
    text = head.decode("utf-8-sig")
    comments = _leading_comments(text)
    first = next(
        (row for row in csv.reader(io.StringIO(_without_leading_comments(text))) if row), []
    )
    header = [name.strip().lower() for name in first]
    if set(header) & HEADER_COLUMNS:
        return ManifestRead(
            format="csv", columns=tuple(header), header=True, comments=comments, **base
        )
    if len(first) < 2:
        raise SourceError(f"manifest {base['uri']}: {_uri_columns(header)}")
    names = ("bucket", "key", *(f"_{i}" for i in range(2, len(first))))
    return ManifestRead(format="csv", columns=names, header=False, **base)


def _text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Values as text, empty ones missing (as `_first` reads them)."""
    text = pc.cast(column, pa.string())
    return pc.if_else(pc.equal(text, ""), _NO_TEXT, text)


def _timestamps(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Times as UTC microseconds: timestamps (naive ones are UTC) and ISO 8601 text with a
    zone; anything else raises, for the row-by-row path."""
    if pa.types.is_timestamp(column.type):
        return pc.cast(column, pa.timestamp("us", tz="UTC"))
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.cast(_text(column), pa.timestamp("us", tz="UTC"))
    raise pa.ArrowNotImplementedError(f"times of type {column.type}")


def _coalesce(columns: list[pa.ChunkedArray]) -> pa.ChunkedArray | None:
    if not columns:
        return None
    return columns[0] if len(columns) == 1 else pc.coalesce(*columns)
