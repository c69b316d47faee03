"""Alignment overlays: the token grid, word boxes and each labeled token's word, drawn over the image.

Legend: thin cyan lines = visual-token cells; green box = a word (or region) that became a label (on its
bottom-right token; under the span and fill policies on any cell it overlaps); red box = one dropped by a
filter; yellow cell = a labeled token, with its label words (``|`` between the labels of a multi-label cell)
written on a dark strip at the top of the cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from dvsft.models.geometry import Grid
from dvsft.sources import fonts

GRID = (0, 200, 255, 110)
KEPT = (40, 220, 90, 230)
DROPPED = (255, 60, 60, 230)
CELL = (255, 220, 0, 70)
STRIP = (0, 0, 0, 170)
LABEL = (255, 255, 255, 255)


def _fit_label(text: str, size: int, width: float):
    """(font, text) that fits ``width`` pixels: shrink to 6 px, then cut with an ellipsis."""
    font = fonts.load_font("DejaVuSans", size)
    while size > 6 and font.getlength(text) > width:
        size -= 1
        font = fonts.load_font("DejaVuSans", size)
    while len(text) > 1 and font.getlength(text) > width:
        text = text[:-2] + "…" if len(text) > 2 else text[:1]
    return font, text


def drawable_box(word: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """A word's box clipped to the image, or None when it cannot be drawn (no box, non-finite, inverted, outside)."""
    from dvsft.core.records import box_problem

    if box_problem(word) is not None:
        return None
    x0, y0, x1, y1 = (float(v) for v in word["box"])
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def draw_overlay(
    image: Image.Image,
    grid: Grid,
    labels: list[dict[str, Any]],
    words: list[dict[str, Any]] | None = None,
    label_policy: str = "bottom-right",
) -> Image.Image:
    """An RGB copy of ``image`` (same size) with the alignment drawn on it."""
    if image.size != (grid.width, grid.height):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]} but the grid is for {grid.width}x{grid.height}")
    base = image.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    labeled: dict[int, list[str]] = {}
    for lab in labels:
        labeled.setdefault(lab["token"], []).append(lab["text"])
    for token in labeled:
        x0, y0, x1, y1 = grid.token_box(token)
        draw.rectangle((round(x0), round(y0), round(x1) - 1, round(y1) - 1), fill=CELL)
    for col in range(grid.cols + 1):
        x = min(round(col * grid.cell / grid.scale_x), grid.width - 1)
        draw.line((x, 0, x, grid.height - 1), fill=GRID, width=1)
    for row in range(grid.rows + 1):
        y = min(round(row * grid.cell / grid.scale_y), grid.height - 1)
        draw.line((0, y, grid.width - 1, y), fill=GRID, width=1)
    for word in words or []:
        box = drawable_box(word, grid.width, grid.height)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        cells = [grid.token_at_point(max(x0, x1 - 0.5), max(y0, y1 - 0.5))]
        if label_policy != "bottom-right":
            cells = [k for k in labeled if _overlaps(grid.token_box(k), box)]
        text = str(word.get("text", "")).strip()
        colour = KEPT if any(text in labeled.get(k, ()) for k in cells) else DROPPED
        draw.rectangle(
            (round(x0), round(y0), max(round(x0), round(x1) - 1), max(round(y0), round(y1) - 1)), outline=colour
        )
    cell_w, cell_h = grid.cell / grid.scale_x, grid.cell / grid.scale_y
    size = max(6, int(cell_h * 0.3))
    for token, texts in labeled.items():
        x0, y0, _, _ = grid.token_box(token)
        font, shown = _fit_label(" | ".join(texts), size, cell_w - 2)
        top, bottom = font.getbbox(shown)[1], font.getbbox(shown)[3]
        draw.rectangle((round(x0) + 1, round(y0) + 1, round(x0 + cell_w) - 2, round(y0) + bottom + 2), fill=STRIP)
        draw.text((round(x0) + 2, round(y0) + 1 - min(top, 0)), shown, font=font, fill=LABEL)
    return Image.alpha_composite(base, layer).convert("RGB")


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def unique_name(record_id: Any, line: int, used: set[str]) -> str:
    """The overlay file name of a record: its id made file-safe, ``-line<N>`` (then a count) added when another
    record of this run already took that name (duplicate ids never overwrite each other's overlay); adds it to
    ``used``."""
    from dvsft.sources.label_to_image import safe_name

    stem = safe_name(str(record_id if record_id is not None else f"line{line}"))
    name, k = f"{stem}.png", 1
    while name in used:
        name = f"{stem}-line{line}.png" if k == 1 else f"{stem}-line{line}-{k}.png"
        k += 1
    used.add(name)
    return name


def save_overlay(
    path: str | Path,
    image: Image.Image,
    grid: Grid,
    labels: list[dict[str, Any]],
    words: list[dict[str, Any]] | None = None,
    label_policy: str = "bottom-right",
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, grid, labels, words, label_policy).save(path)
    return path
