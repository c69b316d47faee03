"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and Qwen3.5: one view, the smart-resized image.

``Qwen2VLImageProcessorPil`` resizes the image with ``smart_resize`` to a multiple of the
token cell (patch x merge pixels) and merges merge² patches into one token, row-major. The
processor writes ``<|image_pad|>`` once per token between ``<|vision_start|>`` and
``<|vision_end|>`` (which the chat template writes). Qwen3-VL-MoE and Qwen3.5 use the same
image processor and ``Qwen3VLProcessor`` with patch 16, merge 2 (32-px cells).
"""

from __future__ import annotations

from typing import Any

from dvsft.models import geometry
from dvsft.models.families.base import DENSE, FamilySpec, attr_path
from dvsft.models.geometry import Layout, grid_for, uniform_view

IMAGE_TOKEN = "<|image_pad|>"
# Qwen3.5's Gated DeltaNet (linear attention) layers
DELTANET = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
# Qwen3-VL's DeepStack mergers: like the merger, they map ViT features of inner blocks to the LLM's width
DEEPSTACK = ("model.visual.deepstack_merger_list",)


def qwen_layout(name: str):
    def layout(
        width: int,
        height: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        patch_size: int | None = None,
        merge_size: int | None = None,
    ) -> Layout:
        fam = geometry.family(name)
        if patch_size or merge_size:
            fam = geometry.Family(
                name, patch_size or fam.patch_size, merge_size or fam.merge_size, fam.min_pixels, fam.max_pixels
            )
        g = grid_for(fam, width, height, min_pixels, max_pixels)
        view = uniform_view("image", 0, (0.0, 0.0, float(width), float(height)), g.rows, g.cols, 0, width, height)
        # the view's spans are the grid's cells (cell / scale original pixels each)
        return Layout(name, width, height, (view,), g.num_tokens, IMAGE_TOKEN * g.num_tokens)

    return layout


def qwen_settings(source: Any) -> dict[str, Any]:
    patch, merge, min_px, max_px = geometry.processor_settings(source)
    return {"patch_size": patch, "merge_size": merge, "min_pixels": min_px, "max_pixels": max_px}


def _projector(model: Any) -> Any:
    return attr_path("model.visual.merger")(model)


def qwen_spec(
    name: str,
    model_type: str,
    lora: tuple[str, ...],
    processor: str,
    aliases: tuple[str, ...] = (),
    projector_extras: tuple[str, ...] = (),
):
    fam = geometry.family(name)
    return FamilySpec(
        name=name,
        model_types=(model_type,),
        image_processor="Qwen2VLImageProcessorPil",
        processor=processor,
        image_token=IMAGE_TOKEN,
        layout=qwen_layout(name),
        settings_from=qwen_settings,
        language_model=attr_path("model.language_model"),
        vision_tower=attr_path("model.visual"),
        projector=_projector,
        projector_extras=projector_extras,
        lora_targets=lora,
        image_inputs=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
        defaults={
            "patch_size": fam.patch_size,
            "merge_size": fam.merge_size,
            "min_pixels": fam.min_pixels,
            "max_pixels": fam.max_pixels,
        },
        aliases=aliases,
        views="one view: the smart-resized image, row-major merged cells",
    )


SPECS = [
    qwen_spec("qwen2-vl", "qwen2_vl", DENSE, "Qwen2VLProcessor", ("qwen2_vl",)),
    qwen_spec("qwen2.5-vl", "qwen2_5_vl", DENSE, "Qwen2_5_VLProcessor", ("qwen2_5_vl", "qwen2.5_vl")),
    qwen_spec("qwen3-vl", "qwen3_vl", DENSE, "Qwen3VLProcessor", ("qwen3_vl",), DEEPSTACK),
    # experts are fused 3-D parameters and the router is no nn.Linear: LoRA wraps the attention
    qwen_spec("qwen3-vl-moe", "qwen3_vl_moe", DENSE[:4], "Qwen3VLProcessor", ("qwen3_vl_moe",), DEEPSTACK),
    qwen_spec("qwen3.5", "qwen3_5", DENSE + DELTANET, "Qwen3VLProcessor", ("qwen3_5", "qwen3-5")),
]
