"""Inputs: list files, globs and manifests into a table of URIs with their version identity."""

from __future__ import annotations

import csv
import datetime as dt
import io
import posixpath
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.parquet as pq

from vision_ops.config import InputSpec
from vision_ops.storage import StorageOptions, canonical_uri, filesystem, read_bytes

LISTING_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_etag", pa.string()),
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
    ]
)
GLOB_CHARS = frozenset("*?[")


class SourceError(ValueError):
    """Inputs that cannot be listed: a missing path, an unreadable manifest, nothing found."""


def list_inputs(spec: InputSpec, options: StorageOptions | None = None) -> pa.Table:
    """Every input the spec names, once, sorted by URI, filtered by extension."""
    rows: dict[str, dict[str, Any]] = {}
    for uri in spec.uris:
        for row in _list_uri(uri, options):
            rows.setdefault(row["source_uri"], row)
    if spec.manifest is not None:
        for row in read_manifest(spec.manifest, options):
            rows.setdefault(row["source_uri"], row)
    kept = [rows[uri] for uri in sorted(rows) if has_extension(uri, spec.extensions)]
    if not kept:
        named = ", ".join([*spec.uris, *([spec.manifest] if spec.manifest else [])])
        wanted = " ".join(spec.extensions) or "any extension"
        raise SourceError(f"no input files found in {named} (looked for: {wanted})")
    return pa.Table.from_pylist(kept, schema=LISTING_SCHEMA)


def has_extension(uri: str, extensions: Iterable[str]) -> bool:
    """Whether the name ends in one of `extensions`; "" matches a name without one, or whose
    last dot is followed by digits only (DICOM files named by their UID: 1.2.840.10008.7)."""
    allowed = tuple(extensions)
    suffix = posixpath.splitext(uri)[1].lower()
    if suffix[1:].isdigit():
        suffix = ""
    return not allowed or suffix in allowed


def _list_uri(uri: str, options: StorageOptions | None) -> list[dict[str, Any]]:
    fs, path = filesystem(uri, options)
    found = fs.glob(path, detail=True) if GLOB_CHARS & set(path) else _find(fs, path, uri)
    return [
        _listing_row(canonical_uri(fs, name), info)
        for name, info in found.items()
        if info.get("type") == "file"
    ]


def _find(fs: Any, path: str, uri: str) -> dict[str, dict[str, Any]]:
    """A file, or everything under a directory. One `info` call tells which: on an object
    store `exists` + `isdir` of a big prefix can cost a second full listing."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise SourceError(f"input {uri}: not found") from None
    except PermissionError as err:
        raise SourceError(f"input {uri}: access denied ({err})") from None
    if info.get("type") == "directory":
        return dict(fs.find(path, detail=True))
    return {path: info}


def _listing_row(uri: str, info: dict[str, Any]) -> dict[str, Any]:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return {
        "source_uri": uri,
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


def _as_utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
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
# Any of these in a CSV's first row makes it a header (else it is a headerless S3 Inventory CSV).
HEADER_COLUMNS = frozenset(
    {*URI_COLUMNS, "bucket", "key", *ETAG_COLUMNS, *SIZE_COLUMNS, *MTIME_COLUMNS}
)


def read_manifest(uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """Rows of a manifest: text (a URI a line), CSV or Parquet (uri, or S3 Inventory columns)."""
    try:
        data = read_bytes(uri, options)
    except FileNotFoundError:
        raise SourceError(f"manifest {uri}: not found") from None
    try:
        records = _records(data, posixpath.splitext(uri)[1].lower())
    except (ValueError, csv.Error, pa.ArrowException) as err:
        raise SourceError(f"manifest {uri}: cannot read: {err}") from None
    return [_manifest_row(uri, index, record) for index, record in enumerate(records)]


def _records(data: bytes, extension: str) -> list[dict[str, Any]]:
    """The manifest's entries as dicts: Parquet, CSV, else text (a URI a line, # comments)."""
    if extension == ".parquet":
        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8-sig")
    if extension == ".csv":
        return _csv_records(text)
    lines = (line.strip() for line in text.splitlines())
    return [{"uri": line} for line in lines if line and not line.startswith("#")]


def _csv_records(text: str) -> list[dict[str, Any]]:
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if not rows:
        return []
    header = [name.strip().lower() for name in rows[0]]
    if set(header) & HEADER_COLUMNS:
        return [dict(zip(header, row, strict=False)) for row in rows[1:]]
    # S3 Inventory CSV: no header, Bucket then URL-encoded Key first.
    return [{"bucket": row[0], "key": unquote_plus(row[1])} for row in rows if len(row) >= 2]


def _manifest_row(manifest: str, index: int, record: dict[str, Any]) -> dict[str, Any]:
    fields = {str(name).lower(): value for name, value in record.items()}
    uri = _first(fields, URI_COLUMNS)
    if uri is None and fields.get("bucket") and fields.get("key"):
        uri = f"s3://{fields['bucket']}/{fields['key']}"
    if not uri:
        raise SourceError(
            f"manifest {manifest}: entry {index} has no URI; expected a `uri` column "
            f"or `bucket` + `key` columns, found columns {sorted(fields)}"
        )
    size = _first(fields, SIZE_COLUMNS)
    etag = _first(fields, ETAG_COLUMNS)
    try:
        return {
            "source_uri": _canonical_manifest_uri(str(uri)),
            "source_etag": str(etag).strip('"') if etag else None,
            "source_size": int(size) if size is not None else None,
            "source_mtime": _as_utc(_first(fields, MTIME_COLUMNS) or None),
        }
    except ValueError as err:
        raise SourceError(f"manifest {manifest}: entry {index} ({uri}): {err}") from None


def _canonical_manifest_uri(uri: str) -> str:
    if "://" in uri:
        return uri
    return "file://" + posixpath.abspath(uri)


def _first(fields: dict[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        if fields.get(name) not in (None, ""):
            return fields[name]
    return None
