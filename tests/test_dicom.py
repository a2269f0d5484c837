"""DICOM decoding: the 8-bit frames the model sees equal values computed by hand from the
standard's formulas; compressed syntaxes decode like their uncompressed twins; malformed input
is an error row of its own type; patient identifiers never reach a column or a message."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from vision_ops.config import DicomSpec, InputSpec, SpecError, parse_spec
from vision_ops.decode import ImageTooLarge
from vision_ops.dicom import (
    CorruptDicom,
    NoPixelData,
    NotDicom,
    UnsupportedTransferSyntax,
    apply_window,
    decode_frame,
    is_dicom,
    is_grey,
    open_instance,
    scrubbed,
)
from vision_ops.reader import read_unit_blocks
from vision_ops.schema import STAGE_PREFIX
from vision_ops.synthetic import dicom_bytes

PACKAGE_FILES = Path(pydicom.data.__file__).parent / "test_files"
CT = {"RescaleSlope": 1, "RescaleIntercept": -1024}
CANARY_PHI = {
    "PatientName": "Canaryname^Zelda",
    "PatientID": "CANARY-PID-0042",
    "PatientBirthDate": "CANARYBD",  # not a valid DA either: pydicom would warn, quoting it
    "OtherPatientIDs": "CANARY-OTHER-77",
    "InstitutionName": "Canary General Hospital",
    "ReferringPhysicianName": "Canarydoc^Quentin",
    "AccessionNumber": "CANARYACC99",
}
CANARY_NEEDLES = [value.split("^")[0] for value in CANARY_PHI.values()]


def frame(data: bytes, window: object = "file", index: int = 0, max_pixels: int = 10**8):
    spec = DicomSpec(window=window)
    return decode_frame(open_instance(data, spec, max_pixels), index, spec)


def grey(rgb: np.ndarray) -> np.ndarray:
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    assert (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all()
    return rgb[:, :, 0]


# --- windowing by hand -----------------------------------------------------------------------

# Stored CT values and their Hounsfield units (slope 1, intercept -1024): -1024, 0, 40, 1976.
STORED = np.array([[0, 1024], [1064, 3000]], dtype=np.int16)
# The brain window (centre 40, width 80), DICOM LINEAR:
#   x <= 40 - 0.5 - 79/2 = 0 -> 0;  x > 40 - 0.5 + 79/2 = 79 -> 255;
#   else ((x - 39.5) / 79 + 0.5) * 255:  HU 40 -> (0.5 / 79 + 0.5) * 255 = 129.11 -> 129.
BRAIN_EXPECTED = np.array([[0, 0], [129, 255]], dtype=np.uint8)


def test_ct_slope_intercept_and_a_preset_window_equal_the_hand_computed_values() -> None:
    data = dicom_bytes(STORED, tags=CT)
    np.testing.assert_array_equal(grey(frame(data, window="brain")), BRAIN_EXPECTED)


def test_an_explicit_window_and_a_slope_of_two() -> None:
    # slope 2, intercept -1024: stored 0, 512, 532, 1000 -> HU -1024, 0, 40, 976.
    stored = np.array([[0, 512], [532, 1000]], dtype=np.int16)
    data = dicom_bytes(stored, tags={"RescaleSlope": 2, "RescaleIntercept": -1024})
    # centre 0, width 2001: ((x + 0.5) / 2000 + 0.5) * 255 for -1000 < x <= 1000.
    expected = [[0, round((0.5 / 2000 + 0.5) * 255)], [round((40.5 / 2000 + 0.5) * 255), 252]]
    assert expected == [[0, 128], [133, 252]]
    got = grey(frame(data, window={"center": 0, "width": 2001}))
    np.testing.assert_array_equal(got, expected)


def test_monochrome1_is_inverted_after_the_window() -> None:
    data = dicom_bytes(STORED, tags=CT, photometric="MONOCHROME1")
    np.testing.assert_array_equal(grey(frame(data, window="brain")), 255 - BRAIN_EXPECTED)


def test_the_files_own_window_and_its_voi_function() -> None:
    tags = CT | {"WindowCenter": [40, 400], "WindowWidth": [80, 2000]}  # two windows: the first
    np.testing.assert_array_equal(grey(frame(dicom_bytes(STORED, tags=tags))), BRAIN_EXPECTED)
    exact = dicom_bytes(STORED, tags=tags | {"VOILUTFunction": "LINEAR_EXACT"})
    # LINEAR_EXACT: ((x - 40) / 80 + 0.5) * 255 -> HU 40 gives 127.5, rounded half to even 128.
    np.testing.assert_array_equal(grey(frame(exact)), [[0, 0], [128, 255]])
    sigmoid = dicom_bytes(STORED, tags=tags | {"VOILUTFunction": "SIGMOID"})
    # SIGMOID: 255 / (1 + exp(-4 (x - 40) / 80)): HU 0 -> 255 / (1 + e^2) = 30.3 -> 30.
    np.testing.assert_array_equal(grey(frame(sigmoid)), [[0, 30], [128, 255]])


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_a_window_of_width_zero_is_a_threshold_at_its_centre(function: str) -> None:
    """Invalid (PS3.3 wants a width above 0), but found in files: the limit of both functions
    as the width goes to 0, a step at the centre; not a division by zero."""
    from vision_ops.dicom import apply_window

    with np.errstate(all="raise"):
        found = apply_window(np.array([0.0, 40.0, 41.0]), 40.0, 0.0, function)
    np.testing.assert_array_equal(found, [0, 0, 255])


def test_a_voi_lut_sequence_in_the_file_is_applied() -> None:
    from pydicom.dataset import Dataset

    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]  # 4 entries, first maps value 0, 8-bit output
    lut.LUTData = np.array([0, 100, 200, 255], dtype=np.uint16).tobytes()
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    data = dicom_bytes(stored, tags={"VOILUTSequence": [lut]})
    np.testing.assert_array_equal(grey(frame(data)), [[0, 100], [200, 255]])


def test_full_range_stretches_each_frame_and_is_used_without_a_window() -> None:
    stored = np.array([[10, 20], [30, 50]], dtype=np.uint16)
    expected = np.rint(np.array([[0, 10], [20, 40]]) / 40 * 255).astype(np.uint8)
    np.testing.assert_array_equal(grey(frame(dicom_bytes(stored))), expected)
    windowed = dicom_bytes(stored, tags={"WindowCenter": 30, "WindowWidth": 41})
    np.testing.assert_array_equal(grey(frame(windowed, window="full_range")), expected)


def test_bits_stored_masking_and_signed_pixels() -> None:
    # 12 of 16 bits stored, signed: the top four bits are not pixel data.
    raw = np.array([[0xF005, 0x0FFF], [0x0800, 0x07FF]], dtype=np.uint16)
    data = dicom_bytes(raw.view(np.int16), bits_stored=12)
    # Values 5, -1, -2048, 2047; window centre 0.5, width 4097: ((x) / 4096 + 0.5) * 255.
    values = np.array([[5, -1], [-2048, 2047]])
    expected = np.clip(np.rint((values / 4096 + 0.5) * 255), 0, 255)
    np.testing.assert_array_equal(
        grey(frame(data, window={"center": 0.5, "width": 4097})), expected
    )


def test_apply_window_formulas_at_their_edges() -> None:
    x = np.array([-0.5, 0.0, 79.0, 79.5])
    np.testing.assert_array_equal(apply_window(x, 40, 80, "LINEAR"), [0, 0, 255, 255])
    np.testing.assert_array_equal(apply_window(np.array([39.0, 40.0]), 40, 1, "LINEAR"), [0, 255])


# --- frames, colour and the compressed syntaxes ------------------------------------------------


def test_each_frame_of_a_multi_frame_instance_is_its_own_unit() -> None:
    stored = np.stack([STORED, STORED + 40, STORED - 40]).astype(np.int16)
    spec = DicomSpec(window="brain")
    instance = open_instance(dicom_bytes(stored, tags=CT), spec, 10**8)
    assert instance.frame_count == 3 and instance.columns["frame_count"] == 3
    # Frame 1: HU -984, 40, 80, 2016 -> 0, 129, 255, 255. Frame 2: HU -1064, -40, 0, 1936.
    expected = [BRAIN_EXPECTED, [[0, 129], [255, 255]], [[0, 0], [0, 255]]]
    for index, want in enumerate(expected):
        np.testing.assert_array_equal(grey(decode_frame(instance, index, spec)), want)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_generated_compressed_instances_decode_like_the_uncompressed(syntax) -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 3000, (2, 32, 32)).astype(np.int16)
    plain = dicom_bytes(stored, tags=CT)
    packed = dicom_bytes(stored, tags=CT, transfer_syntax=syntax)
    assert pydicom.dcmread(__import__("io").BytesIO(packed)).file_meta.TransferSyntaxUID == syntax
    for index in range(2):
        np.testing.assert_array_equal(
            frame(packed, "lung", index), frame(plain, "lung", index), err_msg=str(syntax)
        )


@pytest.mark.parametrize(
    "compressed",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_packaged_mr_in_each_syntax_equals_the_uncompressed_file(compressed: str) -> None:
    reference = frame((PACKAGE_FILES / "MR_small.dcm").read_bytes())
    np.testing.assert_array_equal(frame((PACKAGE_FILES / compressed).read_bytes()), reference)


def test_jpeg_lossless_and_baseline_colour_decode_to_rgb() -> None:
    reference = frame((PACKAGE_FILES / "SC_rgb_rle.dcm").read_bytes())
    assert reference.shape == (100, 100, 3) and len(np.unique(reference.reshape(-1, 3), axis=0)) > 4
    lossless = frame((PACKAGE_FILES / "SC_rgb_jpeg_gdcm.dcm").read_bytes())  # JPEG process 14
    np.testing.assert_array_equal(lossless, reference)
    for ybr in ("SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        converted = frame((PACKAGE_FILES / ybr).read_bytes())  # YBR_FULL_422 -> RGB
        assert np.abs(converted.astype(int) - reference).mean() < 3, ybr


def test_palette_colour_goes_through_its_lookup_tables() -> None:
    data = (PACKAGE_FILES / "examples_palette.dcm").read_bytes()
    dataset = pydicom.dcmread(PACKAGE_FILES / "examples_palette.dcm")
    stored = dataset.pixel_array
    assert list(dataset.RedPaletteColorLookupTableDescriptor) == [256, 0, 16]  # 16-bit entries
    tables = [
        np.frombuffer(getattr(dataset, f"{c}PaletteColorLookupTableData"), dtype="<u2")
        for c in ("Red", "Green", "Blue")
    ]
    expected = np.stack([np.rint(t[stored] / 65535 * 255) for t in tables], axis=-1)
    np.testing.assert_array_equal(frame(data), expected)


def test_sixteen_bit_colour_is_scaled_to_eight_bits() -> None:
    eight = frame((PACKAGE_FILES / "SC_rgb_rle.dcm").read_bytes())
    sixteen = frame((PACKAGE_FILES / "SC_rgb_rle_16bit.dcm").read_bytes())
    assert np.abs(sixteen.astype(int) - eight).max() <= 1


def test_three_samples_a_pixel_are_colour_without_an_interpretation_named() -> None:
    """A file naming no photometric interpretation is grey (MONOCHROME2) only where it has one
    sample a pixel: three are decoded as colour, which is not windowed."""
    dataset = pydicom.Dataset()
    assert is_grey(dataset)
    dataset.SamplesPerPixel = 3
    assert not is_grey(dataset)


def test_a_colour_instance_records_no_window() -> None:
    """The window columns say the window the model saw: a grey instance's, none for colour
    (RGB, YBR, palette), which is scaled to 8 bits as it is (they said the spec's window)."""
    brain = DicomSpec(window="brain")
    grey_columns = open_instance(
        (PACKAGE_FILES / "MR_small.dcm").read_bytes(), brain, 10**8
    ).columns
    assert (grey_columns["window_center"], grey_columns["window_width"]) == (40.0, 80.0)
    for name in ("SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm", "examples_palette.dcm"):
        columns = open_instance((PACKAGE_FILES / name).read_bytes(), brain, 10**8).columns
        assert (columns["window_center"], columns["window_width"]) == (None, None), name
        assert not is_grey(pydicom.dcmread(PACKAGE_FILES / name, stop_before_pixels=True))
        np.testing.assert_array_equal(
            frame((PACKAGE_FILES / name).read_bytes(), "brain"),
            frame((PACKAGE_FILES / name).read_bytes()),
        )  # the window changes nothing in a colour frame


def test_a_colour_interpretation_over_one_sample_a_pixel_is_an_error_not_windowed() -> None:
    """The window columns and the frame agree on what is grey (`is_grey`): a header naming RGB
    over one sample a pixel was windowed as grey while its columns said no window."""
    liar = dicom_bytes(STORED, tags={"PhotometricInterpretation": "RGB", **CT})
    instance = open_instance(liar, DicomSpec(window="brain"), 10**8)
    assert (instance.columns["window_center"], instance.columns["window_width"]) == (None, None)
    with pytest.raises(CorruptDicom, match="RGB names colour, but the frame has one sample"):
        decode_frame(instance, 0, DicomSpec(window="brain"))


# --- malformed input: each its own error -------------------------------------------------------


def test_recognised_by_preamble_or_name() -> None:
    data = dicom_bytes(STORED)
    assert is_dicom("s3://b/scan0001", data) and data[128:132] == b"DICM"
    assert is_dicom("s3://b/x.DCM", b"anything") and not is_dicom("s3://b/x.jpg", b"\xff\xd8")


def test_an_instance_without_preamble_still_decodes() -> None:
    data = dicom_bytes(STORED, tags=CT, preamble=False)
    assert data[128:132] != b"DICM"
    np.testing.assert_array_equal(grey(frame(data, window="brain")), BRAIN_EXPECTED)


def test_malformed_inputs_raise_their_own_errors() -> None:
    from hostile import encode

    jpeg = encode(np.zeros((8, 8, 3), np.uint8), "JPEG")
    with pytest.raises(NotDicom):
        open_instance(jpeg, DicomSpec(), 10**8)
    with pytest.raises(NotDicom):
        open_instance(b"<html>404</html>", DicomSpec(), 10**8)
    no_pixels = dicom_bytes(STORED)
    dataset = pydicom.dcmread(__import__("io").BytesIO(no_pixels))
    del dataset.PixelData
    buffer = __import__("io").BytesIO()
    dataset.save_as(buffer)
    with pytest.raises(NoPixelData, match="PixelData is absent"):
        open_instance(buffer.getvalue(), DicomSpec(), 10**8)
    full = dicom_bytes(np.zeros((64, 64), np.int16))
    with pytest.raises(CorruptDicom, match="1 frame"):
        open_instance(full[:-4000], DicomSpec(), 10**8)  # pixel data cut short
    with pytest.raises(NoPixelData):
        open_instance(full[:200], DicomSpec(), 10**8)  # header cut short: no pixels left
    liar = dicom_bytes(STORED, tags={"NumberOfFrames": 1_000_000})
    with pytest.raises(CorruptDicom, match="1000000 frame"):
        open_instance(liar, DicomSpec(), 10**8)
    with pytest.raises(ImageTooLarge):
        open_instance(full, DicomSpec(), 4095)


def test_a_decoder_panic_is_an_error_row_not_a_crash(monkeypatch) -> None:
    """pylibjpeg-rle (Rust) panics on this stream with a BaseException; the preferred pydicom
    decoder is bypassed here to prove the panic is still contained."""
    import vision_ops.dicom as dicom_module

    stored = np.random.default_rng(0).integers(0, 3000, (24, 20)).astype(np.int16)
    data = bytearray(dicom_bytes(stored, transfer_syntax=RLELossless))
    data[-200:-20] = np.random.default_rng(1).integers(0, 256, 180, dtype=np.uint8).tobytes()
    monkeypatch.setattr(dicom_module, "PLUGIN_PREFERENCE", {})
    instance = open_instance(bytes(data), DicomSpec(), 10**8)
    with pytest.raises(CorruptDicom, match="PanicException"):
        decode_frame(instance, 0, DicomSpec())


def test_an_unsupported_transfer_syntax_is_named() -> None:
    from pydicom.encaps import encapsulate

    data = dicom_bytes(STORED)
    dataset = pydicom.dcmread(__import__("io").BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    dataset["PixelData"].VR = "OB"
    buffer = __import__("io").BytesIO()
    dataset.save_as(buffer)
    with pytest.raises(UnsupportedTransferSyntax, match="MPEG2 Main Profile"):
        open_instance(buffer.getvalue(), DicomSpec(), 10**8)


@pytest.mark.parametrize(
    "uid",
    ["1.2.840.10008.1.2.4.110", "1.2.826.0.1.3680043.99.1"],  # JPEG XL; a vendor's
)
def test_a_transfer_syntax_pydicom_does_not_know_is_named(uid: str) -> None:
    """Written as a private UID of the same length, then renamed in the bytes (pydicom will
    not write a syntax it does not know; a newer tool's file has one)."""
    placeholder = "1.2.826.0.1.3680043.9.1" + "9" * (len(uid) - 23)
    dataset = pydicom.dcmread(__import__("io").BytesIO(dicom_bytes(STORED)))
    dataset.file_meta.TransferSyntaxUID = placeholder
    buffer = __import__("io").BytesIO()
    dataset.save_as(buffer)
    data = buffer.getvalue().replace(placeholder.encode(), uid.encode())
    with pytest.raises(UnsupportedTransferSyntax, match=f"transfer syntax {uid} is not one"):
        open_instance(data, DicomSpec(), 10**8)


@pytest.mark.parametrize(
    "window", [{"WindowCenter": "", "WindowWidth": 400}, {"WindowCenter": 40, "WindowWidth": ""}]
)
def test_an_empty_window_in_the_file_falls_back_to_the_full_range(window: dict) -> None:
    """README: the file's window, else the frame's full range; an empty element is no window
    (it failed the whole instance); a value that is not a number stays a malformed header."""
    stored = np.array([[10, 20], [30, 50]], dtype=np.uint16)
    expected = np.rint(np.array([[0, 10], [20, 40]]) / 40 * 255).astype(np.uint8)
    data = dicom_bytes(stored, tags=window | {"VOILUTFunction": ""})
    np.testing.assert_array_equal(grey(frame(data)), expected)


def test_the_read_gives_a_row_per_frame_and_an_error_row_per_bad_file(tmp_path: Path) -> None:
    stored = np.stack([STORED, STORED]).astype(np.int16)
    files = {
        "multi.dcm": dicom_bytes(stored, tags=CT | CANARY_PHI),
        "scan0002": dicom_bytes(STORED, tags=CT | CANARY_PHI),
        "fake.dcm": b"<html>not found</html>",
        "short.dcm": dicom_bytes(STORED, tags=CANARY_PHI)[:-3],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(tmp_path / name) for name in files]
    batch = {
        "source_uri": np.array(uris, dtype=object),
        "source_etag": np.array([None] * 4, dtype=object),
        "source_size": np.array([1, 2, 3, 4]),
        "source_mtime": np.array([None] * 4, dtype=object),
    }
    [out] = read_unit_blocks(
        batch, preprocessing=None, max_pixels=10**8, storage_options={}, dicom=DicomSpec()
    )
    names = [Path(u).name for u in out["source_uri"]]
    assert names == ["multi.dcm", "multi.dcm", "scan0002", "fake.dcm", "short.dcm"]
    assert list(out["frame_index"]) == [0, 1, 0, None, None]
    assert list(out["frame_count"]) == [2, 2, 1, None, None]
    assert list(out["status"]) == ["ok", "ok", "ok", "error", "error"]
    assert list(out["error_type"])[3:] == ["NotDicom", "CorruptDicom"]
    assert len(set(out["item_id"])) == 5
    assert list(out["source_size"]) == [1, 1, 2, 3, 4]
    assert out["modality"][0] == "CT" and out["sop_instance_uid"][0] is not None
    text = repr(out)
    assert not [n for n in CANARY_NEEDLES if n in text]


def test_the_frames_of_an_instance_leave_the_read_in_blocks_each_decoded_as_its_block_is_built(
    tmp_path: Path, monkeypatch
) -> None:
    """A file of many frames is not held whole: the read yields blocks whose images pass the
    bound by one frame at most, decoding a frame only when its block is being built; the
    blocks together are the one-block read, row for row."""
    from vision_ops import reader

    frames = np.arange(10 * 16 * 16, dtype=np.int16).reshape(10, 16, 16)
    (tmp_path / "cine.dcm").write_bytes(dicom_bytes(frames, tags=CT))
    (tmp_path / "after.dcm").write_bytes(dicom_bytes(STORED, tags=CT))
    batch = {
        "source_uri": np.array([str(tmp_path / "cine.dcm"), str(tmp_path / "after.dcm")]),
        "source_etag": np.array(["a", "b"], dtype=object),
        "source_size": np.array([1, 2]),
    }
    options = {"preprocessing": None, "max_pixels": 10**8, "storage_options": {}}
    options["dicom"] = DicomSpec()
    decoded: list[int] = []
    real_decode = reader.decode_frame

    def counting(instance, index, spec):  # type: ignore[no-untyped-def]
        decoded.append(index)
        return real_decode(instance, index, spec)

    monkeypatch.setattr(reader, "decode_frame", counting)
    frame_bytes = 16 * 16 * 3
    blocks = reader.read_unit_blocks(batch, **options, max_block_bytes=3 * frame_bytes)
    first = next(blocks)
    assert list(first["frame_index"]) == [0, 1, 2] and decoded == [0, 1, 2]
    rest = list(blocks)
    assert [len(block["status"]) for block in rest] == [3, 3, 2]  # 9 and 10, then after.dcm
    [whole] = read_unit_blocks(batch, **options)
    for name in ("source_uri", "item_id", "frame_index", "frame_count", "status"):
        streamed = [value for block in [first, *rest] for value in block[name]]
        assert streamed == list(whole[name]), name
    streamed_images = [image for block in [first, *rest] for image in block["image"]]
    for streamed_image, image in zip(streamed_images, whole["image"], strict=True):
        np.testing.assert_array_equal(streamed_image, image)
    stage = f"{STAGE_PREFIX}read_decode"
    assert all(block[stage].shape == (len(block["status"]),) for block in rest)


def test_a_small_file_of_many_large_frames_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """200 frames of 512 x 512 in a 1.7 MB RLE file are 157 MB of RGB images: read in one
    block, all of them are held at once; in blocks of 8 MB, a few blocks' worth (the peak of
    what Python and numpy allocate, as tracemalloc counts it)."""
    import tracemalloc

    from vision_ops.reader import read_unit_blocks

    frames = np.zeros((200, 512, 512), dtype=np.int16)
    frames[:, ::64, ::64] = 1000
    cine = tmp_path / "cine.dcm"
    cine.write_bytes(dicom_bytes(frames, tags=CT, transfer_syntax=RLELossless))
    assert cine.stat().st_size < 2 * 2**20
    del frames
    batch = {
        "source_uri": np.array([str(cine)]),
        "source_etag": np.array(["a"], dtype=object),
        "source_size": np.array([1]),
    }
    options = {"preprocessing": None, "max_pixels": 10**8, "storage_options": {}}
    peak_mb = {}
    for bound in (None, 8 * 2**20):
        tracemalloc.start()
        try:
            rows = 0
            for block in read_unit_blocks(
                batch, **options, dicom=DicomSpec(), max_block_bytes=bound
            ):
                rows += len(block["status"])
                del block
            peak_mb[bound] = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
        assert rows == 200
    assert peak_mb[None] > 157, peak_mb  # every frame's image at once
    assert peak_mb[8 * 2**20] < 40, peak_mb


# --- patient identifiers -----------------------------------------------------------------------


def test_only_allow_listed_tags_become_columns() -> None:
    data = dicom_bytes(STORED, tags=CT | CANARY_PHI | {"SliceThickness": 1.25})
    columns = open_instance(data, DicomSpec(tags=["SliceThickness"]), 10**8).columns
    assert not [n for n in CANARY_NEEDLES if n in repr(columns)]
    assert columns["dicom_tags"] == '{"SliceThickness": "1.25"}'
    opted = open_instance(data, DicomSpec(phi_tags=["PatientID"]), 10**8).columns
    assert opted["dicom_tags"] == '{"PatientID": "CANARY-PID-0042"}'


def test_patient_identifiers_need_the_explicit_opt_in() -> None:
    with pytest.raises(ValueError, match="PatientName: patient identifiers"):
        DicomSpec(tags=["PatientName"])
    # Table E.1-1's tags by their kind: a name, a date, a time, a sequence, an identifier, a
    # place, free text (a sequence would be written whole, nested elements and all).
    by_kind = [
        "ConsultingPhysicianName",
        "AdmittingDate",
        "AdmittingTime",
        "AdmissionID",
        "ReferringPhysicianIdentificationSequence",
        "CurrentPatientLocation",
        "PatientInstitutionResidence",
        "StudyComments",
        "RequestedProcedureDescription",
        "ReasonForStudy",  # Table E.1-1's, though nothing in the name says so
        "SpecialNeeds",
        "DeviceUID",
        "CameraOwnerName",  # free text (UT)
        "TransactionStatusComment",  # free text (LT)
    ]
    for keyword in by_kind:
        with pytest.raises(ValueError, match=f"{keyword}: patient identifiers"):
            DicomSpec(tags=[keyword])
    acquisition = [
        "SliceThickness",
        "KVP",
        "Manufacturer",
        "ManufacturerModelName",
        "PixelSpacing",
        "ConvolutionKernel",
        "SeriesNumber",
        "StudyInstanceUID",
        "SliceLocation",  # a number: a position, not a place
        "ImageLocation",
    ]
    assert DicomSpec(tags=acquisition).tags == acquisition
    assert DicomSpec(phi_tags=by_kind).phi_tags == by_kind
    with pytest.raises(ValueError, match="dictionary keywords"):
        DicomSpec(tags=["SliceThicknes"])
    raw = {
        "input": {"uris": ["s3://scans/"], "dicom": {"window": "lungs"}},
        "model": {"architecture": "resnet18"},
        "output": {"uri": "s3://out/t"},
    }
    with pytest.raises(
        SpecError, match=re.escape("input.dicom.window: expected one of file, full_range")
    ):
        parse_spec(raw)
    assert InputSpec(uris=["x"], dicom={}).extensions == ["", ".dcm", ".dicom"]


def test_a_header_value_of_the_wrong_type_is_a_scrubbed_error() -> None:
    data = dicom_bytes(STORED, tags={"WindowCenter": "12345678.9", "WindowWidth": 80})
    data = data.replace(b"12345678.9", b"Canaryname")  # not a decimal string any more
    with pytest.raises(CorruptDicom, match="malformed DICOM header") as caught:
        open_instance(data, DicomSpec(), 10**8)
    assert "Canaryname" not in str(caught.value)


def test_error_text_is_scrubbed_of_quoted_values() -> None:
    err = ValueError("Invalid value for VR PN: 'Canaryname^Zelda'\n in element \"PatientName\"")
    assert scrubbed(err) == "ValueError: Invalid value for VR PN: '…' in element '…'"


# --- the job end to end: S3 in and out, Ray, Parquet read back ---------------------------------


@pytest.mark.s3
@pytest.mark.timeout(600)
def test_dicom_job_rows_per_frame_predictions_and_no_phi_anywhere(
    ray_local, ray_temp_dir, seaweed, s3fs_client, s3_options, capfd
) -> None:
    """Frames the model sees are the hand-windowed ones (predictions equal a direct model call
    on them); one row per frame; UIDs in their columns; error rows for the bad files; canary
    patient identifiers in every file appear in no row, manifest, log or console line."""
    import json

    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from torchvision import transforms

    from vision_ops.models import load_labels
    from vision_ops.pipeline import run_job
    from vision_ops.synthetic import phantom_ct
    from vision_ops.zoo import efficientnet_lite0

    slices = phantom_ct(frames=3, size=96)
    files = {
        "ct/multi.dcm": dicom_bytes(slices, tags=CT | CANARY_PHI),
        "ct/single.dcm": dicom_bytes(
            slices[0], tags=CT | CANARY_PHI | {"BodyPartExamined": "HEAD"}
        ),
        "ct/packed.dcm": dicom_bytes(slices[1], tags=CT | CANARY_PHI, transfer_syntax=RLELossless),
        "ct/1.2.3.4.5.6": dicom_bytes(slices[2], tags=CT | CANARY_PHI),  # a UID-named file
        "ct/scan0005": dicom_bytes(slices[2], tags=CT | CANARY_PHI, photometric="MONOCHROME1"),
        "ct/fake.dcm": b"<html>Canaryname^Zelda not found</html>",
        "ct/short.dcm": dicom_bytes(slices[0], tags=CT | CANARY_PHI)[:-100],
    }
    for key, data in files.items():
        s3fs_client.pipe_file(f"images/{key}", data)
    spec = parse_spec(
        {
            "input": {"uris": ["s3://images/ct/"], "extensions": [], "dicom": {"window": "brain"}},
            "model": {
                "kind": "entrypoint",
                "entrypoint": "vision_ops.zoo:efficientnet_lite0",
                "labels": "imagenet-1k",
                "preprocessing": {"resize": 112, "crop": 96, "mean": [0.5] * 3, "std": [0.5] * 3},
            },
            "task": {"top_k": 3},
            "runtime": {"batch_size": 4, "max_actors": 1},
            "output": {"uri": "s3://out/dicom"},
            "run": {"id": "dicom-run", "date": "2026-11-24"},
            "storage_options": s3_options,
        }
    )
    summary = run_job(spec)
    assert (summary.inputs, summary.commit.rows, summary.commit.errors) == (7, 9, 2)
    [part] = summary.commit.files
    assert part.startswith("s3://out/dicom/run_date=2026-11-24/dicom-run-")
    table = pq.read_table(s3fs_client.open(part.removeprefix("s3://")))
    rows = sorted(table.to_pylist(), key=lambda r: (r["source_uri"], r["frame_index"] or 0))
    by_name = {}
    for row in rows:
        by_name.setdefault(row["source_uri"].rpartition("/")[2], []).append(row)
    assert [r["frame_index"] for r in by_name["multi.dcm"]] == [0, 1, 2]
    assert {r["frame_count"] for r in by_name["multi.dcm"]} == {3}
    assert by_name["fake.dcm"][0]["error_type"] == "NotDicom"
    assert by_name["short.dcm"][0]["error_type"] == "CorruptDicom"
    single = by_name["single.dcm"][0]
    uids = pydicom.dcmread(__import__("io").BytesIO(files["ct/single.dcm"]))
    assert single["sop_instance_uid"] == uids.SOPInstanceUID
    assert single["study_instance_uid"] == uids.StudyInstanceUID
    assert (single["modality"], single["body_part_examined"]) == ("CT", "HEAD")
    assert (single["window_center"], single["window_width"]) == (40.0, 80.0)
    assert (single["image_width"], single["image_height"]) == (96, 96)

    # The model on hand-windowed frames: brain window, MONOCHROME1 inverted.
    def by_hand(stored: np.ndarray, invert: bool = False) -> np.ndarray:
        windowed = apply_window(stored.astype(np.float64) - 1024, 40, 80, "LINEAR")
        return 255 - windowed if invert else windowed

    expected_frames = {
        ("multi.dcm", 0): by_hand(slices[0]),
        ("multi.dcm", 1): by_hand(slices[1]),
        ("multi.dcm", 2): by_hand(slices[2]),
        ("single.dcm", 0): by_hand(slices[0]),
        ("packed.dcm", 0): by_hand(slices[1]),
        ("1.2.3.4.5.6", 0): by_hand(slices[2]),
        ("scan0005", 0): by_hand(slices[2], invert=True),
    }
    preprocess = transforms.Compose(
        [
            transforms.Resize(112),
            transforms.CenterCrop(96),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    batch = torch.stack(
        [preprocess(Image.fromarray(f).convert("RGB")) for f in expected_frames.values()]
    )
    with torch.inference_mode():
        top = efficientnet_lite0().eval()(batch).softmax(-1).topk(3)
    labels = load_labels("imagenet-1k")
    for (name, index), ids, scores in zip(expected_frames, top.indices, top.values, strict=True):
        row = by_name[name][index]
        assert row["status"] == "ok" and row["frame_index"] == index, (name, row["error_message"])
        assert [e["label"] for e in row["top_k"]] == [labels[i] for i in ids.tolist()]
        np.testing.assert_allclose([e["score"] for e in row["top_k"]], scores, atol=1e-5)

    # No patient identifier anywhere: rows, files, manifest, logs, console.
    needles = [n.encode() for n in CANARY_NEEDLES]
    local = Path(ray_temp_dir).parent / f"{Path(ray_temp_dir).name}-dicom-out"
    s3fs_client.get("out/dicom/", str(local), recursive=True)
    try:
        written = [p for p in local.rglob("*") if p.is_file()]
        assert any(p.suffix == ".parquet" for p in written) and any(
            p.suffix == ".json" for p in written
        )
        assert [str(p) for p in written for n in needles if n in p.read_bytes()] == []
    finally:
        __import__("shutil").rmtree(local, ignore_errors=True)
    assert not [n for n in CANARY_NEEDLES if n in json.dumps(table.to_pylist(), default=str)]
    logs = [
        p
        for p in Path(ray_temp_dir).rglob("*")
        if p.is_file() and p.suffix in (".log", ".out", ".err")
    ]
    assert logs, "no Ray session logs to check"
    assert [str(p) for p in logs for n in needles if n in p.read_bytes()] == []
    console = capfd.readouterr()
    assert not [n for n in CANARY_NEEDLES if n in console.out + console.err]


def test_a_run_of_unreadable_dicom_files_alone_commits_their_error_rows(
    ray_local, tmp_path, tiny_weights
) -> None:
    """A model batch of DICOM error units only (every file broken, or an incremental night
    retrying broken files): their `dicom_tags` are all null, which Ray Data hands on as NaN.
    The run commits each file's error row (json.loads(NaN) failed the whole run)."""
    import pyarrow.parquet as pq

    from vision_ops.pipeline import run_job

    folder = tmp_path / "ct"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"not a dicom file at all")
    (folder / "b.dcm").write_bytes(b"DICM" * 10)
    spec = parse_spec(
        {
            "input": {"uris": [str(folder)], "dicom": {}},
            "model": {
                "architecture": "mobilenet_v3_small",
                "weights": str(tiny_weights),
                "num_classes": 4,
                "preprocessing": {"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.5] * 3},
            },
            "runtime": {"batch_size": 4, "max_actors": 1, "predict_in": "driver"},
            "output": {"uri": str(tmp_path / "table")},
            "run": {"id": "broken", "date": "2026-11-24"},
        }
    )
    summary = run_job(spec)
    assert (summary.commit.rows, summary.commit.errors) == (2, 2)
    rows = pq.read_table(tmp_path / "table").to_pylist()
    assert {(r["error_type"], r["dicom_tags"]) for r in rows} == {("NotDicom", None)}
