"""Word records: the model-independent currency between labeling, alignment and training.

One JSON object per image (JSONL), boxes in original-image pixels::

    {"id": "...", "image": "rel/or/abs.png", "width": 1700, "height": 2200,
     "words": [{"text": "Invoice", "box": [x0, y0, x1, y1], "score": 0.99}],
     "messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", "content": "..."}]}

Aligned records (``dvsft align``) add ``grid: [rows, cols]`` and
``vision_labels: [{"token": k, "text": w, "token_id": id}]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypedDict


class Word(TypedDict, total=False):
    text: str
    box: list[float]
    score: float


class Record(TypedDict, total=False):
    id: str
    image: str
    width: int
    height: int
    words: list[Word]
    messages: list[dict[str, Any]]
    grid: list[int]
    vision_labels: list[dict[str, Any]]


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file; a torn last line (killed writer) is skipped."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                if f.readline() == "":  # only the very last line may be torn
                    return
                raise ValueError(f"{path}:{line_no}: invalid JSON: {err}") from err


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows to ``path`` atomically (temp file + rename); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


class JsonlAppender:
    """Append rows durably, one line each; safe to kill at any moment (see ``read_jsonl``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    """Cut a partial last line left by a killed writer so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)


def image_path(record: dict[str, Any], records_file: str | Path | None) -> Path:
    """The record's image path, resolved relative to the JSONL file that holds it."""
    p = Path(record["image"])
    if p.is_absolute() or records_file is None:
        return p
    return Path(records_file).resolve().parent / p
