"""Scene tiles planned in Ray tasks as the listing streams, and the per-scene merge beside them.

Planning runs in two passes over the listing, both in Ray tasks, none holding tiles on the
driver:

1. the header pass: each listing block's scenes are opened (header only, plus the reduced
   read a percentile stretch needs) and each becomes one *scene row*: its size, affine, CRS,
   value range, tile count and the tally of its tiles (`vision_ops.scenes.scene_rows`). The
   scene rows stay in Ray's object store (one row per scene, not per tile).
2. the summary pass: each block of scene rows adds up to one small row (tiles, tally, each CRS
   with its first scene, bounds) that the driver sums in fixed memory. The one-CRS check and
   the table's bounds come from it, so a run mixing CRSs is refused before inference starts.

The tiles themselves are cut lazily from the scene rows (`cut_tiles`, a map over the scene
blocks) and stream into the read stage; the commit's expected units are the summary's tally,
and a mismatch's buckets are re-cut in tasks. Detection merges each scene's tile rows in Ray
too, as a stream: one merge actor (`SceneMerge`) holds a scene's rows until its last tile is
in, then merges them (`merge_scene`), so the driver receives merged rows only, scene by scene
as inference goes. A shuffle (a groupby on the scene) would hold every row until inference
ends: merged rows become durable as the run goes, so a killed run resumes with the scenes it
finished.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from vision_ops.config import TilingSpec
from vision_ops.georef import Transform
from vision_ops.pipeline.listing import BLOCKWISE, Listing
from vision_ops.resume import Units, without_sources
from vision_ops.scenes import (
    SceneSummary,
    cut_tiles,
    merge_scene,
    parquet_metadata,
    scene_rows,
    scene_transforms,
    summarise_scenes,
)
from vision_ops.storage import StorageOptions
from vision_ops.tally import Listed, Tally, rows_in_buckets

SCENES_PER_TASK = 64  # scene headers a planning task reads (on its own threads)


@dataclass(frozen=True)
class SceneFacts:
    """What the driver holds of each scene, one entry per scene (never per tile)."""

    tiles: dict[str, int]  # its units, as planned: what resuming and the merge count
    transforms: dict[str, Transform]  # its pixel -> CRS affine where readable: the merge's
    id_sums: dict[str, int]  # its units' ids (tally.token_sum): what resuming compares

    def units(self, uri: str) -> Units:
        """A scene's units as planned (none where the plan has no such scene)."""
        return Units(self.tiles.get(uri, 0), self.id_sums.get(uri, 0))


def scene_facts(scenes: ray.data.Dataset) -> SceneFacts:
    """The scene rows' tile counts, their ids' sums and affines, in one pass."""
    facts = SceneFacts({}, {}, {})
    names = ["source_uri", "scene_tiles", "scene_token_sum", "scene_transform"]
    for table in _tables(scenes.select_columns(names)):
        uris, counts = table["source_uri"].to_pylist(), table["scene_tiles"].to_pylist()
        facts.tiles.update(zip(uris, counts, strict=True))
        facts.id_sums.update(zip(uris, table["scene_token_sum"].to_pylist(), strict=True))
        facts.transforms.update(scene_transforms(table))
    return facts


@dataclass(frozen=True)
class ScenePlan:
    """A run's scenes as scene rows in the object store and the summary of one pass over
    them. As the commit's ExpectedUnits: one unit per tile (per unreadable scene, its row)."""

    scenes: ray.data.Dataset  # one row per scene: the listing's columns plus SCENE_FIELDS
    tiling: TilingSpec
    summary: SceneSummary
    crs: Any  # the scenes' common rasterio CRS, or None for plain images
    bounds: tuple[float, float, float, float] | None
    cut_from: SceneFacts | None = field(default=None, repr=False)  # the facts of a larger plan

    @property
    def count(self) -> int:
        """The tiles (units) of the plan."""
        return self.summary.tiles

    @functools.cached_property
    def facts(self) -> SceneFacts:
        """Each scene's tile count and affine, read from the scene rows in one pass when first
        asked for (by resuming, by the merge); a plan cut from another keeps the other's."""
        return self.cut_from or scene_facts(self.scenes)

    def units(self) -> ray.data.Dataset:
        """The tiles, cut in Ray tasks from the scene rows as the read stage asks for them."""
        cut = functools.partial(cut_tiles, tiling=self.tiling)
        return self.scenes.map_batches(cut, batch_format="pyarrow", batch_size=None)

    def tally(self) -> Tally:
        return self.summary.tally

    def in_buckets(self, buckets: Collection[int]) -> Listed:
        select = functools.partial(rows_in_buckets, buckets=frozenset(buckets))
        cut = functools.partial(cut_tiles, tiling=self.tiling)
        found = self.scenes.map_batches(select, **BLOCKWISE).map_batches(cut, **BLOCKWISE)
        return [
            (uri, None if x is None else (x, y))
            for table in _tables(found)
            for uri, x, y in zip(
                table["source_uri"].to_pylist(),
                table["tile_x"].to_pylist(),
                table["tile_y"].to_pylist(),
                strict=True,
            )
        ]

    def without(self, sources: frozenset[str], units: int) -> ScenePlan:
        """The plan less the scenes in `sources` (whose `units` an earlier attempt holds)."""
        if not sources:
            return self
        drop = functools.partial(without_sources, sources=sources)
        scenes = self.scenes.map_batches(drop, **BLOCKWISE)
        summary = SceneSummary(
            self.summary.scenes - len(sources),
            self.summary.tiles - units,
            self.summary.tally,
            self.summary.first,
            self.summary.bounds,
        )
        return ScenePlan(scenes, self.tiling, summary, self.crs, self.bounds, self.facts)

    def parquet_metadata(self) -> dict[bytes, bytes]:
        """GeoParquet metadata for the table's `footprint` column."""
        return parquet_metadata(self.crs, self.bounds)

    def merged(self, rows: ray.data.Dataset, seam_overlap: float) -> ray.data.Dataset:
        """Detection rows merged per scene (SceneMerge), seams merged as on one machine."""
        return rows.map_batches(
            SceneMerge,
            fn_constructor_kwargs={
                "tiles": self.facts.tiles,
                "transforms": self.facts.transforms,
                "seam_overlap": seam_overlap,
                "crs_wkt": self.crs.to_wkt() if self.crs is not None else None,
            },
            compute=ActorPoolStrategy(size=1),
            # sorting a few rows a call: no core is held from the read tasks and the predictors
            num_cpus=0,
            batch_format="pyarrow",
            batch_size=None,
        )


class SceneMerge:
    """The per-scene merge as a keyed stream, in one actor that every tile row of the run passes
    through: a scene's rows wait until all its tiles are in (`tiles`: each scene's units, as
    planned; a unit counted once however often it comes), then leave merged (`merge_scene`).
    It holds the rows of the scenes in flight only, not of the run."""

    def __init__(
        self,
        tiles: dict[str, int],
        transforms: dict[str, Transform],
        seam_overlap: float,
        crs_wkt: str | None,
    ) -> None:
        self.tiles = tiles
        self.merge = functools.partial(
            merge_scene, seam_overlap=seam_overlap, crs_wkt=crs_wkt, transforms=transforms
        )
        self.waiting: dict[str, list[pa.Table]] = {}
        self.units_in: dict[str, set[str]] = {}

    def __call__(self, rows: pa.Table) -> pa.Table:
        finished = [self.merge(scene) for scene in self._finished_scenes(rows)]
        return pa.concat_tables(finished) if finished else rows.slice(0, 0)

    def _finished_scenes(self, rows: pa.Table) -> list[pa.Table]:
        """Each scene whose last tile `rows` brings: all its rows, no longer held here."""
        positions: dict[str, list[int]] = {}
        uris, unit_ids = rows["source_uri"].to_pylist(), rows["item_id"].to_pylist()
        for position, (uri, unit) in enumerate(zip(uris, unit_ids, strict=True)):
            units = self.units_in.setdefault(uri, set())
            if unit not in units:  # a unit that comes again (a retried task) is kept once
                units.add(unit)
                positions.setdefault(uri, []).append(position)
        finished = []
        for uri, taken in positions.items():
            self.waiting.setdefault(uri, []).append(rows.take(taken))
            if len(self.units_in[uri]) >= self.tiles[uri]:  # planned with the rows: known
                del self.units_in[uri]
                finished.append(pa.concat_tables(self.waiting.pop(uri)))
        return finished


def plan_scenes(listing: Listing, tiling: TilingSpec, options: StorageOptions) -> ScenePlan:
    """The header pass and the summary pass (see the module docstring); raises SceneError for
    scenes in more than one CRS before any tile is read."""
    header = functools.partial(scene_rows, tiling=tiling, options=options)
    scenes = listing.dataset.map_batches(
        header, batch_format="pyarrow", batch_size=SCENES_PER_TASK
    ).materialize()
    summary = SceneSummary()
    summarise = functools.partial(summarise_scenes, tiling=tiling)
    for table in _tables(scenes.map_batches(summarise, **BLOCKWISE)):
        summary.add(table)
    crs = summary.common_crs()
    return ScenePlan(scenes, tiling, summary, crs, summary.bounds if crs is not None else None)


def _tables(dataset: ray.data.Dataset) -> Any:
    return dataset.iter_batches(batch_format="pyarrow", batch_size=None)
