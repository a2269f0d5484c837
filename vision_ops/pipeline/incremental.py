"""Incremental runs: the listing less the sources that another run committed with the same
model and the same input version (an error row's input is tried again), and the model
fingerprint that decides "the same model"."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from vision_ops.config import JobSpec, PpOcrModel
from vision_ops.ocr import OCR_PACKAGE
from vision_ops.outputs import Target, committed_runs, read_run
from vision_ops.pipeline.listing import BLOCKWISE, Listing, summarise
from vision_ops.schema import STATUS_ERROR
from vision_ops.sources import LISTING_SCHEMA
from vision_ops.storage import StorageOptions

log = logging.getLogger(__name__)
KEY_SEPARATOR = "\x00"  # between an input's URI and its version in a source key
IDENTITY_COLUMNS = ["source_uri", "source_etag", "source_size", "source_mtime"]
_IDENTITY = [LISTING_SCHEMA.field(name) for name in IDENTITY_COLUMNS]
_OUTCOMES = pa.schema([*_IDENTITY, pa.field("outcome", pa.int64())])


def skip_committed(spec: JobSpec, listing: Listing, run_id: str) -> Listing:
    """The listing less sources another run committed with this model and this input version
    (a committed run holds every unit of each source it read: all frames of an instance),
    unless the latest such run wrote an error row for one, of a type not in `run.skip_errors`.
    The done keys are gathered on the driver as one Arrow array, put in the object store once,
    and the listing is filtered in Ray tasks."""
    fingerprint = model_fingerprint(spec)
    runs = (  # read one run at a time: the driver holds the outcomes, not every run's rows
        committed_versions(spec.output, run, spec.storage_options)
        for run in committed_runs(spec.output, spec.storage_options)
        if run["run_id"] != run_id and run.get("model_fingerprint") == fingerprint
    )
    left = without_done(listing, done_versions(runs, spec.run.skip_errors))
    log.info(
        "incremental: %d of %d inputs already committed", listing.count - left.count, listing.count
    )
    return left


def without_done(listing: Listing, done: pa.Array) -> Listing:
    """The listing less the inputs whose source key is in `done`, filtered in Ray tasks."""
    select = functools.partial(not_done, done=DoneKeys(ray.put(done)))
    kept = listing.dataset.map_batches(select, **BLOCKWISE).materialize()
    return Listing(kept, summarise(kept, find_repeats=False))


@dataclass(frozen=True)
class DoneKeys:
    """The done source keys in the object store; a worker process builds its lookup set from
    them once and keeps it (the latest only, by object id) for the other blocks it filters."""

    ref: ray.ObjectRef

    def lookup(self) -> frozenset[str]:
        name = self.ref.hex()
        if name not in _LOOKUP:
            _LOOKUP.clear()
            _LOOKUP[name] = frozenset(ray.get(self.ref).to_pylist())
        return _LOOKUP[name]


_LOOKUP: dict[str, frozenset[str]] = {}  # this process's lookup set, by its object's id


def not_done(block: pa.Table, done: DoneKeys | Collection[str]) -> pa.Table:
    """The rows of a listing block whose source key is not in `done`."""
    lookup = done.lookup() if isinstance(done, DoneKeys) else done
    keep = [key not in lookup for key in source_keys(block).to_pylist()]
    return block.filter(pa.array(keep, pa.bool_()))


def done_versions(runs: Iterable[pa.Table], skip_errors: Collection[str]) -> pa.Array:
    """The source keys (`source_keys`) of the inputs done by the committed runs' rows (oldest
    run first): the latest run that read an input decides, and it is done unless one of that
    run's rows for it (any frame, any tile) is an error of a type outside `skip_errors`.

    One hash aggregation over every run's rows: each row's outcome is `2 * run + retry`, so an
    input's largest is its latest run, odd where one of that run's rows asks for a retry."""
    outcomes = [run_outcomes(rows, ordinal, skip_errors) for ordinal, rows in enumerate(runs)]
    if not outcomes:
        return pa.array([], pa.string())
    rows = pa.concat_tables(outcomes)
    keyed = pa.table({"key": source_keys(rows), "outcome": rows["outcome"]})
    latest = keyed.group_by("key").aggregate([("outcome", "max")])
    done = pc.equal(pc.bit_wise_and(latest["outcome_max"], 1), 0)
    return latest.filter(done)["key"].combine_chunks()


def run_outcomes(rows: pa.Table, ordinal: int, skip_errors: Collection[str]) -> pa.Table:
    """One run's rows (the `ordinal`-th, oldest first) as their inputs' identity columns and
    `outcome`: 2 * ordinal, plus 1 where the row asks for its input to be processed again (an
    'error' row whose type is not in `skip_errors`; 'ok' and 'skipped' rows do not)."""
    if rows.num_rows == 0:  # a run that wrote nothing (its files may hold no columns either)
        return _OUTCOMES.empty_table()
    error = pc.equal(rows["status"], STATUS_ERROR)
    kept = pc.is_in(rows["error_type"], value_set=pa.array(sorted(skip_errors), pa.string()))
    retry = pc.cast(pc.and_(error, pc.invert(pc.fill_null(kept, False))), pa.int64())
    outcome = pc.add(retry, 2 * ordinal)
    return pa.table([*(rows[f.name] for f in _IDENTITY), outcome], schema=_OUTCOMES)


def committed_versions(output: Target, run: dict[str, Any], options: StorageOptions) -> pa.Table:
    """A committed run's source identity and status columns, one row per unit it wrote."""
    return read_run(output, run, options, [*IDENTITY_COLUMNS, "status", "error_type"])


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
    packaged = packaged_files(spec)
    if packaged:
        content["packaged"] = packaged
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def packaged_files(spec: JobSpec) -> dict[str, str]:
    """The packages whose files a model uses where the spec names none (the OCR pair's
    defaults), by version, so that an upgrade of one is a new model."""
    model = spec.model
    if not isinstance(model, PpOcrModel) or (model.detector and model.recognizer):
        return {}
    try:
        return {OCR_PACKAGE: importlib.metadata.version(OCR_PACKAGE)}
    except importlib.metadata.PackageNotFoundError:  # the run itself says what to install
        return {OCR_PACKAGE: "not installed"}
