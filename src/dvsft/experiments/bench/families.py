"""`dvsft bench families`: the demo's training step per tiny family, in process CPU time.

For each family the tiny model of a demo preset (``cpu`` by default: 5 x 8 cells of 32 px, a
160 x 256 page, batch 1, the preset's ``tiny:`` sizes) trains on the demo's own rendered pages
through the demo's own `dvsft train` config (:func:`~dvsft.experiments.runner.train_config`):
collation, forward, the DV-SFT loss, backward and the optimizer step. A callback reads the
process CPU time (and the wall clock) at the end of every step; the report gives the median
over the steps after ``warmup``, with one torch thread (a demo run's share of the 2 cores), so
the number does not move with other jobs on the machine. The encoded-sample cache is off: every
step encodes its page, as a first epoch does. Each family also reports what a page costs it:
image-token placeholders, views, vision-tower patches, sequence length and vision labels.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dvsft.experiments.bench.training import machine_description
from dvsft.experiments.settings import DEMO_PRESETS, DemoPreset, page_pixels
from dvsft.models.families import DEFAULT_FAMILY
from dvsft.testing.tiny import TINY_FAMILIES

METHODS = ("sft", "dvsft", "basic")


@dataclass
class FamilyBenchConfig:
    families: list[str] = field(default_factory=lambda: list(TINY_FAMILIES))
    preset: str = "cpu"  # the demo preset whose page, model sizes, batch and lr are used
    steps: int = 20  # timed steps (median reported)
    warmup: int = 5  # untimed steps first
    method: str = "dvsft"
    threads: int = 1  # torch threads (the demo runs 2 jobs of 1 thread each on 2 cores)

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in TINY_FAMILIES]
        if unknown:
            raise ValueError(f"unknown family {unknown[0]!r}; choose from {', '.join(TINY_FAMILIES)}")
        if self.preset not in DEMO_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(DEMO_PRESETS)}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.steps < 1 or self.warmup < 1:
            raise ValueError("steps and warmup must be at least 1 (a step is timed from the previous step's end)")


def page_cost(model_dir: Path, preset: DemoPreset, record: dict[str, Any]) -> dict[str, int]:
    """Image tokens, views and vision-tower patches of one demo page for the model in ``model_dir``."""
    from dvsft.data.collator import VisionCollator
    from dvsft.models.geometry import layout_for
    from dvsft.models.loading import load_processor

    pixels = page_pixels(preset)
    processor = load_processor(str(model_dir), min_pixels=pixels, max_pixels=pixels)
    layout = layout_for(processor, record["width"], record["height"])
    batch = VisionCollator(processor)([record])
    pixel_values = batch["pixel_values"]
    if "image_grid_thw" in batch:  # Qwen: flattened patches, one row each
        patches = int(pixel_values.shape[0])
    else:  # tiled: (tiles, 3, side, side) or (images, tiles, 3, side, side); all-zero padding tiles skipped
        tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        real = int((tiles.flatten(1).abs().sum(1) > 0).sum())
        patch = processor_patch(model_dir)
        patches = real * (tiles.shape[-2] // patch) * (tiles.shape[-1] // patch)
    return {
        "image_tokens": layout.num_tokens,
        "views": len(layout.views),
        "patches": patches,
        "sequence": int(batch["input_ids"].shape[1]),
        "vision_labels": len(batch.get("vision_targets", [])),
    }


def processor_patch(model_dir: Path) -> int:
    """The vision tower's patch side of a saved model (its ``config.json``)."""
    import json

    vision = json.loads((model_dir / "config.json").read_text())["vision_config"]
    patch = vision.get("patch_size", 14)
    return int(patch[0] if isinstance(patch, list) else patch)


def step_times(preset: DemoPreset, model_dir: Path, data: Path, out: Path, cfg: FamilyBenchConfig) -> dict[str, float]:
    """Median CPU and wall seconds per training step (``cfg.warmup`` steps left out)."""
    import torch
    from transformers import TrainerCallback

    from dvsft.experiments.runner import quiet_transformers, train_config
    from dvsft.training.train import train

    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.process_time(), time.perf_counter()))

    quiet_transformers()
    torch.set_num_threads(cfg.threads)
    steps = cfg.warmup + cfg.steps
    config = train_config(preset, str(model_dir), str(data), str(out), cfg.method, 0, steps, preset.batch_size, 10**6)
    config |= {"disable_tqdm": True, "save_final": False, "encoded_cache_dir": "none"}  # every step encodes
    train(config, callbacks=[Clock()])
    timed = marks[cfg.warmup - 1 :]  # the step after a mark is timed from it
    cpu = [b[0] - a[0] for a, b in zip(timed[:-1], timed[1:], strict=True)]
    wall = [b[1] - a[1] for a, b in zip(timed[:-1], timed[1:], strict=True)]
    return {"step_cpu_s": statistics.median(cpu), "step_wall_s": statistics.median(wall), "timed_steps": len(cpu)}


def bench_family(family: str, preset: DemoPreset, data: Path, work: Path, cfg: FamilyBenchConfig) -> dict[str, Any]:
    """One family's row: its tiny model on the demo pages; page cost and step times."""
    from dvsft.core.records import read_jsonl
    from dvsft.experiments.demo_eval import resolved
    from dvsft.testing.tiny import save_tiny

    pixels = page_pixels(preset)
    tiny = replace(preset.tiny, family=family, seed=0, min_pixels=pixels, max_pixels=pixels)
    model_dir = save_tiny(work / family / "model", tiny)
    record = resolved(list(read_jsonl(data)), data)[0]
    row: dict[str, Any] = {"family": family, **page_cost(model_dir, preset, record)}
    return row | step_times(preset, model_dir, data, work / family / "run", cfg)


def demo_pages(preset: DemoPreset, n_pages: int, out: Path) -> Path:
    """``n_pages`` training pages of the demo (its renderer, its running-text corpus)."""
    from dvsft.experiments.demo import demo_stream, render_split

    (out / "images").mkdir(parents=True, exist_ok=True)
    return render_split(demo_stream(preset.vocab_words), n_pages, out, "train", preset, 1)


def bench_families(cfg: FamilyBenchConfig, progress: Any = None) -> dict[str, Any]:
    """Every family of ``cfg``: one row each, plus the CPU-time ratio to ``DEFAULT_FAMILY``'s step."""
    preset = DEMO_PRESETS[cfg.preset]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dvsft-bench-families-") as tmp:
        work = Path(tmp)
        data = demo_pages(preset, max(32, cfg.warmup + cfg.steps), work / "data")
        for family in cfg.families:
            if progress:
                progress(family)
            rows.append(bench_family(family, preset, data, work, cfg))
    base = next((r["step_cpu_s"] for r in rows if r["family"] == DEFAULT_FAMILY), None)
    for row in rows:
        row["cpu_ratio"] = row["step_cpu_s"] / base if base else None
    return {"machine": machine_description("cpu"), "preset": cfg.preset, "rows": rows}


def markdown_table(report: dict[str, Any]) -> str:
    """The report's rows as a Markdown table."""
    columns = ("family", "image tokens", "views", "patches", "sequence", "vision labels", "CPU s/step")
    head = "| " + " | ".join((*columns, f"x {DEFAULT_FAMILY}", "wall s/step")) + " |"
    lines = [head, "| --- " * 9 + "|"]
    for r in report["rows"]:
        ratio = f"{r['cpu_ratio']:.2f}" if r["cpu_ratio"] is not None else "—"
        lines.append(
            f"| {r['family']} | {r['image_tokens']} | {r['views']} | {r['patches']} | {r['sequence']} | "
            f"{r['vision_labels']} | {r['step_cpu_s']:.4f} | {ratio} | {r['step_wall_s']:.4f} |"
        )
    return "\n".join(lines)
