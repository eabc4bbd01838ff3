"""Procedural image-caption data: one coloured shape on a plain background, drawn from a seed.

Every sample is a ``Scene`` (shape, colour, size, position, background) rendered to a
``[3, 32, 32]`` float image in ``[-1, 1]`` and captioned as
``"a small red circle at the top left on a black background"``. Nothing is downloaded: a
``torch.Generator`` seed fixes the whole stream, so training is reproducible.

The same tables drive :func:`read_scene`, which reads colour, shape and position back from
pixels; the prompt-following check compares what it reads with what the caption asked for.
"""

from __future__ import annotations

import dataclasses
import math

import torch

IMAGE_SIZE = 32

SHAPES = ("circle", "square", "triangle")
COLORS = {  # name -> RGB in [0, 1]; chosen far apart from each other and from the backgrounds
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.50, 0.50, 0.50), "white": (0.95, 0.95, 0.95)}
SIZES = {"small": 5.0, "large": 8.5}  # half-extent in pixels
POSITIONS = {  # name -> (row, col) of the shape's centre as a fraction of the image side
    "top left": (0.28, 0.28),
    "top right": (0.28, 0.72),
    "bottom left": (0.72, 0.28),
    "bottom right": (0.72, 0.72),
    "center": (0.50, 0.50),
}
JITTER_PX = 1.5  # centre jitter, small enough that positions never overlap

VOCAB = tuple(
    sorted(
        {"a", "at", "in", "the", "on", "background"}
        | set(SHAPES)
        | set(COLORS)
        | set(BACKGROUNDS)
        | set(SIZES)
        | {w for p in POSITIONS for w in p.split()}
    )
)


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"



def random_scene(generator: torch.Generator) -> Scene:
    def pick(options):
        options = list(options)
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    return Scene(pick(SHAPES), pick(COLORS), pick(SIZES), pick(POSITIONS), pick(BACKGROUNDS))


def parse_caption(caption: str) -> dict[str, str | None]:
    """The attributes a caption names (``None`` where it names none), e.g. for a user prompt."""
    text = " " + " ".join(caption.lower().replace(",", " ").split()) + " "
    found: dict[str, str | None] = {}
    for key, table in (("shape", SHAPES), ("color", COLORS), ("size", SIZES)):
        found[key] = next((name for name in table if f" {name} " in text), None)
    found["position"] = next((p for p in POSITIONS if f" {p} " in text), None)
    found["background"] = next((b for b in BACKGROUNDS if f" {b} background" in text), None)
    return found


def _mask(shape: str, cy: float, cx: float, r: float, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1], ``[size, size]``: 4x4 supersampling per pixel."""
    ss = 4
    coords = (torch.arange(size * ss, dtype=torch.float32) + 0.5) / ss
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dy, dx = y - cy, x - cx
    if shape == "circle":
        inside = dy * dy + dx * dx <= r * r
    elif shape == "square":
        s = r * math.sqrt(math.pi) / 2  # same area as the circle of radius r
        inside = (dy.abs() <= s) & (dx.abs() <= s)
    elif shape == "triangle":  # upright isosceles, apex up, base at the bottom
        h = r * 1.9
        top, bottom = cy - h / 2, cy + h / 2
        half_width = (y - top) / h * r * 1.15
        inside = (y >= top) & (y <= bottom) & (dx.abs() <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.float().reshape(size, ss, size, ss).mean(dim=(1, 3))


def render(scene: Scene, generator: torch.Generator | None = None) -> torch.Tensor:
    """The scene as a ``[3, 32, 32]`` image in ``[-1, 1]``; ``generator`` adds the centre jitter."""
    fy, fx = POSITIONS[scene.position]
    cy, cx = fy * IMAGE_SIZE, fx * IMAGE_SIZE
    if generator is not None:
        jy, jx = (torch.rand(2, generator=generator) * 2 - 1) * JITTER_PX
        cy, cx = cy + float(jy), cx + float(jx)
    mask = _mask(scene.shape, cy, cx, SIZES[scene.size])  # [H, W]
    fg = torch.tensor(COLORS[scene.color]).view(3, 1, 1)
    bg = torch.tensor(BACKGROUNDS[scene.background]).view(3, 1, 1)
    image = bg + (fg - bg) * mask  # [3, H, W] in [0, 1]
    return image * 2 - 1


def sample_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """``batch_size`` random scenes: images ``[B, 3, 32, 32]`` in ``[-1, 1]`` and their captions."""
    scenes = [random_scene(generator) for _ in range(batch_size)]
    images = torch.stack([render(s, generator) for s in scenes])
    return images, [s.caption for s in scenes]


def _nearest(rgb: torch.Tensor, table: dict[str, tuple[float, float, float]]) -> str:
    names = list(table)
    refs = torch.tensor([table[n] for n in names])
    return names[int(((refs - rgb) ** 2).sum(-1).argmin())]


# Shape area per r**2 (see ``_mask``: the square matches the circle's area) and how far the area
# centroid lies below the centre ``_mask`` takes, per r (an apex-up triangle's centroid sits h/6 low).
_AREA_PER_R2 = {"circle": math.pi, "square": math.pi, "triangle": 1.9 * 1.15}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.9 / 6}
_OFFSETS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # px, searched on both axes around the centroid fit


def _classify_shape(fg: torch.Tensor, my: float, mx: float) -> str:
    """The shape whose template best overlaps the foreground mask ``fg`` ([H, W] bool, centroid (my, mx) px).

    Each shape's template gets the foreground's area and centroid, then the best intersection over
    union over small centre shifts decides. Every pixel counts in proportion to its area, so a few
    stray or ragged edge pixels move the answer little (a bounding-box measure would follow them).
    """
    size = fg.shape[-1]  # images are square
    area = float(fg.sum())
    scores = {}
    for shape in SHAPES:
        r = math.sqrt(area / _AREA_PER_R2[shape])
        cy = my - _CENTROID_DROP[shape] * r
        best = 0.0
        for dy in _OFFSETS:
            for dx in _OFFSETS:
                template = _mask(shape, cy + dy, mx + dx, r, size=size) > 0.5
                union = float((template | fg).sum())
                best = max(best, float((template & fg).sum()) / union)
        scores[shape] = best
    return max(scores, key=scores.get)


def read_scene(image: torch.Tensor) -> dict[str, str | None]:
    """Read background, colour, position and shape back from a ``[3, H, W]`` image in ``[0, 1]``.

    Background: the nearest background colour to the median border pixel. Foreground: pixels far
    from it. Colour: nearest named colour to their median. Position: nearest named centre to their
    centroid. Shape: the template (circle, square, triangle of the foreground's area and centroid)
    that overlaps the foreground best, see :func:`_classify_shape`.
    """
    image = image.float().clamp(0, 1)
    _, h, w = image.shape
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)  # [3, N]
    bg_rgb = border.median(dim=1).values
    background = _nearest(bg_rgb, BACKGROUNDS)
    distance = (image - bg_rgb.view(3, 1, 1)).abs().sum(0)  # [H, W]
    fg = distance > 0.35
    result: dict[str, str | None] = {"background": background, "color": None, "position": None, "shape": None}
    if int(fg.sum()) < 6:
        return result
    result["color"] = _nearest(image[:, fg].median(dim=1).values, COLORS)
    ys, xs = torch.nonzero(fg, as_tuple=True)
    my, mx = float(ys.float().mean()) + 0.5, float(xs.float().mean()) + 0.5  # centroid, px
    cy, cx = my / h, mx / w
    result["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cy) ** 2 + (POSITIONS[p][1] - cx) ** 2)
    result["shape"] = _classify_shape(fg, my, mx)
    return result
