"""LLaVA-OneVision (``LlavaOnevisionImageProcessorPil`` + ``LlavaOnevisionProcessor``, one image per sample).

Rules (transformers ``llava_onevision``): the *base* view is the whole image squashed to
``crop x crop`` (384); the *crops* view picks the best pinpoint resolution
(``select_best_resolution``), resizes the image into it keeping the aspect ratio
(``get_patch_output_size``), pads it centred, and cuts it into ``crop``-px crops. The vision
tower sees ``crop // patch`` (27) patches per side of each crop (the last ``crop % patch``
pixels are seen by no patch). The model joins the crops' features into one grid, drops the
feature rows / columns of the padding (``unpad_image``), bilinearly shrinks the grid when it
has more than ``anyres_max`` x 1.1² crops' worth of tokens, and appends one image-newline
token per row. Sequence: base (27² tokens), then the crop grid row by row, each row + newline.
In a shrunk grid each token blends up to 2x2 neighbours; a pixel belongs to the token with
the largest bilinear weight on its feature cell (the cell no token weighs is seen by none).
"""

from __future__ import annotations

import math
from typing import Any

from dvsft.models.families.base import FamilySpec, get_setting, processor_of, size_dict
from dvsft.models.geometry import Layout, View, axis_cuts, uniform_view

IMAGE_TOKEN = "<image>"
PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
DEFAULTS = {
    "crop_size": 384,
    "patch_size": 14,
    "image_grid_pinpoints": PINPOINTS,
    "vision_aspect_ratio": "anyres_max_9",
}


def best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """(height, width) of the pinpoint that keeps most image pixels and wastes fewest (first wins ties)."""
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    if best is None:
        raise ValueError(f"no pinpoint resolution fits a {width}x{height} image")
    return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """``get_patch_output_size``: the aspect-preserving size inside the target."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpad_slice(height: int, width: int, cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """``unpad_image``: the kept feature rows [r0, r1) and columns [c0, c1)."""
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def bilinear_owner(n_in: int, n_out: int) -> list[int | None]:
    """For each input index, the output index with the largest weight in ``interpolate(mode="bilinear")``.

    Mirrors PyTorch's ``align_corners=False`` sampling (source ``(i + 0.5) * in/out - 0.5``, clamped
    at 0). Ties go to the lower output index; an input no output samples gets None.
    """
    scale = n_in / n_out
    best: list[tuple[float, int] | None] = [None] * n_in
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        l1 = src - i0
        for k, w in ((i0, 1.0 - l1), (i1, l1)):
            if w > 0 and (best[k] is None or w > best[k][0]):
                best[k] = (w, i)
    return [b[1] if b is not None else None for b in best]


def _feature_spans(n_crops: int, crop: int, patch: int, pad: int, fitted: int, size: int) -> list[tuple[float, float]]:
    """Original-pixel span of each feature cell along one axis of the padded crop canvas."""
    side = crop // patch
    k = size / fitted  # original pixels per canvas pixel
    spans = []
    for f in range(n_crops * side):
        c0 = (f // side) * crop + (f % side) * patch
        spans.append(((c0 - pad) * k, (c0 + patch - pad) * k))
    return spans


def layout(
    width: int,
    height: int,
    crop_size: int = 384,
    patch_size: int = 14,
    image_grid_pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    vision_feature_select_strategy: str = "full",
) -> Layout:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} (WxH) is not positive: both sides must be >= 1 pixel")
    if vision_feature_select_strategy != "full":
        raise ValueError(
            f"vision_feature_select_strategy {vision_feature_select_strategy!r} is not supported: LLaVA-OneVision's "
            "SigLIP tower has no CLS token to drop (use 'full')"
        )
    pinpoints = image_grid_pinpoints or PINPOINTS
    side = crop_size // patch_size
    whole = (0.0, 0.0, float(width), float(height))
    cell = (patch_size * width / crop_size, patch_size * height / crop_size)
    base = uniform_view("base", 0, whole, side, side, 0, width, height, cell=cell)

    best_h, best_w = best_resolution(height, width, pinpoints)
    fit_h, fit_w = fit_size(height, width, best_h, best_w)
    pad_x, pad_y = (best_w - fit_w) // 2, (best_h - fit_h) // 2
    n_rows, n_cols = best_h // crop_size, best_w // crop_size
    cur_h, cur_w = n_rows * side, n_cols * side
    r0, r1, c0, c1 = unpad_slice(height, width, cur_h, cur_w)
    ys = _feature_spans(n_rows, crop_size, patch_size, pad_y, fit_h, height)[r0:r1]
    xs = _feature_spans(n_cols, crop_size, patch_size, pad_x, fit_w, width)[c0:c1]
    rows, cols = r1 - r0, c1 - c0
    if not vision_aspect_ratio.startswith("anyres_max_"):
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r}: only anyres_max_N is supported")
    max_crops = int(vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_crops * side**2))
    if ratio > 1.1:
        out_r, out_c = int(rows // ratio), int(cols // ratio)
        y_owner, x_owner = bilinear_owner(rows, out_r), bilinear_owner(cols, out_c)
        rows, cols = out_r, out_c
    else:
        y_owner, x_owner = None, None
    crops = View(
        kind="crops",
        index=1,
        region=(
            -pad_x * width / fit_w,
            -pad_y * height / fit_h,
            (best_w - pad_x) * width / fit_w,
            (best_h - pad_y) * height / fit_h,
        ),
        rows=rows,
        cols=cols,
        x_cuts=axis_cuts(xs, width, x_owner),
        y_cuts=axis_cuts(ys, height, y_owner),
        offset=side * side,
        row_stride=cols + 1,
        image_width=width,
        image_height=height,
        crops=(n_rows, n_cols),
    )
    total = side * side + rows * (cols + 1)
    return Layout("llava_onevision", width, height, (base, crops), total, IMAGE_TOKEN * total)


def settings_from(source: Any) -> dict[str, Any]:
    """Crop size, pinpoints and anyres setting of a loaded ``LlavaOnevisionProcessor``, image processor or model
    directory."""
    source = processor_of(source)
    ip = getattr(source, "image_processor", source)
    size = size_dict(get_setting(ip, "size"))
    crop = size.get("height") or size.get("shortest_edge")
    out: dict[str, Any] = {"crop_size": int(crop)}
    pins = get_setting(ip, "image_grid_pinpoints")
    if pins:
        out["image_grid_pinpoints"] = [list(p) for p in pins]
    for key in ("vision_aspect_ratio", "vision_feature_select_strategy"):
        v = get_setting(source, key)
        if v is not None:
            out[key] = v
    n = get_setting(source, "num_image_tokens")
    if n is not None:
        side = int(round(int(n) ** 0.5))
        out["patch_size"] = out["crop_size"] // side
        if out["crop_size"] // out["patch_size"] != side:
            raise ValueError(f"num_image_tokens {n} does not fit crops of {out['crop_size']} px")
    return out


SPEC = FamilySpec(
    name="llava_onevision",
    model_types=("llava_onevision",),
    image_processor="LlavaOnevisionImageProcessorPil",
    processor="LlavaOnevisionProcessor",
    image_token=IMAGE_TOKEN,
    layout=layout,
    settings_from=settings_from,
    image_inputs=("pixel_values", "image_sizes", "batch_num_images"),
    # the learned embedding that ends each row of projected crop features (a visual token, in the LLM's width)
    projector_extras=("model.image_newline",),
    defaults=dict(DEFAULTS),
    aliases=("llava-onevision", "llava_ov"),
    views="base image (27x27), then the unpadded crop grid (anyres_max_9 shrink) with a newline token per row",
)
