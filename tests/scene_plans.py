"""A scene plan held whole in one table, for tests of the planning's block functions on a
few scenes (a run plans in Ray tasks: vision_ops.pipeline.planning, with the same functions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from vision_ops.config import TilingSpec
from vision_ops.scenes import SceneSummary, cut_tiles, scene_rows, summarise_scenes
from vision_ops.storage import StorageOptions


@dataclass(frozen=True)
class TilePlan:
    units: pa.Table  # the listing's columns plus PLAN_FIELDS, one row per tile
    crs: Any  # the scenes' common rasterio CRS, or None for plain images
    bounds: tuple[float, float, float, float] | None  # all scenes, in that CRS


def plan_tiles(listing: pa.Table, tiling: TilingSpec, options: StorageOptions) -> TilePlan:
    """One unit per tile of each listed scene; a scene whose header cannot be read stays one
    unit carrying the reason (its error row)."""
    scenes = scene_rows(listing, tiling, options)
    summary = SceneSummary()
    summary.add(summarise_scenes(scenes, tiling))
    return TilePlan(cut_tiles(scenes, tiling), summary.common_crs(), summary.scene_bounds())
