"""Readers of the official JSON releases that both training data and benchmarks are made from.

SQuAD v1.1 / v2.0 (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``): ``dvsft prepare squad``
(:mod:`dvsft.sources.prepare`), ``dvsft render`` (:mod:`dvsft.sources.corpora`) and the SQuAD benchmark
(:mod:`dvsft.evaluation.layouts`) all read it through :func:`squad_paragraphs`. DocVQA / InfographicVQA
(``{"data": [{"questionId", "question", "image" | "image_local_name", "answers"}]}``): ``dvsft prepare`` and the
two benchmarks read it through :func:`vqa_entries`. Each caller then applies its own policy (what to skip, what
to count, where to look for images).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SquadQuestion:
    id: str | None  # as given (None when the file has none)
    question: str
    answers: list[str]  # the answer texts that are not blank, in file order, unstripped
    answer_start: int | None  # character offset of answers[0] in the context, when given
    impossible: bool  # SQuAD 2.0 ``is_impossible``


@dataclass
class SquadParagraph:
    article: int  # index in ``data``
    index: int  # index in the article's ``paragraphs``
    title: str
    context: str
    questions: list[SquadQuestion]


@dataclass
class VQAEntry:
    index: int  # position in ``data``
    qid: str  # ``questionId`` (the index when absent)
    question: str
    answers: list[str]  # as given (none in the test split)
    image: str  # the image's file name as given


IMAGE_FIELDS = {"docvqa": "image", "infovqa": "image_local_name"}


def read_json(path: Path) -> Any:
    """The parsed JSON file; a ``ValueError`` naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err


def read_squad_file(path: Path) -> Iterator[SquadParagraph]:
    """The paragraphs of the SQuAD JSON file ``path`` (see :func:`squad_paragraphs`)."""
    return squad_paragraphs(read_json(path), path)


def squad_paragraphs(doc: Any, source: str | Path) -> Iterator[SquadParagraph]:
    """Every paragraph of a parsed SQuAD file, in file order; ``source`` names the file in errors.

    A paragraph without ``context`` text, or a possible question without ``question``, is a ``ValueError``.
    Answers are ``{"text": ...}`` objects (plain strings are accepted too); blank ones are left out.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{source}: not a SQuAD file (expected {{'data': [{{'paragraphs': [...]}}]}})")
    for ai, article in enumerate(doc["data"]):
        title = str(article.get("title", ""))
        for pi, para in enumerate(article.get("paragraphs", [])):
            where = f"{source}: data[{ai}].paragraphs[{pi}]"
            if not isinstance(para.get("context"), str):
                raise ValueError(f"{where}: missing 'context' text")
            questions = [_question(qa, f"{where}.qas[{qi}]") for qi, qa in enumerate(para.get("qas", []))]
            yield SquadParagraph(ai, pi, title, para["context"], questions)


def _question(qa: dict[str, Any], where: str) -> SquadQuestion:
    impossible = bool(qa.get("is_impossible"))
    if "question" not in qa and not impossible:
        raise ValueError(f"{where}: missing 'question'")
    answers = [a for a in qa.get("answers", []) if _text(a).strip()]
    start = answers[0].get("answer_start") if answers and isinstance(answers[0], dict) else None
    return SquadQuestion(
        id=None if qa.get("id") is None else str(qa["id"]),
        question=str(qa.get("question", "")),
        answers=[_text(a) for a in answers],
        answer_start=int(start) if start is not None else None,
        impossible=impossible,
    )


def _text(answer: Any) -> str:
    text = answer.get("text") if isinstance(answer, dict) else answer
    return text if isinstance(text, str) else ""


def vqa_entries(doc: Any, dataset: str, source: str | Path) -> Iterator[VQAEntry]:
    """The questions of a parsed DocVQA (``dataset="docvqa"``) or InfographicVQA (``"infovqa"``) release file.

    The image is ``image`` (DocVQA) or ``image_local_name`` (InfographicVQA), either accepted for both; an entry
    without an image or a question is a ``ValueError`` naming it.
    """
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected {{'data': [...]}} (the official {dataset} release layout)")
    field = IMAGE_FIELDS[dataset]
    for k, item in enumerate(data):
        name = item.get(field) or item.get("image") or item.get("image_local_name")
        if not name or "question" not in item:
            raise ValueError(f"{source}: data[{k}] has no {field!r} or 'question'")
        answers = item.get("answers")
        if answers is None or isinstance(answers, str):
            answers = [] if answers is None else [answers]
        answers = [str(a.get("text", "") if isinstance(a, dict) else a) for a in answers]
        yield VQAEntry(k, str(item.get("questionId", k)), str(item["question"]), answers, str(name))
