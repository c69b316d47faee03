"""The official-JSON readers of dvsft.sources.qa_json (SQuAD; DocVQA / InfographicVQA) and the commands using them."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from benchmark_files import docvqa_official, infovqa_official

from dvsft.core.records import read_jsonl
from dvsft.evaluation.loaders import iter_items
from dvsft.sources.corpora import load_documents
from dvsft.sources.prepare import prepare_dataset
from dvsft.sources.qa_json import read_squad_file

CONTEXT = "Ada wrote it in London in 1843."
QAS = [
    {
        "id": "q1",
        "question": " Who? ",
        "answers": [{"text": " ", "answer_start": 0}, {"text": "Ada", "answer_start": 0}],
    },
    {"id": "q2", "question": "Where?", "answers": [{"text": "London", "answer_start": 16}, {"text": "in London"}]},
    {"id": "q3", "question": "Why?", "answers": [], "plausible_answers": [{"text": "x"}], "is_impossible": True},
    {"id": "q4", "question": "When?", "answers": []},
]


def squad_v2(path):
    path.write_text(
        json.dumps({"version": "v2.0", "data": [{"title": "Ada", "paragraphs": [{"context": CONTEXT, "qas": QAS}]}]})
    )
    return path


def test_reader_keeps_the_file_and_drops_blank_answers(tmp_path):
    (para,) = read_squad_file(squad_v2(tmp_path / "dev-v2.0.json"))
    assert (para.article, para.index, para.title, para.context) == (0, 0, "Ada", CONTEXT)
    q1, q2, q3, q4 = para.questions
    assert (q1.id, q1.question, q1.answers, q1.answer_start) == ("q1", " Who? ", ["Ada"], 0)
    assert (q2.answers, q2.answer_start, q2.impossible) == (["London", "in London"], 16, False)
    assert q3.impossible and q3.answers == [] and not q4.impossible and q4.answers == []


def test_prepare_render_and_eval_read_the_same_questions(tmp_path):
    src = squad_v2(tmp_path / "dev-v2.0.json")
    stats = prepare_dataset("squad", src, tmp_path / "o", qa_per_image=0)
    (row,) = read_jsonl(stats.out)
    assert [m["content"] for m in row["messages"]] == ["<image>Who?", "Ada", "Where?", "London"]
    assert stats.skipped == {"impossible question": 1, "no answer": 1}
    counts: Counter = Counter()
    (doc,) = load_documents(src, counts=counts)
    assert [(q.id, q.answers) for q in doc.qas] == [("q1", ["Ada"]), ("q2", ["London", "in London"])]
    assert counts == {"impossible_questions": 1, "unanswered_questions": 1}
    items = list(iter_items("squad", src, images=False))
    assert [(i.id, i.answers, i.meta["title"]) for i in items] == [
        ("q1", ["Ada"], "Ada"),
        ("q2", ["London", "in London"], "Ada"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"bad\.json: invalid JSON"),
        ('{"data": {}}', r"bad\.json: not a SQuAD file"),
        ('{"data": [{"paragraphs": [{"qas": []}]}]}', r"bad\.json: data\[0\]\.paragraphs\[0\]: missing 'context'"),
        (
            '{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": 1}]}]}]}',
            r"paragraphs\[0\]\.qas\[0\]: missing 'question'",
        ),
    ],
)
def test_reader_errors_name_the_place(tmp_path, text, message):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    for read in (read_squad_file, load_documents, lambda p: prepare_dataset("squad", p, tmp_path / "o")):
        with pytest.raises(ValueError, match=message):
            list(read(bad))


@pytest.mark.parametrize(("bench", "layout"), [("docvqa", docvqa_official), ("infovqa", infovqa_official)])
def test_prepare_and_eval_read_the_same_vqa_entries(tmp_path, bench, layout):
    root = layout(tmp_path / "d")
    stats = prepare_dataset(bench, root, tmp_path / "o", qa_per_image=0, instructions=False)
    prepared = {(r["id"], r["messages"][0]["content"], r["messages"][1]["content"]) for r in read_jsonl(stats.out)}
    items = {(f"{bench}-{i.id}", "<image>" + i.question, i.answers[0]) for i in iter_items(bench, root)}
    assert prepared == items and len(items) == 2 and stats.missing_images == 0


@pytest.mark.parametrize("bench", ["docvqa", "infovqa"])
def test_vqa_entry_errors_name_the_entry(tmp_path, bench):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"questionId": 1, "question": "q?", "image": "a.png"}, {"question": "no image"}]}')
    with pytest.raises(ValueError, match=r"data\[1\] has no"):
        prepare_dataset(bench, bad, tmp_path / "o")
    with pytest.raises(ValueError, match=r"data\[1\] has no"):
        list(iter_items(bench, bad, images=False))
