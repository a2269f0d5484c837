"""Filesystem access through fsspec URLs, with per-protocol options from the spec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

StorageOptions = Mapping[str, Mapping[str, Any]]
OPTIONAL_BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def protocol_of(uri: str) -> str:
    protocol, sep, _ = uri.partition("://")
    return protocol if sep else "file"


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem serving `uri` and the path inside it."""
    protocol = protocol_of(uri)
    kwargs = dict((options or {}).get(protocol, {}))
    try:
        return fsspec.core.url_to_fs(uri, **kwargs)
    except ImportError as err:
        package = OPTIONAL_BACKENDS.get(protocol, f"the fsspec backend for {protocol}://")
        raise ImportError(f"reading {protocol}:// needs {package}: pip install {package}") from err


def canonical_uri(fs: AbstractFileSystem, path: str) -> str:
    """The full URL of a path, e.g. s3://bucket/key or file:///abs/path."""
    return str(fs.unstrip_protocol(path))


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    return bytes(fs.cat_file(path))


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, options)
    fs.pipe_file(path, data)
