"""`dvsft compare`: every method trained and scored on the same embedded data, budget and seeds.

Data, model and the transcription metrics are the demo's (:mod:`dvsft.experiments.demo`): pages of the bundled
corpus rendered onto the visual-token grid, a tiny real Qwen3-VL per seed, greedy transcription of
held-out pages (word accuracy, CER) and vision-label top-1. On top, held-out region tasks built from
the held-out pages' word boxes: Bbox2Caption (phrase, ROUGE-L), Caption2Bbox (phrase, Acc@IoU0.5),
bbox-to-ocr (word, ROUGE-L) and ocr-to-bbox (word, Acc@IoU0.5).

Every method gets the same number of optimizer steps and batch size from the same base model per
seed; the region-task variants spend part of that budget on region QA (``region_share`` of the
samples), the staged FineViT recipe splits it between its two stages. The runs go through the demo's
runner (:mod:`dvsft.experiments.runner`), scored once on the final model. Writes ``results.json``,
``table.md`` and ``compare.png`` under ``--out``.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dvsft.experiments.runner import Job, TrainStage, pool_size, quiet_transformers, run_jobs, summarize
from dvsft.experiments.settings import COMPARE_PRESETS, ComparePreset


@dataclass(frozen=True)
class Stage:
    method: str  # objectives for `dvsft train` (sft, dvsft, dvsft+asvr, ...)
    data: str  # ocr: transcription pages; mix: transcription + region tasks; regions: region tasks only
    share: float = 1.0  # share of the step budget
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    label: str
    stages: tuple[Stage, ...]
    note: str = ""


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec("SFT", (Stage("sft", "ocr"),), "text loss only"),
    "dvsft": MethodSpec("DV-SFT", (Stage("dvsft", "ocr"),), "text + vision loss on every labeled visual token"),
    "basic": MethodSpec("BASIC", (Stage("basic", "ocr"),), "text + projector self-distillation (direction + KL)"),
    "asvr": MethodSpec("ASVR", (Stage("asvr", "ocr"),), "text + k-means code prediction at visual positions"),
    "dvsft+asvr": MethodSpec("DV-SFT + ASVR", (Stage("dvsft+asvr", "ocr"),), "both visual objectives"),
    "regions": MethodSpec(
        "SFT + region tasks", (Stage("sft", "mix"),), "GranViT/FineViT region QA mixed into the SFT data"
    ),
    "dvsft+regions": MethodSpec(
        "DV-SFT + region tasks", (Stage("dvsft", "mix"),), "DV-SFT on the same mixed data (region records keep words)"
    ),
    "dvsft+lsd": MethodSpec(
        "DV-SFT + LSD", (Stage("dvsft+lsd", "mix"),), "DV-SFT on mixed data + localized self-distillation"
    ),
    "finevit-staged": MethodSpec(
        "FineViT staged",
        (Stage("sft", "regions", 0.5), Stage("dvsft", "ocr", 0.5)),
        "stage 1 region alignment (all parts), stage 2 DV-SFT; half the budget each",
    ),
}
PRESETS: dict[str, ComparePreset] = COMPARE_PRESETS  # presets/compare.yaml

REGION_EVAL = (  # (task, level): held-out region questions, one of each per held-out page
    ("bbox2caption", "phrase"),
    ("caption2bbox", "phrase"),
    ("bbox2ocr", "word"),
    ("ocr2bbox", "word"),
)
METRICS = (  # (key, column title, higher is better)
    ("word_acc", "word acc", True),
    ("cer", "CER", False),
    ("vision_top1", "vision top-1", True),
    ("bbox2caption_rouge", "Bbox2Caption ROUGE-L", True),
    ("caption2bbox_acc", "Caption2Bbox Acc@0.5", True),
    ("bbox2ocr_rouge", "bbox-to-ocr ROUGE-L", True),
    ("ocr2bbox_acc", "ocr-to-bbox Acc@0.5", True),
)
SUMMARY_KEYS = (*(key for key, _, _ in METRICS), "train_seconds")


# --------------------------------------------------------------------------- data


def region_records(records_file: Path, tasks_levels: list[tuple[tuple[str, ...], str]], seed: int) -> list[dict]:
    """Region-task records (relative boxes) of every page of ``records_file``, image paths made absolute."""
    from dvsft.core.records import image_path, read_jsonl
    from dvsft.sources.region_tasks import TaskConfig, task_records

    rng = random.Random(seed)
    out = []
    for rec in read_jsonl(records_file):
        rec = dict(rec, image=str(image_path(rec, records_file).resolve()))
        for tasks, level in tasks_levels:
            made, _ = task_records(rec, TaskConfig(tasks=tasks, level=level, max_per_image=2), rng)
            out.extend(made)
    return out


def build_sets(train_file: Path, data_dir: Path, share: float, seed: int) -> dict[str, Path]:
    """The training sets by name: ``ocr`` (the demo's pages), ``mix`` and ``regions``."""
    from dvsft.core.records import image_path, read_jsonl, write_jsonl

    ocr = [dict(r, image=str(image_path(r, train_file).resolve())) for r in read_jsonl(train_file)]
    regions = region_records(
        train_file, [(("bbox2caption", "caption2bbox"), "phrase"), (("bbox2ocr", "ocr2bbox"), "word")], seed
    )
    rng = random.Random(seed)
    rng.shuffle(regions)
    n_mix = min(len(regions), round(len(ocr) * share / max(1e-9, 1 - share)))
    mix = ocr + regions[:n_mix]
    rng.shuffle(mix)
    sets = {
        "ocr": data_dir / "train_ocr.jsonl",
        "mix": data_dir / "train_mix.jsonl",
        "regions": data_dir / "train_regions.jsonl",
    }
    write_jsonl(sets["ocr"], ocr)
    write_jsonl(sets["mix"], mix)
    write_jsonl(sets["regions"], regions[: len(ocr)])
    return sets


def heldout_region_items(heldout_file: Path, seed: int) -> list[dict]:
    """One question per (task, level) of :data:`REGION_EVAL` per held-out page."""
    from dvsft.core.records import image_path, read_jsonl
    from dvsft.sources.region_tasks import TaskConfig, task_records

    rng = random.Random(seed)
    items = []
    for rec in read_jsonl(heldout_file):
        rec = dict(rec, image=str(image_path(rec, heldout_file).resolve()))
        for task, level in REGION_EVAL:
            made, _ = task_records(rec, TaskConfig(tasks=(task,), level=level, max_per_image=1), rng)
            items.extend(made)
    return items


# --------------------------------------------------------------------------- evaluation


# --------------------------------------------------------------------------- one run


def stage_steps(spec: MethodSpec, steps: int) -> list[int]:
    """Optimizer steps of each stage; they add up to ``steps``."""
    out, used = [], 0
    for i, stage in enumerate(spec.stages):
        n = steps - used if i == len(spec.stages) - 1 else max(1, round(steps * stage.share))
        out.append(n)
        used += n
    return out


@dataclass(frozen=True)
class HeldoutEvaluation:
    """A job's evaluation: transcription of the held-out pages and the held-out region questions."""

    heldout: str  # records file of the held-out pages
    region_items: list[dict]

    def __call__(self, model: Any, processor: Any) -> dict[str, float]:
        from dvsft.core.records import read_jsonl
        from dvsft.experiments.demo_eval import transcription

        heldout_file = Path(self.heldout)
        metrics = transcription(model, processor, list(read_jsonl(heldout_file)), heldout_file)
        from dvsft.evaluation.region_tasks import region_task_scores

        return metrics | region_task_scores(model, processor, self.region_items)


def train_stages(spec: MethodSpec, cp: ComparePreset, sets: dict[str, str], codes: str | None, out: Path) -> tuple:
    """The :class:`TrainStage` runs of one method: its stages' share of ``cp.steps``, objectives filled in."""
    stages = []
    for i, (stage, n_steps) in enumerate(zip(spec.stages, stage_steps(spec, cp.steps), strict=True)):
        objectives = {k: dict(v) for k, v in stage.objectives.items()}
        if "asvr" in stage.method.split("+"):
            objectives.setdefault("asvr", {})["codes"] = codes
        if "lsd" in stage.method.split("+"):
            objectives.setdefault("lsd", {})["regions_per_image"] = cp.lsd_regions
        output_dir = str(out / f"stage{i + 1}")
        stages.append(
            TrainStage(stage.method, sets[stage.data], n_steps, output_dir, max(1, n_steps // 10), objectives)
        )
    return tuple(stages)


# --------------------------------------------------------------------------- reporting


def progress_line(row: dict) -> str:
    """One finished run as a plain log line."""
    return f"{METHODS[row['method']].label} seed {row['seed']}: word accuracy {100 * row['word_acc']:.1f}%"


def markdown_table(summary: dict, methods: list[str]) -> str:
    head = "| method | " + " | ".join(title for _, title, _ in METRICS) + " | train s |"
    lines = [head, "| --- " * (len(METRICS) + 2) + "|"]
    best = {}
    for key, _, higher in METRICS:
        vals = {m: summary[m][key]["mean"] for m in methods if m in summary and key in summary[m]}
        if vals:
            best[key] = (max if higher else min)(vals.values())
    for m in methods:
        if m not in summary:
            continue
        cells = []
        for key, _, _ in METRICS:
            s = summary[m].get(key)
            if s is None:
                cells.append("–")
                continue
            text = f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
            cells.append(f"**{text}**" if abs(s["mean"] - best[key]) < 1e-12 else text)
        secs = summary[m].get("train_seconds", {}).get("mean", float("nan"))
        lines.append(f"| {METHODS[m].label} (`{m}`) | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- orchestration


def fit_codes(base: Path, train_file: Path, out_dir: Path, k: int, max_images: int, pixels: int) -> Path:
    """ASVR codes of one base model over (a sample of) the training pages."""
    import torch

    from dvsft.core.records import image_path, read_jsonl
    from dvsft.models.loading import load_model, load_processor
    from dvsft.objectives.codes import fit_from_files

    if (out_dir / "codebook.json").is_file():
        return out_dir
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    paths = [image_path(r, train_file).resolve() for r in read_jsonl(train_file)][:max_images]
    model = load_model(base).eval()
    processor = load_processor(base, min_pixels=pixels, max_pixels=pixels)
    fit_from_files(model, processor, paths, out_dir, k=k, levels=1, seed=0, iters=30)
    return out_dir


def run_compare(
    preset_name: str = "cpu",
    seeds: int | None = None,
    steps: int | None = None,
    methods: list[str] | None = None,
    out: Path = Path("dvsft-compare"),
    workers: int | None = None,
) -> dict:
    """Run every method; returns the results also written to ``out/results.json``."""

    from rich.console import Console

    from dvsft.experiments import demo
    from dvsft.experiments.plots import plot_bars

    quiet_transformers()  # no per-file bars while the base models are written and the ASVR codes fitted
    console = Console()
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    cp = PRESETS[preset_name]
    if steps is not None:
        cp = replace(cp, steps=steps)
    methods = list(methods or cp.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    n_seeds = seeds if seeds is not None else cp.seeds
    demo_preset = demo.PRESETS[cp.demo]
    dp = replace(
        demo_preset,
        cols=cp.cols or demo_preset.cols,
        rows=cp.rows or demo_preset.rows,
        words_per_row=0,  # full rows of running text: phrases for the region tasks
        learning_rate=cp.learning_rate or demo_preset.learning_rate,
        lr_scheduler=cp.lr_scheduler or demo_preset.lr_scheduler,
        train_pages=cp.train_pages,
        heldout_pages=cp.heldout_pages,
        steps=cp.steps,
        batch_size=cp.batch_size,
        noncontextual=0.0,
    )
    pixels = demo.page_pixels(dp)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    with console.status("rendering pages, building region tasks"):
        files = demo.build_data(dp, out)
        train_file, heldout_file = files["train"], files["text"]
        sets = {k: str(v) for k, v in build_sets(train_file, out / "data", cp.region_share, seed=0).items()}
        items = heldout_region_items(heldout_file, seed=0)
    console.print(
        f"[green]✓[/] {cp.train_pages} training + {cp.heldout_pages} held-out pages, {len(items)} region items"
    )

    workers, threads = pool_size(workers, None, dp.device)
    evaluation = HeldoutEvaluation(str(heldout_file), items)
    jobs = []
    for seed in range(n_seeds):
        base = demo.base_model(dp, seed, out, None)
        codes = None
        if any("asvr" in s.method.split("+") for m in methods for s in METHODS[m].stages):
            with console.status(f"fitting ASVR codes for seed {seed}"):
                codes = str(
                    fit_codes(base, train_file, out / "codes" / f"seed{seed}", cp.asvr_k, cp.asvr_fit_images, pixels)
                )
        for m in methods:
            run_dir = out / "runs" / f"{m}-seed{seed}"
            stages = train_stages(METHODS[m], cp, sets, codes, run_dir)
            jobs.append(Job(f"{m} s{seed}", m, seed, dp, str(base), str(run_dir), stages, evaluation, threads=threads))

    rows = run_jobs(jobs, workers, console, progress_line)
    rows.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    summary = summarize(rows, methods, SUMMARY_KEYS)
    seconds = time.time() - t0
    title = (
        f"dvsft compare, preset {cp.name}: tiny Qwen3-VL, {cp.steps} steps x batch {cp.batch_size}, "
        f"{n_seeds} seed(s); mean ± std over seeds"
    )
    table = markdown_table(summary, methods)
    plot_bars(summary, methods, METRICS, out / "compare.png", title)
    results = {
        "preset": asdict(cp),
        "demo_preset": {k: v for k, v in asdict(dp).items() if k != "tiny"} | {"tiny": asdict(dp.tiny)},
        "methods": {
            m: {"label": METHODS[m].label, "note": METHODS[m].note, "stages": [asdict(s) for s in METHODS[m].stages]}
            for m in methods
        },
        "seeds": n_seeds,
        "runs": rows,
        "summary": summary,
        "seconds": round(seconds, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    notes = "\n".join(f"- `{m}`: {METHODS[m].note}" for m in methods)
    (out / "table.md").write_text(
        f"# {title}\n\n{table}\n\nBold: best mean per column.\n\n{notes}\n\nTotal {seconds / 60:.1f} min.\n"
    )
    console.print(table)
    console.print(
        f"[bold]Files:[/] {out / 'table.md'}, {out / 'results.json'}, {out / 'compare.png'} ({seconds / 60:.1f} min)"
    )
    return results
