"""The output tables: the unit columns every task has, each task's columns and row builder
(named by its record in vision_ops.tasks), declared once and versioned."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = "2"  # 2: frame_count, and the DICOM columns of a DICOM job
SCHEMA_VERSION_KEY = "vision_ops.schema_version"
TASK_KEY = "vision_ops.task"  # the schema's task, in its metadata (and every file's footer)
PARTITION_COLUMN = "run_date"  # Hive partition (run_date=YYYY-MM-DD/), not stored in the files
# Which of two committed runs is the later: the later run date, then the greater run id (as
# text). Incremental runs, drift and embedding search take "the latest run" in this order.
RUN_ORDER = (PARTITION_COLUMN, "run_id")
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"  # a tile with no data: recorded, never sent to the model

# Columns every row has, whatever the task: run, source, unit, image, model and status.
UNIT_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("source_etag", pa.string()),
    pa.field("source_size", pa.int64()),
    pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
    pa.field("frame_index", pa.int32()),
    pa.field("frame_count", pa.int32()),
    pa.field("tile_x", pa.int32()),
    pa.field("tile_y", pa.int32()),
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_weights_sha256", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
]

# Columns a DICOM job adds (input.dicom set): the identifying tags users join on, the window
# the frame was shown with, and the spec's allow-listed extra tags. Never patient identifiers
# unless the spec's phi_tags names them.
DICOM_FIELDS = [
    pa.field("study_instance_uid", pa.string()),
    pa.field("series_instance_uid", pa.string()),
    pa.field("sop_instance_uid", pa.string()),
    pa.field("modality", pa.string()),
    pa.field("body_part_examined", pa.string()),
    pa.field("instance_number", pa.int32()),
    pa.field("window_center", pa.float64()),
    pa.field("window_width", pa.float64()),
    pa.field("dicom_tags", pa.map_(pa.string(), pa.string())),
]

# Columns a tiling job adds (input.tiling set): the tile's size and data coverage, its scene,
# and its footprint as a GeoParquet geometry (WKB, in the scene's CRS; pixel coordinates for a
# plain image) with a bbox covering column, and the WGS84 position of its centre.
BBOX = pa.struct([pa.field(name, pa.float64()) for name in ("xmin", "ymin", "xmax", "ymax")])
TILE_FIELDS = [
    pa.field("tile_size", pa.int32()),
    pa.field("valid_fraction", pa.float32()),
    pa.field("scene_width", pa.int32()),
    pa.field("scene_height", pa.int32()),
    pa.field("crs", pa.string()),
    pa.field("footprint", pa.binary()),
    pa.field("footprint_bbox", BBOX),
    pa.field("center_lon", pa.float64()),
    pa.field("center_lat", pa.float64()),
]

TOP_K_ENTRY = pa.struct(
    [
        pa.field("label_id", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ]
)
DETECTION_ENTRY = pa.struct(
    [
        *TOP_K_ENTRY,
        pa.field("x_min", pa.float32(), nullable=False),
        pa.field("y_min", pa.float32(), nullable=False),
        pa.field("x_max", pa.float32(), nullable=False),
        pa.field("y_max", pa.float32(), nullable=False),
    ]
)

# Mask R-CNN adds each box's mask as COCO run-length encoding (pycocotools decodes it) in the
# source image's pixels; Keypoint R-CNN adds its named keypoints.
MASK_RLE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])
KEYPOINT = pa.struct(
    [
        pa.field("name", pa.string()),
        pa.field("x", pa.float32()),
        pa.field("y", pa.float32()),
        pa.field("score", pa.float32()),
    ]
)
# The 17 COCO person keypoints, in Keypoint R-CNN's order (torchvision's weights meta).
COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
INSTANCE_FIELDS = {
    "mask": pa.field("mask", MASK_RLE),
    "keypoints": pa.field("keypoints", pa.list_(pa.field("item", KEYPOINT, nullable=False))),
}

# A detection in a tiled scene also gives its box in the scene's CRS and its centre in WGS84.
TILE_DETECTION_ENTRY = pa.struct(
    [
        *DETECTION_ENTRY,
        *[pa.field(f"crs_{name}", pa.float64()) for name in ("x_min", "y_min", "x_max", "y_max")],
        pa.field("lon", pa.float64()),
        pa.field("lat", pa.float64()),
    ]
)


def latest_row_sql(partition: str, dated: bool = True) -> str:
    """DuckDB's QUALIFY clause keeping, of each `partition` (columns), the row of the latest run
    (RUN_ORDER: the latest run date, then the greatest run id; `dated=False`: a relation
    without the run date, by run id alone)."""
    order = ", ".join(f"{name} DESC" for name in RUN_ORDER if dated or name != PARTITION_COLUMN)
    return f" QUALIFY row_number() OVER (PARTITION BY {partition} ORDER BY {order}) = 1"


def run_order(run: Mapping[str, Any]) -> tuple[Any, ...]:
    """A committed run's manifest (or a row of it) -> its sort key, in RUN_ORDER."""
    return tuple(run[name] for name in RUN_ORDER)


def named_or_latest(runs: Sequence[dict[str, Any]], run_id: str | None) -> dict[str, Any] | None:
    """Of committed runs' manifests (oldest first, `run_order`), the one of this id, else the
    latest; None where there is none."""
    matching = [run for run in runs if run_id in (None, run["run_id"])]
    return matching[-1] if matching else None


def declared_schema(task: str, task_fields: Sequence[pa.Field]) -> pa.Schema:
    """A task's table: the unit columns, then its own; its name and the version in the
    metadata."""
    metadata = {SCHEMA_VERSION_KEY: SCHEMA_VERSION, TASK_KEY: task}
    return pa.schema([*UNIT_FIELDS, *task_fields], metadata=metadata)


def task_of(schema: pa.Schema) -> str:
    """The task a table's schema was declared for (its metadata says, never its columns)."""
    task = (schema.metadata or {}).get(TASK_KEY.encode())
    if task is None:
        raise ValueError(f"expected a vision-ops output schema with {TASK_KEY!r} in its metadata")
    return str(task.decode())


FRACTION_ENTRY = pa.struct(
    [
        pa.field("label_id", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("fraction", pa.float32(), nullable=False),
    ]
)

# The tasks' own columns (their records in vision_ops.tasks name them).
CLASSIFICATION_FIELDS = (
    pa.field("label_id", pa.int32()),
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("top_k", pa.list_(pa.field("item", TOP_K_ENTRY, nullable=False))),
)
DETECTION_FIELDS = (
    pa.field("num_detections", pa.int32()),
    pa.field("detections", pa.list_(pa.field("item", DETECTION_ENTRY, nullable=False))),
)
SEGMENTATION_FIELDS = (
    pa.field("label_id", pa.int32()),
    pa.field("label", pa.string()),
    pa.field("fraction", pa.float32()),
    pa.field("class_fractions", pa.list_(pa.field("item", FRACTION_ENTRY, nullable=False))),
    pa.field("mask_uri", pa.string()),
)
PREDICTION_SCHEMA = declared_schema("classification", CLASSIFICATION_FIELDS)
DETECTION_SCHEMA = declared_schema("detection", DETECTION_FIELDS)
SEGMENTATION_SCHEMA = declared_schema("segmentation", SEGMENTATION_FIELDS)


def task_schema(task: str) -> pa.Schema:
    """The schema of a registered task's table (no DICOM or tile columns)."""
    from vision_ops.tasks import get_task

    return get_task(task).schema


def output_schema(
    task: str,
    dicom: bool = False,
    tiles: bool = False,
    instance: str | None = None,
    fields: Sequence[pa.Field] | None = None,
) -> pa.Schema:
    """The table of a job: its task's schema, with the DICOM or the tile columns after the
    unit columns when the job reads DICOM or tiles scenes, and a detection entry that also
    holds the box's `instance` output (`mask` or `keypoints`) where the model gives one.
    `fields`: the task's columns as sized for the job's model (Task.job_fields), where given."""
    schema = task_schema(task)
    if fields is not None:
        schema = declared_schema(task, fields)
    extra = [*(DICOM_FIELDS if dicom else []), *(TILE_FIELDS if tiles else [])]
    task_fields = [_entry_with(field, tiles, instance) for field in schema][len(UNIT_FIELDS) :]
    return pa.schema([*UNIT_FIELDS, *extra, *task_fields], metadata=schema.metadata)


def _entry_with(field: pa.Field, tiles: bool, instance: str | None) -> pa.Field:
    if field.name != "detections" or not (tiles or instance):
        return field
    entry = list(TILE_DETECTION_ENTRY if tiles else DETECTION_ENTRY)
    if instance:
        entry.append(INSTANCE_FIELDS[instance])
    return field.with_type(pa.list_(pa.field("item", pa.struct(entry), nullable=False)))


# Seconds a stage spent on a batch, spread over its rows: carried beside the rows to the
# driver, summed into the run's manifest, never written to the table.
STAGE_PREFIX = "_stage_seconds_"
# An actor's start-up (seconds loading its model, compiling it; epoch seconds when its
# __init__ began and ended) on the rows of its first batch, NaN on every other batch's: stage
# columns too, so they travel as they do, and the driver's run statistics take them apart.
STARTUP_PREFIX = f"{STAGE_PREFIX}startup_"


def stage_times(rows: int, seconds: float) -> np.ndarray:
    return np.full(rows, seconds / max(rows, 1), dtype=np.float64)


# Columns predictors add to a batch for the row builders below to nest.
TOP_K_IDS, TOP_K_SCORES = "top_k_label_id", "top_k_score"
# Per row, a float32 (boxes, 6) array: label_id, score, x_min, y_min, x_max, y_max.
DETECTIONS = "detection_array"
# Per row, the kept boxes' instance outputs: masks as JSON (a list of COCO RLEs), or
# keypoints as a float32 (boxes, K, 3) array of x, y, score.
INSTANCE_COLUMN = "detection_instances"
# Per row, the class mask (uint8 (H, W), the model input's pixels) and a float32 (classes, 2)
# array of label_id, fraction of the pixels, largest first.
SEGMENT_MASK, SEGMENT_FRACTIONS = "segment_mask", "segment_fractions"


class TableBuilder(Protocol):
    """A task's rows from its predictor's batch: the run's `schema` (its task's, with the
    job's DICOM / tile columns) names the task (`task_of`); `labels` name the class ids."""

    def __call__(
        self,
        batch: dict[str, np.ndarray],
        run_id: str,
        labels: list[str] | None = None,
        schema: pa.Schema | None = None,
    ) -> pa.Table: ...


def item_id(
    source_uri: str, frame_index: int | None = None, tile: tuple[int, int] | None = None
) -> str:
    """A stable id for a unit: the same source location and offsets always give the same id
    (a frame of a DICOM instance, or a tile's (x, y) offset in its scene)."""
    unit = source_uri
    if frame_index is not None:
        unit += f"#frame={int(frame_index)}"
    if tile is not None:
        unit += f"#tile={int(tile[0])},{int(tile[1])}"
    return hashlib.sha256(unit.encode()).hexdigest()[:32]


def label_names(ids: np.ndarray, labels: list[str] | None) -> np.ndarray:
    """Label text for class ids: the labels list where it has the id, else the id as text."""
    table = np.array(labels or [], dtype=object)
    flat = ids.reshape(-1).astype(np.int64)
    names = np.array([str(i) for i in flat], dtype=object)
    known = (flat >= 0) & (flat < len(table))
    names[known] = table[flat[known]]
    return names.reshape(ids.shape)


def classification_table(
    batch: dict[str, np.ndarray],
    run_id: str,
    labels: list[str] | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """Classifier output (flat numpy columns) -> rows of the classification schema."""
    rows = len(batch["source_uri"])
    ok = _ok_mask(batch)
    ids, scores = batch[TOP_K_IDS].reshape(rows, -1), batch[TOP_K_SCORES].reshape(rows, -1)
    names = label_names(ids, labels)
    schema = schema or PREDICTION_SCHEMA
    columns = _unit_columns(batch, run_id, task_of(schema), schema)
    columns["label_id"] = pa.array(ids[:, 0], pa.int32(), mask=~ok)
    columns["label"] = pa.array(names[:, 0], pa.string(), mask=~ok)
    columns["score"] = pa.array(scores[:, 0], pa.float32(), mask=~ok)
    entries = [ids[ok].reshape(-1), names[ok].reshape(-1), scores[ok].reshape(-1)]
    columns["top_k"] = _nested_lists(ok, ok.astype(np.int64) * ids.shape[1], entries, TOP_K_ENTRY)
    return with_stage_times(_table(columns, schema, rows), batch)


def detection_table(
    batch: dict[str, np.ndarray],
    run_id: str,
    labels: list[str] | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """Detector output (one (boxes, 6) array per row) -> rows of the detection schema."""
    rows = len(batch["source_uri"])
    ok = _ok_mask(batch)
    arrays = [np.asarray(a, dtype=np.float32).reshape(-1, 6) for a in batch[DETECTIONS]]
    counts = np.array([len(a) if good else 0 for a, good in zip(arrays, ok, strict=True)])
    boxes = np.concatenate([a for a, good in zip(arrays, ok, strict=True) if good] or [_no_boxes()])
    ids = boxes[:, 0].astype(np.int32)
    entries = [ids, label_names(ids, labels), *boxes[:, 1:].T]
    schema = schema or DETECTION_SCHEMA
    columns = _unit_columns(batch, run_id, task_of(schema), schema)
    columns["num_detections"] = pa.array(counts, pa.int32(), mask=~ok)
    entry_type = schema.field("detections").type.value_type
    named = _instance_children(batch, ok, entry_type, labels)
    columns["detections"] = _nested_lists(ok, counts, entries, entry_type, named)
    return with_stage_times(_table(columns, schema, rows), batch)


def _instance_children(
    batch: dict[str, np.ndarray], ok: np.ndarray, entry_type: pa.StructType, labels: object
) -> dict[str, pa.Array]:
    """The entry's mask or keypoints child, one value per kept box of the ok rows."""
    names = {field.name for field in entry_type}
    instances = [
        value for value, good in zip(batch.get(INSTANCE_COLUMN, []), ok, strict=False) if good
    ]
    if "mask" in names:
        masks = [rle for text in instances for rle in json.loads(text)]
        return {"mask": pa.array(masks, MASK_RLE)}
    if "keypoints" in names:
        points = [_keypoints(box) for array in instances for box in np.asarray(array)]
        return {"keypoints": pa.array(points, INSTANCE_FIELDS["keypoints"].type)}
    return {}


def _keypoints(box: np.ndarray) -> list[dict[str, object]]:
    names = COCO_KEYPOINT_NAMES if len(box) == len(COCO_KEYPOINT_NAMES) else []
    return [
        {"name": names[k] if names else str(k), "x": x, "y": y, "score": score}
        for k, (x, y, score) in enumerate(box.tolist())
    ]


def segmentation_table(
    batch: dict[str, np.ndarray],
    run_id: str,
    labels: list[str] | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """Segmenter output (class fractions per row; masks already written) -> rows."""
    rows = len(batch["source_uri"])
    ok = _ok_mask(batch)
    fractions = [
        np.asarray(f, dtype=np.float32).reshape(-1, 2) if good else np.zeros((0, 2), np.float32)
        for f, good in zip(batch[SEGMENT_FRACTIONS], ok, strict=True)
    ]
    flat = np.concatenate(fractions) if fractions else np.zeros((0, 2), np.float32)
    counts = np.array([len(f) for f in fractions], dtype=np.int64)
    dominant = np.array([f[0] if len(f) else (0, 0) for f in fractions], dtype=np.float32)
    dominant_ids = dominant.reshape(-1, 2)[:, 0].astype(np.int32)
    has = ok & (counts > 0)
    schema = schema or SEGMENTATION_SCHEMA
    columns = _unit_columns(batch, run_id, task_of(schema), schema)
    columns["label_id"] = pa.array(dominant_ids, pa.int32(), mask=~has)
    columns["label"] = pa.array(label_names(dominant_ids, labels), pa.string(), mask=~has)
    columns["fraction"] = pa.array(dominant.reshape(-1, 2)[:, 1], pa.float32(), mask=~has)
    ids = flat[:, 0].astype(np.int32)
    entries = [ids, label_names(ids, labels), flat[:, 1]]
    columns["class_fractions"] = _nested_lists(ok, counts, entries, FRACTION_ENTRY)
    return with_stage_times(_table(columns, schema, rows), batch)


def _no_boxes() -> np.ndarray:
    return np.zeros((0, 6), dtype=np.float32)


def rows_of_status(table: pa.Table, status: str) -> int:
    """How many of the rows have this `status` (STATUS_OK, STATUS_ERROR, STATUS_SKIPPED)."""
    return int(pc.sum(pc.equal(table["status"], status)).as_py() or 0)


def _ok_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(batch["status"] == STATUS_OK, dtype=bool)


def _unit_columns(
    batch: dict[str, np.ndarray], run_id: str, task: str, schema: pa.Schema
) -> dict[str, object]:
    """The unit columns of a batch's rows (run, source, unit, image, model, status; DICOM and
    tile columns where the schema has them)."""
    rows = len(batch["source_uri"])
    given = {f.name: _nones_for_nan(batch[f.name], f.type) for f in schema if f.name in batch}
    columns: dict[str, object] = dict(given)
    if "footprint" in given and "footprint_bbox" in schema.names:
        columns["footprint_bbox"] = [_wkb_bbox(wkb) for wkb in given["footprint"]]
    if "dicom_tags" in given:  # JSON text between stages, a map in the table
        columns["dicom_tags"] = [
            None if text is None else list(json.loads(text).items()) for text in given["dicom_tags"]
        ]
    columns["run_id"] = np.full(rows, run_id, dtype=object)
    columns["task"] = np.full(rows, task, dtype=object)
    return columns


def _wkb_bbox(wkb: bytes | None) -> dict[str, float] | None:
    """xmin, ymin, xmax, ymax of a one-ring WKB polygon (header: 1 + 4 + 4 + 4 bytes)."""
    if wkb is None:
        return None
    points = np.frombuffer(wkb, dtype="<f8", offset=13).reshape(-1, 2)
    low, high = points.min(axis=0), points.max(axis=0)
    return {"xmin": low[0], "ymin": low[1], "xmax": high[0], "ymax": high[1]}


def _nested_lists(
    ok: np.ndarray,
    lengths: np.ndarray,
    entries: list[np.ndarray],
    entry_type: pa.StructType,
    named: dict[str, pa.Array] | None = None,
) -> pa.Array:
    """A list<struct> column: row i holds lengths[i] consecutive entries; null where not ok.
    Fields of `entry_type` past the given `entries` come from `named`, else are null (filled
    in by a later step, as the scene merge does)."""
    fields = list(entry_type)
    children = [pa.array(values, f.type) for values, f in zip(entries, fields, strict=False)]
    count = len(children[0]) if children else 0
    children += [
        (named or {}).get(f.name, pa.nulls(count, f.type)) for f in fields[len(children) :]
    ]
    structs = pa.StructArray.from_arrays(children, fields=fields)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    lists = pa.ListArray.from_arrays(offsets, structs, mask=pa.array(~ok))
    return lists.cast(pa.list_(pa.field("item", entry_type, nullable=False)))


def _table(columns: dict[str, object], schema: pa.Schema, rows: int) -> pa.Table:
    arrays = [_column(columns, field, rows) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def with_stage_times(table: pa.Table, batch: dict[str, np.ndarray]) -> pa.Table:
    """The rows plus the batch's stage-time columns (for the driver's run statistics)."""
    for name in sorted(n for n in batch if n.startswith(STAGE_PREFIX)):
        table = table.append_column(name, pa.array(batch[name], pa.float64()))
    return table


def _column(columns: dict[str, object], field: pa.Field, rows: int) -> pa.Array:
    if field.name not in columns:
        return pa.nulls(rows, field.type)
    values = columns[field.name]
    if isinstance(values, pa.Array):
        return values
    return pa.array(values, type=field.type, from_pandas=True)


def _nones_for_nan(values: np.ndarray, kind: pa.DataType) -> np.ndarray:
    """A batch's column with its nulls as None: Ray Data hands on a column that was all None
    in a block (Arrow's null type) as float NaN. Arrow would read NaN as null for numbers and
    strings, but gives b"" for binary (a footprint's WKB), and the columns read here first
    (the footprint, the DICOM tags' JSON) would take NaN for a value."""
    if values.dtype.kind == "f" and not pa.types.is_floating(kind) and np.isnan(values).all():
        return np.full(len(values), None, dtype=object)
    return values
