"""Row -> EvalItem mappers for the layouts people download (hub parquet and official JSON).

Each mapper takes one row (a dict) plus a ``Ctx`` and returns the items it holds. Column
names follow the lmms-lab / echo840 / howard-hou / rajpurkar parquet releases and the
official JSON releases; docs/evaluation.md lists them.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from dvsft.evaluation.items import EvalItem, ImageSource
from dvsft.models.families import DEFAULT_FAMILY
from dvsft.sources.qa_json import SquadParagraph, VQAEntry


@dataclass
class Ctx:
    """What a mapper needs besides the row: where it came from and how to find/make images."""

    source: str  # file the row came from (for error messages)
    split: str
    images: bool = True  # False: metadata pass, no image lookups
    image_roots: list[Path] = field(default_factory=list)  # where official-JSON images are searched
    family: str = DEFAULT_FAMILY  # token grid the SQuAD renderer aligns to
    index: int = 0  # running row number over all files of the split
    pairs: Counter = field(default_factory=Counter)  # MME: questions seen per image

    def require(self, row: dict[str, Any], *columns: str, layout: str) -> None:
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(
                f"{self.source}: row {self.index} lacks column(s) {', '.join(missing)} of the {layout} layout "
                f"(has: {', '.join(sorted(row))}); see docs/evaluation.md"
            )

    def find_image(self, name: str, item_id: str) -> list[ImageSource]:
        if not self.images:
            return []
        for root in self.image_roots:
            p = root / name
            if p.is_file():
                return [p]
        roots = ", ".join(str(r) for r in self.image_roots)
        raise ValueError(f"{self.source}: item {item_id}: image {name!r} not found under {roots}")

    def find_image_stem(self, stem: str, item_id: str) -> list[ImageSource]:
        """An image named ``stem`` with any common image suffix."""
        if not self.images:
            return []
        for root in self.image_roots:
            for suffix in (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".JPG", ".PNG"):
                p = root / f"{stem}{suffix}"
                if p.is_file():
                    return [p]
        roots = ", ".join(str(r) for r in self.image_roots)
        raise ValueError(f"{self.source}: item {item_id}: no image named {stem}.* under {roots}")


def parquet_image(value: Any, ctx: Ctx, item_id: str) -> list[ImageSource]:
    """The HF ``Image`` feature as stored in parquet: ``{"bytes": ..., "path": ...}``."""
    if not ctx.images:
        return []
    if isinstance(value, dict):
        if value.get("bytes"):
            return [value["bytes"]]
        if value.get("path"):
            p = Path(value["path"])
            return [p if p.is_absolute() else Path(ctx.source).parent / p]
    if isinstance(value, bytes):
        return [value]
    raise ValueError(f"{ctx.source}: item {item_id}: the image cell holds no bytes or path")


def _answers(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(a) for a in value]


def _qid(value: Any) -> int | str:
    s = str(value)
    return int(s) if s.lstrip("-").isdigit() else s


# ------------------------------------------------------------------------------------ parquet


def docvqa_row(row: dict, ctx: Ctx) -> list[EvalItem]:
    """lmms-lab/DocVQA, configs DocVQA and InfographicVQA: questionId, question, answers, image."""
    ctx.require(row, "questionId", "question", layout="lmms-lab/DocVQA")
    qid = str(row["questionId"])
    meta = {"questionId": _qid(qid)}
    for key in ("question_types", "answer_type", "docId"):
        if row.get(key) is not None:
            meta[key] = row[key]
    return [
        EvalItem(qid, row["question"], _answers(row.get("answers")), parquet_image(row.get("image"), ctx, qid), meta)
    ]


def chartqa_row(row: dict, ctx: Ctx) -> list[EvalItem]:
    """lmms-lab/ChartQA: question, answer, image, type (human_test / augmented_test)."""
    ctx.require(row, "question", "answer", layout="lmms-lab/ChartQA")
    item_id = str(row.get("id", f"{ctx.split}-{ctx.index}"))
    meta = {"type": row.get("type", "")}
    return [
        EvalItem(item_id, row["question"], _answers(row["answer"]), parquet_image(row.get("image"), ctx, item_id), meta)
    ]


def ocrbench_row(row: dict, ctx: Ctx) -> list[EvalItem]:
    """echo840/OCRBench (also lmms-lab/OCRBench): dataset, question, question_type, answer (list), image."""
    ctx.require(row, "question", "answer", "question_type", "dataset", layout="echo840/OCRBench")
    item_id = str(row.get("id", f"{ctx.split}-{ctx.index}"))
    meta = {"dataset": row["dataset"], "question_type": row["question_type"]}
    images = parquet_image(row.get("image"), ctx, item_id)
    return [EvalItem(item_id, row["question"], _answers(row["answer"]), images, meta)]


def textvqa_row(row: dict, ctx: Ctx) -> list[EvalItem]:
    """lmms-lab/textvqa: question_id, question, answers (10), image, image_id."""
    ctx.require(row, "question_id", "question", layout="lmms-lab/textvqa")
    item_id = str(row["question_id"])
    meta = {"question_id": _qid(item_id), "image_id": row.get("image_id")}
    images = parquet_image(row.get("image"), ctx, item_id)
    return [EvalItem(item_id, row["question"], _answers(row.get("answers")), images, meta)]


def mme_row(row: dict, ctx: Ctx) -> list[EvalItem]:
    """lmms-lab/MME: question_id (image name, shared by its two questions), question, answer, category, image."""
    ctx.require(row, "question_id", "question", "answer", "category", layout="lmms-lab/MME")
    pair = str(row["question_id"])
    k = ctx.pairs[pair]
    ctx.pairs[pair] += 1
    item_id = f"{pair}#{k}"
    meta = {"category": row["category"], "pair": pair}
    return [
        EvalItem(item_id, row["question"], _answers(row["answer"]), parquet_image(row.get("image"), ctx, item_id), meta)
    ]


def ocrvqa_row(row: dict, ctx: Ctx) -> list[EvalItem]:
    """howard-hou/OCR-VQA: image_id, questions (list), answers (list), image: one item per question."""
    ctx.require(row, "image_id", "questions", "answers", layout="howard-hou/OCR-VQA")
    image_id = str(row["image_id"])
    questions, answers = list(row["questions"] or []), list(row["answers"] or [])
    if len(questions) != len(answers):
        raise ValueError(f"{ctx.source}: image {image_id}: {len(questions)} questions but {len(answers)} answers")
    images = parquet_image(row.get("image"), ctx, image_id)
    return [
        EvalItem(f"{image_id}-{k}", q, [a], images, {"image_id": image_id})
        for k, (q, a) in enumerate(zip(questions, answers, strict=True))
    ]


def squad_row(row: dict, ctx: Ctx) -> list[EvalItem]:
    """rajpurkar/squad: id, title, context, question, answers {text: [...]}; the context is rendered."""
    ctx.require(row, "id", "context", "question", "answers", layout="rajpurkar/squad")
    answers = row["answers"]
    texts = _answers(answers.get("text") if isinstance(answers, dict) else answers)
    if not texts:  # SQuAD 2.0 unanswerable questions are not part of this benchmark
        return []
    images = [rendered_context(row["context"], ctx.family)] if ctx.images else []
    return [EvalItem(str(row["id"]), row["question"], texts, images, {"title": row.get("title", "")})]


PARQUET_ROWS: dict[str, Callable[[dict, Ctx], list[EvalItem]]] = {
    "docvqa": docvqa_row,
    "infovqa": docvqa_row,
    "chartqa": chartqa_row,
    "ocrbench": ocrbench_row,
    "textvqa": textvqa_row,
    "mme": mme_row,
    "ocrvqa": ocrvqa_row,
    "squad": squad_row,
}

# ------------------------------------------------------------------------------------ official JSON


def vqa_json(entry: VQAEntry, ctx: Ctx) -> list[EvalItem]:
    """DocVQA ``val_v1.0.json`` / InfographicVQA ``infographicsVQA_val_v1.0_withQT.json`` (read by
    :func:`dvsft.sources.qa_json.vqa_entries`): questionId, question, image / image_local_name, answers."""
    images = ctx.find_image(entry.image, entry.qid)
    return [EvalItem(entry.qid, entry.question, entry.answers, images, {"questionId": _qid(entry.qid)})]


def chartqa_json(entry: dict, ctx: Ctx) -> list[EvalItem]:
    """ChartQA ``test_human.json`` / ``test_augmented.json``: imgname, query, label; images in ``png/``."""
    ctx.require(entry, "imgname", "query", "label", layout="ChartQA JSON")
    kind = "human_test" if "human" in Path(ctx.source).name else "augmented_test"
    item_id = f"{kind}-{ctx.index}"
    images = ctx.find_image(entry["imgname"], item_id)
    return [EvalItem(item_id, entry["query"], _answers(entry["label"]), images, {"type": kind})]


def ocrbench_json(entry: dict, ctx: Ctx) -> list[EvalItem]:
    """OCRBench ``OCRBench.json``: dataset_name, id, image_path, question, answers, type."""
    ctx.require(entry, "dataset_name", "image_path", "question", "answers", "type", layout="OCRBench JSON")
    item_id = str(entry.get("id", ctx.index))
    images = ctx.find_image(entry["image_path"], item_id)
    meta = {"dataset": entry["dataset_name"], "question_type": entry["type"]}
    return [EvalItem(item_id, entry["question"], _answers(entry["answers"]), images, meta)]


def textvqa_json(entry: dict, ctx: Ctx) -> list[EvalItem]:
    """TextVQA ``TextVQA_0.5.1_val.json``: data[] of question_id, question, image_id, answers; ``{image_id}.jpg``."""
    ctx.require(entry, "question_id", "question", "image_id", layout="TextVQA JSON")
    item_id = str(entry["question_id"])
    images = ctx.find_image_stem(str(entry["image_id"]), item_id)
    meta = {"question_id": _qid(item_id), "image_id": entry["image_id"]}
    return [EvalItem(item_id, entry["question"], _answers(entry.get("answers")), images, meta)]


def ocrvqa_json(image_id: str, entry: dict, ctx: Ctx) -> list[EvalItem]:
    """OCR-VQA ``dataset.json``: {image_id: {questions, answers, split (1 train, 2 val, 3 test)}}."""
    ctx.require(entry, "questions", "answers", "split", layout="OCR-VQA dataset.json")
    want = {"train": 1, "validation": 2, "val": 2, "test": 3}.get(ctx.split)
    if want is None:
        raise ValueError(f"{ctx.source}: unknown OCR-VQA split {ctx.split!r}; use train, validation or test")
    if int(entry["split"]) != want:
        return []
    images = ctx.find_image_stem(image_id, image_id)
    return [
        EvalItem(f"{image_id}-{k}", q, [a], images, {"image_id": image_id})
        for k, (q, a) in enumerate(zip(entry["questions"], entry["answers"], strict=True))
    ]


def squad_json(paragraph: SquadParagraph, ctx: Ctx) -> list[EvalItem]:
    """SQuAD ``dev-v1.1.json`` (read by :mod:`dvsft.sources.qa_json`): one item per answered question."""
    items = []
    for q in paragraph.questions:
        if not q.answers:
            continue
        images = [rendered_context(paragraph.context, ctx.family)] if ctx.images else []
        items.append(EvalItem(str(q.id), q.question, q.answers, images, {"title": paragraph.title}))
    return items


# ------------------------------------------------------------------------------------ rendering


def rendered_context(text: str, family: str) -> Callable[[], list[Image.Image]]:
    """A lazy image source: ``text`` rendered onto the token grid of ``family`` (all pages)."""

    def make() -> list[Image.Image]:
        return list(_render_pages(text, family))

    return make


@lru_cache(maxsize=64)
def _render_pages(text: str, family: str) -> tuple[Image.Image, ...]:
    try:
        from dvsft.sources.render import Renderer
    except ImportError as err:
        raise RuntimeError(
            "rendering SQuAD contexts needs dvsft.sources.render, which is not available; "
            "pass a rendered word-records JSONL instead"
        ) from err
    seed = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16)
    pages = Renderer(family=family).render_text(text, random.Random(seed))
    if not pages:
        raise ValueError(f"the renderer produced no page for context {text[:60]!r}...")
    return tuple(page.image for page in pages)
