"""Tiling: a scene's pixel grid cut into model-sized windows with overlap, as pure arithmetic."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

EdgePolicy = Literal["shift", "pad", "drop"]
EDGE_POLICIES: tuple[EdgePolicy, ...] = ("shift", "pad", "drop")


class TilingError(ValueError):
    """Tile size, overlap or edge policy that cannot tile a scene."""


@dataclass(frozen=True, order=True)
class Window:
    """A tile's pixels in the scene: rows row_off..row_off+height, cols col_off..col_off+width.
    Where a padded tile runs past the scene, its width/height still give the full tile size."""

    row_off: int
    col_off: int
    height: int
    width: int


def tile_offsets(length: int, size: int, overlap: int, edge: EdgePolicy) -> list[int]:
    """Offsets of the tiles along one axis of `length` pixels.

    With stride s = size - overlap:
      drop:  n = 1 + floor((length - size) / s) tiles at i * s (none when length < size); the
             pixels after the last whole tile are not covered.
      pad:   n = 1 + ceil(max(length - size, 0) / s) tiles at i * s; the last ones run past the
             edge and the reader pads them with nodata.
      shift: the same n tiles, the last moved back to end at the edge, min(i * s, length - size),
             so every tile lies inside the scene (a scene smaller than a tile: one tile at 0,
             padded).
    """
    _check(length, size, overlap, edge)
    stride = size - overlap
    if edge == "drop":
        count = 1 + (length - size) // stride if length >= size else 0
        return [i * stride for i in range(count)]
    count = 1 + math.ceil(max(length - size, 0) / stride)
    if edge == "pad":
        return [i * stride for i in range(count)]
    return sorted({min(i * stride, max(length - size, 0)) for i in range(count)})


def tiled_length(length: int, size: int, overlap: int, edge: EdgePolicy) -> int:
    """How far from 0 an axis's pixels and tiles reach: past the scene's edge where a tile is
    padded (`pad`, or `shift` on a scene smaller than a tile)."""
    return max([length, *(offset + size for offset in tile_offsets(length, size, overlap, edge))])


def tile_windows(
    width: int, height: int, size: int, overlap: int = 0, edge: EdgePolicy = "shift"
) -> list[Window]:
    """Every tile of a width x height scene, row by row (the product of the axes' offsets)."""
    rows = tile_offsets(height, size, overlap, edge)
    cols = tile_offsets(width, size, overlap, edge)
    return [Window(row, col, size, size) for row in rows for col in cols]


def _check(length: int, size: int, overlap: int, edge: str) -> None:
    if length <= 0:
        raise TilingError(f"expected a scene of at least one pixel, found {length}")
    if size <= 0:
        raise TilingError(f"tile size: expected a positive number of pixels, found {size}")
    if not 0 <= overlap < size:
        raise TilingError(f"overlap: expected 0 <= overlap < tile size {size}, found {overlap}")
    if edge not in EDGE_POLICIES:
        raise TilingError(f"edge: expected one of {', '.join(EDGE_POLICIES)}, found {edge!r}")


def tile_window(row: Mapping[str, Any]) -> Window | None:
    """A tile row's window of its scene (its tile_x, tile_y, tile_size); None for a unit that
    is its whole image."""
    if row.get("tile_x") is None or not row.get("tile_size"):
        return None
    size = int(row["tile_size"])
    return Window(row_off=int(row["tile_y"]), col_off=int(row["tile_x"]), height=size, width=size)
