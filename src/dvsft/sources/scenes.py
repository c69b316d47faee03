"""Synthetic scenes: coloured shapes at random places on the visual-token grid, with questions about what is where.

A scene is a page of ``cols x rows`` token cells (the family's cell: 32 px for Qwen3-VL), cut into named
areas (``top left``, ``top right``, ...: a grid of ``areas``). At most one object sits in an area, at a random
size and place inside it, so objects never overlap and "what is in the top left?" has one answer. An object
is a shape (circle, square, triangle, star, diamond, cross) in a colour, named like ``red circle``.

Held-out combinations: :func:`held_out_combos` keeps one shape per colour (the diagonal of the colour x shape
table) out of every training scene; the ``unseen`` split asks about exactly those objects, so answering needs
colour and shape recognised apart, not a memorised picture.

Records are word records whose ``words`` are the objects' regions (``kind: object``, the shape's outline as a
``polygon`` in COCO's format, one ring of flat ``x, y`` values, and its bounding ``box``) for the ``fill`` label
policy. A region's label is the first sub-token of its text, and the first sub-token of ``red circle`` is
`` red``, which says nothing of the shape; so a region's text is one attribute word (``labels``).
``labels=("shape",)`` (the default) labels the shape, what a visual token cannot read from one pixel's colour;
``("colour", "shape")`` writes two regions on the same outline (for ``multi_label``, where a cell keeps both
labels). Each record asks one question, either ``What is in the {area}?`` (answer: the object's name) or
``Where is the {name}?`` (answer: the area).
Everything is drawn from ``random.Random(seed)``: the same seed gives the same images and records.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from dvsft.models.families import DEFAULT_FAMILY
from dvsft.models.geometry import grid_rule

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 60, 175),
    "orange": (240, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SPLITS = ("train", "seen", "unseen")  # training scenes; held-out scenes of seen / of held-out combinations
ROW_NAMES = {1: ("",), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
COL_NAMES = {1: ("",), 2: ("left", "right"), 3: ("left", "centre", "right")}


@dataclass(frozen=True)
class SceneSpec:
    """What scenes look like: page size in token cells, named areas, vocabulary, objects per scene, labels."""

    cols: int = 6
    rows: int = 6
    areas: tuple[int, int] = (2, 2)  # (rows, cols) of named areas, each 1..3
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    min_objects: int = 2
    max_objects: int = 3
    min_size: float = 0.75  # object size as a share of its area's shorter side
    max_size: float = 0.95
    labels: tuple[str, ...] = ("shape",)  # region texts per object: "shape" and/or "colour"
    family: str = DEFAULT_FAMILY

    def __post_init__(self) -> None:
        ar, ac = self.areas
        if ar not in ROW_NAMES or ac not in COL_NAMES:
            raise ValueError(f"areas must be 1..3 rows and columns, got {self.areas}")
        if not 1 <= self.min_objects <= self.max_objects <= ar * ac:
            raise ValueError(f"objects per scene must satisfy 1 <= {self.min_objects} <= {self.max_objects} <= areas")
        if set(self.colours) - set(COLOURS) or set(self.shapes) - set(SHAPES):
            raise ValueError(f"colours among {', '.join(COLOURS)} and shapes among {', '.join(SHAPES)}")
        if not self.labels or set(self.labels) - {"colour", "shape"}:
            raise ValueError(f"labels must be 'shape' and/or 'colour', got {self.labels}")

    @property
    def cell(self) -> int:
        return grid_rule(self.family).cell

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels: whole token cells."""
        return self.cols * self.cell, self.rows * self.cell


def area_names(rows: int, cols: int) -> list[str]:
    """Names of a ``rows x cols`` grid of areas, row-major: ``top left``, ``top right``, ... (3 x 3: ``centre``)."""
    names = []
    for r in ROW_NAMES[rows]:
        for c in COL_NAMES[cols]:
            name = " ".join(p for p in (r, c) if p)
            names.append("centre" if name == "middle centre" else name or "centre")
    return names


def held_out_combos(colours: tuple[str, ...], shapes: tuple[str, ...]) -> set[tuple[str, str]]:
    """The (colour, shape) pairs no training scene shows: colour ``i`` with shape ``i mod len(shapes)``."""
    return {(c, shapes[i % len(shapes)]) for i, c in enumerate(colours)}


def seen_combos(spec: SceneSpec) -> list[tuple[str, str]]:
    unseen = held_out_combos(spec.colours, spec.shapes)
    return [(c, s) for c in spec.colours for s in spec.shapes if (c, s) not in unseen]


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: colour, shape, the area it sits in, its outline (page pixels) and bounding box."""

    colour: str
    shape: str
    area: str
    polygon: tuple[tuple[float, float], ...]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> list[float]:
        xs, ys = [p[0] for p in self.polygon], [p[1] for p in self.polygon]
        return [min(xs), min(ys), max(xs), max(ys)]

    def regions(self, labels: tuple[str, ...]) -> list[dict[str, Any]]:
        """The object's regions, one per label attribute, on the same outline."""
        texts = {"colour": self.colour, "shape": self.shape}
        return [
            {"text": texts[a], "box": self.box, "polygon": [[v for p in self.polygon for v in p]], "kind": "object"}
            for a in labels
        ]


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The shape's polygon around centre (cx, cy), ``r`` half its size; rounded to 0.01 px."""
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)]
    elif shape == "square":
        pts = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]
    elif shape == "star":
        pts = []
        for k in range(10):
            a, rad = -math.pi / 2 + math.pi * k / 5, 1.0 if k % 2 == 0 else 0.5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        t = 0.35
        pts = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(round(cx + r * x, 2), round(cy + r * y, 2)) for x, y in pts]


def place_objects(spec: SceneSpec, rng: random.Random, combos: list[tuple[str, str]]) -> list[SceneObject]:
    """A scene's objects: distinct names drawn from ``combos`` (its first one always included), one per area,
    each at a random size and place inside its area."""
    ar, ac = spec.areas
    width, height = spec.size
    aw, ah = width / ac, height / ar
    n = rng.randint(spec.min_objects, min(spec.max_objects, len(combos)))
    names = [combos[0], *rng.sample(combos[1:], n - 1)]
    areas = rng.sample(range(ar * ac), n)
    labels = area_names(ar, ac)
    objects = []
    for (colour, shape), a in zip(names, areas, strict=True):
        side = min(aw, ah) * rng.uniform(spec.min_size, spec.max_size)
        x0 = (a % ac) * aw + rng.uniform(0, aw - side)
        y0 = (a // ac) * ah + rng.uniform(0, ah - side)
        poly = outline(shape, x0 + side / 2, y0 + side / 2, side / 2)
        objects.append(SceneObject(colour, shape, labels[a], tuple(poly)))
    return objects


def draw_scene(spec: SceneSpec, objects: list[SceneObject], rng: random.Random) -> Image.Image:
    """The scene on a light background (a random pale tint)."""
    background = tuple(rng.randint(225, 250) for _ in range(3))
    image = Image.new("RGB", spec.size, background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw.polygon(obj.polygon, fill=COLOURS[obj.colour])
    return image


def question(objects: list[SceneObject], rng: random.Random) -> tuple[str, str]:
    """(question, answer) about the scene's first object: what is in its area, or where it is."""
    target = objects[0]
    if rng.random() < 0.5:
        return f"What is in the {target.area}?", target.name
    return f"Where is the {target.name}?", target.area


@dataclass
class SceneSet:
    """Scenes of one split: records (image paths relative to the records file) and the images to write."""

    records: list[dict[str, Any]] = field(default_factory=list)
    images: dict[str, Image.Image] = field(default_factory=dict)


def make_scenes(spec: SceneSpec, n: int, split: str, seed: int, name: str | None = None) -> SceneSet:
    """``n`` scenes of ``split``: ``train`` (seen combinations only), ``seen`` (the same, for evaluation) or
    ``unseen`` (the question's object is a held-out combination; the other objects are seen ones)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    from dvsft.sources.instructions import IMAGE_PLACEHOLDER

    rng = random.Random(f"scenes:{split}:{seed}")
    seen = seen_combos(spec)
    unseen = sorted(held_out_combos(spec.colours, spec.shapes))
    out = SceneSet()
    name = name or split
    for i in range(n):
        first = rng.choice(unseen if split == "unseen" else seen)
        objects = place_objects(spec, rng, [first, *[c for c in seen if c != first]])
        q, a = question(objects, rng)
        rid = f"{name}_{i:05d}"
        rel = f"images/{rid}.png"
        out.images[rel] = draw_scene(spec, objects, rng)
        width, height = spec.size
        out.records.append(
            {
                "id": rid,
                "image": rel,
                "width": width,
                "height": height,
                "words": [region for obj in objects for region in obj.regions(spec.labels)],
                "messages": [
                    {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{q}"},
                    {"role": "assistant", "content": a},
                ],
            }
        )
    return out


def write_scenes(spec: SceneSpec, n: int, split: str, seed: int, out_dir: Path, name: str | None = None) -> Path:
    """Write ``n`` scenes of ``split`` as ``out_dir/{name}.jsonl`` and ``out_dir/images/*.png``; returns the file."""
    from dvsft.core.records import write_jsonl

    scenes = make_scenes(spec, n, split, seed, name)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for rel, image in scenes.images.items():
        image.save(out_dir / rel)
    path = out_dir / f"{name or split}.jsonl"
    write_jsonl(path, scenes.records)
    return path


def vocabulary_text(spec: SceneSpec, copies: int = 2000) -> list[str]:
    """Lines of the scenes' words, for training a tokenizer in which every colour, shape and area word is one
    token (so a region's label, its first sub-token, is the whole word)."""
    words = [*spec.colours, *spec.shapes, *area_names(*spec.areas), "What is in the", "Where is the"]
    return [" " + " ".join(words)] * copies  # each word after a space, as in a label or an answer
