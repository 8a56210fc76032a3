"""SYNTHETIC compliance task: seeded Pillow renders of ad-banner-like images with a creative brief.

Each item is a 320x200 banner (background colour, a number of coloured shapes, a headline, a square "logo" in a
corner) and a brief such as::

    Background: blue. Show exactly 3 red circles. Headline: 'SUMMER SALE'. Logo: a yellow square in the
    top-right corner.

House policy, four requirements:

1. ``req_shapes``: the required shapes have the briefed colour;
2. ``req_count``: the number of required shapes is exactly the briefed count;
3. ``req_headline``: the headline is spelled exactly as briefed;
4. ``req_logo``: the logo square is in the briefed corner.

Non-compliant renders break one or more requirements (shapes in another colour, a wrong count, one letter
swapped or replaced in the headline, the logo in another corner). The binary label (task card
``compliance``) is ``yes`` when all four are met; the ordinal label (``compliance_ordinal``) is the number met,
0 to 4. Labels are class-balanced and everything is deterministic per seed (same Pillow version and font).

The data is synthetic: it exists so the embedded offline stack (fact-sheet verbalizer + small local LM) has a
task whose evidence it can actually see (colours, shapes, counts, layout, text).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

Variant = Literal["binary", "ordinal"]
REQUIREMENTS: tuple[str, ...] = ("req_shapes", "req_count", "req_headline", "req_logo")
MANIFEST_COLUMNS: tuple[str, ...] = ("id", "image", "brief", "label", *REQUIREMENTS, "requirements_met")
CANVAS: tuple[int, int] = (320, 200)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (245, 215, 20),
    "green": (30, 160, 60),
    "blue": (30, 70, 200),
    "purple": (130, 50, 170),
    "pink": (240, 110, 180),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
BACKGROUNDS: tuple[str, ...] = ("blue", "green", "purple", "black", "white", "gray")
SHAPE_COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink")
SHAPES: tuple[str, ...] = ("circle", "triangle", "star")
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
HEADLINES: tuple[str, ...] = (
    "SUMMER SALE",
    "BIG DEALS",
    "NEW ARRIVALS",
    "FLASH SALE",
    "FREE GIFT",
    "BEST PRICES",
    "HOT OFFER",
    "GRAND OPENING",
    "LAST CHANCE",
    "MEGA DEAL",
    "SPRING DEALS",
    "TOP PICKS",
)
_LIGHT_BACKGROUNDS = {"white"}
_SHAPE_AREA = (72, 14, 248, 126)  # left, top, right, bottom: kept clear of the corners and the headline band
_GRID = (5, 3)
_LOGO_SIZE = 26
_LOGO_MARGIN = 10
_HEADLINE_BOX = (62, 140, 258, 192)
_HEADLINE_SIZE = 28
_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf",
    "DejaVuSans-Bold.ttf",
)


@dataclass(frozen=True)
class BannerSpec:
    """Everything about one synthetic item: the brief and what was actually drawn.

    Attributes:
        id: Item identifier.
        background: Background colour name.
        shape: Required shape kind (circle, triangle or star).
        shape_colour: Briefed shape colour.
        count: Briefed number of shapes.
        headline: Briefed headline.
        logo_colour: Colour of the logo square.
        logo_corner: Briefed logo corner.
        drawn_shape_colour: Colour the shapes were drawn in.
        drawn_count: Number of shapes drawn.
        drawn_headline: Headline as drawn.
        drawn_logo_corner: Corner the logo was drawn in.
        shape_boxes: Bounding boxes (left, top, right, bottom) of the drawn shapes.
    """

    id: str
    background: str
    shape: str
    shape_colour: str
    count: int
    headline: str
    logo_colour: str
    logo_corner: str
    drawn_shape_colour: str
    drawn_count: int
    drawn_headline: str
    drawn_logo_corner: str
    shape_boxes: tuple[tuple[int, int, int, int], ...]

    @property
    def brief(self) -> str:
        """The creative brief text."""
        plural = self.shape if self.count == 1 else f"{self.shape}s"
        return (
            f"Background: {self.background}. Show exactly {self.count} {self.shape_colour} {plural}. "
            f"Headline: '{self.headline}'. Logo: {_article(self.logo_colour)} {self.logo_colour} square in the "
            f"{self.logo_corner} corner."
        )

    @property
    def requirements(self) -> dict[str, bool]:
        """Which house-policy requirements the drawing meets."""
        return {
            "req_shapes": self.drawn_shape_colour == self.shape_colour,
            "req_count": self.drawn_count == self.count,
            "req_headline": self.drawn_headline == self.headline,
            "req_logo": self.drawn_logo_corner == self.logo_corner,
        }

    @property
    def requirements_met(self) -> int:
        """Number of requirements met (0 to 4)."""
        return sum(self.requirements.values())

    def label(self, variant: Variant) -> str | int:
        """The label under ``variant``: ``"yes"``/``"no"`` (binary) or the number met (ordinal)."""
        if variant == "binary":
            return "yes" if self.requirements_met == len(REQUIREMENTS) else "no"
        return self.requirements_met


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _balanced_targets(n: int, variant: Variant, rng: random.Random) -> list[int]:
    """Number of requirements to meet per item, class-balanced for the variant, shuffled."""
    if variant == "binary":
        positives = (n + 1) // 2
        # Non-compliant items mostly break one requirement (the hard cases), sometimes more.
        negatives = [rng.choices((3, 2, 1, 0), weights=(6, 3, 2, 1))[0] for _ in range(n - positives)]
        targets = [4] * positives + negatives
    elif variant == "ordinal":
        targets = [i % 5 for i in range(n)]
    else:
        raise ValueError(f"variant must be 'binary' or 'ordinal', got {variant!r}")
    rng.shuffle(targets)
    return targets


def misspell(word: str, rng: random.Random) -> str:
    """A one-edit misspelling: two adjacent different letters swapped, else one letter replaced."""
    swaps = [i for i in range(len(word) - 1) if word[i].isalpha() and word[i + 1].isalpha() and word[i] != word[i + 1]]
    if swaps:
        i = rng.choice(swaps)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    i = rng.choice(letters)
    replacement = rng.choice([c for c in "ABDEFGHKMNPRSTUWY" if c != word[i].upper()])
    return word[:i] + replacement + word[i + 1 :]


def make_spec(item_id: str, met_target: int, rng: random.Random) -> BannerSpec:
    """Draw a random brief and a rendering that meets exactly ``met_target`` of the four requirements."""
    background = rng.choice(BACKGROUNDS)
    shape = rng.choice(SHAPES)
    free = [c for c in SHAPE_COLOURS if c != background]
    shape_colour, wrong_colour, logo_colour = rng.sample(free, 3)
    count = rng.randint(1, 5)
    headline = rng.choice(HEADLINES)
    logo_corner = rng.choice(CORNERS)
    met = set(rng.sample(REQUIREMENTS, met_target))

    drawn_count = count
    if "req_count" not in met:
        options = [c for c in range(max(1, count - 2), min(6, count + 2) + 1) if c != count]
        drawn_count = rng.choice(options)
    drawn_corner = logo_corner if "req_logo" in met else rng.choice([c for c in CORNERS if c != logo_corner])
    spec = BannerSpec(
        id=item_id,
        background=background,
        shape=shape,
        shape_colour=shape_colour,
        count=count,
        headline=headline,
        logo_colour=logo_colour,
        logo_corner=logo_corner,
        drawn_shape_colour=shape_colour if "req_shapes" in met else wrong_colour,
        drawn_count=drawn_count,
        drawn_headline=headline if "req_headline" in met else misspell(headline, rng),
        drawn_logo_corner=drawn_corner,
        shape_boxes=_shape_boxes(drawn_count, rng),
    )
    assert spec.requirements_met == met_target
    return spec


def _shape_boxes(count: int, rng: random.Random) -> tuple[tuple[int, int, int, int], ...]:
    left, top, right, bottom = _SHAPE_AREA
    cols, rows = _GRID
    cell_w, cell_h = (right - left) / cols, (bottom - top) / rows
    cells = rng.sample(range(cols * rows), count)
    boxes = []
    for cell in sorted(cells):
        col, row = cell % cols, cell // cols
        radius = rng.randint(12, 15)
        cx = int(left + (col + 0.5) * cell_w) + rng.randint(-2, 2)
        cy = int(top + (row + 0.5) * cell_h) + rng.randint(-2, 2)
        boxes.append((cx - radius, cy - radius, cx + radius, cy + radius))
    return tuple(boxes)


def headline_font(size: int = _HEADLINE_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A large clear font: DejaVu Sans Bold when installed, else Pillow's built-in scalable font."""
    for candidate in _FONT_CANDIDATES:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def render_banner(spec: BannerSpec) -> Image.Image:
    """Render a synthetic banner as an RGB Pillow image (no anti-aliasing on shapes)."""
    image = Image.new("RGB", CANVAS, COLOURS[spec.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[spec.drawn_shape_colour]
    for box in spec.shape_boxes:
        _draw_shape(draw, spec.shape, box, fill)
    _draw_logo(draw, spec.drawn_logo_corner, COLOURS[spec.logo_colour])
    _draw_headline(draw, spec.drawn_headline, spec.background)
    return image


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    left, top, right, bottom = box
    cx, cy, r = (left + right) / 2, (top + bottom) / 2, (right - left) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy + r * 0.15, r * 1.1), 3, rotation=0, fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r * 1.1 if k % 2 == 0 else r * 0.45
            angle = -90 + 36 * k
            points.append((cx + radius * math.cos(math.radians(angle)), cy + radius * math.sin(math.radians(angle))))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_logo(draw: ImageDraw.ImageDraw, corner: str, fill: tuple[int, int, int]) -> None:
    width, height = CANVAS
    x = _LOGO_MARGIN if corner.endswith("left") else width - _LOGO_MARGIN - _LOGO_SIZE
    y = _LOGO_MARGIN if corner.startswith("top") else height - _LOGO_MARGIN - _LOGO_SIZE
    draw.rectangle((x, y, x + _LOGO_SIZE - 1, y + _LOGO_SIZE - 1), fill=fill)


def _draw_headline(draw: ImageDraw.ImageDraw, text: str, background: str) -> None:
    left, top, right, bottom = _HEADLINE_BOX
    size = _HEADLINE_SIZE
    font = headline_font(size)
    while size > 12:
        box = draw.textbbox((0, 0), text, font=font)
        if box[2] - box[0] <= right - left and box[3] - box[1] <= bottom - top:
            break
        size -= 2
        font = headline_font(size)
    box = draw.textbbox((0, 0), text, font=font)
    x = (left + right - (box[2] - box[0])) / 2 - box[0]
    y = (top + bottom - (box[3] - box[1])) / 2 - box[1]
    colour = COLOURS["black"] if background in _LIGHT_BACKGROUNDS else COLOURS["white"]
    draw.text((x, y), text, font=font, fill=colour)


def generate_specs(n: int, *, variant: Variant = "binary", seed: int = 0) -> list[BannerSpec]:
    """The ``n`` class-balanced item specs of a synthetic dataset (deterministic per seed).

    Args:
        n: Number of items (at least 2 for binary, 5 for ordinal to cover every label).
        variant: ``"binary"`` (yes/no) or ``"ordinal"`` (0..4 requirements met).
        seed: Random seed.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(f"blpo-synthetic-compliance-{variant}-{seed}")
    targets = _balanced_targets(n, variant, rng)
    width = max(4, len(str(n - 1)))
    return [
        make_spec(f"synthetic-{variant}-s{seed}-{i:0{width}d}", target, random.Random(f"{seed}-{variant}-{i}"))
        for i, target in enumerate(targets)
    ]


def make_compliance_dataset(out_dir: str | Path, n: int, *, variant: Variant = "binary", seed: int = 0) -> Path:
    """Write a SYNTHETIC compliance dataset: ``images/*.png``, ``manifest.csv`` and ``specs.jsonl``.

    ``manifest.csv`` has the columns ``id, image, brief, label`` (image paths relative to the manifest folder,
    as the project's manifest loader expects) plus the per-requirement truth columns ``req_shapes, req_count,
    req_headline, req_logo`` (1/0) and ``requirements_met``. ``specs.jsonl`` holds what was drawn.

    Args:
        out_dir: Output folder (created).
        n: Number of items.
        variant: ``"binary"`` for the ``compliance`` task card, ``"ordinal"`` for ``compliance_ordinal``.
        seed: Random seed; the same seed gives the same files.

    Returns:
        Path of ``manifest.csv``.
    """
    specs = generate_specs(n, variant=variant, seed=seed)
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with (
        manifest.open("w", newline="", encoding="utf-8") as handle,
        (out / "specs.jsonl").open("w", encoding="utf-8") as specs_file,
    ):
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for spec in specs:
            name = f"images/{spec.id}.png"
            render_banner(spec).save(out / name, format="PNG")
            row: dict[str, object] = {"id": spec.id, "image": name, "brief": spec.brief, "label": spec.label(variant)}
            row.update({key: int(value) for key, value in spec.requirements.items()})
            row["requirements_met"] = spec.requirements_met
            writer.writerow(row)
            specs_file.write(json.dumps(asdict(spec)) + "\n")
    logger.info("wrote a SYNTHETIC %s compliance dataset of %d items (seed %d)", variant, n, seed)
    return manifest
