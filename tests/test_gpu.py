"""The GPU fast path on a CUDA device: nvJPEG batches, pinned uploads, autocast and a pipeline
whose actors hold a GPU. Skipped where torch sees no GPU (run them on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_detection import detector, images_batch, save_spread_detector
from test_device_decode import MAX_PIXELS, device_reference, photo, run_on_photos
from test_models import direct_logits, spec_for, tiny_classifier, torchvision_file_model

from vision_ops.decode import CorruptImage
from vision_ops.detection import as_rows, filter_detections
from vision_ops.device_decode import decode_batch
from vision_ops.predictors import Classifier, Detector, stack_on_device
from vision_ops.schema import DETECTIONS

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(tiny_classifier().state_dict(), path)
    return path


def test_nvjpeg_batches_decode_like_the_cpu_and_a_bad_file_falls_back() -> None:
    payloads = [photo(1), photo(2, (64, 80)), photo(3)[:200], photo(4, (300, 200))]
    on_gpu = decode_batch(payloads, CUDA, MAX_PIXELS)
    on_cpu = decode_batch(payloads, torch.device("cpu"), MAX_PIXELS)
    assert isinstance(on_gpu[2], CorruptImage) and isinstance(on_cpu[2], CorruptImage)
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        if isinstance(gpu, torch.Tensor):
            assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
            difference = (gpu.cpu().int() - cpu.int()).abs().float()  # IDCTs round differently
            assert difference.mean() < 1.5


@pytest.mark.parametrize("on_device", [(False, True, False), (False, False), (True, True)])
def test_host_and_device_images_stack_in_order_on_the_gpu(on_device: tuple[bool, ...]) -> None:
    """Host arrays (through pinned memory), device tensors, or a mix of both."""
    rng = np.random.default_rng(0)
    host = rng.integers(0, 256, (len(on_device), 8, 8, 3), dtype=np.uint8)
    pairs = zip(host, on_device, strict=True)
    images = [torch.from_numpy(h).to(CUDA) if gpu else h for h, gpu in pairs]
    batch = stack_on_device(images, CUDA)
    assert batch.device.type == "cuda"
    assert torch.equal(batch.cpu(), torch.from_numpy(host))


def test_bf16_autocast_ranks_like_float32(weights_file: Path) -> None:
    images = np.random.default_rng(3).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    spec = spec_for(torchvision_file_model(weights_file), top_k=3)
    spec = spec.model_copy(
        update={"runtime": spec.runtime.model_copy(update={"autocast": "bfloat16"})}
    )
    classifier = Classifier(spec)
    assert classifier.spec.runtime.batch_size == 256  # unsized: a whole GPU's batch
    ids, scores = classifier.predict(images)
    expected = direct_logits(tiny_classifier(), images).softmax(-1).topk(3)
    agree = (ids[:, 0] == expected.indices[:, 0].numpy()).mean()
    assert agree >= 0.9
    np.testing.assert_allclose(scores[:, 0], expected.values[:, 0].numpy(), atol=3e-2)


# Two actors on the one GPU (never run on a GPU before 2026-12-04; on the CPU, with a GPU
# declared to Ray, the same pool ran to the end), a photo a call so that both get work.
HALF_A_GPU_EACH = {
    "num_gpus_per_actor": 0.5,
    "num_cpus_per_actor": 0.5,
    "min_actors": 2,
    "batch_size": 1,
}


@pytest.mark.parametrize("pool", [{}, HALF_A_GPU_EACH], ids=["whole", "halves"])
def test_pipeline_on_a_gpu_with_nvjpeg_equals_direct_calls(
    ray_with_gpu: None, weights_file: Path, tmp_path: Path, pool: dict[str, object]
) -> None:
    """One actor with the whole GPU, or two actors with half of it each."""
    runtime = {"device": "cuda"} | pool
    payloads, summary, rows = run_on_photos(tmp_path, weights_file, 6, runtime)
    assert summary.commit.ok == len(rows) == len(payloads)
    jpegs = sorted(n for n in payloads if n.endswith(".jpg"))
    pixels = np.stack([device_reference(payloads[n]) for n in jpegs])
    expected = direct_logits(tiny_classifier(), pixels).softmax(-1).topk(1).indices[:, 0]
    found = {Path(r["source_uri"]).name: r["top_k"][0]["label_id"] for r in rows}
    agree = np.mean([found[n] == int(i) for n, i in zip(jpegs, expected, strict=True)])
    assert agree >= 5 / 6  # nvJPEG's IDCT is not libjpeg's: a near tie may flip


@pytest.fixture(scope="module")
def spread_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_spread_detector(tmp_path_factory.mktemp("detector"))


def test_detector_on_a_gpu_finds_the_cpus_boxes(
    spread_detector: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same-size images go up in one pinned batch; float32 on the GPU (TF32 off) gives the
    CPU's boxes."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    batch = images_batch([(100, 140), (100, 140), (90, 120)])
    on_cpu = detector(spread_detector)(batch)[DETECTIONS]
    on_gpu = gpu_detector(spread_detector, "off")(batch)[DETECTIONS]
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert len(gpu) == len(cpu) > 0
        np.testing.assert_allclose(gpu[:5], cpu[:5], atol=1e-2)


def test_bf16_detector_on_a_gpu_equals_direct_autocast_calls(spread_detector: Path) -> None:
    """bf16 through the predictor (pinned batches, autocast, filters) gives the boxes of the
    module called directly under bf16 autocast on the same batches, made as the predictor
    makes them. Against float32 on the CPU only the scores are held: a random-weight
    detector's bf16 boxes stray from its float32 ones (several pixels, an order changed, on
    the CPU's own bf16 autocast), but its best ten scores stay within 0.1 (0.045 there)."""
    batch = images_batch([(100, 140), (100, 140), (90, 120)])
    model = gpu_detector(spread_detector, "bfloat16")
    on_gpu = model(batch)[DETECTIONS]
    outputs = []
    for group in (batch["image"][:2], batch["image"][2:]):  # same-size images, one batch
        pixels = torch.from_numpy(np.stack(list(group))).to(CUDA)
        tensors = list(pixels.permute(0, 3, 1, 2).contiguous().float().div_(255.0).unbind(0))
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            outputs += model.module(tensors)
    on_cpu = detector(spread_detector)(batch)[DETECTIONS]
    for gpu, output, cpu in zip(on_gpu, outputs, on_cpu, strict=True):
        expected = filter_detections(as_rows(output), model.spec.task, None)
        assert len(gpu) == len(expected) > 0
        np.testing.assert_allclose(gpu, expected, atol=1e-2)
        best = [np.sort(found[:, 1])[::-1][:10] for found in (gpu, cpu)]
        np.testing.assert_allclose(best[0], best[1], atol=0.1)


def gpu_detector(weights: Path, autocast: str) -> Detector:
    spec = detector(weights).spec
    runtime = spec.runtime.model_copy(update={"device": "cuda", "autocast": autocast})
    return Detector(spec.model_copy(update={"runtime": runtime}))
