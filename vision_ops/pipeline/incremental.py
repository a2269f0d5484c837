"""Incremental runs: the listing less the sources that another run committed with the same
model and the same input version (an error row's input is tried again), and the model
fingerprint that decides "the same model"."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
from collections.abc import Collection, Iterable
from typing import Any

import pyarrow as pa

from vision_ops.config import JobSpec
from vision_ops.outputs import Target, committed_runs, read_run
from vision_ops.pipeline.listing import BLOCKWISE, Listing, summarise
from vision_ops.schema import STATUS_ERROR
from vision_ops.storage import StorageOptions

log = logging.getLogger(__name__)


def skip_committed(spec: JobSpec, listing: Listing, run_id: str) -> Listing:
    """The listing less sources another run committed with this model and this input version
    (a committed run holds every unit of each source it read: all frames of an instance),
    unless the latest such run wrote an error row for one, of a type not in `run.skip_errors`.
    The committed versions are gathered on the driver; the listing is filtered in Ray tasks."""
    fingerprint = model_fingerprint(spec)
    runs = (  # read one run at a time: the driver holds the outcomes, not every run's rows
        committed_versions(spec.output, run, spec.storage_options)
        for run in committed_runs(spec.output, spec.storage_options)
        if run["run_id"] != run_id and run.get("model_fingerprint") == fingerprint
    )
    done = done_versions(runs, spec.run.skip_errors)
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


def done_versions(runs: Iterable[pa.Table], skip_errors: Collection[str]) -> set[tuple[str, str]]:
    """The (URI, version) of each input done by the committed runs' rows (oldest run first):
    the latest run that read an input decides, and it is done unless one of that run's rows
    for it (any frame) is an error of a type outside `skip_errors`."""
    latest: dict[tuple[str, str], bool] = {}
    for rows in runs:
        latest.update(run_outcomes(rows, skip_errors))
    return {key for key, done in latest.items() if done}


def run_outcomes(rows: pa.Table, skip_errors: Collection[str]) -> dict[tuple[str, str], bool]:
    """For each (URI, version) one run read, whether that run's rows leave it done ('ok' and
    'skipped' rows do; an 'error' row does only where its type is in `skip_errors`)."""
    outcomes: dict[tuple[str, str], bool] = {}
    for row in rows.to_pylist():
        key = (row["source_uri"], version_key(row))
        retry = row["status"] == STATUS_ERROR and row["error_type"] not in skip_errors
        outcomes[key] = outcomes.get(key, True) and not retry
    return outcomes


def committed_versions(output: Target, run: dict[str, Any], options: StorageOptions) -> pa.Table:
    """A committed run's source identity and status columns, one row per unit it wrote."""
    columns = ["source_uri", "source_etag", "source_size", "source_mtime", "status", "error_type"]
    return read_run(output, run, options, columns)


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
