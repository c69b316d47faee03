"""`dvsft lens` on files: one image, or records with their overlays and vision-label accuracy.

Both write into an output folder: :func:`lens_image` ``lens.png`` and ``lens.json``;
:func:`lens_records` ``overlays/NNNNN_<id>.png`` per record, ``lens.json`` (every record's
readings, top ``top_k`` per token, with the label where there is one) and ``accuracy.json``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dvsft.lens.visual_logits import LensResult, lens_overlay, run_lens, vision_label_accuracy


def safe_name(name: str) -> str:
    """``name`` as a file-name part (other characters become ``_``; at most 120 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] or "record"


def lens_image(
    model: Any, processor: Any, image: Path, out: Path, top_k: int = 5, upscale: float = 1.0
) -> tuple[Path, int]:
    """Read ``image`` through the lens; write ``out``/lens.png and lens.json; (the overlay, its visual tokens)."""
    from dvsft.evaluation.items import open_image

    out.mkdir(parents=True, exist_ok=True)
    img = open_image(image, str(image))
    result = run_lens(model, processor, img, top_k=top_k)
    overlay = out / "lens.png"
    lens_overlay(img, result.geometry, result.top1_texts(), upscale=upscale).save(overlay)
    (out / "lens.json").write_text(json.dumps({"image": str(image), **result.to_json()}, ensure_ascii=False, indent=1))
    return overlay, result.layout.num_tokens if result.layout is not None else result.grid.num_tokens


def lens_records(
    model: Any,
    processor: Any,
    records: Path,
    out: Path,
    top_k: int = 5,
    upscale: float = 1.0,
    limit: int | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> tuple[dict[str, Any], int]:
    """Overlays and readings of the first ``limit`` records and their vision-label accuracy; (accuracy, overlays).

    ``progress(description, total)`` may return a callback called once per record.
    """
    from dvsft.core.records import image_path, read_jsonl
    from dvsft.evaluation.items import open_image

    out.mkdir(parents=True, exist_ok=True)
    rows = list(itertools.islice(read_jsonl(records), limit))
    advance = progress("lens", len(rows)) if progress else None
    entries: list[dict[str, Any]] = []

    def on_record(record: dict[str, Any], result: LensResult, labels: dict[int, int]) -> None:
        rid = str(record.get("id", len(entries)))
        top1 = [ids[0] for ids in result.top_ids]
        correct = {k: top1[k] == v for k, v in labels.items()}
        img = open_image(image_path(record, records), rid)
        path = out / "overlays" / f"{len(entries):05d}_{safe_name(rid)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        lens_overlay(img, result.geometry, result.top1_texts(), correct, upscale=upscale).save(path)
        data = result.to_json()
        for tok in data["tokens"]:
            tok["top"] = tok["top"][:top_k]
            if tok["token"] in labels:
                tok["label_id"] = labels[tok["token"]]
        entries.append({"id": rid, "image": record["image"], "overlay": str(path), **data})
        if advance:
            advance()

    acc = vision_label_accuracy(model, processor, rows, records, on_record=on_record, top_k=top_k)
    (out / "lens.json").write_text(json.dumps({"records": entries}, ensure_ascii=False))
    (out / "accuracy.json").write_text(json.dumps({"records": str(records), **acc}, indent=2))
    return acc, len(entries)
