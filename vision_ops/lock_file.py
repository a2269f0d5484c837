"""The run lock's one object, written only over the version last read (compare-and-swap).

`read()` gives the object's bytes and a tag naming that version (None where there is no
object); `write(data, expected)` replaces the object only while it is still at `expected`
(None: only where no object exists) and `remove(expected)` deletes it only then; both raise
`Raced` where another writer came first.

How the swap is made atomic depends on the store:
- S3 and S3-compatible stores: conditional requests (`If-None-Match: *` to create, `If-Match:
  <ETag>` to replace or delete), so of two runs that read the same version only one writes
  over it. AWS S3 has conditional writes since 2024. A store that answers them
  `NotImplemented`, or a botocore too old to send them (s3fs would drop them without a word),
  gets compare-then-write, with a warning; a store that ignores them leaves the run lock's
  read-back of its owner.
- Local disk: the compare and the write are made under an exclusive `flock` of the table's
  folder, so processes of this host take turns; a file system that takes no `flock` of a
  folder (NFS) gets compare-then-write, with a warning.
- Other stores (GCS, Azure, memory): compare, then write (two writers in the same instant
  could both pass); the run lock's read-back of its owner finds most such races.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any, Protocol

from fsspec import AbstractFileSystem

from vision_ops.storage import is_local, make_folder, protocols, replace_file

# What S3 answers a conditional write whose condition failed: 412, or 409 where two
# conditional writes to one key raced.
S3_RACED_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
# What a store without conditional writes answers them (501).
S3_UNSUPPORTED_CODES = frozenset({"NotImplemented"})
# The conditions each call is made under (when the store and botocore have them).
CONDITIONS = {
    "put_object": frozenset({"IfMatch", "IfNoneMatch"}),
    "delete_object": frozenset({"IfMatch"}),
}

log = logging.getLogger(__name__)


class Raced(RuntimeError):
    """The object was no longer at the version the writer read: another writer came first."""


class NoConditionalWrites(RuntimeError):
    """The store refused a conditional write's headers: it has no conditional writes."""


class LockFile(Protocol):
    def read(self) -> tuple[bytes | None, str | None]: ...

    def write(self, data: bytes, expected: str | None) -> str: ...

    def remove(self, expected: str) -> None: ...


def lock_file(fs: AbstractFileSystem, path: str) -> LockFile:
    """The store's kind of lock object at `path`."""
    if "s3" in protocols(fs):
        return S3LockFile(fs, path)
    if is_local(fs):
        return LocalLockFile(fs, path)
    return ComparedLockFile(fs, path)


class ComparedLockFile:
    """Compare, then write: no atomic swap on this store (see the module's docstring)."""

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            data = bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None, None
        return data, _digest(data)

    def write(self, data: bytes, expected: str | None) -> str:
        with self._turn():
            if self.read()[1] != expected:
                raise Raced(self.path)
            replace_file(self.fs, self.path, data)
        return _digest(data)

    def remove(self, expected: str) -> None:
        with self._turn():
            if self.read()[1] != expected:
                raise Raced(self.path)
            self.fs.rm(self.path)

    @property
    def folder(self) -> str:
        return self.path.rpartition("/")[0]

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        make_folder(self.fs, self.folder)
        yield


class LocalLockFile(ComparedLockFile):
    """Compare, then write, under an exclusive `flock` of the folder: atomic on this host."""

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        make_folder(self.fs, self.folder)
        descriptor = os.open(self.folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            except OSError as err:  # NFS and others: no flock of a folder
                _warn_once(
                    f"{self.folder}: the file system takes no flock ({err}); the run lock is "
                    "compared, then written, so two runs starting in the same instant could "
                    "both take it"
                )
            yield
        finally:
            os.close(descriptor)  # closing the folder's descriptor ends the flock


class S3LockFile:
    """Conditional writes: the store itself refuses a write over a version not read. A store
    that answers them `NotImplemented` gets compare-then-write, with a warning."""

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, _, self.key = path.partition("/")
        # The calls made without conditions: those the store answered NotImplemented, and
        # those this botocore cannot send (s3fs drops, without a word, what its model lacks).
        self.unconditional = {m for m in CONDITIONS if not _botocore_sends(m, CONDITIONS[m])}
        if "put_object" in self.unconditional:
            _warn_once(
                f"{path}: this botocore sends no conditional writes (If-Match, If-None-Match; "
                "a newer one does); the run lock is compared, then written"
            )

    def read(self) -> tuple[bytes | None, str | None]:
        """The object's bytes and its ETag, from one GET (a HEAD and a GET could name two
        versions)."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            answer = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await answer["Body"].read(), str(answer["ETag"])
            finally:
                answer["Body"].close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def write(self, data: bytes, expected: str | None) -> str:
        condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
        answer = self._conditionally("put_object", condition, Body=data)
        if answer is None:
            if self.read()[1] != expected:
                raise Raced(self.path)
            answer = self._call("put_object", {}, Body=data)
        return str(answer["ETag"])

    def remove(self, expected: str) -> None:
        """Gone already is removed (a retried DELETE whose first try had landed answers 404)."""
        with contextlib.suppress(FileNotFoundError):
            if self._conditionally("delete_object", {"IfMatch": expected}):
                return
            if self.read()[1] != expected:
                raise Raced(self.path)
            self._call("delete_object", {})

    def _conditionally(
        self, method: str, condition: dict[str, str], **arguments: Any
    ) -> dict[str, Any] | None:
        """The call made under `condition`: its answer; None where the store has no conditional
        writes (said once; the caller compares, then calls). Raced where the condition failed."""
        if method in self.unconditional:
            return None
        try:
            return self._call(method, condition, **arguments)
        except NoConditionalWrites as err:
            self.unconditional.add(method)
            if method == "put_object":  # a release's unconditional delete risks little
                log.warning(
                    "%s: the store has no conditional writes (%s); the run lock is compared, "
                    "then written, so two runs starting in the same instant could both take it",
                    self.path,
                    err,
                )
            return None

    def _call(self, method: str, condition: dict[str, str], **arguments: Any) -> dict[str, Any]:
        """One S3 call on the object under `condition`; its answer."""
        try:
            answer = self.fs.call_s3(
                method, Bucket=self.bucket, Key=self.key, **arguments, **condition
            )
        except OSError as err:
            code = _s3_code(err)
            if code in S3_RACED_CODES:
                raise Raced(self.path) from None
            if condition and code in S3_UNSUPPORTED_CODES:
                raise NoConditionalWrites(code) from None
            raise
        return dict(answer)


@functools.cache
def _botocore_sends(method: str, headers: frozenset[str]) -> bool:
    """Whether the installed botocore's S3 model has `headers` for `method` (put_object)."""
    import botocore.session

    operation = "".join(part.title() for part in method.split("_"))
    model = botocore.session.get_session().get_service_model("s3")
    return headers <= set(model.operation_model(operation).input_shape.members)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _s3_code(err: BaseException) -> str | None:
    """The S3 error code behind s3fs's OSError (it keeps botocore's error as the cause)."""
    cause = err.__cause__
    response = getattr(cause, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
