"""`--model tiny`: a real Qwen3-VL architecture at toy size, with a tokenizer trained offline.

Everything is built from configs and text that installs with Python (``pydoc_data.topics``),
so tests, the demo and CI run with no hub access. The result is an ordinary HF model
directory (model, tokenizer, processor, chat template) that every dvsft command accepts.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# ChatML as the Qwen-VL templates write it; content is a string ("<image>" marks an image)
# or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] | replace('<image>', '<|vision_start|><|image_pad|><|vision_end|>') }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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


def corpus_text() -> str:
    """Real English prose that ships with Python: the pydoc topic help texts."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def corpus_words() -> list[str]:
    """Alphabetic words of the bundled corpus, in order."""
    return re.findall(r"[A-Za-z]+(?:'[a-z]+)?", corpus_text())


def train_tokenizer(vocab_size: int = 2048, extra_text: list[str] | None = None):
    """A byte-level BPE tokenizer trained on the bundled corpus, splitting text exactly as Qwen does.

    Only the merges (and so the vocabulary) are the corpus's own; NFC, the split regex (digits one by
    one, the space before a number apart from it) and the byte alphabet are Qwen's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dvsft.training.qwen_vocab import qwen_normalizer, qwen_pre_tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = qwen_normalizer()
    tok.pre_tokenizer = qwen_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus_text().split("\n") + list(extra_text or [])
    tok.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    fast.padding_side = "left"
    return fast


def build_processor(tokenizer, min_pixels: int, max_pixels: int):
    """The real Qwen3-VL processor around the PIL image processor (no torchvision needed)."""
    from transformers import Qwen2VLImageProcessorPil

    from dvsft.models import build_processor as family_processor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    return family_processor(image_processor, tokenizer, "qwen3_vl", CHAT_TEMPLATE)


def build_model_config(cfg: TinyConfig, tokenizer):
    from transformers import Qwen3VLConfig

    head_dim = cfg.hidden_size // cfg.heads
    quarter = head_dim // 2  # mrope sections (t, h, w) sum to head_dim / 2
    section = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.hidden_size * 3,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=head_dim,
            max_position_embeddings=4096,
            rope_scaling={"rope_type": "default", "mrope_section": section, "mrope_interleaved": True},
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=cfg.vision_depth,
            hidden_size=cfg.vision_hidden_size,
            intermediate_size=cfg.vision_hidden_size * 3,
            num_heads=cfg.vision_heads,
            out_hidden_size=cfg.hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=256,
            deepstack_visual_indexes=[],
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny(cfg: TinyConfig | None = None, extra_text: list[str] | None = None):
    """(model, processor) of a freshly initialised tiny Qwen3-VL."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    cfg = cfg or TinyConfig()
    tokenizer = train_tokenizer(cfg.vocab_size, extra_text)
    processor = build_processor(tokenizer, cfg.min_pixels, cfg.max_pixels)
    torch.manual_seed(cfg.seed)
    model = Qwen3VLForConditionalGeneration(build_model_config(cfg, tokenizer))
    for cfg_obj in (model.config, model.config.text_config, model.generation_config):
        cfg_obj.pad_token_id = tokenizer.pad_token_id
        cfg_obj.eos_token_id = tokenizer.eos_token_id
        cfg_obj.bos_token_id = None
    model.config.dvsft_tiny = asdict(cfg)
    return model, processor


def save_tiny(out_dir: str | Path, cfg: TinyConfig | None = None, extra_text: list[str] | None = None) -> Path:
    """Build the tiny model and write it as an HF model directory."""
    from dvsft.models import save_processor

    out = Path(out_dir)
    model, processor = build_tiny(cfg, extra_text)
    model.save_pretrained(out)
    save_processor(processor, out)
    return out
