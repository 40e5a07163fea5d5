"""Demo images: simple shapes on a blank background, with captions that describe them.

Two kinds of scene, both pure functions of (seed, index), so a dataset is reproducible anywhere:

- "single" (the demo): one to three shapes of one kind and colour, small or large, placed in one
  region (a corner or the centre). The caption names all five attributes, e.g. "two large red
  circles in the top left". Most patches are blank: genuinely low-information vision tokens, the
  case null experts are for.
- "grid" (the compute study): one to three objects in distinct cells of a 3x3 grid, each with its
  own colour, shape and size, captioned in reading order, e.g. "a small red circle at top left and
  a large blue square at centre" (up to 23 words). Every object is bound to its own attributes, so
  the caption loss falls attribute by attribute as capacity grows instead of in one jump.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
REGIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
SIZES = {"small": 0.07, "large": 0.12}  # radius as a fraction of the image side
COUNTS = ("one", "two", "three")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    region: str
    size: str
    count: int

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNTS[self.count - 1]} {self.size} {self.colour} {noun} in the {self.region}"


def scene(seed: int, index: int) -> Scene:
    rng = random.Random(f"{seed}/{index}")
    return Scene(
        colour=rng.choice(sorted(COLOURS)), shape=rng.choice(SHAPES), region=rng.choice(REGIONS),
        size=rng.choice(sorted(SIZES)), count=rng.randint(1, 3),
    )


def render(s: Scene, side: int, seed: int, index: int) -> Image.Image:
    """Draws the scene; shape centres are jittered inside the scene's region."""
    rng = random.Random(f"render/{seed}/{index}")
    img = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    radius = max(2, round(SIZES[s.size] * side))
    half = side / 2
    x0 = {"left": 0.0, "right": half}.get(s.region.split()[-1], side / 4)
    y0 = {"top": 0.0, "bottom": half}.get(s.region.split()[0], side / 4)
    spots = [(0.3, 0.3), (0.7, 0.7), (0.3, 0.7), (0.7, 0.3)]
    rng.shuffle(spots)
    for fx, fy in spots[: s.count]:
        cx = x0 + (fx + rng.uniform(-0.05, 0.05)) * half
        cy = y0 + (fy + rng.uniform(-0.05, 0.05)) * half
        _draw(draw, s.shape, s.colour, cx, cy, radius)
    return img


def sample(seed: int, index: int, side: int, scenes: str = "single") -> tuple[bytes, str]:
    """(PNG bytes, caption) of sample `index` of the dataset with this seed."""
    if scenes == "grid":
        objects = grid_scene(seed, index)
        image, caption = render_grid(objects, side), grid_caption(objects)
    elif scenes == "single":
        s = scene(seed, index)
        image, caption = render(s, side, seed, index), s.caption
    else:
        raise ValueError(f"scenes={scenes!r} is not valid: expected one of {', '.join(SCENES)}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), caption


CELLS = ("top left", "top", "top right", "left", "centre", "right",
         "bottom left", "bottom", "bottom right")  # reading order


@dataclass(frozen=True)
class GridObject:
    cell: int
    colour: str
    shape: str
    size: str

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at {CELLS[self.cell]}"


def grid_scene(seed: int, index: int) -> tuple[GridObject, ...]:
    rng = random.Random(f"grid/{seed}/{index}")
    cells = sorted(rng.sample(range(len(CELLS)), rng.randint(1, 3)))
    return tuple(GridObject(cell, rng.choice(sorted(COLOURS)), rng.choice(SHAPES),
                            rng.choice(sorted(SIZES))) for cell in cells)


def grid_caption(objects: tuple[GridObject, ...]) -> str:
    return " and ".join(o.phrase for o in objects)


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float,
          radius: float) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                     fill=COLOURS[colour])


def render_grid(objects: tuple[GridObject, ...], side: int) -> Image.Image:
    """Each object centred in its cell; large ones fill most of the cell, small ones half."""
    img = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = side / 3
    for o in objects:
        row, col = divmod(o.cell, 3)
        radius = max(1.5, cell * (0.42 if o.size == "large" else 0.22))
        _draw(draw, o.shape, o.colour, (col + 0.5) * cell, (row + 0.5) * cell, radius)
    return img


SCENES = ("single", "grid")


def vocabulary_text(scenes: str = "single") -> list[str]:
    """Every word a caption can use, so that a tokenizer trained on captions covers them all."""
    words = list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(SIZES) + list(COUNTS)
    if scenes == "grid":
        return words + list(CELLS) + ["a", "at", "and"]
    return words + [r for r in REGIONS] + ["in the"]
