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
from vision_ops.outputs import Target, committed_runs, read_index, read_run
from vision_ops.pipeline.listing import AnyListing, HeldListing
from vision_ops.runindex import (
    INDEX_SCHEMA,
    ROW_COLUMNS,
    index_of,
    retry_flags,
    source_keys,
)
from vision_ops.schema import STATUS_SKIPPED
from vision_ops.sources import with_store_identity
from vision_ops.storage import StorageOptions

log = logging.getLogger(__name__)
_OUTCOMES = pa.schema([INDEX_SCHEMA.field("source_key"), pa.field("outcome", pa.int64())])
FOLD_ROWS = 4_000_000  # outcomes gathered before they are folded into one row per input


@dataclass(frozen=True)
class EarlierOutcomes:
    """What the committed runs of a model did with each source version they read: `done`, the
    source keys left out of an incremental run; `retried`, those whose latest run wrote an
    error row of a type not in `run.skip_errors` (processed again: a retry, not a new input)."""

    done: pa.Array
    retried: pa.Array


def skip_committed(spec: JobSpec, listing: AnyListing, run_id: str) -> tuple[AnyListing, pa.Array]:
    """The listing less sources another run committed with this model and this input version
    (a committed run holds every unit of each source it read: all frames of an instance),
    unless the latest such run wrote an error row for one, of a type not in `run.skip_errors`;
    and the source keys of those retried (`EarlierOutcomes.retried`: the commit counts the rows
    it holds of them, `retried_rows`). The done keys are gathered on the driver as one Arrow
    array, and the listing is filtered in Ray tasks (`without_done`; here where it is held)."""
    fingerprint = model_fingerprint(spec)
    runs = [
        run
        for run in committed_runs(spec.output, spec.storage_options)
        if run["run_id"] != run_id and run.get("model_fingerprint") == fingerprint
    ]
    earlier = earlier_outcomes(spec.output, runs, spec.storage_options, spec.run.skip_errors)
    left = without_done(listing, earlier.done, spec.storage_options)
    log.info(
        "incremental: %d of %d inputs already committed", listing.count - left.count, listing.count
    )
    return left, earlier.retried


def retried_rows(rows: pa.Table, retried: pa.Array) -> dict[str, int]:
    """What a run's rows (ROW_COLUMNS) hold of the sources it retried (`skip_committed`'s
    keys): how many sources, their units and their error rows, as its manifest records them
    (`retried`) and drift leaves them out of the error rate (vision_ops.drift)."""
    keys = source_keys(rows)
    mask = pc.is_in(keys, value_set=retried)
    errors = pc.and_(mask, pc.is_valid(rows["error_type"]))  # as drift counts error rows
    skipped = pc.and_(mask, pc.equal(rows["status"], STATUS_SKIPPED))  # a retried scene's
    return retried_record(
        sources=pc.count_distinct(pc.filter(keys, mask)).as_py(),
        units=_count(mask),
        error_rows=_count(errors),
        skipped=_count(skipped),
    )


def retried_record(
    sources: int = 0, units: int = 0, error_rows: int = 0, skipped: int = 0
) -> dict[str, int]:
    """The manifest's `retried` (`outputs.retried_of` reads it), its keys named here alone: the
    sources retried, their units, their error rows and their skipped units; all 0 where an
    incremental run retried none."""
    return {"sources": sources, "units": units, "error_rows": error_rows, "skipped": skipped}


def _count(mask: pa.Array | pa.ChunkedArray) -> int:
    return pc.sum(pc.cast(mask, pa.int64())).as_py() or 0


def without_done(listing: AnyListing, done: pa.Array, options: StorageOptions) -> AnyListing:
    """The listing less the inputs whose source key is in `done`: filtered in Ray tasks (the
    keys put in the object store once), or here for a listing held here."""
    keys: DoneKeys | frozenset[str]
    if isinstance(listing, HeldListing):
        keys = frozenset(done.to_pylist())
    else:
        keys = DoneKeys(ray.put(done))
    return listing.without(functools.partial(not_done, done=keys, options=options))


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


def not_done(
    block: pa.Table, done: DoneKeys | Collection[str], options: StorageOptions | None = None
) -> pa.Table:
    """The rows of a listing block whose source key is not in `done`; rows a manifest gave
    neither an ETag nor a size are given the store's first (`with_store_identity`), as the
    rows a run writes are: their keys compare alike."""
    lookup = done.lookup() if isinstance(done, DoneKeys) else done
    block = with_store_identity(block, options)
    keep = [key not in lookup for key in source_keys(block).to_pylist()]
    return block.filter(pa.array(keep, pa.bool_()))


def done_sources(
    output: Target,
    runs: Iterable[dict[str, Any]],
    options: StorageOptions,
    skip_errors: Collection[str],
) -> pa.Array:
    """The source keys done by the committed `runs` (oldest first; `done_versions`)."""
    return earlier_outcomes(output, runs, options, skip_errors).done


def earlier_outcomes(
    output: Target,
    runs: Iterable[dict[str, Any]],
    options: StorageOptions,
    skip_errors: Collection[str],
) -> EarlierOutcomes:
    """The committed `runs`' outcomes (oldest first; `latest_outcomes`), read from each run's
    index (vision_ops.runindex) one run at a time."""
    indexes = (committed_index(output, run, options) for run in runs)
    return split_outcomes(latest_outcomes(indexes, skip_errors))


def done_versions(indexes: Iterable[pa.Table], skip_errors: Collection[str]) -> pa.Array:
    """The source keys (`source_keys`) of the inputs done by the committed runs' indexes
    (oldest run first; `latest_outcomes`)."""
    return split_outcomes(latest_outcomes(indexes, skip_errors)).done


def split_outcomes(latest: pa.Table) -> EarlierOutcomes:
    """`latest_outcomes` as the keys done (even outcomes) and those retried (odd)."""
    retry = pc.equal(pc.bit_wise_and(latest["outcome"], 1), 1)
    return EarlierOutcomes(
        done=latest.filter(pc.invert(retry))["source_key"].combine_chunks(),
        retried=latest.filter(retry)["source_key"].combine_chunks(),
    )


def latest_outcomes(indexes: Iterable[pa.Table], skip_errors: Collection[str]) -> pa.Table:
    """Each source key the committed runs' indexes (oldest run first) hold, once, with the
    outcome of the latest run that read it: that input is done unless one of that run's error
    types for it (any frame, any tile) is outside `skip_errors` (an odd outcome: a retry).

    Hash aggregations over the runs' indexes: each source's outcome is `2 * run + retry`, so
    an input's largest is its latest run, odd where that run asks for a retry. The indexes
    are folded in as they are read, once `FOLD_ROWS` outcomes wait, so the driver holds about
    one row per input, not one per input and run (nightly runs over the same collection)."""
    latest = _OUTCOMES.empty_table()
    waiting: list[pa.Table] = []
    for ordinal, index in enumerate(indexes):
        waiting.append(run_outcomes(index, ordinal, skip_errors))
        if sum(table.num_rows for table in waiting) >= FOLD_ROWS:
            latest, waiting = _latest_outcomes([latest, *waiting]), []
    return _latest_outcomes([latest, *waiting])


def _latest_outcomes(tables: list[pa.Table]) -> pa.Table:
    """Each source key once, with its largest outcome."""
    latest = pa.concat_tables(tables).group_by("source_key").aggregate([("outcome", "max")])
    return latest.select(["source_key", "outcome_max"]).rename_columns(["source_key", "outcome"])


def run_outcomes(index: pa.Table, ordinal: int, skip_errors: Collection[str]) -> pa.Table:
    """One run's index (the `ordinal`-th, oldest first) as source keys and `outcome`:
    2 * ordinal, plus 1 where the source is to be processed again (`retry_flags`)."""
    retry = pc.cast(retry_flags(index, skip_errors), pa.int64())
    outcome = pc.add(retry, 2 * ordinal)
    return pa.table([index["source_key"], outcome], schema=_OUTCOMES)


def committed_index(output: Target, run: dict[str, Any], options: StorageOptions) -> pa.Table:
    """A committed run's index: the file its manifest names, else (a run committed before
    indexes, or its index lost) built from its rows' identity and status columns."""
    uri = run.get("index_uri")
    if uri:
        try:
            return read_index(output, uri, options)
        except FileNotFoundError:
            log.warning("run %s: its index %s is gone; reading its rows", run["run_id"], uri)
    return index_of(committed_versions(output, run, options))


def committed_versions(output: Target, run: dict[str, Any], options: StorageOptions) -> pa.Table:
    """A committed run's source identity and status columns, one row per unit it wrote."""
    return read_run(output, run, options, ROW_COLUMNS)


def model_fingerprint(spec: JobSpec) -> str:
    """The model, task and unit settings that decide the rows (a weights file: pin its
    sha256). Tiling and DICOM settings count where set, so a photo job's fingerprint is the
    same as before they existed."""
    content: dict[str, Any] = {
        "model": spec.model.model_dump(mode="json"),
        "task": spec.task.model_dump(),
    }
    if spec.input.tiling is not None:
        content["tiling"] = spec.input.tiling.fingerprinted()
    if spec.input.dicom is not None:
        content["dicom"] = spec.input.dicom.model_dump(mode="json")
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
