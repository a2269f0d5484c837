"""Scoring against ground truth: classification metrics equal scikit-learn's on the same
labels; detection mAP equals pycocotools run directly on the same JSON; metrics land as a
Parquet table per run."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from vision_ops.cli import EXIT_OK, main
from vision_ops.evaluate import (
    EvaluationError,
    classification_truth,
    evaluate_run,
    read_metrics,
)
from vision_ops.schema import DETECTION_SCHEMA, PREDICTION_SCHEMA, item_id
from vision_ops.sink import ParquetSink, committed_run
from vision_ops.tasks import get_task

DATE = dt.date(2026, 11, 24)
CLASSES = ["cat", "dog", "fox"]
# (true class, predicted top-3) per image; None: an error row.
CASES = [
    ("cat", ["cat", "dog", "fox"]),
    ("cat", ["dog", "cat", "fox"]),
    ("cat", ["cat", "fox", "dog"]),
    ("dog", ["dog", "cat", "fox"]),
    ("dog", ["fox", "cat", "dog"]),
    ("dog", None),
    ("fox", ["fox", "dog", "cat"]),
    ("fox", ["cat", "dog", "fox"]),
]


def commit(
    table_uri: Path,
    schema: pa.Schema,
    rows: list[dict],
    run_id: str = "r1",
    details: dict | None = None,
) -> None:
    base = {"run_id": run_id, "model_name": "m", "model_weights_sha256": "h"}
    table = pa.Table.from_pylist([base | row for row in rows], schema=schema)
    sink = ParquetSink(str(table_uri), run_id, DATE, schema)
    sink.write(table)
    sink.commit([row["source_uri"] for row in rows], details)


def classification_rows() -> list[dict]:
    rows = []
    for index, (truth, top) in enumerate(CASES):
        uri = f"file:///data/{truth}/img{index}.jpg"
        row = {"source_uri": uri, "item_id": item_id(uri), "task": "classification"}
        if top is None:
            rows.append(row | {"status": "error", "error_type": "CorruptImage"})
            continue
        entries = [
            {"label_id": CLASSES.index(c), "label": c, "score": 0.5 - i / 10}
            for i, c in enumerate(top)
        ]
        rows.append(row | {"status": "ok", "label": top[0], "top_k": entries})
    return rows


def test_classification_metrics_equal_scikit_learns(tmp_path: Path) -> None:
    table = tmp_path / "table"
    commit(table, PREDICTION_SCHEMA, classification_rows())
    metrics = evaluate_run(str(table), "", "imagefolder")
    value = {(m["metric"], m["label"], m["predicted"]): m["value"] for m in metrics.to_pylist()}
    truth = [t for t, _ in CASES]
    predicted = [top[0] if top else "(error)" for _, top in CASES]
    assert value[("accuracy", None, None)] == pytest.approx(accuracy_score(truth, predicted))
    assert value[("top5_accuracy", None, None)] == pytest.approx(7 / 8)  # all but the error
    assert (value[("evaluated", None, None)], value[("error_rows", None, None)]) == (8, 1)
    overall = tuple(name for name, label, _ in value if label is None)
    assert overall == get_task("classification").metrics  # what evaluate.min may name
    precision, recall, _, _ = precision_recall_fscore_support(
        truth, predicted, labels=CLASSES, zero_division=0
    )
    for index, label in enumerate(CLASSES):
        assert value[("precision", label, None)] == pytest.approx(precision[index])
        assert value[("recall", label, None)] == pytest.approx(recall[index])
    matrix = confusion_matrix(truth, predicted, labels=CLASSES)
    for i, t in enumerate(CLASSES):
        for j, p in enumerate(CLASSES):
            assert value.get(("confusion", t, p), 0) == matrix[i, j]
    stored = read_metrics(str(table), committed_run(str(table), "r1"))
    assert stored is not None and stored.equals(metrics)
    from vision_ops.report import build_report, render_html, render_text

    report = build_report(str(table))
    assert report.metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert "against ground truth: accuracy 0.5000" in render_text(report)
    assert "top5_accuracy 0.8750" in render_html(report)


def test_a_rerun_is_not_shown_with_the_scores_of_the_commit_it_replaced(tmp_path: Path) -> None:
    """The metrics are kept by run id; a rerun of r1 replaces its rows, and the report and the
    trend then show no score for r1 until the new commit is evaluated."""
    from vision_ops.report import build_report
    from vision_ops.trend import trend

    table = tmp_path / "table"
    commit(table, PREDICTION_SCHEMA, classification_rows())
    evaluate_run(str(table), "", "imagefolder")
    assert build_report(str(table)).metrics["accuracy"] == pytest.approx(0.5)
    assert trend(str(table))[-1].metrics["accuracy"] == pytest.approx(0.5)
    everything_right = [
        row | {"label": row["source_uri"].split("/")[4]} if row["status"] == "ok" else row
        for row in classification_rows()
    ]
    commit(table, PREDICTION_SCHEMA, everything_right)  # the rerun of r1
    manifest = committed_run(str(table), "r1")
    assert read_metrics(str(table), manifest) is None
    assert build_report(str(table)).metrics == {} and trend(str(table))[-1].metrics == {}
    evaluate_run(str(table), "", "imagefolder")
    assert build_report(str(table)).metrics["accuracy"] == pytest.approx(7 / 8)


def test_a_run_that_kept_fewer_than_five_labels_gives_no_top5_accuracy(tmp_path: Path) -> None:
    """The manifest's task settings (top_k 3 here, as the rows hold): top-5 accuracy was
    top-3's under its name. A run of top_k 5 over a 3-class model gives it (every class kept)."""
    for top_k, gives in ((3, False), (5, True)):
        table = tmp_path / f"top{top_k}"
        settings = {"task_settings": {"kind": "classification", "top_k": top_k}}
        commit(table, PREDICTION_SCHEMA, classification_rows(), details=settings)
        metrics = evaluate_run(str(table), "", "imagefolder").to_pylist()
        overall = [m["metric"] for m in metrics if m["label"] is None]
        assert ("top5_accuracy" in overall) is gives
        assert {"accuracy", "evaluated", "error_rows"} <= set(overall)
    foreign = {"task_settings": {"kind": "classification", "top_k": 3, "later_field": 1}}
    commit(tmp_path / "foreign", PREDICTION_SCHEMA, classification_rows(), details=foreign)
    metrics = evaluate_run(str(tmp_path / "foreign"), "", "imagefolder")  # no pydantic error
    assert "top5_accuracy" in metrics["metric"].to_pylist()  # settings it cannot read: all


def test_a_labels_table_and_the_cli(tmp_path: Path, capsys) -> None:
    table = tmp_path / "table"
    commit(table, PREDICTION_SCHEMA, classification_rows())
    labels = tmp_path / "labels.csv"
    lines = ["uri,label"] + [f"file:///data/{t}/img{i}.jpg,{t}" for i, (t, _) in enumerate(CASES)]
    labels.write_text("\n".join(lines[:5]) + "\n")  # the first four images only
    args = ["evaluate", str(table), "--truth", str(labels), "--truth-format", "table"]
    assert main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "accuracy: 0.7500" in out and "evaluated: 4" in out  # 3 of the 4 right
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class\nx,y\n")
    with pytest.raises(EvaluationError, match="expected columns uri and label"):
        evaluate_run(str(table), str(bad), "table")
    missing = tmp_path / "missing.csv"  # (raw OSError text, exit 1)
    with pytest.raises(EvaluationError, match=f"^{missing}: not found$"):
        evaluate_run(str(table), str(missing), "table")
    header_only = tmp_path / "header.csv"  # (was "expected columns uri and label")
    header_only.write_text("uri,label\n")
    with pytest.raises(EvaluationError, match="no rows; expected a uri and a label on each row"):
        evaluate_run(str(table), str(header_only), "table")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00uri")
    with pytest.raises(EvaluationError, match=f"^{binary}: expected a CSV or Parquet table: "):
        evaluate_run(str(table), str(binary), "table")


def test_a_labels_table_is_read_trimmed_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    """`URI, Label` and `a.jpg, cat` (spaces after the commas) score as written without them
    (the label was " cat": every image wrong); a row without a label, or a URI labelled two
    ways, is refused, not scored as the class "None" or as the last label."""
    table = tmp_path / "table"
    commit(table, PREDICTION_SCHEMA, classification_rows())
    entries = [f"file:///data/{t}/img{i}.jpg, {t}" for i, (t, _) in enumerate(CASES)]
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("\n".join(["URI, Label", *entries]) + "\n")
    metrics = {m["metric"]: m["value"] for m in evaluate_run(str(table), str(spaced)).to_pylist()}
    assert (metrics["evaluated"], metrics["accuracy"]) == (8, 0.5)
    unlabelled = tmp_path / "unlabelled.parquet"
    pq.write_table(pa.table({"uri": ["s3://b/a.jpg", "s3://b/b.jpg"], "label": ["cat", None]}),
                   unlabelled)  # fmt: skip
    with pytest.raises(EvaluationError, match=f"^{unlabelled}: row 2 has no label$"):
        evaluate_run(str(table), str(unlabelled), "table")
    numbered = tmp_path / "numbered.parquet"  # class ids as labels: 0 is one
    pq.write_table(pa.table({"uri": ["s3://b/a.jpg"], "label": [0]}), numbered)
    assert classification_truth([], str(numbered), "table", None)["s3://b/a.jpg"] == "0"
    twice = tmp_path / "twice.csv"
    twice.write_text("uri,label\ns3://b/a.jpg,cat\ns3://b/a.jpg,dog\n")
    with pytest.raises(EvaluationError) as refused:
        evaluate_run(str(table), str(twice), "table")
    assert str(refused.value) == f"{twice}: s3://b/a.jpg is labelled both 'cat' and 'dog' (row 2)"


def test_a_labels_table_of_plain_local_paths_matches_the_rows_file_uris(tmp_path: Path) -> None:
    """The rows hold file:///data/cat/img0.jpg; a hand-written table says /data/cat/img0.jpg."""
    table = tmp_path / "table"
    commit(table, PREDICTION_SCHEMA, classification_rows())
    labels = tmp_path / "labels.csv"
    lines = ["uri,label"] + [f"/data/{t}/img{i}.jpg,{t}" for i, (t, _) in enumerate(CASES)]
    labels.write_text("\n".join(lines) + "\n")
    metrics = {m["metric"]: m["value"] for m in evaluate_run(str(table), str(labels)).to_pylist()}
    assert (metrics["evaluated"], metrics["accuracy"]) == (8, 0.5)


COCO = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 100, "height": 100},
        {"id": 2, "file_name": "b.jpg", "width": 100, "height": 100},
    ],
    "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "truck"}],
    "annotations": [
        {"id": n, "image_id": image, "category_id": category, "bbox": box, "iscrowd": 0,
         "area": box[2] * box[3]}
        for n, (image, category, box) in enumerate(
            [(1, 1, [10, 10, 30, 20]), (1, 2, [50, 50, 40, 40]), (2, 1, [5, 60, 20, 20])], 1
        )
    ],
}  # fmt: skip


def detection_rows(boxes: dict[str, list[tuple[str, float, list[float]]]]) -> list[dict]:
    rows = []
    for name, found in boxes.items():
        uri = f"s3://b/{name}"
        entries = [
            {"label_id": 1, "label": label, "score": score, "x_min": x, "y_min": y,
             "x_max": x + w, "y_max": y + h}
            for label, score, (x, y, w, h) in found
        ]  # fmt: skip
        rows.append(
            {"source_uri": uri, "item_id": item_id(uri), "task": "detection", "status": "ok",
             "num_detections": len(entries), "detections": entries}
        )  # fmt: skip
    return rows


def test_detection_map_equals_pycocotools_on_the_same_json(tmp_path: Path) -> None:
    from pycocotools.coco import COCO as CocoApi
    from pycocotools.cocoeval import COCOeval

    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(COCO))
    perfect = {
        "a.jpg": [("car", 0.9, [10, 10, 30, 20]), ("truck", 0.8, [50, 50, 40, 40])],
        "b.jpg": [("car", 0.7, [5, 60, 20, 20])],
    }
    commit(tmp_path / "perfect", DETECTION_SCHEMA, detection_rows(perfect))
    metrics = evaluate_run(str(tmp_path / "perfect"), str(truth), "coco").to_pylist()
    assert {m["metric"]: m["value"] for m in metrics}["map"] == pytest.approx(1.0)

    mixed = {
        "a.jpg": [("car", 0.9, [12, 12, 30, 20]), ("truck", 0.3, [0, 0, 10, 10])],
        "b.jpg": [("car", 0.6, [5, 60, 20, 20]), ("truck", 0.8, [60, 0, 20, 20])],
    }
    commit(tmp_path / "mixed", DETECTION_SCHEMA, detection_rows(mixed))
    got = {
        m["metric"]: m["value"]
        for m in evaluate_run(str(tmp_path / "mixed"), str(truth), "coco").to_pylist()
    }
    api = CocoApi(str(truth))
    images = {"a.jpg": 1, "b.jpg": 2}
    ids = {"car": 1, "truck": 2}
    results = [
        {"image_id": images[n], "category_id": ids[c], "bbox": b, "score": s}
        for n, found in mixed.items()
        for c, s, b in found
    ]
    direct = COCOeval(api, api.loadRes(results), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    assert 0 < got["map"] < 1
    assert tuple(got) == get_task("detection").metrics  # what evaluate.min may name
    np.testing.assert_allclose([got["map"], got["map_50"]], direct.stats[:2])
    stored = pq.read_table(tmp_path / "mixed" / "_metrics" / "r1.parquet")
    assert set(stored["metric"].to_pylist()) == {"map", "map_50", "evaluated", "error_rows"}


def test_detection_is_scored_over_the_images_the_run_processed() -> None:
    """The truth holds a.jpg and b.jpg; a run that processed a.jpg alone, perfectly, scores
    1.0 (b.jpg's box counted as missed gave 0.75); an error row's image counts, its boxes
    missed. A truth naming none of the run's images, or without boxes on them, is refused
    (it gave 0.0, or pycocotools' -1 as a score); a hand-written one without iscrowd or area
    is read."""
    from vision_ops.evaluate import detection_metrics

    def scored(rows: list[dict], coco: dict = COCO) -> dict[str, float]:
        return {m["metric"]: m["value"] for m in detection_metrics(rows, coco)}

    a_only = detection_rows(
        {"a.jpg": [("car", 0.9, [10, 10, 30, 20]), ("truck", 0.8, [50, 50, 40, 40])]}
    )
    assert scored(a_only) == {"map": pytest.approx(1.0), "map_50": pytest.approx(1.0),
                              "evaluated": 1, "error_rows": 0}  # fmt: skip
    failed_b = [row | {"source_uri": "s3://b/b.jpg", "item_id": "b", "status": "error",
                       "detections": None} for row in a_only]  # fmt: skip
    both = scored(a_only + failed_b)
    assert (both["evaluated"], both["error_rows"]) == (2, 1) and both["map"] < 1.0
    bare = [
        {k: v for k, v in box.items() if k not in ("iscrowd", "area")}
        for box in COCO["annotations"]
    ]
    hand_written = COCO | {"annotations": bare}
    assert scored(a_only, hand_written) == scored(a_only)
    elsewhere = detection_rows({"z.jpg": [("car", 0.9, [10, 10, 30, 20])]})
    with pytest.raises(EvaluationError, match="no row of the run names an image of the COCO"):
        detection_metrics(elsewhere, COCO)
    no_boxes = COCO | {"annotations": [b for b in COCO["annotations"] if b["image_id"] != 1]}
    with pytest.raises(EvaluationError, match=r"no boxes on the run's 1 image\(s\): mAP is"):
        detection_metrics(a_only, no_boxes)


def test_sources_that_share_a_truth_name_are_refused() -> None:
    """cam1/a.jpg and cam2/a.jpg both match the truth's a.jpg: refused, not both scored
    against one image's boxes (or masks); one source a name scores as before."""
    from vision_ops.evaluate import detection_metrics, require_one_source_a_name

    rows = detection_rows({"a.jpg": [("car", 0.9, [10, 10, 30, 20])]})
    clash = [row | {"source_uri": f"s3://b/cam{i}/a.jpg"} for i in (1, 2) for row in rows]
    with pytest.raises(
        EvaluationError,
        match=r"^2 sources match the truth's a.jpg \("
        r"s3://b/cam1/a.jpg, s3://b/cam2/a.jpg\): ground truth is matched",
    ):
        detection_metrics(clash, COCO)
    masks = [{"source_uri": f"s3://b/cam{i}/scan.jpg"} for i in (1, 2)]
    with pytest.raises(EvaluationError, match=r"^2 sources match the truth's scan.png"):
        require_one_source_a_name(masks, lambda uri: uri.rpartition("/")[2][:-4] + ".png",
                                  {"scan.png"})  # fmt: skip
    frames = [{"source_uri": "s3://b/cam1/a.jpg"}] * 3  # one source, three rows: fine
    require_one_source_a_name(frames, lambda uri: uri.rpartition("/")[2], {"a.jpg"})
    assert detection_metrics(rows, COCO)[0]["metric"] == "map"


def test_a_tiled_segmentation_run_is_scored_on_each_tiles_window(tmp_path: Path) -> None:
    """A 40 x 32 image tiled at 32: its truth is class 1 on the left, 2 on the right; each
    tile is scored on its window of the truth (it was scored on the whole image's middle), and
    the second tile's pixels past the image's edge are not scored."""
    from vision_ops.evaluate import score_segmentation

    truth = np.ones((32, 40), np.uint8)
    truth[:, 32:] = 2
    (tmp_path / "truth").mkdir()
    Image.fromarray(truth).save(tmp_path / "truth" / "scene.png")
    rows = []
    for x, predicted in ((0, 1), (32, 2)):
        mask = np.full((32, 32), predicted, np.uint8)
        if x == 32:
            mask[:, 8:] = 0  # past the edge: any class, unscored
        Image.fromarray(mask).save(tmp_path / f"mask{x}.png")
        rows.append(
            {"source_uri": str(tmp_path / "scene.tif"), "tile_x": x, "tile_y": 0, "tile_size": 32,
             "mask_uri": str(tmp_path / f"mask{x}.png"), "label": str(predicted),
             "class_fractions": [{"label_id": predicted, "label": str(predicted), "fraction": 1.0}]}
        )  # fmt: skip
    metrics = score_segmentation(
        [row | {"status": "ok"} for row in rows], str(tmp_path / "truth"), "masks", {}
    )
    overall = {r["metric"]: r["value"] for r in metrics if r["label"] is None}
    assert overall == {"mean_iou": 1.0, "pixel_accuracy": 1.0, "evaluated": 2, "error_rows": 0}


def test_evaluating_a_run_of_a_task_without_a_scorer_is_a_bad_request(tmp_path, capsys) -> None:
    """An OCR run has no scorer: `evaluate` says so of the run, exit 2 (a request no truth
    file mends), not 1 as for a hold-out that cannot be read."""
    from committed_rows import commit_rows, failed

    from vision_ops.cli import EXIT_BAD_SPEC, main

    commit_rows(tmp_path / "table", "ocr", [failed("/x/a.png", "CorruptImage", "bad")], "o1")
    truth = tmp_path / "truth.csv"
    truth.write_text("uri,label\n/x/a.png,text\n")
    assert main(["evaluate", str(tmp_path / "table"), "--truth", str(truth)]) == EXIT_BAD_SPEC
    assert "error: run o1 cannot be scored: its task, ocr, has no scorer" in capsys.readouterr().err


def tile(x: int, row: dict) -> dict:
    """`row` as a scene's tile at column `x` (32 pixels square, the top row)."""
    return row | {"tile_x": x, "tile_y": 0, "tile_size": 32, "valid_fraction": 1.0}


def no_data(uri: str, x: int) -> dict:
    """A tile of scene `uri` with no data at all: a `skipped` row, never sent to the model."""
    skipped = {"status": "skipped", "error_message": "no data in the tile", "valid_fraction": 0.0}
    return tile(x, {"source_uri": uri}) | skipped


def test_skipped_tiles_are_neither_evaluated_nor_error_rows(tmp_path: Path, capsys) -> None:
    """A forest scene of 26 tiles, 4 of them all no data (`skipped`): the model saw 22 and
    called 14 forest. Scored over those 22: accuracy 14/22 (it was 14/26 = 0.5385 with 4 error
    rows, under a floor of 0.6 for no model reason, in a run of 0 errors); `skipped` counts
    the 4 apart."""
    from committed_rows import classified, commit_rows

    from vision_ops.evaluate import below_minimums

    scene = "file:///scenes/forest/scene1.tif"
    seen = [("forest", "water")] * 14 + [("water", "forest")] * 8
    rows = [tile(32 * i, classified(scene, (a, 0.8), (b, 0.1))) for i, (a, b) in enumerate(seen)]
    rows += [no_data(scene, 32 * i) for i in range(22, 26)]
    table = tmp_path / "table"
    commit_rows(table, "classification", rows, "s1", tiles=True)
    assert main(["evaluate", str(table), "--truth-format", "imagefolder"]) == EXIT_OK
    printed = "accuracy: 0.6364\ntop5_accuracy: 1.0000\nevaluated: 22\nerror_rows: 0\nskipped: 4\n"
    assert printed in capsys.readouterr().out
    metrics = read_metrics(str(table), committed_run(str(table), "s1"))
    assert metrics is not None
    value = {(m["metric"], m["label"], m["predicted"]): m["value"] for m in metrics.to_pylist()}
    assert value == {
        ("accuracy", None, None): 14 / 22,
        ("top5_accuracy", None, None): 1.0,
        ("evaluated", None, None): 22,
        ("error_rows", None, None): 0,
        ("skipped", None, None): 4,
        ("precision", "forest", None): 1.0,
        ("recall", "forest", None): 14 / 22,
        ("precision", "water", None): 0.0,
        ("confusion", "forest", "forest"): 14,
        ("confusion", "forest", "water"): 8,
    }
    assert below_minimums(metrics, {"accuracy": 0.6}) == []  # evaluate.min: exit 0, not 5

    commit_rows(table, "classification", [no_data(scene, 0), no_data(scene, 32)], "s2")
    with pytest.raises(EvaluationError) as refused:  # nothing the model saw: nothing to score
        evaluate_run(str(table), "", "imagefolder")
    assert str(refused.value) == (
        "run s2 (the latest; --run-id scores another): the run's 2 unit(s) the truth names were "
        "all skipped (no data: never sent to the model), none to score"
    )


def test_skipped_tiles_of_a_detection_run_are_not_scored(tmp_path: Path) -> None:
    """Scene a.jpg: one tile found both its boxes, one had no data; scene b.jpg: no data at
    all. Scored over a.jpg alone, perfectly (b.jpg's box counted as missed and the three
    skipped tiles as error rows: mAP 0.75 and 3 error rows in a run of none)."""
    from committed_rows import commit_rows

    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(COCO))
    [found] = detection_rows(
        {"a.jpg": [("car", 0.9, [10, 10, 30, 20]), ("truck", 0.8, [50, 50, 40, 40])]}
    )
    rows = [
        tile(0, found),
        no_data("s3://b/a.jpg", 32),
        no_data("s3://b/b.jpg", 0),
        no_data("s3://b/b.jpg", 32),
    ]
    commit_rows(tmp_path / "table", "detection", rows, "d1", tiles=True)
    metrics = evaluate_run(str(tmp_path / "table"), str(truth), "coco").to_pylist()
    assert {m["metric"]: m["value"] for m in metrics} == {
        "map": pytest.approx(1.0), "map_50": pytest.approx(1.0), "evaluated": 1,
        "error_rows": 0, "skipped": 3,
    }  # fmt: skip


def test_skipped_tiles_of_a_segmentation_run_are_not_scored(tmp_path: Path) -> None:
    """A 64 x 32 scene, class 1 on the left, 2 on the right; its right tile had no data
    (skipped). Scored on the left tile alone, perfectly (the right tile's class-2 pixels
    counted as missed: mean IoU 0.5, pixel accuracy 0.5, 1 error row)."""
    from vision_ops.evaluate import score_segmentation

    truth = np.ones((32, 64), np.uint8)
    truth[:, 32:] = 2
    (tmp_path / "truth").mkdir()
    Image.fromarray(truth).save(tmp_path / "truth" / "scene.png")
    Image.fromarray(np.ones((32, 32), np.uint8)).save(tmp_path / "mask0.png")
    scene = str(tmp_path / "scene.tif")
    fractions = [{"label_id": 1, "label": "1", "fraction": 1.0}]
    left = {"source_uri": scene, "status": "ok", "mask_uri": str(tmp_path / "mask0.png"),
            "label": "1", "class_fractions": fractions}  # fmt: skip
    rows = [tile(0, left), no_data(scene, 32)]
    metrics = score_segmentation(rows, str(tmp_path / "truth"), "masks", {})
    assert [(m["metric"], m["label"], m["value"]) for m in metrics] == [
        ("mean_iou", None, 1.0),
        ("pixel_accuracy", None, 1.0),
        ("evaluated", None, 1),
        ("error_rows", None, 0),
        ("skipped", None, 1),
        ("iou", "1", 1.0),
    ]
