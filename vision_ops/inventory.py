"""An S3 Inventory report named by its `manifest.json`: the data files it lists and the columns
they hold, for `input.manifest` to read as it reads one CSV or Parquet manifest.

S3 Inventory writes each report as data files in the destination bucket (CSV, gzipped; Parquet;
or ORC) and a `manifest.json` naming them:
`{"destinationBucket": "arn:aws:s3:::dest", "fileFormat": "CSV", "fileSchema": "Bucket, Key,
Size, LastModifiedDate, ETag, ...", "files": [{"key": "inv/.../data/x.csv.gz", ...}]}`.
Its CSV files have no header: their columns are the `fileSchema`'s, in order, and only
through it are a versioned bucket's `IsLatest`/`IsDeleteMarker` and each object's `Size` and
`ETag` found. Parquet files name their columns themselves.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from vision_ops.storage import StorageOptions, read_bytes

MANIFEST_EXTENSION = ".json"  # a manifest ending so is an S3 Inventory report's manifest.json
FORMATS = {"CSV": "csv", "Parquet": "parquet"}  # fileFormat -> how its data files are read
ARN_PREFIX = "arn:aws:s3:::"


class InventoryError(ValueError):
    """The manifest.json is not an S3 Inventory manifest this job can read."""


@dataclass(frozen=True)
class InventoryReport:
    format: str  # "csv" or "parquet"
    columns: tuple[str, ...]  # CSV: each column's name, in order (snake case); Parquet: ()
    files: tuple[str, ...]  # the data files' URIs


def is_inventory_manifest(uri: str) -> bool:
    return posixpath.splitext(uri)[1].lower() == MANIFEST_EXTENSION


def read_report(uri: str, options: StorageOptions | None = None) -> InventoryReport:
    """The report a manifest.json describes; InventoryError naming what is missing."""
    try:
        manifest = json.loads(read_bytes(uri, options))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InventoryError(f"not JSON ({err}); expected an S3 Inventory manifest.json") from None
    if not isinstance(manifest, dict):
        raise InventoryError("expected an S3 Inventory manifest.json (a JSON object)")
    kind = manifest.get("fileFormat")
    if kind not in FORMATS:
        raise InventoryError(
            f"fileFormat {kind!r}: expected one of {sorted(FORMATS)} (configure the inventory "
            "to write CSV or Parquet; ORC is not read)"
        )
    columns = _columns(manifest.get("fileSchema")) if FORMATS[kind] == "csv" else ()
    return InventoryReport(FORMATS[kind], columns, _files(manifest))


def column_name(field: str) -> str:
    """An inventory field as the column it is in a Parquet report: `LastModifiedDate` ->
    `last_modified_date`, `ETag` -> `e_tag`, `IsLatest` -> `is_latest`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", field.strip()).lower()


def inventory_key(key: str | None) -> str | None:
    """An object key as S3 Inventory CSV writes it (URL-encoded, `+` for a space), decoded."""
    return None if key is None else unquote_plus(key)


def csv_record(columns: tuple[str, ...], row: list[str]) -> dict[str, Any]:
    """A row of a report's CSV data file, named by its schema, its key decoded (a row short of
    its key has none)."""
    record: dict[str, Any] = dict(zip(columns, row, strict=False))
    return record | {"key": inventory_key(record.get("key"))}


def _columns(schema: Any) -> tuple[str, ...]:
    if not isinstance(schema, str) or not schema.strip():
        raise InventoryError("a CSV report without a fileSchema: its columns are unknown")
    columns = tuple(column_name(field) for field in schema.split(","))
    if not {"bucket", "key"} <= set(columns):
        raise InventoryError(f"fileSchema {schema!r}: expected Bucket and Key among its fields")
    return columns


def _files(manifest: dict[str, Any]) -> tuple[str, ...]:
    destination = manifest.get("destinationBucket")
    if not isinstance(destination, str) or not destination.startswith(ARN_PREFIX):
        raise InventoryError(
            f"destinationBucket {destination!r}: expected a bucket ARN ({ARN_PREFIX}BUCKET)"
        )
    bucket = destination.removeprefix(ARN_PREFIX)
    files = manifest.get("files")
    keys = [entry.get("key") if isinstance(entry, dict) else None for entry in files or []]
    if not isinstance(files, list) or not all(isinstance(key, str) and key for key in keys):
        raise InventoryError("expected `files`: the report's data files, each with its `key`")
    if not keys:
        raise InventoryError("the report lists no data files: no inputs")
    return tuple(f"s3://{bucket}/{key}" for key in keys)
