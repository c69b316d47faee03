"""Idefics3 and SmolVLM (``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil``): a tile grid + a global image.

Rules (transformers ``idefics3`` / ``smolvlm``, identical image processors): the image is
resized so its longest side is ``longest_edge`` (short side even; capped at 4096), then resized
up to multiples of ``tile`` (``max_image_size``); when larger than one tile it is cut into
``rows x cols`` tiles, row-major, followed by the *global* image (the whole image squashed to
``tile x tile``); an image of one tile is only the global view. Each tile gives
``tile // patch`` patches per side (a remainder strip is seen by no patch); pixel shuffle merges
``scale x scale`` patches into one token, row-major. The processor writes per tile
``<fake_token_around_image><row_i_col_j>`` + ``<image>`` x seq, ``\\n`` after each tile row,
then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` x seq + ``<fake_token_around_image>``.
"""

from __future__ import annotations

import math
from typing import Any

from dvsft.models.families.base import FamilySpec, attr_path, get_setting, processor_of, size_dict
from dvsft.models.geometry import Layout, View, uniform_view

IMAGE_TOKEN = "<image>"
FAKE = "<fake_token_around_image>"
GLOBAL = "<global-img>"
MAX_IMAGE_SIZE = 4096
IDEFICS3 = {"longest_edge": 4 * 364, "tile_size": 364, "patch_size": 14, "scale_factor": 2, "do_image_splitting": True}
SMOLVLM = {"longest_edge": 4 * 512, "tile_size": 512, "patch_size": 16, "scale_factor": 4, "do_image_splitting": True}


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        if height % 2 != 0:
            height += 1
    else:
        height = max_len
        width = int(height * aspect)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _multiple_of_tile(height: int, width: int, tile: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def resized_size(width: int, height: int, longest_edge: int, tile_size: int, do_image_splitting: bool = True):
    """(width, height) of the image the tiles are cut from, or None when it is not split."""
    h, w = _rescale_to_max_len(height, width, longest_edge)
    h, w = _scale_below(h, w, MAX_IMAGE_SIZE)
    if not do_image_splitting:
        return None
    h, w = _multiple_of_tile(h, w, tile_size)
    return w, h


def tile_prompt(rows: int, cols: int, seq: int) -> str:
    """The processor's expansion of one ``<image>`` placeholder."""
    glob = FAKE + GLOBAL + IMAGE_TOKEN * seq + FAKE
    if rows == 0 and cols == 0:
        return glob
    out = ""
    for r in range(rows):
        for c in range(cols):
            out += FAKE + f"<row_{r + 1}_col_{c + 1}>" + IMAGE_TOKEN * seq
        out += "\n"
    return out + "\n" + glob


def make_layout(family: str, defaults: dict[str, Any]):
    def layout(
        width: int,
        height: int,
        longest_edge: int = defaults["longest_edge"],
        tile_size: int = defaults["tile_size"],
        patch_size: int = defaults["patch_size"],
        scale_factor: int = defaults["scale_factor"],
        do_image_splitting: bool = True,
    ) -> Layout:
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height} (WxH) is not positive: both sides must be >= 1 pixel")
        patches = tile_size // patch_size
        if patches % scale_factor:
            raise ValueError(f"{patches} patches per tile side are not divisible by scale_factor {scale_factor}")
        side = patches // scale_factor
        seq = side * side
        cell_px = patch_size * scale_factor  # tile pixels per token
        size = resized_size(width, height, longest_edge, tile_size, do_image_splitting)
        whole = (0.0, 0.0, float(width), float(height))
        views: list[View] = []
        rows = cols = 0
        if size is not None and (size[0] > tile_size or size[1] > tile_size):
            rw, rh = size
            rows, cols = rh // tile_size, rw // tile_size
            sx, sy = width / rw, height / rh  # original pixels per resized pixel
            for i in range(rows * cols):
                r, c = divmod(i, cols)
                region = (c * tile_size * sx, r * tile_size * sy, (c + 1) * tile_size * sx, (r + 1) * tile_size * sy)
                views.append(
                    uniform_view(
                        "tile", i, region, side, side, i * seq, width, height, cell=(cell_px * sx, cell_px * sy)
                    )
                )
        n = len(views)
        cell = (cell_px * width / tile_size, cell_px * height / tile_size)
        views.append(uniform_view("global", n, whole, side, side, n * seq, width, height, cell=cell))
        return Layout(family, width, height, tuple(views), seq * len(views), tile_prompt(rows, cols, seq))

    return layout


def make_settings_from(defaults: dict[str, Any]):
    def settings_from(source: Any) -> dict[str, Any]:
        """Resize, tile and split settings of a loaded processor, image processor or model directory."""
        source = processor_of(source)
        ip = getattr(source, "image_processor", source)
        out: dict[str, Any] = {}
        size = size_dict(get_setting(ip, "size"))
        if "longest_edge" in size:
            out["longest_edge"] = int(size["longest_edge"])
        tile = size_dict(get_setting(ip, "max_image_size"))
        if "longest_edge" in tile:
            out["tile_size"] = int(tile["longest_edge"])
        split = get_setting(ip, "do_image_splitting")
        if split is not None:
            out["do_image_splitting"] = bool(split)
        seq = get_setting(source, "image_seq_len")
        if seq is not None:
            side = int(round(int(seq) ** 0.5))
            tile = out.get("tile_size", defaults["tile_size"])
            if side * side == int(seq) and tile % defaults["patch_size"] and tile % side == 0:
                # a tile that is no multiple of the released patch: one token cell is tile / side pixels
                out["patch_size"], out["scale_factor"] = tile // side, 1
                return out
            patches = tile // defaults["patch_size"]
            if side * side != int(seq) or patches % side:
                raise ValueError(f"image_seq_len {seq} does not fit {patches} patches per tile side")
            out["scale_factor"] = patches // side
        return out

    return settings_from


def make_spec(name: str, model_type: str, defaults: dict[str, Any], ip: str, proc: str) -> FamilySpec:
    return FamilySpec(
        name=name,
        model_types=(model_type,),
        image_processor=ip,
        processor=proc,
        image_token=IMAGE_TOKEN,
        layout=make_layout(name, defaults),
        settings_from=make_settings_from(defaults),
        language_model=attr_path("model.text_model"),
        vision_tower=attr_path("model.vision_model"),
        projector=attr_path("model.connector"),
        image_inputs=("pixel_values", "pixel_attention_mask"),
        defaults=dict(defaults),
        views="tiles (row-major) then the global image; row/col tag tokens and newlines between them in the prompt",
        dummy_options={"do_image_splitting": False},  # the global image alone
    )


SPECS = [
    make_spec("idefics3", "idefics3", IDEFICS3, "Idefics3ImageProcessorPil", "Idefics3Processor"),
    make_spec("smolvlm", "smolvlm", SMOLVLM, "SmolVLMImageProcessorPil", "SmolVLMProcessor"),
]
