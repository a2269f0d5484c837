"""Incremental runs: the listing less the sources that another run committed with the same
model and the same input version, and the model fingerprint that decides "the same model"."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
from typing import Any

import pyarrow as pa

from vision_ops.config import JobSpec
from vision_ops.outputs import Target, committed_runs, read_run
from vision_ops.pipeline.listing import BLOCKWISE, Listing, summarise
from vision_ops.storage import StorageOptions

log = logging.getLogger(__name__)


def skip_committed(spec: JobSpec, listing: Listing, run_id: str) -> Listing:
    """The listing less sources another run committed with this model and this input version
    (a committed run holds every unit of each source it read: all frames of an instance).
    The committed versions are gathered on the driver; the listing is filtered in Ray tasks."""
    fingerprint = model_fingerprint(spec)
    done: set[tuple[str, str]] = set()
    for run in committed_runs(spec.output, spec.storage_options):
        if run["run_id"] != run_id and run.get("model_fingerprint") == fingerprint:
            done |= committed_versions(spec.output, run, spec.storage_options)
    select = functools.partial(not_done, done=done)
    kept = listing.dataset.map_batches(select, **BLOCKWISE).materialize()
    left = Listing(kept, summarise(kept, find_repeats=False))
    log.info(
        "incremental: %d of %d inputs already committed", listing.count - left.count, listing.count
    )
    return left


def not_done(block: pa.Table, done: set[tuple[str, str]]) -> pa.Table:
    """The rows of a listing block whose (URI, version) is not in `done`."""
    keep = [(row["source_uri"], version_key(row)) not in done for row in block.to_pylist()]
    return block.filter(pa.array(keep, pa.bool_()))


def committed_versions(
    output: Target, run: dict[str, Any], options: StorageOptions
) -> set[tuple[str, str]]:
    """The (URI, version) of each source a committed run read."""
    columns = ["source_uri", "source_etag", "source_size", "source_mtime"]
    rows = read_run(output, run, options, columns).to_pylist()
    return {(row["source_uri"], version_key(row)) for row in rows}


def version_key(row: dict[str, Any]) -> str:
    """An input's version: its ETag, else its size and modification time."""
    if row.get("source_etag"):
        return f"etag:{row['source_etag']}"
    mtime = row.get("source_mtime")
    stamp = mtime.astimezone(dt.timezone.utc).isoformat() if mtime else None
    return f"size:{row.get('source_size')}|mtime:{stamp}"


def model_fingerprint(spec: JobSpec) -> str:
    """The model, task and unit settings that decide the rows (a weights file: pin its
    sha256). Tiling and DICOM settings count where set, so a photo job's fingerprint is the
    same as before they existed."""
    content: dict[str, Any] = {
        "model": spec.model.model_dump(mode="json"),
        "task": spec.task.model_dump(),
    }
    for name in ("tiling", "dicom"):
        settings = getattr(spec.input, name)
        if settings is not None:
            content[name] = settings.model_dump(mode="json")
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
