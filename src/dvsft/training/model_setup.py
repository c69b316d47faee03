"""Build the model to train: load a local HF dir, the tiny model, or graft a text LLM onto a vision tower;
then choose what trains (freeze / LoRA).

Parts (the family module names them; ``dvsft.objectives.base`` finds them inside any wrapper), e.g. of a
Qwen-VL model: vision encoder = ``model.visual`` minus its mergers; projector = ``visual.merger`` (+ Qwen3-VL's
DeepStack mergers, which also map vision features to the LLM's hidden size); LLM =
``model.language_model`` + ``lm_head``. :func:`part_parameters` puts every parameter in one part.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dvsft.models.families.base import attr_path
from dvsft.objectives.base import (
    HEADS_ATTR,
    base_model,
    family_of,
    language_model_of,
    lm_head_of,
    projector_of,
    vision_tower_of,
)
from dvsft.training.config import DVSFTConfig

log = logging.getLogger(__name__)

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} {p} is not a Hugging Face model dir (no config.json)")
    return p


def load_base(cfg: DVSFTConfig, dtype: Any = None) -> tuple[Any, Any]:
    """(model, processor) named by ``cfg.model``: a dir, ``tiny``, or the graft of model_llm + model_vision_from."""
    from dvsft.models.loading import load_model, load_processor, model_builder, set_pixels
    from dvsft.models.patch_conv import linear_patch_convs

    trust = cfg.trust_remote_code
    join_deepspeed_comm(cfg)
    if cfg.model_llm or cfg.model_vision_from:
        model, processor = graft(
            cfg.model_llm,
            cfg.model_vision_from,
            dtype=dtype,
            trust_remote_code=trust,
            fresh_projector=cfg.model_fresh_projector,
        )
    elif (builder := model_builder(cfg.model)) is not None:
        import torch

        model, processor = builder(cfg)
        if dtype is not None and dtype != "auto":
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    else:
        path = _check_dir(cfg.model, "model")
        model = load_model(path, dtype=dtype, trust_remote_code=trust)
        processor = load_processor(path, trust_remote_code=trust)
    set_pixels(processor, cfg.min_pixels, cfg.max_pixels)
    if cfg.attn_implementation:
        model.set_attn_implementation(cfg.attn_implementation)
    linear_patch_convs(model)  # the same patch embedding, as one matrix product (dvsft.models.patch_conv)
    return model, processor


def join_deepspeed_comm(cfg: DVSFTConfig) -> None:
    """Under DeepSpeed, let its communication wrap the process group the TrainingArguments started, before the
    model loads: ZeRO-3 partitions the weights inside ``from_pretrained`` (``deepspeed.zero.Init``) and would
    otherwise see a world of one process."""
    import torch

    if cfg.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


# --------------------------------------------------------------------------- graft


def add_vision_tokens(tokenizer: Any) -> list[str]:
    """Add the Qwen-VL vision (and ChatML) special tokens the tokenizer lacks; returns those added."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS + VISION_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return missing


def _mrope_section(head_dim: int) -> list[int]:
    quarter = head_dim // 2
    return [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]


def graft_config(llm_config: Any, vl_config: Any, tokenizer: Any) -> Any:
    """A Qwen3-VL config: the LLM's text architecture + the VL model's vision tower (projector to the LLM's size)."""
    from transformers import Qwen3VLConfig

    src = llm_config.to_dict()
    keys = [
        *("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"),
        *("hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "attention_bias"),
        "attention_dropout",
    ]
    text = {k: src[k] for k in keys if k in src}
    head_dim = src.get("head_dim") or src["hidden_size"] // src["num_attention_heads"]
    text["head_dim"] = head_dim
    text["vocab_size"] = src["vocab_size"]
    vl_text = vl_config.text_config
    vl_rope = dict(getattr(vl_text, "rope_parameters", None) or {})
    vl_head = getattr(vl_text, "head_dim", None) or vl_text.hidden_size // vl_text.num_attention_heads
    section = vl_rope.get("mrope_section") if vl_head == head_dim else None
    theta = (src.get("rope_parameters") or {}).get("rope_theta") or src.get("rope_theta") or 1e6
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": theta,
        "mrope_section": section or _mrope_section(head_dim),
        "mrope_interleaved": vl_rope.get("mrope_interleaved", True),
    }
    tied = bool(src.get("tie_word_embeddings", False))
    text["tie_word_embeddings"] = tied
    vision = vl_config.vision_config.to_dict()
    vision["out_hidden_size"] = src["hidden_size"]
    ids = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tied,
    )


PROJECTOR_PREFIXES = ("merger.", "deepstack_merger_list.")


def copy_vision_tower(source: Any, target: Any, fresh_projector: bool = False) -> tuple[list[str], list[str]]:
    """Copy ``source``'s vision-tower tensors into ``target``'s; returns (copied names, fresh names).

    A tensor is copied when the target has it with the same shape; the rest keep their fresh
    initialisation: the projector's output layers (``merger.linear_fc2``, each DeepStack merger's
    ``linear_fc2``) when the LLM widths differ, and every projector tensor with ``fresh_projector``.
    """
    src, dst = source.state_dict(), target.state_dict()
    copied = []
    for name, tensor in dst.items():
        if fresh_projector and name.startswith(PROJECTOR_PREFIXES):
            continue
        if name in src and src[name].shape == tensor.shape:
            tensor.copy_(src[name])
            copied.append(name)
    return sorted(copied), sorted(set(dst) - set(copied))


def graft(
    llm_dir: str | Path,
    vision_dir: str | Path,
    dtype: Any = None,
    trust_remote_code: bool = False,
    fresh_projector: bool = False,
):
    """(model, processor): a Qwen3VLForConditionalGeneration from a text LLM + another model's vision tower.

    Text model and lm_head come from ``llm_dir`` (a Qwen3ForCausalLM-style dir). From ``vision_dir`` (a
    Qwen3-VL dir) the whole ``model.visual`` is copied: ViT, merger and DeepStack mergers, every tensor
    whose shape fits. When the LLM is as wide as the VL model's own LLM (Qwen3-1.7B and Qwen3-VL-2B: both
    2,048) that is everything; otherwise the projector's output layers (``linear_fc2``) are fresh.
    ``fresh_projector`` re-initialises the merger and DeepStack mergers in any case. The names are in
    ``model.config.dvsft_graft`` (``copied``, ``fresh``). The processor is the VL dir's image processor
    + the LLM's tokenizer with the vision special tokens added (embeddings resized) and a ChatML template.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3VLForConditionalGeneration

    from dvsft.models.loading import CHAT_TEMPLATE, build_processor, load_model, load_processor, model_type_of

    llm_dir, vision_dir = _check_dir(llm_dir, "model.llm"), _check_dir(vision_dir, "model.vision_from")
    if model_type_of(vision_dir) != "qwen3_vl":
        raise ValueError(f"model.vision_from {vision_dir}: expected a Qwen3-VL dir, got {model_type_of(vision_dir)!r}")
    llm_config = AutoConfig.from_pretrained(llm_dir, trust_remote_code=trust_remote_code)
    vl_config = AutoConfig.from_pretrained(vision_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=trust_remote_code)
    added = add_vision_tokens(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = graft_config(llm_config, vl_config, tokenizer)

    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    vl = load_model(vision_dir, dtype=dtype)
    model = Qwen3VLForConditionalGeneration(config).to(llm.dtype)

    text_state = {k.removeprefix("model."): v for k, v in llm.state_dict().items() if k.startswith("model.")}
    missing, unexpected = language_model_of(model).load_state_dict(text_state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ValueError(f"model.llm {llm_dir}: weights do not fit a Qwen3-VL text model: {missing or unexpected}")
    with torch.no_grad():
        if not config.tie_word_embeddings:
            model.lm_head.weight.copy_(llm.get_output_embeddings().weight)
        copied, fresh = copy_vision_tower(vision_tower_of(vl), vision_tower_of(model), fresh_projector)
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.dvsft_graft = {
        "llm": str(llm_dir),
        "vision_from": str(vision_dir),
        "copied": copied,
        "fresh": fresh,
        "added_tokens": added,
    }
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = load_processor(vision_dir).image_processor
    processor = build_processor(image_processor, tokenizer, "qwen3_vl", CHAT_TEMPLATE)
    if fresh:
        log.info("graft: freshly initialised %d vision-side tensors (projector): %s", len(fresh), fresh[:6])
    log.info("graft: copied %d of %d vision-side tensors from %s", len(copied), len(copied) + len(fresh), vision_dir)
    del llm, vl
    return model, processor


# --------------------------------------------------------------------------- what trains


def _projector_parameters(base: Any) -> list[Any]:
    """The family's ``projector`` and its ``projector_extras`` (Qwen3-VL's DeepStack mergers, LLaVA-OneVision's
    ``image_newline``): modules or single parameters."""
    from torch import nn

    parts = [projector_of(base), *(attr_path(path)(base) for path in family_of(base).projector_extras)]
    return [p for part in parts for p in (part.parameters() if isinstance(part, nn.Module) else [part])]


def part_parameters(model: Any) -> dict[str, list[Any]]:
    """Every parameter of ``model`` in exactly one part, each claiming what the parts before it left:
    ``projector`` (``train_projector``), ``vision`` (the vision tower less the projector: ``train_vision``),
    ``llm`` (the decoder and the LM head, tied or not: ``train_llm``), ``heads`` (the objectives' heads) and
    ``other`` (what no part holds, which no flag trains: empty for every family module)."""
    base = base_model(model)
    heads = getattr(base, HEADS_ATTR, None)
    claims = {
        "projector": _projector_parameters(base),
        "vision": vision_tower_of(base).parameters(),
        "llm": [*language_model_of(base).parameters(), *lm_head_of(base).parameters()],
        "heads": heads.parameters() if heads is not None else [],
        "other": base.parameters(),
    }
    seen: set[int] = set()
    parts: dict[str, list[Any]] = {}
    for part, params in claims.items():
        parts[part] = []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                parts[part].append(p)
    return parts


def set_trainable(model: Any, vision: bool, projector: bool, llm_mode: str) -> dict[str, int]:
    """Set requires_grad per part of :func:`part_parameters` (full fine-tuning); the objectives' heads are left
    as they are. ``llm_mode``: all, first_layer (the LLM's first decoder layer), none. Returns the counts."""
    if llm_mode not in ("all", "first_layer", "none"):
        raise ValueError(f"train_llm must be all, first_layer or none; got {llm_mode!r}")
    base = base_model(model)
    parts = part_parameters(base)
    on = {"vision": vision, "projector": projector, "llm": llm_mode == "all", "other": False}
    for part, wanted in on.items():
        for p in parts[part]:
            p.requires_grad_(bool(wanted))
    if llm_mode == "first_layer":
        for p in language_model_of(base).layers[0].parameters():
            p.requires_grad_(True)
    if parts["other"]:
        other = {id(p) for p in parts["other"]}
        names = [n for n, p in base.named_parameters() if id(p) in other]
        log.warning("%d parameters belong to no part (vision, projector, llm) and stay frozen: %s", len(names), names)
    return trainable_counts(base)


def trainable_counts(model: Any) -> dict[str, int]:
    """``<part>_trainable`` / ``<part>_total`` parameter counts of each part of :func:`part_parameters`."""
    counts: dict[str, int] = {}
    for part, params in part_parameters(model).items():
        sizes = [(getattr(p, "ds_numel", None) or p.numel(), p.requires_grad) for p in params]  # ZeRO-3: a shard
        counts[f"{part}_trainable"] = sum(n for n, trainable in sizes if trainable)
        counts[f"{part}_total"] = sum(n for n, _ in sizes)
    return counts


def lora_targets(model: Any, wanted: list[str] | None = None) -> list[str]:
    """Full names of the LLM's linear layers whose name ends with one of ``wanted`` (default: the family
    module's ``lora_targets``; every linear layer of the LLM where those are empty)."""
    from torch import nn

    base = base_model(model)
    if not wanted:
        wanted = list(family_of(base).lora_targets)
    lm = language_model_of(base)
    lm_ids = {id(m) for m in lm.modules()}
    names = []
    for name, mod in base.named_modules():
        if isinstance(mod, nn.Linear) and id(mod) in lm_ids:
            if wanted and not any(name == w or name.endswith("." + w) for w in wanted):
                continue
            names.append(name)
    if not names:
        raise ValueError(f"lora_target_modules {wanted} matched no linear layer of the LLM")
    return names


def apply_lora(model: Any, cfg: DVSFTConfig) -> Any:
    """Wrap the model with PEFT LoRA on the LLM's linear layers; everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(model, cfg.lora_target_modules),
        bias="none",
    )
    return get_peft_model(model, config)
