"""``dvsft bench eval``: generation throughput at batch size 1 vs batched, on the same generated items."""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


def bench_items(n: int, seed: int = 0) -> list[tuple[str, list[Image.Image]]]:
    """``n`` (question, [image]) pairs: short text lines drawn on images of varied sizes."""
    from dvsft.evaluation.benchmarks import SHORT_ANSWER_PROMPT
    from dvsft.sources.corpora import corpus_words
    from dvsft.sources.fonts import load_font

    rng = random.Random(seed)
    words = corpus_words()
    font = load_font("DejaVuSans", 18)
    items = []
    for _ in range(n):
        w, h = rng.choice([(256, 128), (320, 160), (384, 128), (256, 192)])
        image = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(image)
        for row in range(h // 32):
            draw.text((8, 6 + 32 * row), " ".join(rng.choices(words, k=4)), fill="black", font=font)
        items.append((f"What is the first word?{SHORT_ANSWER_PROMPT}", [image]))
    return items


def time_generation(generate, items: list[tuple[str, list[Image.Image]]], batch_size: int) -> tuple[float, list[str]]:
    """Seconds to generate all items in batches of ``batch_size`` (after one warm-up batch), and the outputs."""
    generate([items[0][0]], [items[0][1]])
    start = time.perf_counter()
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        out += generate([q for q, _ in chunk], [ims for _, ims in chunk])
    return time.perf_counter() - start, out


def throughput_benchmark(
    n: int = 32,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    model_dir: str | Path | None = None,
    hidden_size: int = 128,
    layers: int = 4,
    threads: int | None = None,
) -> dict[str, Any]:
    """Samples/s at batch size 1 and at ``batch_size``; every item generates exactly ``max_new_tokens``."""
    import torch
    from rich.table import Table

    from dvsft.evaluation.generation import Generator
    from dvsft.models.loading import load_model, load_processor

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            from dvsft.testing.tiny import TinyConfig, save_tiny

            model_dir = save_tiny(Path(tmp) / "tiny", TinyConfig(hidden_size=hidden_size, layers=layers))
            label = f"tiny Qwen3-VL (hidden {hidden_size}, {layers} layers)"
        else:
            label = str(model_dir)
        model = load_model(model_dir).eval()
        processor = load_processor(model_dir)
    generate = Generator(model, processor, max_new_tokens, min_new_tokens=max_new_tokens)
    items = bench_items(n)
    t1, out1 = time_generation(generate, items, 1)
    tb, outb = time_generation(generate, items, batch_size)
    table = Table(title=f"dvsft bench eval: {n} items, {max_new_tokens} new tokens each, {label}")
    for col in ("batch size", "seconds", "samples/s"):
        table.add_column(col)
    table.add_row("1", f"{t1:.2f}", f"{n / t1:.2f}")
    table.add_row(str(batch_size), f"{tb:.2f}", f"{n / tb:.2f}")
    return {
        "single_s": t1,
        "batched_s": tb,
        "single_samples_per_s": n / t1,
        "batched_samples_per_s": n / tb,
        "ratio": t1 / tb,
        "agree": sum(a == b for a, b in zip(out1, outb, strict=True)),
        "table": table,
        "model": label,
        "threads": torch.get_num_threads(),
    }
