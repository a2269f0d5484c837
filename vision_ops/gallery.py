"""Galleries: a run's units as small embedded pictures (read from their sources at report time),
with what the model found drawn on them; the report's panels, one registry of them."""

from __future__ import annotations

import base64
import contextlib
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vision_ops.embedding import ComparedUnits, compared_units
from vision_ops.registry import Registry
from vision_ops.schema import STATUS_ERROR, STATUS_OK
from vision_ops.storage import StorageOptions, read_bytes
from vision_ops.tasks import counts
from vision_ops.tiling import Window, tile_window

THUMB = 160  # a thumbnail's longest side, in CSS and image pixels
MAX_PIXELS = 200_000_000  # a source larger than this is not decoded for a thumbnail
LABEL_STRIPS = 8  # labels with a strip of their own (the most frequent)
ERROR_ROWS = 50  # error rows listed
BOX_COLOUR = "#ff3b30"


@dataclass
class Sources:
    """The run's sources as the report reads them: bounded samples, each file read once and
    each scene opened once (close it, or use it in a `with`, to close the scenes)."""

    options: StorageOptions
    samples: int = 8  # units per strip
    # A scene's bands in RGB order as the run read them (its manifest's `tile_bands`); None:
    # the default (`raster.scene_bands`): the run left `tiling.bands` unset, or was committed
    # before manifests held them.
    bands: Sequence[int] | None = None
    bits_stored: int = 16  # of the run's 16-bit images (its manifest's `bits_stored`)
    # An embedding run's compared units, as its summary computed them (`Summary.compared`):
    # the neighbours panel draws those rather than compute them again; None: from its rows.
    compared: ComparedUnits | None = None
    _read: dict[str, bytes | None] = field(default_factory=dict)
    _unreachable: set[str] = field(default_factory=set)  # stores (scheme://bucket) that failed
    _scenes: dict[str, Any] = field(default_factory=dict)  # open rasterio datasets by URI
    _unopened: set[str] = field(default_factory=set)  # scenes that failed to open
    _open: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the scenes opened for tiles."""
        self._scenes.clear()
        self._open.close()

    def data(self, uri: str) -> bytes | None:
        """The source's bytes; None where it is gone or cannot be read (never an exception).
        A remote store that failed once (no such bucket, no route, no access) is not asked
        again: a report over a lost bucket does not wait out a retry per image."""
        store = store_of(uri)
        if uri not in self._read and store in self._unreachable:
            self._read[uri] = None
        if uri not in self._read:
            try:
                self._read[uri] = read_bytes(uri, self.options)
            except FileNotFoundError:  # this one is gone; its store still answers
                self._read[uri] = None
            except Exception:  # no route, no access, a broken store: a placeholder
                self._read[uri] = None
                if store:
                    self._unreachable.add(store)
        return self._read[uri]

    def pixels(self, row: dict[str, Any]) -> np.ndarray | None:
        """The unit as the model saw it: a DICOM frame windowed as its row says, a tile cut
        from its image, else the decoded image; None where it cannot be had."""
        uri = str(row["source_uri"])
        if tile_window(row) is not None:
            return self.tile(row) if store_of(uri) not in self._unreachable else None
        data = self.data(uri)
        if data is None:
            return None
        try:
            return unit_pixels(row, data, self.bits_stored)
        except Exception:  # not decodable here (a damaged file)
            return None

    def tile(self, row: dict[str, Any]) -> np.ndarray | None:
        """A scene tile read through rasterio (only its window: ranged reads), the run's bands
        stretched between the tile's 2nd and 98th percentiles. A scene that cannot be opened
        is not tried again for its other tiles."""
        uri = str(row["source_uri"])
        if uri in self._unopened:
            return None
        try:
            dataset = self.scene(uri)
        except Exception:  # gone, unreadable, or not a raster
            self._unopened.add(uri)
            self._note_failure(uri)
            return None
        try:
            return scene_tile(dataset, row, self.bands)
        except Exception:  # a window that cannot be read
            self._note_failure(uri)
            return None

    def _note_failure(self, uri: str) -> None:
        """Mark the source's remote store unreachable unless only the source is gone."""
        if store_of(uri) and not isinstance(_cause(uri, self.options), FileNotFoundError):
            self._unreachable.add(store_of(uri))

    def scene(self, uri: str) -> Any:
        """The scene as an open rasterio dataset, opened on first use and kept open: its
        header is read once, and a window read twice (its percentiles, then its pixels) comes
        from GDAL's block cache. Over S3 an open is a round trip or more (0.15 s on a local
        SeaweedFS server), once per scene, not once per tile."""
        from vision_ops.raster import open_raster

        if uri not in self._scenes:
            self._scenes[uri] = self._open.enter_context(open_raster(uri, self.options))
        return self._scenes[uri]


def store_of(uri: str) -> str:
    """`scheme://bucket` of a remote URI; "" for a local path (never marked unreachable)."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if rest and scheme != "file" else ""


def _cause(uri: str, options: StorageOptions) -> Exception | None:
    """Why a remote source cannot be had (FileNotFoundError: only it is gone)."""
    from vision_ops.storage import filesystem

    try:
        fs, path = filesystem(uri, options)
        fs.info(path)
    except Exception as err:
        return err
    return None


def scene_tile(dataset: Any, row: dict[str, Any], bands: Sequence[int] | None = None) -> np.ndarray:
    """RGB uint8 of a tile's window of its scene (an open rasterio dataset): `bands` in RGB
    order, or one band as grey (default: the first three, or the scene's one)."""
    from vision_ops.raster import read_tile, read_window, scene_bands, valid_values

    window = tile_window(row)
    if window is None:
        raise ValueError(f"{row['source_uri']}: not a tile row")
    bands = scene_bands(bands, dataset.count)
    values = read_window(dataset, window, bands, fill=np.nan)
    inside = valid_values(dataset, values, bands, dataset.nodata, window)  # NaN past the edge: none
    low, high = np.percentile(inside, [2, 98]) if inside.size else (0.0, 1.0)
    pixels, _ = read_tile(dataset, window, bands, (float(low), float(max(high, low + 1))))
    return pixels


def unit_pixels(row: dict[str, Any], data: bytes, bits_stored: int = 16) -> np.ndarray:
    """RGB uint8 of one unit from its source's bytes (a 16-bit image's from `bits_stored`)."""
    from vision_ops.decode import decode_image
    from vision_ops.dicom import is_dicom

    if row.get("frame_index") is not None or is_dicom(str(row["source_uri"]), data):
        return dicom_frame(row, data)
    return decode_image(data, MAX_PIXELS, bits_stored)


def dicom_frame(row: dict[str, Any], data: bytes) -> np.ndarray:
    """A DICOM frame through the window its row records (the one the model saw)."""
    from vision_ops.config import DicomSpec
    from vision_ops.config import Window as DicomWindow
    from vision_ops.dicom import decode_frame, open_instance

    centre, width = row.get("window_center"), row.get("window_width")
    window: str | DicomWindow = "file"
    if centre is not None and width is not None:
        window = DicomWindow(center=centre, width=max(float(width), 1.0))
    spec = DicomSpec(window=window)
    return decode_frame(
        open_instance(data, spec, MAX_PIXELS), int(row.get("frame_index") or 0), spec
    )


def shown_size(height: int, width: int, side: int = THUMB) -> tuple[int, int]:
    """(width, height) of a thumbnail whose longest side is `side`."""
    scale = side / max(height, width, 1)
    return max(round(width * scale), 1), max(round(height * scale), 1)


def thumbnail(pixels: np.ndarray, side: int = THUMB) -> str:
    """A JPEG data URI of the image resized so that its longest side is `side`."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels[:, :, :3]))
    size = shown_size(pixels.shape[0], pixels.shape[1], side)
    image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def name_of(row: dict[str, Any]) -> str:
    """The unit in words: its file name, with the frame or tile where it is one."""
    name = str(row["source_uri"]).rsplit("/", 1)[-1]
    if row.get("frame_index") is not None:
        name += f" #{row['frame_index']}"
    if row.get("tile_x") is not None:
        name += f" @{row['tile_x']},{row['tile_y']}"
    return name


def figure(sources: Sources, row: dict[str, Any], caption: str, overlay: str = "") -> str:
    """The unit's thumbnail (or a placeholder where its source cannot be read) with an SVG
    overlay in the unit's pixel coordinates (viewBox) and a caption."""
    name = html.escape(name_of(row))
    pixels = sources.pixels(row)
    if pixels is None:
        picture = (
            f'<div class="missing" style="width:{THUMB}px;height:{THUMB // 2}px;'
            "background:#eee;color:#888;font-size:11px;display:flex;align-items:center;"
            f'justify-content:center">source unreadable</div>'
        )
    else:
        height, width = pixels.shape[:2]
        shown_w, shown_h = shown_size(height, width)
        svg = (
            f'<svg class="overlay" viewBox="0 0 {width} {height}" width="{shown_w}" '
            f'height="{shown_h}" style="position:absolute;left:0;top:0">{overlay}</svg>'
            if overlay
            else ""
        )
        picture = (
            f'<div style="position:relative;width:{shown_w}px;height:{shown_h}px">'
            f'<img class="thumb" alt="{name}" src="{thumbnail(pixels)}" width="{shown_w}" '
            f'height="{shown_h}">{svg}</div>'
        )
    return (
        f'<figure class="unit" data-source="{html.escape(str(row["source_uri"]))}" '
        f'style="display:inline-block;margin:4px;vertical-align:top;width:{THUMB}px">'
        f'{picture}<figcaption style="font-size:11px;word-break:break-all">{name}<br>'
        f"{html.escape(caption)}</figcaption></figure>"
    )


def strip(title: str, figures: list[str]) -> str:
    return (
        f'<div class="strip" data-title="{html.escape(title)}" style="display:inline-block;'
        f'vertical-align:top;margin-right:16px"><h3 style="font-size:13px;margin:8px 0 2px">'
        f"{html.escape(title)}</h3>{''.join(figures) or 'none'}</div>"
    )


# --- the panels --------------------------------------------------------------------------------

# a run's rows and its sources -> (title, html), or None where the run has nothing to show
Panel = Callable[[pa.Table, Sources], "tuple[str, str] | None"]
PANELS: Registry[Panel] = Registry("report panel")
COMMON_PANELS = ("error_rows", "tiles_in_place")  # every run's report asks for these
UNIT_COLUMNS = [
    "source_uri", "frame_index", "tile_x", "tile_y", "tile_size", "window_center",
    "window_width", "image_width", "image_height",
]  # fmt: skip


def _ok(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["status"], STATUS_OK))


def _rows(table: pa.Table, columns: list[str]) -> list[dict[str, Any]]:
    present = [c for c in dict.fromkeys([*UNIT_COLUMNS, *columns]) if c in table.column_names]
    return table.select(present).to_pylist()


def extremes(order: np.ndarray, samples: int) -> np.ndarray:
    """Of row positions ranked best first, the best half of `samples` then the worst (no row
    twice), best first."""
    if len(order) <= samples:
        return order
    high = (samples + 1) // 2
    return np.concatenate([order[:high], order[len(order) - (samples - high) :]])


def _numbers(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)


@PANELS.register("label_strips")
def label_strips(table: pa.Table, sources: Sources) -> tuple[str, str] | None:
    """Per frequent label, its highest and lowest scoring units (picked in Arrow / numpy: only
    the units shown become Python rows)."""
    ok = _ok(table)
    labels = ok["label"].to_numpy(zero_copy_only=False)
    scores = _numbers(ok["score"])
    strips = []
    for label, count in counts(pc.drop_null(ok["label"]))[:LABEL_STRIPS]:
        positions = np.flatnonzero(labels == label)
        ranked = positions[np.argsort(-scores[positions], kind="stable")]
        shown = _rows(ok.take(extremes(ranked, sources.samples)), ["score"])
        strips.append(
            strip(
                f"{label} ({int(count)} unit{'s' if count > 1 else ''}, by score)",
                [figure(sources, row, scored(label, row["score"])) for row in shown],
            )
        )
    return ("Images under their labels", "".join(strips)) if strips else None


def scored(label: object, score: float | None) -> str:
    """A caption: the label and its score (a row may have a label and no score)."""
    return f"{label}" if score is None else f"{label} {score:.3f}"


@PANELS.register("borderline")
def borderline(table: pa.Table, sources: Sources) -> tuple[str, str] | None:
    """The units whose top two labels were closest (smallest top-1 minus top-2 margin)."""
    ok = _ok(table)
    ok = ok.filter(pc.greater_equal(pc.list_value_length(ok["top_k"]).fill_null(0), 2))
    if not ok.num_rows:
        return None
    first, second = (
        _numbers(pc.struct_field(pc.list_element(ok["top_k"], i), "score")) for i in (0, 1)
    )
    closest = np.argsort(first - second, kind="stable")[: sources.samples]
    figures = [
        figure(
            sources,
            row,
            " / ".join(scored(entry["label"], entry["score"]) for entry in row["top_k"][:2]),
        )
        for row in _rows(ok.take(closest), ["top_k"])
    ]
    return "Borderline (smallest top-1 / top-2 margin)", "".join(figures)


MASK_ALPHA = 110  # of 255


def mask_layer(detections: list[dict[str, Any]], window: Window | None = None) -> str:
    """The boxes' masks (COCO RLE, in the source's pixels), each in its own colour, as one
    PNG stretched over the image, or over `window` of it (a tile's, in its scene's pixels),
    at most THUMB px a side; "" where no box has a mask."""
    from PIL import Image

    from vision_ops.rle import window_of

    masks = [box["mask"] for box in detections if box.get("mask")]
    if not masks:
        return ""
    height, width = (int(v) for v in masks[0]["size"])
    if window is None:
        window = Window(row_off=0, col_off=0, height=height, width=width)
    x, y = window.col_off, window.row_off
    shown = [window_of(rle, x, y, window.height, window.width) for rle in masks]
    layer = np.zeros((*shown[0].shape, 4), np.uint8)  # the window, cut at the image's edge
    for index, pixels in enumerate(shown):
        layer[pixels.astype(bool)] = (*_rgb(index, len(masks)), MASK_ALPHA)
    image = Image.fromarray(layer).resize(shown_size(*layer.shape[:2]), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return (
        f'<image class="mask" href="data:image/png;base64,{data}" x="{x}" y="{y}" '
        f'width="{layer.shape[1]}" height="{layer.shape[0]}" preserveAspectRatio="none"/>'
    )


def _rgb(index: int, count: int) -> tuple[int, int, int]:
    import colorsys

    red, green, blue = colorsys.hsv_to_rgb(index / max(count, 1), 0.8, 1.0)
    return round(red * 255), round(green * 255), round(blue * 255)


def best_box_scores(detections: pa.ChunkedArray) -> np.ndarray:
    """Each row's highest box score (0 without boxes)."""
    best = np.zeros(len(detections))
    parents, scores = _scores_of_each_row(detections)
    np.maximum.at(best, parents, scores)
    return best


def _scores_of_each_row(lists: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list-of-structs column's `score` fields, flat, with the row each is of."""
    chunks = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    parents = pc.list_parent_indices(chunks).to_numpy(zero_copy_only=False)
    return parents, _numbers(pc.struct_field(pc.list_flatten(chunks), "score"))


def box_overlay(detections: list[dict[str, Any]], width: int, window: Window | None = None) -> str:
    """Each box as an SVG rectangle in the source's pixels, labelled with its label and score;
    Mask R-CNN masks as one translucent layer under them, keypoints as dots. `window`: the
    tile shown, in its scene's pixels (a tiled run's boxes are the scene's), drawn from its
    corner."""
    stroke, font = max(width / 160, 1.0), max(width / 16, 8.0)
    shapes = [mask_layer(detections, window)]
    for box in detections:
        x0, y0, x1, y1 = (float(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        text = html.escape(f"{box['label']} {float(box['score']):.2f}")
        shapes.append(
            f'<rect class="box" x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" '
            f'height="{y1 - y0:.1f}" fill="none" stroke="{BOX_COLOUR}" '
            f'stroke-width="{stroke:.1f}"/><text x="{x0:.1f}" y="{max(y0 - stroke, font):.1f}" '
            f'font-size="{font:.0f}" fill="{BOX_COLOUR}">{text}</text>'
        )
        for point in box.get("keypoints") or []:
            shapes.append(
                f'<circle cx="{point["x"]:.1f}" cy="{point["y"]:.1f}" r="{2 * stroke:.1f}" '
                'fill="#34c759"/>'
            )
    if window is None:
        return "".join(shapes)
    return f'<g transform="translate({-window.col_off} {-window.row_off})">{"".join(shapes)}</g>'


@PANELS.register("boxes")
def boxes(table: pa.Table, sources: Sources) -> tuple[str, str] | None:
    """Units with the most confident detections, their boxes drawn over them."""
    ok = _ok(table)
    best = np.argsort(-best_box_scores(ok["detections"]), kind="stable")[: sources.samples]
    figures = []
    for row in _rows(ok.take(best), ["detections"]):
        found = row["detections"] or []
        window = tile_window(row)
        width = window.width if window else int(row.get("image_width") or THUMB)
        caption = f"{len(found)} boxes" + (f", best {found[0]['label']}" if found else "")
        figures.append(figure(sources, row, caption, box_overlay(found, width, window) or " "))
    return ("Detections drawn on their images", "".join(figures)) if figures else None


@PANELS.register("error_rows")
def error_rows(table: pa.Table, sources: Sources) -> tuple[str, str] | None:
    """The error rows: file (frame, tile), error type and message."""
    errors = table.filter(pc.equal(table["status"], STATUS_ERROR))
    if not errors.num_rows:
        return None
    rows = _rows(errors, ["error_type", "error_message"])[:ERROR_ROWS]
    body = "".join(
        f'<tr class="error"><td>{html.escape(name_of(row))}</td>'
        f"<td><b>{html.escape(str(row['error_type']))}</b></td>"
        f"<td>{html.escape(str(row['error_message'] or '')[:300])}</td></tr>"  # cut, then escaped
        for row in rows
    )
    more = f"<p>{errors.num_rows - len(rows)} more</p>" if errors.num_rows > len(rows) else ""
    return f"Errors ({errors.num_rows})", f'<table class="errors">{body}</table>{more}'


@PANELS.register("tiles_in_place")
def tiles_in_place(table: pa.Table, sources: Sources) -> tuple[str, str] | None:
    """Each scene's tiles where they lie on its grid, coloured by label (grey: skipped, red
    outline: error); drawn from the rows alone, for `sources.samples` scenes (the page says
    how many more there are)."""
    if "tile_size" not in table.column_names:
        return None
    columns = ["label", "status", "scene_width", "scene_height"]
    rows = [r for r in _rows(table, columns) if r.get("tile_x") is not None]
    if not rows:
        return None
    labels = sorted({str(r.get("label")) for r in rows if r.get("label") is not None})
    colours = {label: _hue(index, len(labels)) for index, label in enumerate(labels)}
    scenes: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        scenes.setdefault(str(row["source_uri"]), []).append(row)
    legend = " ".join(
        f'<span style="background:{c};padding:0 6px">&nbsp;</span> {html.escape(k)}'
        for k, c in colours.items()
    )
    drawn = list(scenes.items())[: sources.samples]
    maps = [_scene_map(uri, tiles, colours) for uri, tiles in drawn]
    more = len(scenes) - len(drawn)
    note = (
        f"<p class='more-scenes' style='font-size:11px'>{more} more scene(s) not drawn: the "
        f"first {len(drawn)} are (--samples)</p>"
        if more
        else ""
    )
    return (
        "Scene tiles in place, by label",
        f"<p style='font-size:11px'>{legend}</p>{''.join(maps)}{note}",
    )


def _scene_map(uri: str, tiles: list[dict[str, Any]], colours: dict[str, str]) -> str:
    width = max(int(t.get("scene_width") or t["tile_x"] + t["tile_size"]) for t in tiles)
    height = max(int(t.get("scene_height") or t["tile_y"] + t["tile_size"]) for t in tiles)
    cells = []
    for t in tiles:
        label = t.get("label")
        fill = colours.get(str(label), "#ccc") if t["status"] == STATUS_OK else "#ddd"
        stroke = "#e45756" if t["status"] == STATUS_ERROR else "#fff"
        cells.append(
            f'<rect class="tile" data-label="{html.escape(str(label))}" x="{t["tile_x"]}" '
            f'y="{t["tile_y"]}" width="{t["tile_size"]}" height="{t["tile_size"]}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{max(width / 200, 1):.1f}">'
            f"<title>{html.escape(name_of(t))}: {html.escape(str(label or t['status']))}"
            "</title></rect>"
        )
    shown = 360 / max(width, height)
    return (
        f'<figure style="display:inline-block;margin:4px"><svg class="scene" '
        f'viewBox="0 0 {width} {height}" width="{width * shown:.0f}" '
        f'height="{height * shown:.0f}">{"".join(cells)}</svg><figcaption '
        f'style="font-size:11px">{html.escape(uri.rsplit("/", 1)[-1])}</figcaption></figure>'
    )


def _hue(index: int, count: int) -> str:
    return f"hsl({round(360 * index / max(count, 1))}, 65%, 55%)"


OVERLAYS = 4  # masks drawn over their images
OVERLAY_TRIES = 4 * OVERLAYS  # units tried for them: a lost store is not asked once a row
OVERLAY_ALPHA = 0.5


@PANELS.register("mask_overlays")
def mask_overlays(table: pa.Table, sources: Sources) -> tuple[str, str] | None:
    """A few ok units' class masks drawn over them (a tile over its tile, in the mask's frame:
    the model's input), as embedded PNG; of the first OVERLAY_TRIES units with a mask, those
    whose image or mask cannot be read here are passed over."""
    images: list[str] = []
    ok = _ok(table)
    named = ok["mask_uri"].fill_null("")
    masked = pc.or_(pc.ends_with(named, ".png"), pc.ends_with(named, ".tif"))  # .tif: a scene's
    ok = ok.filter(masked).slice(0, OVERLAY_TRIES)
    for row in _rows(ok, ["mask_uri"]):
        if len(images) == OVERLAYS:
            break
        pixels = sources.pixels(row)
        mask = None if pixels is None else sources.data(str(row["mask_uri"]))
        if pixels is None or mask is None:
            continue
        try:
            picture = overlay_png(pixels, mask)
        except Exception:  # a mask that is not a PNG
            continue
        name = html.escape(name_of(row))
        images.append(
            f'<figure style="display:inline-block;margin:4px"><img alt="{name}" '
            f'src="data:image/png;base64,{base64.b64encode(picture).decode()}" width="192">'
            f"<figcaption>{name}</figcaption></figure>"
        )
    return "Masks over their images", "".join(images) or "<p>no mask to draw</p>"


def overlay_png(pixels: np.ndarray, mask_png: bytes) -> bytes:
    """The unit's pixels brought into its mask's frame, each class in its own colour over it."""
    from PIL import Image

    from vision_ops.masks import in_mask_frame

    mask = np.asarray(Image.open(io.BytesIO(mask_png)))
    image = in_mask_frame(pixels, mask.shape, nearest=False).astype(np.float32)
    colours = palette(int(mask.max()) + 1)[mask]
    blended = (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def palette(classes: int) -> np.ndarray:
    """float32 (classes, 3): class 0 black, then distinct hues (PASCAL VOC's bit pattern)."""
    colours = np.zeros((classes, 3), dtype=np.float32)
    for index in range(classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] += ((value >> channel) & 1) << shift
            value, shift = value >> 3, shift - 1
    return colours


# --- OCR ---------------------------------------------------------------------------------------

LINE_COLOUR = "#ff9500"


def line_overlay(lines: list[dict[str, Any]], width: int) -> str:
    """Each recognised line's quadrilateral as an SVG polygon in the unit's pixels, its text
    above it."""
    stroke, font = max(width / 200, 1.0), max(width / 24, 8.0)
    shapes = []
    for line in lines:
        corners = line.get("polygon") or []
        if not corners:
            continue
        points = " ".join(f"{float(p['x']):.1f},{float(p['y']):.1f}" for p in corners)
        x, y = float(corners[0]["x"]), float(corners[0]["y"])
        shapes.append(
            f'<polygon class="line" points="{points}" fill="none" stroke="{LINE_COLOUR}" '
            f'stroke-width="{stroke:.1f}"/><text x="{x:.1f}" y="{max(y - stroke, font):.1f}" '
            f'font-size="{font:.0f}" fill="{LINE_COLOUR}">{html.escape(str(line["text"]))}</text>'
        )
    return "".join(shapes)


@PANELS.register("text_lines")
def text_lines(table: pa.Table, sources: Sources) -> tuple[str, str] | None:
    """The units read most surely, then least surely (by mean line score), their lines drawn
    over them with the text read."""
    ok = _ok(table)
    ok = ok.filter(pc.greater(pc.list_value_length(ok["lines"]).fill_null(0), 0))
    if not ok.num_rows:
        return None
    means = mean_line_scores(ok["lines"])
    shown = extremes(np.argsort(-means, kind="stable"), sources.samples)
    figures = []
    for row, mean in zip(_rows(ok.take(shown), ["lines", "text"]), means[shown], strict=True):
        lines = row["lines"]
        width = int(row.get("image_width") or THUMB)
        caption = f"{len(lines)} lines, mean score {mean:.3f}: {str(row['text'])[:80]}"
        figures.append(figure(sources, row, caption, line_overlay(lines, width) or " "))
    return "Text read, lines drawn (most sure, then least sure)", "".join(figures)


def mean_line_scores(lines: pa.ChunkedArray) -> np.ndarray:
    """Each row's mean line score (rows with at least one line), in Arrow and numpy."""
    parents, scores = _scores_of_each_row(lines)
    return np.bincount(parents, scores, len(lines)) / np.bincount(parents, None, len(lines))


# --- embeddings --------------------------------------------------------------------------------


NEIGHBOURS_TITLE = "Closest pairs (near-duplicates where the cosine is near 1), then loners"


@PANELS.register("neighbours")
def neighbours(table: pa.Table, sources: Sources) -> tuple[str, str] | None:
    """The most similar pairs of units side by side (near-duplicates, where the cosine is near
    1), then the units least like any other (lowest similarity to their nearest neighbour: odd
    images, or inputs of another kind than the rest)."""
    found = sources.compared or compared_units(table)
    if found is None:
        return None
    ok, similarity = found
    rows = _rows(ok, [])
    return NEIGHBOURS_TITLE, _closest_pairs(rows, similarity, sources) + _loners(
        rows, similarity, sources
    )


def _closest_pairs(rows: list[dict[str, Any]], similarity: np.ndarray, sources: Sources) -> str:
    upper = np.triu_indices(len(similarity), k=1)
    best = np.argsort(-similarity[upper], kind="stable")[: sources.samples]
    pairs = []
    for first, second in zip(upper[0][best], upper[1][best], strict=True):
        caption = f"cosine {similarity[first, second]:.4f}"
        shown = [figure(sources, rows[index], caption) for index in (first, second)]
        pairs.append(strip(f"{name_of(rows[first])} ~ {name_of(rows[second])}", shown))
    return "".join(pairs)


def _loners(rows: list[dict[str, Any]], similarity: np.ndarray, sources: Sources) -> str:
    nearest = similarity.max(axis=1)
    lonely = np.argsort(nearest, kind="stable")[: sources.samples]
    figures = [
        figure(sources, rows[index], f"nearest cosine {nearest[index]:.4f}") for index in lonely
    ]
    return strip("least like any other unit", figures)
