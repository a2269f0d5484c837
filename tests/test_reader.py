"""The read stage: bytes fetched per filesystem, decoded, resized; failures become error rows."""

from __future__ import annotations

import io
import re
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image

from vision_ops.config import Preprocessing
from vision_ops.reader import fetch_all, read_unit_blocks
from vision_ops.transforms import resize_and_crop

PREP = Preprocessing(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture
def memfs():  # type: ignore[no-untyped-def]
    fs = fsspec.filesystem("memory")
    yield fs
    for entry in fs.ls("/", detail=False):
        fs.rm(entry, recursive=True)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_read_decodes_good_files_and_records_bad_ones(memfs) -> None:
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    memfs.pipe({"/in/a.png": png(image), "/in/b.png": b"garbage"})
    batch = {
        "source_uri": np.array(["memory:///in/a.png", "memory:///in/b.png", "memory:///in/c.png"]),
        "source_etag": np.array([None, None, None], dtype=object),
        "source_size": np.array([1, 2, 3]),
    }
    [out] = read_unit_blocks(batch, preprocessing=PREP, max_pixels=10_000, storage_options={})
    assert list(out["status"]) == ["ok", "error", "error"]
    assert list(out["error_type"]) == [None, "NotAnImage", "FileNotFoundError"]
    assert (out["image_width"][0], out["image_height"][0]) == (70, 50)
    assert out["image"].shape == (3, 32, 32, 3) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"][0], resize_and_crop(image, PREP))
    assert not out["image"][1:].any()


def test_the_read_refuses_images_over_the_pixel_limit(memfs) -> None:
    memfs.pipe("/in/big.png", png(np.zeros((100, 100, 3), dtype=np.uint8)))
    batch = {
        "source_uri": np.array(["memory:///in/big.png"]),
        "source_etag": np.array(["e"], dtype=object),
        "source_size": np.array([1]),
    }
    [out] = read_unit_blocks(batch, preprocessing=PREP, max_pixels=9_999, storage_options={})
    assert out["error_type"][0] == "ImageTooLarge"
    assert "100x100 pixels exceeds the limit of 9999" in out["error_message"][0]


def test_a_file_listed_over_the_byte_cap_is_an_error_row_never_fetched(memfs, monkeypatch) -> None:
    image = np.zeros((50, 70, 3), dtype=np.uint8)
    memfs.pipe({"/in/small.png": png(image), "/in/huge.jpg": b"x" * 2000})
    fetched: list[object] = []
    real_cat = type(memfs).cat
    monkeypatch.setattr(
        type(memfs),
        "cat",
        lambda fs, paths, **kw: fetched.append(paths) or real_cat(fs, paths, **kw),
    )
    batch = {
        "source_uri": np.array(["memory:///in/small.png", "memory:///in/huge.jpg"]),
        "source_etag": np.array(["e", "f"], dtype=object),
        "source_size": np.array([memfs.size("/in/small.png"), 2**20 + 1]),  # as listed
    }
    [out] = read_unit_blocks(
        batch, preprocessing=PREP, max_pixels=10_000, storage_options={}, max_file_bytes=2**20
    )
    assert list(out["status"]) == ["ok", "error"]
    assert out["error_type"][1] == "FileTooLarge"
    assert out["error_message"][1] == (
        "1,048,577 bytes, over input.max_file_mb=1 (1,048,576 bytes): not read"
    )
    assert fetched == [["/in/small.png"]]  # the oversized file: not a byte read
    np.testing.assert_array_equal(out["image"][0], resize_and_crop(image, PREP))


def test_a_file_of_no_listed_size_is_read_no_further_than_the_byte_cap(memfs, monkeypatch) -> None:
    """A manifest entry with an ETag and no size: at most the cap and one byte of it is read,
    and a file that gives that many is FileTooLarge; one under the cap reads as any other, an
    empty one is EmptyFile, a missing one names its error."""
    image = np.zeros((50, 70, 3), dtype=np.uint8)
    memfs.pipe({"/in/ok.png": png(image), "/in/huge.jpg": b"x" * (3 * 2**20), "/in/empty.jpg": b""})
    ranges: list[tuple[list[str], object, object]] = []
    real_cat_ranges = type(memfs).cat_ranges

    def recording(fs, paths, starts, ends, **kw):  # type: ignore[no-untyped-def]
        ranges.append((list(paths), starts, ends))
        return real_cat_ranges(fs, paths, starts, ends, **kw)

    monkeypatch.setattr(type(memfs), "cat_ranges", recording)
    names = ["ok.png", "huge.jpg", "empty.jpg", "gone.jpg"]
    batch = {
        "source_uri": np.array([f"memory:///in/{name}" for name in names]),
        "source_etag": np.array(["e", "f", "g", "h"], dtype=object),
        "source_size": np.array([np.nan] * 4),
    }
    [out] = read_unit_blocks(
        batch, preprocessing=PREP, max_pixels=10_000, storage_options={}, max_file_bytes=2**20
    )
    assert list(out["status"]) == ["ok", "error", "error", "error"]
    np.testing.assert_array_equal(out["image"][0], resize_and_crop(image, PREP))
    assert list(out["error_type"][1:3]) == ["FileTooLarge", "EmptyFile"]
    assert out["error_message"][1] == (
        "no size listed, and over input.max_file_mb=1 (1,048,576 bytes): read no further"
    )
    assert out["error_type"][3] == "FileNotFoundError"
    assert ranges == [(sorted(f"/in/{name}" for name in names), 0, 2**20 + 1)]
    assert np.isnan(out["source_size"].astype(float)).all()  # as listed: the manifest's identity


def test_on_s3_an_empty_object_of_no_listed_size_is_empty_not_a_refused_range(
    s3fs_client, s3_options
) -> None:
    """S3 answers a range read of an empty object 416: the reader takes it for the empty
    file it is (EmptyFile), while a larger object is still read no further than the cap."""
    image = np.zeros((50, 70, 3), dtype=np.uint8)
    prefix = "images/reader-cap"
    s3fs_client.pipe(
        {
            f"{prefix}/ok.png": png(image),
            f"{prefix}/empty.jpg": b"",
            f"{prefix}/huge.jpg": b"x" * (2**20 + 1),
        }
    )
    names = ["ok.png", "empty.jpg", "huge.jpg"]
    batch = {
        "source_uri": np.array([f"s3://{prefix}/{name}" for name in names]),
        "source_etag": np.array(["e", "f", "g"], dtype=object),
        "source_size": np.array([np.nan] * 3),
    }
    [out] = read_unit_blocks(
        batch,
        preprocessing=PREP,
        max_pixels=10_000,
        storage_options=s3_options,
        max_file_bytes=2**20,
    )
    assert list(out["status"]) == ["ok", "error", "error"]
    assert list(out["error_type"][1:]) == ["EmptyFile", "FileTooLarge"]
    np.testing.assert_array_equal(out["image"][0], resize_and_crop(image, PREP))


def test_fetch_all_returns_bytes_or_the_exception(memfs, tmp_path) -> None:
    memfs.pipe("/x/one", b"1")
    (tmp_path / "two").write_bytes(b"2")
    got = fetch_all(["memory:///x/one", f"file://{tmp_path}/two", "memory:///x/none"], {})
    assert got["memory:///x/one"] == b"1" and got[f"file://{tmp_path}/two"] == b"2"
    assert isinstance(got["memory:///x/none"], FileNotFoundError)


def test_manifest_entries_without_identity_get_it_from_the_store(memfs) -> None:
    memfs.pipe("/in/a.png", png(np.zeros((8, 8, 3), dtype=np.uint8)))
    batch = {
        "source_uri": np.array(["memory:///in/a.png"]),
        "source_etag": np.array([None], dtype=object),
        "source_size": np.array([np.nan]),
    }
    [out] = read_unit_blocks(batch, preprocessing=PREP, max_pixels=10_000, storage_options={})
    assert out["source_size"][0] == memfs.info("/in/a.png")["size"] > 0


def test_a_store_error_asking_one_entrys_identity_fails_no_other_row(memfs, monkeypatch) -> None:
    """The store's answer to one HEAD is an error that is no OSError (botocore's
    NoCredentialsError is not one): that entry keeps no identity, and the batch is read."""
    image = png(np.zeros((8, 8, 3), dtype=np.uint8))
    memfs.pipe("/in/a.png", image)
    memfs.pipe("/in/b.png", image)
    real_info = type(memfs).info

    def info(self: Any, path: str, **kwargs: Any) -> Any:
        if path.endswith("b.png"):
            raise RuntimeError("Unable to locate credentials")
        return real_info(self, path, **kwargs)

    monkeypatch.setattr(type(memfs), "info", info)
    batch = {
        "source_uri": np.array(["memory:///in/a.png", "memory:///in/b.png"]),
        "source_etag": np.array([None, None], dtype=object),
        "source_size": np.array([np.nan, np.nan]),
    }
    [out] = read_unit_blocks(batch, preprocessing=PREP, max_pixels=10_000, storage_options={})
    assert list(out["status"]) == ["ok", "ok"]
    assert out["source_size"][0] == len(image) and out["source_size"][1] is None


def test_file_names_with_glob_characters_are_read_as_named(tmp_path) -> None:
    """`cat` of a list globs each path: `a [1].png` matched nothing (or `*` many files)."""
    (tmp_path / "a [1].png").write_bytes(b"one")
    (tmp_path / "b?.png").write_bytes(b"two")
    (tmp_path / "c.png").write_bytes(b"three")
    uris = [f"file://{tmp_path}/{name}" for name in ("a [1].png", "b?.png", "c.png", "d*.png")]
    got = fetch_all(uris, {})
    assert [got[uri] for uri in uris[:3]] == [b"one", b"two", b"three"]
    assert isinstance(got[uris[3]], FileNotFoundError)  # not the other files' bytes


def test_a_strip_too_thin_to_resize_is_an_error_row_not_a_failed_read(memfs) -> None:
    """1 x 20,000 pixels, under the decode limit: resized to a shorter side of 40 it would be
    40 x 800,000; refused before any pixel is allocated, beside a good image."""
    memfs.pipe("/in/strip.png", png(np.zeros((1, 20_000, 3), dtype=np.uint8)))
    memfs.pipe("/in/ok.png", png(np.zeros((50, 70, 3), dtype=np.uint8)))
    batch = {
        "source_uri": np.array(["memory:///in/strip.png", "memory:///in/ok.png"]),
        "source_etag": np.array(["e", "f"], dtype=object),
        "source_size": np.array([1, 2]),
    }
    [out] = read_unit_blocks(batch, preprocessing=PREP, max_pixels=100_000, storage_options={})
    assert list(out["status"]) == ["error", "ok"]
    assert out["error_type"][0] == "ImageTooLarge"
    assert out["error_message"][0] == (
        "20000x1 resized to a shorter side of 40 would be 32000000 pixels, over the limit of 100000"
    )


def test_a_decoder_the_worker_lacks_stops_the_read_instead_of_making_error_rows(
    memfs, monkeypatch
) -> None:
    """pydicom missing on a worker is the cluster's fault, not each scan's: raised (the run
    fails, nothing committed) rather than a committed run of DICOM error rows."""
    import sys

    from vision_ops.dicom import INSTALL_HINT
    from vision_ops.synthetic import dicom_bytes

    memfs.pipe("/in/ct.dcm", dicom_bytes(np.zeros((8, 8), dtype=np.uint16)))
    batch = {
        "source_uri": np.array(["memory:///in/ct.dcm"]),
        "source_etag": np.array(["e"], dtype=object),
        "source_size": np.array([1]),
    }
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as on a worker without it
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        next(read_unit_blocks(batch, preprocessing=PREP, max_pixels=10_000, storage_options={}))
