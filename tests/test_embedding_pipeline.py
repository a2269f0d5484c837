"""Embeddings end to end: photos on SeaweedFS through the real pipeline with the pretrained
EfficientNet-Lite0 (packaged weights), the vectors against a direct model call, a crop of a
photo finding its source through `vision-ops query --similar-to`, and a corrupt file's error
row; a headless model refused before any work."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms

from vision_ops.cli import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK, main
from vision_ops.config import parse_spec
from vision_ops.embedding import EMBEDDING_COLUMN
from vision_ops.embedding_predictor import Embedder, HeadNotFound
from vision_ops.models import check_job
from vision_ops.pipeline import run_job
from vision_ops.zoo import efficientnet_lite0

pytestmark = pytest.mark.timeout(600)
MEAN, STD = [0.498] * 3, [0.502] * 3
LITE0 = {
    "kind": "entrypoint",
    "entrypoint": "vision_ops.zoo:efficientnet_lite0",
    "name": "efficientnet_lite0",
    "preprocessing": {"resize": 256, "crop": 224, "mean": MEAN, "std": STD},
}
CROP = "chelsea-crop.png"  # the middle of chelsea.png (the cat's face), half its size


def embedding_job(inputs: list[str], output: str, **extra: object) -> dict[str, object]:
    return {
        "input": {"uris": inputs},
        "task": {"kind": "embedding"},
        "model": LITE0,
        "runtime": {"batch_size": 4, "max_actors": 1},
        "output": {"uri": output},
        "run": {"id": "embed-1", "date": "2026-11-24"},
    } | extra


def crop_of(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGB")
    width, height = image.size
    return image.crop((width // 4, height // 4, 3 * width // 4, 3 * height // 4))


def direct_vectors(images: list[Image.Image]) -> np.ndarray:
    """The pretrained model with its `_fc` dropped, on torchvision's preprocessing, normalised."""
    model = efficientnet_lite0().eval()
    model._fc = torch.nn.Identity()
    preprocess = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    with torch.inference_mode():
        features = model(torch.stack([preprocess(image) for image in images]))
    return torch.nn.functional.normalize(features, dim=1).numpy()


@pytest.fixture(scope="module")
def photos_with_a_crop(photo_paths: list[Path]) -> dict[str, bytes]:
    """The sample photos, a crop of one, and a truncated JPEG, by file name."""
    files = {path.name: path.read_bytes() for path in photo_paths}
    buffer = io.BytesIO()
    crop_of(photo_paths[0]).save(buffer, format="PNG")
    files[CROP] = buffer.getvalue()
    files["truncated.jpg"] = files["rocket.jpg"][: len(files["rocket.jpg"]) // 3]
    return files


def test_the_embedder_called_directly_equals_the_model_without_its_head(photo_paths):
    spec = parse_spec(embedding_job(["/tmp"], "/tmp/unused"))
    embedder = Embedder(spec)
    images = [Image.open(p).convert("RGB") for p in photo_paths[:2]]
    crops = [np.asarray(transforms.CenterCrop(224)(transforms.Resize(256)(i))) for i in images]
    vectors = embedder.embed(np.stack(crops))
    assert vectors.shape == (2, 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors, direct_vectors(images), atol=2e-5)


def test_a_model_without_a_findable_head_is_refused_before_any_work(tmp_path):
    raw = embedding_job([str(tmp_path / "none")], str(tmp_path / "out"))
    spec = parse_spec(raw | {"model": {"kind": "torchvision", "architecture": "squeezenet1_1"}})
    with pytest.raises(HeadNotFound, match=r"SqueezeNet\.classifier: expected the classification"):
        check_job(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw | {"model": {"kind": "torchscript", "uri": "/x.pt"}}))
    assert main(["validate", str(path)]) == EXIT_BAD_SPEC
    assert not (tmp_path / "out").exists()


@pytest.mark.s3
def test_photos_on_s3_embed_and_a_crop_finds_its_source(
    ray_local, seaweed, s3fs_client, s3_options, photos_with_a_crop, tmp_path, capsys
):
    for name, data in photos_with_a_crop.items():
        s3fs_client.pipe_file(f"images/embed/{name}", data)
    output = "s3://out/embeddings"
    raw = embedding_job(["s3://images/embed/"], output, storage_options=s3_options)
    summary = run_job(parse_spec(raw))
    assert (summary.commit.ok, summary.commit.errors) == (len(photos_with_a_crop) - 1, 1)

    files = s3fs_client.glob("out/embeddings/run_date=2026-11-24/*.parquet")
    table = pa.concat_tables([pq.read_table(f, filesystem=s3fs_client) for f in files])
    assert table.schema.field(EMBEDDING_COLUMN).type == pa.list_(pa.float32(), 1280)
    rows = {Path(r["source_uri"]).name: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(photos_with_a_crop)
    bad = rows.pop("truncated.jpg")
    assert (bad["status"], bad["error_type"]) == ("error", "CorruptImage")
    assert np.isnan(bad[EMBEDDING_COLUMN]).all()
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert {(r["model_name"], r["task"]) for r in rows.values()} == {
        ("efficientnet_lite0", "embedding")
    }
    names = sorted(rows)
    vectors = np.array([rows[n][EMBEDDING_COLUMN] for n in names], dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    images = [Image.open(io.BytesIO(photos_with_a_crop[n])).convert("RGB") for n in names]
    np.testing.assert_allclose(vectors, direct_vectors(images), atol=2e-5)

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    crop_uri = "s3://images/embed/" + CROP
    args = ["query", str(spec_file), "--similar-to", crop_uri, "-k", "3", "--format", "csv"]
    assert main(args) == EXIT_OK
    lines = capsys.readouterr().out.strip().splitlines()
    header = (
        "query_source_uri,query_item_id,query_frame_index,query_tile_x,query_tile_y,rank,"
        "similarity,source_uri,item_id,frame_index,tile_x,tile_y"
    )
    assert lines[0] == header
    neighbours = [[n[0], *n[5:]] for n in (line.split(",") for line in lines[1:])]
    assert neighbours[0][3] == "s3://images/embed/chelsea.png"  # the source first
    assert [int(n[1]) for n in neighbours] == [1, 2, 3]
    similarities = [float(n[2]) for n in neighbours]
    assert similarities == sorted(similarities, reverse=True)
    crop_index, source_index = names.index(CROP), names.index("chelsea.png")
    assert similarities[0] == pytest.approx(
        float(vectors[crop_index] @ vectors[source_index]), abs=1e-5
    )
    # the crop and its source are the only pair this similar
    assert main(["query", str(spec_file), "--duplicates", str(similarities[0] - 1e-4),
                 "--format", "csv"]) == EXIT_OK  # fmt: skip
    pairs = capsys.readouterr().out.strip().splitlines()[1:]
    assert [sorted(p.split(",")[:2]) for p in pairs] == [
        [crop_uri, "s3://images/embed/chelsea.png"]
    ]
    assert main(["report", str(spec_file)]) == EXIT_OK
    report = capsys.readouterr().out
    assert "items: 7  ok: 6  errors: 1" in report
    assert "scores (cosine similarity to the nearest other unit)" in report
    assert re.search(r"top labels \(units per model\):\n +6  efficientnet_lite0\n", report)
    missing = ["query", str(spec_file), "--similar-to", "s3://images/embed/truncated.jpg"]
    assert main(missing) == EXIT_FAILED
    assert "expected the source URI or item id of an embedded unit" in capsys.readouterr().err


def test_a_torchvision_model_with_weights_from_a_file_embeds(tiny_weights, photo_paths):
    """mobilenet_v3_small fine-tuned to 4 classes (a state_dict file): its pre-logits, D 1024."""
    import torchvision

    model = {
        "kind": "torchvision",
        "architecture": "mobilenet_v3_small",
        "weights": str(tiny_weights),
        "num_classes": 4,
        "preprocessing": {"resize": 256, "crop": 224, "mean": MEAN, "std": STD},
    }
    spec = parse_spec(embedding_job(["/tmp"], "/tmp/unused") | {"model": model})
    check_job(spec)
    embedder = Embedder(spec)
    crops = [
        np.asarray(transforms.CenterCrop(224)(transforms.Resize(256)(Image.open(p).convert("RGB"))))
        for p in photo_paths[:2]
    ]
    vectors = embedder.embed(np.stack(crops))
    reference = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    reference.load_state_dict(torch.load(tiny_weights, weights_only=True))
    reference.classifier[-1] = torch.nn.Identity()
    normalise = transforms.Normalize(MEAN, STD)
    batch = torch.stack([normalise(transforms.functional.to_tensor(c)) for c in crops])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(reference(batch), dim=1).numpy()
    assert vectors.shape == (2, 1024)
    np.testing.assert_allclose(vectors, expected, atol=2e-5)
