"""Dataset inputs (ShareGPT / LLaVA, JSON / JSONL) and `dvsft prepare` layouts, on generated fixtures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from dvsft.cli import app
from dvsft.core.records import image_path, read_jsonl
from dvsft.sources.formats import load_dataset_samples
from dvsft.sources.image_to_label import collect_inputs, errors_path, label_inputs
from dvsft.sources.instructions import FORMAT_INSTRUCTIONS
from dvsft.sources.ocr import register_engine
from dvsft.sources.prepare import prepare_dataset


@register_engine("test-blank")
class BlankEngine:
    """Finds nothing: these tests check conversation and path plumbing, not OCR."""

    def __init__(self, **_):
        pass

    def __call__(self, image):
        return []


def png_bytes(color, size=(24, 16), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---- ShareGPT / LLaVA inputs -------------------------------------------------------------------------------

SHAREGPT = [
    {
        "id": "sg1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>What is the total?"},
            {"role": "assistant", "content": "$12"},
        ],
        "images": ["imgs/a.png"],
    },
    {  # list content parts, no id: id falls back to the image path
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Title?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Report"}]},
        ],
        "images": "imgs/b.png",
    },
]
LLAVA = [
    {
        "id": "lv1",
        "image": "imgs/a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWho signed?"},
            {"from": "gpt", "value": "J. Smith"},
            {"from": "human", "value": "When?"},
            {"from": "gpt", "value": "1993"},
        ],
    },
    {  # no placeholder: <image> is prepended to the first user turn
        "id": "lv2",
        "image": "imgs/b.png",
        "conversations": [{"from": "human", "value": "Date?"}, {"from": "gpt", "value": "May"}],
    },
]


def write_dataset(folder: Path, name: str, samples: list[dict]) -> Path:
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    for n, c in (("a", "white"), ("b", "gray")):
        (folder / "imgs" / f"{n}.png").write_bytes(png_bytes(c))
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    else:
        path.write_text(json.dumps(samples))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_sharegpt_and_llava_conversations_are_carried(tmp_path, suffix):
    sg = write_dataset(tmp_path / "d", "sharegpt" + suffix, SHAREGPT)
    lv = write_dataset(tmp_path / "d", "llava" + suffix, LLAVA)
    out = tmp_path / "out" / "words.jsonl"
    label_inputs(collect_inputs(sg) + collect_inputs(lv), out, engine="test-blank")
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == {"sg1", "imgs/b.png", "lv1", "lv2"}
    assert rows["sg1"]["messages"] == SHAREGPT[0]["messages"]
    assert rows["imgs/b.png"]["messages"] == [
        {"role": "user", "content": "<image>Title?"},
        {"role": "assistant", "content": "Report"},
    ]
    assert rows["lv1"]["messages"][0] == {"role": "user", "content": "<image>\nWho signed?"}
    assert [m["role"] for m in rows["lv1"]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert rows["lv2"]["messages"][0]["content"] == "<image>Date?"
    for r in rows.values():  # image paths resolve from the output file, sizes recorded
        assert image_path(r, out).resolve().parent == (tmp_path / "d" / "imgs").resolve()
        assert (r["width"], r["height"], r["words"]) == (24, 16, [])


def test_dataset_errors_ids_and_image_root(tmp_path):
    root = tmp_path / "elsewhere"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "only_here.png").write_bytes(png_bytes("white"))
    samples = [
        {"id": "x", "image": "imgs/only_here.png"},
        {"id": "x", "image": "imgs/only_here.png"},  # repeated id -> x#2
        {"id": "bad-role", "image": "a.png", "conversations": [{"from": "robot", "value": "hi"}]},
        {"id": "two-tags", "image": "a.png", "messages": [{"role": "user", "content": "<image><image>?"}]},
    ]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(samples))
    got = load_dataset_samples(ds, image_root=root)
    assert [s.id for s in got] == ["x", "x#2", "bad-role", "two-tags"]
    assert got[0].path == root / "imgs" / "only_here.png"
    assert got[2].error[0] == "bad sample" and "robot" in got[2].error[1]
    assert got[3].error[0] == "multi-image sample"
    assert load_dataset_samples(ds)[0].path == tmp_path / "imgs" / "only_here.png"  # default: next to the file

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "image": "a.png"}\n{not json}\n{"id": 2, "image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        load_dataset_samples(broken)
    obj = tmp_path / "obj.json"
    obj.write_text('{"data": []}')
    with pytest.raises(ValueError, match="obj.json: expected a JSON list"):
        collect_inputs(obj)


# ---- prepare: parquet (lmms-lab) ---------------------------------------------------------------------------


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("questionId", pa.string()),
            ("question", pa.string()),
            ("question_types", pa.list_(pa.string())),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("docId", pa.int64()),
            ("answers", pa.list_(pa.string())),
            ("data_split", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def qa_row(qid, question, answers, image_bytes, doc, split="train"):
    return {
        "questionId": qid,
        "question": question,
        "question_types": ["form"],
        "image": {"bytes": image_bytes, "path": None},
        "docId": doc,
        "answers": answers,
        "data_split": split,
    }


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms") / "DocVQA"
    a, b, c = png_bytes("white"), png_bytes("red", fmt="JPEG"), png_bytes("blue")
    write_parquet(
        root / "train-00000-of-00001.parquet",
        [
            qa_row("1", "What is the date?", ["1/8/93", "Jan 8"], a, 10),
            qa_row("2", "Who is it from?", ["R. Kennedy"], a, 10),
            qa_row("3", "What is the fax number?", ["555-1234"], b, 11),
            qa_row("4", "Total pages?", ["4"], a, 10),
            qa_row("5", "Hidden?", None, c, 12),  # test-split style: no answers
        ],
    )
    write_parquet(root / "validation-00000-of-00001.parquet", [qa_row("9", "Heading?", ["MEMO"], c, 12, "validation")])
    return root


def test_prepare_docvqa_parquet(parquet_dir, tmp_path):
    stats = prepare_dataset("docvqa", parquet_dir, tmp_path / "o", split="train")
    rows = list(read_jsonl(stats.out))
    assert stats.out.name == "docvqa_train.jsonl" and stats.skipped == {"no answer": 1}
    assert len(rows) == 2 and stats.qa_total == 4 and stats.qa_kept == 2
    by_q = {"What is the date?": "1/8/93", "Who is it from?": "R. Kennedy", "Total pages?": "4"}
    for r in rows:
        user, assistant = r["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>")
        img = image_path(r, stats.out)
        assert img.parent == tmp_path / "o" / "images" and img.read_bytes()[:4] == b"\x89PNG"
        if r["id"] == "docvqa-3":  # the JPEG row, re-encoded as PNG with the same pixels
            assert (
                np.asarray(Image.open(img)).tolist()
                == np.asarray(Image.open(io.BytesIO(png_bytes("red", fmt="JPEG")))).tolist()
            )
            assert assistant["content"] == "555-1234"
        else:
            question, instruction = user["content"][len("<image>") :].split("\n")
            assert by_q[question] == assistant["content"] and instruction in FORMAT_INSTRUCTIONS
    assert len(list((tmp_path / "o" / "images").iterdir())) == 2  # the unanswered image is not written

    again = prepare_dataset("docvqa", parquet_dir, tmp_path / "o2", split="train")
    assert [r["messages"] for r in read_jsonl(again.out)] == [r["messages"] for r in rows]  # seeded, stable

    everything = prepare_dataset("docvqa", parquet_dir, tmp_path / "o3", split="train", qa_per_image=0)
    turns = {r["id"]: len(r["messages"]) // 2 for r in read_jsonl(everything.out)}
    assert sorted(turns.values()) == [1, 3]
    separate = prepare_dataset("docvqa", parquet_dir, tmp_path / "o4", split="train", qa_per_image=0, multi_turn=False)
    ids = [r["id"] for r in read_jsonl(separate.out)]
    assert sorted(ids) == ["docvqa-1", "docvqa-2", "docvqa-3", "docvqa-4"]
    labeled = label_inputs(collect_inputs(separate.out), tmp_path / "w.jsonl", engine="test-blank")
    assert (labeled.records, labeled.images) == (4, 2)  # one OCR pass per distinct image

    val = prepare_dataset("docvqa", parquet_dir, tmp_path / "o5", split="validation")
    assert [r["messages"][1]["content"] for r in read_jsonl(val.out)] == ["MEMO"]
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        prepare_dataset("docvqa", parquet_dir, tmp_path / "o6", split="test")


def test_prepare_infovqa_parquet_two_pairs_per_image(tmp_path):
    img = png_bytes("green")
    write_parquet(
        tmp_path / "InfographicVQA" / "validation-00000-of-00001.parquet",
        [qa_row(str(k), f"Question {k}?", [f"answer {k}"], img, 1, "validation") for k in range(5)],
    )
    stats = prepare_dataset("infovqa", tmp_path / "InfographicVQA", tmp_path / "o")
    (row,) = read_jsonl(stats.out)
    msgs = row["messages"]
    assert len(msgs) == 4 and msgs[0]["content"].startswith("<image>Question ")
    assert "<image>" not in msgs[2]["content"]
    for q, a in ((msgs[0]["content"], msgs[1]["content"]), (msgs[2]["content"], msgs[3]["content"])):
        k = q.split("\n")[0].removeprefix("<image>").removeprefix("Question ").rstrip("?")
        assert a == f"answer {k}"


def test_prepare_adds_format_instructions_to_every_question(tmp_path):
    """Paper appendix A.1: format-control instructions in the training data of DocVQA and InfoVQA too."""
    colours = ["red", "green", "blue", "white", "black", "gray", "yellow", "purple"]
    rows = [qa_row(str(k), f"Question {k}?", [f"a{k}"], png_bytes(c), k, "train") for k, c in enumerate(colours)]
    rows += [qa_row(f"{k}b", f"Question {k}b?", [f"b{k}"], png_bytes(c), k, "train") for k, c in enumerate(colours)]
    write_parquet(tmp_path / "in" / "train-00000-of-00001.parquet", rows)
    seen = []
    for dataset in ("docvqa", "infovqa"):
        stats = prepare_dataset(dataset, tmp_path / "in", tmp_path / dataset, qa_per_image=0)
        for r in read_jsonl(stats.out):
            for m in r["messages"][::2]:
                question, instruction = m["content"].removeprefix("<image>").split("\n")
                assert question.startswith("Question ") and instruction in FORMAT_INSTRUCTIONS
                seen.append(instruction)
        again = prepare_dataset(dataset, tmp_path / "in", tmp_path / f"{dataset}2", qa_per_image=0)
        assert list(read_jsonl(again.out)) == list(read_jsonl(stats.out))  # seeded per image
        plain = prepare_dataset(dataset, tmp_path / "in", tmp_path / f"{dataset}3", qa_per_image=0, instructions=False)
        assert all("\n" not in m["content"] for r in read_jsonl(plain.out) for m in r["messages"])
    assert len(set(seen)) > 1  # drawn at random, not one fixed instruction


# ---- prepare: official JSON releases -----------------------------------------------------------------------


def test_prepare_docvqa_official_json(tmp_path):
    rel = tmp_path / "train"
    (rel / "documents").mkdir(parents=True)
    (rel / "documents" / "xnbl0037_1.png").write_bytes(png_bytes("white"))
    (rel / "documents" / "pybv0228_81.png").write_bytes(png_bytes("gray"))
    data = [
        {
            "questionId": 337,
            "question": "what is the date?",
            "image": "documents/xnbl0037_1.png",
            "answers": ["1/8/93"],
        },
        {"questionId": 338, "question": "who wrote it?", "image": "documents/xnbl0037_1.png", "answers": ["Al"]},
        {"questionId": 400, "question": "page number?", "image": "documents/pybv0228_81.png", "answers": ["81"]},
    ]
    (rel / "train_v1.0.json").write_text(json.dumps({"dataset_name": "docvqa", "data": data}))
    stats = prepare_dataset("docvqa", rel, tmp_path / "o", split="train", instructions=False)
    rows = list(read_jsonl(stats.out))
    assert len(rows) == 2 and stats.qa_kept == 2 and stats.missing_images == 0
    for r in rows:
        assert image_path(r, stats.out).resolve().parent == (rel / "documents").resolve()
    (page,) = [r for r in rows if r["id"] == "docvqa-400"]
    assert page["messages"] == [
        {"role": "user", "content": "<image>page number?"},
        {"role": "assistant", "content": "81"},
    ]
    # Then `dvsft label` on the prepared file: images resolve, conversations carried.
    out = tmp_path / "labels" / "words.jsonl"
    label_inputs(collect_inputs(stats.out), out, engine="test-blank")
    assert {r["id"]: r["messages"] for r in read_jsonl(out)} == {r["id"]: r["messages"] for r in rows}
    assert not errors_path(out).exists() or list(read_jsonl(errors_path(out))) == []


def test_prepare_infovqa_official_json_with_image_root(tmp_path):
    (tmp_path / "ann").mkdir()
    images = tmp_path / "imgs_somewhere"
    images.mkdir()
    (images / "37313.jpeg").write_bytes(png_bytes("white", fmt="JPEG"))
    data = [
        {"questionId": 1, "question": "q1?", "image_local_name": "37313.jpeg", "answers": ["a1"]},
        {"questionId": 2, "question": "q2?", "image_local_name": "37313.jpeg", "answers": ["a2"]},
        {"questionId": 3, "question": "q3?", "image_local_name": "99999.jpeg", "answers": ["a3"]},
    ]
    ann = tmp_path / "ann" / "infographicsVQA_train_v1.0.json"
    ann.write_text(json.dumps({"data": data}))
    stats = prepare_dataset("infovqa", ann, tmp_path / "o", image_root=images, instructions=False)
    rows = {r["id"]: r for r in read_jsonl(stats.out)}
    assert [m["content"] for m in rows["infovqa-1"]["messages"]] == ["<image>q1?", "a1", "q2?", "a2"]
    assert image_path(rows["infovqa-1"], stats.out).resolve() == (images / "37313.jpeg").resolve()
    assert stats.missing_images == 1  # 99999.jpeg: reported, left for `dvsft label` to list as missing


# ---- prepare: SQuAD ----------------------------------------------------------------------------------------


def squad_file(path: Path, v2: bool) -> Path:
    qa = {"id": "q1", "question": "Who?", "answers": [{"text": "Ada", "answer_start": 0}]}
    qas = [qa, {"id": "q2", "question": "Where?", "answers": [{"text": "London", "answer_start": 20}]}]
    if v2:
        qas.append(
            {"id": "q3", "question": "Why?", "answers": [], "plausible_answers": [{"text": "x"}], "is_impossible": True}
        )
    paragraphs = [{"context": "Ada wrote it, then in London.", "qas": qas}]
    if v2:
        paragraphs.append(
            {
                "context": "Nothing answerable.",
                "qas": [{"id": "q9", "question": "?", "answers": [], "is_impossible": True}],
            }
        )
    path.write_text(
        json.dumps({"version": "v2.0" if v2 else "1.1", "data": [{"title": "Ada", "paragraphs": paragraphs}]})
    )
    return path


@pytest.mark.parametrize("v2", [False, True])
def test_prepare_squad(tmp_path, v2):
    src = squad_file(tmp_path / "train.json", v2)
    stats = prepare_dataset("squad", src, tmp_path / "o")
    (row,) = read_jsonl(stats.out)
    assert row["text"] == "Ada wrote it, then in London." and row["title"] == "Ada" and "image" not in row
    user, assistant = row["messages"]
    assert (user["content"], assistant["content"]) in {("<image>Who?", "Ada"), ("<image>Where?", "London")}
    if v2:
        assert stats.skipped == {"impossible question": 2, "document without usable QA": 1}
    both = prepare_dataset("squad", src, tmp_path / "o2", qa_per_image=0)
    (row,) = read_jsonl(both.out)
    assert [m["content"] for m in row["messages"]] == ["<image>Who?", "Ada", "Where?", "London"]


def test_prepare_cli_and_errors(tmp_path, parquet_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "docvqa", str(parquet_dir), "--out", str(tmp_path / "o"), "--split", "train"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "docvqa_train.jsonl").exists() and "dvsft label" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"question": "no image"}]}')
    res = runner.invoke(app, ["prepare", "docvqa", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "bad.json" in res.output and "data[0]" in res.output
    res = runner.invoke(app, ["prepare", "squad", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing.json" in res.output
