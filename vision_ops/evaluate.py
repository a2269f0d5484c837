"""Scoring a committed run against ground truth: accuracy, top-5, per-class precision/recall and
a confusion matrix for classification; COCO mAP for detection; mean and per-class IoU for
segmentation. The run's task (its manifest's) names its scorer; metrics land as a small Parquet
table per run under `_metrics/`. A `skipped` unit (a scene's tile with no data) was never sent to
the model: no scorer counts it as evaluated or as an error row; `skipped` counts it apart."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import posixpath
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vision_ops.errors import EXIT_BAD_SPEC, VisionOpsError
from vision_ops.masks import in_mask_frame
from vision_ops.outputs import Target, as_output, committed_run_or_raise, read_run
from vision_ops.schema import STATUS_OK, STATUS_SKIPPED
from vision_ops.storage import (
    StorageOptions,
    filesystem,
    make_folder,
    read_bytes,
    read_parquet,
    recorded_uri,
)
from vision_ops.tasks import TOP5, task_of_run, truth_format_of
from vision_ops.tiling import tile_window

METRICS = "_metrics"
METRICS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("label", pa.string()),  # the class of a per-class metric, the truth of a cell
        pa.field("predicted", pa.string()),  # the predicted class of a confusion-matrix cell
        pa.field("value", pa.float64(), nullable=False),
    ]
)
IGNORE_CLASS = 255  # a ground-truth mask's "no label" pixels (PASCAL VOC's convention)
SKIPPED = "skipped"  # the metric: units the truth names that the run skipped, none scored


class EvaluationError(VisionOpsError, ValueError):
    """Ground truth that cannot be read or matched to the run's rows."""


class NoScorer(EvaluationError):
    """A run of a task that has no scorer (OCR): a request no truth file mends."""

    exit_code = EXIT_BAD_SPEC


def evaluate_run(
    table_uri: Target,
    truth: str,
    truth_format: str | None = None,
    run_id: str | None = None,
    options: StorageOptions | None = None,
) -> pa.Table:
    """The metrics of a committed run (the given id, else the latest), written beside it:
    scored by its task's scorer against `truth` in `truth_format` (default: the task's first)."""
    manifest = committed_run_or_raise(table_uri, run_id, options, EvaluationError)
    task = task_of_run(manifest)
    scorer = task.scorer_function()
    if scorer is None:
        raise NoScorer(
            f"run {manifest['run_id']} cannot be scored: its task, {task.name}, has no scorer"
        )
    truth_format = truth_format_of(task.name, truth_format)
    if truth_format not in task.truth_formats:
        raise EvaluationError(
            f"--truth-format: a {task.name} run is scored against "
            f"{' or '.join(task.truth_formats)}, found {truth_format}"
        )
    rows = read_run(table_uri, manifest, options).to_pylist()
    not_given = _metrics_not_given(manifest)
    try:
        scored = scorer(rows, truth, truth_format, options or {})
    except NothingScored as err:  # the latest run (an incremental night's holds few) named
        if run_id is not None:
            raise
        latest = f"run {manifest['run_id']} (the latest; --run-id scores another)"
        raise NothingScored(f"{latest}: {err}") from None
    metrics = [m for m in scored if m["metric"] not in not_given]
    table = pa.Table.from_pylist(
        [{"run_id": manifest["run_id"]} | m for m in metrics], schema=METRICS_SCHEMA
    )
    _write(table, table_uri, manifest, options)
    return table


def _metrics_not_given(manifest: dict[str, Any]) -> dict[str, str]:
    """The metrics the run's task settings keep out (a classification of top_k 3 has no top-5
    accuracy), as its manifest records them; none for a run committed before it did."""
    from vision_ops.config import task_settings

    recorded = manifest.get("task_settings")
    if not recorded:
        return {}
    try:
        return task_settings(recorded).metrics_not_given()
    except ValueError:  # settings this version does not read (another version's, a plugin's)
        return {}


def below_minimums(metrics: pa.Table, minimums: dict[str, float]) -> list[str]:
    """Each overall metric under its floor, as `name value < floor`; a floor naming a metric
    the run's scorer does not give is an EvaluationError naming those it gives."""
    overall = {r["metric"]: r["value"] for r in metrics.to_pylist() if r["label"] is None}
    unknown = sorted(set(minimums) - set(overall))
    if unknown:
        raise EvaluationError(
            f"evaluate.min names {', '.join(unknown)}: expected one of {', '.join(overall)}"
        )
    return [
        f"{name} {overall[name]:.4f} < {floor}"
        for name, floor in minimums.items()
        if overall[name] < floor
    ]


def score_classification(
    rows: list[dict[str, Any]], truth: str, truth_format: str, options: StorageOptions
) -> list[dict[str, Any]]:
    """The classification task's scorer: labels from an ImageFolder layout or a table."""
    return classification_metrics(rows, classification_truth(rows, truth, truth_format, options))


def score_detection(
    rows: list[dict[str, Any]], truth: str, truth_format: str, options: StorageOptions
) -> list[dict[str, Any]]:
    """The detection task's scorer: boxes from a COCO JSON file."""
    return detection_metrics(rows, json.loads(read_bytes(truth, options)))


def score_segmentation(
    rows: list[dict[str, Any]], truth: str, truth_format: str, options: StorageOptions
) -> list[dict[str, Any]]:
    """The segmentation task's scorer: `truth` is a folder of PNG class-id masks named as the
    images (img7.jpg -> img7.png), each over its whole source image (a tile is scored on its
    window of it); it is brought into the frame of the run's masks (the model's input: shorter
    side resized to the mask's side, then centre-cropped) with nearest-neighbour resampling.
    Pixels of class 255 are not scored."""
    fs, root = filesystem(truth, options)
    if not fs.isdir(root):
        raise EvaluationError(f"--truth {truth}: expected a folder of PNG masks")
    found = {posixpath.basename(path): path for path in fs.ls(root, detail=False)}
    require_one_source_a_name(rows, _mask_name, found)
    named = [row for row in rows if _mask_name(row["source_uri"]) in found]
    tally = IouTally()
    missed: list[dict[str, Any]] = []  # error rows: scored once a mask gives the frame
    frame: tuple[int, ...] | None = None
    truth_of = _truth_reader(fs, found)
    for row in sent_to_model(named):
        if row["status"] != STATUS_OK:
            missed.append(row)
            continue
        if not row.get("mask_uri"):
            raise EvaluationError(
                f"{row['source_uri']}: the run wrote no mask (task.masks: false); IoU needs them"
            )
        predicted = _png(read_bytes(row["mask_uri"], options), row["mask_uri"])
        frame = predicted.shape
        tally.add(in_mask_frame(truth_of(row), frame), predicted)
    for row in missed:  # in the masks' frame too: each unit weighs as the model saw it
        true = truth_of(row)
        tally.add(in_mask_frame(true, frame) if frame else true, None)
    if not tally.units:
        raise nothing_scored(
            named,
            f"no row of the run has a ground-truth mask in {truth} (matched by file name: "
            "img7.jpg -> img7.png)",
        )
    return tally.metrics(_label_names(rows), also=skipped_metric(named))


def sent_to_model(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of units the model was given: a `skipped` unit (a tile with no data) never
    was, so it is neither evaluated nor an error row, as the run summary counts it apart
    (its truth, a no-data border's, would otherwise score as missed against the model)."""
    return [row for row in rows if row["status"] != STATUS_SKIPPED]


def skipped_metric(named: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`skipped`: how many of the units the truth names (`named`) the run skipped, so that a
    user sees the part of the hold-out left unscored; none where it skipped none."""
    count = len(named) - len(sent_to_model(named))
    return [_metric(SKIPPED, count)] if count else []


class NothingScored(EvaluationError):
    """A run none of whose rows the truth scores."""


def nothing_scored(named: list[dict[str, Any]], none_named: str) -> EvaluationError:
    """The error of a run none of whose rows a scorer can score: `none_named` where the truth
    names none of them, else that every unit it names was skipped."""
    if not named:
        return NothingScored(none_named)
    return NothingScored(
        f"the run's {len(named)} unit(s) the truth names were all skipped (no data: never sent "
        "to the model), none to score"
    )


def _truth_reader(fs: Any, found: dict[str, str]) -> Callable[[dict[str, Any]], np.ndarray]:
    """A row -> its unit's truth: its source's mask (the last one read is kept: a scene's
    tiles come together), cut to the tile's window where the row is a tile's."""
    last: dict[str, np.ndarray] = {}

    def truth_of(row: dict[str, Any]) -> np.ndarray:
        path = found[_mask_name(row["source_uri"])]
        if path not in last:
            last.clear()
            last[path] = _png(fs.cat_file(path), path)
        return in_unit(last[path], row)

    return truth_of


def in_unit(true: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """A source's truth mask cut to the row's unit: a tile's window of it (not scored past the
    scene's edge: IGNORE_CLASS), else the whole."""
    tile = tile_window(row)
    if tile is None:
        return true
    window = np.full((tile.height, tile.width), IGNORE_CLASS, dtype=true.dtype)
    part = true[tile.row_off : tile.row_off + tile.height, tile.col_off : tile.col_off + tile.width]
    window[: part.shape[0], : part.shape[1]] = part
    return window


def _mask_name(uri: str) -> str:
    """The truth mask of a source: img7.jpg -> img7.png."""
    return posixpath.splitext(posixpath.basename(uri))[0] + ".png"


def require_one_source_a_name(
    rows: list[dict[str, Any]], name_of: Callable[[str], str], truth: Collection[str]
) -> None:
    """EvaluationError where two of the run's sources have the name of one truth entry
    (cam1/0001.jpg and cam2/0001.jpg): truth is matched by file name, so both would be
    scored against one image's truth."""
    sources: dict[str, set[str]] = {}
    for row in rows:
        name = name_of(row["source_uri"])
        if name in truth:
            sources.setdefault(name, set()).add(row["source_uri"])
    for name, uris in sorted(sources.items()):
        if len(uris) > 1:
            first, second = sorted(uris)[:2]
            raise EvaluationError(
                f"{len(uris)} sources match the truth's {name} ({first}, {second}): ground "
                "truth is matched by file name; score sources of one name apart"
            )


class IouTally:
    """Pixel counts per class over many masks: true, predicted and both (the intersection)."""

    def __init__(self) -> None:
        self.true = np.zeros(0, np.int64)
        self.predicted = np.zeros(0, np.int64)
        self.both = np.zeros(0, np.int64)
        self.units = 0
        self.errors = 0

    def add(self, true: np.ndarray, predicted: np.ndarray | None) -> None:
        """One unit; `predicted` None (an error row): every true pixel is missed."""
        self.units += 1
        scored = true != IGNORE_CLASS
        truth = true[scored].astype(np.int64)
        self.true = _plus(self.true, np.bincount(truth))
        if predicted is None:
            self.errors += 1
            return
        guess = predicted[scored].astype(np.int64)
        self.predicted = _plus(self.predicted, np.bincount(guess))
        self.both = _plus(self.both, np.bincount(truth[truth == guess]))

    def metrics(
        self, names: dict[int, str], also: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """mean_iou over the classes present in the truth or the predictions, pixel_accuracy,
        evaluated units, error rows, the overall metrics `also` gives, and each class's iou."""
        size = max(len(self.true), len(self.predicted), len(self.both))
        true, predicted, both = (
            np.pad(a, (0, size - len(a))) for a in (self.true, self.predicted, self.both)
        )
        union = true + predicted - both
        present = np.flatnonzero(union)
        ious = both[present] / union[present]
        metrics = [
            _metric("mean_iou", float(ious.mean()) if len(ious) else 0.0),
            _metric("pixel_accuracy", both.sum() / max(true.sum(), 1)),
            _metric("evaluated", self.units),
            _metric("error_rows", self.errors),
            *(also or []),
        ]
        for class_id, iou in zip(present.tolist(), ious.tolist(), strict=True):
            metrics.append(_metric("iou", iou, names.get(class_id, str(class_id))))
        return metrics


def _plus(total: np.ndarray, counts: np.ndarray) -> np.ndarray:
    size = max(len(total), len(counts))
    return np.pad(total, (0, size - len(total))) + np.pad(counts, (0, size - len(counts)))


def _png(data: bytes, uri: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        mask = np.asarray(Image.open(io.BytesIO(data)))
    except UnidentifiedImageError:
        raise EvaluationError(f"{uri}: expected a PNG of class ids") from None
    if mask.ndim != 2:
        raise EvaluationError(f"{uri}: expected one band of class ids, found shape {mask.shape}")
    return mask


def _label_names(rows: list[dict[str, Any]]) -> dict[int, str]:
    """Class id -> label, as the run's rows name them."""
    return {
        entry["label_id"]: entry["label"]
        for row in rows
        for entry in row.get("class_fractions") or []
    }


def classification_truth(
    rows: list[dict[str, Any]], truth: str, truth_format: str, options: StorageOptions | None
) -> dict[str, str]:
    """source_uri -> true label: ImageFolder (the parent folder's name), or a CSV / Parquet
    table of `uri, label`."""
    if truth_format == "imagefolder":
        return {
            r["source_uri"]: posixpath.basename(posixpath.dirname(r["source_uri"])) for r in rows
        }
    if truth_format != "table":
        raise EvaluationError(
            f"--truth-format: expected imagefolder or table, found {truth_format}"
        )
    try:
        data = read_bytes(truth, options)
    except FileNotFoundError:
        raise EvaluationError(f"{truth}: not found") from None
    try:
        if truth.endswith(".parquet"):
            records = read_parquet(data).to_pylist()
        else:
            records = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    except (ValueError, csv.Error, pa.ArrowException) as err:  # not UTF-8 text, not Parquet
        raise EvaluationError(f"{truth}: expected a CSV or Parquet table: {err}") from None
    records = [{str(k).strip().lower(): v for k, v in r.items()} for r in records]
    if records and not {"uri", "label"} <= set(records[0]):
        raise EvaluationError(f"{truth}: expected columns uri and label")
    if not records:
        raise EvaluationError(f"{truth}: no rows; expected a uri and a label on each row")
    labels = _labels(truth, records)
    # a truth table written by hand names a local input as its path; it is matched as given too
    return labels | {recorded_uri(uri): label for uri, label in labels.items()}


def _labels(truth: str, records: list[dict[str, Any]]) -> dict[str, str]:
    """Each URI's label, values trimmed (`a.jpg, cat` labels it `cat`); EvaluationError naming
    the row where one has no URI or no label, or a URI is labelled twice, differently."""
    labels: dict[str, str] = {}
    for number, record in enumerate(records, start=1):
        uri, label = ("" if record[k] is None else str(record[k]).strip() for k in ("uri", "label"))
        if not uri or not label:
            raise EvaluationError(f"{truth}: row {number} has no {'label' if uri else 'uri'}")
        if labels.setdefault(uri, label) != label:
            raise EvaluationError(
                f"{truth}: {uri} is labelled both {labels[uri]!r} and {label!r} (row {number})"
            )
    return labels


def classification_metrics(
    rows: list[dict[str, Any]], truth: dict[str, str]
) -> list[dict[str, Any]]:
    """Over the rows with a true label sent to the model: accuracy and top-5 (an error row
    counts as wrong), per-class precision and recall, and the confusion matrix as (label,
    predicted, count); those skipped are counted apart (`skipped_metric`)."""
    named = [r for r in rows if r["source_uri"] in truth]
    scored = sent_to_model(named)
    if not scored:
        raise nothing_scored(
            named, "no row of the run has a ground-truth label (match on source_uri)"
        )
    pairs = [(truth[r["source_uri"]], r["label"] if r["status"] == "ok" else None) for r in scored]
    top5 = [truth[r["source_uri"]] in _first_labels(r, TOP5) for r in scored]
    metrics = [
        _metric("accuracy", sum(t == p for t, p in pairs) / len(pairs)),
        _metric("top5_accuracy", sum(top5) / len(top5)),
        _metric("evaluated", len(pairs)),
        _metric("error_rows", sum(p is None for _, p in pairs)),
        *skipped_metric(named),
    ]
    for label in sorted({t for t, _ in pairs} | {p for _, p in pairs if p is not None}):
        predicted = [t for t, p in pairs if p == label]
        actual = [p for t, p in pairs if t == label]
        if predicted:
            metrics.append(_metric("precision", predicted.count(label) / len(predicted), label))
        if actual:
            metrics.append(_metric("recall", actual.count(label) / len(actual), label))
    for (label, predicted_label), count in sorted(Counter(pairs).items(), key=str):
        metrics.append(_metric("confusion", count, label, predicted_label))
    return metrics


def _first_labels(row: dict[str, Any], count: int) -> list[str]:
    return [entry["label"] for entry in (row["top_k"] or [])[:count]]


def detection_metrics(rows: list[dict[str, Any]], coco: dict[str, Any]) -> list[dict[str, Any]]:
    """COCO box mAP@[.5:.95] and mAP@.5 (pycocotools), images matched by file name and
    classes by category name, over the truth's images the run processed (an error row's image
    counts, its boxes all missed; an image the run never saw, or only skipped, does not)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = {posixpath.basename(image["file_name"]): image["id"] for image in coco["images"]}
    require_one_source_a_name(rows, posixpath.basename, images)
    named = [row for row in rows if posixpath.basename(row["source_uri"]) in images]
    covered = sent_to_model(named)
    if not covered:
        raise nothing_scored(
            named, "no row of the run names an image of the COCO truth (match on file name)"
        )
    image_ids = sorted({images[posixpath.basename(row["source_uri"])] for row in covered})
    if not any(box["image_id"] in image_ids for box in coco.get("annotations", [])):
        raise EvaluationError(
            f"the COCO truth has no boxes on the run's {len(image_ids)} image(s): mAP is "
            "undefined there"
        )
    categories = {c["name"]: c["id"] for c in coco["categories"]}
    results = [
        {
            "image_id": images[posixpath.basename(row["source_uri"])],
            "category_id": categories[box["label"]],
            "bbox": [
                box["x_min"],
                box["y_min"],
                box["x_max"] - box["x_min"],
                box["y_max"] - box["y_min"],
            ],
            "score": box["score"],
        }
        for row in covered
        if row["status"] == "ok"
        for box in row["detections"] or []
        if box["label"] in categories
    ]
    counts = [
        _metric("evaluated", len(image_ids)),
        _metric("error_rows", sum(row["status"] != "ok" for row in covered)),
        *skipped_metric(named),
    ]
    if not results:  # every box of the run's images missed
        return [_metric("map", 0.0), _metric("map_50", 0.0), *counts]
    ground_truth = COCO()
    ground_truth.dataset = _complete(coco)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth.createIndex()
        scoring = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        scoring.params.imgIds = image_ids
        scoring.evaluate()
        scoring.accumulate()
        scoring.summarize()
    return [
        _metric("map", float(scoring.stats[0])),
        _metric("map_50", float(scoring.stats[1])),
        *counts,
    ]


def _complete(coco: dict[str, Any]) -> dict[str, Any]:
    """A COCO file with what pycocotools needs of each box that a hand-written one may leave
    out: `iscrowd` (0) and `area` (the box's)."""
    boxes = [
        {"iscrowd": 0, "area": box["bbox"][2] * box["bbox"][3]} | box
        for box in coco.get("annotations", [])
    ]
    return coco | {"annotations": boxes}


def shown_metric(name: str, value: float) -> str:
    """A metric as printed: a count (a task's `counted_metrics`, or `skipped`) whole, any other
    with four decimals."""
    from vision_ops.tasks import TASKS

    counted = {SKIPPED} | {metric for name in TASKS for metric in TASKS.get(name).counted_metrics}
    return str(int(value)) if name in counted else f"{value:.4f}"


def _metric(
    name: str, value: float, label: str | None = None, predicted: str | None = None
) -> dict[str, Any]:
    return {"metric": name, "label": label, "predicted": predicted, "value": float(value)}


SCORED_ATTEMPT = b"vision_ops.attempt"  # metrics metadata: the commit of the run id scored


def _write(
    table: pa.Table, table_uri: Target, manifest: dict[str, Any], options: StorageOptions | None
) -> None:
    """Among the run's own files (OutputSpec.files_uri), named after the run id and stamped
    with the commit (attempt) it scored."""
    fs, folder = filesystem(_metrics_folder(as_output(table_uri).files_uri), options)
    make_folder(fs, folder)
    stamped = table.replace_schema_metadata({SCORED_ATTEMPT: str(manifest.get("attempt"))})
    with fs.open(f"{folder}/{manifest['run_id']}.parquet", "wb") as handle:
        pq.write_table(stamped, handle)


def _metrics_folder(files_uri: str) -> str:
    return f"{files_uri.rstrip('/')}/{METRICS}"


def read_metrics(
    table_uri: Target, manifest: dict[str, Any], options: StorageOptions | None = None
) -> pa.Table | None:
    """The metrics of the run `manifest` commits, where that commit has been evaluated; None
    where it has not, or where they scored an earlier commit of the run id (a rerun). An
    Iceberg table's metrics scored before each table had a folder of its own under `uri` are
    read from `uri`/_metrics where its own folder has none (the first file found decides)."""
    output = as_output(table_uri)
    folders = dict.fromkeys([output.files_uri, output.uri])  # the second: the earlier layout
    for folder in folders:
        fs, path = filesystem(f"{_metrics_folder(folder)}/{manifest['run_id']}.parquet", options)
        if fs.exists(path):
            with fs.open(path, "rb") as handle:
                table = read_parquet(handle)
            scored = (table.schema.metadata or {}).get(SCORED_ATTEMPT)
            if scored is not None and scored.decode() != str(manifest.get("attempt")):
                return None
            return table.replace_schema_metadata(None)
    return None
