"""The report's galleries: units under their labels, borderline ones, error rows, boxes drawn
where they were found, DICOM frames through their window and scene tiles in place, measured in
headless Chromium; runs committed from a few rows through the real Parquet sink."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from browser import CHROMIUM, measure, screenshot
from committed_rows import classified, commit_rows, failed
from PIL import Image

from vision_ops.dicom import apply_window
from vision_ops.gallery import Sources, best_box_scores, extremes
from vision_ops.report import build_report, render_html
from vision_ops.synthetic import dicom_bytes, phantom_ct

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


def photo(path: Path, width: int, height: int, value: int) -> str:
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def classified_run(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """Six photos (cats and dogs), one gone since the run, a broken file, two CT frames."""
    folder = tmp_path_factory.mktemp("gallery")
    cats = [photo(folder / f"cat{i}.png", 80, 60, 40 * i) for i in range(4)]
    dog = photo(folder / "dog.png", 60, 80, 220)
    ct = folder / "head.dcm"
    ct.write_bytes(
        dicom_bytes(
            phantom_ct(frames=2, size=64), tags={"RescaleSlope": 1, "RescaleIntercept": -1024}
        )
    )
    rows = [
        classified(cats[0], ("cat", 0.95), ("dog", 0.02)),
        classified(cats[1], ("cat", 0.80), ("dog", 0.10)),
        classified(cats[2], ("cat", 0.51), ("dog", 0.49)),  # the borderline one
        classified(cats[3], ("cat", 0.60), ("dog", 0.20)),
        classified(dog, ("dog", 0.90), ("cat", 0.05)),
        classified(str(folder / "gone.png"), ("dog", 0.70), ("cat", 0.20)),
        failed(str(folder / "broken.jpg"), "NotAnImage", "cannot identify image file"),
        *[
            classified(str(ct), ("scan", 0.7), ("cat", 0.1))
            | {"frame_index": i, "frame_count": 2, "window_center": 40.0, "window_width": 80.0}
            for i in range(2)
        ],
    ]
    commit_rows(folder / "table", "classification", rows, "night-1", dicom=True)
    return folder


def test_best_box_score_per_row() -> None:
    entry = {"label_id": 1, "label": "a", "x_min": 0, "y_min": 0, "x_max": 1, "y_max": 1}
    rows = [[entry | {"score": 0.2}, entry | {"score": 0.7}], [], None, [entry | {"score": 0.4}]]
    column = pa.chunked_array([pa.array(rows[:2]), pa.array(rows[2:])])
    assert best_box_scores(column).tolist() == pytest.approx([0.7, 0.0, 0.0, 0.4])


def test_strips_hold_the_highest_and_lowest_scoring_units() -> None:
    ranked = np.array([4, 0, 3, 1, 2])  # row positions, best first
    assert extremes(ranked, 3).tolist() == [4, 0, 2]
    assert extremes(ranked, 8).tolist() == [4, 0, 3, 1, 2]


def test_a_dicom_frame_is_shown_through_its_window(classified_run) -> None:
    sources = Sources({})
    row = {"source_uri": str(classified_run / "head.dcm"), "frame_index": 1}
    slices = phantom_ct(frames=2, size=64)
    expected = apply_window(slices[1].astype(np.float64) - 1024, 40.0, 80.0, "LINEAR")
    shown = sources.pixels(row | {"window_center": 40.0, "window_width": 80.0})
    assert shown is not None and shown.shape == (64, 64, 3)
    np.testing.assert_array_equal(shown[:, :, 0], expected)
    wide = sources.pixels(row | {"window_center": 40.0, "window_width": 2000.0})
    assert wide is not None and not np.array_equal(wide, shown)  # the window decides


@needs_chromium
def test_the_page_shows_units_under_their_labels(classified_run, tmp_path) -> None:
    report = build_report(str(classified_run / "table"), samples=3)
    drawn = measure(render_html(report), tmp_path)
    folder = str(classified_run)
    strips = {s["title"].split(" (")[0]: s["sources"] for s in drawn["strips"]}
    assert strips["cat"] == [f"{folder}/cat{i}.png" for i in (0, 1, 2)]  # 2 highest, 1 lowest
    assert strips["dog"] == [f"{folder}/dog.png", f"{folder}/gone.png"]
    assert strips["scan"] == [f"{folder}/head.dcm"] * 2
    assert set(drawn["missing"]) == {f"{folder}/gone.png"}  # a placeholder, the page whole
    images = {(i["source"], i["width"], i["height"]) for i in drawn["images"]}
    assert (f"{folder}/dog.png", 120, 160) in images  # decoded by the browser, at thumb size
    assert (f"{folder}/head.dcm", 160, 160) in images
    assert all(i["complete"] and i["width"] > 0 for i in drawn["images"])
    assert drawn["errors"] == [["broken.jpg", "NotAnImage", "cannot identify image file"]]


def test_the_borderline_strip_orders_by_margin(classified_run) -> None:
    report = build_report(str(classified_run / "table"), samples=3)
    body = dict(report.panels)["Borderline (smallest top-1 / top-2 margin)"]
    shown = [part.split('"')[0].rsplit("/", 1)[1] for part in body.split('data-source="')[1:]]
    assert shown == ["cat2.png", "cat3.png", "gone.png"]  # margins 0.02, 0.40, 0.50
    assert "cat 0.510 / dog 0.490" in body


@needs_chromium
def test_boxes_are_drawn_where_they_were_found(tmp_path) -> None:
    image = photo(tmp_path / "street.png", 200, 100, 90)
    box = {"label_id": 1, "label": "car", "score": 0.875}
    box |= {"x_min": 50.0, "y_min": 20.0, "x_max": 150.0, "y_max": 60.0}
    rows = [
        {"source_uri": image, "image_width": 200, "image_height": 100, "num_detections": 1,
         "detections": [box]},
    ]  # fmt: skip
    commit_rows(tmp_path / "table", "detection", rows, "boxes")
    page = render_html(build_report(str(tmp_path / "table")))
    assert "car 0.88" in page
    (drawn,) = measure(page, tmp_path)["boxes"]
    at, image_at = drawn["at"], drawn["image"]
    assert image_at["w"] == 160 and image_at["h"] == 80  # 200 x 100 shown at 160 x 80
    left, top = (at["x"] - image_at["x"]) / 160, (at["y"] - image_at["y"]) / 80
    assert left == pytest.approx(0.25, abs=0.02) and top == pytest.approx(0.2, abs=0.03)
    assert at["w"] / 160 == pytest.approx(0.5, abs=0.03)
    assert at["h"] / 80 == pytest.approx(0.4, abs=0.05)


@needs_chromium
def test_scene_tiles_lie_in_place_coloured_by_label(tmp_path) -> None:
    scene = str(tmp_path / "scene.tif")
    tile = {"source_uri": scene, "tile_size": 256, "scene_width": 512, "scene_height": 256}
    rows = [
        tile | {"tile_x": 0, "tile_y": 0, "label": "water", "score": 0.9},
        tile | {"tile_x": 256, "tile_y": 0, "label": "forest", "score": 0.8},
    ]
    commit_rows(tmp_path / "table", "classification", rows, "tiles", tiles=True)
    page = render_html(build_report(str(tmp_path / "table")))
    tiles = {t["label"]: t for t in measure(page, tmp_path)["tiles"]}
    assert set(tiles) == {"water", "forest"}
    water, forest = tiles["water"]["at"], tiles["forest"]["at"]
    scene_at = tiles["water"]["scene"]
    assert water["x"] == pytest.approx(scene_at["x"], abs=2)
    assert forest["x"] == pytest.approx(scene_at["x"] + scene_at["w"] / 2, abs=2)
    assert water["w"] == pytest.approx(scene_at["w"] / 2, abs=2)


def test_scenes_past_the_samples_are_counted_not_dropped_silently(tmp_path) -> None:
    """The page draws the first `samples` scenes' grids and says how many more there are (it
    drew 4, and a fifth scene was missing with no word)."""
    tile = {"tile_size": 256, "scene_width": 256, "scene_height": 256, "tile_x": 0, "tile_y": 0}
    rows = [
        tile | {"source_uri": str(tmp_path / f"s{i}.tif"), "label": "water", "score": 0.9}
        for i in range(5)
    ]
    commit_rows(tmp_path / "table", "classification", rows, "tiles", tiles=True)
    page = dict(build_report(str(tmp_path / "table"), samples=3).panels)
    body = page["Scene tiles in place, by label"]
    assert body.count('<rect class="tile"') == 3
    assert "2 more scene(s) not drawn: the first 3 are (--samples)" in body
    body = dict(build_report(str(tmp_path / "table"), samples=8).panels)[
        "Scene tiles in place, by label"
    ]
    assert body.count('<rect class="tile"') == 5 and "more scene" not in body


def test_a_thumbnail_is_a_small_jpeg(classified_run) -> None:
    report = build_report(str(classified_run / "table"), samples=1)
    body = dict(report.panels)["Images under their labels"]
    uri = body.split('src="data:image/jpeg;base64,')[1].split('"')[0]
    image = Image.open(io.BytesIO(base64.b64decode(uri)))
    assert image.format == "JPEG" and max(image.size) == 160


@needs_chromium
def test_screenshot_for_the_readme(classified_run, tmp_path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(build_report(str(classified_run / "table"), samples=3)))
    shot = tmp_path / "gallery.png"
    screenshot(page, shot, (1000, 1400))
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1400, 1000) and len(np.unique(image.reshape(-1, 3), axis=0)) > 50


def test_a_store_that_fails_is_asked_once(tmp_path) -> None:
    sources = Sources({"s3": {"endpoint_url": "http://127.0.0.1:9"}})  # nothing listens there
    assert sources.data("s3://lost/a.png") is None
    assert sources._unreachable == {"s3://lost"}
    assert sources.data("s3://lost/b.png") is None and "s3://lost/b.png" in sources._read
    assert sources.data(str(tmp_path / "gone.png")) is None  # a local file: only itself
    assert sources.pixels({"source_uri": photo(tmp_path / "here.png", 4, 3, 7)}) is not None


def test_mask_r_cnn_masks_lie_under_their_boxes(tmp_path) -> None:
    from pycocotools import mask as coco_mask

    image = photo(tmp_path / "street.png", 200, 100, 90)
    binary = np.zeros((100, 200), np.uint8)
    binary[20:60, 50:150] = 1
    rle = coco_mask.encode(np.asfortranarray(binary))
    box = {"label_id": 1, "label": "car", "score": 0.9, "x_min": 50.0, "y_min": 20.0}
    box |= {
        "x_max": 150.0,
        "y_max": 60.0,
        "mask": {"size": [100, 200], "counts": rle["counts"].decode()},
    }
    rows = [{"source_uri": image, "image_width": 200, "image_height": 100, "detections": [box]}]
    commit_rows(tmp_path / "table", "detection", rows, "masks", instance="mask")
    body = dict(build_report(str(tmp_path / "table")).panels)["Detections drawn on their images"]
    layer = body.split('<image class="mask" href="data:image/png;base64,')[1].split('"')[0]
    alpha = np.asarray(Image.open(io.BytesIO(base64.b64decode(layer))))[:, :, 3]
    assert alpha.shape == (80, 160)  # the thumbnail's size, stretched over the image's pixels
    inside = np.zeros((80, 160), bool)
    inside[16:48, 40:120] = True
    assert (alpha[inside] > 0).all() and (alpha[~inside] == 0).all()


def test_a_scene_tile_is_read_from_its_window(tmp_path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    bands = np.zeros((4, 32, 64), np.uint16)
    bands[:, :, 32:] = 40_000  # the right tile bright, the left one dark
    bands[:, 8:24, 40:56] = 1_000  # with a dark square inside it
    profile = {"driver": "GTiff", "width": 64, "height": 32, "count": 4, "dtype": "uint16"}
    profile |= {"crs": "EPSG:32633", "transform": from_origin(500_000, 4_650_000, 10, 10)}
    with rasterio.open(tmp_path / "scene.tif", "w", **profile) as scene:
        scene.write(bands)
    row = {"source_uri": str(tmp_path / "scene.tif"), "tile_x": 32, "tile_y": 0, "tile_size": 32}
    with Sources({}) as sources:
        pixels = sources.pixels(row)
        assert pixels is not None and pixels.shape == (32, 32, 3)
        assert pixels[0, 0].tolist() == [255] * 3 and pixels[16, 16].tolist() == [0] * 3
        left = sources.pixels(row | {"tile_x": 0})  # all dark: stretched over nothing, black
        assert left is not None and left.max() == 0
        gone = row | {"source_uri": str(tmp_path / "gone.tif")}
        assert sources.pixels(gone) is None
        (tmp_path / "gone.tif").hardlink_to(tmp_path / "scene.tif")
        assert sources.pixels(gone | {"tile_x": 0}) is None  # not tried again for its next tile
        assert list(sources._scenes) == [row["source_uri"]]  # opened once for both tiles
        scene = sources._scenes[row["source_uri"]]
    assert scene.closed and not sources._scenes  # closed with the report


def test_a_scene_tiles_stretch_leaves_out_its_no_data(tmp_path) -> None:
    """Half the tile is the file's nodata (-9999), one pixel infinite: the stretch spans the
    data (100 on its left, 200 on its right), as the run's tiles do (`raster.no_data`)."""
    import rasterio

    from vision_ops.gallery import scene_tile

    values = np.full((1, 32, 32), -9999, np.float32)
    values[0, :, 16:] = np.linspace(100, 200, 16, dtype=np.float32)
    values[0, 0, 20] = np.inf
    profile = {"driver": "GTiff", "width": 32, "height": 32, "count": 1, "dtype": "float32"}
    with rasterio.open(tmp_path / "scene.tif", "w", nodata=-9999, **profile) as scene:
        scene.write(values)
    row = {"source_uri": str(tmp_path / "scene.tif"), "tile_x": 0, "tile_y": 0, "tile_size": 32}
    with rasterio.open(tmp_path / "scene.tif") as scene:
        pixels = scene_tile(scene, row, [1])
    assert pixels[5, 16].tolist() == [0] * 3 and pixels[5, 31].tolist() == [255] * 3
    assert 100 < pixels[5, 24, 0] < 155  # the middle of the data: grey, not near white
    assert pixels[5, :16].max() == 0  # no data: black


def test_a_scene_tile_shows_the_bands_the_run_read(tmp_path) -> None:
    """Bands 1-3 bright on the left, band 4 bright on the right: a run that read band 4 (its
    manifest's `tile_bands`) shows the tile bright on the right, in grey."""
    import rasterio

    values = np.full((4, 32, 32), 1_000, np.uint16)
    values[:3, :, :16] = 40_000
    values[3, :, 16:] = 40_000
    profile = {"driver": "GTiff", "width": 32, "height": 32, "count": 4, "dtype": "uint16"}
    with rasterio.open(tmp_path / "scene.tif", "w", **profile) as scene:
        scene.write(values)
    row = {"source_uri": str(tmp_path / "scene.tif"), "tile_x": 0, "tile_y": 0, "tile_size": 32}
    first_three = Sources({}).pixels(row)
    assert first_three is not None
    assert first_three[0, 0].tolist() == [255] * 3 and first_three[0, 31].tolist() == [0] * 3
    rows = [classified(row["source_uri"], ("water", 0.9)) | row]
    details = {"tile_bands": [4]}
    commit_rows(tmp_path / "table", "classification", rows, "nir", tiles=True, details=details)
    body = dict(build_report(str(tmp_path / "table")).panels)["Images under their labels"]
    uri = body.split('src="data:image/jpeg;base64,')[1].split('"')[0]
    thumbnail = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"))
    left, right = thumbnail[:, : thumbnail.shape[1] // 4], thumbnail[:, -thumbnail.shape[1] // 4 :]
    assert left.mean() < 30 and right.mean() > 225  # band 4, not bands 1-3


def test_a_long_error_message_is_cut_before_it_is_escaped() -> None:
    """Cut after escaping, `<` at the cut left half an entity (`&l`) in the page."""
    from vision_ops.gallery import error_rows

    message = "x" * 299 + "<script>alert(1)</script>"
    table = pa.table(
        {
            "source_uri": ["file:///photos/a.jpg"],
            "status": ["error"],
            "error_type": ["CorruptImage"],
            "error_message": [message],
        }
    )
    _, body = error_rows(table, Sources({}, 0)) or ("", "")
    cell = body.split("<td>")[3].split("</td>")[0]
    assert cell == "x" * 299 + "&lt;" and "<script" not in body


def stripes_scene(path: Path) -> str:
    """A 64 x 32 plain image: horizontal stripes on the left half, vertical on the right."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[::2, :32] = 255
    pixels[:, 33:64:2] = 255
    Image.fromarray(pixels).save(path)
    return str(path)


def test_a_tiles_boxes_and_mask_are_drawn_over_its_tile(tmp_path) -> None:
    """A tiled run's boxes and masks are in its scene's pixels: over the tile at x 32 they are
    drawn from its corner (a box at scene x 40..50 is at 8..18 of the tile), and the mask
    layer is the tile's window of the scene-sized mask, not the whole scene."""
    from pycocotools import mask as coco_mask

    scene = stripes_scene(tmp_path / "scene.png")
    binary = np.zeros((32, 64), np.uint8)
    binary[4:14, 40:50] = 1
    rle = coco_mask.encode(np.asfortranarray(binary))
    box = {"label_id": 1, "label": "ship", "score": 0.9, "x_min": 40.0, "y_min": 4.0}
    box |= {
        "x_max": 50.0,
        "y_max": 14.0,
        "mask": {"size": [32, 64], "counts": rle["counts"].decode()},
    }
    row = {"source_uri": scene, "tile_x": 32, "tile_y": 0, "tile_size": 32, "detections": [box]}
    commit_rows(tmp_path / "table", "detection", [row], "tiles", tiles=True, instance="mask")
    body = dict(build_report(str(tmp_path / "table")).panels)["Detections drawn on their images"]
    assert 'viewBox="0 0 32 32"' in body and '<g transform="translate(-32 0)">' in body
    assert '<rect class="box" x="40.0" y="4.0" width="10.0" height="10.0"' in body
    assert '<image class="mask" href="data:image/png;base64,' in body and 'x="32" y="0" ' in body
    layer = body.split('<image class="mask" href="data:image/png;base64,')[1].split('"')[0]
    alpha = np.asarray(Image.open(io.BytesIO(base64.b64decode(layer))))[:, :, 3]
    assert alpha.shape == (160, 160)  # the tile's 32 x 32, not the scene's 64 x 32
    inside = np.zeros((160, 160), bool)
    inside[20:70, 40:90] = True  # tile pixels 4..14 x 8..18, at 5 thumbnail px a pixel
    assert (alpha[inside] > 0).all() and (alpha[~inside] == 0).all()


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_tiles_mask_is_drawn_over_its_tile(tmp_path, suffix: str) -> None:
    """Over the tile at x 32 (vertical stripes), not the middle of the whole image; a scene's
    tile has a GeoTIFF mask (encode_mask's), a plain image's a PNG."""
    from rasterio.transform import from_origin

    from vision_ops.gallery import OVERLAY_ALPHA, mask_overlays, palette
    from vision_ops.masks import encode_mask

    scene = stripes_scene(tmp_path / "scene.png")
    georef = (from_origin(500_000, 4_650_000, 10, 10), "EPSG:32633") if suffix == ".tif" else None
    data, written = encode_mask(np.ones((32, 32), np.uint8), georef)
    mask = tmp_path / f"mask{written}"
    mask.write_bytes(data)
    assert written == suffix
    row = {"status": "ok", "source_uri": scene, "mask_uri": str(mask)}
    table = pa.Table.from_pylist([row | {"tile_x": 32, "tile_y": 0, "tile_size": 32}])
    with Sources({}) as sources:
        [_, body] = mask_overlays(table, sources)
    assert body.count("<figure") == 1 and "scene.png @32,0" in body
    picture = body.split('src="data:image/png;base64,')[1].split('"')[0]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(picture)))).astype(float)
    tile = np.zeros((32, 32), float)
    tile[:, 1::2] = 255  # columns 33, 35 ... of the scene
    expected = (1 - OVERLAY_ALPHA) * tile[:, :, None] + OVERLAY_ALPHA * palette(2)[1]
    np.testing.assert_allclose(shown, expected, atol=1)


def test_the_mask_panel_tries_a_few_units_where_their_store_is_lost(tmp_path, monkeypatch) -> None:
    """500 segmentation rows whose sources are gone: the panel asks the store for a few units'
    images, not for every row's image and mask (a lost bucket took seconds a row)."""
    import vision_ops.gallery as gallery

    asked: list[str] = []
    real = gallery.read_bytes

    def counted(uri: str, options: object) -> bytes:
        asked.append(uri)
        return real(uri, options)

    monkeypatch.setattr(gallery, "read_bytes", counted)
    rows = [
        {"status": "ok", "source_uri": f"s3://lost/{i}.png", "mask_uri": f"s3://out/m/{i}.png"}
        for i in range(500)
    ]
    with Sources({"s3": {"endpoint_url": "http://127.0.0.1:9"}}) as sources:  # nothing there
        [_, body] = gallery.mask_overlays(pa.Table.from_pylist(rows), sources)
    assert body == "<p>no mask to draw</p>" and asked == ["s3://lost/0.png"]


def test_an_ocr_report_shows_its_pages_with_their_lines_drawn(tmp_path) -> None:
    """An OCR run's report shows pages, the surest read first, each line's quadrilateral drawn
    over it with the text read (its report showed no image at all)."""
    pages = []
    for index, score in enumerate((0.97, 0.55, 0.80, 0.90, 0.60)):
        corners = [(10, 5), (90, 5), (90, 25), (10, 25)]
        line = {"text": f"line {index}", "score": score}
        line |= {"polygon": [{"x": float(x), "y": float(y)} for x, y in corners]}
        image = photo(tmp_path / f"page{index}.png", 100, 40, 200)
        pages.append(
            {"source_uri": image, "image_width": 100, "image_height": 40, "lines": [line]}
            | {"text": line["text"]}
        )
    commit_rows(tmp_path / "table", "ocr", pages, "pages")
    body = dict(build_report(str(tmp_path / "table"), samples=3).panels)[
        "Text read, lines drawn (most sure, then least sure)"
    ]
    shown = [part.split('"')[0].rsplit("/", 1)[1] for part in body.split('data-source="')[1:]]
    assert shown == ["page0.png", "page3.png", "page1.png"]  # 0.97, 0.90, then the least sure
    assert body.count('<polygon class="line" points="10.0,5.0 90.0,5.0 90.0,25.0 10.0,25.0"') == 3
    assert "1 lines, mean score 0.550: line 1" in body


def test_an_embedding_report_shows_the_closest_pairs_and_the_loners(tmp_path, monkeypatch) -> None:
    """An embedding run's report shows its most similar pairs side by side (near-duplicates)
    and the units least like any other (it showed no image at all), from the similarities its
    summary computed (they were computed again for the panel)."""
    from vision_ops import embedding
    from vision_ops.embedding import sized_fields

    computed: list[int] = []  # the units of each matrix computed
    compute = embedding.cosine_similarities

    def counted(vectors: pa.ChunkedArray) -> np.ndarray:
        computed.append(len(vectors))
        return compute(vectors)

    monkeypatch.setattr(embedding, "cosine_similarities", counted)
    directions = {"a": [1.0, 0.0, 0.0], "a-copy": [0.99, 0.14, 0.0], "b": [0.6, 0.8, 0.0]}
    directions["odd"] = [0.0, 0.0, 1.0]
    rows = []
    for name, vector in directions.items():
        unit = np.asarray(vector) / np.linalg.norm(vector)
        image = photo(tmp_path / f"{name}.png", 40, 40, 100)
        rows.append({"source_uri": image, "embedding": unit.tolist(), "model_name": "m"})
    commit_rows(tmp_path / "table", "embedding", rows, "vectors", fields=sized_fields(3))
    panels = dict(build_report(str(tmp_path / "table"), samples=2).panels)
    body = panels["Closest pairs (near-duplicates where the cosine is near 1), then loners"]
    titles = [part.split('"')[0] for part in body.split('data-title="')[1:]]
    assert titles == ["a.png ~ a-copy.png", "a-copy.png ~ b.png", "least like any other unit"]
    assert "cosine 0.9901" in body
    loners = body.split('data-title="least like any other unit"')[1]
    shown = [part.split('"')[0].rsplit("/", 1)[1] for part in loners.split('data-source="')[1:]]
    assert shown[0] == "odd.png" and "nearest cosine 0.0000" in loners
    assert computed == [4]  # once, for the summary and the panel
