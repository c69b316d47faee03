"""Benchmark loaders on small fixtures in every documented layout, aggregations, OCR-VQA visibility, OCR sets."""

from __future__ import annotations

import json
import random

import pytest
from benchmark_files import (
    SQUAD,
    TEXTVQA_ANSWERS,
    _f,
    chartqa_official,
    chartqa_parquet,
    docvqa_official,
    infovqa_official,
    lmms_docvqa,
    mme_official,
    mme_parquet,
    ocrbench_official,
    ocrbench_parquet,
    ocrvqa_official,
    ocrvqa_parquet,
    squad_official,
    squad_parquet,
    text_image,
    textvqa_official,
    textvqa_parquet,
    word_records,
    write_parquet,
)
from PIL import Image

from dvsft.evaluation import benchmarks as B
from dvsft.evaluation import metrics as M
from dvsft.evaluation.items import EvalItem
from dvsft.evaluation.loaders import iter_items


def ids(items):
    return [it.id for it in items]


# ------------------------------------------------------------------------------------ loader tests


def test_lmms_docvqa_parquet(tmp_path):
    root = lmms_docvqa(tmp_path / "DocVQA")
    items = list(iter_items("docvqa", root))
    assert ids(items) == ["337", "338", "339"]
    assert items[0].answers == ["1 May 1990", "May 1, 1990"] and items[0].meta["questionId"] == 337
    assert items[0].load_images()[0].size == (160, 64)
    test = list(iter_items("docvqa", root, split="test"))
    assert ids(test) == ["57344", "57345"] and all(it.answers == [] for it in test)
    info = list(iter_items("infovqa", root))
    assert ids(info) == ["98313", "98314"] and info[1].answers == ["France"]
    assert ids(iter_items("docvqa", root, images=False)) == ids(items)
    assert ids(iter_items("docvqa", root, only_ids={"338"})) == ["338"]


def test_official_docvqa_and_infovqa_json(tmp_path):
    items = list(iter_items("docvqa", docvqa_official(tmp_path / "d")))
    assert ids(items) == ["337", "338"] and items[1].answers == ["J. Smith"]
    assert items[1].images[0] == tmp_path / "d" / "val" / "documents" / "doc1.png"
    info = list(iter_items("infovqa", infovqa_official(tmp_path / "i")))
    assert [it.meta["questionId"] for it in info] == [98313, 98314]
    assert info[0].load_images()[0].size == (160, 64)


@pytest.mark.parametrize("layout", [chartqa_parquet, chartqa_official])
def test_chartqa_layouts(tmp_path, layout):
    items = list(iter_items("chartqa", layout(tmp_path)))
    assert sorted(it.answers[0] for it in items) == ["12.5", "2019", "45%"]
    types = {it.answers[0]: it.meta["type"] for it in items}
    assert types == {"12.5": "human_test", "2019": "augmented_test", "45%": "augmented_test"}
    assert len(set(ids(items))) == 3
    assert all(it.load_images()[0].size == (160, 64) for it in items)


@pytest.mark.parametrize("layout", [ocrbench_parquet, ocrbench_official])
def test_ocrbench_layouts(tmp_path, layout):
    items = list(iter_items("ocrbench", layout(tmp_path)))
    assert [it.meta["dataset"] for it in items] == ["IIIT5K", "HME100k", "docVQA"]
    assert items[1].meta["question_type"] == "Handwritten Mathematical Expression Recognition"
    assert items[1].answers == ["x^{2}+1"] and items[2].answers == ["1990", "May 1990"]
    assert items[0].load_images()


@pytest.mark.parametrize("layout", [textvqa_parquet, textvqa_official])
def test_textvqa_layouts(tmp_path, layout):
    items = list(iter_items("textvqa", layout(tmp_path)))
    assert ids(items) == ["34602", "34603"]
    assert items[0].answers == TEXTVQA_ANSWERS[0] and len(items[0].answers) == 10
    assert items[1].meta["image_id"] == "00685bc495504d61" and items[1].load_images()


@pytest.mark.parametrize("layout", [mme_parquet, mme_official])
def test_mme_layouts(tmp_path, layout):
    items = list(iter_items("mme", layout(tmp_path)))
    assert ids(items) == ["OCR/0001.jpg#0", "OCR/0001.jpg#1", "code_reasoning/0020.png#0", "code_reasoning/0020.png#1"]
    assert [it.answers[0] for it in items] == ["Yes", "No", "Yes", "No"]
    assert items[2].meta == {"category": "code_reasoning", "pair": "code_reasoning/0020.png"}
    assert ids(iter_items("mme", tmp_path, images=False)) == ids(items)


@pytest.mark.parametrize("layout", [ocrvqa_parquet, ocrvqa_official])
def test_ocrvqa_layouts(tmp_path, layout):
    items = list(iter_items("ocrvqa", layout(tmp_path)))
    assert ids(items) == ["1234567-0", "1234567-1", "7654321-0"]
    assert [it.answers for it in items] == [["Harry"], ["No"], ["Chess"]]
    assert items[0].meta["image_id"] == "1234567" and items[2].load_images()


@pytest.mark.parametrize("layout", [squad_parquet, squad_official])
def test_squad_layouts_render_the_context(tmp_path, layout):
    items = list(iter_items("squad", layout(tmp_path)))
    assert ids(items) == [r[0] for r in SQUAD] and items[0].answers == ["1842", "in 1842"]
    pages = items[0].load_images()
    assert len(pages) == 1 and pages[0].width == 32 * 32  # the renderer's 32-cell page
    assert pages[0].getextrema()[0][0] != pages[0].getextrema()[0][1]  # text was drawn


def test_word_records_for_any_benchmark(tmp_path):
    recs = word_records(tmp_path / "r" / "words.jsonl")
    items = list(iter_items("docvqa", recs))
    assert ids(items) == ["rec-0", "rec-1", "rec-2"]
    assert items[2].question == "What is word 2?" and items[2].answers == ["gamma"]
    ocr = list(iter_items("ocr", word_records(tmp_path / "o" / "words.jsonl", transcription=True)))
    assert ocr[2].answers == ["alpha beta gamma"]
    # without an assistant turn the OCR reference is the words joined by spaces
    row = json.loads((tmp_path / "o" / "words.jsonl").read_text().splitlines()[1])
    row["messages"] = row["messages"][:1]
    (tmp_path / "o" / "w2.jsonl").write_text(json.dumps(row) + "\n")
    assert next(iter_items("ocr", tmp_path / "o" / "w2.jsonl")).answers == ["alpha beta"]


def test_loader_errors_name_the_file_and_reason(tmp_path):
    root = chartqa_official(tmp_path / "c")
    (root / "test" / "png" / "human0.png").unlink()
    with pytest.raises(ValueError, match=r"test_human\.json: item human_test-0: image 'human0\.png' not found"):
        list(iter_items("chartqa", root))
    S, _, _, IMG = _f()
    bad = write_parquet(
        tmp_path / "b" / "data" / "test-0.parquet",
        {"question": ["q"], "image": [text_image("x")]},
        {"question": S, "image": IMG},
    )
    with pytest.raises(ValueError, match=r"test-0\.parquet: row 0 lacks column\(s\) answer"):
        list(iter_items("chartqa", bad))
    with pytest.raises(ValueError, match="found no validation split of textvqa"):
        list(iter_items("textvqa", tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_items("docvqa", tmp_path / "nope"))
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "x", "messages": []}) + "\n")
    (item,) = iter_items("docvqa", tmp_path / "r.jsonl")  # a bad record fails when its batch loads it
    with pytest.raises(ValueError, match=r"item x: .*r\.jsonl:1: record has no 'image'"):
        item.load_images()
    broken = EvalItem("b1", "q", ["a"], [b"not an image"])
    with pytest.raises(ValueError, match="item b1: cannot read image"):
        broken.load_images()


# ------------------------------------------------------------------------------------ aggregation


def rows_for(bench: B.Benchmark, preds: list[tuple[str, list[str], dict]]) -> list[dict]:
    rows = []
    for i, (pred, answers, meta) in enumerate(preds):
        row = {"id": str(i), "prediction": pred, "answers": answers, "meta": meta}
        row.update(bench.score(row) or {"score": None})
        rows.append(row)
    return rows


def test_mme_aggregate_acc_and_acc_plus():
    mme = B.get_benchmark("mme")
    ocr, code = {"category": "OCR"}, {"category": "code_reasoning"}
    rows = rows_for(
        mme,
        [
            ("Yes", ["Yes"], {**ocr, "pair": "a"}),
            ("No", ["No"], {**ocr, "pair": "a"}),  # both right
            ("Yes", ["Yes"], {**ocr, "pair": "b"}),
            ("Yes", ["No"], {**ocr, "pair": "b"}),  # one right
            ("No", ["Yes"], {**code, "pair": "c"}),
            ("Yes", ["No"], {**code, "pair": "c"}),  # none
        ],
    )
    agg = mme.aggregate(rows)
    assert agg["categories"]["OCR"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "images": 2}
    assert agg["perception"] == 125.0 and agg["cognition"] == 0.0 and agg["total"] == 125.0


def test_ocrbench_aggregate_sums_per_type():
    bench = B.get_benchmark("ocrbench")
    reg = {"dataset": "IIIT5K", "question_type": "Regular Text Recognition"}
    doc = {"dataset": "docVQA", "question_type": "Doc-oriented VQA"}
    rows = rows_for(bench, [("CENTRE", ["centre"], reg), ("x", ["y"], reg), ("in 1990", ["1990"], doc)])
    agg = bench.aggregate(rows)
    assert agg["final_score"] == 2 and agg["text_recognition"] == 1
    assert agg["per_type"] == {
        "Regular Text Recognition": {"correct": 1, "n": 2},
        "Doc-oriented VQA": {"correct": 1, "n": 1},
    }
    assert agg["accuracy"] == pytest.approx(200 / 3) and agg["complete"] is False


def test_chartqa_and_anls_aggregates():
    chart = B.get_benchmark("chartqa")
    rows = rows_for(chart, [("12", ["12.5"], {"type": "human_test"}), ("x", ["y"], {"type": "augmented_test"})])
    assert chart.aggregate(rows) == {
        "relaxed_overall": 50.0,
        "n_scored": 2,
        "relaxed_human_split": 100.0,
        "relaxed_augmented_split": 0.0,
    }
    doc = B.get_benchmark("docvqa")
    rows = rows_for(doc, [("cat", ["car"], {}), ("dog", ["dog"], {}), ("z", [], {})])
    assert rows[2]["score"] is None  # private answers are not scored
    assert doc.aggregate(rows)["anls"] == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_ocr_aggregate_per_scale():
    ocr = B.get_benchmark("ocr")
    rows = rows_for(
        ocr,
        [
            ("the cat sat", ["the cat sat"], {"scale": 1.0}),
            ("the cot", ["the cat sat"], {"scale": 0.5}),
            ("", ["ab"], {"scale": 0.5}),
        ],
    )
    agg = ocr.aggregate(rows)
    assert agg["scales"]["1.0"]["cer"] == 0.0 and agg["word_accuracy"] == 100.0
    half = agg["scales"]["0.5"]
    assert half["cer"] == pytest.approx(100 * (5 / 11 + 1) / 2)  # "the cot" vs "the cat sat": 5 edits
    assert half["corpus_cer"] == pytest.approx(100 * 7 / 13)
    assert half["word_accuracy"] == pytest.approx(100 * (1 / 3) / 2)
    assert half["corpus_word_accuracy"] == pytest.approx(100 * 1 / 4)


def test_prompts():
    item = EvalItem("1", "what does the sign say? Please answer yes or no.", ["x"])
    assert (
        B.get_benchmark("docvqa").prompt(item) == item.question + "\nAnswer the question using a single word or phrase."
    )
    assert B.get_benchmark("textvqa").prompt(EvalItem("1", "WHAT is it?", [])).startswith("What is it?\n")
    assert B.get_benchmark("mme").prompt(item).startswith("what does the sign say?\nAnswer")
    assert B.get_benchmark("ocr").prompt(item) == "Transcribe the text in the image."
    with pytest.raises(ValueError, match="unknown benchmark"):
        B.get_benchmark("vqav2")


# ------------------------------------------------------------------------------------ OCR-VQA visibility


def test_select_visible_uses_real_ocr(tmp_path):
    from dvsft.evaluation.visible import answer_visible, ocr_engine, select_visible

    assert answer_visible("Harry Potter", "HARRY  POTTER and the") and not answer_visible("No", "HARRY")
    assert not answer_visible("?!", "anything")
    root = ocrvqa_parquet(tmp_path)
    ocr = ocr_engine({"Det.limit_type": "max", "Det.limit_side_len": 480})  # small covers: no upscaling
    sel = select_visible(root, n=5, seed=3, ocr=ocr)
    assert sorted(sel["ids"]) == ["1234567-0", "7654321-0"]  # "No" is not printed on the cover
    assert sel["images_ocred"] == 2 and sel["questions_checked"] == 3
    one = select_visible(root, n=1, seed=3, ocr=ocr)
    assert len(one["ids"]) == 1 and one["ids"][0] in sel["ids"]


# ------------------------------------------------------------------------------------ OCR test sets


def test_ocr_sets_are_word_records(tmp_path):
    from dvsft.core.records import read_jsonl
    from dvsft.evaluation.ocr_tasks import build_ocr_set, noncontextual_texts, passages

    for kind in ("contextual", "noncontextual"):
        recs = build_ocr_set(kind, tmp_path / kind, n=2, seed=1, cols=24, max_rows=16)
        rows = list(read_jsonl(recs))
        assert len(rows) == 2
        for row in rows:
            ref = row["messages"][1]["content"]
            assert ref == " ".join(w["text"] for w in row["words"]) and 150 <= len(ref) <= 600
            assert Image.open(recs.parent / row["image"]).size == (row["width"], row["height"])
        items = list(iter_items("ocr", recs))
        assert items[0].answers == [rows[0]["messages"][1]["content"]]
    texts = noncontextual_texts(["a bb ccc a a dddd"], 20, random.Random(0), 20, 40)
    assert all(20 <= len(t) <= 40 and set(t.split()) <= {"a", "bb", "ccc", "dddd"} for t in texts)
    assert passages(["one two three four five six"], 5, 12) == ["one two", "three four", "five six"]


def test_ocr_set_cli(tmp_path):
    from typer.testing import CliRunner

    from dvsft.cli import app

    corpus = tmp_path / "xsum.jsonl"
    docs = [{"id": str(i), "document": " ".join(["news"] * 30 + [f"story{i}"] * 30), "summary": "s"} for i in range(3)]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "set"
    args = ["ocr-set", "contextual", "--corpus", str(corpus), "--n", "3", "--out", str(out), "--cols", "24"]
    result = CliRunner().invoke(app, [*args, "--max-rows", "12", "--max-chars", "300"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "info.json").read_text())
    assert info["n"] == 3 and info["kind"] == "contextual" and 200 <= info["mean_reference_chars"] <= 300
    refs = sorted(it.answers[0] for it in iter_items("ocr", out / "words.jsonl"))
    assert all(r.startswith("news") or r.startswith("story") for r in refs)
    bad = CliRunner().invoke(app, ["ocr-set", "contextual", "--corpus", str(corpus), "--n", "50", "--out", str(out)])
    assert bad.exit_code == 2 and "fewer than 50" in " ".join(bad.output.split())


def test_ocr_row_scores_are_cer_and_word_accuracy():
    """The OCR row counts its edits and matches once; its rates equal metrics.cer and metrics.word_accuracy."""
    bench = B.get_benchmark("ocr")
    pairs = [
        ("the quick  brown fox", "the quick brown fox jumps"),
        ("", "a b"),
        ("a b", ""),
        ("", ""),
        ("xyz", "x y z"),
    ]
    for pred, ref in pairs:
        row = bench.score({"prediction": pred, "answers": [ref]})
        assert row["cer"] == M.cer(pred, ref) and row["word_accuracy"] == row["score"] == M.word_accuracy(pred, ref)
        assert row["edits"] == M.levenshtein(" ".join(pred.split()), " ".join(ref.split()))
        assert (row["ref_chars"], row["ref_words"]) == (len(" ".join(ref.split())), len(ref.split()))
    row = bench.score({"prediction": "the quick  brown fox", "answers": ["the quick brown fox jumps"]})
    assert (row["matched"], row["edits"], row["word_accuracy"], row["cer"]) == (4, 6, 0.8, 6 / 25)
