"""Which image region each visual token sees, exactly as the model families' processors cut it.

The geometry only: the facts of each family (patch sizes, default resolutions, tile rules, names) live in
its module under :mod:`dvsft.models.families`, which these functions ask. Every family's image is a
:class:`Layout`, a list of :class:`View` (the whole image, a tile, a crop grid, a thumbnail, a global
image), each with the region of the original image its tokens see and the offset of its tokens in the
model's image-token sequence (including newline slots that see nothing): :func:`layout_for`. A Qwen-VL
image is a layout of one :class:`GridView`, whose :class:`Grid` (:attr:`Layout.grid`, :func:`grid_for`)
is the smart-resized image cut into token cells.

Qwen-VL rule (:class:`GridRule`):

The processors resize an image with ``smart_resize`` to a multiple of the token cell
(``patch_size * merge_size`` pixels), cut it into patches, and merge ``merge_size²``
patches into one visual token. Tokens are row-major over the merged grid.

>>> from dvsft.models.families import DEFAULT_FAMILY  # qwen3-vl
>>> g = grid_for(DEFAULT_FAMILY, width=640, height=480)
>>> (g.resized_width, g.resized_height, g.rows, g.cols)
(640, 480, 15, 20)
>>> g.token_at(639, 479)
299
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dvsft.models.families import FamilySource

MAX_ASPECT_RATIO = 200

# `dvsft train`'s resolution (the paper's Table 4: 64 to 2,048 visual tokens of 32 x 32 pixels);
# `dvsft align` uses the same unless told otherwise, so inspection and training see one grid.
TRAIN_MIN_PIXELS = 32 * 32 * 64
TRAIN_MAX_PIXELS = 32 * 32 * 2048


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen-VL resize rule: sides become multiples of ``factor``, area within [min, max] pixels."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} (WxH) is not positive: both sides must be >= 1 pixel")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image size {width}x{height} (WxH) has aspect ratio {aspect:.1f}; "
            f"the Qwen-VL processors reject aspect ratios over {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class GridRule:
    """The Qwen-VL resize rule with one setting: patch and merge size, the area bounds of ``smart_resize``."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @property
    def cell(self) -> int:
        """One token's side in resized pixels."""
        return self.patch_size * self.merge_size

    def grid(self, width: int, height: int) -> Grid:
        """The token grid of a ``width`` x ``height`` image."""
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        rh, rw = smart_resize(int(height), int(width), self.cell, self.min_pixels, self.max_pixels)
        return Grid(int(width), int(height), rw, rh, self.cell, self.patch_size, self.merge_size)


@dataclass(frozen=True)
class Grid:
    """The visual-token grid of one image at one resolution setting."""

    width: int
    height: int
    resized_width: int
    resized_height: int
    cell: int
    patch_size: int
    merge_size: int

    @property
    def rows(self) -> int:
        return self.resized_height // self.cell

    @property
    def cols(self) -> int:
        return self.resized_width // self.cell

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """``image_grid_thw`` as the processor reports it (in patches, before merging)."""
        return 1, self.rows * self.merge_size, self.cols * self.merge_size

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.width

    @property
    def scale_y(self) -> float:
        return self.resized_height / self.height

    def token_at_point(self, x: float, y: float) -> int:
        """Continuous original-image coordinates -> flat token index (points on the far edge clamp inward)."""
        if not (0 <= x <= self.width and 0 <= y <= self.height):
            raise ValueError(f"point ({x}, {y}) lies outside the {self.width}x{self.height} image")
        col = min(int(x * self.scale_x // self.cell), self.cols - 1)
        row = min(int(y * self.scale_y // self.cell), self.rows - 1)
        return row * self.cols + col

    def token_at(self, x: int, y: int) -> int:
        """Original-image pixel (column ``x``, row ``y``) -> the flat index of the token that sees its centre."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise ValueError(f"pixel ({x}, {y}) lies outside the {self.width}x{self.height} image")
        return self.token_at_point(x + 0.5, y + 0.5)

    def token_box(self, k: int) -> tuple[float, float, float, float]:
        """Flat token index -> its region ``(x0, y0, x1, y1)`` in original-image pixels."""
        if not 0 <= k < self.num_tokens:
            raise ValueError(f"token {k} is outside the {self.rows}x{self.cols} grid")
        row, col = divmod(k, self.cols)
        c = self.cell
        return (
            col * c / self.scale_x,
            row * c / self.scale_y,
            (col + 1) * c / self.scale_x,
            (row + 1) * c / self.scale_y,
        )


# --------------------------------------------------------------------------- per-family view lists

Span = tuple[float, float]
Cut = tuple[float, float, int]  # (lo, hi, token row or column): original pixels [lo, hi) are seen by that index


def axis_cuts(
    spans: list[Span] | tuple[Span, ...], limit: float, owner: list[int | None] | None = None
) -> tuple[Cut, ...]:
    """Cuts of one axis: ``spans[i]`` (original pixels) seen by index ``owner[i]`` (default ``i``).

    Spans are clipped to ``[0, limit]``; empty ones and those with no owner are dropped; adjacent
    spans of the same owner merge.
    """
    cuts: list[Cut] = []
    for i, (lo, hi) in enumerate(spans):
        k = i if owner is None else owner[i]
        lo, hi = min(max(lo, 0.0), limit), min(max(hi, 0.0), limit)
        if k is None or hi <= lo:
            continue
        if cuts and cuts[-1][2] == k and abs(cuts[-1][1] - lo) < 1e-9:
            cuts[-1] = (cuts[-1][0], hi, k)
        else:
            cuts.append((lo, hi, k))
    return tuple(cuts)


def uniform_cuts(n: int, start: float, step: float, limit: float) -> tuple[Cut, ...]:
    """``n`` consecutive cells of ``step`` original pixels from ``start``, clipped to ``[0, limit]``."""
    return axis_cuts([(start + i * step, start + (i + 1) * step) for i in range(n)], limit)


def _find(cuts: tuple[Cut, ...], v: float) -> int | None:
    """The index whose cut holds ``v`` (cuts are sorted and disjoint), or None."""
    lo, hi = 0, len(cuts)
    while lo < hi:
        mid = (lo + hi) // 2
        if cuts[mid][1] <= v:
            lo = mid + 1
        else:
            hi = mid
    if lo < len(cuts) and cuts[lo][0] <= v < cuts[lo][1]:
        return cuts[lo][2]
    return None


@dataclass(frozen=True)
class View:
    """One view of an image (the whole image, a tile, a crop grid, a thumbnail, a global image).

    ``x_cuts`` / ``y_cuts`` say which token column / row sees which original-image pixels
    (``(lo, hi, index)``, sorted; pixels in no cut are seen by no token of this view, e.g. the
    strip a patch grid leaves over, or rows dropped by unpadding). Token ``(r, c)`` sits at
    position ``offset + r * row_stride + c`` of the model's image-token sequence;
    ``row_stride > cols`` when each row ends in newline tokens (LLaVA-OneVision), which see
    nothing. ``region`` is the original-image box the view's pixels show; ``crops`` the
    (rows, cols) of processor crops whose features the view joins (LLaVA-OneVision's crop grid).
    """

    kind: str
    index: int
    region: tuple[float, float, float, float]
    rows: int
    cols: int
    x_cuts: tuple[Cut, ...]
    y_cuts: tuple[Cut, ...]
    offset: int
    row_stride: int
    image_width: int
    image_height: int
    crops: tuple[int, int] = (1, 1)

    @property
    def num_tokens(self) -> int:
        """Tokens that see the image (newline slots excluded)."""
        return self.rows * self.cols

    @property
    def pixels_per_token(self) -> float:
        """Original-image pixels the view shows per token: its scale (smaller is finer)."""
        x0, y0, x1, y1 = self.region
        return (x1 - x0) * (y1 - y0) / self.num_tokens

    @property
    def num_slots(self) -> int:
        """Positions this view takes in the image-token sequence (newline slots included)."""
        return self.rows * self.row_stride

    @property
    def col_spans(self) -> tuple[Span, ...]:
        """Per token column, the hull of the original x range it sees ((0, 0) if none)."""
        return _hulls(self.x_cuts, self.cols)

    @property
    def row_spans(self) -> tuple[Span, ...]:
        """Per token row, the hull of the original y range it sees ((0, 0) if none)."""
        return _hulls(self.y_cuts, self.rows)

    @property
    def separators(self) -> tuple[int, ...]:
        """Sequence positions of this view's newline slots."""
        return tuple(
            self.offset + r * self.row_stride + c for r in range(self.rows) for c in range(self.cols, self.row_stride)
        )

    def position(self, k: int) -> int:
        """Local token index ``k`` (row-major over rows x cols) -> position in the image-token sequence."""
        if not 0 <= k < self.num_tokens:
            raise ValueError(f"token {k} is outside the {self.rows}x{self.cols} grid of {self.kind} view {self.index}")
        r, c = divmod(k, self.cols)
        return self.offset + r * self.row_stride + c

    def local(self, position: int) -> int | None:
        """Sequence position -> local token index, or None (another view's, or a newline slot)."""
        rel = position - self.offset
        if not 0 <= rel < self.num_slots:
            return None
        r, c = divmod(rel, self.row_stride)
        return r * self.cols + c if c < self.cols else None

    def local_at_point(self, x: float, y: float) -> int | None:
        """Continuous original coordinates -> local token index that sees them, or None."""
        c = _find(self.x_cuts, min(x, self.image_width - 1e-9))
        r = _find(self.y_cuts, min(y, self.image_height - 1e-9))
        if c is None or r is None:
            return None
        return r * self.cols + c

    def token_at_point(self, x: float, y: float) -> int | None:
        """Continuous original coordinates -> sequence position of the token that sees them, or None."""
        k = self.local_at_point(x, y)
        return None if k is None else self.position(k)

    def token_at(self, x: int, y: int) -> int | None:
        """Original pixel -> sequence position of this view's token that sees its centre, or None."""
        return self.token_at_point(x + 0.5, y + 0.5)

    def token_box(self, k: int) -> tuple[float, float, float, float]:
        """Local token index -> the hull of the original-image box it sees (zero area: only padding)."""
        if not 0 <= k < self.num_tokens:
            raise ValueError(f"token {k} is outside the {self.rows}x{self.cols} grid of {self.kind} view {self.index}")
        r, c = divmod(k, self.cols)
        (x0, x1), (y0, y1) = self.col_spans[c], self.row_spans[r]
        return x0, y0, x1, y1

    def taller_than(self, k: int, height: float, cells: float) -> bool:
        """Whether ``height`` original pixels exceed ``cells`` times the height local token ``k`` sees."""
        _, y0, _, y1 = self.token_box(k)
        return height > cells * (y1 - y0)


@dataclass(frozen=True)
class GridView(View):
    """The one view of a Qwen-VL image: its :class:`Grid`, whose own arithmetic finds tokens and boxes."""

    grid: Grid = field(kw_only=True)

    @classmethod
    def of(cls, grid: Grid) -> GridView:
        """The view of ``grid``'s tokens over the whole image (row-major, from sequence position 0)."""
        w, h, rows, cols = grid.width, grid.height, grid.rows, grid.cols
        return cls(
            kind="image",
            index=0,
            region=(0.0, 0.0, float(w), float(h)),
            rows=rows,
            cols=cols,
            x_cuts=uniform_cuts(cols, 0.0, w / cols, float(w)),
            y_cuts=uniform_cuts(rows, 0.0, h / rows, float(h)),
            offset=0,
            row_stride=cols,
            image_width=w,
            image_height=h,
            grid=grid,
        )

    def local_at_point(self, x: float, y: float) -> int | None:
        if not (0 <= x <= self.image_width and 0 <= y <= self.image_height):
            return None
        return self.grid.token_at_point(x, y)

    def token_box(self, k: int) -> tuple[float, float, float, float]:
        return self.grid.token_box(k)

    def taller_than(self, k: int, height: float, cells: float) -> bool:
        return height * self.grid.scale_y > cells * self.grid.cell


def _hulls(cuts: tuple[Cut, ...], n: int) -> tuple[Span, ...]:
    lo: list[float | None] = [None] * n
    hi: list[float | None] = [None] * n
    for a, b, k in cuts:
        lo[k] = a if lo[k] is None else min(lo[k], a)
        hi[k] = b if hi[k] is None else max(hi[k], b)
    return tuple((lo[i], hi[i]) if lo[i] is not None else (0.0, 0.0) for i in range(n))


def uniform_view(
    kind: str,
    index: int,
    region: tuple[float, float, float, float],
    rows: int,
    cols: int,
    offset: int,
    width: int,
    height: int,
    row_stride: int | None = None,
    cell: tuple[float, float] | None = None,
) -> View:
    """A view whose ``rows x cols`` tokens tile ``region`` (original pixels) from its top-left corner.

    ``cell`` is one token's (width, height) in original pixels; by default the tokens split the
    region evenly (a smaller cell leaves a strip on the right / bottom that no token sees).
    """
    x0, y0, x1, y1 = region
    cw, ch = cell or ((x1 - x0) / cols, (y1 - y0) / rows)
    return View(
        kind=kind,
        index=index,
        region=region,
        rows=rows,
        cols=cols,
        x_cuts=uniform_cuts(cols, x0, cw, min(x1, width)),
        y_cuts=uniform_cuts(rows, y0, ch, min(y1, height)),
        offset=offset,
        row_stride=row_stride or cols,
        image_width=width,
        image_height=height,
    )


@dataclass(frozen=True)
class Layout:
    """All views of one image for one family and setting, in the order of the image-token sequence.

    ``num_tokens`` is the number of image-token placeholders the processor writes for the image
    (what the model fills with visual features, newline slots included); ``prompt`` is the text
    that replaces one image placeholder, exactly as the family's processor expands it
    (separator and tag tokens included).
    """

    family: str
    width: int
    height: int
    views: tuple[View, ...]
    num_tokens: int
    prompt: str = ""

    @property
    def grid(self) -> Grid | None:
        """The :class:`Grid` of a one-grid layout (Qwen-VL), None for a list of views."""
        if len(self.views) == 1 and isinstance(self.views[0], GridView):
            return self.views[0].grid
        return None

    @property
    def separators(self) -> tuple[int, ...]:
        """Sequence positions that see nothing (newline slots)."""
        return tuple(p for v in self.views for p in v.separators)

    def tokens_at(self, x: int, y: int) -> list[tuple[View, int]]:
        """Original pixel -> ``(view, sequence position)`` for every view that sees its centre."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise ValueError(f"pixel ({x}, {y}) lies outside the {self.width}x{self.height} image")
        out = []
        for v in self.views:
            p = v.token_at(x, y)
            if p is not None:
                out.append((v, p))
        return out

    def token_at(self, x: int, y: int) -> list[int]:
        """Original pixel -> sequence positions of every token that sees it, one per view (view order)."""
        return [p for _, p in self.tokens_at(x, y)]


def grid_layout(grid: Grid, family: str = "", prompt: str = "") -> Layout:
    """The layout of one :class:`GridView`: a Qwen-VL image (``prompt``: its processor's expansion)."""
    return Layout(family, grid.width, grid.height, (GridView.of(grid),), grid.num_tokens, prompt)


def layout_for(source: Any, width: int, height: int, **settings: Any) -> Layout:
    """The view list of a ``width`` x ``height`` image.

    ``source`` is a family name (``qwen3-vl``, ``internvl``, ``llava_onevision``, ``idefics3``,
    ``smolvlm`` …, see :mod:`dvsft.models.families`), a local model directory, a loaded processor / image
    processor, or a :class:`~dvsft.models.families.FamilySource` (read once); ``settings`` override the
    family's defaults and the source's own (``min_pixels``, ``max_tiles``, …). A model no family knows is a
    ``ValueError`` naming the supported families.
    """
    from dvsft.models.families import family_source

    return family_source(source).layout(width, height, **settings)


def grid_for(
    source: Any,
    width: int,
    height: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Grid:
    """The token grid of a ``width`` x ``height`` image: :attr:`Layout.grid` of :func:`layout_for`.

    ``source`` is a one-grid family's name (``qwen3-vl``), a local HF model directory, or a loaded
    processor / image processor; explicit ``min_pixels`` / ``max_pixels`` override it. A tiled family is a
    ``ValueError`` (its image is a list of views: :func:`layout_for`).
    """
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    layout = _grid_source(source).layout(width, height, **{k: v for k, v in pixels.items() if v is not None})
    assert layout.grid is not None  # a one-grid family's layout
    return layout.grid


def grid_rule(source: Any) -> GridRule:
    """The resize rule of a one-grid family (Qwen-VL), with the settings ``source`` carries (a family name: the
    released checkpoints'; a model directory or processor: its own). A tiled family is a ``ValueError``."""
    found = _grid_source(source)
    assert found.spec.grid is not None
    return replace(found.spec.grid, **found.settings)


def _grid_source(source: Any) -> FamilySource:
    """The :class:`~dvsft.models.families.FamilySource` of a one-grid family; a ``ValueError`` for a tiled one."""
    from dvsft.models.families import family_source

    found = family_source(source)
    if found.spec.grid is None:
        raise ValueError(f"{found.spec.name} cuts an image into views, not one grid of tokens: use layout_for")
    return found
