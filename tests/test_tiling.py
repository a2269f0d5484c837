"""The tiling arithmetic against a table of hand-worked cases, and its invariants."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vision_ops.tiling import EDGE_POLICIES, TilingError, Window, tile_offsets, tile_windows


@pytest.mark.parametrize(
    ("length", "size", "overlap", "edge", "offsets"),
    [
        # stride 256: exact fit
        (1024, 256, 0, "shift", [0, 256, 512, 768]),
        (1024, 256, 0, "pad", [0, 256, 512, 768]),
        (1024, 256, 0, "drop", [0, 256, 512, 768]),
        # 1000 px: 3 whole tiles and 232 left over
        (1000, 256, 0, "shift", [0, 256, 512, 744]),
        (1000, 256, 0, "pad", [0, 256, 512, 768]),
        (1000, 256, 0, "drop", [0, 256, 512]),
        # overlap 32 -> stride 224: n = 1 + ceil((1000 - 256) / 224) = 5
        (1000, 256, 32, "shift", [0, 224, 448, 672, 744]),
        (1000, 256, 32, "pad", [0, 224, 448, 672, 896]),
        (1000, 256, 32, "drop", [0, 224, 448, 672]),
        # a scene smaller than one tile
        (100, 256, 0, "shift", [0]),
        (100, 256, 0, "pad", [0]),
        (100, 256, 0, "drop", []),
        # exactly one tile
        (256, 256, 64, "shift", [0]),
    ],
)
def test_tile_offsets_table(length, size, overlap, edge, offsets) -> None:
    assert tile_offsets(length, size, overlap, edge) == offsets


def test_tile_windows_are_the_product_of_the_axes_row_by_row() -> None:
    windows = tile_windows(width=500, height=300, size=256, overlap=0, edge="shift")
    assert windows == [
        Window(0, 0, 256, 256),
        Window(0, 244, 256, 256),
        Window(44, 0, 256, 256),
        Window(44, 244, 256, 256),
    ]


@pytest.mark.parametrize(
    ("size", "overlap", "edge", "message"),
    [
        (0, 0, "shift", "tile size"),
        (256, 256, "shift", "overlap"),
        (256, -1, "pad", "overlap"),
        (256, 0, "wrap", "edge: expected one of shift, pad, drop"),
    ],
)
def test_impossible_tilings_are_refused(size, overlap, edge, message) -> None:
    with pytest.raises(TilingError, match=message):
        tile_offsets(1000, size, overlap, edge)


@given(
    length=st.integers(1, 5000),
    size=st.integers(1, 600),
    overlap_fraction=st.floats(0, 0.9),
    edge=st.sampled_from(EDGE_POLICIES),
)
def test_coverage_and_bounds(length, size, overlap_fraction, edge) -> None:
    """shift and pad cover every pixel; shift stays inside the scene when it can; drop never
    runs past the edge; offsets are sorted and distinct."""
    overlap = min(int(size * overlap_fraction), size - 1)
    offsets = tile_offsets(length, size, overlap, edge)
    assert offsets == sorted(set(offsets))
    covered = set()
    for offset in offsets:
        covered.update(range(offset, min(offset + size, length)))
    if edge in ("shift", "pad"):
        assert covered == set(range(length))
    if edge == "drop" or (edge == "shift" and length >= size):
        assert all(offset >= 0 and offset + size <= length for offset in offsets)
    if offsets and edge != "shift":
        assert all(b - a == size - overlap for a, b in itertools.pairwise(offsets))
