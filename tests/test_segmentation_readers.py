"""A segmentation run read back through the CLI: `query`'s default pixel-share summary and its
`pixels` view, `report` (class shares, masks over their images in the HTML), `evaluate` (mean
and per-class IoU against PNG masks matched by file name), and `verify`."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from vision_ops.cli import EXIT_OK, main
from vision_ops.masks import in_mask_frame
from vision_ops.tasks import get_task

pytestmark = pytest.mark.timeout(600)
HEIGHT, WIDTH, SIDE = 64, 80, 64  # sources are wider than the model's 64 x 64 input
RED, GREEN = (slice(10, 30), slice(20, 50)), (slice(34, 60), slice(30, 40))  # source pixels
CROP = (WIDTH - SIDE) // 2  # the columns the centre crop drops on each side


def _picture(region: tuple[slice, slice], channel: int) -> np.ndarray:
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[(*region, channel)] = 255
    return pixels


def _mask(*regions: tuple[tuple[slice, slice], int]) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    for region, value in regions:
        mask[region] = value
    return mask


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A committed run of the colour segmenter over a red square, a green one and a broken
    file, with ground truth: the red square right (and a band not to score), the green square
    labelled red (wrong), and the broken file all background."""
    folder = tmp_path_factory.mktemp("segmentation")
    images, truth = folder / "images", folder / "truth"
    images.mkdir()
    truth.mkdir()
    Image.fromarray(_picture(RED, 0)).save(images / "red.png")
    Image.fromarray(_picture(GREEN, 1)).save(images / "green.jpg", quality=100, subsampling=0)
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    band = (slice(0, 3), slice(0, WIDTH))
    Image.fromarray(_mask((RED, 1), (band, 255))).save(truth / "red.png")
    Image.fromarray(_mask((GREEN, 1))).save(truth / "green.png")
    # over the whole source, as truth is: scored in the masks' frame like the others
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(truth / "broken.png")
    (folder / "labels.txt").write_text("background\nred\ngreen\n")
    spec = {
        "input": {"uris": [str(images)]},
        "task": {"kind": "segmentation"},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "toy_models:colour_segmenter",
            "labels": str(folder / "labels.txt"),
            "preprocessing": {"resize": SIDE, "crop": SIDE, "mean": [0.0] * 3, "std": [1.0] * 3},
        },
        "runtime": {"batch_size": 4, "max_actors": 1, "intra_op_threads": 1},
        "output": {"uri": str(folder / "table")},
        "run": {"id": "seg", "date": "2026-11-24"},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(folder / "job.yaml")]) == EXIT_OK
    return folder


def test_the_masks_are_the_colours(run) -> None:  # type: ignore[no-untyped-def]
    rows = {Path(r["source_uri"]).name: r for r in pq.read_table(run / "table").to_pylist()}
    red = np.asarray(Image.open(rows["red.png"]["mask_uri"].removeprefix("file://")))
    expected = _mask((RED, 1))[:, CROP : CROP + SIDE]
    assert red.shape == (SIDE, SIDE) and (red == expected).all()
    assert rows["broken.png"]["status"] == "error" and rows["broken.png"]["mask_uri"] is None


def test_query_default_is_the_pixel_share_per_class(run, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["query", str(run / "table"), "--format", "csv"]) == EXIT_OK
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "label,pixel_share,images"
    shares = {
        line.split(",")[0]: (float(line.split(",")[1]), int(line.split(",")[2]))
        for line in lines[1:]
    }
    red, green = 20 * 30 / SIDE**2, 26 * 10 / SIDE**2
    assert shares["red"] == (pytest.approx(red / 2, abs=1e-4), 1)
    assert shares["green"] == (pytest.approx(green / 2, abs=1e-4), 1)
    assert shares["background"] == (pytest.approx(1 - (red + green) / 2, abs=1e-4), 2)
    sql = "SELECT label, count(*) AS n FROM pixels GROUP BY label ORDER BY label"
    assert main(["query", str(run / "table"), sql, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.split() == ["label,n", "background,2", "green,1", "red,1"]


def test_report_draws_class_shares_and_masks_over_images(run, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    page = tmp_path / "report.html"
    assert main(["report", str(run / "table"), "--html", str(page)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "run seg (2026-11-24, segmentation)" in text
    assert "items: 3  ok: 2  errors: 1" in text
    assert "top labels (share of pixels):" in text
    assert re.search(r"0\.8\d{3}  background", text)
    body = page.read_text()
    assert "Masks over their images" in body
    pictures = re.findall(r'src="data:image/png;base64,([^"]+)"', body)
    assert len(pictures) == 2
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(pictures[0]))))
    assert drawn.shape == (SIDE, SIDE, 3)


def test_evaluate_scores_iou_against_png_masks(run, capsys) -> None:  # type: ignore[no-untyped-def]
    truth = str(run / "truth")
    assert main(["evaluate", str(run / "table"), "--truth", truth]) == EXIT_OK
    metrics = {
        (r["metric"], r["label"]): r["value"]
        for r in pq.read_table(run / "table" / "_metrics" / "seg.parquet").to_pylist()
    }
    red, green = 20 * 30, 26 * 10  # both squares lie inside the crop
    band = 3 * SIDE  # class 255: not scored
    background = 2 * SIDE**2 - red - green - band  # predicted and true alike
    missed = SIDE**2  # the broken file's true pixels, all background, no prediction
    assert metrics[("iou", "background")] == pytest.approx(background / (background + missed))
    assert metrics[("iou", "red")] == pytest.approx(red / (red + green))
    assert metrics[("iou", "green")] == 0.0
    mean = (background / (background + missed) + red / (red + green)) / 3
    assert metrics[("mean_iou", None)] == pytest.approx(mean)
    assert metrics[("pixel_accuracy", None)] == pytest.approx(
        (background + red) / (background + red + green + missed)
    )
    assert metrics[("evaluated", None)] == 3 and metrics[("error_rows", None)] == 1
    assert f"mean_iou: {mean:.4f}" in capsys.readouterr().out
    overall = [name for name, label in metrics if label is None]
    assert tuple(overall) == get_task("segmentation").metrics  # what evaluate.min may name


def test_evaluate_refuses_another_truth_format(run, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["evaluate", str(run / "table"), "--truth", "x.json", "--truth-format", "coco"])
    assert code == 1
    assert "a segmentation run is scored against masks, found coco" in capsys.readouterr().err


def test_verify_holds(run, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["verify", str(run / "table")]) == EXIT_OK
    assert "3 units, each once" in capsys.readouterr().out


def test_truth_is_brought_into_the_mask_frame_as_the_reader_brings_images() -> None:
    """A 128 x 160 truth for a 64 x 64 mask: the shorter side halved (nearest), the longer
    cropped about the centre, as the reader resizes and crops the image."""
    truth = np.zeros((128, 160), np.uint8)
    truth[32:96, 40:120] = 7
    framed = in_mask_frame(truth, (SIDE, SIDE))
    expected = np.zeros((SIDE, SIDE), np.uint8)
    expected[16:48, 20 - 8 : 60 - 8] = 7  # halved, then 8 columns cropped on each side
    assert framed.shape == (SIDE, SIDE) and (framed == expected).all()
    assert in_mask_frame(expected, (SIDE, SIDE)) is expected  # already in the frame
