"""`dvsft bench train --packing`: tokens per second and padding share of packed against padded batches.

One set of document pages of mixed sizes (a few to several hundred visual tokens each, answers of 1 to 40 words) is
collated twice with the real processor and :class:`~dvsft.data.collator.VisionCollator` of a tiny Qwen3-VL: padded,
``batch_size`` samples per batch in a seeded order, each batch padded to its longest sample; and packed
(:mod:`dvsft.data.packing`), the samples bin-packed into rows of at most ``max_length`` tokens, ``rows`` per batch,
once for each of ``max_lengths`` (on a CPU, attention costs the square of the packed row's length whatever the
mask, so a row much longer than a padded batch's loses part of the gain).
Every mode then runs forward + backward of the DV-SFT loss over every batch (one epoch; no optimizer step, the same
for both), ``repeats`` times each, alternating (padded, packed, padded, ...) so load from other processes drifts
over both alike. Reported per mode: the padding share (pad tokens / all tokens the model runs), wall and process CPU
time of the epoch (medians), and real tokens per second of each.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageDraw

CELL = 32  # Qwen3-VL's token cell (patch 16 x merge 2)
# page sizes in token cells (cols, rows): 6 to 320 visual tokens
PAGE_CELLS = ((3, 2), (5, 4), (8, 6), (12, 9), (16, 12), (10, 16), (20, 16))
WORDS = ("total", "invoice", "date", "amount", "paid", "due", "tax", "net", "sum", "order", "item", "price")


@dataclass
class PackingBenchConfig:
    samples: int = 64
    hidden_size: int = 256
    layers: int = 2
    batch_size: int = 4  # padded: samples per batch
    max_lengths: tuple[int, ...] = (512, 1024)  # packed: tokens per row, one mode each
    rows: int = 1  # packed: rows per batch
    repeats: int = 3
    threads: int = 1
    seed: int = 0


def pages(cfg: PackingBenchConfig) -> list[dict[str, Any]]:
    """``cfg.samples`` pages of the :data:`PAGE_CELLS` sizes, a word drawn in every third cell (its box a word
    label), asked for their first words (1 to 40)."""
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.samples):
        cols, rows = rng.choice(PAGE_CELLS)
        image = Image.new("RGB", (cols * CELL, rows * CELL), "white")
        draw, words = ImageDraw.Draw(image), []
        for k in range(0, cols * rows, 3):
            x, y = (k % cols) * CELL, (k // cols) * CELL
            text = rng.choice(WORDS)
            draw.text((x + 2, y + 10), text, fill="black")
            words.append({"text": text, "box": [x + 2, y + 10, x + 30, y + 22]})
        answer = " ".join(w["text"] for w in words[: rng.randint(1, 40)])
        messages = [{"role": "user", "content": "<image>Read the page."}, {"role": "assistant", "content": answer}]
        out.append({"id": f"p{i}", "image": image, "words": words, "messages": messages})
    return out


def batches(cfg: PackingBenchConfig, collator: Any, samples: list[dict[str, Any]]) -> dict[str, list[dict]]:
    """The epoch's batches of each mode, collated once (the collator's work is the same for both)."""
    from dvsft.data.packing import PackedSamples, PackingCollator

    order = random.Random(cfg.seed).sample(samples, len(samples))
    padded = [collator(order[i : i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
    lengths = [int(collator.check(s).input_ids.numel()) for s in samples]
    modes = {"padded": padded}
    packer = PackingCollator(collator)
    for max_length in cfg.max_lengths:
        bins = PackedSamples(samples, lengths, max_length)
        groups = [range(i, min(i + cfg.rows, len(bins))) for i in range(0, len(bins), cfg.rows)]
        modes[f"packed {max_length}"] = [packer([bins[j] for j in group]) for group in groups]
    return modes


def epoch(model: Any, epoch_batches: list[dict[str, Any]]) -> tuple[float, float]:
    """(wall s, process CPU s) of forward + backward over the batches."""
    from dvsft.objectives.losses import model_loss

    wall, cpu = time.perf_counter(), time.process_time()
    for batch in epoch_batches:
        model_loss(model, batch, vision_weight=1.0).loss.backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_packing(cfg: PackingBenchConfig, progress: Any = None) -> dict[str, Any]:
    """Time both modes and return the numbers (see the module docstring)."""
    import torch

    from dvsft.data.collator import VisionCollator
    from dvsft.experiments.bench.training import machine_description
    from dvsft.testing.tiny import TinyConfig, build_tiny

    if cfg.samples < 1 or cfg.batch_size < 1 or cfg.rows < 1 or cfg.repeats < 1:
        raise ValueError("samples, batch_size, rows and repeats must be positive")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tiny = TinyConfig(hidden_size=cfg.hidden_size, layers=cfg.layers, max_pixels=CELL * CELL * 512)
    model, processor = build_tiny(tiny)
    model.train()
    collator = VisionCollator(processor, max_length=min(cfg.max_lengths), cache_dir="none")
    modes = batches(cfg, collator, pages(cfg))
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    for r in range(cfg.repeats + 1):  # the first round warms up
        for mode, epoch_batches in modes.items():
            if progress is not None:
                progress(f"{mode}: round {r + 1} of {cfg.repeats + 1}")
            spent = epoch(model, epoch_batches)
            if r:
                times[mode].append(spent)
    results = {mode: _summary(modes[mode], times[mode]) for mode in modes}
    return {"config": asdict(cfg), "machine": machine_description("cpu"), "results": results}


def _summary(epoch_batches: list[dict[str, Any]], times: list[tuple[float, float]]) -> dict[str, Any]:
    real = sum(int(b["attention_mask"].sum()) for b in epoch_batches)
    run = sum(int(b["input_ids"].numel()) for b in epoch_batches)
    wall, cpu = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
    return {
        "batches": len(epoch_batches),
        "real_tokens": real,
        "model_tokens": run,
        "padding_share": 1 - real / run,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s_wall": real / wall,
        "tokens_per_s_cpu": real / cpu,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (rows: padded, then packed per packed length; ratios against padded)."""
    base = report["results"]["padded"]
    lines = [
        "| batches | steps | padding share | epoch wall (s) | epoch CPU (s) | tokens/s (CPU) | tokens/s (wall) | "
        "tokens/s (CPU) vs padded |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, r in report["results"].items():
        lines.append(
            f"| {mode} | {r['batches']} | {r['padding_share']:.1%} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['tokens_per_s_cpu']:,.0f} | {r['tokens_per_s_wall']:,.0f} | "
            f"{r['tokens_per_s_cpu'] / base['tokens_per_s_cpu']:.2f}x |"
        )
    return "\n".join(lines)
