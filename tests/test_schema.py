"""The declared output schema: its shape, its rows, and its documentation in the README."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from vision_ops.schema import (
    PARTITION_COLUMN,
    PREDICTION_SCHEMA,
    STATUS_ERROR,
    STATUS_OK,
    TOP_K_IDS,
    TOP_K_SCORES,
    classification_table,
    item_id,
    label_names,
    output_schema,
)
from vision_ops.tasks import TASKS

README = Path(__file__).parents[1] / "README.md"


def test_every_column_is_documented_in_the_readme() -> None:
    documented = {
        line.split("|")[1].strip().strip("`")
        for line in README.read_text().splitlines()
        if line.startswith("| `")
    }
    for task in TASKS:
        schema = output_schema(task, dicom=True, tiles=True)
        assert set(schema.names) | {PARTITION_COLUMN} <= documented


def test_item_id_is_stable_and_distinguishes_units() -> None:
    assert item_id("s3://b/a.jpg") == item_id("s3://b/a.jpg")
    assert len(item_id("s3://b/a.jpg")) == 32
    assert item_id("s3://b/a.jpg") != item_id("s3://b/a.jpg", frame_index=0)


def test_label_names_fall_back_to_ids() -> None:
    ids = np.array([[2, 0], [5, -1]])
    np.testing.assert_array_equal(label_names(ids, ["a", "b", "c"]), [["c", "a"], ["5", "-1"]])


def test_classification_rows_nest_top_k_and_null_errors() -> None:
    batch = {
        "source_uri": np.array(["s3://b/1.jpg", "s3://b/2.jpg"], dtype=object),
        "item_id": np.array(["i1", "i2"], dtype=object),
        "status": np.array([STATUS_OK, STATUS_ERROR], dtype=object),
        "error_type": np.array([None, "CorruptImage"], dtype=object),
        "model_name": np.array(["m", "m"], dtype=object),
        "model_weights_sha256": np.array(["h", "h"], dtype=object),
        TOP_K_IDS: np.array([[1, 0], [-1, -1]], dtype=np.int32),
        TOP_K_SCORES: np.array([[0.75, 0.25], [np.nan, np.nan]], dtype=np.float32),
    }
    table = classification_table(batch, "run-1", ["cat", "dog"])
    assert table.schema == PREDICTION_SCHEMA
    ok, error = table.to_pylist()
    assert (ok["label_id"], ok["label"], ok["score"]) == (1, "dog", 0.75)
    assert ok["top_k"] == [
        {"label_id": 1, "label": "dog", "score": 0.75},
        {"label_id": 0, "label": "cat", "score": 0.25},
    ]
    assert (error["label"], error["score"], error["top_k"]) == (None, None, None)
    assert error["error_type"] == "CorruptImage" and error["run_id"] == "run-1"
    assert error["frame_index"] is None and pa.types.is_int32(table.schema.field("tile_x").type)


def test_segmentation_rows_take_the_dominant_class_and_keep_every_fraction() -> None:
    from vision_ops.schema import SEGMENT_FRACTIONS, segmentation_table

    batch = {
        "source_uri": np.array(["a", "b", "c"], dtype=object),
        "item_id": np.array(["1", "2", "3"], dtype=object),
        "status": np.array(["ok", "error", "ok"], dtype=object),
        "model_name": np.array(["m"] * 3, dtype=object),
        "model_weights_sha256": np.array(["h"] * 3, dtype=object),
        SEGMENT_FRACTIONS: np.array(
            [
                np.array([[2, 0.75], [0, 0.25]], np.float32),
                np.zeros((0, 2), np.float32),
                np.array([[1, 1.0]], np.float32),
            ],
            dtype=object,
        ),
    }
    rows = segmentation_table(batch, "r", ["x", "y", "z"]).to_pylist()
    assert [(r["label"], r["fraction"]) for r in rows] == [("z", 0.75), (None, None), ("y", 1.0)]
    assert [e["label"] for e in rows[0]["class_fractions"]] == ["z", "x"]
    assert rows[1]["class_fractions"] is None and rows[1]["mask_uri"] is None
