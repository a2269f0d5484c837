"""What identifies a run's rows, for its manifest and its resume key: the input snapshot, the
spec, the model (its settings and the files it reads) and the numerics its actors run with."""

from __future__ import annotations

import hashlib
import json

from vision_ops.config import JobSpec
from vision_ops.pipeline.incremental import model_fingerprint
from vision_ops.pipeline.listing import AnyListing
from vision_ops.pool import PoolPlan
from vision_ops.sources import version_of
from vision_ops.storage import (
    StorageError,
    StorageOptions,
    file_sha256,
    filesystem,
    is_local,
    masked_url,
)


def identity_digests(spec: JobSpec, listing: AnyListing, plan: PoolPlan) -> dict[str, str]:
    """What the run read and with what: the input snapshot, the spec, the model and the
    numerics its actors run with (a rerun on other devices or precision starts over). The
    snapshot digest was summed as the listing streamed through Ray tasks, or here (each source's URI
    and version, SHA-256 each, added modulo 2**256, then hashed with the count): the same
    inputs give the same digest whatever their order or blocks."""
    return {
        "input_snapshot_digest": listing.summary.snapshot.hexdigest(),
        "spec_digest": spec.fingerprint(),
        "model_fingerprint": model_fingerprint(spec),
        "model_files_digest": model_files_digest(spec),
        "numerics": spec.runtime.numerics(plan.num_gpus),
    }


def model_files_digest(spec: JobSpec) -> str:
    """What the files the model reads hold (`model_file_version`): a weights or labels file
    replaced in place between a kill and the rerun makes a new resume key, though the spec
    names the same path."""
    versions = {
        name: model_file_version(uri, spec.storage_options)
        for name, uri in sorted(spec.model.files().items())
    }
    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()


def model_file_version(uri: str, options: StorageOptions) -> str:
    """A model file's version: on local disk its content's sha256 (a copy made afresh as a
    node starts has a new mtime, not new content), in a store its ETag, else its size and
    modification time (one HEAD). StorageError, before any work, where the store does not
    tell: a version left unknown would make another resume key and discard the rows earlier
    attempts staged."""
    try:
        fs, path = filesystem(uri, options)
        if is_local(fs):
            return f"sha256 {file_sha256(fs, path)}"
        found = version_of(uri, options)
    except Exception as err:  # the store's errors are not one type
        raise StorageError(
            f"{masked_url(uri)}: the model file's version cannot be read "
            f"({type(err).__name__}: {err}); a run resumes only with the files it started with"
        ) from None
    if found["source_etag"]:
        return f"etag {found['source_etag']}"
    return f"size {found['source_size']} mtime {found['source_mtime']}"
