"""Text documents to render: SQuAD JSON (v1.1 / v2.0), plain text, or JSONL of documents.

Every source becomes a list of ``Document(id, text, qas)``; ``qas is None`` means "no QA: make a
transcription task". Ids are stable (given ids, or a hash of the text) so reruns can resume.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.core.records import IMAGE_PLACEHOLDER, read_jsonl
from dvsft.sources.qa_json import read_squad_file


@dataclass
class QA:
    question: str
    answers: list[str]  # the first is the training target
    answer_start: int | None = None  # character offset of answers[0] in the document, when known
    id: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # e.g. answer_ppl, question_ppl


@dataclass
class Document:
    id: str
    text: str
    qas: list[QA] | None  # None: transcription task


def text_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def _unique(docs: Iterator[Document]) -> Iterator[Document]:
    """Give repeated ids a ``-2``, ``-3``... suffix (deterministic in source order)."""
    seen: Counter = Counter()
    for doc in docs:
        seen[doc.id] += 1
        if seen[doc.id] > 1:
            doc.id = f"{doc.id}-{seen[doc.id]}"
        yield doc


def detect_format(path: Path) -> str:
    """``squad``, ``jsonl`` or ``text`` from the file name and its first characters."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "squad"
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("{") and '"data"' in head and '"paragraphs"' in head:
        return "squad"
    if head.startswith("{"):
        return "jsonl"
    return "text"


def load_documents(path: str | Path, fmt: str = "auto", counts: Counter | None = None) -> list[Document]:
    """Read every document of a source file (see the module docstring for formats).

    ``counts`` (optional) receives ``impossible_questions`` and ``unanswered_questions`` skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {"squad": read_squad, "jsonl": read_jsonl_documents, "text": read_text}
    if fmt not in readers:
        raise ValueError(f"unknown source format {fmt!r}; use one of {', '.join(readers)}")
    counts = counts if counts is not None else Counter()
    if fmt == "squad":
        return list(_unique(read_squad(path, counts)))
    return list(_unique(readers[fmt](path)))


def read_squad(path: Path, counts: Counter | None = None) -> Iterator[Document]:
    """SQuAD v1.1 / v2.0 (:mod:`dvsft.sources.qa_json`): one document per paragraph; impossible and
    unanswered questions are skipped (counted in ``impossible_questions`` / ``unanswered_questions``)."""
    counts = counts if counts is not None else Counter()
    for para in read_squad_file(path):
        qas = []
        for q in para.questions:
            if q.impossible:
                counts["impossible_questions"] += 1
            elif not q.answers:
                counts["unanswered_questions"] += 1
            else:
                qas.append(QA(question=q.question, answers=q.answers, answer_start=q.answer_start, id=q.id))
        yield Document(text_id("sq", para.title + "\n" + para.context), para.context, qas)


def read_text(path: Path) -> Iterator[Document]:
    """Plain text: documents separated by blank lines; no QA (transcription)."""
    text = path.read_text(encoding="utf-8")
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if block:
            yield Document(text_id("tx", block), block, None)


def qas_from_messages(messages: list[dict[str, Any]], where: str) -> list[QA]:
    """(user, assistant) turn pairs -> QA pairs; ``<image>`` placeholders are removed from questions."""
    qas, question = [], None
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        if not isinstance(content, str):
            raise ValueError(f"{where}: messages[{i}] has no text content")
        if msg.get("role") == "user":
            question = content.replace(IMAGE_PLACEHOLDER, "").strip()
        elif msg.get("role") == "assistant":
            if question is None:
                raise ValueError(f"{where}: messages[{i}] is an assistant turn without a user turn before it")
            qas.append(QA(question=question, answers=[content.strip()]))
            question = None
    return qas


def read_jsonl_documents(path: Path) -> Iterator[Document]:
    """JSONL of ``{"id"?, "text", "messages"?, "answers"?}``; no ``messages``: transcription."""
    for n, row in enumerate(read_jsonl(path), 1):
        where = f"{path}: document {n}" + (f" (id {row['id']})" if "id" in row else "")
        text = row.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: missing 'text'")
        qas = None
        if "messages" in row:
            qas = qas_from_messages(row["messages"], where)
            extra = row.get("answers")
            if extra and len(qas) == 1 and isinstance(extra, list):
                qas[0].answers += [a for a in extra if isinstance(a, str) and a not in qas[0].answers]
        doc_id = str(row["id"]) if row.get("id") is not None else text_id("doc", text)
        yield Document(doc_id, text, qas)


def corpus_text() -> str:
    """Real English prose that ships with Python: the pydoc topic help texts."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def corpus_words() -> list[str]:
    """Alphabetic words of the bundled corpus, in order."""
    return re.findall(r"[A-Za-z]+(?:'[a-z]+)?", corpus_text())
