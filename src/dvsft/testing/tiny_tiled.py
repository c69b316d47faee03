"""Tiny tiled families for `--model tiny` (``tiny.family``): InternVL, LLaVA-OneVision, Idefics3, SmolVLM.

Each is the real transformers architecture and the real processor at toy size: tiles / crops of
128 px, each 4 x 4 tokens of 32 tile px (16-px patches and pixel shuffle 2 x 2 for InternVL,
Idefics3 and SmolVLM; 32-px patches and no merge for LLaVA-OneVision), so a token row of a tile is
a 32-px row of a demo page, as a Qwen-VL token row is. The text model is the family's (Qwen3 for
InternVL, as in InternVL3.5; Qwen2 for LLaVA-OneVision; Llama for Idefics3 / SmolVLM) with the
sizes of :class:`~dvsft.testing.tiny.TinyConfig`; the tokenizer is the corpus-trained one with the
family's special tokens and a ChatML template that writes the family's image placeholder.

Sized so that a demo page (160 x 256 px) costs a training step within 2x of the tiny Qwen3-VL's
(docs/families.md, `dvsft bench families`): 1 x 2 tiles + a thumbnail for InternVL (48 tokens),
2 x 2 tiles + the global image for Idefics3 and SmolVLM (80 tokens plus separators), a 4 x 4 base
+ the 2 x 2 crop grid, unpadded to 8 rows of 6 tokens with a newline per row, for LLaVA-OneVision.
"""

from __future__ import annotations

from typing import Any

TILE = 128  # tile / crop side in pixels
PATCH = 16  # InternVL, Idefics3, SmolVLM: pixel shuffle 2 x 2 makes a 32-px token
LLAVA_PATCH = 32  # LLaVA-OneVision has no merge: 32-px patches give its crops the same 4 x 4 tokens
MAX_TILES = 2  # InternVL: a 160 x 256 page is 1 x 2 tiles + the thumbnail, every word inside one tile
LONGEST_EDGE = 2 * TILE  # Idefics3 / SmolVLM: a 160 x 256 page is 2 x 2 tiles + the global image
PINPOINTS = [[h, w] for h in (TILE, 2 * TILE, 3 * TILE) for w in (TILE, 2 * TILE, 3 * TILE)]  # LLaVA-OV: 3 x 3 crops
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(8) for j in range(8)]


def chatml(image: str) -> str:
    """ChatML whose image parts (and ``<image>`` in string content) are the family's placeholder."""
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}"
        "{{ message['content'] | replace('<image>', '" + image + "') }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


FAMILY_TOKENS: dict[str, tuple[list[str], dict[str, str], str]] = {
    # family: (special tokens, tokenizer attributes, the template's image placeholder)
    "internvl": (
        ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        "<IMG_CONTEXT>",
    ),
    "llava_onevision": (["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"}, "<image>"),
    "idefics3": (
        ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *ROW_COL],
        {"image_token": "<image>"},
        "<image>",
    ),
}
FAMILY_TOKENS["smolvlm"] = (
    [*FAMILY_TOKENS["idefics3"][0], "<video>"],
    {"image_token": "<image>", "video_token": "<video>"},
    "<image>",
)


def _text(cfg: Any, vocab: int, model_type: str) -> dict[str, Any]:
    extra = {"head_dim": cfg.hidden_size // cfg.heads} if model_type == "qwen3" else {}  # Qwen3's default is 128
    return dict(
        **extra,
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 3,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def _vision(cfg: Any, **extra: Any) -> dict[str, Any]:
    return dict(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_hidden_size * 3,
        num_hidden_layers=cfg.vision_depth,
        num_attention_heads=cfg.vision_heads,
        **extra,
    )


def _processor_and_config(family: str, cfg: Any, tok: Any) -> tuple[Any, Any]:
    import transformers as tf

    from dvsft.models.loading import build_processor

    image_id = tok.convert_tokens_to_ids(FAMILY_TOKENS[family][2])
    vocab = len(tok)
    if family == "internvl":
        ip = tf.GotOcr2ImageProcessorPil(
            size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES
        )
        side = TILE // PATCH // 2
        proc = build_processor(ip, tok, family, tok.chat_template, image_seq_length=side * side)
        config = tf.InternVLConfig(
            vision_config=_vision(cfg, image_size=[TILE, TILE], patch_size=[PATCH, PATCH]),
            text_config=_text(cfg, vocab, "qwen3"),
            image_token_id=image_id,
            downsample_ratio=0.5,
            tie_word_embeddings=True,
        )
    elif family == "llava_onevision":
        ip = tf.LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
        proc = build_processor(
            ip,
            tok,
            family,
            tok.chat_template,
            num_image_tokens=(TILE // LLAVA_PATCH) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
        config = tf.LlavaOnevisionConfig(
            vision_config=_vision(cfg, model_type="siglip_vision_model", image_size=TILE, patch_size=LLAVA_PATCH),
            text_config=_text(cfg, vocab, "qwen2"),
            image_token_index=image_id,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=True,
        )
    else:  # idefics3, smolvlm
        ip_cls = tf.Idefics3ImageProcessorPil if family == "idefics3" else tf.SmolVLMImageProcessorPil
        ip = ip_cls(size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE})
        side = TILE // PATCH // 2
        proc = build_processor(ip, tok, family, tok.chat_template, image_seq_len=side * side)
        cfg_cls = tf.Idefics3Config if family == "idefics3" else tf.SmolVLMConfig
        config = cfg_cls(
            vision_config=_vision(cfg, image_size=TILE, patch_size=PATCH),
            text_config=_text(cfg, vocab, "llama"),
            image_token_id=image_id,
            scale_factor=2,
            tie_word_embeddings=True,
        )
    return proc, config


def build_tiled(cfg: Any, extra_text: list[str] | None = None) -> tuple[Any, Any]:
    """(model, processor) of a freshly initialised tiny ``cfg.family`` model (a tiled family)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from dvsft.testing.tiny import train_tokenizer

    specials, attrs, image = FAMILY_TOKENS[cfg.family]
    tok = train_tokenizer(cfg.vocab_size, extra_text, specials=specials, attrs=attrs, chat_template=chatml(image))
    processor, config = _processor_and_config(cfg.family, cfg, tok)
    torch.manual_seed(cfg.seed)
    model = AutoModelForImageTextToText.from_config(config)
    for c in (model.config, model.config.get_text_config(), model.generation_config):
        c.pad_token_id = tok.pad_token_id
        c.eos_token_id = tok.eos_token_id
        c.bos_token_id = None
    return model, processor
