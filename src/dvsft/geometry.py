"""Which image region each visual token sees, exactly as the Qwen-VL processors cut it.

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
}
ALIASES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen2.5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}


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


def _processor_settings(source: Any) -> tuple[int, int, int, int]:
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
        patch, merge, min_px, max_px = _processor_settings(source)
    min_px = min_pixels if min_pixels is not None else min_px
    max_px = max_pixels if max_pixels is not None else max_px
    if min_px > max_px:
        raise ValueError(f"min_pixels {min_px} exceeds max_pixels {max_px}")
    cell = patch * merge
    rh, rw = smart_resize(int(height), int(width), cell, min_px, max_px)
    return Grid(int(width), int(height), rw, rh, cell, patch, merge)
