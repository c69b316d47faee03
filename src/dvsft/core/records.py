"""Word records: the model-independent currency between labeling, alignment and training.

One JSON object per image (JSONL), boxes in original-image pixels::

    {"id": "...", "image": "rel/or/abs.png", "width": 1700, "height": 2200,
     "words": [{"text": "Invoice", "box": [x0, y0, x1, y1], "score": 0.99}],
     "messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", "content": "..."}]}

Aligned records (``dvsft align``) add ``grid: [rows, cols]`` and
``vision_labels: [{"token": k, "text": w, "token_id": id}]``. A record without ``image`` is text-only:
``{"id": "...", "messages": [...]}``, no image placeholder, no ``words``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input line or record: where it is and what is wrong."""

    file: str | None
    line: int | None
    id: str | None
    reason: str

    def row(self) -> dict[str, Any]:
        """The error-file row: ``{"file", "line", "id", "reason"}``."""
        return {"file": self.file, "line": self.line, "id": self.id, "reason": self.reason}

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file or "record")
        return f"{where}: record {self.id}: {self.reason}" if self.id is not None else f"{where}: {self.reason}"


def record_id(record: dict[str, Any]) -> str | None:
    """The record's ``id`` as a string, None when it has none (missing, null or empty)."""
    rid = record.get("id")
    return None if rid is None or rid == "" else str(rid)


class RecordError(ValueError):
    """A bad input line or record, with its :class:`Problem` (file, line, id, reason)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        super().__init__(str(problem))


@dataclass(frozen=True)
class Line:
    """One non-blank line of a JSONL file: its object, or why it could not be read."""

    number: int
    record: dict[str, Any] | None
    error: str | None = None


def iter_lines(path: str | Path, own: bool = False) -> Iterator[Line]:
    """Every non-blank line of a JSONL file as a :class:`Line`; unreadable lines carry their ``error``.

    Strict for input files: invalid JSON, bytes that are not UTF-8 and values that are not objects are
    reported on any line, the last included. ``own=True`` is for files dvsft appends to itself
    (:class:`JsonlAppender`): a last line without its newline that does not parse is the torn tail of a
    killed writer and is dropped silently.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark
            torn = own and not raw.endswith(b"\n")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if torn:
                    return
                yield Line(number, None, f"not UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                if torn:
                    return
                yield Line(number, None, f"invalid JSON: {err.msg} (column {err.colno})")
                continue
            if not isinstance(value, dict):
                yield Line(number, None, f"a JSON {type(value).__name__}, not an object")
                continue
            yield Line(number, value)


def read_jsonl(path: str | Path, own: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file; the first unreadable line raises :class:`RecordError`.

    ``own=True`` (files dvsft appends to itself) drops a torn last line, see :func:`iter_lines`.
    """
    for line in iter_lines(path, own):
        if line.error is not None:
            raise RecordError(Problem(str(path), line.number, None, line.error))
        yield line.record  # type: ignore[misc]


def read_records(path: str | Path, image: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the word records of a source (a JSONL or Parquet file, a folder of shards, a ``datasets`` folder:
    see :mod:`dvsft.core.record_sources`); the first unreadable line or invalid record raises :class:`RecordError`
    naming file, line (or row), id and reason (see :func:`check_record`)."""
    from dvsft.core.record_sources import iter_entries

    for entry in iter_entries(path):
        if entry.error is not None:
            raise RecordError(Problem(str(entry.file), entry.number, None, entry.error))
        problems = check_record(entry.record, entry.file, entry.number, image=image)  # type: ignore[arg-type]
        if problems:
            raise RecordError(problems[0])
        yield entry.record  # type: ignore[misc]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows to ``path`` atomically (temp file + rename); returns the row count.

    Non-finite numbers are refused (bare ``NaN`` is not JSON). If ``rows`` raises, the temp file is removed
    and ``path`` is left as it was.
    """
    from dvsft.core.outputs import temp_sibling

    path = Path(path)
    tmp = temp_sibling(path)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json_row(row) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def json_row(row: dict[str, Any]) -> str:
    """``row`` as one line of strict JSON (no NaN / Infinity: a ValueError naming the row's id)."""
    try:
        return json.dumps(row, ensure_ascii=False, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"row {row.get('id', '?')!r}: {err} (NaN/Infinity is not JSON)") from err


class JsonlAppender:
    """Append rows durably, one line each; safe to kill at any moment (see ``read_jsonl``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json_row(row) + "\n")
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
    return _folder_of(str(records_file)) / p


@functools.lru_cache(maxsize=256)
def _folder_of(records_file: str) -> Path:
    """The resolved folder of a records file (cached: called once per record)."""
    return Path(records_file).resolve().parent


# ------------------------------------------------------------------------------------ validation

IMAGE_PLACEHOLDER = "<image>"  # marks where the record's image goes in a user turn's text
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image")  # the parts of a list content
MAX_WORD_PROBLEMS = 5  # per record; further bad words are summed up in one more problem


def check_record(
    record: dict[str, Any],
    file: str | Path | None = None,
    line: int | None = None,
    image: bool = True,
    decode: bool = True,
) -> list[Problem]:
    """Everything wrong with one word record, one :class:`Problem` each (empty when it is valid).

    The one record validator of every reader (align, train, eval, stats, region tasks, dataset readers that
    build records from other formats). Checks the schema (``id``, ``image``, ``width``/``height``,
    ``words`` with finite ``[x0, y0, x1, y1]`` boxes, ``x0 <= x1`` and ``y0 <= y1``, ``messages`` of string or
    text / image parts, a user turn before each answer and no image in one) and, with
    ``image=True``, that the image (resolved relative to ``file``) exists, its header (and, with ``decode``,
    its data) reads, and its upright size equals ``width``/``height``. Missing ``width``/``height`` are
    filled in from the image, in place. With ``image=True``, a record without an image must be a valid text-only
    record (:func:`text_only_reasons`); ``image=False`` (readers that need no image, or check it themselves)
    leaves that out.
    """
    rid = record.get("id")
    rid = str(rid) if rid is not None else None
    fname = None if file is None else str(file)
    reasons = _schema_reasons(record, image)
    fields_ok = not any(r.startswith(("no image", "image ", "width", "height")) for r in reasons)
    if image and fields_ok and has_image(record):
        reasons.extend(_image_reasons(record, file, decode))
    return [Problem(fname, line, rid, r) for r in reasons]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def has_image(record: dict[str, Any]) -> bool:
    """True when the record names an image (``image``) or holds one (``image_bytes``); else it is text-only."""
    return record.get("image") is not None or isinstance(record.get("image_bytes"), bytes)


def text_only_reasons(record: dict[str, Any]) -> list[str]:
    """Why a record without an image is no valid text-only record: it needs ``messages``, and neither an image
    (``<image>`` or an image part) in them, nor ``words`` or ``width``/``height`` (which belong to an image)."""
    messages = record.get("messages")
    if messages is None:
        return ["no image field and no messages (a text-only record needs messages)"]
    reasons = []
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if isinstance(m, dict) and isinstance(m.get("content"), str | list) and _holds_image(m["content"]):
                reasons.append(
                    f"messages[{i}] holds an image ({IMAGE_PLACEHOLDER} or an image part) but the record has no "
                    "image field"
                )
                break
    if record.get("words"):
        reasons.append("words without an image field (a text-only record has no word boxes)")
    if record.get("width") is not None or record.get("height") is not None:
        reasons.append("width/height without an image field")
    return reasons


def _schema_reasons(record: dict[str, Any], need_image: bool) -> list[str]:
    reasons: list[str] = []
    rid = record.get("id")
    if rid is not None and not (isinstance(rid, str | int) and not isinstance(rid, bool)):
        reasons.append(f"id must be a string, got {type(rid).__name__} {rid!r}")
    img = record.get("image")
    if img is not None and not (isinstance(img, str) and img):
        reasons.append(f"image must be a path string, got {img!r}")
    elif need_image and not has_image(record):
        reasons.extend(text_only_reasons(record))
    w, h = record.get("width"), record.get("height")
    for name, v in (("width", w), ("height", h)):
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            reasons.append(f"{name} must be a positive integer, got {v!r}")
    if (w is None) != (h is None):
        reasons.append("width and height must be given together")
    reasons.extend(_word_reasons(record.get("words")))
    reasons.extend(_message_reasons(record.get("messages")))
    return reasons


def _word_reasons(words: Any) -> list[str]:
    if words is None:
        return []
    if not isinstance(words, list):
        return [f"words must be a list of {{text, box}} objects, got {type(words).__name__} {_short(words)}"]
    found: list[str] = []
    bad = 0
    for i, word in enumerate(words):
        reason = box_problem(word)
        if reason is None:
            continue
        bad += 1
        if len(found) < MAX_WORD_PROBLEMS:
            found.append(f"words[{i}] {reason}")
    if bad > len(found):
        found.append(f"{bad - len(found)} more bad words")
    return found


def box_problem(word: Any) -> str | None:
    """Why one word entry is unusable (no text, no 4-number box, a non-finite or inverted box), or None."""
    if not isinstance(word, dict):
        return f"is not a {{text, box}} object: {_short(word)}"
    if not isinstance(word.get("text"), str):
        return f"text must be a string, got {_short(word.get('text'))}"
    box = word.get("box")
    if not isinstance(box, list | tuple) or len(box) != 4:
        return f"has no [x0, y0, x1, y1] box (got {_short(box)})"
    for name, v in zip(("x0", "y0", "x1", "y1"), box, strict=True):
        if not _is_number(v):
            return f"box {name} is {_short(v)}, not a number"
        if not math.isfinite(v):
            return f"box {name} is {v}, not a finite number"
    x0, y0, x1, y1 = box
    if x0 > x1 or y0 > y1:
        return f"box {list(box)} is inverted (needs x0 <= x1 and y0 <= y1)"
    return None


def _message_reasons(messages: Any) -> list[str]:
    """What is wrong with a conversation: each turn a {role, content} object whose content is a string or
    a list of text / image parts, no image in an answer, a user turn before each answer."""
    if messages is None:
        return []
    if not isinstance(messages, list):
        return [f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}"]
    asked = False  # a user turn since the last answer
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return [f"messages[{i}] has no role system/user/assistant"]
        content = m.get("content")
        if not isinstance(content, str | list):
            return [f"messages[{i}] content must be a string or a list of parts"]
        if isinstance(content, list) and (reason := _parts_reason(content)) is not None:
            return [f"messages[{i}] {reason}"]
        if m["role"] == "user":
            asked = True
        elif m["role"] == "assistant":
            if _holds_image(content):
                return [f"messages[{i}] is an answer holding an image ({IMAGE_PLACEHOLDER} or an image part)"]
            if not asked:
                return [f"messages[{i}] is an answer with no user turn before it"]
            asked = False
    return []


def _parts_reason(parts: list[Any]) -> str | None:
    """Why a list content is unusable (a part that is not a text or image object), or None."""
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            return f"content[{j}] must be a {{type: text|image}} object, got {_short(part)}"
        if part.get("type") not in PART_TYPES:
            return f"content[{j}] has type {_short(part.get('type'))}; parts are text or image"
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            return f"content[{j}] text must be a string, got {_short(part.get('text'))}"
    return None


def _holds_image(content: str | list[Any]) -> bool:
    if isinstance(content, str):
        return IMAGE_PLACEHOLDER in content
    return any(isinstance(part, dict) and part.get("type") == "image" for part in content)


def _image_reasons(record: dict[str, Any], file: str | Path | None, decode: bool) -> list[str]:
    from dvsft.core.images import MISSING, ImageError, image_size

    data = record.get("image_bytes")
    path: Path | str = "<image bytes>" if isinstance(data, bytes) else image_path(record, file)
    try:
        w, h = image_size(data if isinstance(data, bytes) else path, decode=decode)
    except ImageError as err:
        if err.reason == MISSING:
            return [f"image file not found: {path}"]
        return [f"image {path}: {err.reason}: {err.detail}"]
    if record.get("width") is None and record.get("height") is None:
        record["width"], record["height"] = w, h
    elif (record["width"], record["height"]) != (w, h):
        return [
            f"width/height {record['width']}x{record['height']} differ from the image's {w}x{h} "
            f"(upright, after EXIF orientation): {path}; its word boxes would not match"
        ]
    return []


def _short(v: Any, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
