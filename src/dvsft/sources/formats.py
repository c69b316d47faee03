"""Dataset files users already have: ShareGPT-style and LLaVA-style conversations, JSON or JSONL.

Accepted samples (one image each)::

    {"id": "a1", "messages": [{"role": "user", "content": "<image>What is the total?"},
                              {"role": "assistant", "content": "$12"}], "images": ["imgs/a1.png"]}
    {"id": "b2", "image": "imgs/b2.jpg", "conversations": [{"from": "human", "value": "<image>\\nTitle?"},
                                                          {"from": "gpt", "value": "Annual report"}]}

``messages``/``conversations`` entries may use ``role``/``content`` or ``from``/``value``; roles human/user,
gpt/assistant (also bot/model) and system. List contents (``{"type": "image"}``, ``{"type": "text", "text": ..}``)
become strings with ``<image>`` placeholders. A sample with one image and no placeholder gets ``<image>``
prepended to its first user turn. Word records (``dvsft prepare`` output) are valid input too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvsft.core.records import IMAGE_PLACEHOLDER

ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}

BAD_SAMPLE = "bad sample"
NO_IMAGE = "no image"
MULTI_IMAGE = "multi-image sample"


class SampleError(ValueError):
    """A sample that cannot become a word record; ``reason`` is BAD_SAMPLE, NO_IMAGE or MULTI_IMAGE."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class Sample:
    id: str
    image: str  # as written in the dataset ("" when unknown)
    path: Path | None  # resolved image file
    messages: list[dict[str, str]] | None
    error: tuple[str, str] | None = None


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """The raw sample dicts of a JSON list file or a JSONL file (errors name the file and line)."""
    from dvsft.core.records import read_jsonl

    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return list(read_jsonl(path))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8: byte 0x{data[err.start]:02x}") from err
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from err
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(rows).__name__}")
    return rows


def normalise_messages(turns: Any) -> list[dict[str, str]]:
    """``[{role, content}]`` with roles user/assistant/system and string content."""
    if not isinstance(turns, list):
        raise SampleError(BAD_SAMPLE, "conversation is not a list")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError(BAD_SAMPLE, f"turn {k} is not an object")
        raw_role = turn.get("role", turn.get("from"))
        role = ROLES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise SampleError(BAD_SAMPLE, f"turn {k}: unsupported role {raw_role!r}")
        content = turn.get("content", turn.get("value"))
        out.append({"role": role, "content": _content_text(content, k)})
    return out


def _content_text(content: Any, k: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                parts.append(IMAGE_PLACEHOLDER)
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise SampleError(BAD_SAMPLE, f"turn {k}: unsupported content part {part!r}")
        return "".join(parts)
    raise SampleError(BAD_SAMPLE, f"turn {k}: content must be a string or a list of parts")


def sample_images(raw: dict[str, Any]) -> list[str]:
    """Image paths of a sample (``images`` or ``image``, string or list)."""
    value = raw.get("images", raw.get("image"))
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    paths = []
    for v in items:
        if isinstance(v, dict):  # {"path": ...} / {"image": ...}
            v = v.get("path") or v.get("image")
        if not isinstance(v, str) or not v:
            raise SampleError(BAD_SAMPLE, f"image entry {v!r} is not a path")
        paths.append(v)
    return paths


def normalise_sample(raw: Any) -> tuple[str | None, str, list[dict[str, str]] | None]:
    """``(dataset id or None, image path, messages or None)`` of one raw sample; raises :class:`SampleError`."""
    if not isinstance(raw, dict):
        raise SampleError(BAD_SAMPLE, "sample is not a JSON object")
    sid = raw.get("id")
    images = sample_images(raw)
    if not images:
        raise SampleError(NO_IMAGE, "sample has no image ('images' or 'image')")
    if len(images) > 1:
        raise SampleError(MULTI_IMAGE, f"multi-image samples are not supported ({len(images)} images)")
    turns = raw.get("messages", raw.get("conversations"))
    messages = None if turns is None else normalise_messages(turns)
    if messages is not None:
        n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if n_placeholders == 0:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise SampleError(BAD_SAMPLE, "conversation has no user turn to hold the image")
            first_user["content"] = IMAGE_PLACEHOLDER + first_user["content"]
        elif n_placeholders > 1:
            raise SampleError(MULTI_IMAGE, f"multi-image samples are not supported ({n_placeholders} <image> tags)")
    return (None if sid is None or sid == "" else str(sid)), images[0], messages


def resolve_image(image: str, dataset_file: Path, image_root: str | Path | None = None) -> Path:
    """Absolute image paths as is; relative ones under ``image_root`` if it has them, else the dataset's folder."""
    p = Path(image).expanduser()
    if p.is_absolute():
        return p
    candidates = ([Path(image_root) / p] if image_root is not None else []) + [dataset_file.resolve().parent / p]
    return next((c for c in candidates if c.exists()), candidates[0])


def load_dataset_samples(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Every sample of a dataset file, in order, with unique stable ids; bad samples carry ``error``.

    Ids: the sample's ``id``, else its image path as written; a repeated id gets ``#2``, ``#3``, ...
    """
    path = Path(path)
    samples = []
    used: set[str] = set()
    for index, raw in enumerate(read_samples(path)):
        try:
            sid, image, messages = normalise_sample(raw)
            error = None
        except SampleError as err:
            sid = str(raw.get("id")) if isinstance(raw, dict) and raw.get("id") not in (None, "") else None
            try:
                image = (sample_images(raw) or [""])[0] if isinstance(raw, dict) else ""
            except SampleError:
                image = ""
            messages, error = None, (err.reason, err.detail)
        sid = _unique(sid or image or f"#{index}", used)
        resolved = resolve_image(image, path, image_root) if image and error is None else None
        samples.append(Sample(id=sid, image=image, path=resolved, messages=messages, error=error))
    return samples


def _unique(sid: str, used: set[str]) -> str:
    out, k = sid, 1
    while out in used:
        k += 1
        out = f"{sid}#{k}"
    used.add(out)
    return out
