"""The fast path: JPEGs decoded and cropped on the predictor's device with a CPU fallback,
channels-last and torch.compile models, torch threads from the pool plan. Predictions equal a
direct torchvision call on the same pixels; files no decoder can read become error rows."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_models import (
    CLASSES,
    PREP,
    direct_logits,
    spec_for,
    tiny_classifier,
    torchvision_file_model,
)
from toolchain import needs_a_compiler
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from vision_ops import device_decode
from vision_ops.compile_record import RECORD_FOLDER
from vision_ops.config import Preprocessing, SpecError, parse_spec
from vision_ops.decode import ENCODED_COLUMN, CorruptImage, decode_image, device_jpeg_size
from vision_ops.device_decode import decode_batch, model_inputs, resize_and_crop_tensor
from vision_ops.pipeline import RunSummary, run_job
from vision_ops.predictors import Classifier
from vision_ops.reader import read_unit_blocks
from vision_ops.schema import STATUS_ERROR, TOP_K_IDS, TOP_K_SCORES
from vision_ops.transforms import resize_and_crop

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CPU = torch.device("cpu")
MAX_PIXELS = 10_000_000


def photo(seed: int, size: tuple[int, int] = (120, 90), **save: object) -> bytes:
    """A smooth photo-like JPEG (gradients plus noise), so resampling differences stay small."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
    mode = save.pop("mode", "RGB")
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(str(mode)).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo(seed))).save(buffer, format="PNG")
    return buffer.getvalue()


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return photo(3, exif=exif.tobytes())


def test_only_jpegs_the_device_takes_as_they_are_stay_encoded() -> None:
    assert device_jpeg_size(photo(1, (120, 90)), MAX_PIXELS) == (120, 90)
    assert device_jpeg_size(photo(1, (120, 90), mode="L"), MAX_PIXELS) == (120, 90)
    assert device_jpeg_size(photo(1, mode="CMYK"), MAX_PIXELS) is None
    assert device_jpeg_size(rotated_jpeg(), MAX_PIXELS) is None
    assert device_jpeg_size(png(1), MAX_PIXELS) is None
    assert device_jpeg_size(photo(1, (120, 90)), 120 * 90 - 1) is None
    assert device_jpeg_size(b"\xff\xd8 not really a jpeg", MAX_PIXELS) is None


def test_a_batch_decodes_like_one_file_at_a_time_and_a_bad_file_falls_back() -> None:
    good = [photo(1), photo(2, (64, 80))]
    truncated = photo(3)[:200]
    decoded = decode_batch([good[0], truncated, good[1]], CPU, MAX_PIXELS)
    for payload, image in zip(good, (decoded[0], decoded[2]), strict=True):
        alone = decode_jpeg(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        assert torch.equal(image, alone)
    assert isinstance(decoded[1], CorruptImage)
    assert str(decoded[1]) == _pillow_error(truncated)


def test_a_cpu_decodes_on_the_actors_threads_as_on_one() -> None:
    spec = Preprocessing(**PREP)
    payloads = [photo(1), photo(3)[:200], photo(2, (64, 80)), photo(5, (90, 120))]
    serial = model_inputs(payloads, CPU, MAX_PIXELS, spec, threads=1)
    threaded = model_inputs(payloads, CPU, MAX_PIXELS, spec, threads=2)
    for one, other in zip(serial, threaded, strict=True):
        if isinstance(one, torch.Tensor):
            assert isinstance(other, torch.Tensor) and torch.equal(one, other)
            assert one.shape == (spec.crop, spec.crop, 3)
        else:
            assert isinstance(other, CorruptImage) and str(other) == str(one)
    assert [isinstance(crop, CorruptImage) for crop in threaded] == [False, True, False, False]


def test_decoding_on_threads_leaves_the_warning_filters_alone(monkeypatch) -> None:
    """The decoding threads share the process's warning filters: a decode that swapped them
    (`warnings.catch_warnings`) could drop another thread's on its way out."""
    during: list[list[object]] = []

    def recording(*args: object, **kwargs: object) -> list[torch.Tensor]:
        during.append(list(warnings.filters))
        return decode_jpeg(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(device_decode, "decode_jpeg", recording)
    payloads = [photo(seed) for seed in range(6)]
    with warnings.catch_warnings(record=True):
        # less this module's ignore of every DeprecationWarning: a decode that set that same
        # rule would leave the list as it found it
        warnings.filters[:] = [
            rule for rule in warnings.filters if rule[2] is not DeprecationWarning
        ]
        before = list(warnings.filters)
        model_inputs(payloads, CPU, MAX_PIXELS, Preprocessing(**PREP), threads=3)
        decode_batch(payloads, CPU, MAX_PIXELS)
    assert len(during) == len(payloads) + 1
    assert all(filters == before for filters in during)


def test_torchvisions_deprecation_of_its_decoders_is_not_shown(tmp_path: Path) -> None:
    """Ignored once for the process (pytest resets filters set while it imports the tests, so
    a process of its own shows what a worker's log would, every warning shown)."""
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(photo(1))
    script = (
        "import sys, torch; from vision_ops.device_decode import decode_batch; "
        "[image] = decode_batch([open(sys.argv[1], 'rb').read()], torch.device('cpu'), 10**7); "
        "print(tuple(image.shape))"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", script, str(jpeg)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "(3, 90, 120)"
    assert "deprecated" not in done.stderr


def _pillow_error(payload: bytes) -> str:
    with pytest.raises(CorruptImage) as raised:
        decode_image(payload, MAX_PIXELS)
    return str(raised.value)


@pytest.mark.parametrize("size", [(120, 90), (90, 120), (50, 40), (224, 224)])
def test_device_geometry_is_torchvisions_resize_and_centre_crop(size: tuple[int, int]) -> None:
    spec = Preprocessing(**PREP)
    image = decode_jpeg(torch.frombuffer(bytearray(photo(4, size)), dtype=torch.uint8))
    expected = v2.Compose([v2.Resize(spec.resize, antialias=True), v2.CenterCrop(spec.crop)])
    cropped = resize_and_crop_tensor(image, spec)
    assert cropped.shape == (spec.crop, spec.crop, 3)
    assert torch.equal(cropped, expected(image).permute(1, 2, 0))
    cpu_path = resize_and_crop(np.asarray(Image.open(io.BytesIO(photo(4, size)))), spec)
    difference = np.abs(cropped.numpy().astype(int) - cpu_path.astype(int))
    assert difference.mean() < 2.0  # Pillow's and torch's antialiasing round differently


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(tiny_classifier().state_dict(), path)
    return path


def read_batch(payloads: dict[str, bytes], folder: Path, on_device: bool) -> dict[str, np.ndarray]:
    for name, data in payloads.items():
        (folder / name).write_bytes(data)
    uris = [f"file://{folder / name}" for name in payloads]
    listing = {
        "source_uri": np.array(uris, dtype=object),
        "source_etag": np.array([None] * len(uris), dtype=object),
        "source_size": np.array([len(d) for d in payloads.values()]),
    }
    [out] = read_unit_blocks(
        listing,
        preprocessing=Preprocessing(**PREP),
        max_pixels=MAX_PIXELS,
        storage_options={},
        decode_on_device=on_device,
    )
    return out


def device_reference(payload: bytes) -> np.ndarray:
    """What the device path feeds the model, written with torchvision's v2 transforms."""
    image = decode_jpeg(torch.frombuffer(bytearray(payload), dtype=torch.uint8), ImageReadMode.RGB)
    crop = v2.Compose([v2.Resize(PREP["resize"], antialias=True), v2.CenterCrop(PREP["crop"])])
    return crop(image).permute(1, 2, 0).numpy()


def test_a_mixed_batch_predicts_like_a_direct_call_on_the_same_pixels(
    weights_file: Path, tmp_path: Path
) -> None:
    payloads = {
        "a.jpg": photo(1),
        "b.png": png(2),
        "grey.jpg": photo(5, mode="L"),
        "cut.jpg": photo(3)[: len(photo(3)) // 2],  # header intact
        "turned.jpg": rotated_jpeg(),
    }
    batch = read_batch(payloads, tmp_path, on_device=True)
    encoded = [bool(payload) for payload in batch[ENCODED_COLUMN]]
    assert encoded == [True, False, True, True, False]  # CPU: PNG, EXIF rotation
    assert batch["image"][0].shape == (0, 0, 3)
    assert (batch["image_width"][0], batch["image_height"][0]) == (120, 90)

    classifier = Classifier(spec_for(torchvision_file_model(weights_file), top_k=3))
    out = classifier(batch)
    assert list(out["status"]) == ["ok", "ok", "ok", "error", "ok"]
    assert out["error_type"][3] == "CorruptImage" and ENCODED_COLUMN not in out

    cpu = read_batch({"b.png": payloads["b.png"], "turned.jpg": rotated_jpeg()}, tmp_path, False)
    pixels = np.stack(
        [
            device_reference(payloads["a.jpg"]),
            cpu["image"][0],
            device_reference(payloads["grey.jpg"]),
            cpu["image"][1],
        ]
    )
    expected = direct_logits(tiny_classifier(), pixels).softmax(-1).topk(3)
    ok_rows = [0, 1, 2, 4]
    np.testing.assert_array_equal(out[TOP_K_IDS][ok_rows], expected.indices.numpy())
    np.testing.assert_allclose(out[TOP_K_SCORES][ok_rows], expected.values.numpy(), atol=1e-5)


@needs_a_compiler
def test_channels_last_and_compile_predict_like_the_plain_model(weights_file: Path) -> None:
    images = np.random.default_rng(7).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    expected = direct_logits(tiny_classifier(), images).softmax(-1).topk(3)
    for runtime in ({"channels_last": False}, {"channels_last": True, "compile": True}):
        spec = spec_for(torchvision_file_model(weights_file), top_k=3)
        spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update=runtime)})
        classifier = Classifier(spec)
        assert (classifier.compile_seconds > 0) == bool(runtime.get("compile"))
        ids, scores = classifier.predict(images)
        np.testing.assert_array_equal(ids, expected.indices.numpy())
        np.testing.assert_allclose(scores, expected.values.numpy(), atol=1e-5)
    assert isinstance(classifier.module, torch._dynamo.eval_frame.OptimizedModule)


def test_a_model_inductor_cannot_build_runs_uncompiled_with_a_warning(
    weights_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CPU node without a working C++ compiler (or Python's headers): `runtime.compile` is
    for speed, so the actor starts all the same, uncompiled, and predicts as the plain model
    (it failed to start, and the run with it)."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    images = np.random.default_rng(9).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    expected = direct_logits(tiny_classifier(), images).softmax(-1).topk(3)
    spec = spec_for(torchvision_file_model(weights_file), top_k=3)
    runtime = spec.runtime.model_copy(update={"compile": True, "batch_size": 4})
    no_compiler = {"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}  # nothing cached
    logged = caplog.at_level(logging.WARNING, logger="vision_ops.predictors")
    with logged, inductor.patch(no_compiler):
        classifier = Classifier(spec.model_copy(update={"runtime": runtime}))
    assert "torch.compile failed, runs uncompiled" in caplog.text
    assert "No working C++ compiler" in caplog.text  # inductor's reason, not dynamo's wrapper
    assert classifier.compile_seconds == 0 and classifier.static_batch == 0
    assert not isinstance(classifier.module, torch._dynamo.eval_frame.OptimizedModule)
    ids, scores = classifier.predict(images)
    np.testing.assert_array_equal(ids, expected.indices.numpy())
    np.testing.assert_allclose(scores, expected.values.numpy(), atol=1e-5)
    torch._dynamo.reset()


@needs_a_compiler
def test_a_compiled_model_keeps_one_graph_for_short_and_long_batches(
    weights_file: Path,
) -> None:
    from torch._dynamo.utils import counters

    images = np.random.default_rng(8).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    expected = direct_logits(tiny_classifier(), images).softmax(-1).topk(3)
    spec = spec_for(torchvision_file_model(weights_file), top_k=3)
    runtime = spec.runtime.model_copy(update={"compile": True, "batch_size": 4})
    torch._dynamo.reset()
    counters.clear()
    classifier = Classifier(spec.model_copy(update={"runtime": runtime}))
    assert counters["stats"]["unique_graphs"] == 1  # compiled while the actor starts
    assert classifier.compile_seconds > 0  # timed for the run's start-up stages
    for rows in (slice(0, 4), slice(4, 7), slice(0, 11)):  # full, short, more than a batch
        ids, scores = classifier.predict(images[rows])
        np.testing.assert_array_equal(ids, expected.indices.numpy()[rows])
        np.testing.assert_allclose(scores, expected.values.numpy()[rows], atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


@needs_a_compiler
def test_a_model_is_compiled_only_where_it_was_compiled_before_when_the_run_asks_so(
    weights_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold node
    images = np.random.default_rng(9).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    expected = direct_logits(tiny_classifier(), images).softmax(-1).topk(3)
    spec = spec_for(torchvision_file_model(weights_file), top_k=3)

    def classifier(**runtime: object) -> Classifier:
        compiled = {"compile": True, "batch_size": 4} | runtime
        return Classifier(
            spec.model_copy(update={"runtime": spec.runtime.model_copy(update=compiled)})
        )

    cached_only = {"compile_only_where_cached": True}
    built = [classifier(**cached_only), classifier(), classifier(**cached_only)]
    assert [c.compile_seconds > 0 for c in built] == [False, True, True]
    assert [c.static_batch for c in built] == [0, 4, 4]
    recorded = list((tmp_path / "inductor" / RECORD_FOLDER).iterdir())
    assert [path.name for path in recorded] == [
        built[1].compiled_model(built[1].preprocessing).digest()
    ]
    assert json.loads(recorded[0].read_text())["torch"] == torch.__version__
    threads = torch.get_num_threads()
    assert json.loads(recorded[0].read_text())["threads"] == threads
    other_batch = classifier(batch_size=2, **cached_only)  # another static shape: not cached
    try:  # inductor's CPU kernels are built for a thread count: another one is not cached
        other_threads = classifier(intra_op_threads=threads + 1, **cached_only)
    finally:
        torch.set_num_threads(threads)
    assert other_batch.compile_seconds == other_threads.compile_seconds == 0
    for each in [*built, other_batch, other_threads]:  # compiled or not, the same predictions
        ids, scores = each.predict(images)
        np.testing.assert_array_equal(ids, expected.indices.numpy())
        np.testing.assert_allclose(scores, expected.values.numpy(), atol=1e-5)


def test_threads_come_from_the_plan_unless_the_spec_sets_them(weights_file: Path) -> None:
    before = torch.get_num_threads()
    try:
        spec = spec_for(torchvision_file_model(weights_file), top_k=3)
        Classifier(spec, threads=2)
        assert torch.get_num_threads() == 2
        pinned = spec.model_copy(
            update={"runtime": spec.runtime.model_copy(update={"intra_op_threads": 1})}
        )
        Classifier(pinned, threads=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_device_decode_is_refused_for_detection() -> None:
    raw = {
        "input": {"uris": ["/photos"]},
        "task": {"kind": "detection"},
        "model": {"architecture": "fasterrcnn_resnet50_fpn", "weights": "/w.pt"},
        "runtime": {"decode": "device"},
        "output": {"uri": "/out"},
    }
    with pytest.raises(SpecError) as refused:
        parse_spec(raw)
    # the message's own line: a check across sections appends no spec as what it found
    line = str(refused.value).splitlines()[1]
    assert line.startswith("  runtime.decode: device decodes photos")
    assert line.endswith("detection reads images at their own size: expected decode: tasks")


def run_on_photos(
    tmp_path: Path, weights_file: Path, jpegs: int, runtime: dict[str, object]
) -> tuple[dict[str, bytes], RunSummary, list[dict]]:
    """`jpegs` JPEGs of different sizes and a PNG, classified by a run with device decoding:
    the files, the run's summary and the rows it committed."""
    payloads = {f"{i}.jpg": photo(i, (100 + 10 * i, 80)) for i in range(jpegs)} | {"p.png": png(9)}
    return (payloads, *run_on_files(tmp_path, weights_file, payloads, runtime))


def run_on_files(
    tmp_path: Path, weights_file: Path, payloads: dict[str, bytes], runtime: dict[str, object]
) -> tuple[RunSummary, list[dict]]:
    """The files (name -> bytes) classified by a run with device decoding: the run's summary
    and the rows it committed."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in payloads.items():
        (folder / name).write_bytes(data)
    spec = parse_spec(
        {
            "input": {"uris": [str(folder)]},
            "task": {"kind": "classification", "top_k": 3},
            "model": {"preprocessing": PREP, **torchvision_file_model(weights_file)},
            "runtime": {"batch_size": 4, "decode": "device", **runtime},
            "output": {"uri": str(tmp_path / "table")},
            "run": {"id": "device-decode", "date": "2026-11-24"},
        }
    )
    summary = run_job(spec)
    return summary, pq.read_table(tmp_path / "table" / "run_date=2026-11-24").to_pylist()


def test_pipeline_with_device_decode_equals_direct_calls(
    ray_local: None, weights_file: Path, tmp_path: Path
) -> None:
    payloads, summary, rows = run_on_photos(tmp_path, weights_file, 5, {"max_actors": 1})
    assert summary.commit.rows == len(rows) == len(payloads) and summary.commit.ok == len(payloads)
    png_pixels = resize_and_crop(decode_image(payloads["p.png"], MAX_PIXELS), Preprocessing(**PREP))
    pixels = {n: device_reference(d) for n, d in payloads.items() if n.endswith(".jpg")}
    pixels["p.png"] = png_pixels
    names = sorted(pixels)
    expected = direct_logits(tiny_classifier(), np.stack([pixels[n] for n in names])).softmax(-1)
    top = expected.topk(3)
    for row in rows:
        index = names.index(Path(row["source_uri"]).name)
        assert [e["label_id"] for e in row["top_k"]] == top.indices[index].tolist()
        np.testing.assert_allclose(
            [e["score"] for e in row["top_k"]], top.values[index].numpy(), atol=1e-5
        )


def test_a_jpeg_strip_too_thin_to_resize_is_refused_before_the_device(tmp_path: Path) -> None:
    """1 x 20,000 pixels, under the decode limit: resized to a shorter side of 72 on the
    device it would be 72 x 1,440,000 (an out-of-memory that failed the run); an error row from
    the read task, as on the CPU path, beside a JPEG left encoded."""
    strip = Image.fromarray(np.zeros((1, 20_000, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    strip.save(buffer, format="JPEG")
    batch = read_batch({"strip.jpg": buffer.getvalue(), "a.jpg": photo(1)}, tmp_path, True)
    assert list(batch["status"]) == ["error", "ok"]
    assert batch["error_type"][0] == "ImageTooLarge" and not batch[ENCODED_COLUMN][0]
    assert batch["error_message"][0] == (
        "20000x1 resized to a shorter side of 72 would be 103680000 pixels, over the limit of "
        "10000000"
    )
    assert batch[ENCODED_COLUMN][1]


def test_a_batch_with_no_jpeg_for_the_device_is_run_like_any_other(
    ray_local: None, weights_file: Path, tmp_path: Path
) -> None:
    """A model batch whose files the read tasks decoded (a PNG) or could not read leaves the
    actor nothing to decode: its rows are predicted, not an error that fails the run (a batch
    of one file per call puts the PNG and the corrupt JPEG alone)."""
    payloads = {"0.jpg": photo(0), "p.png": png(9), "bad.jpg": photo(1)[:100]}  # header cut
    summary, committed = run_on_files(
        tmp_path, weights_file, payloads, {"batch_size": 1, "max_actors": 1}
    )
    rows = {Path(row["source_uri"]).name: row for row in committed}
    assert (summary.commit.ok, summary.commit.errors, len(rows)) == (2, 1, 3)
    assert rows["bad.jpg"]["status"] == STATUS_ERROR
    pixels = resize_and_crop(decode_image(payloads["p.png"], MAX_PIXELS), Preprocessing(**PREP))
    expected = direct_logits(tiny_classifier(), pixels[None]).argmax(-1)
    assert rows["p.png"]["top_k"][0]["label_id"] == int(expected[0])
    assert decode_batch([], torch.device("cpu"), MAX_PIXELS) == []


@needs_a_compiler
def test_a_run_between_the_compile_thresholds_compiles_where_the_node_compiled_before(
    ray_local: None, tmp_path: Path
) -> None:
    # Weights of their own (this node has not compiled them, even in a suite run before), and
    # 6 inputs: past compile_min_inputs, short of compile_min_inputs_cold.
    weights_file = tmp_path / "unseen.pt"
    state = tiny_classifier().state_dict()
    unseen = torch.Generator().manual_seed(time.time_ns())
    state["classifier.3.bias"] += 0.1 * torch.rand(CLASSES, generator=unseen)
    torch.save(state, weights_file)
    runtime = {"max_actors": 1, "batch_size": 4, "compile": True, "compile_min_inputs": 1}
    compiled_seconds, rows = [], []
    for attempt, cold in enumerate([1000, 0, 1000]):  # 0: compile even on a cold node
        folder = tmp_path / str(attempt)
        folder.mkdir()
        _, summary, committed = run_on_photos(
            folder, weights_file, 5, runtime | {"compile_min_inputs_cold": cold}
        )
        assert summary.commit.ok == len(committed) == 6
        compiled_seconds.append(cast(dict, summary.startup_seconds)["compile"])
        rows.append(sorted(committed, key=lambda row: row["source_uri"].rsplit("/", 1)[1]))
    assert [seconds > 0 for seconds in compiled_seconds] == [False, True, True]
    for compiled in rows[1:]:  # compiled or not, the same predictions
        for eager_row, row in zip(rows[0], compiled, strict=True):
            assert [e["label_id"] for e in row["top_k"]] == [
                e["label_id"] for e in eager_row["top_k"]
            ]
            np.testing.assert_allclose(
                [e["score"] for e in row["top_k"]],
                [e["score"] for e in eager_row["top_k"]],
                atol=1e-5,
            )
