"""The YOLO output adapter: a tiny TorchScript and ONNX model with the YOLO layout and known
outputs; decoded boxes equal hand-computed ones, letterbox un-mapping and per-class NMS
included; the adapter registry takes another layout as one registered function."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vision_ops.adapters import LAYOUTS, letterbox_geometry, to_source_pixels
from vision_ops.config import parse_spec
from vision_ops.errors import ModelError
from vision_ops.models import load_model
from vision_ops.pipeline import run_job

# Four cells of a 2-class model, as (cx, cy, w, h, score class 0, score class 1), in the
# 320 x 320 letterbox.
CELLS = [
    (160.0, 160.0, 32.0, 16.0, 0.90, 0.10),  # A: class 0
    (162.0, 161.0, 32.0, 16.0, 0.80, 0.05),  # overlaps A, class 0: NMS drops it
    (162.0, 161.0, 32.0, 16.0, 0.10, 0.85),  # B: overlaps A but class 1: kept
    (10.0, 10.0, 8.0, 8.0, 0.20, 0.10),  # below the 0.5 threshold
]
# A 200 x 100 image in a 320 letterbox: scale 1.6, resized 320 x 160, 80 rows of pad on top.
# A: x (160 -+ 16) / 1.6 = 90 .. 110; y (160 -+ 8 - 80) / 1.6 = 45 .. 55.
# B: x (162 -+ 16) / 1.6 = 91.25 .. 111.25; y (161 -+ 8 - 80) / 1.6 = 45.625 .. 55.625.
EXPECTED = [  # label_id, score, x_min, y_min, x_max, y_max
    (0, 0.90, 90.0, 45.0, 110.0, 55.0),
    (1, 0.85, 91.25, 45.625, 111.25, 55.625),
]


class FixedYolo(torch.nn.Module):
    """Answers every image with CELLS in the YOLO layout (batch, 4 + classes, cells)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cells", torch.tensor(CELLS).T[None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.cells.expand(images.shape[0], -1, -1) + 0 * images.mean()


class NanOnBrightImages(FixedYolo):
    """FixedYolo, but NaN predictions for a bright letterboxed image (as float16 overflows)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cells = super().forward(images)
        bright = (images.mean(dim=(1, 2, 3)) > 0.6)[:, None, None]
        return torch.where(bright, torch.full_like(cells, float("nan")), cells)


def export(tmp_path: Path, fmt: str, model: torch.nn.Module | None = None) -> Path:
    model = (model or FixedYolo()).eval()
    example = torch.zeros(1, 3, 320, 320)
    if fmt == "torchscript":
        path = tmp_path / "yolo.pt"
        torch.jit.save(torch.jit.trace(model, example), str(path))
        return path
    path = tmp_path / "yolo.onnx"
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (example,), buffer, dynamo=False, input_names=["images"],
        dynamic_axes={"images": {0: "batch"}},
    )  # fmt: skip
    path.write_bytes(buffer.getvalue())
    return path


def test_letterbox_geometry_and_unmapping_by_hand() -> None:
    assert letterbox_geometry(100, 200, 320) == (1.6, 160, 320, 80, 0)
    # 300 x 100 (h x w): scale 320 / 300, width round(106.67) = 107, left pad (320 - 107) // 2 = 106
    assert letterbox_geometry(300, 100, 320)[1:] == (320, 107, 0, 106)
    boxes = torch.tensor([[144.0, 152.0, 176.0, 168.0]])
    np.testing.assert_allclose(to_source_pixels(boxes, 100, 200, 320), [[90, 45, 110, 55]])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_yolo_model_through_the_pipeline_gives_hand_computed_boxes(
    fmt, ray_local, tmp_path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(images / "wide.png")
    model = {"kind": fmt, "uri": str(export(tmp_path, fmt)), "adapter": {"input_size": 320}}
    spec = parse_spec(
        {
            "input": {"uris": [str(images)]},
            "task": {"kind": "detection", "score_threshold": 0.5, "nms_iou": 0.5},
            "model": model,
            "runtime": {"batch_size": 2, "max_actors": 1},
            "output": {"uri": str(tmp_path / "table")},
            "run": {"id": fmt, "date": "2026-11-24"},
        }
    )
    run_job(spec)
    (row,) = pq.read_table(tmp_path / "table").to_pylist()
    keys = ("label_id", "score", "x_min", "y_min", "x_max", "y_max")
    found = [tuple(box[k] for k in keys) for box in row["detections"]]
    np.testing.assert_allclose(found, EXPECTED, atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_nan_predictions_for_an_image_are_an_error_row_not_zero_boxes(fmt, tmp_path) -> None:
    """The adapter's score threshold drops NaN scores: the image would be an ok row of no
    boxes. It is an error row; the black image beside it keeps the hand-computed boxes."""
    from vision_ops.predictors import Detector
    from vision_ops.schema import DETECTIONS, STATUS_ERROR, STATUS_OK

    exported = export(tmp_path, fmt, NanOnBrightImages())
    spec = parse_spec(
        {
            "input": {"uris": ["unused"]},
            "task": {"kind": "detection", "score_threshold": 0.5, "nms_iou": 0.5},
            "model": {"kind": fmt, "uri": str(exported), "adapter": {"input_size": 320}},
            "output": {"uri": "unused"},
        }
    )
    images = np.zeros((2, 100, 200, 3), np.uint8)
    images[1] = 255  # bright
    batch = {"image": images, "status": np.array([STATUS_OK] * 2, dtype=object)}
    out = Detector(spec)(batch | {"source_uri": np.array(["black", "white"], dtype=object)})
    assert list(out["status"]) == [STATUS_OK, STATUS_ERROR]
    assert out["error_type"][1] == "NonFiniteOutput"
    np.testing.assert_allclose(out[DETECTIONS][0], EXPECTED, atol=1e-4)


def test_another_layout_is_one_registered_function(tmp_path) -> None:
    @LAYOUTS.register("xyxy-test")
    def decode_xyxy(raw: torch.Tensor):  # type: ignore[no-untyped-def]
        return raw[:, :4], raw[:, 4], raw[:, 5].long()

    assert "xyxy-test" in LAYOUTS
    bad = parse_spec(
        {
            "input": {"uris": ["x"]},
            "task": {"kind": "detection"},
            "model": {"kind": "onnx", "uri": "m.onnx", "adapter": {"layout": "nope"}},
            "output": {"uri": "o"},
        }
    )
    from vision_ops.models import check_model

    with pytest.raises(ModelError, match="unknown output layout 'nope'; expected one of"):
        check_model(bad.model, "detection")
    with pytest.raises(ModelError, match="output adapters decode detectors"):
        load_model(bad.model.model_copy(update={"uri": str(export(tmp_path, "onnx"))}), {})


def test_an_onnx_model_takes_the_actors_thread_count(tmp_path) -> None:
    """The actor sets torch's threads to its share of the node; onnxruntime's default would
    be every core in each actor."""
    from vision_ops.adapters import OnnxModule

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        module = OnnxModule(export(tmp_path, "onnx").read_bytes())
    finally:
        torch.set_num_threads(before)
    assert module.session.get_session_options().intra_op_num_threads == 1
