"""InternVL (``GotOcr2ImageProcessorPil`` + ``InternVLProcessor``): aspect-ratio tiles + a thumbnail.

Rules (transformers ``got_ocr2`` / ``internvl``): among the tile grids (cols, rows) with
``min_tiles <= cols*rows <= max_tiles``, sorted by tile count, take the one whose aspect ratio
is closest to the image's (ties: the later grid while the image area exceeds half the grid's
area). The image is resized to ``cols*tile x rows*tile`` and cut into tiles, row-major; a
thumbnail (the whole image resized to one tile) follows when there is more than one tile.
Each tile gives ``(tile/patch)²`` ViT patches; pixel shuffle (ratio 0.5) merges 2x2 patches
into one token, row-major: 256 tokens of 28x28 tile pixels per 448-px tile. The processor
writes ``<img>`` + ``<IMG_CONTEXT>`` x 256 per tile (thumbnail included) + ``</img>``.
"""

from __future__ import annotations

from typing import Any

from dvsft.models.families.base import FamilySpec, get_setting, processor_of, size_dict
from dvsft.models.geometry import Layout, View, uniform_view

IMAGE_TOKEN = "<IMG_CONTEXT>"
START, END = "<img>", "</img>"
DEFAULTS = {
    "tile_size": 448,
    "patch_size": 14,
    "downsample_ratio": 0.5,
    "min_tiles": 1,
    "max_tiles": 12,
    "crop_to_patches": True,
}


def tile_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, stably sorted by tile count."""
    grids = [
        (w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if min_tiles <= w * h <= max_tiles
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def best_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) of the tile grid closest to the image's aspect ratio."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for g in tile_grids(min_tiles, max_tiles):
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and area > 0.5 * tile * tile * g[0] * g[1]:
            best = g
    return best


def tokens_per_side(tile_size: int, patch_size: int, downsample_ratio: float) -> int:
    side = tile_size // patch_size
    merged = side * downsample_ratio
    if merged != int(merged):
        raise ValueError(f"tile {tile_size} / patch {patch_size} = {side} patches is not divisible by pixel shuffle")
    return int(merged)


def layout(
    width: int,
    height: int,
    tile_size: int = 448,
    patch_size: int = 14,
    downsample_ratio: float = 0.5,
    min_tiles: int = 1,
    max_tiles: int = 12,
    crop_to_patches: bool = True,
) -> Layout:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} (WxH) is not positive: both sides must be >= 1 pixel")
    side = tokens_per_side(tile_size, patch_size, downsample_ratio)
    per_tile = side * side
    cell = tile_size / side  # tile pixels per token
    views: list[View] = []
    whole = (0.0, 0.0, float(width), float(height))
    if crop_to_patches and max_tiles > 1:
        cols, rows = best_grid(width, height, tile_size, min_tiles, max_tiles)
    else:
        cols, rows = 1, 1
    if cols * rows == 1:
        sx, sy = width / tile_size, height / tile_size
        views.append(uniform_view("image", 0, whole, side, side, 0, width, height, cell=(cell * sx, cell * sy)))
    else:
        tw, th = width / cols, height / rows  # one tile in original pixels
        sx, sy = tw / tile_size, th / tile_size
        for i in range(cols * rows):
            r, c = divmod(i, cols)
            region = (c * tw, r * th, (c + 1) * tw, (r + 1) * th)
            views.append(
                uniform_view("tile", i, region, side, side, i * per_tile, width, height, cell=(cell * sx, cell * sy))
            )
        n = len(views)
        sx, sy = width / tile_size, height / tile_size
        views.append(
            uniform_view("thumbnail", n, whole, side, side, n * per_tile, width, height, cell=(cell * sx, cell * sy))
        )
    total = per_tile * len(views)
    return Layout("internvl", width, height, tuple(views), total, START + IMAGE_TOKEN * total + END)


def settings_from(source: Any) -> dict[str, Any]:
    """Tile size, tile limits and tokens per tile of a loaded ``InternVLProcessor``, its image processor or a model
    directory."""
    source = processor_of(source)
    ip = getattr(source, "image_processor", source)
    size = size_dict(get_setting(ip, "size"))
    if size.get("height") != size.get("width"):
        raise ValueError(f"InternVL tiles must be square; the image processor's size is {size}")
    out: dict[str, Any] = {"tile_size": int(size["height"])}
    for key, name in (("min_tiles", "min_patches"), ("max_tiles", "max_patches")):
        v = get_setting(ip, name)
        if v is not None:
            out[key] = int(v)
    seq = get_setting(source, "image_seq_length")
    if seq is not None:
        side = int(round(int(seq) ** 0.5))
        if side * side != int(seq):
            raise ValueError(f"image_seq_length {seq} is not a square number of tokens per tile")
        # tokens per side = tile / patch * ratio: patch 14 when the tile is a multiple of it (solve the
        # ratio), else the patch whose 2 x 2 shuffle (or, failing that, the patch) is one token cell
        tile = out["tile_size"]
        if tile % DEFAULTS["patch_size"] == 0:
            out["downsample_ratio"] = side * DEFAULTS["patch_size"] / tile
        elif tile % (2 * side) == 0:
            out["patch_size"], out["downsample_ratio"] = tile // (2 * side), 0.5
        else:
            out["patch_size"], out["downsample_ratio"] = tile // side, 1.0
    return out


SPEC = FamilySpec(
    name="internvl",
    model_types=("internvl",),
    image_processor="GotOcr2ImageProcessorPil",
    processor="InternVLProcessor",
    image_token=IMAGE_TOKEN,
    layout=layout,
    settings_from=settings_from,
    image_inputs=("pixel_values",),
    defaults=dict(DEFAULTS),
    aliases=("internvl3", "internvl2"),
    views="tiles (row-major) by aspect ratio, then a thumbnail when more than one tile; 16x16 tokens per 448-px tile",
)
