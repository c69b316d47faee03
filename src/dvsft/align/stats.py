"""Dataset statistics of aligned word records, the columns of the paper's Table 1.

- samples: QA pairs (assistant turns; a transcription record counts as one)
- images: distinct images
- text labels: assistant-turn tokens (content only, no special tokens) with a tokenizer, else
  whitespace words of the assistant turns
- vision labels: labeled visual tokens (``vision_labels`` entries), counted once per sample: a
  record with two QA pairs counts its image's labels twice. This is how the paper's Table 1
  counts (DocVQA: 5.40 M labels over 39,463 samples at 6.97% coverage is ~1,960 visual tokens
  per sample, within the 2,048-token budget; per image it would be ~7,600).
- visual tokens, vision coverage: all visual tokens (``grid`` rows x cols), per sample like the
  labels; coverage = labeled tokens / visual tokens (labeled tokens: distinct tokens with a label, = vision
  labels unless ``--multi-label`` gave a token several)
- labels per labeled token: vision labels / labeled tokens (1 without multi-label)
- per_kind: per entry kind (``word``, ``object``: a label's ``kind``, absent = word) the vision labels, labeled
  tokens, coverage and labels per labeled token, per sample
- per_policy: per label policy of the records' ``align`` settings (``bottom-right``, ``span``, ``fill``, with
  `` +multi-label``) the records, the same figures and the drops per filter
- per_image: the same three figures counting each distinct image once (its first record)
- label_kinds: vision labels by kind (per sample): alphabetic (Latin letters), numeric (digits,
  with or without number punctuation), mixed (letters and digits), punctuation (no letter or
  digit: punctuation, symbols, emoji), other_script (letters of a non-Latin script)
- blank_labels: vision labels whose token is whitespace-only (must be 0; needs a tokenizer for
  ``token_id``, else the label text is checked)
- dropped: words removed by each alignment filter (``dropped`` of `dvsft align`), per record
- per_view (tiled families, records with ``views``): per view kind (tile, thumbnail, base, crops,
  global) the vision labels, visual tokens, coverage and the view-level drops (too_tall,
  token_conflict, unseen), per sample like the totals
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dvsft.core.records import read_records


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content or "")


LABEL_KINDS = ("alphabetic", "numeric", "mixed", "punctuation", "other_script")


def label_kind(text: str) -> str:
    """One of ``LABEL_KINDS`` for a label word (see the module docstring)."""
    letters = [c for c in text if c.isalpha()]
    digits = any(c.isdigit() for c in text)
    if any(not unicodedata.name(c, "").startswith("LATIN") for c in letters):
        return "other_script"
    if letters:
        return "mixed" if digits else "alphabetic"
    return "numeric" if digits else "punctuation"


def compute_stats(records: Iterable[dict[str, Any]], tokenizer: Any = None, source: str = "records") -> dict[str, Any]:
    """Table 1 numbers of aligned records (see the module docstring)."""
    from dvsft.align.aligner import is_blank_token

    samples = text_labels = vision_labels = visual_tokens = n = blank = 0
    images: set[str] = set()
    image_labels = image_tokens = image_labeled = 0
    dropped: Counter = Counter()
    kinds: Counter = Counter(dict.fromkeys(LABEL_KINDS, 0))
    per_view: dict[str, Counter] = {}
    per_kind: dict[str, Counter] = {}
    per_policy: dict[str, Counter] = {}
    labeled = 0
    for n, rec in enumerate(records, 1):
        where = f"{source}: record {n}" + (f" (id {rec['id']})" if "id" in rec else "")
        grid = rec.get("grid")
        views = rec.get("views")
        if not ((isinstance(grid, list) and len(grid) == 2) or isinstance(views, list)) or "vision_labels" not in rec:
            raise ValueError(f"{where}: no 'grid'/'vision_labels'; run `dvsft align` on the word records first")
        answers = [_text(m.get("content")) for m in rec.get("messages") or [] if m.get("role") == "assistant"]
        weight = max(1, len(answers))  # samples of this record; a record without QA is one sample
        samples += len(answers)
        labels = rec["vision_labels"]
        if isinstance(views, list):  # a tiled family: every view's tokens, labels per view kind
            tokens = sum(int(v["grid"][0]) * int(v["grid"][1]) for v in views)
            for v in views:
                kind = per_view.setdefault(str(v["kind"]), Counter())
                kind["visual_tokens"] += weight * int(v["grid"][0]) * int(v["grid"][1])
            for lab in rec["vision_labels"]:
                per_view.setdefault(str(lab.get("view")), Counter())["vision_labels"] += weight
            for kind, counts in (rec.get("dropped_per_view") or {}).items():
                per_view.setdefault(str(kind), Counter()).update(
                    {f"dropped_{k}": v for k, v in counts.items() if k != "labels"}
                )
        else:
            tokens = int(grid[0]) * int(grid[1])
        visual_tokens += weight * tokens
        vision_labels += weight * len(labels)
        n_labeled = len({lab.get("token") for lab in labels})  # = len(labels) unless multi-label
        labeled += weight * n_labeled
        _count_kinds(per_kind, labels, weight)
        _count_policy(per_policy, rec, labels, tokens, weight)
        image = str(rec.get("image", rec.get("id", n)))
        if image not in images:
            images.add(image)
            image_labels += len(labels)
            image_labeled += n_labeled
            image_tokens += tokens
        for lab in labels:
            text, tid = str(lab.get("text", "")), lab.get("token_id")
            kinds[label_kind(text)] += weight
            if not text.strip() or (tokenizer is not None and tid is not None and is_blank_token(int(tid), tokenizer)):
                blank += weight
        dropped.update(rec.get("dropped") or {})
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
        "labeled_tokens": labeled,
        "vision_coverage": labeled / visual_tokens if visual_tokens else 0.0,
        "labels_per_labeled_token": vision_labels / labeled if labeled else 0.0,
        "per_kind": {k: _group_stats(c, visual_tokens) for k, c in sorted(per_kind.items())},
        "per_policy": {k: _group_stats(c) for k, c in sorted(per_policy.items())},
        "per_image": {
            "vision_labels": image_labels,
            "visual_tokens": image_tokens,
            "vision_coverage": image_labeled / image_tokens if image_tokens else 0.0,
        },
        "label_kinds": dict(kinds),
        "blank_labels": blank,
        "dropped": dict(sorted(dropped.items())),
        **({"per_view": {k: _view_stats(c) for k, c in per_view.items()}} if per_view else {}),
    }


def _count_kinds(per_kind: dict[str, Counter], labels: list[dict[str, Any]], weight: int) -> None:
    """Add one record's labels and labeled tokens per entry kind."""
    by_kind: dict[str, set] = {}
    for lab in labels:
        kind = str(lab.get("kind", "word"))
        by_kind.setdefault(kind, set()).add(lab.get("token"))
        per_kind.setdefault(kind, Counter())["vision_labels"] += weight
    for kind, tokens in by_kind.items():
        per_kind[kind]["labeled_tokens"] += weight * len(tokens)


def _count_policy(
    per_policy: dict[str, Counter], rec: dict[str, Any], labels: list[dict[str, Any]], tokens: int, weight: int
) -> None:
    """Add one record to the figures of its label policy (``align`` settings; bottom-right when absent)."""
    settings = rec.get("align") if isinstance(rec.get("align"), dict) else {}
    name = str(settings.get("label_policy", "bottom-right")) + (" +multi-label" if settings.get("multi_label") else "")
    c = per_policy.setdefault(name, Counter())
    c["records"] += 1
    c["vision_labels"] += weight * len(labels)
    c["labeled_tokens"] += weight * len({lab.get("token") for lab in labels})
    c["visual_tokens"] += weight * tokens
    c.update({f"dropped_{k}": v for k, v in (rec.get("dropped") or {}).items()})


def _group_stats(c: Counter, visual_tokens: int | None = None) -> dict[str, Any]:
    """Labels, labeled tokens, coverage, labels per labeled token (and records, drops where counted) of a group;
    coverage over ``visual_tokens`` (all of the file's, for a kind) or the group's own."""
    out: dict[str, Any] = {k: c[k] for k in ("records", "vision_labels", "labeled_tokens", "visual_tokens") if k in c}
    tokens = c["visual_tokens"] if visual_tokens is None else visual_tokens
    out["vision_coverage"] = c["labeled_tokens"] / tokens if tokens else 0.0
    out["labels_per_labeled_token"] = c["vision_labels"] / c["labeled_tokens"] if c["labeled_tokens"] else 0.0
    dropped = {k.removeprefix("dropped_"): v for k, v in sorted(c.items()) if k.startswith("dropped_")}
    return {**out, "dropped": dropped} if "records" in c else out


def _view_stats(c: Counter) -> dict[str, Any]:
    """Labels, tokens, coverage and drops of one view kind."""
    out: dict[str, Any] = {"vision_labels": c["vision_labels"], "visual_tokens": c["visual_tokens"]}
    out["vision_coverage"] = c["vision_labels"] / c["visual_tokens"] if c["visual_tokens"] else 0.0
    out["dropped"] = {k.removeprefix("dropped_"): v for k, v in sorted(c.items()) if k.startswith("dropped_")}
    return out


def file_stats(path: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return {"file": str(path), **compute_stats(read_records(path), tokenizer, str(path))}


def stats_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """``file_stats``'s result as (name, value) rows, as `dvsft stats` prints them (the paper's Table 1 first)."""
    rows = [
        ("samples", f"{result['samples']:,}"),
        ("images", f"{result['images']:,}"),
        (f"text labels ({result['text_label_unit']})", f"{result['text_labels']:,}"),
        ("vision labels", f"{result['vision_labels']:,}"),
        ("visual tokens", f"{result['visual_tokens']:,}"),
        ("vision coverage", f"{100 * result['vision_coverage']:.2f}%"),
        ("labeled tokens", f"{result['labeled_tokens']:,}"),
        ("labels per labeled token", f"{result['labels_per_labeled_token']:.3f}"),
    ]
    for group in ("per_kind", "per_policy"):
        rows += [(f"{group.removeprefix('per_')} {k}", _group_row(g)) for k, g in result[group].items()]
    img = result["per_image"]
    rows += [
        ("vision labels, per image", f"{img['vision_labels']:,}"),
        ("visual tokens, per image", f"{img['visual_tokens']:,}"),
        ("vision coverage, per image", f"{100 * img['vision_coverage']:.2f}%"),
    ]
    total = result["vision_labels"] or 1
    rows += [(f"labels: {k}", f"{v:,} ({100 * v / total:.1f}%)") for k, v in result["label_kinds"].items()]
    rows.append(("labels: whitespace-only", f"{result['blank_labels']:,}"))
    rows += [(f"dropped: {k}", f"{v:,}") for k, v in result["dropped"].items()]
    for kind, view in result.get("per_view", {}).items():  # tiled families: per view kind
        rows.append((f"view {kind}: labels / tokens", f"{view['vision_labels']:,} / {view['visual_tokens']:,}"))
        rows += [(f"view {kind}: dropped {k}", f"{v:,}") for k, v in view["dropped"].items()]
    return rows


def _group_row(g: dict[str, Any]) -> str:
    """One kind's or policy's figures on one line: coverage, labels per labeled token, labels."""
    return (
        f"{100 * g['vision_coverage']:.2f}% coverage, {g['labels_per_labeled_token']:.3f} labels per labeled token, "
        f"{g['vision_labels']:,} labels"
    )
