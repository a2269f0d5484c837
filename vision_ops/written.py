"""What a run has written, counted as its rows come, and the exactly-once check of it.

A sink (Parquet or Iceberg) adds each row table to a `WrittenRows`; at the commit,
`WrittenRows.check` compares the rows' unit tallies with the listing's (equal tallies: each
listed unit once, in fixed memory), and where they differ re-reads the differing buckets to
name what is missing, unexpected or there twice.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vision_ops.errors import EXIT_FAILED, VisionOpsError
from vision_ops.schema import STATUS_OK, STATUS_SKIPPED, item_id, rows_of_status
from vision_ops.tally import ExpectedUnits, Listed, MultisetDigest, Tally, row_tallies

MAX_RESCAN_BUCKETS = 16  # a refused commit names examples from at most this many buckets
UNITS_DIGEST_METHOD = "sha256-sum"  # how `units_digest` is computed (absent: sorted ids)
# (item id, source URI, frame count) of written rows: what a re-scan of the differing buckets reads
UnitRows = list[tuple[str, str, int | None]]


class CommitRefused(VisionOpsError, RuntimeError):
    """The rows are not exactly the listed units once each; nothing was committed."""

    exit_code = EXIT_FAILED


def expected_units(listed: Listed, frame_counts: Mapping[str, int]) -> set[str]:
    """The unit ids a run must write: one per listed source or planned tile, or one per frame
    of a source its reader found to hold `frame_counts[uri]` frames (multi-frame DICOM)."""
    expected: set[str] = set()
    for entry in listed:
        uri, tile = (entry, None) if isinstance(entry, str) else entry
        if tile is not None:
            expected.add(item_id(uri, tile=tile))
            continue
        count = frame_counts.get(uri)
        if count is None:
            expected.add(item_id(uri))
        else:
            expected.update(item_id(uri, frame) for frame in range(count))
    return expected


def check_units(listed: Listed, written: Iterable[tuple[str, str, int | None]]) -> None:
    """The exact check, in memory, of `written` rows (item id, source, frame count) against
    the `listed` units: no frame count disputed, then each unit once."""
    frame_counts: dict[str, int] = {}
    conflicts: set[str] = set()
    ids = []
    for unit, uri, count in written:
        ids.append(unit)
        if count is not None and frame_counts.setdefault(uri, count) != count:
            conflicts.add(uri)
    if conflicts:
        some = sorted(conflicts)[:3]
        raise CommitRefused(f"refusing to commit: rows disagree on the frame count of {some}")
    check_exactly_once(expected_units(listed, frame_counts), ids)


def check_exactly_once(expected: set[str], written: list[str]) -> None:
    """Anti-join both ways, and no unit twice; CommitRefused naming a few of each problem."""
    seen: set[str] = set()
    twice: set[str] = set()
    for item in written:
        (twice if item in seen else seen).add(item)
    missing, unexpected = expected - seen, seen - expected
    if missing or unexpected or twice:
        parts = [
            f"{len(found)} {what} (e.g. {sorted(found)[:3]})"
            for what, found in (("missing", missing), ("unexpected", unexpected), ("twice", twice))
            if found
        ]
        raise CommitRefused("refusing to commit: " + "; ".join(parts))


@dataclass
class WrittenRows:
    """The rows a run has written so far: counts by status, unit tallies, the units' digest and
    the masks rows name."""

    rows: int = 0
    ok: int = 0
    skipped: int = 0  # tiles with no data, recorded and never sent to the model
    masks_named: int = 0
    units: Tally = field(default_factory=Tally)  # the rows' unit tokens
    frames: Tally = field(default_factory=Tally)  # what the rows' frames add to the expected
    ids_digest: MultisetDigest = field(default_factory=MultisetDigest)

    @property
    def errors(self) -> int:
        return self.rows - self.ok - self.skipped

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.ok += rows_of_status(table, STATUS_OK)
        self.skipped += rows_of_status(table, STATUS_SKIPPED)
        units, frames = row_tallies(table)
        self.units, self.frames = self.units.merge(units), self.frames.merge(frames)
        self.ids_digest.update(table["item_id"].to_pylist())
        if "mask_uri" in table.column_names:
            self.masks_named += table.num_rows - table["mask_uri"].null_count

    def counts(self) -> dict[str, Any]:
        """What a manifest (or a snapshot summary) records of the rows."""
        return {
            "rows": self.rows,
            "ok": self.ok,
            "errors": self.errors,
            "skipped": self.skipped,
            "units_digest": self.ids_digest.hexdigest(),
            "units_digest_method": UNITS_DIGEST_METHOD,
        }

    def check(
        self,
        listed: ExpectedUnits | None,
        rescan: Callable[[Collection[int]], UnitRows],
        masks_staged: int,
    ) -> None:
        """CommitRefused unless the rows are the `listed` units once each (`rescan` reads the
        written rows of some buckets back) and every mask a row names was staged."""
        if listed is not None:
            self._check_tally(listed, rescan)
        if self.masks_named != masks_staged:
            raise CommitRefused(
                f"refusing to commit: {self.masks_named} rows name a mask, "
                f"{masks_staged} masks were staged"
            )

    def _check_tally(
        self, listed: ExpectedUnits, rescan: Callable[[Collection[int]], UnitRows]
    ) -> None:
        differing = listed.tally().merge(self.frames).differing(self.units)
        if not differing:
            return
        scanned = set(differing[:MAX_RESCAN_BUCKETS])
        try:
            check_units(listed.in_buckets(scanned), rescan(scanned))
        except CommitRefused as err:
            if len(scanned) < len(differing):
                raise CommitRefused(
                    f"{err} (in {len(scanned)} of the {len(differing)} buckets that differ)"
                ) from None
            raise
        raise CommitRefused(
            f"refusing to commit: the unit tallies differ in {len(differing)} bucket(s), "
            "yet their units re-read show no difference"
        )
