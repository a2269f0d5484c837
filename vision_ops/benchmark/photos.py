"""Benchmark photographs: seeded crops of photos scikit-image and scikit-learn ship, as JPEGs."""

from __future__ import annotations

import functools
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs shipped inside the packages (no download): (package, file name).
SOURCES = (
    ("skimage", "astronaut.png"),
    ("skimage", "chelsea.png"),
    ("skimage", "coffee.png"),
    ("skimage", "rocket.jpg"),
    ("skimage", "motorcycle_left.png"),
    ("skimage", "hubble_deep_field.jpg"),
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
)
PHOTO_SIZE = (500, 375)  # width, height: a 4:3 camera photo
JPEG_QUALITY = 90
# A crop covers this share (by side) of the largest 4:3 window that fits the source photo.
CROP_SCALE = (0.45, 1.0)
PARALLEL_FROM = 64  # write this many missing photos or more in a process pool


def source_folder(package: str) -> Path:
    if package == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent
    if package == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images"
    raise ValueError(f"photo source: expected skimage or sklearn, found {package!r}")


@functools.cache
def source_photos() -> tuple[Image.Image, ...]:
    """The shipped photographs, decoded to RGB once per process."""
    photos = []
    for package, name in SOURCES:
        with Image.open(source_folder(package) / name) as image:
            photos.append(image.convert("RGB"))
    return tuple(photos)


def make_photo(index: int, seed: int) -> Image.Image:
    """Photo `index`: a random 4:3 crop of a random source, maybe mirrored, at PHOTO_SIZE.
    The same (index, seed) gives the same pixels whatever else is generated."""
    rng = np.random.default_rng([seed, index])
    source = source_photos()[int(rng.integers(len(SOURCES)))]
    width, height = source.size
    full_w = min(width, height * 4 / 3)
    crop_w = full_w * rng.uniform(*CROP_SCALE)
    crop_h = crop_w * 3 / 4
    left = rng.uniform(0, width - crop_w)
    top = rng.uniform(0, height - crop_h)
    box = (left, top, left + crop_w, top + crop_h)
    photo = source.resize(PHOTO_SIZE, Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return photo


def photo_name(index: int) -> str:
    return f"photo-{index:06d}.jpg"


def write_photo(folder: Path, index: int, seed: int) -> Path:
    """Write photo `index` as a quality-90 JPEG (atomically: a partial file is never left)."""
    path = folder / photo_name(index)
    partial = path.with_suffix(f".{os.getpid()}.part")
    make_photo(index, seed).save(partial, format="JPEG", quality=JPEG_QUALITY)
    partial.replace(path)
    return path


def ensure_photos(folder: Path, count: int, seed: int) -> list[Path]:
    """Photos 0..count-1 in `folder`, generating only the missing ones."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / photo_name(i)).exists()]
    if len(missing) >= PARALLEL_FROM:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            list(pool.map(functools.partial(write_photo, folder, seed=seed), missing))
    else:
        for index in missing:
            write_photo(folder, index, seed)
    return [folder / photo_name(i) for i in range(count)]


def photo_set(workdir: Path, count: int, seed: int) -> Path:
    """A folder holding exactly photos 0..count-1 (hard links into the cached pool), so a
    directory listing, a glob or `read_images` on it sees the same `count` files."""
    pool = ensure_photos(workdir / "photos" / f"seed{seed}", count, seed)
    folder = workdir / "sets" / f"seed{seed}-n{count}"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in pool:
        _link_or_copy(path, folder / path.name)
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
