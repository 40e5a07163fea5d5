"""Demo images: simple shapes on a blank background, with captions that describe them.

Each image holds one to three shapes of one kind and colour, small or large, placed in one region
(a corner or the centre). The caption names all five attributes, e.g. "two large red circles in the
top left". Most patches are blank: genuinely low-information vision tokens, the case null experts
are for. Everything is a pure function of (seed, index), so a dataset is reproducible anywhere.
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
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        colour = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif s.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                         fill=colour)
    return img


def sample(seed: int, index: int, side: int) -> tuple[bytes, str]:
    """(PNG bytes, caption) of sample `index` of the dataset with this seed."""
    s = scene(seed, index)
    buf = io.BytesIO()
    render(s, side, seed, index).save(buf, format="PNG")
    return buf.getvalue(), s.caption


def vocabulary_text() -> list[str]:
    """Every word a caption can use, so that a tokenizer trained on captions covers them all."""
    words = list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(SIZES) + list(COUNTS)
    return words + [r for r in REGIONS] + ["in the"]
