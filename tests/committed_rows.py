"""Committed runs made from a few rows through the real Parquet sink (no pipeline), for the
report's tests: every unit column filled with a default unless the row gives it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa

from vision_ops.schema import output_schema
from vision_ops.sink import ParquetSink

UNIT_DEFAULTS = {
    "model_name": "toy",
    "model_weights_sha256": "0" * 64,
    "status": "ok",
}


def commit_rows(
    root: Path,
    task: str,
    rows: list[dict[str, Any]],
    run_id: str,
    run_date: str = "2026-01-01",
    *,
    dicom: bool = False,
    tiles: bool = False,
    instance: str | None = None,
    details: dict[str, Any] | None = None,
    fields: tuple[pa.Field, ...] | None = None,
) -> None:
    """Commit `rows` (each with at least source_uri) as run `run_id` of the table at `root`;
    `fields`: the task's columns as sized for a model (an embedding's vector length)."""
    schema = output_schema(task, dicom=dicom, tiles=tiles, instance=instance, fields=fields)
    full = [
        UNIT_DEFAULTS | {"run_id": run_id, "task": task, "item_id": f"{run_id}-{index}"} | row
        for index, row in enumerate(rows)
    ]
    table = pa.Table.from_pylist(
        [{name: row.get(name) for name in schema.names} for row in full], schema=schema
    )
    sink = ParquetSink(str(root), run_id, dt.date.fromisoformat(run_date), schema)
    sink.write(table)
    sink.commit(details=details)


def top_k(*pairs: tuple[str, float]) -> list[dict[str, Any]]:
    """A classification row's top_k entries from (label, score) pairs."""
    return [
        {"label_id": i, "label": label, "score": score} for i, (label, score) in enumerate(pairs)
    ]


def classified(uri: str, *pairs: tuple[str, float]) -> dict[str, Any]:
    """An ok classification row of `uri` whose top-k are `pairs` (the first is its label)."""
    label, score = pairs[0]
    return {
        "source_uri": uri,
        "label": label,
        "label_id": 0,
        "score": score,
        "top_k": top_k(*pairs),
    }


def failed(uri: str, kind: str, message: str) -> dict[str, Any]:
    return {"source_uri": uri, "status": "error", "error_type": kind, "error_message": message}
