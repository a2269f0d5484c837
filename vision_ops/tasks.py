"""Tasks: one record per task (what it predicts, how, and how its runs are read) in one registry.

Every fact about a task lives in its `Task` record here; the pipeline, `query`, `report`,
`verify` and `evaluate` ask this registry, and take the task of a committed run from its
manifest (or its schema's metadata, `vision_ops.task`), never from column names.

Adding a task (e.g. `ocr`) touches this module's record and the task's own code:

1. its record, in this module below the others: its settings model (a `TaskSettings` subclass
   with `kind: Literal["ocr"] = "ocr"`, every field described; the spec's `task:` section is
   validated against the model its `kind` names) and one `register(Task(...))` call naming it
   and the code below;
2. its predictor (a `vision_ops.predictors.Predictor` subclass, in its own module) and its row
   builder (a `schema.TableBuilder`: batch -> Arrow rows of the task's schema);

tests/test_tasks.py, parametrized over `TASKS`, then checks the record and runs a job of the
record's `example_model` through the pipeline, `query`, `report --html`, `verify` and
`evaluate`, and `make demo` runs and checks it too (jobs/demo.py), with no new test code. A toy
job whose outcome is known in advance (`TOY_JOBS` in tests/toy_models.py) adds value checks.

Code that imports torch (predictors) or reads storage (scorers) is named by a
`"module:attribute"` string and imported when used, so `query` and `report` stay light and this
module imports nothing that imports it back.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from vision_ops.config import NETWORK_MODEL_KINDS, BatchSizes, TaskSettings
from vision_ops.embedding import (
    EMBEDDING_FIELDS,
    ComparedUnits,
    embedding_table,
    summary_parts,
)
from vision_ops.errors import UnknownTask
from vision_ops.ocr import OCR_FIELDS, ocr_table
from vision_ops.registry import Registry
from vision_ops.schema import (
    CLASSIFICATION_FIELDS,
    DETECTION_FIELDS,
    SEGMENTATION_FIELDS,
    STATUS_OK,
    TableBuilder,
    classification_table,
    declared_schema,
    detection_table,
    segmentation_table,
)

if TYPE_CHECKING:
    from vision_ops.predictors import Predictor
    from vision_ops.storage import StorageOptions

# metrics rows: {"metric", "label", "predicted", "value"} (see evaluate.METRICS_SCHEMA)
Scorer = Callable[[list[dict[str, Any]], str, str, "StorageOptions"], list[dict[str, Any]]]
# A view's SELECT, or a function of the `predictions` view's column names giving it.
ViewSql = str | Callable[[Collection[str]], str]


@dataclass(frozen=True)
class Summary:
    """What `report` draws of a run's ok rows."""

    labels: list[tuple[str, float]]  # per label: images, boxes, or share of pixels; largest first
    scores: np.ndarray  # the values whose distribution the report draws, in [0, 1]
    # embedding: the units its scores compare and their similarities, which the report hands to
    # its neighbours panel (computed once); None for the other tasks
    compared: ComparedUnits | None = None


@dataclass(frozen=True)
class Task:
    """Everything the code needs to know about one task.

    Running it:
      name: the registry key; the spec's `task.kind`, the rows' `task` column, the schema's
        `vision_ops.task` metadata and the manifest's `task`.
      spec: its settings model (a config.TaskSettings subclass, defined above its record): the
        spec's `task:` section when `task.kind` names this task.
      model_kinds: the `model.kind`s it runs (config.NETWORK_MODEL_KINDS: networks its predictor
        runs; OCR: its PP-OCR pair only); any other is refused before any work.
      default_model: the `model:` section a job that gives none runs; None: a job must name one.
      fields: its output columns, after the unit columns every task has (schema.UNIT_FIELDS).
      sized_fields: `"module:function"` (JobSpec -> fields) for a task whose columns depend on
        the job's model (embedding: the vector's length D), called by `check_job` (so a model
        that cannot serve the task is refused before any work) and for the run's schema;
        None: `fields` as declared.
      rows: its row builder: the predictor's batch (flat numpy columns) -> Arrow rows.
      predictor: `"module:Class"` of its `Predictor`, imported on the worker that loads it.
      batch_sizes: images per model call when the spec leaves runtime.batch_size out.
      input_size: "fixed": the model takes fixed-size crops (model.preprocessing: resize, crop,
        mean, std; device decoding possible); "any": each image at its own size, the model
        resizes and normalises itself.
      architectures: the torchvision module whose builders the task accepts (`list_models(
        module=...)`), or None where it takes no torchvision architecture.
      architecture_examples: a few of them, for error messages.
      untrained_kwargs: builder arguments for a torchvision architecture whose weights come
        from a file (so that nothing downloads), e.g. {"weights_backbone": None}.
      adapters: whether model.adapter (decoding a TorchScript / ONNX output) applies.

    Reading its runs:
      views: DuckDB views `query` adds over `predictions` (name -> SELECT, or a function of
        the `predictions` view's columns giving one), e.g. `boxes`.
      default_query: what `vision-ops query` shows when no SQL is given (its summary).
      unit: what `Summary.labels` counts, in words ("images", "boxes", "share of pixels").
      score: what `Summary.scores` are, in words (the report's score chart).
      summary: ok rows of one run -> what `report` draws.
      summary_columns: the columns `summary` reads (beside `status`): the trend and the drift
        figures read only these of a run's rows.
      example_model: a `model:` section that runs anywhere with nothing to download: its
        smallest torchvision architecture untrained (seeded random weights: outputs of the right
        shape and no meaning), or its packaged model. The registry's tests and `make demo` run
        every task with it.
      masks: whether its units can have a mask file beside the table (its spec's `masks`
        setting turns them on): the pipeline adds the mask stage, the sinks commit them.
      panels: its report panels, by name (gallery.PANELS): its galleries, e.g. "label_strips",
        "boxes", "mask_overlays" (every run also gets gallery.COMMON_PANELS: its error rows,
        its scene tiles in place).
      scorer: `"module:function"` that `evaluate` calls: (rows, truth URI, truth format,
        storage options) -> metric rows; None: the task cannot be scored.
      truth_formats: the --truth-format values its scorer reads (the first is the default).
      metrics: the overall metrics its scorer gives, the names a spec's `evaluate.min` takes.
      counted_metrics: those of them that count rather than score (every other is a share in
        [0, 1]): every scorer gives the units it evaluated and the error rows among them.
    """

    name: str
    spec: type[TaskSettings]
    fields: Sequence[pa.Field]
    rows: TableBuilder
    predictor: str
    batch_sizes: BatchSizes
    default_query: str
    unit: str
    score: str
    summary: Callable[[pa.Table], Summary]
    summary_columns: tuple[str, ...]
    example_model: Mapping[str, Any]
    input_size: Literal["fixed", "any"] = "fixed"
    architectures: str | None = None
    architecture_examples: str = ""
    untrained_kwargs: Mapping[str, Any] = field(default_factory=dict)
    adapters: bool = False
    views: Mapping[str, ViewSql] = field(default_factory=dict)
    panels: tuple[str, ...] = ()
    scorer: str | None = None
    truth_formats: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    counted_metrics: tuple[str, ...] = ("evaluated", "error_rows")
    sized_fields: str | None = None
    masks: bool = False
    model_kinds: tuple[str, ...] = NETWORK_MODEL_KINDS
    default_model: Mapping[str, Any] | None = None

    def job_fields(self, spec: Any) -> Sequence[pa.Field]:
        """Its columns for a job (`spec`: a JobSpec): `fields`, or those sized for its model."""
        if self.sized_fields is None:
            return self.fields
        fields: Sequence[pa.Field] = load_ref(self.sized_fields)(spec)
        return fields

    @property
    def schema(self) -> pa.Schema:
        """Its table's schema (the unit columns, then `fields`), its name in the metadata."""
        return declared_schema(self.name, self.fields)

    def writes_masks(self, spec: Any) -> bool:
        """Whether a job (`spec`: its JobSpec) writes mask files: the task has them and the
        job's `task.masks` is on."""
        return self.masks and bool(getattr(spec.task, "masks", False))

    def predictor_class(self) -> type[Predictor]:
        cls: type[Predictor] = load_ref(self.predictor)
        return cls

    def scorer_function(self) -> Scorer | None:
        return None if self.scorer is None else load_ref(self.scorer)


TASKS: Registry[Task] = Registry("task")


def register(task: Task) -> Task:
    """Add a task's record; a name registered twice is an error."""
    return TASKS.register(task.name)(task)


def get_task(name: str) -> Task:
    """The record of a task; UnknownTask (which names the known ones) if none."""
    try:
        return TASKS.get(name)
    except KeyError as err:
        raise UnknownTask(str(err.args[0])) from None


def task_of_run(manifest: Mapping[str, Any]) -> Task:
    """The task of a committed run, as its manifest names it (every sink writes it there, from
    the schema's `vision_ops.task` metadata)."""
    name = manifest.get("task")
    if not name:
        raise UnknownTask(
            f"run {manifest.get('run_id')}: expected its manifest to name its task, found none"
        )
    return get_task(str(name))


def truth_formats() -> list[str]:
    """Every --truth-format some registered task reads."""
    return sorted({fmt for name in TASKS for fmt in TASKS.get(name).truth_formats})


# What a truth format's `truth` names where it is not a file: a folder (of masks), or nothing
# (imagefolder reads the labels from the inputs' folders).
_TRUTH_NOT_A_FILE: dict[str, str | None] = {"masks": "folder", "imagefolder": None}


def truth_path_kind(truth_format: str) -> str | None:
    """What a hold-out of `truth_format` names: "file", "folder", or None (nothing to check)."""
    return _TRUTH_NOT_A_FILE.get(truth_format, "file")


def truth_format_of(task_name: str, truth_format: str | None) -> str | None:
    """The truth format a run of the task is scored against: the one named, else its first
    (None: the task is scored against none)."""
    return truth_format or next(iter(get_task(task_name).truth_formats), None)


def load_ref(ref: str) -> Any:
    """The object a `"module:attribute"` string names."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


# --- summaries: what `report` draws --------------------------------------------------------------


def ok_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["status"], STATUS_OK))


def counts(values: pa.Array | pa.ChunkedArray) -> list[tuple[str, float]]:
    """Value counts, largest first, then by label."""
    pairs = [(str(e["values"]), float(e["counts"])) for e in pc.value_counts(values).to_pylist()]
    return sorted(pairs, key=lambda pair: (-pair[1], pair[0]))


def _classification_summary(table: pa.Table) -> Summary:
    ok = ok_rows(table)
    return Summary(counts(ok["label"]), ok["score"].to_numpy())


def _detection_summary(table: pa.Table) -> Summary:
    boxes = pc.list_flatten(ok_rows(table)["detections"])
    scores = pc.struct_field(boxes, "score").to_numpy()
    return Summary(counts(pc.struct_field(boxes, "label")), scores)


def _segmentation_summary(table: pa.Table) -> Summary:
    """Each class's share of all the run's mask pixels (every mask has the model's input size),
    and the dominant class's share of each mask."""
    ok = ok_rows(table)
    shares: dict[str, float] = {}
    for entries in ok["class_fractions"].to_pylist():
        for entry in entries or []:
            shares[entry["label"]] = shares.get(entry["label"], 0.0) + entry["fraction"]
    total = max(ok.num_rows, 1)
    pairs = [(label, round(share / total, 4)) for label, share in shares.items()]
    scores = pc.drop_null(ok["fraction"]).to_numpy(zero_copy_only=False)
    return Summary(sorted(pairs, key=lambda pair: (-pair[1], pair[0])), scores)


# An untrained example model's input: small, so that a run of one takes seconds on a CPU.
SMALL_INPUT = {
    "resize": 64,
    "crop": 64,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def untrained(architecture: str, **fields: Any) -> dict[str, Any]:
    """A `model:` section of a torchvision architecture with random weights (none downloaded)."""
    return {"kind": "torchvision", "architecture": architecture, **fields}


# --- the tasks -----------------------------------------------------------------------------------


class ClassificationTask(TaskSettings):
    kind: Literal["classification"] = Field(
        default="classification", description="Top-k labels per image."
    )
    top_k: int = Field(default=5, gt=0, le=1000, description="Labels kept per image.")

    def metrics_not_given(self) -> dict[str, str]:
        """Top-5 accuracy (the truth among a row's first five labels) where a row keeps fewer:
        it was top-k accuracy under top-5's name."""
        if self.top_k >= TOP5:
            return {}
        return {
            "top5_accuracy": f"task.top_k is {self.top_k}: each row keeps fewer than {TOP5} labels"
        }


TOP5 = 5  # the labels top5_accuracy looks among


# A classifier's 224 px crop (classification, and embedding: the same backbones without the
# head). On a CPU core a ResNet-18 runs as fast at 8 images a call as at 32, and each actor
# holds about 250 MB less and hands on its first rows sooner (docs/performance.md, "The CPU
# batch"); a data-centre GPU is kept busy at a few hundred images a call.
CROP_BATCH_SIZES = BatchSizes(cpu=8, gpu=256)


register(
    Task(
        name="classification",
        spec=ClassificationTask,
        fields=CLASSIFICATION_FIELDS,
        rows=classification_table,
        predictor="vision_ops.predictors:Classifier",
        batch_sizes=CROP_BATCH_SIZES,
        architectures="torchvision.models",
        architecture_examples="resnet50, efficientnet_b0, vit_b_16",
        default_query="SELECT label, count(*) AS images, round(avg(score), 3) AS mean_score "
        "FROM predictions WHERE status = 'ok' GROUP BY label ORDER BY images DESC, label LIMIT 20",
        unit="images",
        score="top-1 score",
        summary=_classification_summary,
        summary_columns=("label", "score"),
        example_model=untrained("mobilenet_v3_small", preprocessing=SMALL_INPUT),
        panels=("label_strips", "borderline"),
        scorer="vision_ops.evaluate:score_classification",
        truth_formats=("table", "imagefolder"),
        metrics=("accuracy", "top5_accuracy", "evaluated", "error_rows"),
    )
)

# One row per detected box, with its image's identity: the detection table unnested. Athena /
# Trino: `SELECT t.source_uri, d.* FROM detections t CROSS JOIN UNNEST(t.detections) AS u(d)`;
# Spark: `SELECT source_uri, d.* FROM detections LATERAL VIEW explode(detections) x AS d`.
_BOX = "d.label_id, d.label, d.score, d.x_min, d.y_min, d.x_max, d.y_max"
_EACH_BOX = "FROM (SELECT *, unnest(detections) AS d FROM predictions WHERE status = 'ok')"
BOXES_VIEW = f"""
    SELECT run_date, run_id, item_id, source_uri, image_width, image_height, model_name,
           {_BOX}
    {_EACH_BOX}
"""
# The same of a tiled table: boxes in scene pixels (so the scene's size, not the tile's), the
# tile that found each, the box in the scene's CRS and its centre in WGS84.
TILED_BOXES_VIEW = f"""
    SELECT run_date, run_id, item_id, source_uri, tile_x, tile_y, scene_width, scene_height,
           crs, model_name, {_BOX},
           d.crs_x_min, d.crs_y_min, d.crs_x_max, d.crs_y_max, d.lon, d.lat
    {_EACH_BOX}
"""


def boxes_view(columns: Collection[str]) -> str:
    """The `boxes` view of a detection table whose `predictions` has these columns: a tiled
    table's (its scene columns) gives each box's tile, scene and CRS place."""
    return TILED_BOXES_VIEW if "scene_width" in columns else BOXES_VIEW


class DetectionTask(TaskSettings):
    kind: Literal["detection"] = Field(
        default="detection", description="Boxes per image, in source pixels."
    )
    score_threshold: float = Field(
        default=0.5, ge=0, le=1, description="Keep boxes scoring at least this."
    )
    max_detections: int = Field(
        default=100, gt=0, description="Keep at most this many boxes per image, best first."
    )
    classes: list[str | int] | None = Field(
        default=None,
        min_length=1,
        description="Allow-list of labels (names or ids); null keeps every class.",
    )
    nms_iou: float | None = Field(
        default=None, gt=0, le=1, description="NMS IoU threshold; null keeps the model's own."
    )
    seam_overlap: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Tiled scenes: two boxes of one class from different tiles are one object "
        "when their intersection covers this share of the smaller box (merged across seams).",
    )
    max_batch_pixels: int = Field(
        default=16_000_000,
        gt=0,
        description="Pixel budget of one model call: a batch of large images is split to fit.",
    )


register(
    Task(
        name="detection",
        spec=DetectionTask,
        fields=DETECTION_FIELDS,
        rows=detection_table,
        predictor="vision_ops.predictors:Detector",
        # ~800 x 1333 per image (within task.max_batch_pixels): large activations per image
        batch_sizes=BatchSizes(cpu=4, gpu=16),
        input_size="any",
        architectures="torchvision.models.detection",
        architecture_examples="fasterrcnn_resnet50_fpn_v2, retinanet_resnet50_fpn, ssd300_vgg16",
        untrained_kwargs={"weights_backbone": None},
        adapters=True,
        views={"boxes": boxes_view},
        default_query="SELECT label, count(*) AS boxes, round(avg(score), 3) AS mean_score "
        "FROM boxes GROUP BY label ORDER BY boxes DESC, label LIMIT 20",
        unit="boxes",
        score="box score",
        summary=_detection_summary,
        summary_columns=("detections",),
        example_model=untrained("fasterrcnn_mobilenet_v3_large_320_fpn"),
        panels=("boxes",),
        scorer="vision_ops.evaluate:score_detection",
        truth_formats=("coco",),
        metrics=("map", "map_50", "evaluated", "error_rows"),
    )
)

# One row per class present in a unit's mask, with the share of the mask's pixels it covers.
PIXELS_VIEW = """
    SELECT run_date, run_id, item_id, source_uri, image_width, image_height, model_name,
           mask_uri, c.label_id, c.label, c.fraction
    FROM (SELECT *, unnest(class_fractions) AS c FROM predictions WHERE status = 'ok')
"""


class SegmentationTask(TaskSettings):
    kind: Literal["segmentation"] = Field(
        default="segmentation",
        description="A class per pixel: a mask per image and its class fractions.",
    )
    masks: bool = Field(
        default=True,
        description="Write each unit's class mask beside the table (PNG; GeoTIFF for the tiles "
        "of a georeferenced scene), its URI in the row; else the class fractions only.",
    )


register(
    Task(
        name="segmentation",
        spec=SegmentationTask,
        fields=SEGMENTATION_FIELDS,
        rows=segmentation_table,
        predictor="vision_ops.predictors:Segmenter",
        # ~520 px inputs and a per-pixel output
        batch_sizes=BatchSizes(cpu=8, gpu=64),
        architectures="torchvision.models.segmentation",
        architecture_examples="deeplabv3_resnet50, fcn_resnet50, lraspp_mobilenet_v3_large",
        untrained_kwargs={"weights_backbone": None, "aux_loss": None},
        views={"pixels": PIXELS_VIEW},
        # every mask has the model's input size: a class's share of all pixels is the mean of
        # its fraction over the ok units
        default_query="SELECT label, round(sum(fraction) / (SELECT count(*) FROM predictions "
        "WHERE status = 'ok'), 4) AS pixel_share, count(*) AS images FROM pixels "
        "GROUP BY label ORDER BY pixel_share DESC, label LIMIT 20",
        unit="share of pixels",
        score="dominant class's share of its mask",
        summary=_segmentation_summary,
        summary_columns=("class_fractions", "fraction"),
        example_model=untrained("lraspp_mobilenet_v3_large", preprocessing=SMALL_INPUT),
        panels=("mask_overlays",),
        scorer="vision_ops.evaluate:score_segmentation",
        truth_formats=("masks",),
        metrics=("mean_iou", "pixel_accuracy", "evaluated", "error_rows"),
        masks=True,
    )
)

# One row per recognised text line, with its image's identity: the OCR table unnested.
LINES_VIEW = """
    SELECT run_date, run_id, item_id, source_uri, image_width, image_height, model_name,
           l.text, l.score, l.polygon
    FROM (SELECT *, unnest(lines) AS l FROM predictions WHERE status = 'ok')
"""
WORD = re.compile(r"[^\W_]{3,}")  # words of 3 letters or digits and more, for the report


def _ocr_summary(table: pa.Table) -> Summary:
    """The run's most frequent words (lower case), and every line's score."""
    lines = pc.list_flatten(ok_rows(table)["lines"])
    words: dict[str, float] = {}
    for text in pc.struct_field(lines, "text").to_pylist():
        for word in WORD.findall(text.lower()):
            words[word] = words.get(word, 0.0) + 1
    pairs = sorted(words.items(), key=lambda pair: (-pair[1], pair[0]))
    scores = pc.struct_field(lines, "score").to_numpy(zero_copy_only=False)
    return Summary(pairs, np.asarray(scores, dtype=np.float64))


class OcrTask(TaskSettings):
    kind: Literal["ocr"] = Field(
        default="ocr", description="The text lines per image, with their polygons."
    )
    det_threshold: float = Field(
        default=0.3, gt=0, lt=1, description="Detector probability at which a pixel is text."
    )
    box_threshold: float = Field(
        default=0.5, ge=0, le=1, description="Keep a text box whose mean probability is this."
    )
    unclip_ratio: float = Field(
        default=1.6,
        gt=0,
        description="Grow each detected box by its area x this / its perimeter on every side.",
    )
    text_score: float = Field(
        default=0.5, ge=0, le=1, description="Keep a line whose mean character score is this."
    )
    det_limit_side: int = Field(
        default=736,
        gt=0,
        description="The detector sees an image's short side scaled to reach this (as "
        "PP-OCR's), within det_max_side squared pixels.",
    )
    det_max_side: int = Field(
        default=2000,
        gt=0,
        description="The detector's input is at most about this squared pixels (a large scan "
        "scaled down; a long thin line scaled to fill it, never squashed to its long side).",
    )
    rec_batch_size: int = Field(
        default=32,
        gt=0,
        description="Text-line crops per recogniser call (an image's lines, by width, each "
        "call padded to its widest).",
    )


register(
    Task(
        name="ocr",
        spec=OcrTask,
        fields=OCR_FIELDS,
        rows=ocr_table,
        predictor="vision_ops.ocr_predictor:TextPredictor",
        # pages at their own size (the detector sees ~736 px of short side), then every line's
        # crop of the batch in one recogniser pass
        batch_sizes=BatchSizes(cpu=4, gpu=32),
        input_size="any",
        views={"lines": LINES_VIEW},
        default_query="SELECT regexp_extract(source_uri, '[^/]+$') AS image, len(lines) AS lines, "
        "round(list_avg(list_transform(lines, l -> l.score)), 3) AS mean_score, "
        "left(replace(text, chr(10), ' / '), 80) AS text FROM predictions WHERE status = 'ok' "
        "ORDER BY image LIMIT 20",
        unit="words",
        score="line score",
        summary=_ocr_summary,
        summary_columns=("lines",),
        panels=("text_lines",),
        example_model={"kind": "ppocr"},
        model_kinds=("ppocr",),
        default_model={"kind": "ppocr"},
    )
)


def _embedding_summary(table: pa.Table) -> Summary:
    per_model, nearest, compared = summary_parts(table)
    return Summary(per_model, nearest, compared)


class EmbeddingTask(TaskSettings):
    """Each unit's pooled features from a classifier without its head, L2-normalised
    (vision_ops.embedding_predictor says how the head is removed per architecture family)."""

    kind: Literal["embedding"] = Field(
        default="embedding",
        description="One L2-normalised vector per image (the model without its head).",
    )


register(
    Task(
        name="embedding",
        spec=EmbeddingTask,
        fields=EMBEDDING_FIELDS,
        sized_fields="vision_ops.embedding_predictor:job_fields",
        rows=embedding_table,
        predictor="vision_ops.embedding_predictor:Embedder",
        batch_sizes=CROP_BATCH_SIZES,
        architectures="torchvision.models",
        architecture_examples="resnet50, efficientnet_b0, vit_b_16",
        # neighbours: `vision-ops query TABLE --similar-to URI`; pairs: `--duplicates 0.95`
        default_query="SELECT model_name, count(*) FILTER (status = 'ok') AS units, "
        "count(*) FILTER (status = 'error') AS errors, "
        "max(len(embedding)) FILTER (status = 'ok') AS dimensions "
        "FROM predictions GROUP BY model_name ORDER BY units DESC, model_name",
        unit="units per model",
        score="cosine similarity to the nearest other unit",
        summary=_embedding_summary,
        summary_columns=("model_name", "model_weights_sha256", "embedding"),
        panels=("neighbours",),
        example_model=untrained("mobilenet_v3_small", preprocessing=SMALL_INPUT),
    )
)
