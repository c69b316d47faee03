"""`dvsft lens` on files: one image, or records with their overlays and vision-label accuracy.

Both write into an output folder: :func:`lens_image` ``lens.png`` and ``lens.json``;
:func:`lens_records` ``overlays/NNNNN_<id>.png`` per record (``NNNNN`` its position in the input, so records
with the same id keep their own overlay), ``lens.json`` (every record's readings, top ``top_k`` per token,
with the label where there is one) and ``accuracy.json`` (strict JSON: no labeled token gives ``null``).
Records that cannot be read are skipped, each with its file, line, id and reason in
``skipped_records.jsonl``. Every image is decoded by :func:`dvsft.core.images.load_image`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from dvsft.core.images import ImageError, load_image
from dvsft.core.record_sources import Entry, iter_entries
from dvsft.core.records import Problem, check_record, record_id
from dvsft.data.skips import REASONS_FILE, report_skips
from dvsft.lens.visual_logits import LabelHits, LensResult, lens_overlay, read_record, run_lens
from dvsft.sources.label_to_image import safe_name


def lens_image(
    model: Any, processor: Any, image: Path, out: Path, top_k: int = 5, upscale: float = 1.0
) -> tuple[Path, int]:
    """Read ``image`` through the lens; write ``out``/lens.png and lens.json; (the overlay, its visual tokens)."""
    try:
        img = load_image(image)
    except ImageError as err:
        raise ValueError(f"cannot read image: {err}") from err
    out.mkdir(parents=True, exist_ok=True)
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

    A record that cannot be read (an unreadable line, an invalid record, a missing or undecodable image, no
    labels for the model's grid) is skipped and written to ``out``/skipped_records.jsonl; the accuracy's
    ``skipped`` counts them. Raises ValueError when no record at all could be read (the files are written
    first). ``progress(description, total)`` may return a callback called once per record.
    """
    entries = list(itertools.islice(iter_entries(records), limit))
    out.mkdir(parents=True, exist_ok=True)
    advance = progress("lens", len(entries)) if progress else None
    hits, readings, problems = LabelHits(), [], []
    for index, entry in enumerate(entries):
        found = _problems(entry)
        if not found:
            record = entry.record or {}
            try:
                image, result, labels = read_record(model, processor, record, entry.file, top_k=top_k)
            except ValueError as err:
                found = [Problem(str(entry.file), entry.number, record_id(record), str(err))]
        if found:
            problems.extend(found)
        else:
            hits.add(result, labels)
            rid = record_id(record) or f"{entry.file.name}#{entry.number}"
            overlay = out / "overlays" / f"{index:05d}_{safe_name(rid)[:100]}.png"
            readings.append(_reading(rid, record, image, result, labels, overlay, top_k, upscale))
        if advance:
            advance()
    skipped = len(entries) - len(readings)
    report_skips(problems, skipped, len(readings), out)
    acc = {**hits.accuracy(), "skipped": skipped}
    (out / "lens.json").write_text(json.dumps({"records": readings}, ensure_ascii=False))
    (out / "accuracy.json").write_text(
        json.dumps(strict_json({"records": str(records), **acc}), indent=2, allow_nan=False)
    )
    if not readings:
        why = f"all {skipped} were skipped (reasons in {out / REASONS_FILE})" if entries else "it holds no records"
        raise ValueError(f"{records}: no record could be read through the lens: {why}")
    return acc, len(readings)


def _problems(entry: Entry) -> list[Problem]:
    """What :func:`dvsft.core.records.check_record` finds wrong with an entry (or why its line is unreadable)."""
    if entry.record is None:
        return [Problem(str(entry.file), entry.number, None, str(entry.error))]
    return check_record(entry.record, entry.file, entry.number, image=True)


def _reading(
    rid: str,
    record: dict[str, Any],
    image: Image.Image,
    result: LensResult,
    labels: dict[int, int],
    overlay: Path,
    top_k: int,
    upscale: float,
) -> dict[str, Any]:
    """Draw the record's overlay at ``overlay``; its lens.json entry (top ``top_k`` per token, labels added)."""
    top1 = [ids[0] for ids in result.top_ids]
    correct = {k: top1[k] == v for k, v in labels.items()}
    overlay.parent.mkdir(parents=True, exist_ok=True)
    lens_overlay(image, result.geometry, result.top1_texts(), correct, upscale=upscale).save(overlay)
    data = result.to_json()
    for tok in data["tokens"]:
        tok["top"] = tok["top"][:top_k]
        if tok["token"] in labels:
            tok["label_id"] = labels[tok["token"]]
    return {"id": rid, "image": record.get("image"), "overlay": str(overlay), **data}


def strict_json(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with NaN and infinite floats as None (JSON's ``null``; bare ``NaN`` is not JSON)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
