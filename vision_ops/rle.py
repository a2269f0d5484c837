"""COCO run-length encoded masks read without decoding the whole image: a tile's window of a
scene's mask (a Mask R-CNN box's, in scene pixels) at the window's size."""

from __future__ import annotations

from typing import Any

import numpy as np


def run_counts(counts: str) -> list[int]:
    """The run lengths of COCO's compressed counts string (pycocotools' rleFrString): each
    number in 6-bit groups offset from "0", 5 bits of value and a "more" bit, sign-extended from
    the last group's top value bit; from the third on, a difference from the count two before."""
    found: list[int] = []
    at = 0
    while at < len(counts):
        value, shift, more = 0, 0, True
        while more:
            group = ord(counts[at]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            at, shift = at + 1, shift + 5
            if not more and group & 0x10:
                value |= -1 << shift
        found.append(value + found[-2] if len(found) > 2 else value)
    return found


def window_of(rle: dict[str, Any], x: int, y: int, height: int, width: int) -> np.ndarray:
    """The uint8 window at (x, y), `height` x `width` and cut at the mask's edge, of the mask
    `rle` ({size, counts}, counts compressed), as `decode(rle)[y:y+height, x:x+width]` but
    never the whole mask: only the window's columns (COCO RLE is column-major) are laid out."""
    mask_height, mask_width = (int(v) for v in rle["size"])
    columns = max(0, min(x + width, mask_width) - x)
    first, last = x * mask_height, (x + columns) * mask_height  # the columns' flat offsets
    flat = np.zeros(columns * mask_height, np.uint8)
    start = 0
    for index, count in enumerate(run_counts(rle["counts"])):
        if start >= last:  # past the window's columns
            break
        end = start + count
        if index % 2 and end > first:  # odd runs are the mask's 1s
            flat[max(start, first) - first : min(end, last) - first] = 1
        start = end
    return np.ascontiguousarray(flat.reshape(columns, mask_height).T[y : y + height])
