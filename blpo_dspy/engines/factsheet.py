"""Fact-sheet verbalizer: an image-to-text engine built from OpenCV measurements and OCR, for text-only LMs.

No vision-language model ships inside a PyPI wheel today, so the offline default describes images with
measured facts instead. For every image a request carries, :func:`compute_fact_sheet` measures

* the colour palette (k-means in Lab colour space, clusters named after the nearest basic colour) and the
  background colour (the colour covering most of the image border);
* shapes per colour: connected regions classified as circle, ellipse, triangle, square, rectangle, star or
  irregular, with their count, size (% of the image) and position on a 3x3 grid ("top-right corner" when a
  shape sits in a corner);
* text, read with RapidOCR (``rapidocr_onnxruntime``; its models ship in the wheel), with its position.

:class:`FactSheetEngine` then has the local text LM rewrite that fact sheet under the verbalizer's instruction
(taken from the request's system prompt), so the image-to-text instruction the optimizer tunes really changes
what the judge and the proposer read. With ``rewrite=False`` the fact sheet itself is the description (fast).
Requests without images go straight to the text engine, so one ``dspy.LM`` can serve every role.

.. warning:: The fact sheet sees colours, shapes, counts, layout and text only; see
   :data:`FACTSHEET_LIMITATIONS`.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dspy
import numpy as np
from dspy.lm15 import ImagePart, Message, Request, Response, TextPart, UnsupportedFeatureError, Usage
from PIL import Image

from blpo_dspy.engines import prompt_format

logger = logging.getLogger(__name__)

FACTSHEET_LIMITATIONS = (
    "The fact-sheet verbalizer measures colours, simple shapes (circles, triangles, squares, rectangles, stars), "
    "their counts, sizes and positions on a 3x3 grid, the background colour, and text read by OCR. It does not "
    "recognise objects, people, scenes, style, aesthetics, texture or image quality; on photographs its shape list "
    "is only a rough segmentation. Judges fed by it can only check what those facts can express."
)

NAMED_COLOURS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "black": ((0, 0, 0), (20, 20, 20), (40, 40, 45)),
    "white": ((255, 255, 255), (250, 250, 250), (235, 235, 230)),
    "gray": ((128, 128, 128), (90, 90, 90), (175, 175, 175)),
    "red": ((220, 30, 30), (255, 0, 0), (160, 20, 25)),
    "orange": ((245, 130, 20), (255, 165, 0), (230, 110, 40)),
    "yellow": ((245, 215, 20), (255, 255, 0), (240, 230, 140)),
    "green": ((30, 160, 60), (0, 128, 0), (0, 220, 0), (110, 190, 110), (20, 80, 30)),
    "blue": ((30, 70, 200), (0, 0, 255), (0, 0, 128), (70, 130, 180), (110, 160, 240)),
    "purple": ((130, 50, 170), (128, 0, 128), (180, 120, 220)),
    "pink": ((240, 110, 180), (255, 192, 203), (255, 105, 180)),
    "brown": ((139, 69, 19), (160, 110, 60), (100, 60, 30)),
    "cyan": ((0, 200, 200), (0, 128, 128), (120, 220, 230)),
}
GRID_ROWS = ("top", "middle", "bottom")
GRID_COLS = ("left", "center", "right")
DEFAULT_REWRITE_MAX_TOKENS = 160

_ANALYSIS_MAX_SIDE = 512
_KMEANS_K = 8
_KMEANS_SAMPLE = 6000
_KMEANS_ITERATIONS = 12
_MIN_PALETTE_SHARE = 0.005
_MIN_SHAPE_SHARE = 0.0015
_MAX_SHAPES_LISTED = 12
_CORNER_ZONE = 0.18
_OCR_MIN_SCORE = 0.5
_OCR_DET_SIDE = 480
_WORD_GAP = 0.4  # a gap wider than this fraction of the text height separates words
_CACHE_SIZE = 2048


# ---------------------------------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class ShapeFact:
    """One shape found in the image.

    Attributes:
        colour: Colour name.
        kind: circle, ellipse, triangle, square, rectangle, star or irregular shape.
        area_pct: Area in percent of the image.
        position: Cell of the 3x3 grid (e.g. "top-right", "center").
        corner: Whether the shape sits in that corner of the image (only for corner cells).
        box: Bounding box (left, top, right, bottom) in pixels of the original image.
    """

    colour: str
    kind: str
    area_pct: float
    position: str
    corner: bool
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class TextFact:
    """One line of text read by OCR.

    Attributes:
        text: The text (words separated by single spaces).
        position: Cell of the 3x3 grid.
        confidence: OCR confidence (0 to 1).
        box: Bounding box (left, top, right, bottom) in pixels.
    """

    text: str
    position: str
    confidence: float
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class FactSheet:
    """Measured facts about one image.

    Attributes:
        width: Image width in pixels.
        height: Image height in pixels.
        background: Background colour name.
        palette: ``(colour, share)`` pairs, largest first (shares sum to about 1).
        brightness: Mean brightness, 0 to 1.
        saturation: Mean saturation, 0 to 1.
        shapes: Shapes found (text regions excluded), largest first.
        texts: Text lines read by OCR, top to bottom.
        shapes_truncated: How many smaller shapes were left out of ``shapes``.
    """

    width: int
    height: int
    background: str
    palette: tuple[tuple[str, float], ...]
    brightness: float
    saturation: float
    shapes: tuple[ShapeFact, ...] = ()
    texts: tuple[TextFact, ...] = ()
    shapes_truncated: int = 0

    def shape_counts(self) -> dict[tuple[str, str], int]:
        """Number of shapes per ``(colour, kind)``."""
        counts: dict[tuple[str, str], int] = {}
        for shape in self.shapes:
            counts[(shape.colour, shape.kind)] = counts.get((shape.colour, shape.kind), 0) + 1
        return counts

    def render(self) -> str:
        """The fact sheet as plain text for an LM."""
        orientation = "landscape" if self.width > self.height else "portrait" if self.height > self.width else "square"
        lines = [
            f"Image {self.width}x{self.height} ({orientation}), brightness {self.brightness:.2f}, "
            f"saturation {self.saturation:.2f}.",
            f"Background colour: {self.background}.",
            "Colour palette: " + ", ".join(f"{name} {share:.0%}" for name, share in self.palette) + ".",
        ]
        groups: dict[tuple[str, str], list[ShapeFact]] = {}
        for shape in self.shapes:
            groups.setdefault((shape.colour, shape.kind), []).append(shape)
        if groups:
            total = len(self.shapes) + self.shapes_truncated
            lines.append(f"Shapes ({total} in total, text excluded):")
            for (colour, kind), items in groups.items():
                places = ", ".join(_place(s) for s in sorted(items, key=lambda s: (s.box[1], s.box[0])))
                sizes = [s.area_pct for s in items]
                if min(sizes) == max(sizes):
                    size = f"{sizes[0]:.1f}% of the image" + (" each" if len(items) > 1 else "")
                else:
                    size = f"{min(sizes):.1f}-{max(sizes):.1f}% of the image each"
                lines.append(f"- {len(items)} {colour} {_plural(kind, len(items))} ({size}): {places}")
            if self.shapes_truncated:
                lines.append(f"- and {self.shapes_truncated} smaller regions not listed")
        else:
            lines.append("Shapes: none found.")
        if self.texts:
            for text in self.texts:
                lines.append(f'Text "{text.text}" at the {text.position} (OCR confidence {text.confidence:.2f}).')
        else:
            lines.append("Text: none found by OCR.")
        return "\n".join(lines)


def _place(shape: ShapeFact) -> str:
    return f"{shape.position} corner" if shape.corner else shape.position


def _plural(kind: str, count: int) -> str:
    if count == 1:
        return kind
    return "irregular shapes" if kind == "irregular shape" else f"{kind}s"


# ---------------------------------------------------------------------------------------------------- colours
def _lab(rgb: np.ndarray) -> np.ndarray:
    import cv2

    array = np.asarray(rgb, dtype=np.float32).reshape(-1, 1, 3) / 255.0
    return cv2.cvtColor(array, cv2.COLOR_RGB2LAB).reshape(-1, 3)


_NAMES: list[str] = [name for name, refs in NAMED_COLOURS.items() for _ in refs]
_REFS_LAB: np.ndarray | None = None


def colour_name(rgb: Sequence[float]) -> str:
    """The basic colour name nearest (in Lab space) to an RGB colour."""
    return _name_lab(_lab(np.asarray([rgb]))[0])


def _name_lab(lab: np.ndarray) -> str:
    global _REFS_LAB
    if _REFS_LAB is None:
        _REFS_LAB = _lab(np.asarray([ref for refs in NAMED_COLOURS.values() for ref in refs]))
    distances = np.linalg.norm(_REFS_LAB - lab, axis=1)
    return _NAMES[int(np.argmin(distances))]


def _kmeans(points: np.ndarray, k: int) -> np.ndarray:
    """Deterministic k-means (farthest-point initialisation from the densest colour)."""
    rounded = np.round(points / 4.0)
    values, counts = np.unique(rounded, axis=0, return_counts=True)
    centres = [values[int(np.argmax(counts))] * 4.0]
    distance = np.linalg.norm(points - centres[0], axis=1)
    for _ in range(1, k):
        index = int(np.argmax(distance))
        if distance[index] < 3.0:
            break
        centres.append(points[index])
        distance = np.minimum(distance, np.linalg.norm(points - points[index], axis=1))
    centre_array = np.asarray(centres, dtype=np.float64)
    for _ in range(_KMEANS_ITERATIONS):
        labels = np.argmin(((points[:, None, :] - centre_array[None, :, :]) ** 2).sum(axis=2), axis=1)
        updated = np.asarray(
            [points[labels == j].mean(axis=0) if np.any(labels == j) else centre_array[j] for j in range(len(centres))]
        )
        if np.allclose(updated, centre_array, atol=0.05):
            break
        centre_array = updated
    return centre_array


# ---------------------------------------------------------------------------------------------------- shapes
def _classify(contour: np.ndarray) -> str:
    import cv2

    area = cv2.contourArea(contour)
    perimeter = cv2.arcLength(contour, True)
    if area <= 0 or perimeter <= 0:
        return "irregular shape"
    hull_area = cv2.contourArea(cv2.convexHull(contour))
    solidity = area / hull_area if hull_area > 0 else 0.0
    circularity = 4 * math.pi * area / (perimeter * perimeter)
    vertices = len(cv2.approxPolyDP(contour, 0.04 * perimeter, True))
    if solidity < 0.75:
        fine_vertices = len(cv2.approxPolyDP(contour, 0.02 * perimeter, True))
        return "star" if 8 <= fine_vertices <= 14 and solidity > 0.4 else "irregular shape"
    if vertices == 3:
        return "triangle"
    if vertices == 4:
        (_, _), (w, h), _ = cv2.minAreaRect(contour)
        if w <= 0 or h <= 0:
            return "irregular shape"
        extent = area / (w * h)
        if extent < 0.8:
            return "irregular shape"
        ratio = max(w, h) / min(w, h)
        return "square" if ratio <= 1.2 else "rectangle"
    if circularity > 0.75 and solidity > 0.9:
        if len(contour) >= 5:
            (_, _), axes, _ = cv2.fitEllipse(contour)
            if min(axes) > 0 and min(axes) / max(axes) < 0.8:
                return "ellipse"
        return "circle"
    return "irregular shape"


def _grid(cx: float, cy: float, width: int, height: int) -> tuple[str, bool]:
    col = min(2, int(3 * cx / width))
    row = min(2, int(3 * cy / height))
    name = "center" if (row, col) == (1, 1) else f"{GRID_ROWS[row]}-{GRID_COLS[col]}"
    near_x = cx < _CORNER_ZONE * width or cx > (1 - _CORNER_ZONE) * width
    near_y = cy < _CORNER_ZONE * height or cy > (1 - _CORNER_ZONE) * height
    return name, near_x and near_y and row != 1 and col != 1


# ---------------------------------------------------------------------------------------------------- OCR
class _Ocr:
    """A lazily created, lock-protected RapidOCR instance (its call mutates internal settings)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engine: Any = None

    def _get(self) -> Any:
        if self._engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as exc:
                raise ImportError(
                    'the fact-sheet verbalizer needs rapidocr-onnxruntime: pip install "rapidocr-onnxruntime==1.4.4" '
                    '(or pip install "blpo-dspy[local]")'
                ) from exc
            # One ONNX Runtime thread: OCR then does not fight llama.cpp's threads for the cores (measured on
            # 2 busy cores: 0.25 s per banner with 1 thread, 0.57 s with the default of all cores).
            self._engine = RapidOCR(
                det_limit_side_len=_OCR_DET_SIDE,
                det_limit_type="min",
                intra_op_num_threads=1,
                inter_op_num_threads=1,
            )
        return self._engine

    def read(self, bgr: np.ndarray) -> list[tuple[tuple[int, int, int, int], str, float]]:
        """Text lines ``(box, text, confidence)``.

        Boxes on one line are merged; when the recognised text does not have one word per gap found in the
        pixels (the recognition model often drops spaces), each word is read again on its own.
        """
        with self._lock:
            engine = self._get()
            result, _ = engine(bgr)
            output = []
            for box, text, score in _merge_lines(result or []):
                word_boxes = _word_boxes(bgr, box)
                if len(word_boxes) > 1 and len(text.split()) != len(word_boxes):
                    words = []
                    for left, top, right, bottom in word_boxes:
                        pad = max(3, (bottom - top) // 4)
                        crop = bgr[max(0, top - pad) : bottom + pad, max(0, left - pad) : right + pad]
                        read, _ = engine(crop, use_det=False, use_cls=False)
                        if read and read[0][0].strip():
                            words.append(read[0][0].strip())
                            score = min(score, float(read[0][1]))
                    text = " ".join(words)
                if _is_text(text):
                    output.append((box, text, score))
            return output


def _merge_lines(result: list[Any]) -> list[tuple[tuple[int, int, int, int], str, float]]:
    """Merge OCR boxes that lie on the same line: one ``(box, text, confidence)`` per line."""
    boxes = []
    for quad, text, score in result:
        if float(score) < _OCR_MIN_SCORE or not str(text).strip():
            continue
        xs = [float(p[0]) for p in quad]
        ys = [float(p[1]) for p in quad]
        boxes.append((min(xs), min(ys), max(xs), max(ys), str(text).strip(), float(score)))
    boxes.sort(key=lambda b: ((b[1] + b[3]) / 2, b[0]))
    lines: list[dict[str, Any]] = []
    for left, top, right, bottom, text, score in boxes:
        centre = (top + bottom) / 2
        for line in lines:
            if line["top"] <= centre <= line["bottom"]:
                line["left"], line["top"] = min(line["left"], left), min(line["top"], top)
                line["right"], line["bottom"] = max(line["right"], right), max(line["bottom"], bottom)
                line["parts"].append((left, text))
                line["score"] = min(line["score"], score)
                break
        else:
            lines.append(
                {"left": left, "top": top, "right": right, "bottom": bottom, "parts": [(left, text)], "score": score}
            )
    return [
        (
            (int(line["left"]), int(line["top"]), math.ceil(line["right"]), math.ceil(line["bottom"])),
            " ".join(text for _, text in sorted(line["parts"])),
            line["score"],
        )
        for line in lines
    ]


def _word_boxes(bgr: np.ndarray, box: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    """Split a text-line box into word boxes at column gaps wider than ``_WORD_GAP`` x text height."""
    height, width = bgr.shape[:2]
    left, top, right, bottom = max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3])
    crop = bgr[top:bottom, left:right].astype(np.int32)
    if crop.size == 0:
        return []
    border = np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]])
    mask = np.abs(crop - np.median(border, axis=0)).sum(axis=2) > 120
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return []
    text_height = rows[-1] - rows[0] + 1
    runs = [[int(columns[0]), int(columns[0])]]
    for column in columns[1:]:
        if column - runs[-1][1] - 1 > _WORD_GAP * text_height:
            runs.append([int(column), int(column)])
        else:
            runs[-1][1] = int(column)
    return [(left + a, top + int(rows[0]), left + b + 1, top + int(rows[-1]) + 1) for a, b in runs]


def _is_text(text: str) -> bool:
    visible = [c for c in text if not c.isspace()]
    alnum = sum(c.isalnum() for c in visible)
    return alnum >= 2 and alnum >= 0.6 * len(visible)


_OCR = _Ocr()


# ---------------------------------------------------------------------------------------------------- fact sheet
def compute_fact_sheet(image: Image.Image | bytes, *, ocr: bool = True) -> FactSheet:
    """Measure colours, shapes, layout and (optionally) text of an image.

    Args:
        image: A Pillow image or encoded image bytes.
        ocr: Read text with RapidOCR (about 0.3-0.6 s per image on 2 cores); text regions are then excluded
            from the shape list.

    Returns:
        The fact sheet.
    """
    import cv2

    if isinstance(image, bytes | bytearray):
        image = Image.open(io.BytesIO(image))
    rgb_image = image.convert("RGB")
    width, height = rgb_image.size
    scale = min(1.0, _ANALYSIS_MAX_SIDE / max(width, height))
    small = rgb_image if scale == 1.0 else rgb_image.resize((round(width * scale), round(height * scale)))
    rgb = np.asarray(small)
    h, w = rgb.shape[:2]
    lab = _lab(rgb).reshape(h, w, 3)

    pixels = lab.reshape(-1, 3).astype(np.float64)
    step = max(1, len(pixels) // _KMEANS_SAMPLE)
    centres = _kmeans(pixels[::step], _KMEANS_K)
    assignment = np.argmin(((pixels[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2), axis=1).reshape(h, w)
    centre_names = [_name_lab(c) for c in centres]
    names = sorted(set(centre_names))
    name_index = np.asarray([names.index(n) for n in centre_names])
    label_map = name_index[assignment]
    shares = np.bincount(label_map.ravel(), minlength=len(names)) / label_map.size
    palette = tuple(
        (names[i], float(shares[i])) for i in np.argsort(-shares, kind="stable") if shares[i] >= _MIN_PALETTE_SHARE
    )
    frame = np.concatenate([label_map[0], label_map[-1], label_map[:, 0], label_map[:, -1]])
    background = names[int(np.argmax(np.bincount(frame, minlength=len(names))))]
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    brightness = float(hsv[:, :, 2].mean() / 255)
    saturation = float(hsv[:, :, 1].mean() / 255)

    texts: list[TextFact] = []
    text_boxes: list[tuple[int, int, int, int]] = []
    if ocr:
        bgr = np.ascontiguousarray(np.asarray(rgb_image)[:, :, ::-1])
        for box, text, score in _OCR.read(bgr):
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            position, _ = _grid(cx, cy, width, height)
            texts.append(TextFact(text=text, position=position, confidence=round(score, 2), box=box))
            text_boxes.append(box)

    shapes: list[ShapeFact] = []
    kernel = np.ones((3, 3), np.uint8)
    min_area = max(12.0, _MIN_SHAPE_SHARE * h * w)
    for index, name in enumerate(names):
        if name == background:
            continue
        mask = (label_map == index).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        for contour in contours:
            area = cv2.contourArea(contour)
            if area < min_area:
                continue
            x, y, bw, bh = cv2.boundingRect(contour)
            box = (int(x / scale), int(y / scale), int((x + bw) / scale), int((y + bh) / scale))
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            if any(t[0] - 2 <= cx <= t[2] + 2 and t[1] - 2 <= cy <= t[3] + 2 for t in text_boxes):
                continue
            position, corner = _grid(cx, cy, width, height)
            shapes.append(
                ShapeFact(
                    colour=name,
                    kind=_classify(contour),
                    area_pct=round(100 * area / (h * w), 1),
                    position=position,
                    corner=corner,
                    box=box,
                )
            )
    shapes.sort(key=lambda s: -s.area_pct)
    truncated = max(0, len(shapes) - _MAX_SHAPES_LISTED)
    return FactSheet(
        width=width,
        height=height,
        background=background,
        palette=palette,
        brightness=round(brightness, 2),
        saturation=round(saturation, 2),
        shapes=tuple(shapes[:_MAX_SHAPES_LISTED]),
        texts=tuple(sorted(texts, key=lambda t: (t.box[1], t.box[0]))),
        shapes_truncated=truncated,
    )


class FactSheetCache:
    """Thread-safe in-memory LRU of fact sheets keyed by image SHA-256 (and the OCR switch)."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, bool], FactSheet] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, data: bytes, *, ocr: bool = True) -> FactSheet:
        """The fact sheet of encoded image bytes, computed once per distinct image."""
        key = (hashlib.sha256(data).hexdigest(), ocr)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        sheet = compute_fact_sheet(data, ocr=ocr)
        with self._lock:
            self._items[key] = sheet
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return sheet


# ---------------------------------------------------------------------------------------------------- engine
_REWRITE_SYSTEM = (
    "You write the text description of an image for someone who cannot see it. You cannot see the image "
    "either: you are given facts measured from it by software (colours, shapes, counts, positions, text read "
    "by OCR). Use only these facts; never invent objects or details. Follow this instruction:\n{instruction}"
)


class FactSheetEngine:
    """DSPy engine that verbalizes images through fact sheets and a local text LM.

    For a request carrying images, the engine computes a fact sheet per image, then (``rewrite=True``) asks the
    text engine to rewrite it under the instruction found in the request's system prompt, together with the
    request's text fields; the answer becomes the ``description`` output field (or the first output field),
    rendered in the adapter's format. Requests without images are passed to ``text_engine`` unchanged.

    Args:
        text_engine: Engine for rewrites and text-only requests (e.g. a :class:`LlamaCppEngine`). Required
            when ``rewrite`` is true or text-only requests are expected.
        rewrite: Rewrite the fact sheet with the text LM; ``False`` returns the fact sheet itself.
        ocr: Read text in images with RapidOCR.
        output_field: The output field that receives the description.
        rewrite_max_tokens: Generation budget of a rewrite.
        include_text_fields: Give the rewrite the request's text fields (e.g. the brief or the generation
            prompt), labelled as context that does not describe the image. Small models tend to copy from it.
        cache: Fact-sheet cache (shared across engines if given).
    """

    def __init__(
        self,
        text_engine: Any | None = None,
        *,
        rewrite: bool = True,
        ocr: bool = True,
        output_field: str = "description",
        rewrite_max_tokens: int = DEFAULT_REWRITE_MAX_TOKENS,
        include_text_fields: bool = True,
        cache: FactSheetCache | None = None,
    ) -> None:
        if rewrite and text_engine is None:
            raise ValueError("rewrite=True needs a text_engine (e.g. LlamaCppEngine()); or pass rewrite=False")
        self.text_engine = text_engine
        self.rewrite = rewrite
        self.ocr = ocr
        self.output_field = output_field
        self.rewrite_max_tokens = rewrite_max_tokens
        self.include_text_fields = include_text_fields
        self.cache = cache or FactSheetCache()

    def __deepcopy__(self, memo: dict[int, Any]) -> FactSheetEngine:
        return self

    def close(self) -> None:
        """Close the wrapped text engine."""
        close = getattr(self.text_engine, "close", None)
        if callable(close):
            close()

    def dump_state(self) -> dict[str, Any]:
        """Settings for ``program.save`` (no paths, no secrets). The text engine is saved as DSPy saves a custom
        engine: ``{"class": "module:QualName", "state": its dump_state()}`` (``None`` without one or without a
        ``dump_state``)."""
        dump = getattr(self.text_engine, "dump_state", None)
        text_engine = None
        if callable(dump):
            kind = type(self.text_engine)
            text_engine = {"class": f"{kind.__module__}:{kind.__qualname__}", "state": dump()}
        return {
            "rewrite": self.rewrite,
            "ocr": self.ocr,
            "output_field": self.output_field,
            "rewrite_max_tokens": self.rewrite_max_tokens,
            "include_text_fields": self.include_text_fields,
            "text_engine": text_engine,
        }

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> FactSheetEngine:
        """Rebuild from :meth:`dump_state`, the text engine with its own class's ``load_state``.

        DSPy calls this only for a file loaded with custom engines allowed (``allow_unsafe_lm_state=True``), so the
        text engine's class is imported as DSPy imports this one. A text engine saved before classes were recorded
        (its bare state) is a :class:`LlamaCppEngine`.

        Raises:
            TypeError: The text engine's class cannot be imported or has no ``load_state``/``complete``.
        """
        text_engine = _load_text_engine(state.get("text_engine"))
        return cls(
            text_engine,
            rewrite=bool(state.get("rewrite", True)) and text_engine is not None,
            ocr=bool(state.get("ocr", True)),
            output_field=str(state.get("output_field", "description")),
            rewrite_max_tokens=int(state.get("rewrite_max_tokens", DEFAULT_REWRITE_MAX_TOKENS)),
            include_text_fields=bool(state.get("include_text_fields", True)),
        )

    def fact_sheets(self, request: Request) -> list[FactSheet]:
        """Fact sheets of the images in the request's last user message (demo images are not verbalized)."""
        message = next((m for m in reversed(request.messages) if m.role == "user"), None)
        if message is None:
            return []
        return [
            self.cache.get(_image_bytes(part), ocr=self.ocr) for part in message.parts if isinstance(part, ImagePart)
        ]

    def complete(self, request: Request) -> Response:
        """Verbalize the request's images, or pass a text-only request to the text engine."""
        sheets = self.fact_sheets(request)
        if not sheets:
            if self.text_engine is None:
                raise ValueError("FactSheetEngine got a request without images and has no text_engine")
            return self.text_engine.complete(request)
        facts = _facts_text(sheets)
        system = _system_text(request)
        mode = prompt_format.adapter_mode(system)
        fields = prompt_format.parse_output_fields(system)
        usage = Usage(input_tokens=0, output_tokens=0, total_tokens=0)
        if self.rewrite:
            description, usage = self._rewrite(request, system, facts)
        else:
            description = facts
        target = self.output_field if any(f.name == self.output_field for f in fields) else None
        if target is None and fields:
            target = fields[0].name
        values = {f.name: "" for f in fields}
        values[target or self.output_field] = description
        text = prompt_format.render(values, mode if fields else "text", fields or None)
        return Response(
            id=None, model=request.model, message=Message.assistant(text), finish_reason="stop", usage=usage
        )

    def _rewrite(self, request: Request, system: str, facts: str) -> tuple[str, Usage]:
        instruction = prompt_format.extract_instruction(system) if system else "Describe the image."
        user = next((m for m in reversed(request.messages) if m.role == "user"), None)
        user_text = "".join(p.text for p in user.parts if isinstance(p, TextPart)) if user else ""
        sections = prompt_format.parse_sections(user_text)
        image_names = {name for name, value in sections.items() if not value}
        context = [f"{name}: {value}" for name, value in sections.items() if name not in image_names and value]
        if not self.include_text_fields:
            context = []
        prompt = ""
        if context:
            prompt += (
                "Context given with the image (what was asked for; it does NOT describe the image):\n"
                + "\n".join(context)
                + "\n\n"
            )
        prompt += "Facts measured from the image (the only evidence about what the image shows):\n" + facts
        prompt += (
            "\n\nWrite the description of the image now, following the instruction. Use only the measured facts. "
            "Reply with the description only."
        )
        rewrite_request = Request(
            model=request.model,
            system=_REWRITE_SYSTEM.format(instruction=instruction),
            messages=(Message.user(prompt),),
            config=_rewrite_config(request, self.rewrite_max_tokens),
        )
        response = self.text_engine.complete(rewrite_request)
        text = _clean_rewrite(response.message.text or "", response.finish_reason)
        return text or facts, response.usage


def _load_text_engine(saved: Any) -> Any:
    """The text engine saved by :meth:`FactSheetEngine.dump_state` (``None`` when none was saved)."""
    if not saved:
        return None
    if not isinstance(saved, Mapping):
        raise TypeError(f"field 'text_engine': expected an object, got {type(saved).__name__}")
    from blpo_dspy.engines.llamacpp import LlamaCppEngine

    if "class" not in saved:  # saved before classes were recorded: always a llama.cpp engine then
        return LlamaCppEngine.load_state(saved)
    path = str(saved["class"])
    module_name, _, qualname = path.partition(":")
    try:
        kind: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            kind = getattr(kind, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise TypeError(f"field 'text_engine.class': '{path}' cannot be imported: {exc}") from exc
    load = getattr(kind, "load_state", None)
    if not callable(load) or not callable(getattr(kind, "complete", None)):
        raise TypeError(f"field 'text_engine.class': '{path}' has no load_state(state) classmethod or no complete()")
    state = saved.get("state") or {}
    if not isinstance(state, Mapping):
        raise TypeError(f"field 'text_engine.state': expected an object, got {type(state).__name__}")
    return load(state)


def _rewrite_config(request: Request, max_tokens: int) -> Any:
    from dataclasses import replace

    return replace(request.config, max_tokens=max_tokens, response_format=None, stop=())


def _clean_rewrite(text: str, finish_reason: str) -> str:
    """Strip a leading label, drop repeated sentences (greedy loops) and a sentence cut off by max_tokens."""
    text = re.sub(r"^(description|answer)\s*:\s*", "", text.strip(), flags=re.IGNORECASE)
    sentences = re.split(r"(?<=[.!?])\s+", text)
    if finish_reason == "length" and len(sentences) > 1 and not re.search(r"[.!?][\"')]?$", sentences[-1]):
        sentences = sentences[:-1]
    kept: list[str] = []
    seen: set[str] = set()
    for sentence in sentences:
        key = re.sub(r"\W+", " ", sentence.lower()).strip()
        if key and key not in seen:
            seen.add(key)
            kept.append(sentence)
    return " ".join(kept).strip()


def _image_bytes(part: ImagePart) -> bytes:
    try:
        return part.bytes
    except ValueError as exc:
        where = part.url or part.file_id or "an image reference"
        raise UnsupportedFeatureError(
            f"the fact-sheet verbalizer works offline and cannot fetch {str(where)[:80]!r}; pass the image as a "
            "file (dspy.Image.from_path) or as bytes",
            feature="remote image",
        ) from exc


def _facts_text(sheets: list[FactSheet]) -> str:
    if len(sheets) == 1:
        return sheets[0].render()
    return "\n\n".join(f"Image {i}:\n{sheet.render()}" for i, sheet in enumerate(sheets, start=1))


def _system_text(request: Request) -> str:
    system = request.system
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "".join(p.text for p in system if isinstance(p, TextPart))


# ---------------------------------------------------------------------------------------------------- factory
def factsheet_lm(
    text_lm: dspy.LM | None = None,
    *,
    rewrite: bool = True,
    ocr: bool = True,
    rewrite_max_tokens: int = DEFAULT_REWRITE_MAX_TOKENS,
) -> dspy.LM:
    """A ``dspy.LM`` for the verbalizer role on the offline stack (fact sheet + local text LM rewrite).

    It answers text-only requests with the text LM too, so it can serve every role. It sees colours, shapes,
    counts, layout and text only (:data:`FACTSHEET_LIMITATIONS`).

    Args:
        text_lm: A ``dspy.LM`` with a custom engine (default: :func:`blpo_dspy.engines.local_lm`).
        rewrite: Rewrite the fact sheet under the verbalizer instruction (``False``: fact sheet only, fast).
        ocr: Read text with RapidOCR.
        rewrite_max_tokens: Generation budget of a rewrite.
    """
    text_engine = None
    if rewrite or text_lm is not None:
        if text_lm is None:
            from blpo_dspy.engines.llamacpp import local_lm

            text_lm = local_lm()
        text_engine = text_lm.engine
        if isinstance(text_engine, str):
            raise ValueError("factsheet_lm needs a dspy.LM with a custom engine object (e.g. local_lm())")
    engine = FactSheetEngine(text_engine, rewrite=rewrite, ocr=ocr, rewrite_max_tokens=rewrite_max_tokens)
    name = text_lm.model.split("/", 1)[-1] if text_lm is not None else "none"
    return dspy.LM(f"factsheet/{name}", engine=engine, cache=False, temperature=0.0)
