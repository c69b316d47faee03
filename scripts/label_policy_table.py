"""The label-policy comparison of docs/labeling.md (issue #26): Table-1 figures per policy on two page sets.

Usage: python scripts/label_policy_table.py OUT_DIR [--pages 48] [--receipts 24]

- ``squad``: SQuAD v1.1-style documents (paragraphs of the bundled prose, one extractive question each)
  rendered by ``dvsft render`` (its defaults: 32 x 32 cells, random DejaVu face, light text on dark);
- ``receipts``: receipt-like pages (store header, items with prices, totals; DejaVu Sans Mono on white)
  drawn with PIL, then OCR'd by ``dvsft label`` (rapidocr): real OCR boxes, no glyph advances.

Each set is aligned to Qwen3-VL at the training pixels with Qwen's tokenizer under bottom-right, span,
span + multi-label, fill and fill + multi-label (fill on word boxes: no regions here), and ``dvsft stats``'
figures are printed as one Markdown table (and written to OUT_DIR/table.json): coverage, labels per labeled
token, labels and the drops per filter.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

POLICIES = [
    ("bottom-right", False),
    ("span", False),
    ("span", True),
    ("fill", False),
    ("fill", True),
]
ITEMS = [
    "COFFEE BEANS",
    "WHOLE MILK",
    "SOURDOUGH BREAD",
    "FREE RANGE EGGS",
    "ORANGE JUICE",
    "CHEDDAR CHEESE",
    "BANANAS",
    "OLIVE OIL",
    "PASTA",
    "TOMATO SAUCE",
    "GREEK YOGURT",
    "DISHWASHER TABS",
    "PAPER TOWELS",
    "SPARKLING WATER",
    "DARK CHOCOLATE",
    "BASMATI RICE",
    "ALMOND BUTTER",
    "RED APPLES",
]
STORES = ["GREENLEAF MARKET", "CORNER GROCERY", "SUNRISE FOODS", "HARBOR PANTRY"]


def dvsft(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "from dvsft.cli import app; app()", *args], check=True)


def squad_source(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` paragraphs of the bundled prose (40-160 words) as SQuAD v1.1, one extractive question each."""
    from dvsft.sources.corpora import corpus_text

    rng = random.Random(seed)
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in corpus_text().split("\n\n")]
    paragraphs = [p for p in paragraphs if 40 <= len(p.split()) <= 160 and p.isascii()]
    data = []
    for i, text in enumerate(rng.sample(paragraphs, n)):
        words = text.split()
        k = rng.randrange(1, len(words) - 1)
        answer = words[k]
        question = f"Which word follows '{words[k - 1]}' in the passage?"
        qa = {"id": f"q{i}", "question": question, "answers": [{"text": answer, "answer_start": text.index(answer)}]}
        data.append({"title": f"doc{i}", "paragraphs": [{"context": text, "qas": [qa]}]})
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def receipt(rng: random.Random) -> Image.Image:
    """One receipt-like page: header, dated items with prices, subtotal, tax, total."""
    from dvsft.sources import fonts

    font = fonts.load_font("DejaVuSansMono", 18)
    lines = [rng.choice(STORES), f"{rng.randrange(10, 999)} MAIN STREET", f"DATE {rng.randrange(1, 28):02d}/11/2026"]
    lines.append("-" * 30)
    total = 0.0
    for item in rng.sample(ITEMS, rng.randrange(5, 11)):
        price = rng.randrange(99, 2499) / 100
        total += price
        lines.append(f"{item:<22}{price:>8.2f}")
    tax = round(total * 0.08, 2)
    lines += ["-" * 30, f"{'SUBTOTAL':<22}{total:>8.2f}", f"{'TAX 8%':<22}{tax:>8.2f}"]
    lines += [f"{'TOTAL':<22}{total + tax:>8.2f}", "", "THANK YOU FOR SHOPPING"]
    image = Image.new("RGB", (420, 40 + 28 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((24, 20 + 28 * i), line, font=font, fill="black")
    return image


def receipts_source(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        receipt(rng).save(folder / f"receipt{i:03d}.png")
    return folder


def policy_rows(words: Path, out: Path, tokenizer) -> list[dict]:
    """Align ``words`` under each policy; one row of stats figures per policy."""
    from dvsft.align.aligner import AlignConfig
    from dvsft.align.run import align_file
    from dvsft.align.stats import file_stats
    from dvsft.models.geometry import TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS

    rows = []
    for name, multi in POLICIES:
        config = AlignConfig(label_policy=name, multi_label=multi)
        aligned = out / f"{name}{'-multi' if multi else ''}.jsonl"
        align_file(words, aligned, "qwen3-vl", tokenizer, config, TRAIN_MIN_PIXELS, TRAIN_MAX_PIXELS, overwrite=True)
        s = file_stats(aligned)
        rows.append(
            {
                "policy": name + (" + multi-label" if multi else ""),
                "images": s["images"],
                "visual_tokens": s["visual_tokens"],
                "vision_labels": s["vision_labels"],
                "labeled_tokens": s["labeled_tokens"],
                "coverage": s["vision_coverage"],
                "labels_per_labeled_token": s["labels_per_labeled_token"],
                "dropped": s["dropped"],
            }
        )
    return rows


def markdown(sets: dict[str, list[dict]]) -> str:
    filters = sorted({k for rows in sets.values() for r in rows for k in r["dropped"]})
    head = ["pages", "policy", "coverage", "labels / labeled token", "labels", *(f"dropped: {f}" for f in filters)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in sets.items():
        for r in rows:
            cells = [name, r["policy"], f"{100 * r['coverage']:.1f}%", f"{r['labels_per_labeled_token']:.3f}"]
            cells += [f"{r['vision_labels']:,}", *(f"{r['dropped'].get(f, 0):,}" for f in filters)]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pages", type=int, default=48, help="SQuAD-like documents to render")
    parser.add_argument("--receipts", type=int, default=24, help="receipt pages to OCR")
    args = parser.parse_args()
    from dvsft.testing.qwen_vocab import qwen_tokenizer

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_tokenizer()
    squad = squad_source(out / "squad.json", args.pages)
    dvsft("render", str(squad), "--out", str(out / "squad"), "--overwrite")
    receipts = receipts_source(out / "receipt_images", args.receipts)
    words = out / "receipts.jsonl"
    words.unlink(missing_ok=True)
    dvsft("label", str(receipts), "--out", str(words))
    sets = {}
    for name, path in {"SQuAD-like, rendered": out / "squad" / "words.jsonl", "receipts, OCR'd": words}.items():
        folder = out / ("aligned_" + name.split(",")[0].split("-")[0].lower())
        folder.mkdir(exist_ok=True)
        sets[name] = policy_rows(path, folder, tokenizer)
    (out / "table.json").write_text(json.dumps(sets, indent=1))
    print(markdown(sets))


if __name__ == "__main__":
    main()
