"""COCO RLE windows read without decoding the whole mask, against pycocotools' full decode."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from vision_ops.rle import run_counts, window_of


def encoded(mask: np.ndarray) -> dict[str, object]:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def test_run_counts_are_the_runs_pycocotools_encodes() -> None:
    mask = np.zeros((7, 5), np.uint8)
    mask[2:7, 1] = mask[0:3, 2] = mask[6, 4] = 1  # a run that goes on into the next column
    runs = [7 + 2, 5 + 3, 4 + 7 + 6, 1]  # column-major: 0s, 1s, 0s, ...
    assert run_counts(encoded(mask)["counts"]) == runs  # type: ignore[arg-type]
    big = np.zeros((300, 300), np.uint8)
    big[100:250, 40:260] = 1  # runs past 5 bits, and differences of either sign
    flat = big.flatten(order="F")
    assert sum(run_counts(encoded(big)["counts"])) == flat.size  # type: ignore[arg-type]
    starts = np.cumsum([0, *run_counts(encoded(big)["counts"])])  # type: ignore[arg-type]
    assert all(flat[a:b].all() for a, b in zip(starts[1::2], starts[2::2], strict=False))


@pytest.mark.parametrize("seed", range(6))
def test_a_window_is_the_full_decodes_window_cut_at_the_masks_edge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(50):
        height, width = (int(v) for v in rng.integers(1, 80, 2))
        mask = rng.random((height, width)) < rng.random()
        rle = encoded(mask)
        x, y = (int(v) for v in rng.integers(0, (width + 4, height + 4)))
        tall, wide = (int(v) for v in rng.integers(1, 60, 2))
        window = window_of(rle, x, y, tall, wide)
        assert window.dtype == np.uint8
        np.testing.assert_array_equal(window, mask[y : y + tall, x : x + wide])
