"""Tallies: order-independent, exact for multisets, frames learned from rows, repeats found in
bounded memory; a refused commit re-scans the differing buckets and names the units."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from vision_ops.schema import PREDICTION_SCHEMA, item_id
from vision_ops.sink import CommitRefused, ParquetSink, units_sum_digest
from vision_ops.tally import (
    BUCKETS,
    ListedUnits,
    MultisetDigest,
    RepeatFinder,
    Tally,
    bucket_of,
    listed_tally,
    row_tallies,
    summarise_block,
)

DATE = dt.date(2026, 11, 24)
URIS = [f"s3://b/img{i:03d}.jpg" for i in range(40)]


def unit_rows(units: list[tuple[str, int | None, int | None]]) -> pa.Table:
    """Prediction rows for (source, frame index, frame count) units."""
    columns = {
        "run_id": ["r"] * len(units),
        "item_id": [item_id(uri, frame) for uri, frame, _ in units],
        "source_uri": [uri for uri, _, _ in units],
        "frame_index": [frame for _, frame, _ in units],
        "frame_count": [count for _, _, count in units],
        "model_name": ["m"] * len(units),
        "model_weights_sha256": ["h"] * len(units),
        "task": ["classification"] * len(units),
        "status": ["ok"] * len(units),
    }
    return pa.Table.from_arrays(
        [pa.array(columns.get(f.name, [None] * len(units)), f.type) for f in PREDICTION_SCHEMA],
        schema=PREDICTION_SCHEMA,
    )


def test_a_tally_is_order_independent_and_tells_multisets_apart() -> None:
    shuffled = URIS.copy()
    random.Random(0).shuffle(shuffled)
    assert listed_tally(URIS) == listed_tally(shuffled)
    assert listed_tally(URIS) != listed_tally(URIS[:-1])
    assert listed_tally(URIS) != listed_tally([*URIS, URIS[0]])  # a unit twice
    differing = listed_tally(URIS).differing(listed_tally([*URIS[1:], "s3://b/other.jpg"]))
    assert differing == sorted({bucket_of(URIS[0]), bucket_of("s3://b/other.jpg")})
    assert listed_tally(URIS).counts.sum() == 40 and len(listed_tally(URIS).counts) == BUCKETS


def test_taking_tokens_out_again_leaves_the_empty_tally() -> None:
    tally = Tally()
    tally.add([3, 3, 7], [2**64 - 1, 5, 12])
    tally.add([3, 3, 7], [2**64 - 1, 5, 12], sign=-1)
    assert tally == Tally()
    assert tally.counts.tolist() == [0] * BUCKETS and tally.sums.tolist() == [0] * BUCKETS


def test_rows_of_whole_sources_tally_as_their_listing() -> None:
    written, frames = row_tallies(unit_rows([(uri, None, None) for uri in URIS]))
    assert written == listed_tally(URIS) and frames == Tally()


def test_frame_zero_turns_the_listed_source_into_its_frames() -> None:
    listed = listed_tally(["s3://b/ct.dcm", "s3://b/photo.jpg"])
    frames = [("s3://b/ct.dcm", f, 3) for f in (2, 0, 1)]
    written, adjust = row_tallies(unit_rows([*frames, ("s3://b/photo.jpg", None, None)]))
    assert listed.merge(adjust) == written
    short, short_adjust = row_tallies(unit_rows(frames[:2]))  # frame 1 missing
    assert listed_tally(["s3://b/ct.dcm"]).merge(short_adjust) != short
    disputed = unit_rows([("s3://b/ct.dcm", 0, 2), ("s3://b/ct.dcm", 1, 3)])
    disputed_written, disputed_adjust = row_tallies(disputed)
    assert listed_tally(["s3://b/ct.dcm"]).merge(disputed_adjust) != disputed_written


def test_multiset_digest_adds_up_in_any_order_and_split() -> None:
    whole = MultisetDigest()
    whole.update(URIS)
    left, right = MultisetDigest(), MultisetDigest()
    left.update(URIS[25:])
    right.update(reversed(URIS[:25]))
    left.merge(right)
    assert left.hexdigest() == whole.hexdigest() == units_sum_digest(reversed(URIS))
    assert units_sum_digest(URIS[1:]) != whole.hexdigest()
    assert units_sum_digest([*URIS, URIS[0]]) != whole.hexdigest()


@pytest.mark.parametrize("spill_rows", [1_000_000, 7])
def test_repeat_finder_names_the_repeated_hashes_in_memory_or_spilled(spill_rows: int) -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 100, dtype=np.uint64) * np.uint64(2)
    repeated = {int(hashes[3]), int(hashes[50]), int(hashes[99])}
    finder = RepeatFinder(spill_rows=spill_rows, partitions=4)
    for chunk in np.array_split(np.concatenate([hashes, hashes[[3, 50, 99, 50]]]), 9):
        finder.add(chunk)
    assert finder.repeated() == repeated
    assert (finder._folder is not None) is (spill_rows == 7)
    assert RepeatFinder().repeated() == set()


def test_summarise_block_counts_tallies_and_digests_a_listing_block() -> None:
    block = pa.table(
        {
            "source_uri": URIS[:3],
            "source_etag": ["e0", None, "e2"],
            "source_size": pa.array([1, 2, None], pa.int64()),
            "source_mtime": pa.array([None] * 3, pa.timestamp("us", tz="UTC")),
        }
    )
    row = summarise_block(block).to_pylist()[0]
    assert row["rows"] == 3
    assert Tally(np.array(row["counts"]), np.array(row["sums"], np.uint64)) == listed_tally(
        URIS[:3]
    )
    assert len(row["uri_hashes"]) == 3 and len(set(row["uri_hashes"])) == 3


# --- the commit: a mismatch names units, as the in-memory check did -----------------------------


def sink_with(tmp_path: Path, units: list[tuple[str, int | None, int | None]]) -> ParquetSink:
    sink = ParquetSink(str(tmp_path), "r", DATE, PREDICTION_SCHEMA, rows_per_file=7)
    sink.write(unit_rows(units))
    return sink


def test_equal_tallies_commit(tmp_path: Path) -> None:
    sink = sink_with(tmp_path, [(uri, None, None) for uri in reversed(URIS)])
    assert sink.commit(ListedUnits(URIS)).rows == 40


def test_a_mismatch_names_missing_unexpected_and_twice(tmp_path: Path) -> None:
    written = [(uri, None, None) for uri in [*URIS[2:], "s3://b/x.jpg", URIS[5]]]
    sink = sink_with(tmp_path, written)
    with pytest.raises(CommitRefused) as err:
        sink.commit(ListedUnits(URIS))
    message = str(err.value)
    missing = sorted(item_id(uri) for uri in URIS[:2])
    assert f"2 missing (e.g. {missing})" in message
    assert f"1 unexpected (e.g. {[item_id('s3://b/x.jpg')]})" in message
    assert f"1 twice (e.g. {[item_id(URIS[5])]})" in message
    assert not (tmp_path / "_manifests").exists()


def test_a_mismatch_in_many_buckets_names_examples_from_a_few(tmp_path: Path) -> None:
    many = [f"s3://b/{i}.jpg" for i in range(200)]
    sink = sink_with(tmp_path, [])
    with pytest.raises(CommitRefused) as err:
        sink.commit(ListedUnits(many))
    buckets = sorted({bucket_of(uri) for uri in many})
    named = sum(bucket_of(uri) in buckets[:16] for uri in many)  # the sources re-scanned
    assert str(err.value).startswith(f"refusing to commit: {named} missing (e.g. ")
    assert str(err.value).endswith(f"(in 16 of the {len(buckets)} buckets that differ)")


def test_frames_learned_from_rows_and_disputed_counts(tmp_path: Path) -> None:
    listed = ListedUnits(["s3://b/ct.dcm", "s3://b/photo.jpg"])
    whole = sink_with(
        tmp_path / "a",
        [("s3://b/ct.dcm", f, 3) for f in (1, 0, 2)] + [("s3://b/photo.jpg", None, None)],
    )
    assert whole.commit(listed).rows == 4
    disputed = sink_with(tmp_path / "b", [("s3://b/ct.dcm", 0, 2), ("s3://b/ct.dcm", 1, 3)])
    with pytest.raises(CommitRefused, match=r"disagree on the frame count of \['s3://b/ct.dcm'\]"):
        disputed.commit(["s3://b/ct.dcm"])
    short = sink_with(tmp_path / "c", [("s3://b/ct.dcm", 0, 3), ("s3://b/ct.dcm", 2, 3)])
    with pytest.raises(CommitRefused) as err:
        short.commit(["s3://b/ct.dcm"])
    assert f"1 missing (e.g. {[item_id('s3://b/ct.dcm', 1)]})" in str(err.value)


def test_planned_tiles_are_expected_units(tmp_path: Path) -> None:
    tiles = [("s3://b/scene.tif", (x, 0)) for x in (0, 256, 512)]
    table = unit_rows([("s3://b/scene.tif", None, None)] * 3)
    table = table.set_column(
        table.schema.get_field_index("item_id"),
        "item_id",
        pa.array([item_id(uri, tile=tile) for uri, tile in tiles]),
    )
    sink = ParquetSink(str(tmp_path), "r", DATE, PREDICTION_SCHEMA)
    sink.write(table)
    assert sink.commit(ListedUnits(tiles)).rows == 3
