"""Small benchmark files in every documented layout (hub parquet, official JSON, MME folders, word records).

Used by tests/test_benchmarks.py and tests/test_eval_e2e.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


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
