"""`dvsft stats` numbers on a hand-built aligned file."""

import pytest

from dvsft.align.stats import compute_stats, file_stats
from dvsft.core.records import write_jsonl


def labels(*tokens):
    return [{"token": t, "text": f"w{t}"} for t in tokens]


RECORDS = [
    {
        "id": "a",
        "image": "images/a.png",
        "grid": [2, 3],
        "vision_labels": labels(0, 2, 5),
        "dropped": {"too_tall": 1},
        "messages": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "red apple"}],
    },
    {
        "id": "b",
        "image": "images/b.png",
        "grid": [4, 5],
        "vision_labels": labels(1, 3, 7, 8, 19),
        "dropped": {"too_tall": 2, "token_conflict": 2},
        "messages": [
            {"role": "user", "content": "<image>Q1?"},
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "Q2?"},
            {"role": "assistant", "content": [{"type": "text", "text": "three blind mice"}]},
        ],
    },
    {  # a second QA group on the same image: one more sample, not one more image
        "id": "b2",
        "image": "images/b.png",
        "grid": [4, 5],
        "vision_labels": [],
        "dropped": {},
        "messages": [{"role": "user", "content": "<image>Q3?"}, {"role": "assistant", "content": "no"}],
    },
]


def test_table1_numbers_in_words(tmp_path):
    write_jsonl(tmp_path / "aligned.jsonl", RECORDS)
    s = file_stats(tmp_path / "aligned.jsonl")
    assert s["records"] == 3 and s["samples"] == 4 and s["images"] == 2
    assert s["text_labels"] == 2 + 1 + 3 + 1 and s["text_label_unit"] == "words"
    # per sample, as the paper's Table 1: record b holds two QA pairs, so its image counts twice
    assert s["vision_labels"] == 3 + 2 * 5 + 0 and s["visual_tokens"] == 6 + 2 * 20 + 20
    assert s["vision_coverage"] == pytest.approx(13 / 66)
    # per image: images a and b once each (b's first record)
    assert s["per_image"] == {"vision_labels": 8, "visual_tokens": 26, "vision_coverage": pytest.approx(8 / 26)}
    assert s["dropped"] == {"token_conflict": 2, "too_tall": 3}


def test_text_labels_in_tokens(qwen_tok):
    s = compute_stats(RECORDS, qwen_tok)
    answers = ["red apple", "yes", "three blind mice", "no"]
    expected = sum(len(qwen_tok.encode(a, add_special_tokens=False)) for a in answers)
    assert s["text_labels"] == expected and s["text_label_unit"] == "tokens"
    price = {**RECORDS[0], "messages": [{"role": "assistant", "content": "$1,250"}]}
    assert compute_stats([price], qwen_tok)["text_labels"] == 6  # "$", "1", ",", "2", "5", "0"
    assert compute_stats([price])["text_labels"] == 1


def test_label_kinds_and_blank_labels(qwen_tok):
    words = ["Total", "naïve", "42", "3.5%", "12/31", "COVID-19", "A4", "-", "•", "😀", "東京", "مرحبا", "١٢٣"]
    rec = {"id": "k", "image": "k.png", "grid": [4, 4], "vision_labels": labels(*range(len(words)))}
    for lab, w in zip(rec["vision_labels"], words, strict=True):
        lab["text"] = w
    s = compute_stats([rec])
    assert s["label_kinds"] == {"alphabetic": 2, "numeric": 4, "mixed": 2, "punctuation": 3, "other_script": 2}
    assert s["blank_labels"] == 0
    rec["vision_labels"][2]["token_id"] = 220  # the bare space the old " 42" labels got
    rec["vision_labels"][3]["token_id"] = 18
    assert compute_stats([rec], qwen_tok)["blank_labels"] == 1


def test_unaligned_records_are_rejected_by_id(tmp_path):
    write_jsonl(tmp_path / "words.jsonl", [RECORDS[0], {"id": "raw", "image": "x.png", "words": []}])
    with pytest.raises(ValueError, match=r"record 2 \(id raw\).*dvsft align"):
        file_stats(tmp_path / "words.jsonl")
