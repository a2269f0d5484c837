"""Filesystem access through fsspec URLs, with per-protocol options from the spec."""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

StorageOptions = Mapping[str, Mapping[str, Any]]
TEMPORARY_INFIX = ".tmp-"  # `replace_file`'s temporary names: {path}.tmp-{8 hex}
OPTIONAL_BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class StorageError(RuntimeError):
    """A location the run must write cannot be written: says which and why (access denied,
    no such bucket). Raised before the commit, so nothing is visible to readers."""


# Where an object store's credentials are looked for (botocore's chain, as s3fs and DuckDB
# resolve them).
CREDENTIAL_CHAIN = (
    "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), the shared credentials/config "
    "files (AWS_PROFILE), SSO, web identity or a container/instance role"
)


def no_credentials(err: BaseException) -> bool:
    """Whether `err` is botocore's NoCredentialsError: none anywhere in the chain (s3fs passes
    it on as it is, not as an OSError)."""
    return any(kind.__name__ == "NoCredentialsError" for kind in type(err).__mro__)


def store_error_text(err: BaseException) -> str:
    """A store's error as a user reads it: its type and message, or, for botocore's bare
    "Unable to locate credentials", where credentials were looked for."""
    if no_credentials(err):
        return f"no credentials for the store: none found in {CREDENTIAL_CHAIN}"
    return f"{type(err).__name__}: {err}"


def unreached(err: OSError) -> OSError | None:
    """The connection's error where a FileNotFoundError stands for a store not reached at all
    (fsspec's http raises one from a refused connection as from a 404, with the connection's
    error as its cause); None where it means not found."""
    cause = err.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
        return cause
    return None


@contextlib.contextmanager
def credentials_for(uri: str, error: type[Exception]) -> Iterator[None]:
    """botocore's "Unable to locate credentials" as `error` naming `uri` and where they were
    looked for."""
    try:
        yield
    except Exception as err:
        if not no_credentials(err):
            raise
        raise error(f"{uri}: {store_error_text(err)}") from None


class OutputNotWritable(StorageError):
    """The output cannot be written, found before any work (`require_bucket`): its bucket does
    not exist, or there are no credentials for its store."""


# What a table's URI naming a file is told: before a run (`cli.check_storage`) and on reading
# its manifest (`publish.read_manifest`).
TABLE_IS_A_FILE = "is a file, expected a table's folder"


@contextlib.contextmanager
def writing_to(uri: str) -> Iterator[None]:
    """Turn the store's OSError (s3fs maps AccessDenied to PermissionError, NoSuchBucket to
    FileNotFoundError) into a StorageError naming `uri` and the cause."""
    try:
        yield
    except PermissionError as err:
        raise StorageError(
            f"cannot write {uri}: access denied ({err}); the run's credentials need write "
            "access to the output prefix"
        ) from None
    except FileNotFoundError as err:
        raise StorageError(
            f"cannot write {uri}: the bucket or folder does not exist ({err})"
        ) from None
    except OSError as err:
        raise StorageError(f"cannot write {uri}: {type(err).__name__}: {err}") from None


# Names that carry credentials: an option's (refused in a spec, which is copied into logs and
# job records) or a URL query's.
CREDENTIAL_KEYS = frozenset(
    {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
     "aws_session_token", "account_key", "sas_token", "connection_string",
     "authorization",  # an http header's
     "client_secret", "credential", "credentials", "access_token"}
)  # fmt: skip
# A name says it holds a credential (an environment variable's, a spec's storage option's, an
# http header's) where a word of it (split at _ - . and the like) is one of SECRET_WORDS
# or ends in one of SECRET_ENDINGS (APIKEY, GITHUB_TOKEN, SSECustomerKey), or it names a
# connection string; BYPASS_CACHE, AUTHOR, DB_CONNECTION_TIMEOUT, SSEKMSKeyId do not, nor the
# settings NOT_CREDENTIALS names.
SECRET_WORDS = frozenset(
    {"AUTH", "AUTHORIZATION", "SAS", "PASS", "PWD", "PAT", "DSN", "CREDS", "CONNSTR", "COOKIE"}
)
SECRET_ENDINGS = (
    "KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "CREDENTIALS",
    "SIGNATURE", "OAUTH",
)  # fmt: skip
# Settings whose names hold such a word and no secret (botocore's, paramiko's, an S3 KMS key id).
NOT_CREDENTIALS = frozenset(
    {"SIGNATURE_VERSION", "LOOK_FOR_KEYS", "KEY_FILENAME", "SSE_KMS_KEY_ID"}
)


def names_a_credential(name: str) -> bool:
    """Whether a name says it holds a credential (SECRET_WORDS), a word read also without its
    number or plural (DB_PASSWORD2, API_TOKENS, MY_SECRETS)."""
    words = re.split(r"[^A-Z0-9]+", name.upper())
    joined = "_".join(words)
    if joined in NOT_CREDENTIALS:
        return False
    stems = {word.rstrip("0123456789") for word in words}
    stems |= {stem.removesuffix("S") for stem in stems}
    return (
        "CONNECTION_STRING" in joined
        or "CONN_STR" in joined
        or any(stem in SECRET_WORDS or stem.endswith(SECRET_ENDINGS) for stem in stems if stem)
    )


# A signed URL's query keys (S3 and GCS presigned URLs, an Azure SAS), and any credential's name.
SIGNED_QUERY_KEYS = CREDENTIAL_KEYS | {
    "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "x-goog-signature", "x-goog-credential",
}  # fmt: skip


def _userinfo_pattern(ends: str) -> re.Pattern[str]:
    """A URL's scheme and its user and password: a user (no / : @ in it), then optionally a
    password up to the last @ before the query, fragment or any of `ends` (a password with an
    unescaped / ends the host early for urlsplit, not here). What follows the first colon is a
    port, not a password, where it is at most 5 digits (a port's) up to a / or the end
    (`http://minio:9000/b/a@x.png` names a key; `https://svc:20240101/x@host` is a password),
    and so is nothing before a / (`file://C:/logo@2x.png`); `s3://cams/f@2x.png` names a key,
    not a user."""
    password = rf"(?::(?!\d{{0,5}}(?:/|$))[^?#{ends}]*)?"
    return re.compile(rf"([A-Za-z][\w+.-]*)://([^/?#@:{ends}]*{password})@")


_USERINFO = _userinfo_pattern("")  # a whole URL, matched at its start
_URL_IN_TEXT = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"]+")  # a URL inside free text


def _is_credential(protocol: str, found: str) -> bool:
    """Whether a URL's user part is a credential: a password (`user:password@`), or any user of
    an http(s) URL (a token alone); `abfs://container@account.dfs.core.windows.net/` names a
    container."""
    return ":" in found or protocol.lower() in ("http", "https")


def userinfo(url: str) -> str | None:
    """The user (and password) a URL holds, `user:pw` of http://user:pw@host/; None where it
    holds none. They must not reach a spec, a log or an error."""
    found = _USERINFO.match(url)
    return found.group(2) if found else None


CREDENTIALS_IN_URI = (
    "a URI with credentials in it (a password, a token, a signed query); credentials never go "
    "in a spec or a command: they come from the standard chains (environment, profile, "
    "instance role)"
)


def holds_credentials(url: str) -> bool:
    """Whether a URL holds a credential in its user part (`_is_credential`) or a signed query
    (`?X-Amz-Signature=`, an Azure SAS `sig=`)."""
    return _credential_userinfo(url) is not None or _signed(url)


def _credential_userinfo(url: str) -> str | None:
    """The URL's user part where it is a credential (`_is_credential`), else None."""
    found = userinfo(url)
    return found if found is not None and _is_credential(protocol_of(url), found) else None


def _signed(url: str) -> bool:
    """Whether the URL's query (before any fragment) holds a signature, a credential or a
    token; a key is read percent-decoded, as the server reads it (`X%2DAmz%2DSignature`)."""
    query = url.partition("#")[0].partition("?")[2]
    keys = {key.lower() for key, _ in parse_qsl(query, keep_blank_values=True)}
    return bool(keys & SIGNED_QUERY_KEYS)


def masked_url(url: str) -> str:
    """`url` with its credentials shown as ***: a user part that is one (`_is_credential`), and
    the whole of a signed query."""
    found = _credential_userinfo(url)
    if found is not None:
        url = url.replace(f"{found}@", "***@", 1)
    return f"{url.partition('?')[0]}?***" if _signed(url) else url


def address_userinfo(address: str) -> str | None:
    """The user (and password) a cluster address holds: a URL's (`userinfo`), or that of a
    bare `user:password@head:6379`, the form Ray's addresses take; None where it holds none."""
    if "://" not in address:
        return address.rpartition("@")[0] or None
    return userinfo(address)


def without_userinfo(url: str) -> str:
    """`url` with its user and password, if any, left out."""
    found = userinfo(url)
    return url.replace(f"{found}@", "", 1) if found else url


def masked_credentials(text: str) -> str:
    """`text` with the credentials of every URL in it (`masked_url`) shown as ***: an error
    message quoting a URL (a store's, RAY_ADDRESS, a signed link) must not carry them to a
    terminal or a log."""
    return _URL_IN_TEXT.sub(lambda found: masked_url(found.group(0)), text)


def protocol_of(uri: str) -> str:
    protocol, sep, _ = uri.partition("://")
    return protocol if sep else "file"


def known_protocol(uri: str) -> str:
    """`uri` where fsspec knows its protocol (s3://, gs://, file://, a plain path ...);
    ValueError naming it if not."""
    protocol = protocol_of(uri)
    if protocol not in fsspec.available_protocols():
        raise ValueError(
            f"{uri}: unknown protocol {protocol}://; expected s3://, gs://, az://, a path ..."
        )
    return uri


def missing_file(uri: str, options: StorageOptions | None = None) -> str | None:
    """Why the file at `uri` cannot be used ("not found", "is a folder, expected a file", or
    "cannot be read:" and the store's own error: no credentials here, access denied, no such
    bucket); None where it is there."""
    return missing(uri, "file", options)


def missing(uri: str, kind: str, options: StorageOptions | None = None) -> str | None:
    """Why the `kind` ("file" or "folder") at `uri` cannot be used (`missing_file`'s reasons);
    None where it is there."""
    try:
        found = _found_kind(uri, options)
    except Exception as err:  # the store's errors are not one type
        return f"cannot be read: {store_error_text(err)}"
    if found == kind:
        return None
    return f"is a {found}, expected a {kind}" if found else "not found"


def _found_kind(uri: str, options: StorageOptions | None = None) -> str | None:
    """What is at `uri`: "file", "folder", or None where nothing is (or something else: a
    socket); the store's error where it cannot tell. One `info` call (isfile then isdir made
    two): on S3 a key's HEAD, else one key listed under the prefix (a folder with or without a
    marker object); for a bucket's root, its HEAD."""
    fs, path = filesystem(uri, options)
    try:
        found = fs.info(path)["type"]
    except (FileNotFoundError, NotADirectoryError) as err:  # the second: a path under a file
        cause = unreached(err)
        if cause is not None:
            raise cause from None
        return None
    except PermissionError as denied:
        raise _denial_in_words(fs, path, denied) from None
    return {"file": "file", "directory": "folder"}.get(found)


def _denial_in_words(fs: AbstractFileSystem, path: str, denied: PermissionError) -> PermissionError:
    """The store's own words for a denial: an S3 HEAD's 403 has no body (s3fs says
    "Forbidden"), a listing's has them (access denied, a signature that does not match);
    `denied` itself where the listing is not denied."""
    try:
        fs.ls(path, detail=False)
    except PermissionError as worded:
        return worded
    except Exception:  # not found, or another fault: the HEAD's denial stands
        pass
    return denied


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem serving `uri` and the path inside it; a local path normalised as text
    (`posixpath.normpath`: `a/./b` and `a/c/../b` are `a/b`, so each file has one URI however
    it was named; `a/link/..` is `a`, where the OS would read the link target's parent). An
    object store's listings are not cached: fsspec keeps one filesystem per set of options in a
    process, and its cached listing of a table's manifests, journals or staged parts would hide
    what another process wrote since (a run committed while this one started, read by
    `--incremental` as not there). A spec's `storage_options` cannot turn that cache back on:
    the commit path relies on every listing being fresh."""
    protocol = protocol_of(uri)
    fresh = {"use_listings_cache": False} if protocol in OPTIONAL_BACKENDS else {}
    kwargs = dict((options or {}).get(protocol, {})) | fresh
    try:
        fs, path = fsspec.core.url_to_fs(uri, **kwargs)
    except ImportError as err:
        package = OPTIONAL_BACKENDS.get(protocol, f"the fsspec backend for {protocol}://")
        raise ImportError(f"reading {protocol}:// needs {package}: pip install {package}") from err
    return fs, posixpath.normpath(path) if protocol == "file" else path


def arrow_filesystem(
    uri: str, options: StorageOptions | None = None
) -> tuple[pafs.FileSystem, str]:
    """The filesystem serving `uri` as a pyarrow one (for readers that take those, such as
    Ray Data's), with the spec's options (an S3 endpoint, credentials), and the path in it."""
    fs, path = filesystem(uri, options)
    if protocol_of(uri) == "file":
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def require_bucket(uri: str, options: StorageOptions | None = None) -> None:
    """StorageError unless the bucket (container) of an object-store URI exists: some stores
    (SeaweedFS, MinIO in some modes) create a bucket on the first write, where a typo in the
    output should fail the run instead."""
    if protocol_of(uri) not in OPTIONAL_BACKENDS:
        return
    fs, path = filesystem(uri, options)
    bucket = path.strip("/").split("/", 1)[0]
    try:
        with credentials_for(f"output {uri}", OutputNotWritable):
            fs.info(bucket)
    except FileNotFoundError:
        raise OutputNotWritable(f"cannot write {uri}: the bucket {bucket} does not exist") from None
    except OSError:
        return  # not allowed to look (no ListBucket): the writes themselves will tell


def make_folder(fs: AbstractFileSystem, path: str) -> None:
    """Create a folder where the filesystem has real ones (local disk). On object stores a
    "folder" is a key prefix: nothing to create, and s3fs's makedirs would create a missing
    bucket, where a run must fail instead."""
    if is_local(fs):
        fs.makedirs(path, exist_ok=True)


def file_sha256(fs: AbstractFileSystem, path: str) -> str:
    """A file's content hash, read a megabyte at a time."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local disk (real folders, rename), False for object stores and memory."""
    return bool(protocols(fs) & {"file", "local"})


def protocols(fs: AbstractFileSystem) -> set[str]:
    """The names a filesystem answers to (fsspec gives one, or a tuple)."""
    return set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def replace_file(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` whole or not at all, replacing what was there: an object store's PUT is
    atomic; on local disk the bytes go to a temporary name first, then are renamed over `path`
    (a reader, or a crash, never meets half a file)."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    temporary = f"{path}{TEMPORARY_INFIX}{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(temporary, data)
        _fsync(temporary)  # its bytes on disk before a name points at them
        fs.mv(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.rm(temporary)
        raise
    synced(fs, [], folders=[path.rpartition("/")[0]])  # the rename itself


def synced(fs: AbstractFileSystem, files: list[str], folders: list[str] | None = None) -> None:
    """On local disk (NFS included), `files` and the folders holding them, and `folders`,
    flushed to the disk (fsync): after a power loss, not only a process crash, a name the
    commit wrote points at whole bytes. An object store's PUT is durable as it answers."""
    if not is_local(fs):
        return
    for path in [*files, *sorted({*(f.rpartition("/")[0] for f in files), *(folders or [])})]:
        _fsync(path)


def _fsync(path: str) -> None:
    """One local file's or folder's bytes flushed to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def canonical_uri(fs: AbstractFileSystem, path: str) -> str:
    """The full URL of a path, e.g. s3://bucket/key or file:///abs/path."""
    return str(fs.unstrip_protocol(path))


def recorded_uri(uri: str) -> str:
    """The URI a run records for an input named `uri`: a plain local path as its file:// URL
    (`a.jpg` as file:///abs/a.jpg), any other as it is."""
    if "://" in uri:
        return uri
    fs, path = filesystem(uri)
    return canonical_uri(fs, path)


def folder_uri(uri: str, options: StorageOptions | None = None) -> str:
    """A folder's full URL as a listing names what it holds (`canonical_uri`), ending in /."""
    fs, path = filesystem(uri, options)
    return canonical_uri(fs, path.rstrip("/")) + "/"


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    return bytes(fs.cat_file(path))


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, options)
    fs.pipe_file(path, data)


class ParquetFile:
    """A Parquet file from an open file object or its bytes, read on this thread alone: the
    one way the code opens one. A process that read a table and exited at once aborted now
    and then ("terminate called without an active exception", exit -6 or 134) while Arrow's
    threads still held work: `pq.read_table`'s dataset scan left some running after it
    returned (apache/arrow#33975); a threaded read decoded on the CPU pool; and
    `pq.ParquetFile`'s default `pre_buffer` reads a Python file object ahead on Arrow's IO
    pool, a thread that calls into Python (it aborted a CI run with the read unthreaded;
    apache/arrow#50482 is a related teardown problem). So no pool at all: every read here is
    unthreaded and nothing is pre-buffered. Without pre-buffering a remote file's column
    chunks are read one by one, not in coalesced ranges: more, smaller reads, most of them
    served by the file object's read-ahead."""

    def __init__(self, source: Any) -> None:
        if isinstance(source, bytes):
            source = pa.BufferReader(source)
        self._file = pq.ParquetFile(source, pre_buffer=False)

    @property
    def schema(self) -> pa.Schema:
        """The file's Arrow schema, its key-value metadata included."""
        return self._file.schema_arrow

    @property
    def num_rows(self) -> int:
        """The rows its footer records."""
        return int(self._file.metadata.num_rows)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        return self._file.read(columns=columns, use_threads=False)

    def first_rows(self, count: int) -> list[dict[str, Any]]:
        """Up to `count` rows from the start, as dicts."""
        first = next(self._file.iter_batches(batch_size=count, use_threads=False), None)
        return first.to_pylist() if first is not None else []

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ParquetFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_parquet(source: Any, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file from an open file object or its bytes, read whole within this call, on
    this thread alone (`ParquetFile` says why)."""
    with ParquetFile(source) as parquet:
        return parquet.read(columns)
