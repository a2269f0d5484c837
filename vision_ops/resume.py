"""Resuming a run that did not commit: the part files its earlier attempts staged, checked, and
the sources they hold whole, so that a rerun of the run id processes only the rest.

An earlier part file is reused only when its footer reads, its schema is the run's, and it
carries the run's resume key (a hash of the run id and date, the spec, the model and the input
snapshot): a file of another spec, model or input snapshot means the run starts over, saying
why. A file cut short by the kill that ended its attempt is left out (its rows are processed
again). A source is resumed only when the files hold every one of its units as this run
plans them (an image; each frame of a DICOM instance; each tile of a scene), told by their
count and their ids, so a partly written source is processed again whole, no unit is written
twice, and a unit the plan no longer has (an unreadable scene's error row, where the rerun
reads the scene and plans its tiles) is never reused for another. A source with an error row
is processed again: its error may have been the store's, for the moment.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from fsspec import AbstractFileSystem

from vision_ops.schema import STATUS_ERROR, item_id
from vision_ops.storage import ParquetFile, StorageError, read_parquet
from vision_ops.tally import token_sum

log = logging.getLogger(__name__)
RESUME_KEY = "vision_ops.resume_key"  # in the metadata of every part file a run stages
PART_FILES = "part-*.parquet"  # an attempt's staged part files (`part_file`)


def part_file(number: int) -> str:
    """The name of an attempt's `number`th staged part file."""
    return f"part-{number:05d}.parquet"


@dataclass(frozen=True)
class Units:
    """A source's units as the run plans them: how many, and their ids' tokens summed
    (tally.token_sum)."""

    count: int
    id_sum: int


# A source's units, given its URI and the frame count its rows record (None: not multi-frame):
# an image's one, a DICOM instance's frames (image_units), a scene's tiles (its plan's).
UnitsOf = Callable[[str, int | None], Units]


def image_units(uri: str, frames: int | None) -> Units:
    """An image's unit, or each frame of a DICOM instance whose rows record `frames`."""
    ids = [item_id(uri, frame) for frame in range(frames)] if frames else [item_id(uri)]
    return Units(len(ids), token_sum(ids))


@dataclass(frozen=True)
class Resumable:
    """What earlier attempts left that a rerun reuses."""

    files: list[str]  # their part files, in the order they were written
    sources: frozenset[str]  # the sources those files hold whole
    units: int  # the units (rows) of those sources


def resume_key(run_id: str, run_date: str, identity: Mapping[str, str]) -> str:
    """What must not differ for a staged part file to be reused: the run, the spec, the model
    and the input snapshot (`identity`: the manifest's digests)."""
    content = {"run_id": run_id, "run_date": run_date, **identity}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def with_resume_key(table: pa.Table, key: str) -> pa.Table:
    return table.replace_schema_metadata((table.schema.metadata or {}) | {RESUME_KEY: key})


def find_resumable(
    fs: AbstractFileSystem,
    run_staging: str,
    current: str,
    schema: pa.Schema,
    key: str,
    units_of: UnitsOf,
    masks: Collection[str] | None = None,
) -> Resumable | None:
    """The part files under `run_staging` (all attempts but the `current` one) that a rerun
    reuses, and the sources they hold whole; None where a file forbids reuse (logged). Where
    the rows name masks, `masks` are the names of those earlier attempts staged: a source
    with a row whose mask is not among them is not whole."""
    paths = sorted(
        path
        for path in fs.glob(f"{run_staging}/*/{PART_FILES}")
        if not path.startswith(f"{current}/")
    )
    usable, units = [], []
    for path in paths:
        problem, scanned = _scan(fs, path, schema, key, masks is not None)
        if scanned is not None:
            usable.append(path)
            units.append(scanned)
        elif problem == TORN:
            log.info("resume: %s is cut short (its attempt was killed writing it): left out", path)
        else:
            log.warning("not resuming: %s %s; the run starts over", path, problem)
            return None
    sources = _whole_sources(units, units_of, masks)
    return Resumable(usable, frozenset(sources), sum(sources.values()))


def resumed_rows(fs: AbstractFileSystem, found: Resumable) -> Iterator[pa.Table]:
    """The rows of the resumed sources, each unit once (an attempt killed while re-staging
    an earlier one's rows leaves them twice), file by file."""
    seen: set[str] = set()
    for path in found.files:
        table = _read(fs, path)
        keep = []
        for item, source in zip(
            table["item_id"].to_pylist(), table["source_uri"].to_pylist(), strict=True
        ):
            keep.append(source in found.sources and item not in seen)
            seen.add(item)
        yield table.filter(pa.array(keep, pa.bool_()))


TORN = "is cut short"


UNIT_COLUMNS = ["item_id", "source_uri", "frame_count", "status"]


def _scan(
    fs: AbstractFileSystem, path: str, schema: pa.Schema, key: str, masks: bool
) -> tuple[str | None, pa.Table | None]:
    """A part file's unit columns, its footer and key checked in the same read; else the
    problem that keeps it out."""
    try:
        with fs.open(path, "rb") as handle, ParquetFile(handle) as parquet:
            found = parquet.schema
            theirs = (found.metadata or {}).get(RESUME_KEY.encode(), b"none").decode()
            if theirs != key:
                return (
                    "was made by another spec, model, input snapshot or run date (resume key "
                    f"{theirs[:12]}, this run's {key[:12]})"
                ), None
            if not found.remove_metadata().equals(schema.remove_metadata()):
                return "has another schema", None
            columns = UNIT_COLUMNS + (["mask_uri"] if masks else [])
            return None, parquet.read(columns)
    except (OSError, pa.ArrowException) as err:
        if _store_failed(err):
            raise StorageError(
                f"{path}: an earlier attempt's staged rows cannot be read to resume from them "
                f"({err}); they are kept"
            ) from err
        return TORN, None


def _store_failed(err: BaseException) -> bool:
    """Whether a read failed in the store (access refused, throttled, a connection lost: fsspec's
    stores raise these with an errno), not in the file: Arrow's errors of a file cut short or
    corrupt carry none. A file no longer there is no store failure: there is nothing to keep."""
    if not isinstance(err, OSError) or isinstance(err, FileNotFoundError):
        return False
    refused = isinstance(err, PermissionError | ConnectionError | TimeoutError)
    return refused or err.errno is not None


def _whole_sources(
    tables: list[pa.Table], units_of: UnitsOf, masks: Collection[str] | None
) -> dict[str, int]:
    """Each source whose every planned unit the files' unit columns hold, and nothing else
    (with the mask each names, where `masks` are given; no error row), with its unit count."""
    seen: set[str] = set()
    staged: dict[str, list[str]] = {}
    frames: dict[str, int | None] = {}
    lacking: set[str] = set()  # sources with an error row, or a row naming a missing mask
    for table in tables:
        columns = [table[name].to_pylist() for name in UNIT_COLUMNS]
        named = table["mask_uri"].to_pylist() if masks is not None else [None] * len(table)
        for item, source, count, status, mask in zip(*columns, named, strict=True):
            if mask is not None and masks is not None and mask.rpartition("/")[2] not in masks:
                lacking.add(source)
            if status == STATUS_ERROR:
                lacking.add(source)
            if item not in seen:
                seen.add(item)
                staged.setdefault(source, []).append(item)
                frames[source] = count
    whole = {}
    for source, items in staged.items():
        if source not in lacking and units_of(source, frames[source]) == Units(
            len(items), token_sum(items)
        ):
            whole[source] = len(items)
    return whole


def _read(fs: AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as handle:
        return read_parquet(handle, columns)


def without_sources(table: pa.Table, sources: frozenset[str]) -> pa.Table:
    """A table of units (a listing block, a tile plan) less the rows of `sources`."""
    if not sources:
        return table
    done = pc.is_in(table["source_uri"], value_set=pa.array(sorted(sources), pa.string()))
    return table.filter(pc.invert(pc.fill_null(done, False)))
