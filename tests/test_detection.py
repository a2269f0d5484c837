"""Detection: every accepted torchvision detector through the pipeline equals a direct call of
the same model, in source pixels (EXIF-rotated and mixed-size images included); the filters;
error rows; boxes counted per label in DuckDB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

from vision_ops.config import JobSpec, parse_spec
from vision_ops.detection import (
    as_rows,
    configure_detector,
    filter_detections,
    instance_output,
    kept_indices,
    pixel_budget_groups,
)
from vision_ops.errors import ModelError
from vision_ops.models import torchvision_architectures
from vision_ops.pipeline import run_job
from vision_ops.predictors import Detector, FeatureCheck
from vision_ops.query import boxes_sql, connect, read_sql
from vision_ops.schema import (
    COCO_KEYPOINT_NAMES,
    DETECTION_SCHEMA,
    DETECTIONS,
    STATUS_ERROR,
    STATUS_OK,
)
from vision_ops.tasks import DetectionTask

pytestmark = pytest.mark.timeout(900)
CLASSES = 5
LABELS = ["__background__", "car", "truck", "roof", "pool"]
SHAPES = [(90, 120), (120, 90), (96, 96), (70, 130)]  # (height, width)
SPREAD = "fasterrcnn_mobilenet_v3_large_320_fpn"


def fast_kwargs(architecture: str) -> dict[str, int]:
    """Small internal resizes and candidate counts keep random-weight tests quick on a CPU."""
    if architecture.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn")):
        return {
            "min_size": 160,
            "max_size": 200,
            "rpn_pre_nms_top_n_test": 200,
            "rpn_post_nms_top_n_test": 60,
        }
    if architecture.startswith(("retinanet", "fcos")):
        return {"min_size": 160, "max_size": 200, "topk_candidates": 100}
    return {}


def build(architecture: str) -> torch.nn.Module:
    torch.manual_seed(0)
    builder = torchvision.models.get_model_builder(architecture)
    kwargs = fast_kwargs(architecture)
    return builder(weights=None, weights_backbone=None, num_classes=CLASSES, **kwargs).eval()


def task(**overrides: object) -> DetectionTask:
    return DetectionTask(**({"score_threshold": 0.0, "max_detections": 15} | overrides))


def write_images(folder: Path) -> dict[str, np.ndarray]:
    """Seeded images of several sizes, one JPEG rotated by EXIF; returns what each decodes to."""
    rng = np.random.default_rng(7)
    decoded = {}
    for index, (height, width) in enumerate(SHAPES):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        decoded[f"img{index}.png"] = pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    blocks = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((10, 10, 1))).astype(np.uint8)
    Image.fromarray(blocks).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rotated = ImageOps.exif_transpose(Image.open(folder / "rotated.jpg"))
    decoded["rotated.jpg"] = np.asarray(rotated.convert("RGB"))
    assert decoded["rotated.jpg"].shape[:2] == (80, 60)
    return decoded


def direct_detections(
    model: torch.nn.Module, image: np.ndarray, settings: DetectionTask
) -> np.ndarray:
    """The model called on one image as torchvision documents it, then the task's filters."""
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    with torch.inference_mode():
        (output,) = model([tensor])
    rows = torch.cat(
        [output["labels"][:, None].float(), output["scores"][:, None], output["boxes"]], dim=1
    ).numpy()
    return filter_detections(rows, settings, None)


def assert_instances(
    row: dict, model: torch.nn.Module, image: np.ndarray, settings: DetectionTask, kind: str | None
) -> None:
    """Masks: the decoded RLE is the model's mask thresholded at 0.5 (pixels may differ only
    where the model's probability is within 1e-4 of it). Keypoints: names, x, y and score."""
    from pycocotools import mask as coco_mask

    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    with torch.inference_mode():
        (output,) = model([tensor])
    kept = kept_indices(as_rows(output), settings, None)
    if kind == "mask":
        probabilities = output["masks"][:, 0].numpy()[kept]
        decoded = np.stack(
            [
                coco_mask.decode(
                    {"size": e["mask"]["size"], "counts": e["mask"]["counts"].encode()}
                )
                for e in row["detections"]
            ]
            or [np.zeros(image.shape[:2], np.uint8)]
        )[: len(kept)]
        assert decoded.shape[1:] == image.shape[:2]
        differs = decoded != (probabilities > 0.5)
        assert not (differs & (np.abs(probabilities - 0.5) > 1e-4)).any()
        assert any(e["mask"]["counts"] for e in row["detections"])
    else:
        expected = torch.cat(
            [output["keypoints"][:, :, :2], output["keypoints_scores"][..., None]], dim=-1
        ).numpy()[kept]
        got = [[(k["x"], k["y"], k["score"]) for k in e["keypoints"]] for e in row["detections"]]
        np.testing.assert_allclose(np.array(got).reshape(expected.shape), expected, atol=1e-3)
        names = [k["name"] for e in row["detections"] for k in e["keypoints"]][:17]
        assert not row["detections"] or names == list(COCO_KEYPOINT_NAMES)


def rows_as_array(row: dict) -> np.ndarray:
    keys = ("label_id", "score", "x_min", "y_min", "x_max", "y_max")
    boxes = [[box[key] for key in keys] for box in row["detections"]]
    return np.array(boxes, dtype=np.float32).reshape(-1, 6)


def job_spec(folder: Path, output: Path, model: dict, settings: DetectionTask) -> JobSpec:
    return parse_spec(
        {
            "input": {"uris": [str(folder)]},
            "task": settings.model_dump(),
            "model": model,
            "runtime": {"batch_size": 8, "max_actors": 1, "intra_op_threads": 1},
            "output": {"uri": str(output)},
            "run": {"id": "det", "date": "2026-11-24"},
        }
    )


@pytest.mark.parametrize("architecture", torchvision_architectures("detection"))
def test_pipeline_equals_a_direct_call(architecture, ray_local, tmp_path) -> None:
    torch.set_num_threads(1)  # the actor's (runtime.intra_op_threads): the same kernels and sums
    folder = tmp_path / "images"
    folder.mkdir()
    decoded = write_images(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model = build(architecture)
    weights = tmp_path / "detector.pt"
    torch.save(model.state_dict(), weights)
    settings = task()
    configure_detector(model, settings, keep_all=False)
    model_spec = {
        "architecture": architecture,
        "weights": str(weights),
        "num_classes": CLASSES,
        "kwargs": fast_kwargs(architecture),
    }
    run_job(job_spec(folder, tmp_path / "table", model_spec, settings))
    rows = {Path(r["source_uri"]).name: r for r in pq.read_table(tmp_path / "table").to_pylist()}
    assert set(rows) == {*decoded, "broken.png"}
    assert rows["broken.png"]["status"] == STATUS_ERROR
    assert rows["broken.png"]["detections"] is None
    for name, image in decoded.items():
        row = rows[name]
        assert (row["image_height"], row["image_width"]) == image.shape[:2]
        expected = direct_detections(model, image, settings)
        assert row["num_detections"] == len(expected) == len(row["detections"])
        np.testing.assert_allclose(rows_as_array(row), expected, atol=1e-4, err_msg=name)
        if instance_output(architecture):
            assert_instances(row, model, image, settings, instance_output(architecture))
    assert any(row["num_detections"] for row in rows.values() if row["status"] == STATUS_OK)


def save_spread_detector(folder: Path) -> Path:
    """A small Faster R-CNN whose class scores are spread out (no near-ties between boxes).

    A random-weight backbone's batch norms (running mean 0, variance 1) shrink its features
    to about 1e-8 by the last layer, so every box gets the same scores and a GPU may order the
    ties otherwise. Their statistics are set from a few noise images first, as a trained
    backbone's are from its data, so the features, and with them the scores, vary by box."""
    model = build(SPREAD)
    calibrate_batch_norms(model.backbone, model.transform)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.1)
    path = folder / "spread.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def spread_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_spread_detector(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(LABELS))
    return path


def spread_model(weights: Path, labels: Path | None = None) -> dict:
    model = {
        "architecture": SPREAD,
        "weights": str(weights),
        "num_classes": CLASSES,
        "kwargs": fast_kwargs(SPREAD),
    }
    return model | ({"labels": str(labels)} if labels else {})


def detector(weights: Path, labels: Path | None = None, **fields: object) -> Detector:
    spec = job_spec(Path("/unused"), Path("/unused"), spread_model(weights, labels), task(**fields))
    return Detector(spec)


def calibrate_batch_norms(backbone: torch.nn.Module, transform: torch.nn.Module) -> None:
    """Each batch norm's running statistics become those of its inputs on noise images."""
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batch
    rng = np.random.default_rng(7)
    noise = [torch.from_numpy(rng.random((3, 100, 140), dtype=np.float32)) for _ in range(4)]
    backbone.train()
    with torch.no_grad():
        backbone(transform(noise)[0].tensors)
    backbone.eval()


def images_batch(shapes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    images = np.empty(len(shapes), dtype=object)
    images[:] = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    status = np.array([STATUS_OK] * len(shapes), dtype=object)
    return {"image": images, "status": status, "source_uri": np.arange(len(shapes))}


def nan_for_the_second_image(output):  # type: ignore[no-untyped-def]
    """A module's output, every batch-first tensor in it NaN for the batch's second image."""
    if isinstance(output, torch.Tensor):
        return torch.cat([output[:1], torch.full_like(output[1:2], float("nan")), output[2:]])
    if isinstance(output, dict):
        return type(output)((k, nan_for_the_second_image(v)) for k, v in output.items())
    return type(output)(nan_for_the_second_image(v) for v in output)


@pytest.mark.parametrize("part", ["backbone.body", "rpn.head.cls_logits"])
def test_nan_features_of_one_image_are_an_error_row_not_zero_boxes(spread_detector, part) -> None:
    """NaN in a detector's features or region proposals for one image (an overflow in
    float16) gives NaN scores that its own score threshold drops: zero boxes, an ok row. It
    is an error row naming why; the batch's other images keep the boxes a clean model gives."""
    clean, poisoned = detector(spread_detector), detector(spread_detector)
    module = poisoned.module
    for attribute in part.split("."):
        module = getattr(module, attribute)
    module.register_forward_hook(lambda _m, _i, output: nan_for_the_second_image(output))
    batch = images_batch([(96, 96)] * 3)
    want, got = clean(batch), poisoned(batch)
    assert list(got["status"]) == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert got["error_type"][1] == "NonFiniteOutput"
    assert "its raw output" in got["error_message"][1]
    for row in (0, 2):
        assert len(want[DETECTIONS][row]) > 0
        np.testing.assert_allclose(got[DETECTIONS][row], want[DETECTIONS][row], atol=1e-5)


@pytest.mark.parametrize("architecture", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_nan_in_a_dense_heads_output_is_an_error_row(architecture) -> None:
    """RetinaNet and FCOS score in their `head`: NaN there for one image is its error row."""
    model = build(architecture)
    model.head.register_forward_hook(lambda _m, _i, output: nan_for_the_second_image(output))
    check = FeatureCheck(model)
    images = list(torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    with torch.inference_mode(), check.watching(len(images)) as finite:
        model(images)
    assert finite.tolist() == [True, False, True]


def test_a_watched_part_with_one_value_per_image_is_checked_too() -> None:
    """A backbone that pools to one score per image (a 1-D output, batch-first) is checked
    like the others, and only the calls made inside `watching` count."""

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            linear = torch.nn.LazyLinear(1)
            self.backbone = torch.nn.Sequential(torch.nn.Flatten(1), linear, torch.nn.Flatten(0))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.backbone(images)

    model = Pooled()
    check = FeatureCheck(model)
    images = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(2))
    model(torch.full_like(images, float("nan")))  # outside: not counted
    images[1, 0, 0] = float("nan")
    with torch.inference_mode(), check.watching(len(images)) as finite:
        model(images)
    assert finite.tolist() == [True, False, True]


def test_filters_change_the_output_exactly_as_specified(spread_detector, labels_file) -> None:
    batch = images_batch([(100, 140)])
    (everything,) = detector(spread_detector, labels_file, max_detections=100)(batch)[DETECTIONS]
    assert len(everything) > 10
    median = float(np.median(everything[:, 1]))
    cars_above = everything[(everything[:, 0] == 1) & (everything[:, 1] >= median)]
    cases = [
        ({"score_threshold": median}, everything[everything[:, 1] >= median]),
        ({"max_detections": 3}, everything[:3]),
        ({"classes": ["truck", 4]}, everything[np.isin(everything[:, 0], [2, 4])]),
        ({"classes": ["car"], "max_detections": 2, "score_threshold": median}, cars_above[:2]),
    ]
    for fields, expected in cases:
        fields = {"max_detections": 100} | fields
        (found,) = detector(spread_detector, labels_file, **fields)(batch)[DETECTIONS]
        np.testing.assert_allclose(found, expected, atol=1e-5, err_msg=str(fields))
        assert (np.diff(found[:, 1]) <= 0).all()  # best first


def test_the_spread_detectors_best_boxes_are_not_near_ties(spread_detector) -> None:
    """What the GPU tests compare box by box: the order of the best boxes is the scores',
    not a tie's (an uncalibrated random backbone gave every box the same score)."""
    batch = images_batch([(100, 140), (100, 140), (90, 120)])
    for found in detector(spread_detector)(batch)[DETECTIONS]:
        assert len(set(found[:, 0])) > 1  # several labels
        assert (-np.diff(found[:6, 1])).min() > 1e-3


def test_nms_override_and_threshold_reach_the_model(spread_detector) -> None:
    heads = detector(spread_detector, nms_iou=0.3, score_threshold=0.2).module.roi_heads
    assert heads.nms_thresh == 0.3
    assert heads.score_thresh == pytest.approx(0.2) and heads.score_thresh < np.float32(0.2)


def test_unknown_class_name_is_refused(spread_detector, labels_file) -> None:
    with pytest.raises(ModelError, match=r"task\.classes: no label 'boat'; expected one of"):
        detector(spread_detector, labels_file, classes=["boat"])


def test_mixed_sizes_in_one_batch_equal_single_image_calls(spread_detector) -> None:
    torch.set_num_threads(1)
    batch = images_batch([(100, 140), (60, 80), (100, 140), (140, 100)])
    batch["status"][1] = STATUS_ERROR
    model = detector(spread_detector, max_detections=10)
    together = model(batch)[DETECTIONS]
    assert len(together[1]) == 0  # the error row keeps no boxes
    for index in (0, 2, 3):
        single = {name: values[index : index + 1] for name, values in batch.items()}
        np.testing.assert_allclose(together[index], model(single)[DETECTIONS][0], atol=1e-4)


def test_pixel_budget_groups_same_sizes_within_budget() -> None:
    shapes = [(10, 10), (20, 10), (10, 10), (10, 10), (20, 10), (50, 50)]
    assert pixel_budget_groups(shapes, budget=250) == [[0, 2], [3], [1], [4], [5]]
    assert pixel_budget_groups(shapes, budget=10_000) == [[0, 2, 3], [1, 4], [5]]


def test_duckdb_counts_boxes_per_label(ray_local, spread_detector, labels_file, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write_images(folder)
    model = spread_model(spread_detector, labels_file)
    run_job(job_spec(folder, tmp_path / "table", model, task(max_detections=7)))
    (file,) = (tmp_path / "table").glob("run_date=*/*.parquet")
    assert pq.read_schema(file).equals(DETECTION_SCHEMA, check_metadata=False)
    con, table = connect(), str(tmp_path / "table")
    total = con.sql(f"SELECT sum(num_detections) FROM {read_sql(table)}").fetchone()[0]
    per_label = dict(
        con.sql(f"SELECT label, count(*) FROM ({boxes_sql(table)}) GROUP BY label").fetchall()
    )
    assert total == sum(per_label.values()) > 0
    expected: dict[str, int] = {}
    for row in pq.read_table(file).to_pylist():
        for box in row["detections"]:
            expected[box["label"]] = expected.get(box["label"], 0) + 1
    assert per_label == expected and set(per_label) <= set(LABELS[1:])


@pytest.mark.parametrize("architecture", torchvision_architectures("detection"))
def test_configure_detector_sets_every_family(architecture) -> None:
    model = build(architecture)
    configure_detector(model, task(score_threshold=0.25, nms_iou=0.4), keep_all=False)
    head = getattr(model, "roi_heads", model)
    assert (head.nms_thresh, head.detections_per_img) == (0.4, 15)
    assert head.score_thresh == pytest.approx(0.25, abs=1e-6)


def test_torchscript_entrypoint_and_s3_weight_kinds_detect_alike(
    spread_detector, tmp_path, s3fs_client, s3_options
) -> None:
    """The same detector loaded as a file, from s3:// with a sha256 pin, as TorchScript and
    through an entrypoint gives the same boxes."""
    import hashlib

    model = build(SPREAD)
    model.load_state_dict(torch.load(spread_detector, weights_only=True))
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(scripted))
    s3fs_client.put_file(str(spread_detector), "models/detector/spread.pt")
    digest = hashlib.sha256(spread_detector.read_bytes()).hexdigest()
    kinds = {
        "file": spread_model(spread_detector),
        "s3": spread_model(spread_detector)
        | {"weights": "s3://models/detector/spread.pt", "weights_sha256": digest},
        "torchscript": {"kind": "torchscript", "uri": str(scripted)},
        "entrypoint": {
            "kind": "entrypoint",
            "entrypoint": f"torchvision.models.detection:{SPREAD}",
            "kwargs": {"weights": None, "weights_backbone": None, "num_classes": CLASSES}
            | fast_kwargs(SPREAD),
            "weights": str(spread_detector),
        },
    }
    batch = images_batch([(100, 140), (90, 90)])
    results = {}
    for name, model_spec in kinds.items():
        spec = job_spec(Path("/unused"), Path("/unused"), model_spec, task(max_detections=20))
        spec = spec.model_copy(update={"storage_options": s3_options})
        results[name] = Detector(spec)(batch)[DETECTIONS]
    for name in ("s3", "torchscript", "entrypoint"):
        for got, want in zip(results[name], results["file"], strict=True):
            assert len(want) > 0
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=name)


def test_weights_enum_gives_coco_labels_without_download() -> None:
    from vision_ops.models import resolve_labels

    spec = job_spec(
        Path("/unused"),
        Path("/unused"),
        {"architecture": "fasterrcnn_resnet50_fpn_v2", "weights": "DEFAULT"},
        task(),
    )
    labels = resolve_labels(spec.model)
    assert labels is not None and labels[:3] == ["__background__", "person", "bicycle"]


def test_a_detectors_labels_without_the_background_are_refused(spread_detector, tmp_path) -> None:
    """num_classes 5 counts the background as id 0: four names (no background) would name
    every box after the class above its own; refused before any work, naming the rule."""
    from vision_ops.models import check_job

    short = tmp_path / "labels.txt"
    short.write_text("\n".join(LABELS[1:]))
    spec = job_spec(Path("/unused"), Path("/unused"), spread_model(spread_detector, short), task())
    with pytest.raises(
        ModelError,
        match=r"^model.labels: a torchvision detector's class ids "
        r"count the background as 0; expected 5 labels .* found 4$",
    ):
        check_job(spec)
    whole = tmp_path / "whole.txt"
    whole.write_text("\n".join(LABELS))
    check_job(
        job_spec(Path("/unused"), Path("/unused"), spread_model(spread_detector, whole), task())
    )


def test_an_image_the_detector_cannot_take_is_its_error_row(spread_detector) -> None:
    """A 1 x 2000 strip: the detector's own resize makes it 0 pixels high and the call fails.
    The batch is run image by image: the strip is an error row, its neighbours keep exactly
    the boxes they get alone. Where every image of a batch fails (a batch of one too), they are
    error rows if the model still takes the smallest image it took, or before it took one, a
    small black image; the model's error is raised where it no longer takes it (a device
    lost), from the first batch on."""
    model = detector(spread_detector)

    def batch_of(shapes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        batch = images_batch(shapes)
        batch["error_type"] = np.full(len(shapes), None, dtype=object)
        batch["error_message"] = np.full(len(shapes), None, dtype=object)
        return batch

    batch = batch_of([(60, 80), (1, 2000), (60, 80)])
    out = model(batch)
    assert list(out["status"]) == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert out["error_type"][1] == "RuntimeError" and out["error_message"][1]
    for index in (0, 2):
        alone = np.zeros(3, dtype=bool)
        alone[index] = True
        expected = model.predict_rows(batch["image"], alone)[DETECTIONS][index]
        np.testing.assert_array_equal(out[DETECTIONS][index], expected)
    for taken in (model, detector(spread_detector)):  # it took the 60 x 80 images, or none
        for shapes in ([(1, 2000), (1, 3000)], [(1, 2000)]):
            out = taken(batch_of(shapes))  # the strips are at fault, not the model
            assert list(out["status"]) == [STATUS_ERROR] * len(shapes)
            assert set(out["error_type"]) == {"RuntimeError"}
    assert model._good_image is not None and model._good_image.shape == (60, 80, 3)

    def device_lost(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for taken in (model, detector(spread_detector)):
        taken.module = device_lost  # type: ignore[assignment]
        with pytest.raises(RuntimeError, match="illegal memory access"):
            taken(batch_of([(60, 80)]))
