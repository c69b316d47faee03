"""`--model tiny`: a real Qwen3-VL (or Qwen2.5-VL / Qwen3.5 / Qwen3-VL-MoE) architecture at toy size, with a
tokenizer trained offline.

``TinyConfig.family`` picks the architecture: ``qwen3-vl`` (default), ``qwen3.5`` (hybrid Gated
DeltaNet + attention decoder: one linear-attention layer, then full attention in the others),
``qwen3-vl-moe`` (sparse-expert MLPs), all three with the Qwen3-VL processor (patch 16, merge 2), or
``qwen2.5-vl`` (windowed vision attention, Qwen2.5-VL's processor: patch 14, merge 2); the tiled families
are in :mod:`dvsft.testing.tiny_tiled`.

Everything is built from configs and text that installs with Python (``pydoc_data.topics``),
so tests, the demo and CI run with no hub access. The result is an ordinary HF model
directory (model, tokenizer, processor, chat template) that every dvsft command accepts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dvsft.models.families import DEFAULT_FAMILY, family_spec
from dvsft.models.loading import CHAT_TEMPLATE
from dvsft.sources.corpora import corpus_text

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


@dataclass
class TinyConfig:
    """Size of the tiny model; defaults run a training step in well under a second on a CPU."""

    vocab_size: int = 2048
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden_size: int = 64
    vision_depth: int = 1
    vision_heads: int = 4
    min_pixels: int = 32 * 32 * 4
    max_pixels: int = 32 * 32 * 256
    seed: int = 0
    family: str = DEFAULT_FAMILY  # one of TINY_FAMILIES
    experts: int = 4  # qwen3-vl-moe: experts per MoE layer (2 active per token)
    tokenizer: str = "corpus"  # corpus (trained on pydoc topics, Qwen's splitting) or qwen (Qwen's real vocabulary)

    def __post_init__(self) -> None:
        self.family = _tiny_family(self.family)
        if self.tokenizer not in ("corpus", "qwen"):
            raise ValueError(f"tokenizer must be corpus or qwen; got {self.tokenizer!r}")


def _tiny_family(name: str) -> str:
    """The tiny family ``name`` calls by its family name, HF model type or alias (``llava-onevision``); a
    ``ValueError`` naming the tiny families for any other."""
    from dvsft.models.families import family_spec

    try:
        family = family_spec(name).name
    except ValueError:
        family = name
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}; got {name!r}")
    return family


def train_tokenizer(
    vocab_size: int = 2048,
    extra_text: list[str] | None = None,
    specials: list[str] | None = None,
    attrs: dict[str, str] | None = None,
    chat_template: str = CHAT_TEMPLATE,
):
    """A byte-level BPE tokenizer trained on the bundled corpus, splitting text exactly as Qwen does.

    Only the merges (and so the vocabulary) are the corpus's own; NFC, the split regex (digits one by
    one, the space before a number apart from it) and the byte alphabet are Qwen's. ``specials`` /
    ``attrs`` / ``chat_template``: another family's special tokens, their tokenizer attributes and
    its template (the tiled tiny families).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dvsft.testing.qwen_vocab import qwen_normalizer, qwen_pre_tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = qwen_normalizer()
    tok.pre_tokenizer = qwen_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + [t for t in specials or [] if t not in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus_text().split("\n") + list(extra_text or [])
    tok.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
        extra_special_tokens=attrs
        or {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    fast.padding_side = "left"
    return fast


def tiny_tokenizer(cfg: TinyConfig, extra_text: list[str] | None = None):
    """The tiny model's tokenizer: ``corpus`` (trained here, small vocabulary) or ``qwen`` (Qwen's real one).

    ``qwen`` is Qwen2/2.5/3/Qwen3-VL's tokenizer (Qwen3.5's for ``family: qwen3.5``) with its real ids,
    so labels, filters and the collator see exactly what a released Qwen model sees; the embedding
    then has a row per Qwen token (about 152k / 248k), cheap at tiny hidden sizes.
    """
    if cfg.tokenizer == "corpus":
        return train_tokenizer(cfg.vocab_size, extra_text)
    from dvsft.testing.qwen_vocab import qwen_tokenizer

    tok = qwen_tokenizer(cfg.family)
    tok.padding_side = "left"
    return tok


def tiny_processor(tokenizer, min_pixels: int, max_pixels: int, family: str = DEFAULT_FAMILY):
    """The family's real processor around its PIL image processor (no torchvision needed), with the family's
    patch and merge size."""
    from dvsft.models.loading import build_processor, image_processor_class

    spec = family_spec(family)
    image_processor = image_processor_class(spec.name)(
        patch_size=spec.defaults["patch_size"],
        merge_size=spec.defaults["merge_size"],
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    return build_processor(image_processor, tokenizer, spec.model_types[0], CHAT_TEMPLATE)


# the Qwen architectures built here, by HF model type (their family names: QWEN_TINY)
QWEN_TINY_TYPES = ("qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen2_5_vl")
QWEN_TINY = tuple(family_spec(t).name for t in QWEN_TINY_TYPES)
TINY_FAMILIES = (*QWEN_TINY, "internvl", "llava_onevision", "idefics3", "smolvlm")


def _sections(rotary_dim: int) -> list[int]:
    quarter = rotary_dim // 2  # mrope sections (t, h, w) sum to rotary_dim / 2
    return [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]


def _text_config(cfg: TinyConfig, tokenizer) -> dict:
    head_dim = cfg.hidden_size // cfg.heads
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 3,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_scaling={"rope_type": "default", "mrope_section": _sections(head_dim), "mrope_interleaved": True},
        tie_word_embeddings=True,
    )
    if cfg.family == "qwen3.5":
        # partial rotary (half the head), one Gated DeltaNet layer first, full attention after it
        text.pop("rope_scaling")
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": _sections(head_dim // 2),
            "mrope_interleaved": True,
        }
        text["layer_types"] = qwen35_layer_types(cfg.layers)
        text.update(
            linear_num_key_heads=cfg.kv_heads,
            linear_num_value_heads=cfg.heads,
            linear_key_head_dim=head_dim,
            linear_value_head_dim=head_dim,
        )
    elif cfg.family == "qwen2.5-vl":  # multimodal rope in sections, not interleaved
        text.pop("rope_scaling")
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": _sections(head_dim)}
        text.update(bos_token_id=None, eos_token_id=None)  # its defaults are Qwen's ids, outside a tiny vocabulary
    elif cfg.family == "qwen3-vl-moe":
        text.update(
            num_experts=cfg.experts,
            num_experts_per_tok=min(2, cfg.experts),
            moe_intermediate_size=cfg.hidden_size * 2,
            decoder_sparse_step=1,
        )
    return text


def qwen35_layer_types(layers: int) -> list[str]:
    """Qwen3.5's decoder at toy size: one Gated DeltaNet layer, then full attention (one layer: attention).

    One DeltaNet layer keeps the hybrid architecture: with two of the demo's three layers a demo step cost
    1.9x the Qwen3-VL step on a CPU (transformers' PyTorch fallback of the chunked delta rule), with one 1.1x.
    """
    linear = min(1, layers - 1)
    return ["linear_attention"] * linear + ["full_attention"] * (layers - linear)


def _vision_extra(family: str) -> dict:
    """The vision settings of one Qwen tiny family beyond the shared ones."""
    if family == "qwen2.5-vl":  # window attention in 4 x 4-cell windows, the one block attends globally
        return {"window_size": 112, "fullatt_block_indexes": [0]}
    if family == "qwen3.5":
        return {"num_position_embeddings": 256}
    return {"num_position_embeddings": 256, "deepstack_visual_indexes": []}


def build_model_config(cfg: TinyConfig, tokenizer):
    from transformers import CONFIG_MAPPING

    if cfg.family not in QWEN_TINY:
        raise ValueError(f"family must be one of {', '.join(QWEN_TINY)}; got {cfg.family!r}")
    spec = family_spec(cfg.family)
    grid = spec.defaults
    return CONFIG_MAPPING[spec.model_types[0]](
        text_config=_text_config(cfg, tokenizer),
        vision_config=dict(
            depth=cfg.vision_depth,
            hidden_size=cfg.vision_hidden_size,
            intermediate_size=cfg.vision_hidden_size * 3,
            num_heads=cfg.vision_heads,
            out_hidden_size=cfg.hidden_size,
            patch_size=grid["patch_size"],
            spatial_merge_size=grid["merge_size"],
            temporal_patch_size=2,
            **_vision_extra(cfg.family),
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def tiny_options(options: dict[str, Any] | None) -> TinyConfig:
    """The :class:`TinyConfig` of a training config's ``model_options`` (``model: tiny``), every option checked.

    Raises ``ValueError`` naming a bad option (the valid ones for an unknown one); the pixel bounds are the
    config's own ``min_pixels`` / ``max_pixels``, not options.
    """
    from dvsft.core.typed import typed

    return typed(TinyConfig, dict(options or {}), "model_options", skip=("min_pixels", "max_pixels"))


def build_from_options(cfg: Any) -> tuple[Any, Any]:
    """``model: tiny`` in a training config: the tiny model sized by its ``model_options``."""
    return build_tiny(tiny_options(cfg.model_options))


build_from_options.check_options = tiny_options  # the config checks model_options with it when loaded


def build_tiny(cfg: TinyConfig | None = None, extra_text: list[str] | None = None):
    """(model, processor) of a freshly initialised tiny Qwen3-VL (or ``cfg.family``)."""
    import torch
    from transformers import AutoModelForImageTextToText

    cfg = cfg or TinyConfig()
    if cfg.family not in QWEN_TINY:
        from dvsft.testing.tiny_tiled import build_tiled

        model, processor = build_tiled(cfg, extra_text)
        model.config.dvsft_tiny = asdict(cfg)
        return model, processor
    tokenizer = tiny_tokenizer(cfg, extra_text)
    processor = tiny_processor(tokenizer, cfg.min_pixels, cfg.max_pixels, cfg.family)
    torch.manual_seed(cfg.seed)
    config = build_model_config(cfg, tokenizer)
    model = AutoModelForImageTextToText.from_config(config)
    for cfg_obj in (model.config, model.config.text_config, model.generation_config):
        cfg_obj.pad_token_id = tokenizer.pad_token_id
        cfg_obj.eos_token_id = tokenizer.eos_token_id
        cfg_obj.bos_token_id = None
    model.config.dvsft_tiny = asdict(cfg)
    return model, processor


def save_tiny(out_dir: str | Path, cfg: TinyConfig | None = None, extra_text: list[str] | None = None) -> Path:
    """Build the tiny model and write it as an HF model directory."""
    from dvsft.models.loading import save_processor

    out = Path(out_dir)
    model, processor = build_tiny(cfg, extra_text)
    model.save_pretrained(out)
    save_processor(processor, out)
    return out
