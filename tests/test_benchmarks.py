"""Benchmark loaders on small fixtures in every documented layout, aggregations, OCR-VQA visibility, OCR sets.

The layout writers here are also used by tests/test_eval_e2e.py.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from dvsft.evaluation import benchmarks as B
from dvsft.evaluation.items import EvalItem
from dvsft.evaluation.loaders import iter_items

# ------------------------------------------------------------------------------------ fixture writers


def text_image(text: str, size: tuple[int, int] = (160, 64), font_size: int = 22) -> Image.Image:
    from matplotlib import font_manager

    image = Image.new("RGB", size, "white")
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), font_size)
    ImageDraw.Draw(image).text((6, (size[1] - font_size) // 2 - 2), text, fill="black", font=font)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def write_parquet(path: Path, rows: dict[str, list], features: dict) -> Path:
    from datasets import Dataset, Features

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=Features(features)).to_parquet(str(path))
    return path


def _f():
    from datasets import Image as HFImage
    from datasets import Sequence, Value

    return Value("string"), Value("int64"), Sequence(Value("string")), HFImage()


def lmms_docvqa(root: Path) -> Path:
    """lmms-lab/DocVQA: DocVQA/{validation,test}-*.parquet and InfographicVQA/validation-*.parquet."""
    S, I64, SEQ, IMG = _f()
    doc = {
        "questionId": S,
        "question": S,
        "question_types": SEQ,
        "image": IMG,
        "docId": I64,
        "ucsf_document_id": S,
        "ucsf_document_page_no": S,
        "answers": SEQ,
        "data_split": S,
    }
    val = {
        "questionId": ["337", "338", "339"],
        "question": ["what is the date?", "who signed it?", "what is the total?"],
        "question_types": [["form"], ["handwritten"], ["table"]],
        "image": [text_image("1 May 1990"), text_image("J. Smith"), text_image("Total 42")],
        "docId": [279, 280, 281],
        "ucsf_document_id": ["a", "b", "c"],
        "ucsf_document_page_no": ["1", "1", "2"],
        "answers": [["1 May 1990", "May 1, 1990"], ["J. Smith"], ["42"]],
        "data_split": ["val"] * 3,
    }
    write_parquet(root / "DocVQA" / "validation-00000-of-00001.parquet", val, doc)
    test = {k: v[:2] for k, v in val.items()}
    test["questionId"] = ["57344", "57345"]
    test["answers"] = [None, None]
    test["data_split"] = ["test"] * 2
    write_parquet(root / "DocVQA" / "test-00000-of-00001.parquet", test, doc)
    info = {
        "questionId": S,
        "question": S,
        "answers": SEQ,
        "answer_type": SEQ,
        "image": IMG,
        "image_url": S,
        "operation/reasoning": SEQ,
        "ocr": S,
        "data_split": S,
    }
    write_parquet(
        root / "InfographicVQA" / "validation-00000-of-00001.parquet",
        {
            "questionId": ["98313", "98314"],
            "question": ["how many cases?", "which country?"],
            "answers": [["12"], ["France"]],
            "answer_type": [["single span"], ["single span"]],
            "image": [text_image("12 cases"), text_image("France")],
            "image_url": ["u1", "u2"],
            "operation/reasoning": [[], ["counting"]],
            "ocr": ["", ""],
            "data_split": ["val", "val"],
        },
        info,
    )
    return root


def docvqa_official(root: Path) -> Path:
    """DocVQA release: val/val_v1.0.json with images under val/documents/."""
    (root / "val" / "documents").mkdir(parents=True, exist_ok=True)
    data = []
    for i, (q, a) in enumerate([("what is the date?", ["1 May 1990"]), ("who signed it?", ["J. Smith"])]):
        name = f"documents/doc{i}.png"
        text_image(a[0]).save(root / "val" / name)
        data.append(
            {
                "questionId": 337 + i,
                "question": q,
                "question_types": ["form"],
                "image": name,
                "docId": 279 + i,
                "ucsf_document_id": "x",
                "ucsf_document_page_no": "1",
                "answers": a,
                "data_split": "val",
            }
        )
    (root / "val" / "val_v1.0.json").write_text(
        json.dumps({"dataset_name": "docvqa", "dataset_split": "val", "data": data})
    )
    return root


def infovqa_official(root: Path) -> Path:
    """InfographicVQA release: infographicsVQA_val_v1.0_withQT.json + infographicsvqa_images/."""
    (root / "infographicsvqa_images").mkdir(parents=True, exist_ok=True)
    data = []
    for i, (q, a) in enumerate([("how many cases?", "12"), ("which country?", "France")]):
        text_image(a).save(root / "infographicsvqa_images" / f"{i}.jpeg", "JPEG")
        data.append(
            {
                "questionId": 98313 + i,
                "question": q,
                "image_local_name": f"{i}.jpeg",
                "image_url": "u",
                "ocr_output_file": f"{i}.json",
                "answers": [a],
                "data_split": "val",
            }
        )
    (root / "infographicsVQA_val_v1.0_withQT.json").write_text(
        json.dumps({"dataset_name": "infographicVQA", "data": data})
    )
    return root


def chartqa_parquet(root: Path) -> Path:
    S, _, _, IMG = _f()
    write_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        {
            "question": ["what is the peak?", "which year is lowest?", "share of A?"],
            "answer": ["12.5", "2019", "45%"],
            "image": [text_image("peak 12.5"), text_image("2019"), text_image("A 45%")],
            "type": ["human_test", "augmented_test", "augmented_test"],
        },
        {"question": S, "answer": S, "image": IMG, "type": S},
    )
    return root


def chartqa_official(root: Path) -> Path:
    """ChartQA release: test/test_human.json, test/test_augmented.json, images in test/png/."""
    d = root / "test"
    (d / "png").mkdir(parents=True, exist_ok=True)
    for kind, rows in {"human": [("peak?", "12.5")], "augmented": [("lowest?", "2019"), ("share?", "45%")]}.items():
        entries = []
        for i, (q, a) in enumerate(rows):
            name = f"{kind}{i}.png"
            text_image(a).save(d / "png" / name)
            entries.append({"imgname": name, "query": q, "label": a})
        (d / f"test_{kind}.json").write_text(json.dumps(entries))
    return root


OCRBENCH_ROWS = [
    ("IIIT5K", "Regular Text Recognition", "what is written in the image?", ["CENTRE"]),
    ("HME100k", "Handwritten Mathematical Expression Recognition", "Write out the expression.", ["x^{2}+1"]),
    ("docVQA", "Doc-oriented VQA", "what is the date?", ["1990", "May 1990"]),
]


def ocrbench_parquet(root: Path) -> Path:
    S, _, SEQ, IMG = _f()
    write_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        {
            "dataset": [r[0] for r in OCRBENCH_ROWS],
            "question": [r[2] for r in OCRBENCH_ROWS],
            "question_type": [r[1] for r in OCRBENCH_ROWS],
            "answer": [r[3] for r in OCRBENCH_ROWS],
            "image": [text_image(r[3][0]) for r in OCRBENCH_ROWS],
        },
        {"dataset": S, "question": S, "question_type": S, "answer": SEQ, "image": IMG},
    )
    return root


def ocrbench_official(root: Path) -> Path:
    """OCRBench release: OCRBench/OCRBench.json, images under OCRBench_Images/<dataset>/."""
    entries = []
    for i, (ds, qtype, q, answers) in enumerate(OCRBENCH_ROWS):
        rel = f"{ds}/{i}.png"
        (root / "OCRBench_Images" / ds).mkdir(parents=True, exist_ok=True)
        text_image(answers[0]).save(root / "OCRBench_Images" / rel)
        entries.append(
            {
                "dataset_name": ds,
                "id": i,
                "image_path": rel,
                "question": q,
                "answers": answers if i != 1 else answers[0],
                "type": qtype,
            }
        )
    (root / "OCRBench").mkdir(parents=True, exist_ok=True)
    (root / "OCRBench" / "OCRBench.json").write_text(json.dumps(entries))
    return root


TEXTVQA_ANSWERS = [["nokia"] * 7 + ["nokia phone"] * 3, ["stop"] * 10]


def textvqa_parquet(root: Path) -> Path:
    S, I64, SEQ, IMG = _f()
    write_parquet(
        root / "data" / "validation-00000-of-00001.parquet",
        {
            "image_id": ["003a8ae2ef43b901", "00685bc495504d61"],
            "question_id": [34602, 34603],
            "question": ["what is the brand of this phone?", "what does the sign say?"],
            "question_tokens": [["what"], ["what"]],
            "image": [text_image("NOKIA"), text_image("STOP")],
            "image_width": [160, 160],
            "image_height": [64, 64],
            "flickr_original_url": ["", ""],
            "flickr_300k_url": ["", ""],
            "answers": TEXTVQA_ANSWERS,
            "image_classes": [["phone"], ["sign"]],
            "set_name": ["val", "val"],
            "ocr_tokens": [["nokia"], ["stop"]],
        },
        {
            "image_id": S,
            "question_id": I64,
            "question": S,
            "question_tokens": SEQ,
            "image": IMG,
            "image_width": I64,
            "image_height": I64,
            "flickr_original_url": S,
            "flickr_300k_url": S,
            "answers": SEQ,
            "image_classes": SEQ,
            "set_name": S,
            "ocr_tokens": SEQ,
        },
    )
    return root


def textvqa_official(root: Path) -> Path:
    """TextVQA release: TextVQA_0.5.1_val.json + train_images/<image_id>.jpg."""
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    data = []
    for i, (image_id, q, text) in enumerate(
        [("003a8ae2ef43b901", "brand?", "NOKIA"), ("00685bc495504d61", "sign?", "STOP")]
    ):
        text_image(text).save(root / "train_images" / f"{image_id}.jpg", "JPEG")
        data.append(
            {
                "question": q,
                "image_id": image_id,
                "image_classes": [],
                "answers": TEXTVQA_ANSWERS[i],
                "question_id": 34602 + i,
                "set_name": "val",
            }
        )
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_type": "val", "data": data}))
    return root


MME_ROWS = [  # (question_id = image name, question, answer, category)
    ("OCR/0001.jpg", "Is the word in the logo 'ABC'? Please answer yes or no.", "Yes", "OCR"),
    ("OCR/0001.jpg", "Is the word in the logo 'XYZ'? Please answer yes or no.", "No", "OCR"),
    ("code_reasoning/0020.png", "Does this code print 3? Please answer yes or no.", "Yes", "code_reasoning"),
    ("code_reasoning/0020.png", "Does this code print 4? Please answer yes or no.", "No", "code_reasoning"),
]


def mme_parquet(root: Path) -> Path:
    S, _, _, IMG = _f()
    write_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        {
            "question_id": [r[0] for r in MME_ROWS],
            "image": [text_image("ABC" if r[3] == "OCR" else "print(3)") for r in MME_ROWS],
            "question": [r[1] for r in MME_ROWS],
            "answer": [r[2] for r in MME_ROWS],
            "category": [r[3] for r in MME_ROWS],
        },
        {"question_id": S, "image": IMG, "question": S, "answer": S, "category": S},
    )
    return root


def mme_official(root: Path) -> Path:
    """MME release: <category>/<img> + <img>.txt, or <category>/images/ + questions_answers_YN/."""
    (root / "OCR").mkdir(parents=True, exist_ok=True)
    text_image("ABC").save(root / "OCR" / "0001.jpg", "JPEG")
    (root / "OCR" / "0001.txt").write_text(f"{MME_ROWS[0][1]}\tYes\n{MME_ROWS[1][1]}\tNo\n")
    (root / "code_reasoning" / "images").mkdir(parents=True, exist_ok=True)
    (root / "code_reasoning" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
    text_image("print(3)").save(root / "code_reasoning" / "images" / "0020.png")
    (root / "code_reasoning" / "questions_answers_YN" / "0020.txt").write_text(
        f"{MME_ROWS[2][1]}\tYes\n{MME_ROWS[3][1]}\tNo\n"
    )
    return root


OCRVQA_BOOKS = [  # image_id, cover text, questions, answers
    ("1234567", "HARRY", ["What is the title of this book?", "Is this a comedy book?"], ["Harry", "No"]),
    ("7654321", "CHESS", ["What is the title of this book?"], ["Chess"]),
]


def ocrvqa_parquet(root: Path) -> Path:
    S, I64, SEQ, IMG = _f()
    n = len(OCRVQA_BOOKS)
    write_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        {
            "image": [text_image(b[1], (200, 72), 36) for b in OCRVQA_BOOKS],
            "image_id": [b[0] for b in OCRVQA_BOOKS],
            "questions": [b[2] for b in OCRVQA_BOOKS],
            "answers": [b[3] for b in OCRVQA_BOOKS],
            "ocr_tokens": [[]] * n,
            "title": [b[1] for b in OCRVQA_BOOKS],
            "authorName": ["A"] * n,
            "genre": ["Games"] * n,
            "image_width": [200] * n,
            "image_height": [72] * n,
            "image_url": [""] * n,
            "set_name": ["test"] * n,
        },
        {
            "image": IMG,
            "image_id": S,
            "questions": SEQ,
            "answers": SEQ,
            "ocr_tokens": SEQ,
            "title": S,
            "authorName": S,
            "genre": S,
            "image_width": I64,
            "image_height": I64,
            "image_url": S,
            "set_name": S,
        },
    )
    return root


def ocrvqa_official(root: Path) -> Path:
    """OCR-VQA release: dataset.json {image_id: {questions, answers, split}} + images/<id>.jpg."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    data = {}
    for split, (image_id, text, qs, ans) in zip([3, 3], OCRVQA_BOOKS, strict=True):
        text_image(text).save(root / "images" / f"{image_id}.jpg", "JPEG")
        data[image_id] = {
            "imageURL": "u",
            "questions": qs,
            "answers": ans,
            "title": text,
            "authorName": "A",
            "genre": "Games",
            "genreID": 1,
            "split": split,
        }
    data["1111111"] = {"imageURL": "u", "questions": ["q"], "answers": ["a"], "split": 1}  # train: skipped
    (root / "dataset.json").write_text(json.dumps(data))
    return root


SQUAD = [
    (
        "5733be284776f41900661182",
        "Notre Dame",
        "The college was founded in 1842 by Edward Sorin.",
        "When was the college founded?",
        ["1842", "in 1842"],
    ),
    (
        "5733be284776f41900661183",
        "Notre Dame",
        "The college was founded in 1842 by Edward Sorin.",
        "Who founded the college?",
        ["Edward Sorin"],
    ),
]


def squad_parquet(root: Path) -> Path:
    from datasets import Sequence, Value

    S = Value("string")
    write_parquet(
        root / "plain_text" / "validation-00000-of-00001.parquet",
        {
            "id": [r[0] for r in SQUAD],
            "title": [r[1] for r in SQUAD],
            "context": [r[2] for r in SQUAD],
            "question": [r[3] for r in SQUAD],
            "answers": [{"text": r[4], "answer_start": [27] * len(r[4])} for r in SQUAD],
        },
        {
            "id": S,
            "title": S,
            "context": S,
            "question": S,
            "answers": Sequence({"text": Value("string"), "answer_start": Value("int32")}),
        },
    )
    return root


def squad_official(root: Path) -> Path:
    """SQuAD release: dev-v1.1.json."""
    qas = [{"id": r[0], "question": r[3], "answers": [{"text": a, "answer_start": 27} for a in r[4]]} for r in SQUAD]
    data = {"version": "1.1", "data": [{"title": "Notre Dame", "paragraphs": [{"context": SQUAD[0][2], "qas": qas}]}]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dev-v1.1.json").write_text(json.dumps(data))
    return root


def word_records(path: Path, n: int = 3, transcription: bool = False) -> Path:
    """Word records: image + words + a user/assistant turn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        words = ["alpha", "beta", "gamma"][: i + 1]
        text_image(" ".join(words)).save(path.parent / f"rec{i}.png")
        user = "<image>Transcribe the text in the image." if transcription else f"<image>What is word {i}?"
        answer = " ".join(words) if transcription else words[-1]
        rows.append(
            {
                "id": f"rec-{i}",
                "image": f"rec{i}.png",
                "width": 160,
                "height": 64,
                "words": [
                    {"text": w, "box": [6 + 50 * k, 20, 50 + 50 * k, 42], "score": 1.0} for k, w in enumerate(words)
                ],
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
    from dvsft.evaluation.ocr_tasks import build_ocr_set, noncontextual_texts, passages
    from dvsft.records import read_jsonl

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
