"""The output table: one Arrow schema, declared once and versioned, and the rows that fill it."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1"
PARTITION_COLUMN = "run_date"  # Hive partition (run_date=YYYY-MM-DD/), not stored in the files

TOP_K_ENTRY = pa.struct(
    [
        pa.field("label_id", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ]
)

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_etag", pa.string()),
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
        pa.field("frame_index", pa.int32()),
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
        pa.field("label_id", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("top_k", pa.list_(pa.field("item", TOP_K_ENTRY, nullable=False))),
    ],
    metadata={"vision_ops.schema_version": SCHEMA_VERSION},
)

STATUS_OK = "ok"
STATUS_ERROR = "error"
# Columns the predictor adds to each batch for `classification_table` to nest.
TOP_K_IDS, TOP_K_SCORES = "top_k_label_id", "top_k_score"


def item_id(source_uri: str, frame_index: int | None = None) -> str:
    """A stable id for a unit: the same source location and offsets always give the same id."""
    unit = source_uri if frame_index is None else f"{source_uri}#frame={frame_index}"
    return hashlib.sha256(unit.encode()).hexdigest()[:32]


def label_names(ids: np.ndarray, labels: list[str] | None) -> np.ndarray:
    """Label text for class ids: the labels list where it has the id, else the id as text."""
    table = np.array(labels or [], dtype=object)
    names = np.array([str(i) for i in ids.reshape(-1)], dtype=object)
    known = (ids.reshape(-1) >= 0) & (ids.reshape(-1) < len(table))
    names[known] = table[ids.reshape(-1)[known]]
    return names.reshape(ids.shape)


def classification_table(
    batch: dict[str, np.ndarray], run_id: str, labels: list[str] | None = None
) -> pa.Table:
    """Predictor output (flat numpy columns) -> rows of PREDICTION_SCHEMA."""
    rows = len(batch["source_uri"])
    ok = np.asarray(batch["status"] == STATUS_OK, dtype=bool)
    ids, scores = batch[TOP_K_IDS].reshape(rows, -1), batch[TOP_K_SCORES].reshape(rows, -1)
    names = label_names(ids, labels)
    columns: dict[str, object] = {n: batch[n] for n in PREDICTION_SCHEMA.names if n in batch}
    columns["run_id"] = np.full(rows, run_id, dtype=object)
    columns["task"] = np.full(rows, "classification", dtype=object)
    columns["label_id"] = pa.array(ids[:, 0], pa.int32(), mask=~ok)
    columns["label"] = pa.array(names[:, 0], pa.string(), mask=~ok)
    columns["score"] = pa.array(scores[:, 0], pa.float32(), mask=~ok)
    columns["top_k"] = _top_k_lists(ok, ids, names, scores)
    arrays = [_column(columns, field, rows) for field in PREDICTION_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=PREDICTION_SCHEMA)


def _top_k_lists(
    ok: np.ndarray, ids: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> pa.Array:
    k = ids.shape[1]
    entries = pa.StructArray.from_arrays(
        [
            pa.array(ids[ok].reshape(-1), pa.int32()),
            pa.array(labels[ok].reshape(-1), pa.string()),
            pa.array(scores[ok].reshape(-1), pa.float32()),
        ],
        fields=list(TOP_K_ENTRY),
    )
    lengths = ok.astype(np.int64) * k
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    lists = pa.ListArray.from_arrays(offsets, entries, mask=pa.array(~ok))
    return lists.cast(PREDICTION_SCHEMA.field("top_k").type)


def _column(columns: dict[str, object], field: pa.Field, rows: int) -> pa.Array:
    if field.name not in columns:
        return pa.nulls(rows, field.type)
    values = columns[field.name]
    if isinstance(values, pa.Array):
        return values
    return pa.array(values, type=field.type, from_pandas=True)
