"""Tallies: unit ids counted without holding them, for exactly-once checks and digests."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vision_ops.schema import item_id

BUCKETS = 1024  # sources are spread over this many buckets; a mismatch re-scans only its own
_MOD256 = 1 << 256
Listed = Iterable[str | tuple[str, tuple[int, int] | None]]  # a source, or (source, tile)


def hash64(text: str) -> int:
    """A 64-bit hash of a string (BLAKE2b), the same in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def token_sum(unit_ids: Iterable[str]) -> int:
    """Units' tokens (their ids' hash64) summed modulo 2**64: with their count, what tells one
    set of a source's units from another (a scene's tiles from its error row)."""
    return sum(hash64(unit) for unit in unit_ids) % (1 << 64)


def bucket_of(source_uri: str) -> int:
    """The bucket a source and all of its units (frames, tiles) are counted in."""
    return hash64(source_uri) % BUCKETS


def frame_token(unit_id: str, frame_count: int) -> int:
    """A frame's token carries its instance's frame count: rows that disagree on it differ."""
    return hash64(f"{unit_id}|frames={frame_count}")


@dataclass
class Tally:
    """Per bucket, how many unit tokens and their sum modulo 2**64. Two multisets of tokens
    with equal tallies are equal but for a chance of about 2**-64 per differing bucket; the
    tally takes fixed memory however many units are counted, in any order."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(BUCKETS, np.int64))
    sums: np.ndarray = field(default_factory=lambda: np.zeros(BUCKETS, np.uint64))

    def add(self, buckets: Sequence[int], tokens: Sequence[int], sign: int = 1) -> None:
        """Count `tokens` in their `buckets` (sign -1 takes them out again)."""
        where = np.asarray(buckets, dtype=np.int64)
        values = np.asarray(tokens, dtype=np.uint64)
        if sign < 0:
            values = np.zeros_like(values) - values  # the additive inverse modulo 2**64
        np.add.at(self.counts, where, sign)
        np.add.at(self.sums, where, values)

    def merge(self, other: Tally) -> Tally:
        with np.errstate(over="ignore"):
            return Tally(self.counts + other.counts, self.sums + other.sums)

    def differing(self, other: Tally) -> list[int]:
        """The buckets whose count or sum differ."""
        diff = (self.counts != other.counts) | (self.sums != other.sums)
        return [int(b) for b in np.flatnonzero(diff)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tally) and not self.differing(other)

    __hash__ = None  # type: ignore[assignment]


def listed_tally(listed: Listed) -> Tally:
    """The expected side: one token per listed source, or per planned tile."""
    buckets, tokens = [], []
    for entry in listed:
        uri, tile = (entry, None) if isinstance(entry, str) else entry
        buckets.append(bucket_of(uri))
        tokens.append(hash64(item_id(uri, tile=tile)))
    tally = Tally()
    tally.add(buckets, tokens)
    return tally


def row_tallies(table: pa.Table) -> tuple[Tally, Tally]:
    """The written side of a batch of rows, and what its frames change on the expected side.

    A row's token is its item id's hash; a frame of a multi-frame instance hashes its id with
    the instance's frame count. The listing expects one token per source; the row of frame 0
    of an instance of N frames turns that into the N frame tokens expected instead (learned
    from rows, as the reader is the one that counts frames)."""
    ids = table["item_id"].to_pylist()
    uris = table["source_uri"].to_pylist()
    counts = table["frame_count"].to_pylist() if "frame_count" in table.column_names else None
    frames = table["frame_index"].to_pylist() if "frame_index" in table.column_names else None
    written, adjust = Tally(), Tally()
    buckets = [bucket_of(uri) for uri in uris]
    tokens = []
    for index, (unit, uri) in enumerate(zip(ids, uris, strict=True)):
        count = counts[index] if counts is not None else None
        if count is None:
            tokens.append(hash64(unit))
            continue
        tokens.append(frame_token(unit, count))
        if frames is not None and frames[index] == 0:
            _expect_frames(adjust, uri, count, buckets[index])
    written.add(buckets, tokens)
    return written, adjust


def _expect_frames(adjust: Tally, uri: str, count: int, bucket: int) -> None:
    adjust.add([bucket], [hash64(item_id(uri))], sign=-1)
    frame_tokens = [frame_token(item_id(uri, frame), count) for frame in range(count)]
    adjust.add([bucket] * len(frame_tokens), frame_tokens)


class ExpectedUnits(Protocol):
    """The units a run must write, as a tally, and those of a few buckets by name."""

    def tally(self) -> Tally: ...

    def in_buckets(self, buckets: Collection[int]) -> Listed: ...


@dataclass(frozen=True)
class ListedUnits:
    """Expected units held in memory: a list of sources or (source, tile) pairs."""

    listed: Sequence[str | tuple[str, tuple[int, int] | None]]

    def tally(self) -> Tally:
        return listed_tally(self.listed)

    def in_buckets(self, buckets: Collection[int]) -> Listed:
        return [e for e in self.listed if bucket_of(e if isinstance(e, str) else e[0]) in buckets]


def expected_from(listed: Listed | ExpectedUnits) -> ExpectedUnits:
    """A list of sources as ExpectedUnits; ExpectedUnits as they are."""
    if hasattr(listed, "tally") and hasattr(listed, "in_buckets"):
        return listed  # type: ignore[return-value]
    return ListedUnits(list(listed))


# --- digests ---------------------------------------------------------------------------------


@dataclass
class MultisetDigest:
    """An order-independent digest of strings: the sum, modulo 2**256, of their SHA-256
    values (an additive multiset hash), hashed with the count. Parts computed apart add up."""

    total: int = 0
    count: int = 0

    def update(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.total += int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")
            self.count += 1
        self.total %= _MOD256

    def merge(self, other: MultisetDigest) -> None:
        self.total = (self.total + other.total) % _MOD256
        self.count += other.count

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.count}:{self.total:064x}".encode()).hexdigest()


def snapshot_line(uri: str, etag: str | None, size: int | None, mtime_us: int | None) -> str:
    """What the input snapshot digest takes of a listed source: URI and version identity
    (modification time in microseconds since the epoch)."""
    return f"{uri}|{(etag, size, mtime_us)}\n"


# --- a listing in blocks: one pass for its count, digest, tally and repeated URIs -------------

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("rows", pa.int64()),
        pa.field("counts", pa.list_(pa.int64())),
        pa.field("sums", pa.list_(pa.uint64())),
        pa.field("snapshot", pa.binary(32)),
        pa.field("uri_hashes", pa.list_(pa.uint64())),
    ]
)


def summarise_block(block: pa.Table) -> pa.Table:
    """One block of a listing (the listing schema) -> one row: its row count, the tally of
    its sources, its part of the input snapshot digest and its URIs' 64-bit hashes."""
    uris = block["source_uri"].to_pylist()
    uri_hashes = [hash64(uri) for uri in uris]
    tally = Tally()
    tally.add([h % BUCKETS for h in uri_hashes], [hash64(item_id(uri)) for uri in uris])
    versions = [
        block["source_etag"].to_pylist(),
        block["source_size"].to_pylist(),
        pc.cast(block["source_mtime"], pa.int64()).to_pylist(),
    ]
    snapshot = MultisetDigest()
    snapshot.update(snapshot_line(*line) for line in zip(uris, *versions, strict=True))
    return pa.Table.from_pylist(
        [
            {
                "rows": len(uris),
                "counts": tally.counts.tolist(),
                "sums": tally.sums.tolist(),
                "snapshot": snapshot.total.to_bytes(32, "big"),
                "uri_hashes": uri_hashes,
            }
        ],
        schema=SUMMARY_SCHEMA,
    )


def rows_in_buckets(block: pa.Table, buckets: Collection[int]) -> pa.Table:
    """The rows of a listing block whose source falls in one of `buckets`."""
    keep = [bucket_of(uri) in buckets for uri in block["source_uri"].to_pylist()]
    return block.filter(pa.array(keep, pa.bool_()))


def rows_with_hashes(block: pa.Table, hashes: Collection[int]) -> pa.Table:
    """The rows of a listing block whose URI hashes to one of `hashes`."""
    keep = [hash64(uri) in hashes for uri in block["source_uri"].to_pylist()]
    return block.filter(pa.array(keep, pa.bool_()))


def rows_without(block: pa.Table, uris: Collection[str]) -> pa.Table:
    """The rows of a listing block whose URI is not one of `uris`."""
    named = pa.array(sorted(uris), pa.string())
    return block.filter(pc.invert(pc.is_in(block["source_uri"], value_set=named)))


def rows_outside(block: pa.Table, folder: str) -> pa.Table:
    """The rows of a listing block whose URI is not under `folder` (a URI ending in /)."""
    return block.filter(pc.invert(pc.starts_with(block["source_uri"], folder)))


@dataclass
class ListingSummary:
    """What one pass over a listing's blocks (`summarise_block`) adds up to: the inputs'
    count, the expected units' tally, the input snapshot digest and, where asked for, the
    URIs named more than once (as hashes: a repeat, or two URIs whose hashes collide)."""

    count: int = 0
    tally: Tally = field(default_factory=Tally)
    snapshot: MultisetDigest = field(default_factory=MultisetDigest)
    repeats: RepeatFinder | None = None

    def add(self, summaries: pa.Table) -> None:
        """Rows of SUMMARY_SCHEMA."""
        for row in range(summaries.num_rows):
            self.count += summaries["rows"][row].as_py()
            part = Tally(
                np.asarray(summaries["counts"][row].values, dtype=np.int64),
                np.asarray(summaries["sums"][row].values, dtype=np.uint64),
            )
            self.tally = self.tally.merge(part)
            total = int.from_bytes(summaries["snapshot"][row].as_py(), "big")
            self.snapshot.merge(MultisetDigest(total, summaries["rows"][row].as_py()))
            if self.repeats is not None:
                self.repeats.add(np.asarray(summaries["uri_hashes"][row].values, np.uint64))


@dataclass
class RepeatFinder:
    """Which 64-bit hashes occur more than once among many, in bounded memory: up to
    `spill_rows` hashes are held in memory; past that, all go to `partitions` files on local
    disk by their top bits, and each file is checked on its own."""

    spill_rows: int = 1_000_000
    partitions: int = 64
    _held: list[np.ndarray] = field(default_factory=list)
    _held_rows: int = 0
    _folder: tempfile.TemporaryDirectory[str] | None = None

    def add(self, hashes: np.ndarray) -> None:
        self._held.append(np.asarray(hashes, dtype=np.uint64))
        self._held_rows += len(hashes)
        if self._held_rows > self.spill_rows:
            self._spill()

    def repeated(self) -> set[int]:
        """The hashes seen more than once (the folder of spilled files is removed)."""
        try:
            return {h for part in self._parts() for h in _repeats(part)}
        finally:
            if self._folder is not None:
                self._folder.cleanup()

    def _parts(self) -> Iterator[np.ndarray]:
        if self._folder is None:
            yield np.concatenate(self._held) if self._held else np.zeros(0, np.uint64)
            return
        self._spill()
        for index in range(self.partitions):
            path = Path(self._folder.name) / f"{index}.u64"
            if path.exists():
                yield np.fromfile(path, dtype=np.uint64)

    def _spill(self) -> None:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="vision-ops-repeats-")
        hashes = np.concatenate(self._held) if self._held else np.zeros(0, np.uint64)
        self._held, self._held_rows = [], 0
        shift = np.uint64(64 - max(1, (self.partitions - 1).bit_length()))
        parts = (hashes >> shift).astype(np.int64)
        for index in np.unique(parts):
            with open(Path(self._folder.name) / f"{index}.u64", "ab") as handle:
                hashes[parts == index].tofile(handle)


def _repeats(hashes: np.ndarray) -> list[int]:
    ordered = np.sort(hashes)
    same = ordered[1:] == ordered[:-1]
    return [int(h) for h in np.unique(ordered[1:][same])]
