"""Which cells of a view an entry covers, for the ``span`` and ``fill`` label policies (:mod:`dvsft.align.aligner`).

- ``span``: a word's sub-tokens get x ranges from its characters' positions (the renderer's glyph advances in
  the word's ``advances``, else the font's character widths scaled into the box, else equal widths); each cell of
  the baseline row the ink overlaps takes the sub-token that covers most of the cell's width.
- ``fill``: a cell is covered when at least half its area lies inside the region's polygon (else its box).
"""

from __future__ import annotations

import math
from typing import Any

from dvsft.models.geometry import View

Box = tuple[float, float, float, float]
Ring = tuple[tuple[float, float], ...]
Piece = tuple[int | None, int | None, float, float]  # (token id, sub-token index, x0, x1): a sub-token's ink
Claim = tuple[int, int | None, int | None]  # (local token index, token id, sub-token index)
FONT_FACE = "DejaVuSans"  # character widths of OCR words (no advances) come from this face
EPS = 1e-6


def char_edges(word: dict[str, Any], text: str, box: Box) -> list[float]:
    """``len(text) + 1`` x positions: where each character of ``text`` starts, then where the last ends.

    A rendered word's ``advances`` (page pixels) when they fit ``text``; otherwise the box's width split in
    proportion to the characters' advance widths in :data:`FONT_FACE`, or evenly where the face lacks a glyph.
    """
    adv = word.get("advances")
    if (
        isinstance(adv, list)
        and len(adv) == len(text) + 1
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in adv)
        and all(a <= b for a, b in zip(adv, adv[1:], strict=False))
    ):
        return [float(v) for v in adv]
    prefix = _font_prefix(text)
    total = prefix[-1]
    x0, x1 = box[0], box[2]
    return [x0 + (x1 - x0) * p / total for p in prefix]


def _font_prefix(text: str) -> list[float]:
    """Prefix sums of the characters' advance widths in :data:`FONT_FACE` (character counts where it has no glyph)."""
    from dvsft.sources import fonts
    from dvsft.sources.render import advance_prefix

    if text and fonts.supports(FONT_FACE, text):
        prefix = advance_prefix(FONT_FACE, 32, text)
        if prefix[-1] > 0:
            return prefix
    return [float(i) for i in range(len(text) + 1)] if text else [0.0, 1.0]


def word_pieces(edges: list[float], subtokens: list[tuple[int | None, int | None, int, int]], box: Box) -> list[Piece]:
    """The ink x range of each sub-token ``(token id, index, first char, end char)``, clipped to the box; the
    first piece starts at the box's left edge and the last ends at its right edge (all ink belongs to a piece)."""
    x0, x1 = box[0], box[2]
    pieces: list[Piece] = []
    for tid, index, a, b in subtokens:
        lo, hi = max(x0, edges[a]), min(x1, edges[b])
        if hi > lo:
            pieces.append((tid, index, lo, hi))
    if pieces:
        pieces[0] = (*pieces[0][:2], x0, pieces[0][3])
        pieces[-1] = (*pieces[-1][:3], x1)
    return pieces


def row_cells(view: View, row: int, box: Box, pieces: list[Piece]) -> list[Claim]:
    """Cells of ``row`` the box's x range overlaps, each with the piece covering most of it (the first on a tie)."""
    x0, x1 = box[0], box[2]
    out: list[Claim] = []
    seen: set[int] = set()
    for lo, hi, c in view.x_cuts:
        if min(hi, x1) - max(lo, x0) <= EPS:
            continue
        best, share = None, EPS
        for piece in pieces:
            overlap = min(hi, piece[3]) - max(lo, piece[2])
            if overlap > share:
                best, share = piece, overlap
        k = row * view.cols + c
        if best is not None and k not in seen:
            seen.add(k)
            out.append((k, best[0], best[1]))
    return out


def fill_cells(view: View, box: Box, rings: tuple[Ring, ...] = ()) -> list[int]:
    """Local indices of the cells with at least half their area inside ``rings`` (a polygon), else ``box``."""
    x0, y0, x1, y1 = _bounds(rings) if rings else box
    cols = sorted({c for lo, hi, c in view.x_cuts if hi > x0 and lo < x1})
    rows = sorted({r for lo, hi, r in view.y_cuts if hi > y0 and lo < y1})
    out = []
    for r in rows:
        for c in cols:
            k = r * view.cols + c
            cell = view.token_box(k)
            area = (cell[2] - cell[0]) * (cell[3] - cell[1])
            if area <= 0:
                continue
            inside = sum(clipped_area(ring, cell) for ring in rings) if rings else _overlap(box, cell)
            if inside >= 0.5 * area * (1 - 1e-9):
                out.append(k)
    return out


def _bounds(rings: tuple[Ring, ...]) -> Box:
    xs = [x for ring in rings for x, _ in ring]
    ys = [y for ring in rings for _, y in ring]
    return min(xs), min(ys), max(xs), max(ys)


def _overlap(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def clipped_area(ring: Ring, rect: Box) -> float:
    """Area of the polygon ``ring`` inside the rectangle ``rect`` (Sutherland-Hodgman clipping, shoelace area)."""
    x0, y0, x1, y1 = rect
    points = list(ring)
    for inside, cross in (
        (lambda p: p[0] >= x0, lambda p, q: _at_x(p, q, x0)),
        (lambda p: p[0] <= x1, lambda p, q: _at_x(p, q, x1)),
        (lambda p: p[1] >= y0, lambda p, q: _at_y(p, q, y0)),
        (lambda p: p[1] <= y1, lambda p, q: _at_y(p, q, y1)),
    ):
        points = _clip(points, inside, cross)
        if not points:
            return 0.0
    return abs(sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(points, points[1:] + points[:1], strict=True))) / 2


def _clip(points: list, inside, cross) -> list:
    """One Sutherland-Hodgman pass: the part of the polygon ``points`` on the inner side of one edge."""
    out = []
    for i, q in enumerate(points):
        p = points[i - 1]
        if inside(q):
            if not inside(p):
                out.append(cross(p, q))
            out.append(q)
        elif inside(p):
            out.append(cross(p, q))
    return out


def _at_x(p: tuple[float, float], q: tuple[float, float], x: float) -> tuple[float, float]:
    t = (x - p[0]) / (q[0] - p[0])
    return x, p[1] + t * (q[1] - p[1])


def _at_y(p: tuple[float, float], q: tuple[float, float], y: float) -> tuple[float, float]:
    t = (y - p[1]) / (q[1] - p[1])
    return p[0] + t * (q[0] - p[0]), y


def polygon_rings(value: Any) -> tuple[Ring, ...] | None:
    """A record's ``polygon`` as rings of points: COCO's format (a list of rings, each a flat ``[x1, y1, x2, y2,
    ...]`` list of at least 3 points) or one flat ring; None when it is neither or holds a non-finite number."""
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    rings = []
    for ring in value:
        if not isinstance(ring, list) or len(ring) < 6 or len(ring) % 2 or not all(_is_number(v) for v in ring):
            return None
        rings.append(tuple((float(ring[i]), float(ring[i + 1])) for i in range(0, len(ring), 2)))
    return tuple(rings)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
