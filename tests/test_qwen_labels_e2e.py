"""End to end on Qwen's real tokenizer: rendered SQuAD and a prepared, OCR-labelled DocVQA-like set,
aligned with `dvsft align --tokenizer` and counted by `dvsft stats`: numbers are labelled with the
first token of their content, and no label is ever a whitespace-only token."""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from dvsft.cli import app
from dvsft.core.records import read_jsonl

NUMBERS = "Invoice 4471 dated 12/31/2024 lists 42 items at $5 each, 3.5% tax, 7 boxes, total $1,250 paid at 10:45"


@pytest.fixture(scope="module")
def tokenizer_dir(qwen_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_tok")
    qwen_tok.save_pretrained(out)
    return out


def run(*args: str) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def content_id(text: str, tok) -> int:
    """The id of the first token of the word's content (Qwen's own splitting)."""
    spaced = tok(" " + text, add_special_tokens=False)["input_ids"]
    return tok(text, add_special_tokens=False)["input_ids"][0] if not tok.decode(spaced[:1]).strip() else spaced[0]


def align_and_stats(words: Path, tokenizer_dir: Path, qwen_tok) -> dict:
    aligned = words.parent / "aligned.jsonl"
    run("align", words, "--out", aligned, "--tokenizer", tokenizer_dir)
    stats = json.loads(run("stats", aligned, "--tokenizer", tokenizer_dir, "--json"))
    labels = [lab for r in read_jsonl(aligned) for lab in r["vision_labels"]]
    assert labels and all(lab["token_id"] == content_id(lab["text"], qwen_tok) for lab in labels)
    assert all(qwen_tok.decode([lab["token_id"]]).strip() for lab in labels) and 220 not in {
        lab["token_id"] for lab in labels
    }
    return stats


@pytest.mark.slow
def test_rendered_squad_has_no_whitespace_labels(tmp_path, tokenizer_dir, qwen_tok):
    context = f"{NUMBERS}. The shipment of 2019 weighed 3.5 tons and cost 12.5% more than 100 units in 2018."
    qas = [
        {"id": "q1", "question": "How many items?", "answers": [{"text": "42", "answer_start": context.index("42")}]},
        {"id": "q2", "question": "Tax?", "answers": [{"text": "3.5%", "answer_start": context.index("3.5%")}]},
    ]
    src = tmp_path / "squad.json"
    src.write_text(
        json.dumps({"version": "v1.1", "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]})
    )
    run("render", src, "--out", tmp_path / "r", "--cols", 16, "--max-rows", 8, "--font", "DejaVuSans")
    stats = align_and_stats(tmp_path / "r" / "words.jsonl", tokenizer_dir, qwen_tok)
    assert stats["blank_labels"] == 0 and stats["samples"] == 2
    assert stats["label_kinds"]["numeric"] >= 5 and stats["label_kinds"]["alphabetic"] >= 5


@pytest.mark.slow
def test_prepared_docvqa_like_set_has_no_whitespace_labels(tmp_path, tokenizer_dir, qwen_tok):
    import matplotlib

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), 28)
    image = Image.new("RGB", (1000, 220), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(["Invoice 4471  Qty 42  Price $5", "Tax 3.5%  Boxes 7  Due 12/31/2024", "Total 1250"]):
        draw.text((20, 20 + 65 * i), line, font=font, fill="black")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    row = {"questionId": "1", "question": "What is the quantity?", "answers": ["42"]}
    table = pa.Table.from_pylist([{**row, "image": {"bytes": buf.getvalue(), "path": None}}])
    (tmp_path / "DocVQA").mkdir()
    pq.write_table(table, tmp_path / "DocVQA" / "train-00000-of-00001.parquet")
    run("prepare", "docvqa", tmp_path / "DocVQA", "--out", tmp_path / "p", "--split", "train")
    run("label", tmp_path / "p" / "docvqa_train.jsonl", "--out", tmp_path / "p" / "words.jsonl", "--no-progress")
    (record,) = read_jsonl(tmp_path / "p" / "words.jsonl")
    found = {w["text"] for w in record["words"]}
    assert {"42", "7", "3.5%", "$5"} & found, found  # real OCR reads the numbers
    stats = align_and_stats(tmp_path / "p" / "words.jsonl", tokenizer_dir, qwen_tok)
    assert stats["blank_labels"] == 0 and stats["samples"] == 1 and stats["label_kinds"]["numeric"] >= 2
