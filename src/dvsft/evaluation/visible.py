"""OCR-VQA's paper selection: N random test questions whose answer is visible in the image.

Visibility is decided with our own OCR (rapidocr, PP-OCR models): the answer, lowercased with
everything but letters and digits removed, must be a substring of the image's OCR text
normalised the same way. Questions are drawn in a seeded random order; OCR runs only on the
candidates drawn, in blocks (one streaming pass over the data each), until N are visible.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from dvsft.evaluation.loaders import iter_items

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def squash(text: str) -> str:
    """Lowercase letters and digits only (OCR splits and joins words unpredictably)."""
    return _NON_ALNUM.sub("", text.lower())


def answer_visible(answer: str, ocr_text: str) -> bool:
    key = squash(answer)
    return bool(key) and key in squash(ocr_text)


def ocr_engine(params: dict[str, Any] | None = None) -> Callable[[Image.Image], str]:
    """Image -> recognised text, with ``dvsft.sources.ocr``'s rapidocr engine (words joined by spaces).

    ``params`` are rapidocr config overrides, e.g. ``{"Det.limit_type": "max", "Det.limit_side_len": 960}``
    (faster on small images than the default, which scales the short side up to 736 px).
    """
    from dvsft.sources.ocr import get_engine

    engine = get_engine("rapidocr", params=params)
    return lambda image: " ".join(str(w["text"]) for w in engine(image))


def select_visible(
    path: str | Path,
    n: int,
    seed: int = 0,
    split: str = "test",
    ocr: Callable[[Image.Image], str] | None = None,
    on_checked: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Pick ``n`` visible-answer OCR-VQA questions in seeded random order; returns the selection record."""
    meta = [
        (item.id, item.answers, item.meta.get("image_id", item.id))
        for item in iter_items("ocrvqa", path, split, images=False)
    ]
    if not meta:
        raise ValueError(f"--data {path}: no OCR-VQA {split} questions found")
    order = list(range(len(meta)))
    random.Random(seed).shuffle(order)
    ocr = ocr or ocr_engine()
    texts: dict[str, str] = {}  # image id -> OCR text (several questions share an image)
    selected: list[str] = []
    pos = checked = 0
    while len(selected) < n and pos < len(order):
        block = order[pos : pos + max(32, 2 * (n - len(selected)))]
        pos += len(block)
        need_images = {meta[i][2] for i in block} - set(texts)
        if need_images:
            wanted = {meta[i][0] for i in block if meta[i][2] in need_images}
            for item in iter_items("ocrvqa", path, split, only_ids=wanted):
                key = item.meta.get("image_id", item.id)
                if key in need_images and key not in texts:
                    texts[key] = ocr(item.load_images()[0])
                    if on_checked:
                        on_checked(1)
        for i in block:
            qid, answers, image_key = meta[i]
            checked += 1
            if any(answer_visible(a, texts[image_key]) for a in answers):
                selected.append(qid)
                if len(selected) == n:
                    break
    return {
        "benchmark": "ocrvqa",
        "split": split,
        "seed": seed,
        "requested": n,
        "ids": selected,
        "questions_checked": checked,
        "images_ocred": len(texts),
        "rule": "squash(answer) in squash(ocr text); squash = lowercase, letters and digits only",
    }


def write_selection(path: str | Path, selection: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(selection, indent=1))


def read_selection(path: str | Path) -> list[str]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--selection {path}: cannot read a selection file: {err}") from err
    ids = data.get("ids") if isinstance(data, dict) else data
    if not isinstance(ids, list):
        raise ValueError(f"--selection {path}: expected {{'ids': [...]}} or a list of ids")
    return [str(i) for i in ids]
