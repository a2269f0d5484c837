"""Semantic segmentation: each torchvision segmenter (random weights from a file) through the
pipeline equals a direct model call — class fractions and the mask written beside the table —
masks follow the commit protocol, and a georeferenced tile's mask is a GeoTIFF on the tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
import torchvision
from PIL import Image
from rasterio.transform import from_origin
from torchvision import transforms

from vision_ops.config import parse_spec
from vision_ops.models import torchvision_architectures
from vision_ops.pipeline import run_job
from vision_ops.predictors import Segmenter
from vision_ops.sink import committed_run, committed_runs

pytestmark = pytest.mark.timeout(900)
CLASSES = 4
PREP = {"resize": 64, "crop": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def build(architecture: str) -> torch.nn.Module:
    torch.manual_seed(0)
    builder = torchvision.models.get_model_builder(architecture)
    return builder(weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=None).eval()


def spec_for(inputs: str, output: Path, architecture: str, weights: Path, **extra):  # type: ignore[no-untyped-def]
    return parse_spec(
        {
            "input": {"uris": [inputs]},
            "task": {"kind": "segmentation"},
            "model": {
                "architecture": architecture,
                "weights": str(weights),
                "num_classes": CLASSES,
                "labels": str(output.parent / "labels.txt"),
                "preprocessing": PREP,
            },
            "runtime": {"batch_size": 4, "max_actors": 1, "intra_op_threads": 1},
            "output": {"uri": str(output)},
            "run": {"id": "seg", "date": "2026-11-24"},
        }
        | extra
    )


@pytest.mark.parametrize("architecture", torchvision_architectures("segmentation"))
def test_pipeline_equals_a_direct_call(architecture, ray_local, tmp_path) -> None:
    torch.set_num_threads(1)  # the actor's (runtime.intra_op_threads): the same kernels and sums
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    photos = {f"img{i}.png": rng.integers(0, 256, (80, 96, 3), dtype=np.uint8) for i in range(3)}
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(images / name)
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "labels.txt").write_text("background\nroad\nwater\nbuilding\n")
    model = build(architecture)
    weights = tmp_path / "seg.pt"
    torch.save(model.state_dict(), weights)
    run_job(spec_for(str(images), tmp_path / "table", architecture, weights))

    rows = {Path(r["source_uri"]).name: r for r in pq.read_table(tmp_path / "table").to_pylist()}
    assert rows["broken.png"]["status"] == "error" and rows["broken.png"]["mask_uri"] is None
    preprocess = transforms.Compose(
        [transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(),
         transforms.Normalize(PREP["mean"], PREP["std"])]
    )  # fmt: skip
    batch = torch.stack([preprocess(Image.fromarray(p)) for p in photos.values()])
    with torch.inference_mode():
        logits = model(batch)["out"]
    top2 = logits.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]).abs().numpy() < 1e-4
    expected = logits.argmax(dim=1).numpy()
    names = ["background", "road", "water", "building"]
    for index, name in enumerate(photos):
        row = rows[name]
        assert row["mask_uri"].startswith(
            f"file://{tmp_path}/table/_masks/run_date=2026-11-24/seg/"
        )
        mask = np.asarray(Image.open(row["mask_uri"].removeprefix("file://")))
        assert mask.shape == (64, 64)
        differs = mask != expected[index]
        assert not (differs & ~near_tie[index]).any(), name
        counts = np.bincount(mask.ravel(), minlength=CLASSES) / mask.size
        got = {e["label"]: e["fraction"] for e in row["class_fractions"]}
        assert got == pytest.approx({names[c]: counts[c] for c in np.flatnonzero(counts)})
        assert row["label"] == names[int(np.argmax(counts))]
        assert row["fraction"] == pytest.approx(counts.max())
    manifest = committed_runs(str(tmp_path / "table"))[0]
    assert manifest["ok"] == 3 and not (tmp_path / "table" / "_staging").exists()


@pytest.mark.parametrize("predict_in", ["actors", "driver"])
def test_masks_follow_the_commit_and_a_rerun_replaces_them(ray_local, tmp_path, predict_in) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")
    weights = tmp_path / "seg.pt"
    torch.save(build("lraspp_mobilenet_v3_large").state_dict(), weights)
    runtime = {"batch_size": 4, "max_actors": 1, "intra_op_threads": 1, "predict_in": predict_in}
    spec = spec_for(
        str(images), tmp_path / "table", "lraspp_mobilenet_v3_large", weights, runtime=runtime
    )
    run_job(spec)
    folder = tmp_path / "table" / "_masks" / "run_date=2026-11-24" / "seg"
    [attempt] = list(folder.iterdir())  # one folder per commit attempt
    first = sorted(p.name for p in attempt.iterdir())
    assert len(first) == 2
    assert committed_run(str(tmp_path / "table"), "seg")["masks_folder"] == f"file://{attempt}"
    (images / "1.png").unlink()
    run_job(spec)  # the same run id: its rows and its masks are replaced
    [rerun] = list(folder.iterdir())
    [kept] = [p.name for p in rerun.iterdir()]
    assert rerun != attempt and kept in first
    [row] = pq.read_table(tmp_path / "table" / "run_date=2026-11-24").to_pylist()
    assert row["mask_uri"] == f"file://{rerun}/{kept}"


@pytest.mark.parametrize("predict_in", ["actors", "driver"])
def test_a_georeferenced_tile_gets_a_geotiff_mask_on_the_tile(
    ray_local, tmp_path, predict_in
) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    transform = from_origin(600_000.0, 5_200_000.0, 20.0, 20.0)
    profile = {
        "driver": "GTiff", "width": 128, "height": 64, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32632", "transform": transform,
    }  # fmt: skip
    with rasterio.open(scenes / "scene.tif", "w", **profile) as out:
        out.write(np.random.default_rng(2).integers(0, 256, (3, 64, 128), dtype=np.uint8))
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")
    weights = tmp_path / "seg.pt"
    torch.save(build("lraspp_mobilenet_v3_large").state_dict(), weights)
    spec = spec_for(
        str(scenes), tmp_path / "table", "lraspp_mobilenet_v3_large", weights,
        input={"uris": [str(scenes)], "tiling": {"size": 64}},
        runtime={"batch_size": 4, "max_actors": 1, "intra_op_threads": 1, "predict_in": predict_in},
    )  # fmt: skip
    from test_pipeline import predictor_actors

    before = predictor_actors()
    run_job(spec)
    assert len(predictor_actors() - before) == (predict_in == "actors")  # max_actors: 1
    rows = sorted(pq.read_table(tmp_path / "table").to_pylist(), key=lambda r: r["tile_x"])
    assert [r["tile_x"] for r in rows] == [0, 64]
    for row in rows:
        assert row["mask_uri"].endswith(".tif")
        with rasterio.open(row["mask_uri"].removeprefix("file://")) as mask:
            assert mask.crs.to_epsg() == 32632 and mask.shape == (64, 64)  # crop 64 of a 64 tile
            assert mask.transform == transform @ rasterio.Affine.translation(row["tile_x"], 0)


def test_a_compiled_segmenter_predicts_like_the_plain_one(tmp_path) -> None:
    torch.set_num_threads(1)
    architecture = "lraspp_mobilenet_v3_large"
    torch.save(build(architecture).state_dict(), tmp_path / "seg.pt")
    (tmp_path / "labels.txt").write_text("background\nroad\nwater\nbuilding\n")
    images = np.random.default_rng(6).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    masks = {}
    for compile_model in (False, True):
        spec = spec_for(str(tmp_path), tmp_path / "table", architecture, tmp_path / "seg.pt")
        runtime = spec.runtime.model_copy(update={"compile": compile_model})
        segmenter = Segmenter(spec.model_copy(update={"runtime": runtime}))
        masks[compile_model] = segmenter.segment(images)  # 3 images, padded to batch_size 4
    assert masks[True].shape == (3, 64, 64)
    assert (masks[True] == masks[False]).mean() > 0.999  # fused kernels: near ties may flip
