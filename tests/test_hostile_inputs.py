"""Hostile inputs: a bad-file corpus, fuzzed decoders, bounded worker memory, odd object keys."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from hostile import ALLOWED_ERRORS, corpus, dicom_bytes, encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vision_ops.config import DEFAULT_EXTENSIONS, DicomSpec, Preprocessing, parse_spec
from vision_ops.decode import DecodeError, decode_image
from vision_ops.dicom import decode_frame, open_instance
from vision_ops.pipeline import run_job
from vision_ops.reader import UnitReader
from vision_ops.schema import item_id

MAX_PIXELS = 178_956_970
MAX_FILE_MB = 1  # the photos are smaller; OVERSIZED (incompressible noise) is larger
OVERSIZED = "noise-1.5MB.png"
LATIN1_NAME = b"caf\xe9.jpg"  # a photo whose name is not UTF-8: listed as caf%E9.jpg
CORPUS = corpus()
LITE0 = {
    "kind": "entrypoint",
    "entrypoint": "vision_ops.zoo:efficientnet_lite0",
    "labels": "imagenet-1k",
    "preprocessing": {"resize": 256, "crop": 224, "mean": [0.498] * 3, "std": [0.502] * 3},
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_each_hostile_file_decodes_or_is_classified(name: str) -> None:
    """Through the reader's own routing (image decoder, or DICOM by preamble and name)."""
    data, expected = CORPUS[name]
    (row,) = UnitReader(None, MAX_PIXELS, None).units(f"s3://b/{name}", data)
    if isinstance(expected, str):
        assert (row["status"], row["error_type"]) == ("error", expected), row["error_message"]
    else:
        assert row["status"] == "ok", row["error_message"]
        assert row["image"].shape == (*expected, 3) and row["image"].dtype == np.uint8


def write_corpus(folder: Path, photo_paths: list[Path]) -> None:
    folder.mkdir()
    for name, (data, _) in CORPUS.items():
        (folder / name).write_bytes(data)
    for photo in photo_paths[:2]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, (720, 720, 3), dtype=np.uint8)
    (folder / OVERSIZED).write_bytes(encode(noise, "PNG"))  # over MAX_FILE_MB: never read


def classify(folder: Path, output: Path):  # type: ignore[no-untyped-def]
    spec = parse_spec(
        {
            "input": {
                "uris": [str(folder)],
                "extensions": [*DEFAULT_EXTENSIONS, ".dcm"],
                "max_file_mb": MAX_FILE_MB,
            },
            "task": {"kind": "classification", "top_k": 3},
            "model": LITE0,
            "runtime": {"batch_size": 32, "read_batch_size": 32, "max_actors": 1},
            "output": {"uri": str(output)},
            "run": {"id": "hostile", "date": "2026-11-24"},
        }
    )
    run_job(spec)
    return {Path(r["source_uri"]).name: r for r in pq.read_table(output).to_pylist()}


@pytest.mark.timeout(600)
def test_corpus_in_one_batch_leaves_good_predictions_intact(ray_local, tmp_path, photo_paths):
    write_corpus(tmp_path / "mixed", photo_paths)
    (tmp_path / "mixed" / os.fsdecode(LATIN1_NAME)).write_bytes(photo_paths[0].read_bytes())
    (tmp_path / "clean").mkdir()
    for photo in photo_paths[:2]:
        (tmp_path / "clean" / photo.name).write_bytes(photo.read_bytes())
    mixed = classify(tmp_path / "mixed", tmp_path / "out-mixed")
    clean = classify(tmp_path / "clean", tmp_path / "out-clean")
    assert len(mixed) == len(CORPUS) + 4
    latin1 = mixed.pop("caf%E9.jpg")
    assert (latin1["status"], latin1["error_type"]) == ("error", "UndecodableName")
    assert latin1["error_message"].startswith(f"file://{tmp_path}/mixed/caf%E9.jpg: the file's")
    oversized = mixed.pop(OVERSIZED)
    size = (tmp_path / "mixed" / OVERSIZED).stat().st_size
    assert size > MAX_FILE_MB * 2**20 and oversized["source_size"] == size
    assert (oversized["status"], oversized["error_type"]) == ("error", "FileTooLarge")
    assert oversized["error_message"] == (
        f"{size:,} bytes, over input.max_file_mb=1 (1,048,576 bytes): not read"
    )
    for name, (_, expected) in CORPUS.items():
        row = mixed[name]
        if isinstance(expected, str):
            assert (row["status"], row["error_type"]) == ("error", expected), name
        else:
            assert row["status"] == "ok", (name, row["error_message"])
            assert (row["image_height"], row["image_width"]) == expected, name
    assert {r["error_type"] for r in mixed.values()} - {None} <= ALLOWED_ERRORS
    for name, row in clean.items():
        assert [e["label"] for e in mixed[name]["top_k"]] == [e["label"] for e in row["top_k"]]
        np.testing.assert_allclose(
            [e["score"] for e in mixed[name]["top_k"]],
            [e["score"] for e in row["top_k"]],
            atol=1e-6,
        )


def peak_growth_reading(batch: dict[str, np.ndarray], **reader: Any) -> dict[str, np.ndarray]:
    """The read stage's function inside a Ray Data read task, with this worker's peak RSS
    growth: the high-water mark is reset first (/proc/self/clear_refs 5), so a reused worker's
    earlier peaks do not count."""
    from vision_ops.reader import read_unit_blocks

    def status(key: str) -> int:
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in lines if line.startswith(key)) * 1024

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    for _ in range(3):
        [out] = read_unit_blocks(batch, **reader)
    growth = status("VmHWM:") - before
    return {
        "error_type": np.asarray(out["error_type"], dtype=object),
        "peak_growth": np.full(len(out["error_type"]), growth),
        "pid": np.full(len(out["error_type"]), os.getpid()),
    }


def test_reading_the_corpus_keeps_read_worker_memory_bounded(ray_local, tmp_path, photo_paths):
    """The bombs declare 10^10 to 10^12 pixels; the read worker must never allocate them.
    Measured in a Ray Data read task as the pipeline runs it (one CPU, its memory reservation)."""
    import ray
    from ray.data import TaskPoolStrategy

    from vision_ops.pipeline.run import READ_TASK_MEMORY_BYTES

    write_corpus(tmp_path / "corpus", photo_paths)
    files = sorted(str(p) for p in (tmp_path / "corpus").iterdir())
    listing = [{"source_uri": f"file://{f}", "source_etag": None, "source_size": 1} for f in files]
    prep = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    reader = functools.partial(
        peak_growth_reading, preprocessing=prep, max_pixels=MAX_PIXELS, storage_options={}
    )
    found = (
        ray.data.from_items(listing)
        .map_batches(
            reader,
            batch_size=len(files),
            batch_format="numpy",
            compute=TaskPoolStrategy(size=1),
            num_cpus=1,
            memory=READ_TASK_MEMORY_BYTES,
        )
        .take_all()
    )
    assert {row["pid"] for row in found} - {os.getpid()}  # a Ray worker, not this process
    (growth,) = {row["peak_growth"] for row in found}
    assert 0 < growth < 150 * 2**20, growth / 2**20  # decoded photos: tens of MB; a bomb: GBs
    errors = [row["error_type"] for row in found if row["error_type"]]
    assert len(errors) == sum(isinstance(e, str) for _, e in CORPUS.values())


# --- fuzzing ---------------------------------------------------------------------------------

SEEDS = [
    encode(np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8), fmt)
    for i, fmt in enumerate(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_decode(data: bytes) -> None:
    """Only DecodeError may escape; a success is RGB uint8 within the pixel budget."""
    try:
        image = decode_image(data, max_pixels=4_000_000)
    except DecodeError as err:
        assert type(err).__name__ in ALLOWED_ERRORS
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= 4_000_000


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_decode(data)


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
    cut=st.integers(0, 10_000),
)
def test_fuzz_mutated_images(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    check_decode(bytes(data[: max(cut, len(data) // 4)]))


DICOM_SEEDS = [
    dicom_bytes(np.random.default_rng(0).integers(0, 3000, (2, 12, 10)).astype(np.int16)),
    dicom_bytes(
        np.random.default_rng(1).integers(0, 3000, (12, 10)).astype(np.int16),
        transfer_syntax="1.2.840.10008.1.2.5",  # RLE
    ),
    dicom_bytes(np.random.default_rng(2).integers(0, 255, (12, 10, 3)).astype(np.uint8)),
]


@FUZZ
@given(
    seed=st.sampled_from(DICOM_SEEDS),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
    cut=st.integers(0, 10_000),
)
def test_fuzz_mutated_dicom(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    """Only DecodeError escapes parsing or any frame; frames are RGB uint8 of the header's size."""
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    spec = DicomSpec()
    try:
        instance = open_instance(bytes(data[: max(cut, len(data) // 4)]), spec, 4_000_000)
        assert instance.frame_count <= 2
        for index in range(instance.frame_count):
            image = decode_frame(instance, index, spec)
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    except DecodeError as err:
        assert type(err).__name__ in ALLOWED_ERRORS


# --- object keys -----------------------------------------------------------------------------

HOSTILE_KEYS = [
    "keys/%2e%2e/encoded-dots.png",
    "keys/back\\slash.png",
    "keys/ünïcødé ✓ 写真.png",
    "keys/with space.png",
    "keys//double-slash.png",
    "keys/" + "/".join(["s" * 200] * 4) + "/" + "n" * 211 + ".png",  # a 1,024-byte key
]


@pytest.mark.s3
@pytest.mark.timeout(600)
def test_hostile_object_keys_stay_inside_the_output(
    ray_local, s3fs_client, s3_options, tmp_path
) -> None:
    assert len(HOSTILE_KEYS[-1].encode()) == 1024
    png = encode(np.zeros((20, 20, 3), dtype=np.uint8), "PNG")
    for key in HOSTILE_KEYS:
        s3fs_client.pipe_file(f"images/{key}", png)
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("s3://images/keys/../escape.png\n")  # not storable: read as an error
    before = set(s3fs_client.find("out/"))
    spec = parse_spec(
        {
            "input": {"uris": ["s3://images/keys/"], "manifest": str(manifest)},
            "model": LITE0,
            "runtime": {"batch_size": 8, "max_actors": 1},
            "output": {"uri": "s3://out/hostile-keys"},
            "run": {"id": "keys", "date": "2026-11-24"},
            "storage_options": s3_options,
        }
    )
    [part] = run_job(spec).commit.files
    written = set(s3fs_client.find("out/")) - before
    assert written and all(path.startswith("out/hostile-keys/") for path in written)
    assert part.startswith("s3://out/hostile-keys/run_date=2026-11-24/keys-")
    with s3fs_client.open(part.removeprefix("s3://"), "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    listed = {f"s3://{path}" for path in s3fs_client.find("images/keys/")}
    uris = [row["source_uri"] for row in rows]
    assert sorted(uris) == sorted([*listed, "s3://images/keys/../escape.png"])
    assert len({row["item_id"] for row in rows}) == len(rows)
    assert all(row["item_id"] == item_id(row["source_uri"]) for row in rows)
    statuses = {row["source_uri"]: row["status"] for row in rows}
    assert statuses.pop("s3://images/keys/../escape.png") == "error"
    assert set(statuses.values()) == {"ok"}
