"""OCR: PP-OCR text detection (DB) and recognition (CTC) run batched on onnxruntime, in numpy."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image

from vision_ops.schema import STATUS_OK, _table, _unit_columns, declared_schema, with_stage_times

if TYPE_CHECKING:
    from vision_ops.tasks import OcrTask  # the task registry imports this module

OCR_PACKAGE = "rapidocr_onnxruntime"  # ships the default PP-OCRv4 pair (the ocr extra)
# The PP-OCRv4 models (Apache-2.0) the `rapidocr_onnxruntime` package ships, by role.
PACKAGED_MODELS = {
    "detector": "ch_PP-OCRv4_det_infer.onnx",
    "recognizer": "ch_PP-OCRv4_rec_infer.onnx",
}
DICT_METADATA_KEY = "character"  # the recognizer's own character list, in its ONNX metadata
REC_HEIGHT = 48  # the recognizer's input height
REC_MIN_WIDTH = 320  # ... and its narrowest input (PP-OCR's 3 x 48 x 320)
DET_MULTIPLE = 32  # the detector's input sides are multiples of this
# ... and at least this: in an input 32 px high (one cell of its coarsest map) a line fills the
# whole height and is read in pieces; in 64 with the rest padded it is read whole
DET_MIN_SIDE = 64
MIN_BOX_SIDE = 3  # a detected box's shorter side must exceed this (detector pixels)
ARC_TOLERANCE = 0.25  # Clipper's (unclip's): how far an offset's arc may stray from a circle
CUBIC_A = -0.75  # OpenCV's bicubic kernel (Keys' a), that PP-OCR cuts its lines with
ROTATE_RATIO = 1.5  # a line cut this much taller than wide is vertical text: turned a quarter
MAX_CANDIDATES = 1000  # text regions considered per image
DET_BATCH_PIXELS = 16_000_000  # detector input pixels per call (images of one size together)

# Columns the predictor adds, one value per row: the lines' text (object array of str), and a
# float32 (lines, 9) array of each line's score then its polygon x0, y0, ..., x3, y3.
LINE_TEXTS, LINE_BOXES = "ocr_line_texts", "ocr_line_boxes"

POINT = pa.struct([pa.field("x", pa.float32(), nullable=False), pa.field("y", pa.float32(), False)])
LINE_ENTRY = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("polygon", pa.list_(pa.field("item", POINT, nullable=False)), nullable=False),
    ]
)
# The OCR table's task columns: every line's text joined in reading order (a space between
# lines of one row of text, a newline between rows), and the lines with their polygons in
# source pixels (top-left, top-right, bottom-right, bottom-left).
OCR_FIELDS = [
    pa.field("text", pa.string()),
    pa.field("lines", pa.list_(pa.field("item", LINE_ENTRY, nullable=False))),
]

OCR_SCHEMA = declared_schema("ocr", OCR_FIELDS)


class OcrError(ValueError):
    """OCR model files that cannot be used; says what was expected."""


class Line(NamedTuple):
    """One recognised text line: its text, mean character score and polygon (4, 2), source px."""

    text: str
    score: float
    polygon: np.ndarray


# --- model files -----------------------------------------------------------------------------


def packaged_model(role: str) -> Path:
    """The PP-OCRv4 ONNX file the `rapidocr_onnxruntime` package ships for `role` (found, not
    imported: the package's own code, and OpenCV, stay out of the actors)."""
    package = importlib.util.find_spec(OCR_PACKAGE)
    if package is None or package.origin is None:
        raise OcrError("OCR's default models need: pip install 'vision-ops[ocr]'")
    path = Path(package.origin).parent / "models" / PACKAGED_MODELS[role]
    if not path.exists():
        raise OcrError(f"the rapidocr_onnxruntime package has no {path.name} (expected 1.4.x)")
    return path


def characters(session: Any, dictionary: str | None = None) -> list[str]:
    """The recogniser's classes: CTC blank, the dictionary (a text file's lines, else the
    model's own metadata list), then space."""
    if dictionary is None:
        metadata = session.get_modelmeta().custom_metadata_map
        if DICT_METADATA_KEY not in metadata:
            raise OcrError(
                "the recognizer carries no character list in its metadata; expected a "
                "dictionary file (one character a line)"
            )
        dictionary = metadata[DICT_METADATA_KEY]
    chars = dictionary.splitlines()
    return ["", *chars, " "]


# --- geometry --------------------------------------------------------------------------------


def detector_size(height: int, width: int, settings: OcrTask) -> tuple[int, int]:
    """The size the detector sees an image at: its short side scaled to det_limit_side, its
    long side down to det_max_side where the short side stays at det_limit_side or more (the
    short side's limit first, as PP-OCR's: an 800 x 200 line is seen at 2944 x 736 as RapidOCR
    sees it; at 1984 x 512 its box came out a pixel or two off and "HELLO WORLD 2026" read
    "HELLOWORLD2026"), all within det_max_side
    squared pixels, padding included: an elongated image (a long line, a receipt) is scaled to
    fill those, not squashed to fit its long side (a 6000 x 120 line seen 32 px high lost most
    of its words). Sides are rounded to multiples of 32 (as PP-OCR's); one that would round
    under DET_MIN_SIDE keeps its size, and detector_input pads it."""
    budget = settings.det_max_side**2  # pixels: a det_max_side square, as large images get
    fit_long = min(1.0, settings.det_max_side / max(height, width))
    reach_short = min(
        settings.det_limit_side / min(height, width),
        math.sqrt(budget / (height * width)),
        budget / (DET_MIN_SIDE * max(height, width)),  # a short side padded to DET_MIN_SIDE
    )
    ratio = max(fit_long, reach_short)
    return _detector_side(height * ratio), _detector_side(width * ratio)


def _detector_side(scaled: float) -> int:
    """A scaled side rounded to a multiple of 32 as PP-OCR rounds it, unless that is under
    DET_MIN_SIDE: squashed so, a line is lost (the side is padded instead)."""
    rounded = round(int(scaled) / DET_MULTIPLE) * DET_MULTIPLE
    return rounded if rounded >= DET_MIN_SIDE else max(1, int(scaled))


def detector_canvas(size: tuple[int, int]) -> tuple[int, int]:
    """The detector's input for an image resized to `size`: each side a multiple of 32 and at
    least DET_MIN_SIDE (the image at its top left, padded)."""
    height, width = (
        max(DET_MIN_SIDE, math.ceil(side / DET_MULTIPLE) * DET_MULTIPLE) for side in size
    )
    return height, width


def homography(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 3 x 3 projective map taking four `source` points (4, 2) to `target` points."""
    rows = []
    for (x, y), (u, v) in zip(source.astype(np.float64), target.astype(np.float64), strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    solution = np.linalg.solve(np.array(rows), target.astype(np.float64).reshape(-1))
    return np.append(solution, 1.0).reshape(3, 3)


def sample(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear samples of uint8 (H, W, C) at float pixel positions (any shape), edges
    replicated -> float32 (..., C)."""
    height, width = image.shape[:2]
    xs = np.clip(xs, 0, width - 1)
    ys = np.clip(ys, 0, height - 1)
    x0 = np.minimum(np.floor(xs).astype(np.int64), width - 2 if width > 1 else 0)
    y0 = np.minimum(np.floor(ys).astype(np.int64), height - 2 if height > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) resampled bilinearly to (height, width) (PIL; antialiased when
    shrinking) -> float32."""
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def sample_cubic(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bicubic samples of uint8 (H, W, C) at float pixel positions (any shape), edges
    replicated -> float32 (..., C): OpenCV's INTER_CUBIC, the sixteen pixels around each
    position weighted by Keys' kernel (a = -0.75)."""
    height, width = image.shape[:2]
    x0, y0 = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    weights_x, weights_y = _cubic_weights(xs - x0), _cubic_weights(ys - y0)
    total = np.zeros((*np.shape(xs), image.shape[2]), dtype=np.float64)
    for i, weight_y in enumerate(weights_y):
        rows = np.clip(y0 + i - 1, 0, height - 1)
        for j, weight_x in enumerate(weights_x):
            columns = np.clip(x0 + j - 1, 0, width - 1)
            total += (weight_y * weight_x)[..., None] * image[rows, columns]
    return total.astype(np.float32)


def _cubic_weights(offset: np.ndarray) -> np.ndarray:
    """The weights (4, ...) of the pixels at -1, 0, 1 and 2 from a position `offset` (0..1)
    past pixel 0."""
    distance = np.stack([1 + offset, offset, 1 - offset, 2 - offset])
    near = ((CUBIC_A + 2) * distance - (CUBIC_A + 3)) * distance**2 + 1
    far = ((CUBIC_A * distance - 5 * CUBIC_A) * distance + 8 * CUBIC_A) * distance - 4 * CUBIC_A
    return np.where(distance <= 1, near, far)


def line_cut(image: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """The text line inside `quad` (tl, tr, br, bl) cut out straight at its own size -> uint8
    (h, w, C); a cut much taller than wide is vertical text, turned a quarter
    counter-clockwise. As PP-OCR cuts a line (OpenCV's bicubic warp; recognizer_batch then
    resizes it within the cut): the recogniser reads a space from a few faint columns, and a
    line sampled straight to 48 rows blended the pixels past the box into its first and
    last rows (as a box a pixel taller would): about one line in ten read otherwise than
    RapidOCR reads it, a space lost or a stray character."""
    straight = straighten(image, quad)
    if straight.shape[0] >= ROTATE_RATIO * straight.shape[1]:
        straight = np.rot90(straight)
    return straight


def straighten(image: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """The quadrilateral `quad` (tl, tr, br, bl) of uint8 (H, W, C) mapped onto an upright
    rectangle as long as its longer sides (whole pixels): bicubic samples at the rectangle's
    pixels, edges replicated (OpenCV's warpPerspective) -> uint8 (h, w, C)."""
    quad = quad.astype(np.float64)
    width = max(1, int(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3]))))
    height = max(1, int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2]))))
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height))
    points = homography(corners, quad) @ np.stack(
        [grid_x.ravel(), grid_y.ravel(), np.ones(grid_x.size)]
    )
    source_x = (points[0] / points[2]).reshape(height, width)
    source_y = (points[1] / points[2]).reshape(height, width)
    return _as_uint8(sample_cubic(image, source_x, source_y))


def stretch(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, C) resized to (height, width) bilinearly, not antialiased, every sample
    within the image (OpenCV's INTER_LINEAR) -> uint8."""
    rows, columns = image.shape[:2]
    xs = (np.arange(width) + 0.5) * columns / width - 0.5
    ys = (np.arange(height) + 0.5) * rows / height - 0.5
    grid_x, grid_y = np.meshgrid(xs, ys)
    return _as_uint8(sample(image, grid_x, grid_y))


def _as_uint8(values: np.ndarray) -> np.ndarray:
    """Samples as OpenCV stores them: rounded, saturated to 0..255."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def convex_hull(points: np.ndarray) -> np.ndarray:
    """The convex hull (counter-clockwise, Andrew's monotone chain) of (N, 2) points."""
    unique = np.unique(points.astype(np.float64), axis=0)
    if len(unique) < 3:
        return unique

    def half(ordered: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for point in ordered:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], point) <= 0:
                chain.pop()
            chain.append(point)
        return chain

    lower, upper = half(unique), half(unique[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def min_area_rect(points: np.ndarray) -> tuple[np.ndarray, float]:
    """The smallest rectangle around (N, 2) points, as its corners (4, 2) tl, tr, br, bl in
    image coordinates, and its shorter side (0 for collinear points)."""
    hull = convex_hull(points)
    if len(hull) < 3:
        low, high = hull.min(axis=0), hull.max(axis=0)
        return order_box(np.array([low, [high[0], low[1]], high, [low[0], high[1]]])), 0.0
    edges = np.roll(hull, -1, axis=0) - hull
    lengths = np.linalg.norm(edges, axis=1)
    keep = lengths > 0
    along = edges[keep] / lengths[keep, None]
    across = np.stack([-along[:, 1], along[:, 0]], axis=1)
    u, v = hull @ along.T, hull @ across.T  # (points, edges) projections
    spans_u, spans_v = u.max(axis=0) - u.min(axis=0), v.max(axis=0) - v.min(axis=0)
    best = int(np.argmin(spans_u * spans_v))
    a, b = along[best], across[best]
    u0, u1, v0, v1 = u[:, best].min(), u[:, best].max(), v[:, best].min(), v[:, best].max()
    corners = np.array([u0 * a + v0 * b, u1 * a + v0 * b, u1 * a + v1 * b, u0 * a + v1 * b])
    return order_box(corners), float(min(spans_u[best], spans_v[best]))


def order_box(corners: np.ndarray) -> np.ndarray:
    """Four corners as top-left, top-right, bottom-right, bottom-left: the two leftmost are the
    left side (the upper one first), the two rightmost the right side."""
    by_x = corners[np.argsort(corners[:, 0], kind="stable")]
    left = by_x[:2][np.argsort(by_x[:2, 1], kind="stable")]
    right = by_x[2:][np.argsort(by_x[2:, 1], kind="stable")]
    return np.array([left[0], right[0], right[1], left[1]], dtype=np.float64)


def unclip(box: np.ndarray, distance: float) -> np.ndarray:
    """DB's unclip of a rectangle (tl, tr, br, bl), as PP-OCR runs it with pyclipper (Clipper's
    round-join offset): the corners truncated to whole pixels, moved out by `distance` with an
    arc of points around each corner, every point rounded to a whole pixel -> the offset
    polygon's points (N, 2). Its smallest rectangle is a line's box: a rectangle grown by
    `distance` exactly sat up to a pixel from RapidOCR's, and a line's box a pixel off can
    read otherwise (a space lost)."""
    path = _clipper_path(box)
    if len(path) < 3:
        return path
    if abs(distance) < ARC_TOLERANCE:  # Clipper leaves a polygon this close as it is
        return path
    edges = np.roll(path, -1, axis=0) - path
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)
    normals /= np.linalg.norm(edges, axis=1)[:, None]
    points: list[np.ndarray] = []
    previous = len(path) - 1
    for index, corner in enumerate(path):
        points += _offset_corner(corner, normals[previous], normals[index], distance)
        # Clipper keeps the previous edge's normal across a corner too flat to turn
        if not _too_flat(normals[previous], normals[index], distance):
            previous = index
    return _clipper_round(np.array(points))


def _clipper_path(box: np.ndarray) -> np.ndarray:
    """A polygon as Clipper takes it: whole pixels (truncated towards zero), repeated points
    dropped, counter-clockwise in image coordinates (a positive shoelace area), so that each
    edge's (dy, -dx) normal points out."""
    path = np.trunc(np.asarray(box, dtype=np.float64))
    path = path[np.any(path != np.roll(path, 1, axis=0), axis=1)]
    x, y = path[:, 0], path[:, 1]
    if float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)) < 0:
        path = path[::-1]
    return path


def _too_flat(before: np.ndarray, after: np.ndarray, distance: float) -> bool:
    """Whether Clipper passes a corner with one point (it turns by less than a pixel at this
    distance, forwards)."""
    sin = before[0] * after[1] - after[0] * before[1]
    return abs(sin * distance) < 1.0 and float(before @ after) > 0


def _offset_corner(
    corner: np.ndarray, before: np.ndarray, after: np.ndarray, distance: float
) -> list[np.ndarray]:
    """The offset polygon's points at one corner between edges of unit normals `before` and
    `after` (Clipper's OffsetPoint and DoRound, for a round join)."""
    if _too_flat(before, after, distance):
        return [corner + before * distance]
    sin = float(np.clip(before[0] * after[1] - after[0] * before[1], -1.0, 1.0))
    if sin * distance < 0:  # a concave corner
        return [corner + before * distance, corner, corner + after * distance]
    size = abs(distance)
    tolerance = min(ARC_TOLERANCE, size * ARC_TOLERANCE)
    steps = min(math.pi / math.acos(1 - tolerance / size), size * math.pi)
    step = 2 * math.pi / steps
    angle = abs(math.atan2(sin, before @ after))
    turns = int(_clipper_round(np.array(steps / (2 * math.pi) * angle)))
    rotation = np.array([[math.cos(step), -math.sin(step)], [math.sin(step), math.cos(step)]])
    points, normal = [], before
    for _ in range(max(turns, 1)):
        points.append(corner + normal * distance)
        normal = rotation @ normal
    return [*points, corner + after * distance]


def _clipper_round(values: np.ndarray) -> np.ndarray:
    """Clipper's rounding to whole pixels: halves away from zero."""
    return np.where(values < 0, np.trunc(values - 0.5), np.trunc(values + 0.5))


def box_score(prob: np.ndarray, box: np.ndarray) -> float:
    """The mean probability of the detector pixels inside a convex box (DB's fast score)."""
    height, width = prob.shape
    corners = np.trunc(box)
    x0, y0 = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, [width - 1, height - 1])
    x1, y1 = np.clip(np.ceil(corners.max(axis=0)).astype(int), 0, [width - 1, height - 1])
    grid_y, grid_x = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    inside = inside_convex(corners, grid_x, grid_y)
    return float(prob[y0 : y1 + 1, x0 : x1 + 1][inside].mean()) if inside.any() else 0.0


def inside_convex(polygon: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pixels whose centres lie in a convex polygon or within half a pixel of its edges."""
    starts, ends = polygon, np.roll(polygon, -1, axis=0)
    sides = []
    for (ax, ay), (bx, by) in zip(starts, ends, strict=True):
        length = math.hypot(bx - ax, by - ay)
        if length == 0:
            continue
        sides.append(((bx - ax) * (ys - ay) - (by - ay) * (xs - ax)) / length)
    if not sides:
        return np.zeros(xs.shape, dtype=bool)
    stacked = np.stack(sides)
    return bool_all(stacked >= -0.5) | bool_all(stacked <= 0.5)


def bool_all(values: np.ndarray) -> np.ndarray:
    return np.asarray(values.all(axis=0), dtype=bool)


# --- detection -------------------------------------------------------------------------------


def detector_input(images: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB (H, W, 3) images -> the detector's float32 (N, 3, h, w) batch: resized to
    `size`, BGR (PP-OCR was trained on OpenCV's channel order), scaled to -1..1, and padded on
    the bottom and right to `detector_canvas(size)`, black as RapidOCR's letterbox pads."""
    batch = np.stack([resize(image, *size)[..., ::-1] for image in images])
    height, width = detector_canvas(size)
    canvas = np.full((len(images), 3, height, width), -1.0, dtype=np.float32)
    canvas[:, :, : size[0], : size[1]] = ((batch / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)
    return canvas


def text_boxes(
    prob: np.ndarray, source_size: tuple[int, int], settings: OcrTask
) -> list[tuple[np.ndarray, float]]:
    """A DB probability map (h, w) -> text boxes (4, 2) tl, tr, br, bl in source pixels (within
    the image) and their scores: text pixels (threshold, 2 x 2 dilation) in 8-connected
    regions, each region's smallest rectangle scored, grown (unclip) and scaled back."""
    from scipy import ndimage

    mask = prob > settings.det_threshold
    dilated = mask.copy()
    dilated[1:] |= mask[:-1]
    dilated[:, 1:] |= mask[:, :-1]
    dilated[1:, 1:] |= mask[:-1, :-1]
    labels, _ = ndimage.label(dilated, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for index, region in enumerate(ndimage.find_objects(labels)[:MAX_CANDIDATES]):
        if region is None:
            continue
        found = region_box(prob, labels, index + 1, region, source_size, settings)
        if found is not None:
            boxes.append(found)
    return boxes


def region_box(
    prob: np.ndarray,
    labels: np.ndarray,
    label: int,
    region: tuple[slice, slice],
    source_size: tuple[int, int],
    settings: OcrTask,
) -> tuple[np.ndarray, float] | None:
    """One text region's box in source pixels and its score, or None when too small or faint."""
    ys, xs = np.nonzero(labels[region] == label)
    ys, xs = ys + region[0].start, xs + region[1].start
    box, short = min_area_rect(_row_extremes(xs, ys))
    if short < MIN_BOX_SIDE:
        return None
    score = box_score(prob, box)
    if score < settings.box_threshold:
        return None
    box_w = float(np.linalg.norm(box[1] - box[0]))
    box_h = float(np.linalg.norm(box[3] - box[0]))
    distance = box_w * box_h * settings.unclip_ratio / max(2 * (box_w + box_h), 1e-9)
    grown, short = min_area_rect(unclip(box, distance))
    if short < MIN_BOX_SIDE + 2:
        return None
    height, width = source_size
    # as PP-OCR scales: map pixels / map size x image size, rounded, within the image
    scaled = np.round(grown / prob.shape[::-1] * [width, height])
    scaled = np.clip(scaled, 0, [width, height])
    final = np.clip(np.trunc(order_box(scaled)), 0, [width - 1, height - 1])
    if degenerate(final):  # clipped onto a corner or a line: its upright box, inside the image
        (left, top), (right, bottom) = final.min(axis=0), final.max(axis=0)
        final = np.array([[left, top], [right, top], [right, bottom], [left, bottom]])
    sides = (np.linalg.norm(final[0] - final[1]), np.linalg.norm(final[0] - final[3]))
    if int(sides[0]) <= MIN_BOX_SIDE or int(sides[1]) <= MIN_BOX_SIDE:
        return None
    return final.astype(np.float32), score


def degenerate(quad: np.ndarray) -> bool:
    """Whether a quadrilateral has a repeated corner or three corners on a line: no
    homography maps a rectangle onto it (the line's crop would be a singular solve)."""
    edges = np.roll(quad, -1, axis=0) - quad
    turns = (
        edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1]
        - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    )
    return bool((np.abs(turns) < 1e-9).any())


def _row_extremes(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Each pixel row's leftmost and rightmost pixel: the region's hull, from fewer points."""
    order = np.lexsort((xs, ys))
    xs_sorted, ys_sorted = xs[order], ys[order]
    rows, first = np.unique(ys_sorted, return_index=True)
    last = np.append(first[1:], len(ys_sorted)) - 1
    left = np.stack([xs_sorted[first], rows], axis=1)
    right = np.stack([xs_sorted[last], rows], axis=1)
    return np.concatenate([left, right]).astype(np.float64)


# --- recognition -----------------------------------------------------------------------------


def recognizer_batch(cuts: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 RGB (h, w, 3) line cuts -> the recogniser's (N, 3, 48, W) batch, as PP-OCR makes
    it: W is 48 x the widest cut's aspect ratio (truncated; at least 320), each cut resized to
    48 rows at its own aspect ratio (rounded up, at most W), BGR, scaled to -1..1 and padded
    with zeros on the right (a pixel's more width, or pad, reads a line otherwise)."""
    width = max(REC_MIN_WIDTH, *(int(REC_HEIGHT * aspect(cut)) for cut in cuts))
    batch = np.zeros((len(cuts), 3, REC_HEIGHT, width), dtype=np.float32)
    for index, cut in enumerate(cuts):
        line = stretch(cut, REC_HEIGHT, min(width, math.ceil(REC_HEIGHT * aspect(cut))))
        pixels = (line[..., ::-1] / 255.0 - 0.5) / 0.5
        batch[index, :, :, : line.shape[1]] = pixels.transpose(2, 0, 1)
    return batch


def aspect(cut: np.ndarray) -> float:
    """A line cut's width / height."""
    return cut.shape[1] / cut.shape[0]


def ctc_decode(probs: np.ndarray, chars: Sequence[str]) -> list[tuple[str, float]]:
    """Greedy CTC: each row's (T, classes) softmax -> its text (repeats merged, blanks
    dropped) and the mean score of the characters kept (0 for no text)."""
    best, scores = probs.argmax(axis=2), probs.max(axis=2)
    keep = best != 0
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    decoded = []
    for ids, score, kept in zip(best, scores, keep, strict=True):
        text = "".join(chars[i] for i in ids[kept].tolist())
        decoded.append((text, float(score[kept].mean()) if kept.any() else 0.0))
    return decoded


# --- reading order ---------------------------------------------------------------------------


def reading_order(polygons: Sequence[np.ndarray]) -> list[list[int]]:
    """Line indices in reading order, grouped into rows: top to bottom, a line joining the row
    it overlaps vertically by at least half the lower of the two heights and lies beside (no
    line of the row spans half of its width or more: on a skewed page each line's upright
    box reaches into the next line's, which lies below it, not beside), each row left to
    right."""
    tops = [float(p[:, 1].min()) for p in polygons]
    bottoms = [float(p[:, 1].max()) for p in polygons]
    lefts = [float(p[:, 0].min()) for p in polygons]
    rights = [float(p[:, 0].max()) for p in polygons]

    def beside(a: int, b: int) -> bool:
        overlap = min(rights[a], rights[b]) - max(lefts[a], lefts[b])
        return overlap < 0.5 * min(rights[a] - lefts[a], rights[b] - lefts[b])

    rows: list[list[int]] = []
    spans: list[tuple[float, float]] = []
    # ties broken by place, not by position in the list: the same rows from any order of the
    # lines (the table's rows are grouped again from the reader's order)
    by_height = sorted(
        range(len(polygons)), key=lambda i: (tops[i] + bottoms[i], lefts[i], tops[i], i)
    )
    for index in by_height:
        top, bottom = tops[index], bottoms[index]
        for row, (row_top, row_bottom) in zip(rows, spans, strict=True):
            overlap = min(bottom, row_bottom) - max(top, row_top)
            if overlap >= 0.5 * min(bottom - top, row_bottom - row_top) and all(
                beside(index, other) for other in row
            ):
                row.append(index)
                break
        else:
            rows.append([index])
            spans.append((top, bottom))
    return [sorted(row, key=lambda i: (lefts[i], tops[i], i)) for row in rows]


def joined_text(texts: Sequence[str], rows: Sequence[Sequence[int]]) -> str:
    """The lines' text in reading order: a space within a row, a newline between rows."""
    return "\n".join(" ".join(texts[i] for i in row) for row in rows)


# --- the model pair --------------------------------------------------------------------------


class TextReader:
    """A PP-OCR detector and recogniser (onnxruntime sessions) reading batches of images: the
    detector runs on same-size groups of the batch's images, the recogniser on each image's
    line cuts (in chunks of similar aspect ratios, padded to the widest)."""

    def __init__(
        self,
        detector: Any,
        recognizer: Any,
        chars: Sequence[str],
        settings: OcrTask,
    ) -> None:
        self.detector = detector
        self.recognizer = recognizer
        self.chars = list(chars)
        self.settings = settings
        classes = recognizer.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(self.chars):
            raise OcrError(
                f"the recognizer has {classes} classes; the dictionary gives {len(self.chars)} "
                f"(blank + {len(self.chars) - 2} characters + space): expected the same"
            )

    def read(self, images: Sequence[np.ndarray]) -> list[list[Line]]:
        """uint8 RGB (H, W, 3) images -> each image's lines, in reading order."""
        return self.read_checked(images)[0]

    def read_checked(self, images: Sequence[np.ndarray]) -> tuple[list[list[Line]], list[bool]]:
        """`read`, and per image whether the models' outputs for it were all finite (NaN
        probabilities fail the thresholds: no boxes, or lines dropped, not an error). Each
        image's lines are recognised in calls of their own: a line is padded to its call's
        widest, and a wider pad reads a line otherwise, so an image's text never depends on
        which images share its batch (a rerun, or a resumed run, batches it otherwise)."""
        lines: list[list[Line]] = []
        finite: list[bool] = []
        for image, (boxes, detected) in zip(images, self.detect_checked(images), strict=True):
            quads = [quad for quad, _ in boxes]
            recognised, read = self.recognize_checked([line_cut(image, quad) for quad in quads])
            kept = [
                Line(text, score, quad)
                for quad, (text, score) in zip(quads, recognised, strict=True)
                if text.strip() and score >= self.settings.text_score
            ]
            lines.append(self._ordered(kept))
            finite.append(detected and read)
        return lines, finite

    def detect_checked(
        self, images: Sequence[np.ndarray]
    ) -> list[tuple[list[tuple[np.ndarray, float]], bool]]:
        """Each image's text boxes (source pixels) and scores, with whether its probability map
        was all finite; images of one detector size run together, within DET_BATCH_PIXELS."""
        sizes = [detector_size(image.shape[0], image.shape[1], self.settings) for image in images]
        found: list[tuple[list[tuple[np.ndarray, float]], bool]] = [([], True) for _ in images]
        for size, members in _groups(sizes, DET_BATCH_PIXELS):
            batch = detector_input([images[i] for i in members], size)
            probs = self._run(self.detector, batch)[:, 0, : size[0], : size[1]]  # not the pad
            for index, prob in zip(members, probs, strict=True):
                boxes = text_boxes(prob, images[index].shape[:2], self.settings)
                found[index] = boxes, bool(np.isfinite(prob).all())
        return found

    def recognize_checked(self, cuts: Sequence[np.ndarray]) -> tuple[list[tuple[str, float]], bool]:
        """Line cuts (h, w, 3) -> text and score each, and whether the recogniser's outputs
        for all the cuts were finite: sorted by aspect ratio so each call pads little,
        rec_batch_size cuts a call."""
        order = sorted(range(len(cuts)), key=lambda i: aspect(cuts[i]))
        results: list[tuple[str, float]] = [("", 0.0)] * len(cuts)
        finite = True
        step = self.settings.rec_batch_size
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            probs = self._run(self.recognizer, recognizer_batch([cuts[i] for i in chunk]))
            finite = finite and bool(np.isfinite(probs).all())
            for index, decoded in zip(chunk, ctc_decode(probs, self.chars), strict=True):
                results[index] = decoded
        return results, finite

    def _ordered(self, lines: list[Line]) -> list[Line]:
        return [lines[i] for row in reading_order([line.polygon for line in lines]) for i in row]

    @staticmethod
    def _run(session: Any, batch: np.ndarray) -> np.ndarray:
        (output, *_) = session.run(None, {session.get_inputs()[0].name: batch})
        return np.asarray(output)


def _groups(
    sizes: Sequence[tuple[int, int]], budget: int
) -> list[tuple[tuple[int, int], list[int]]]:
    """Image indices by detector size, each group within `budget` input pixels (one image
    larger than the budget alone)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    groups = []
    for size, members in by_size.items():
        per_call = max(1, budget // math.prod(detector_canvas(size)))
        groups += [(size, members[i : i + per_call]) for i in range(0, len(members), per_call)]
    return groups


# --- predictor columns and rows --------------------------------------------------------------


def line_columns(found: Sequence[Sequence[Line] | None]) -> dict[str, np.ndarray]:
    """Each row's lines as the predictor's two columns (None: a row not read, no lines)."""
    texts = np.empty(len(found), dtype=object)
    boxes = np.empty(len(found), dtype=object)
    for row, lines in enumerate(found):
        lines = lines or []
        texts[row] = np.array([line.text for line in lines], dtype=object)
        boxes[row] = np.array(
            [[line.score, *np.asarray(line.polygon).reshape(-1)] for line in lines],
            dtype=np.float32,
        ).reshape(-1, 9)
    return {LINE_TEXTS: texts, LINE_BOXES: boxes}


def ocr_columns(batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, pa.Array]:
    """The predictor's columns -> the table's `text` and `lines` (null where not ok; an ok row
    without text has "" and no lines)."""
    texts = [list(t) if good else [] for t, good in zip(batch[LINE_TEXTS], ok, strict=True)]
    boxes = [
        np.asarray(b, np.float32).reshape(-1, 9) if good else np.zeros((0, 9), np.float32)
        for b, good in zip(batch[LINE_BOXES], ok, strict=True)
    ]
    joined = [
        joined_text(t, reading_rows(b)) if good else None
        for t, b, good in zip(texts, boxes, ok, strict=True)
    ]
    flat = np.concatenate(boxes) if boxes else np.zeros((0, 9), np.float32)
    points = pa.StructArray.from_arrays(
        [pa.array(flat[:, 1::2].reshape(-1)), pa.array(flat[:, 2::2].reshape(-1))],
        fields=list(POINT),
    )
    polygons = pa.ListArray.from_arrays(
        pa.array(np.arange(0, len(points) + 1, 4, dtype=np.int32)),
        points,
        type=LINE_ENTRY.field("polygon").type,
    )
    entries = pa.StructArray.from_arrays(
        [pa.array([t for row in texts for t in row], pa.string()), pa.array(flat[:, 0]), polygons],
        fields=list(LINE_ENTRY),
    )
    counts = np.array([len(b) for b in boxes], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    lines = pa.ListArray.from_arrays(offsets, entries, mask=pa.array(~ok))
    return {
        "text": pa.array(joined, pa.string()),
        "lines": lines.cast(OCR_FIELDS[1].type),
    }


def reading_rows(boxes: np.ndarray) -> list[list[int]]:
    """Rows of lines already in reading order (the predictor's order), as `reading_order`
    groups them."""
    polygons = [box[1:].reshape(4, 2) for box in boxes]
    rows = reading_order(polygons)
    flat = [i for row in rows for i in row]
    if flat != list(range(len(polygons))):  # lines in another order: one row each, as given
        return [[i] for i in range(len(polygons))]
    return rows


def ocr_table(
    batch: dict[str, np.ndarray],
    run_id: str,
    labels: list[str] | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """OCR output (each row's lines: texts and score + polygon arrays) -> rows of the OCR
    schema. `labels` is unused: OCR has no classes."""
    rows = len(batch["source_uri"])
    ok = np.asarray(batch["status"] == STATUS_OK, dtype=bool)
    schema = schema or OCR_SCHEMA
    columns = _unit_columns(batch, run_id, "ocr", schema)
    columns.update(ocr_columns(batch, ok))
    return with_stage_times(_table(columns, schema, rows), batch)
