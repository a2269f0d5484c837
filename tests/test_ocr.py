"""OCR: the PP-OCR pieces called directly, the pair against RapidOCR, and a run on SeaweedFS."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray  # noqa: F401  (imported outside a test: Ray's log handler keeps the stderr it found)
import skimage.data

from vision_ops.config import parse_spec
from vision_ops.errors import ModelError
from vision_ops.ocr import (
    LINE_ENTRY,
    OCR_SCHEMA,
    Line,
    TextReader,
    characters,
    ctc_decode,
    detector_size,
    joined_text,
    line_columns,
    min_area_rect,
    ocr_table,
    packaged_model,
    reading_order,
)
from vision_ops.tasks import OcrTask

PAGE_LINES = [
    "Region-basedsegmentation",
    "Let us first determine markers of the coins and the",
    "background.These markers are pixels that we can label",
    "unambiguously as either object or background.Here,",
    "histogram ofgreyvalues:",
]


def page() -> np.ndarray:
    """scikit-image's scanned page.png, as the RGB image a read task gives."""
    return np.stack([skimage.data.page()] * 3, axis=-1)


def rendered(text: str, size: tuple[int, int], at: tuple[int, int]) -> np.ndarray:
    """`text` in black DejaVu Sans 40 px on a white (width, height) image, as RGB."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 40)  # the system's (fonts-dejavu)
    except OSError:  # else the copy opencv-python (rapidocr_onnxruntime's) ships
        import cv2

        font = ImageFont.truetype(str(Path(cv2.__file__).parent / "qt/fonts/DejaVuSans.ttf"), 40)
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text(at, text, fill="black", font=font)
    return np.asarray(image)


@pytest.fixture(scope="module")
def reader() -> TextReader:
    import onnxruntime

    detector = onnxruntime.InferenceSession(str(packaged_model("detector")))
    recognizer = onnxruntime.InferenceSession(str(packaged_model("recognizer")))
    return TextReader(detector, recognizer, characters(recognizer), OcrTask())


# --- pure pieces -----------------------------------------------------------------------------


def test_min_area_rect_of_a_rotated_rectangle() -> None:
    angle = math.radians(20)
    along, across = (
        np.array([math.cos(angle), math.sin(angle)]),
        np.array([-math.sin(angle), math.cos(angle)]),
    )
    grid = np.array(
        [along * u + across * v for u in np.linspace(0, 40, 41) for v in np.linspace(0, 10, 11)]
    )
    box, short = min_area_rect(grid + np.array([100, 50]))
    assert short == pytest.approx(10)
    sides = sorted(np.linalg.norm(box - np.roll(box, -1, axis=0), axis=1))
    assert sides == pytest.approx([10, 10, 40, 40])
    origin = np.array([100, 50])
    corners = [origin, origin + 40 * along, origin + 40 * along + 10 * across, origin + 10 * across]
    # ordered top-left, top-right, bottom-right, bottom-left in image coordinates (y down):
    # the two leftmost corners are the left side, the upper of them first
    expected = np.array([corners[0], corners[1], corners[2], corners[3]])
    assert box == pytest.approx(expected, abs=1e-6)


def test_unclip_is_pyclipper_s_round_offset_as_pp_ocr_runs_it() -> None:
    """DB's unclip as PP-OCR runs it (pyclipper): whole-pixel corners, round joins, whole-pixel
    points. Growing the rectangle by the distance exactly put boxes a pixel off RapidOCR's
    (10.7 -> 9.7 here, not 9), and a line's box a pixel off can read otherwise."""
    import pyclipper

    from vision_ops.ocr import convex_hull, unclip

    box = np.array([[10.7, 20.7], [50.7, 20.7], [50.7, 40.7], [10.7, 40.7]])
    assert {tuple(point) for point in unclip(box, 1.0).tolist()} == {
        (51, 20), (51, 40), (50, 41), (10, 41), (9, 40), (9, 20), (10, 19), (50, 19)
    }  # fmt: skip
    rng = np.random.default_rng(7)
    for index in range(400):  # boxes of any size and tilt, at the distances unclip meets
        turn = 0.0 if index % 3 == 0 else rng.uniform(-0.5, 0.5)
        (w, h), centre = rng.uniform([3, 3], [300, 60]), rng.uniform(0, 500, 2)
        rotation = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2 @ rotation.T + centre
        corners = corners.astype(np.float32)  # as OpenCV's minAreaRect gives them
        distance = float(rng.uniform(1.2, 30))
        offset = pyclipper.PyclipperOffset()
        offset.AddPath(corners, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        (expected,) = offset.Execute(distance)
        hull = {tuple(point) for point in convex_hull(unclip(corners, distance)).tolist()}
        assert hull == {tuple(point) for point in convex_hull(np.array(expected)).tolist()}


def test_min_area_rect_of_one_row_has_no_height() -> None:
    _, short = min_area_rect(np.array([[0, 5], [9, 5], [4, 5]], dtype=float))
    assert short == 0


def test_detector_size_scales_the_short_side_up_and_caps_the_long_side() -> None:
    settings = OcrTask()
    assert detector_size(191, 384, settings) == (736, 1472)  # page.png, as RapidOCR sizes it
    height, width = detector_size(3000, 4000, settings)
    assert width <= 2000 and height % 32 == 0 and width % 32 == 0
    assert detector_size(1000, 1000, settings) == (992, 992)  # large enough: only rounded
    # the short side's limit first, as RapidOCR's: a line's image is seen 736 px high
    assert detector_size(200, 800, settings) == (736, 2944)


def test_a_wide_image_is_seen_at_the_pixels_a_large_one_gets_not_squashed() -> None:
    """A 6000 x 120 line fits det_max_side on its long side only 40 px high, rounded to 32:
    squashed into one cell of the detector's coarsest map, most of its words were lost. It is
    seen at about det_max_side squared pixels, its aspect kept; a side that would round under
    64 keeps its size and is padded."""
    from vision_ops.ocr import detector_canvas

    settings = OcrTask()
    assert detector_size(120, 6000, settings) == (288, 14144)  # x 2.36, text 94 px high
    height, width = detector_size(2, 100_000, settings)
    assert (height, width) == (1, 62496)
    assert detector_canvas((height, width)) == (64, 62496)  # padded: 4.0 M pixels
    assert detector_canvas((288, 14144)) == (288, 14144)


def test_ctc_decode_merges_repeats_and_drops_blanks() -> None:
    chars = ["", "a", "b", " "]
    steps = [1, 1, 0, 1, 2, 2, 3, 0]  # a a _ a b b space _ -> "aab "
    probs = np.full((1, len(steps), 4), 0.1, dtype=np.float32)
    for t, c in enumerate(steps):
        probs[0, t, c] = 0.7 if t == 0 else 0.9
    [(text, score)] = ctc_decode(probs, chars)
    assert text == "aab "
    kept = [0.7, 0.9, 0.9, 0.9]  # the first of each run, blanks left out
    assert score == pytest.approx(np.mean(kept))
    [(empty, zero)] = ctc_decode(np.eye(4, dtype=np.float32)[[0, 0]][None], chars)
    assert (empty, zero) == ("", 0.0)


def quad(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


def test_reading_order_groups_rows_by_vertical_overlap() -> None:
    polygons = [
        quad(200, 52, 300, 70),  # row 2, right
        quad(10, 10, 100, 30),  # row 1
        quad(10, 50, 120, 68),  # row 2, left (a little higher than its neighbour)
        quad(10, 90, 80, 110),  # row 3
    ]
    rows = reading_order(polygons)
    assert rows == [[1], [2, 0], [3]]
    assert joined_text(["c", "a", "b", "d"], rows) == "a\nb c\nd"


@pytest.mark.parametrize("degrees", [2.5, -2.5])
def test_a_skewed_pages_lines_are_rows_of_their_own_in_order(degrees: float) -> None:
    """Four full-width lines 52 px apart on a page scanned 2.5 degrees off: each line's
    upright box reaches more than half into the next one's height, but the next line lies
    below it, not beside it, so each is a row of its own, top to bottom (they were joined
    into rows of two, sorted by their left ends: line 2 before line 1)."""
    turn = math.radians(degrees)
    rotation = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    centre = np.array([850.0, 200.0])
    polygons = [
        (quad(40, 100 + 52 * i, 1640, 135 + 52 * i) - centre) @ rotation.T + centre
        for i in range(4)
    ]
    shuffled = [polygons[i] for i in (2, 0, 3, 1)]
    assert reading_order(shuffled) == [[1], [3], [0], [2]]
    assert joined_text(["3", "1", "4", "2"], reading_order(shuffled)) == "1\n2\n3\n4"


def test_a_tall_cut_is_turned_to_read_left_to_right() -> None:
    from vision_ops.ocr import line_cut

    image = np.zeros((100, 40, 3), dtype=np.uint8)
    image[:, :, 0] = np.arange(100, dtype=np.uint8)[:, None]  # red grows downwards
    cut = line_cut(image, quad(5, 10, 25, 90))
    assert cut.shape == (20, 80, 3)  # turned: the long side is the width
    # turned counter-clockwise: the text's top (small y) is now on the left
    assert list(cut[10, [0, 40, 79], 0]) == [10, 50, 89]


def test_a_straight_box_is_cut_as_its_pixels_and_sized_to_48_rows() -> None:
    """The box's own pixels (none past its edges), then 48 rows at its aspect ratio (ceil of
    48 x 100 / 25 = 192 columns), padded with zeros to 320."""
    from vision_ops.ocr import line_cut, recognizer_batch

    image = np.random.default_rng(0).integers(0, 256, (60, 200, 3), dtype=np.uint8)
    cut = line_cut(image, quad(20, 10, 120, 35))
    assert np.array_equal(cut, image[10:35, 20:120])
    batch = recognizer_batch([cut])
    assert batch.shape == (1, 3, 48, 320)
    assert np.abs(batch[0, :, :, :192]).sum() > 0 and not batch[0, :, :, 192:].any()


def test_a_line_is_cut_and_sized_as_rapidocr_does() -> None:
    """A line sampled straight to 48 rows took in the pixels past its box at the first and
    last rows (a box a pixel taller), and about one line in ten read otherwise than RapidOCR
    reads it; PP-OCR warps the box at its own size (bicubic), then resizes within it. Boxes
    on page.png, straight and tilted, against RapidOCR's own cut and recogniser input: the
    same size, within 2 grey levels."""
    from rapidocr_onnxruntime import RapidOCR

    from vision_ops.ocr import line_cut, recognizer_batch

    rapid = RapidOCR()
    image = page()
    boxes = [
        quad(10, 40, 380, 70),
        np.array([[12.0, 31.0], [371.0, 22.0], [372.0, 60.0], [13.0, 69.0]]),
        np.array([[30.5, 100.2], [300.7, 118.9], [298.1, 150.3], [28.4, 131.6]]),
    ]
    for box in boxes:
        (expected_cut,) = rapid.get_crop_img_list(image, [box.astype(np.float32)])
        cut = line_cut(image, box)
        assert cut.shape == expected_cut.shape
        assert np.abs(cut.astype(int) - expected_cut).max() <= 2
        ratio = max(320 / 48, cut.shape[1] / cut.shape[0])
        expected = rapid.text_rec.resize_norm_img(expected_cut, ratio)
        assert np.abs(recognizer_batch([cut])[0] - expected).max() <= 2 * 2 / 255 + 1e-6


def test_ocr_rows_schema_and_empty_and_error_rows() -> None:
    polygon = quad(1, 2, 30, 12)
    columns = line_columns(
        [[Line("hello", 0.9, polygon), Line("world", 0.8, polygon + np.array([40, 0]))], [], None]
    )
    batch = {
        "source_uri": np.array(["s3://b/a.png", "s3://b/b.png", "s3://b/c.png"], dtype=object),
        "item_id": np.array(["1", "2", "3"], dtype=object),
        "status": np.array(["ok", "ok", "error"], dtype=object),
        "error_type": np.array([None, None, "NotAnImage"], dtype=object),
        "error_message": np.array([None, None, "not an image"], dtype=object),
        "model_name": np.array(["PP-OCRv4"] * 3, dtype=object),
        "model_weights_sha256": np.array(["0" * 64] * 3, dtype=object),
        **columns,
    }
    table = ocr_table(batch, "run-1")
    assert table.schema.equals(OCR_SCHEMA, check_metadata=True)
    assert table.schema.field("lines").type == pa.list_(
        pa.field("item", LINE_ENTRY, nullable=False)
    )
    assert OCR_SCHEMA.metadata[b"vision_ops.task"] == b"ocr"
    first, empty, error = table.to_pylist()
    assert first["text"] == "hello world"  # one row of text: the lines side by side
    assert [line["text"] for line in first["lines"]] == ["hello", "world"]
    assert first["lines"][0]["score"] == pytest.approx(0.9)
    assert first["lines"][0]["polygon"] == [
        {"x": 1, "y": 2},
        {"x": 30, "y": 2},
        {"x": 30, "y": 12},
        {"x": 1, "y": 12},
    ]
    assert (empty["status"], empty["text"], empty["lines"]) == ("ok", "", [])
    assert (error["status"], error["text"], error["lines"]) == ("error", None, None)
    assert {row["task"] for row in table.to_pylist()} == {"ocr"}


# --- the model pair --------------------------------------------------------------------------


def test_the_reader_reads_page_png_as_rapidocr_does(reader) -> None:
    from rapidocr_onnxruntime import RapidOCR

    image = page()
    [lines] = reader.read([image])
    # RapidOCR works on OpenCV's BGR; the page is grey, so the same pixels
    expected, _ = RapidOCR()(image[..., ::-1].copy(), use_cls=False)
    assert [line.text for line in lines] == [text for _, text, _ in expected] == PAGE_LINES
    for line, (box, _, score) in zip(lines, expected, strict=True):
        assert line.score == pytest.approx(score, abs=0.03)
        assert np.abs(line.polygon - np.array(box)).max() <= 2  # pixels
        assert line.score >= 0.9


def test_a_batch_reads_each_image_as_alone(reader) -> None:
    text_free = skimage.data.coffee()
    lines_page, lines_photo, lines_small = reader.read(
        [page(), text_free, np.zeros((20, 20, 3), np.uint8)]
    )
    assert [line.text for line in lines_page] == PAGE_LINES
    assert lines_photo == [] and lines_small == []
    height, width = page().shape[:2]
    for line in lines_page:
        assert (line.polygon >= 0).all()
        assert (line.polygon[:, 0] <= width - 1).all() and (line.polygon[:, 1] <= height - 1).all()


def test_a_lines_spaces_are_read_as_rapidocr_reads_them(reader) -> None:
    """Lines on 800 x 200 images read "HELLOWORLD2026" and "Invoicenumber48213" (`query
    --search hello` found nothing) where RapidOCR reads the spaces: the detector saw the
    image at 1984 x 512 (det_max_side before det_limit_side), not 2944 x 736, and the boxes
    came out a pixel or two tighter (the unclip and the line's cut each put other lines a
    pixel off too). Each step now as PP-OCR's: the same boxes as RapidOCR's, to the pixel,
    and the same text."""
    from rapidocr_onnxruntime import RapidOCR

    rapid = RapidOCR()
    texts = ["HELLO WORLD 2026", "Invoice number 48213"]
    images = [rendered(text, (800, 200), (20, 20)) for text in texts]
    for image, lines, text in zip(images, reader.read(images), texts, strict=True):
        expected, _ = rapid(image[..., ::-1].copy(), use_cls=False)
        assert [line.text for line in lines] == [text for _, text, _ in expected] == [text]
        assert lines[0].polygon.tolist() == expected[0][0]


def test_a_long_line_on_a_wide_image_is_read_whole(reader) -> None:
    """A 6000 x 120 image of one line came back ok with a piece of it ("beta gamma delta"):
    the detector saw it 32 px high (det_max_side on its long side, the short side rounded
    down to 32) and found pieces. Seen at 288 x 14144 (about det_max_side squared pixels),
    the line is one box, read whole."""
    text = "alpha beta gamma delta " * 8
    [lines] = reader.read([rendered(text, (6000, 120), (20, 40))])
    assert [line.text for line in lines] == [text.strip()]
    assert lines[0].polygon[:, 0].min() <= 25 and lines[0].polygon[:, 0].max() >= 4000


def test_a_line_reads_the_same_whatever_its_batch_holds(reader) -> None:
    """Short words alone, then beside an image of one long line: an image's crops are read in
    calls of their own, never padded to another image's widest (a short word padded to
    3,000 px read "Tootal" for "Total", and lost "7"), so a rerun or a resumed run that batches
    the image otherwise writes the same rows."""
    from PIL import Image, ImageDraw, ImageFont

    words = ["Total", "$12.50", "ID", "7", "Tax", "x2", "OK", "Fig.1", "CAT", "iPad", "5%"]
    short = Image.new("RGB", (300, 40 * len(words)), "white")
    for index, word in enumerate(words):
        ImageDraw.Draw(short).text(
            (15, 8 + 40 * index), word, fill="black", font=ImageFont.load_default(size=22)
        )
    long = Image.new("RGB", (3000, 200), "white")
    ImageDraw.Draw(long).text(
        (10, 20), "a very long line of text that goes on across the page " * 3, fill="black",
        font=ImageFont.load_default(size=28),
    )  # fmt: skip
    (alone,) = reader.read([np.asarray(short)])
    beside, _ = reader.read([np.asarray(short), np.asarray(long)])
    assert [line.text for line in alone] == words
    assert [line.text for line in beside] == words
    assert [line.score for line in beside] == pytest.approx([line.score for line in alone])


def test_a_spec_names_its_own_model_files_and_dictionary(reader, tmp_path) -> None:
    import shutil

    from vision_ops.ocr_predictor import TextPredictor

    files = {role: tmp_path / f"{role}.onnx" for role in ("detector", "recognizer")}
    for role, path in files.items():
        shutil.copy(packaged_model(role), path)
    dictionary = tmp_path / "keys.txt"
    dictionary.write_text("\n".join(reader.chars[1:-1]) + "\n")  # less blank and space
    base = {"input": {"uris": [str(tmp_path)]}, "output": {"uri": str(tmp_path / "out")}}
    model = {"kind": "ppocr", "dictionary": f"file://{dictionary}"}
    model |= {role: f"file://{path}" for role, path in files.items()}
    predictor = TextPredictor(parse_spec(base | {"task": {"kind": "ocr"}, "model": model}))
    packaged = TextPredictor(parse_spec(base | {"task": {"kind": "ocr"}}))
    assert predictor.model.name == "detector+recognizer"
    assert packaged.model.name == "PP-OCRv4"
    assert predictor.model.weights_sha256 != packaged.model.weights_sha256  # the dictionary's
    assert predictor.reader.chars == reader.chars
    [lines] = predictor.reader.read([page()])
    assert [line.text for line in lines] == PAGE_LINES


def test_a_first_batch_the_reader_fails_on_whole_is_error_rows_unless_the_model_fails(
    reader, tmp_path
) -> None:
    """A model of any input size that has read no image yet is probed with a small black one:
    images it cannot take become error rows from the first batch on; a reader that fails on the
    probe too is the model's fault and raises (the run fails, nothing committed)."""
    from vision_ops.ocr_predictor import TextPredictor

    base = {"input": {"uris": [str(tmp_path)]}, "output": {"uri": str(tmp_path / "out")}}
    predictor = TextPredictor(parse_spec(base | {"task": {"kind": "ocr"}}))

    def fails_on_any_light(images: list[np.ndarray]) -> tuple[list[list[Line]], list[bool]]:
        if any(image.any() for image in images):
            raise RuntimeError("this input breaks the reader")
        return reader.read_checked(images)

    predictor.reader.read_checked = fails_on_any_light  # type: ignore[method-assign]
    images = np.empty(2, dtype=object)
    images[:] = [page(), skimage.data.coffee()]
    batch = {
        "image": images,
        "status": np.array(["ok", "ok"], dtype=object),
        "error_type": np.full(2, None, dtype=object),
        "error_message": np.full(2, None, dtype=object),
    }
    for rows in (slice(0, 2), slice(1, 2)):
        out = predictor({name: values[rows] for name, values in batch.items()})
        assert set(out["status"]) == {"error"}
        assert set(out["error_message"]) == {"this input breaks the reader"}

    def device_lost(images: list[np.ndarray]) -> tuple[list[list[Line]], list[bool]]:
        raise RuntimeError("CUDA failure 700: an illegal memory access")

    predictor.reader.read_checked = device_lost  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        predictor({name: values[:1] for name, values in batch.items()})


class NanSession:
    """An onnxruntime session whose output is NaN (as float16 overflows) for each input image
    `poisoned` picks (a detector's: all one colour; a recogniser's: every crop)."""

    def __init__(self, session, poisoned) -> None:  # type: ignore[no-untyped-def]
        self.session, self.poisoned = session, poisoned

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.session, name)

    def run(self, names, feed):  # type: ignore[no-untyped-def]
        (batch,) = feed.values()
        (output, *rest) = self.session.run(names, feed)
        output = np.array(output)
        for index in range(len(batch)):
            if self.poisoned(batch[index]):
                output[index] = np.nan
        return [output, *rest]


def one_colour(image: np.ndarray) -> bool:
    return bool((image.max(axis=(1, 2)) == image.min(axis=(1, 2))).all())


@pytest.mark.parametrize(
    ("role", "poisoned", "failed"),
    [("detector", one_colour, [False, True]), ("recognizer", lambda crop: True, [True, False])],
)
def test_nan_model_outputs_for_an_image_are_an_error_row_not_an_image_without_text(
    tmp_path, role, poisoned, failed
) -> None:
    """NaN text probabilities fail the reader's thresholds: an image with no lines, an ok
    row, had they not been looked at. A NaN detector map (the black image's) or NaN
    recogniser outputs (the page's lines; the black image has none to read) make the image
    an error row (NonFiniteOutput); the other keeps what it reads."""
    from vision_ops.ocr import LINE_TEXTS
    from vision_ops.ocr_predictor import TextPredictor

    base = {"input": {"uris": [str(tmp_path)]}, "output": {"uri": str(tmp_path / "out")}}
    predictor = TextPredictor(parse_spec(base | {"task": {"kind": "ocr"}}))
    setattr(predictor.reader, role, NanSession(getattr(predictor.reader, role), poisoned))
    images = np.empty(2, dtype=object)
    images[:] = [page(), np.zeros((96, 160, 3), np.uint8)]
    out = predictor({"image": images, "status": np.array(["ok", "ok"], dtype=object)})
    assert [status == "error" for status in out["status"]] == failed
    assert [kind == "NonFiniteOutput" for kind in out["error_type"]] == failed
    if not failed[0]:
        assert list(out[LINE_TEXTS][0]) == PAGE_LINES


def test_a_model_file_that_is_not_onnx_is_a_model_error(tmp_path) -> None:
    from vision_ops.ocr_predictor import TextPredictor

    bogus = tmp_path / "det.onnx"
    bogus.write_bytes(b"not a model")
    spec = parse_spec(
        {
            "input": {"uris": [str(tmp_path)]},
            "task": {"kind": "ocr"},
            "model": {"kind": "ppocr", "detector": str(bogus)},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    with pytest.raises(ModelError, match=r"model\.detector: not an ONNX model"):
        TextPredictor(spec)


def test_a_dictionary_of_another_size_is_refused(tmp_path) -> None:
    from vision_ops.ocr_predictor import TextPredictor

    dictionary = tmp_path / "dict.txt"
    dictionary.write_text("a\nb\nc\n")
    spec = parse_spec(
        {
            "input": {"uris": [str(tmp_path)]},
            "task": {"kind": "ocr"},
            "model": {"kind": "ppocr", "dictionary": str(dictionary)},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    with pytest.raises(ModelError, match="the recognizer has 6625 classes; the dictionary gives 5"):
        TextPredictor(spec)


@pytest.mark.parametrize(
    ("field", "content", "message"),
    [
        ("dictionary", "a\nb\nc\n", "the recognizer has 6625 classes; the dictionary gives 5"),
        ("recognizer", "not a model", "model.recognizer: not an ONNX model"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_ocr_files_that_do_not_hold_together_exit_2_before_any_work(
    tmp_path, capsys, own_ray_root, command, field, content, message
) -> None:
    """A dictionary of another size than the recogniser's classes, or a recogniser that is not
    an ONNX model: `validate` passed them, and `run` started its pool, each actor failing to
    load (`run` checks the model while Ray starts)."""
    from vision_ops.cli import EXIT_BAD_SPEC, main

    file = tmp_path / f"{field}.file"
    file.write_text(content)
    spec = {
        "input": {"uris": [str(tmp_path / "pages")]},
        "task": {"kind": "ocr"},
        "model": {"kind": "ppocr", field: str(file)},
        "output": {"uri": str(tmp_path / "out")},
    }
    (tmp_path / "pages").mkdir()
    spec_file = tmp_path / "ocr.yaml"
    spec_file.write_text(json.dumps(spec))
    assert main([command, str(spec_file)]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_ocr_spec_defaults_to_the_packaged_pair_and_refuses_others(tmp_path) -> None:
    base = {"input": {"uris": [str(tmp_path)]}, "output": {"uri": str(tmp_path / "out")}}
    spec = parse_spec(base | {"task": {"kind": "ocr"}})
    assert spec.model.kind == "ppocr" and Path(packaged_model("detector")).exists()
    refused = r"model\.kind: task ocr runs model\.kind ppocr; found torchvision"
    with pytest.raises(ValueError, match=refused):
        parse_spec(base | {"task": {"kind": "ocr"}, "model": {"architecture": "resnet50"}})
    with pytest.raises(ValueError, match="expected decode: tasks"):
        parse_spec(base | {"task": {"kind": "ocr"}, "runtime": {"decode": "device"}})


def test_the_packaged_pair_s_version_is_part_of_the_model_fingerprint(tmp_path) -> None:
    """An upgrade of the package that ships the default files is a new model for incremental
    runs; files the spec names are the model themselves."""
    from importlib.metadata import version

    from vision_ops.pipeline.incremental import model_fingerprint, packaged_files

    base = {"input": {"uris": [str(tmp_path)]}, "output": {"uri": str(tmp_path / "out")}}
    default = parse_spec(base | {"task": {"kind": "ocr"}})
    assert packaged_files(default) == {"rapidocr_onnxruntime": version("rapidocr_onnxruntime")}
    files = {"detector": str(packaged_model("detector")), "recognizer": "rec.onnx"}
    named = parse_spec(base | {"task": {"kind": "ocr"}, "model": {"kind": "ppocr", **files}})
    assert packaged_files(named) == {}
    assert model_fingerprint(default) != model_fingerprint(named)


# --- through the pipeline, on SeaweedFS ------------------------------------------------------

OCR_OUTPUT = "s3://out/ocr"


@pytest.fixture(scope="module")
def ocr_run(ray_local, seaweed, s3fs_client, s3_options, photo_paths):  # type: ignore[no-untyped-def]
    """One OCR job over page.png, a photo without text and a truncated PNG, on SeaweedFS."""
    from vision_ops.pipeline import run_job

    page_png = Path(skimage.data.__file__).parent / "page.png"
    coffee = next(p for p in photo_paths if p.name == "coffee.png")
    s3fs_client.put_file(str(page_png), "images/ocr/page.png")
    s3fs_client.put_file(str(coffee), "images/ocr/coffee.png")
    truncated = page_png.read_bytes()[: page_png.stat().st_size // 2]
    s3fs_client.pipe("images/ocr/broken.png", truncated)
    spec = parse_spec(
        {
            "input": {"uris": ["s3://images/ocr/"]},
            "task": {"kind": "ocr"},
            "runtime": {"max_actors": 1, "intra_op_threads": 2},
            "output": {"uri": OCR_OUTPUT},
            "run": {"id": "ocr-run", "date": "2026-12-01"},
            "storage_options": s3_options,
        }
    )
    summary = run_job(spec)
    return spec, summary


@pytest.mark.s3
@pytest.mark.slow
def test_an_ocr_run_reads_the_page_and_writes_the_declared_schema(ocr_run, s3fs_client) -> None:
    import pyarrow.parquet as pq

    from vision_ops.tasks import get_task

    _, summary = ocr_run
    (part,) = summary.commit.files
    with s3fs_client.open(part.removeprefix("s3://"), "rb") as handle:
        table = pq.read_table(handle)
    assert table.schema.equals(get_task("ocr").schema, check_metadata=False)
    assert table.schema.metadata[b"vision_ops.task"] == b"ocr"
    rows = {Path(r["source_uri"]).name: r for r in table.to_pylist()}
    assert set(rows) == {"page.png", "coffee.png", "broken.png"}
    page_row = rows["page.png"]
    assert page_row["status"] == "ok" and page_row["task"] == "ocr"
    assert "markers" in page_row["text"] and "background" in page_row["text"]
    assert page_row["text"] == "\n".join(PAGE_LINES)
    assert [line["text"] for line in page_row["lines"]] == PAGE_LINES
    assert all(line["score"] >= 0.9 for line in page_row["lines"])
    width, height = page_row["image_width"], page_row["image_height"]
    assert (width, height) == (384, 191)
    for line in page_row["lines"]:
        assert len(line["polygon"]) == 4
        assert all(0 <= p["x"] <= width and 0 <= p["y"] <= height for p in line["polygon"])
    assert page_row["model_name"] == "PP-OCRv4" and len(page_row["model_weights_sha256"]) == 64
    photo = rows["coffee.png"]
    assert (photo["status"], photo["text"], photo["lines"]) == ("ok", "", [])
    broken = rows["broken.png"]
    assert broken["status"] == "error" and broken["error_type"] == "CorruptImage"
    assert broken["text"] is None and broken["lines"] is None
    assert (summary.commit.ok, summary.commit.errors) == (2, 1)


@pytest.mark.s3
@pytest.mark.slow
def test_query_searches_the_text_and_shows_the_lines(ocr_run, seaweed, monkeypatch, capsys) -> None:
    import json

    from vision_ops.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint_url)  # the table's S3 endpoint
    args = ["query", OCR_OUTPUT]
    assert main([*args, "--search", "markers", "--format", "json"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["image"] for row in found] == ["page.png"]
    assert found[0]["score"] > 0 and "markers" in found[0]["text"]
    assert main([*args, "--search", "zebra", "--format", "json"]) == 0
    assert capsys.readouterr().out.strip() in ("", "[]")
    sql = "SELECT count(*) AS n, min(score) >= 0.9 AS sure FROM lines"
    assert main([*args, sql, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out.strip()) == {"n": 5, "sure": True}
    assert main([*args, "SELECT 1", "--search", "markers"]) == 2
    assert "expected SQL or --search, found both" in capsys.readouterr().err
    assert main(["report", OCR_OUTPUT]) == 0
    report = capsys.readouterr().out
    assert "top labels (words):" in report and "markers" in report
    assert "items: 3  ok: 2  errors: 1" in report


def test_search_refuses_a_table_of_another_task(tmp_path, capsys) -> None:
    import datetime as dt

    from vision_ops.cli import main
    from vision_ops.schema import item_id
    from vision_ops.sink import ParquetSink
    from vision_ops.tasks import get_task

    schema = get_task("classification").schema
    uri = "file:///data/a.png"
    row = {"run_id": "r1", "item_id": item_id(uri), "source_uri": uri, "model_name": "m"}
    row |= {"model_weights_sha256": "h", "task": "classification", "status": "error"}
    table = pa.Table.from_pylist([row], schema=schema)
    sink = ParquetSink(str(tmp_path / "table"), "r1", dt.date(2026, 12, 1), schema)
    sink.write(table)
    sink.commit([uri])
    assert main(["query", str(tmp_path / "table"), "--search", "markers"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --search reads the text of an OCR table") and "classification" in err
    )


def test_a_tilted_line_clipped_at_the_images_corner_is_read_not_an_error() -> None:
    """Clipped to the image, a box past its corner can lose a corner (two fall on one pixel):
    no homography straightens that, and the image became an error row (a singular matrix)
    every night. The box is the clipped points' rectangle instead."""
    from PIL import Image, ImageDraw

    from vision_ops.ocr import degenerate, line_cut, recognizer_batch, text_boxes

    angle, (cx, cy, w, h) = math.radians(8), (370, 796, 200, 20)
    corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    turned = [
        (
            cx + x * math.cos(angle) - y * math.sin(angle),
            cy + x * math.sin(angle) + y * math.cos(angle),
        )
        for x, y in corners
    ]  # a line at the bottom of the detector's map for an 81 x 74 image
    text = Image.new("F", (736, 800), 0.0)
    ImageDraw.Draw(text).polygon(turned, fill=0.9)
    settings = OcrTask(kind="ocr")
    assert degenerate(np.array([[26, 76], [48, 80], [48, 80], [25, 80]], np.float32))
    assert not degenerate(quad(0, 0, 10, 5))
    boxes = text_boxes(np.asarray(text, np.float32), (81, 74), settings)
    assert boxes and not any(degenerate(box) for box, _ in boxes)
    image = np.full((81, 74, 3), 200, np.uint8)
    for box, _ in boxes:
        assert recognizer_batch([line_cut(image, box)]).shape[2] == 48
    rng = np.random.default_rng(0)  # lines of any tilt across the map's edges and corners
    for _ in range(150):
        angle, (cx, cy) = math.radians(rng.uniform(-30, 30)), rng.uniform(0, [736, 800])
        w, h = rng.uniform(40, 400), rng.uniform(8, 40)
        turned = [
            (
                cx + x * math.cos(angle) - y * math.sin(angle),
                cy + x * math.sin(angle) + y * math.cos(angle),
            )
            for x, y in [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
        ]
        text = Image.new("F", (736, 800), 0.0)
        ImageDraw.Draw(text).polygon(turned, fill=0.9)
        for box, _ in text_boxes(np.asarray(text, np.float32), (81, 74), settings):
            assert not degenerate(box)
            line_cut(image, box)


def test_the_tables_rows_of_lines_are_the_readers_whatever_ties_in_height() -> None:
    """The table groups the reader's lines into rows again; lines of one height (D and E's
    top + bottom are equal) were ordered by their place in the list, which differs between
    the two passes, and the text fell apart into a line a row."""
    from vision_ops.ocr import ocr_columns

    polygons = [quad(8, 4, 29, 17), quad(266, 7, 273, 34), quad(236, 27, 287, 51),
                quad(96, 42, 119, 54), quad(223, 34, 269, 44)]  # fmt: skip
    texts = ["A", "B", "E", "C", "D"]
    rows = reading_order(polygons)
    lines = [Line(texts[i], 0.9, polygons[i]) for row in rows for i in row]  # as read
    table_text = ocr_columns(line_columns([lines]), np.array([True]))["text"][0].as_py()
    assert table_text == joined_text(texts, rows) and "\n" in table_text and " " in table_text
    rng = np.random.default_rng(3)
    for _ in range(200):  # random layouts with ties in height
        boxes = [quad(x, y, x + w, y + 10) for x, y, w in rng.integers(0, 60, (6, 3))]
        rows = reading_order(boxes)
        lines = [Line(str(i), 0.9, boxes[i]) for row in rows for i in row]
        text = ocr_columns(line_columns([lines]), np.array([True]))["text"][0].as_py()
        assert text == joined_text([str(i) for i in range(6)], rows)
