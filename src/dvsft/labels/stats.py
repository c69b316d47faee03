"""Dataset statistics of aligned word records, the columns of the paper's Table 1.

- samples: QA pairs (assistant turns; a transcription record counts as one)
- images: distinct images
- text labels: assistant-turn tokens (content only, no special tokens) with a tokenizer, else
  whitespace words of the assistant turns
- vision labels: labeled visual tokens (``vision_labels`` entries)
- vision coverage: labeled visual tokens / all visual tokens (``grid`` rows x cols), over the file
- dropped: words removed by each alignment filter (``dropped`` of `dvsft align`)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dvsft.records import read_jsonl


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content or "")


def compute_stats(records: Iterable[dict[str, Any]], tokenizer: Any = None, source: str = "records") -> dict[str, Any]:
    """Table 1 numbers of aligned records (see the module docstring)."""
    samples = text_labels = vision_labels = visual_tokens = n = 0
    images: set[str] = set()
    dropped: Counter = Counter()
    for n, rec in enumerate(records, 1):
        where = f"{source}: record {n}" + (f" (id {rec['id']})" if "id" in rec else "")
        grid = rec.get("grid")
        if not (isinstance(grid, list) and len(grid) == 2 and "vision_labels" in rec):
            raise ValueError(f"{where}: no 'grid'/'vision_labels'; run `dvsft align` on the word records first")
        visual_tokens += int(grid[0]) * int(grid[1])
        vision_labels += len(rec["vision_labels"])
        images.add(str(rec.get("image", rec.get("id", n))))
        dropped.update(rec.get("dropped") or {})
        answers = [_text(m.get("content")) for m in rec.get("messages") or [] if m.get("role") == "assistant"]
        samples += len(answers)
        if tokenizer is not None and answers:
            text_labels += sum(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"])
        else:
            text_labels += sum(len(a.split()) for a in answers)
    return {
        "records": n,
        "samples": samples,
        "images": len(images),
        "text_labels": text_labels,
        "text_label_unit": "tokens" if tokenizer is not None else "words",
        "vision_labels": vision_labels,
        "visual_tokens": visual_tokens,
        "vision_coverage": vision_labels / visual_tokens if visual_tokens else 0.0,
        "dropped": dict(sorted(dropped.items())),
    }


def file_stats(path: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return {"file": str(path), **compute_stats(read_jsonl(path), tokenizer, str(path))}
