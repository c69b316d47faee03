"""`dvsft stats` numbers on a hand-built aligned file."""

import pytest

from dvsft.labels.stats import compute_stats, file_stats
from dvsft.records import write_jsonl
from dvsft.training.tiny import train_tokenizer


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
    assert s["vision_labels"] == 8 and s["visual_tokens"] == 6 + 20 + 20
    assert s["vision_coverage"] == pytest.approx(8 / 46)
    assert s["dropped"] == {"token_conflict": 2, "too_tall": 3}


def test_text_labels_in_tokens():
    tok = train_tokenizer(512)
    s = compute_stats(RECORDS, tok)
    answers = ["red apple", "yes", "three blind mice", "no"]
    expected = sum(len(tok.encode(a, add_special_tokens=False)) for a in answers)
    assert s["text_labels"] == expected and s["text_label_unit"] == "tokens"
    assert expected > 7  # a 512-token BPE splits some of these words


def test_unaligned_records_are_rejected_by_id(tmp_path):
    write_jsonl(tmp_path / "words.jsonl", [RECORDS[0], {"id": "raw", "image": "x.png", "words": []}])
    with pytest.raises(ValueError, match=r"record 2 \(id raw\).*dvsft align"):
        file_stats(tmp_path / "words.jsonl")
