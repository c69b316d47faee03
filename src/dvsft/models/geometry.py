"""Which image region each visual token sees, exactly as the model families' processors cut it.

Two levels. :func:`grid_for` / :class:`Grid` is the single-view Qwen-VL grid (unchanged API).
:func:`layout_for` / :class:`Layout` is the per-family *view list*: every family, tiled or not,
as a list of :class:`View` (tile, crop grid, thumbnail, global image), each with the region of
the original image its tokens see and the offset of its tokens in the model's image-token
sequence (including newline slots that see nothing). The rules of each family live in
:mod:`dvsft.models.families`.

Qwen-VL rule:

The processors resize an image with ``smart_resize`` to a multiple of the token cell
(``patch_size * merge_size`` pixels), cut it into patches, and merge ``merge_size²``
patches into one visual token. Tokens are row-major over the merged grid.

>>> g = grid_for("qwen3-vl", width=640, height=480)
>>> (g.resized_width, g.resized_height, g.rows, g.cols)
(640, 480, 15, 20)
>>> g.token_at(639, 479)
299
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_ASPECT_RATIO = 200

# `dvsft train`'s resolution (the paper's Table 4: 64 to 2,048 visual tokens of 32 x 32 pixels);
# `dvsft align` uses the same unless told otherwise, so inspection and training see one grid.
TRAIN_MIN_PIXELS = 32 * 32 * 64
TRAIN_MAX_PIXELS = 32 * 32 * 2048


@dataclass(frozen=True)
class Family:
    """Resolution rules of one model family (values of the released checkpoints)."""

    name: str
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @property
    def cell(self) -> int:
        return self.patch_size * self.merge_size


FAMILIES: dict[str, Family] = {
    "qwen2-vl": Family("qwen2-vl", 14, 2, 56 * 56, 28 * 28 * 16384),
    "qwen2.5-vl": Family("qwen2.5-vl", 14, 2, 56 * 56, 28 * 28 * 16384),
    "qwen3-vl": Family("qwen3-vl", 16, 2, 32 * 32 * 64, 32 * 32 * 16384),
    "qwen3-vl-moe": Family("qwen3-vl-moe", 16, 2, 32 * 32 * 64, 32 * 32 * 16384),
    "qwen3.5": Family("qwen3.5", 16, 2, 32 * 32 * 64, 32 * 32 * 16384),
}
ALIASES = {
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen2.5_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "qwen3_vl_moe": "qwen3-vl-moe",
    "qwen3_5": "qwen3.5",
    "qwen3-5": "qwen3.5",
}


def family(name: str) -> Family:
    """Look up a family by name (``qwen2-vl``, ``qwen2.5-vl``, ``qwen3-vl``)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[key]


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


def processor_settings(source: Any) -> tuple[int, int, int, int]:
    """(patch_size, merge_size, min_pixels, max_pixels) from a model dir, a processor or an image processor."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        config_file = path / "preprocessor_config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ValueError(
                f"{source!r} is neither a known family ({', '.join(FAMILIES)}) nor a model directory "
                "with a preprocessor_config.json"
            )
        cfg = json.loads(config_file.read_text())
        size = cfg.get("size") or {}
        min_px = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        max_px = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        patch, merge = cfg.get("patch_size"), cfg.get("merge_size")
    else:
        proc = getattr(source, "image_processor", source)
        size = getattr(proc, "size", None) or {}
        if hasattr(size, "get"):
            min_px, max_px = size.get("shortest_edge"), size.get("longest_edge")
        else:
            min_px, max_px = getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)
        min_px = min_px or getattr(proc, "min_pixels", None)
        max_px = max_px or getattr(proc, "max_pixels", None)
        patch, merge = getattr(proc, "patch_size", None), getattr(proc, "merge_size", None)
    if not all((patch, merge, min_px, max_px)):
        raise ValueError(f"could not read patch_size, merge_size, min and max pixels from {source!r}")
    return int(patch), int(merge), int(min_px), int(max_px)


def grid_for(
    source: str | Path | Any,
    width: int,
    height: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Grid:
    """The token grid of a ``width`` x ``height`` image.

    ``source`` is a family name (``qwen3-vl``), a local HF model directory, or a loaded
    processor / image processor; explicit ``min_pixels`` / ``max_pixels`` override it.
    """
    if isinstance(source, str) and (source.lower() in FAMILIES or source.lower() in ALIASES):
        fam = family(source)
        patch, merge, min_px, max_px = fam.patch_size, fam.merge_size, fam.min_pixels, fam.max_pixels
    elif isinstance(source, Family):
        patch, merge, min_px, max_px = source.patch_size, source.merge_size, source.min_pixels, source.max_pixels
    else:
        patch, merge, min_px, max_px = processor_settings(source)
    min_px = min_pixels if min_pixels is not None else min_px
    max_px = max_pixels if max_pixels is not None else max_px
    if min_px > max_px:
        raise ValueError(f"min_pixels {min_px} exceeds max_pixels {max_px}")
    cell = patch * merge
    rh, rw = smart_resize(int(height), int(width), cell, min_px, max_px)
    return Grid(int(width), int(height), rw, rh, cell, patch, merge)


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


def layout_for(source: Any, width: int, height: int, **settings: Any) -> Layout:
    """The view list of a ``width`` x ``height`` image.

    ``source`` is a family name (``qwen3-vl``, ``internvl``, ``llava_onevision``, ``idefics3``,
    ``smolvlm`` …, see :mod:`dvsft.models.families`) or a loaded processor / image processor;
    ``settings`` override the family's defaults (``min_pixels``, ``max_tiles``, …).
    """
    from dvsft.models.families import family_spec, spec_for_processor

    if isinstance(source, str):
        spec = family_spec(source)
        return spec.layout(int(width), int(height), **settings)
    spec = spec_for_processor(source)
    return spec.layout(int(width), int(height), **{**spec.settings_from(source), **settings})
