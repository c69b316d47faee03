"""Helpers shared by the test modules: tiny rendered word records, tiny training runs, full-logits loss references.

Fixtures built from them (the tiny model directory, the records) are in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

WORDS = ["the", "cat", "sat", "on", "a", "mat", "red", "hat", "old", "map", "sun", "box"]
CELL = 32  # Qwen3-VL token cell


def font() -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), 12)


def make_records(out: Path, n: int = 4, cols: int = 3, rows: int = 2, seed: int = 0) -> Path:
    """``n`` real rendered images (cols x rows token cells), one word per cell, boxes measured by PIL."""
    import random

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    f = font()
    records = []
    for i in range(n):
        img = Image.new("RGB", (cols * CELL, rows * CELL), "white")
        draw = ImageDraw.Draw(img)
        words = []
        for r in range(rows):
            for c in range(cols):
                text = rng.choice(WORDS)
                box = draw.textbbox((c * CELL + 2, r * CELL + 8), text, font=f)
                draw.text((c * CELL + 2, r * CELL + 8), text, font=f, fill="black")
                words.append({"text": text, "box": [float(v) for v in box], "score": 1.0})
        img.save(out / f"img{i}.png")
        records.append(
            {
                "id": f"doc{i}",
                "image": f"img{i}.png",
                "width": img.width,
                "height": img.height,
                "words": words,
                "messages": [
                    {"role": "user", "content": "<image>Which word is first?"},
                    {"role": "assistant", "content": words[0]["text"]},
                ],
            }
        )
    path = out / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def overrides(tiny_dir: Path, data: Path, out: Path, **kw) -> list[str]:
    """A tiny CPU run: 96x64 images (6 visual tokens), constant lr, no warmup."""
    args = {
        "model": str(tiny_dir),
        "data": str(data),
        "output_dir": str(out),
        "min_pixels": 32 * 32 * 4,
        "max_pixels": 32 * 32 * 16,
        "learning_rate": 2e-3,
        "warmup_steps": 0.0,
        "lr_scheduler_type": "constant",
        "global_batch_size": 2,
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "save_steps": 100,
        "report_to": "none",
        "vision_lambda": 1.0,
    }
    args.update(kw)
    out_args: list[str] = []
    for k, v in args.items():
        out_args += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return out_args


def uneven_records(folder: Path) -> Path:
    """Two samples whose labeled token counts differ a lot (a 1-word vs a 9-word answer; 6 vs 2 labeled cells)."""
    path = make_records(folder, n=2, seed=5)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["messages"][1]["content"] = " ".join(w["text"] for w in rows[0]["words"]) + " and the cat sat"
    rows[1]["words"] = rows[1]["words"][:2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def losses(log: list[dict], key: str = "loss") -> list[float]:
    return [row[key] for row in log if key in row and "train_runtime" not in row]


def naive_vision(logits: torch.Tensor, targets, sets, eps: float) -> torch.Tensor:
    """Eq. 3 written out with full log-softmax rows and Python loops."""
    logp = F.log_softmax(logits, dim=-1)
    per_token = []
    for j in range(logits.shape[0]):
        members = sorted({int(v) for v in sets[j] if v >= 0})
        smooth = sum(logp[j, v] for v in members) / len(members)
        per_token.append(-(1 - eps) * logp[j, targets[j]] - eps * smooth)
    return torch.stack(per_token).mean()


def naive_reference(logits: torch.Tensor, batch: dict, lam: float, eps: float):
    """The naive full-logits loss of a collated batch: text cross-entropy + lam * Eq. 3 at its visual tokens.
    Returns (loss, text loss, vision loss)."""
    pos = batch["vision_positions"]
    v_ref = naive_vision(logits[pos[:, 0], pos[:, 1]], batch["vision_targets"], batch["vision_label_sets"], eps)
    v = logits.shape[-1]
    t_ref = F.cross_entropy(logits[:, :-1].reshape(-1, v), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    return t_ref + lam * v_ref, t_ref, v_ref


def assert_same_grads(params, got, want) -> None:
    """Gradients equal to float64 precision; a parameter the reference does not reach gets none (or zeros)."""
    for p, a, b in zip(params, got, want, strict=True):
        if b is None:
            assert a is None or not a.any()
            continue
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-7), p.shape


def three_word_pages(sizes: list[tuple[int, int]], boxes: list[list[int]]) -> list[dict]:
    """White pages of ``sizes`` labeled with the words "the value class" at ``boxes`` (one per word)."""
    pages = []
    for i, (w, h) in enumerate(sizes):
        im = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(im).rectangle((10 + i, 10, 40, 20), fill="black")
        words = [{"text": text, "box": box} for text, box in zip(["the", "value", "class"], boxes, strict=True)]
        msgs = [{"role": "user", "content": "<image>Read it."}, {"role": "assistant", "content": "the value class"}]
        pages.append({"id": f"r{i}", "image": im, "words": words, "messages": msgs})
    return pages


def collated_batch(processor):
    """Two small pages with three labeled words each, collated for ``processor`` (vision labels included)."""
    from dvsft.data.collator import VisionCollator

    boxes = [[4, 4, 28, 28], [36, 36, 60, 60], [70, 4, 94, 28]]
    return VisionCollator(processor)(three_word_pages([(160, 96), (128, 128)], boxes))
