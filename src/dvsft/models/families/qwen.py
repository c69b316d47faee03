"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and Qwen3.5: one view, the smart-resized image.

``Qwen2VLImageProcessorPil`` resizes the image with ``smart_resize`` to a multiple of the
token cell (patch x merge pixels) and merges merge² patches into one token, row-major. The
processor writes ``<|image_pad|>`` once per token between ``<|vision_start|>`` and
``<|vision_end|>`` (which the chat template writes). Qwen3-VL-MoE and Qwen3.5 use the same
image processor and ``Qwen3VLProcessor`` with patch 16, merge 2 (32-px cells).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dvsft.models.families.base import DENSE, FamilySpec, attr_path
from dvsft.models.geometry import GridRule, Layout, grid_layout

IMAGE_TOKEN = "<|image_pad|>"
# Qwen3.5's Gated DeltaNet (linear attention) layers
DELTANET = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
# Qwen3-VL's DeepStack mergers: like the merger, they map ViT features of inner blocks to the LLM's width
DEEPSTACK = ("model.visual.deepstack_merger_list",)
# how each release writes a box in text (FamilySpec.box_format): the formats its grounding data used
BOX_FORMATS = {"qwen2-vl": "tagged-thousandths", "qwen2.5-vl": "resized-pixels", "qwen3-vl": "thousandths"}
# the released checkpoints' resize rules
QWEN2_GRID = GridRule(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
QWEN3_GRID = GridRule(patch_size=16, merge_size=2, min_pixels=32 * 32 * 64, max_pixels=32 * 32 * 16384)


def qwen_layout(name: str, rule: GridRule):
    """The layout function of family ``name``: one :class:`GridView` of ``rule``'s grid (settings override it)."""

    def layout(
        width: int,
        height: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        patch_size: int | None = None,
        merge_size: int | None = None,
    ) -> Layout:
        given = {"min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": patch_size, "merge_size": merge_size}
        grid = replace(rule, **{k: int(v) for k, v in given.items() if v is not None}).grid(width, height)
        return grid_layout(grid, name, IMAGE_TOKEN * grid.num_tokens)

    return layout


def qwen_settings(source: Any) -> dict[str, Any]:
    """patch_size, merge_size, min_pixels and max_pixels of a model directory (its preprocessor_config.json), a
    loaded processor or an image processor."""
    if isinstance(source, str | Path):
        config_file = Path(source) / "preprocessor_config.json"
        if not config_file.is_file():
            raise ValueError(f"{source}: no preprocessor_config.json to read the image processor's settings from")
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
    return {"patch_size": int(patch), "merge_size": int(merge), "min_pixels": int(min_px), "max_pixels": int(max_px)}


def _projector(model: Any) -> Any:
    return attr_path("model.visual.merger")(model)


def mrope_positions(model: Any, inputs: dict[str, Any]) -> Any:
    """One sample's position ids as the model computes them for it alone: the text positions 0 .. n-1 (which
    transformers' packed-sequence mask reads), then M-RoPE's three rows from the model's own ``get_rope_index``
    (:meth:`FamilySpec.position_ids`)."""
    import torch

    ids = inputs["input_ids"]
    rope, _ = attr_path("model")(model).get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw")
    )
    return torch.cat([torch.arange(ids.shape[-1], device=ids.device)[None], rope[:, 0].to(ids.device)])


def split_linear_attention(model: Any) -> None:
    """Qwen3.5's Gated DeltaNet layers carry a recurrent state along the row, which transformers' torch path cannot
    reset between packed samples (it refuses ``cu_seqlens`` without flash-linear-attention): each linear-attention
    decoder layer runs each packed sample of a row on its own, found from the text position ids as transformers'
    attention mask finds them. Run once per model; unpacked rows run as before."""
    for layer in attr_path("model.language_model")(model).layers:
        if getattr(layer, "block_type", None) == "linear_attention" and "forward" not in vars(layer):
            layer.forward = _per_sample(layer.forward)


def _per_sample(forward: Any) -> Any:
    """A decoder layer's ``forward`` that runs each packed sample of a row (:func:`split_linear_attention`) alone."""

    def run(hidden_states: Any, position_embeddings: Any = None, position_ids: Any = None, **kwargs: Any) -> Any:
        import torch
        from transformers.masking_utils import find_packed_sequence_indices

        packed = position_ids is not None and position_ids.dim() == 2
        samples = find_packed_sequence_indices(position_ids) if packed else None
        if samples is None:
            return forward(hidden_states, position_embeddings=position_embeddings, position_ids=position_ids, **kwargs)
        parts = []
        for r, ids in enumerate(samples.tolist()):
            bounds = [0, *(i for i in range(1, len(ids)) if ids[i] != ids[i - 1]), len(ids)]
            for start, end in zip(bounds, bounds[1:], strict=False):
                cut = (slice(r, r + 1), slice(start, end))
                rope = tuple(p[cut] for p in position_embeddings) if position_embeddings is not None else None
                out = forward(hidden_states[cut], position_embeddings=rope, position_ids=position_ids[cut], **kwargs)
                parts.append(out)
        return torch.cat(parts, dim=1).reshape(hidden_states.shape)

    return run


def qwen_spec(
    name: str,
    model_type: str,
    rule: GridRule,
    lora: tuple[str, ...],
    processor: str,
    aliases: tuple[str, ...] = (),
    projector_extras: tuple[str, ...] = (),
    prepare_packing: Any = None,
) -> FamilySpec:
    return FamilySpec(
        name=name,
        model_types=(model_type,),
        image_processor="Qwen2VLImageProcessorPil",
        processor=processor,
        image_token=IMAGE_TOKEN,
        layout=qwen_layout(name, rule),
        settings_from=qwen_settings,
        language_model=attr_path("model.language_model"),
        vision_tower=attr_path("model.visual"),
        projector=_projector,
        projector_extras=projector_extras,
        lora_targets=lora,
        image_inputs=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
        defaults=asdict(rule),
        grid=rule,
        box_format=BOX_FORMATS.get(name),
        aliases=aliases,
        views="one view: the smart-resized image, row-major merged cells",
        segment_positions=mrope_positions,
        prepare_packing=prepare_packing,
    )


SPECS = [
    qwen_spec("qwen2-vl", "qwen2_vl", QWEN2_GRID, DENSE, "Qwen2VLProcessor", ("qwen2_vl",)),
    qwen_spec("qwen2.5-vl", "qwen2_5_vl", QWEN2_GRID, DENSE, "Qwen2_5_VLProcessor", ("qwen2_5_vl", "qwen2.5_vl")),
    qwen_spec("qwen3-vl", "qwen3_vl", QWEN3_GRID, DENSE, "Qwen3VLProcessor", ("qwen3_vl",), DEEPSTACK),
    # experts are fused 3-D parameters and the router is no nn.Linear: LoRA wraps the attention
    qwen_spec("qwen3-vl-moe", "qwen3_vl_moe", QWEN3_GRID, DENSE[:4], "Qwen3VLProcessor", ("qwen3_vl_moe",), DEEPSTACK),
    qwen_spec(
        "qwen3.5",
        "qwen3_5",
        QWEN3_GRID,
        DENSE + DELTANET,
        "Qwen3VLProcessor",
        ("qwen3_5", "qwen3-5"),
        prepare_packing=split_linear_attention,
    ),
]
