"""`dvsft compare`: every method trained and scored on the same embedded data, budget and seeds.

Data, model and the transcription metrics are the demo's (:mod:`dvsft.experiments.demo`): pages of the bundled
corpus rendered onto the visual-token grid, a tiny real Qwen3-VL per seed, greedy transcription of
held-out pages (word accuracy, CER) and vision-label top-1. On top, held-out region tasks built from
the held-out pages' word boxes: Bbox2Caption (phrase, ROUGE-L), Caption2Bbox (phrase, Acc@IoU0.5),
bbox-to-ocr (word, ROUGE-L) and ocr-to-bbox (word, Acc@IoU0.5).

Every method gets the same number of optimizer steps and batch size from the same base model per
seed; the region-task variants spend part of that budget on region QA (``region_share`` of the
samples), the staged FineViT recipe splits it between its two stages. Writes ``results.json``,
``table.md`` and ``compare.png`` under ``--out``.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import typer


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
DEFAULT_METHODS = ("sft", "dvsft", "basic", "asvr", "regions", "dvsft+regions", "dvsft+lsd", "finevit-staged")


@dataclass(frozen=True)
class ComparePreset:
    name: str
    demo: str  # the demo preset whose page size, vocabulary, tiny model, lr and lambda are used
    train_pages: int
    heldout_pages: int
    steps: int
    batch_size: int
    seeds: int
    region_share: float = 0.25  # share of region QA in the "mix" training sets
    asvr_k: int = 64
    asvr_fit_images: int = 400
    lsd_regions: int = 2
    methods: tuple[str, ...] = DEFAULT_METHODS
    cols: int = 0  # page size in cells (0: the demo preset's)
    rows: int = 0
    learning_rate: float = 0.0  # 0: the demo preset's
    lr_scheduler: str = ""  # "": the demo preset's


PRESETS: dict[str, ComparePreset] = {
    "cpu": ComparePreset(
        "cpu",
        demo="cpu",
        train_pages=1000,
        heldout_pages=32,
        steps=400,
        batch_size=8,
        seeds=2,
        cols=8,
        rows=4,
        learning_rate=3e-3,
        lr_scheduler="cosine",
    ),
    "gpu": ComparePreset("gpu", demo="gpu", train_pages=20000, heldout_pages=200, steps=3000, batch_size=32, seeds=3),
    "toy": ComparePreset(
        "toy", demo="toy", train_pages=12, heldout_pages=2, steps=2, batch_size=4, seeds=1, asvr_k=4, lsd_regions=1
    ),
}

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


def evaluate_regions(model: Any, processor: Any, items: list[dict], batch_size: int = 16) -> dict[str, float]:
    """ROUGE-L of box-to-text answers and Acc@IoU0.5 of text-to-box answers, per task."""
    from PIL import Image

    from dvsft.core.records import IMAGE_PLACEHOLDER
    from dvsft.evaluation.generation import Generator
    from dvsft.evaluation.metrics import iou, rouge_l
    from dvsft.sources.region_tasks import TASKS, BoxCodec

    codec = BoxCodec()
    generator = Generator(model, processor, max_new_tokens=48)
    scores: dict[str, list[float]] = {}
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        prompts = [r["messages"][0]["content"].replace(IMAGE_PLACEHOLDER, "") for r in batch]
        images = [[Image.open(r["image"]).convert("RGB")] for r in batch]
        for r, pred in zip(batch, generator(prompts, images), strict=True):
            task = r["tasks"][0]
            if TASKS[task["name"]].answers_box:
                box = codec.parse(pred, r["width"], r["height"])
                score = float(box is not None and iou(box, task["box"]) >= 0.5)
                key = f"{task['name']}_acc"
            else:
                score = rouge_l(pred, task["text"])
                key = f"{task['name']}_rouge"
            scores.setdefault(key, []).append(score)
    return {k: statistics.fmean(v) for k, v in scores.items()}


# --------------------------------------------------------------------------- one run


def stage_steps(spec: MethodSpec, steps: int) -> list[int]:
    """Optimizer steps of each stage; they add up to ``steps``."""
    out, used = [], 0
    for i, stage in enumerate(spec.stages):
        n = steps - used if i == len(spec.stages) - 1 else max(1, round(steps * stage.share))
        out.append(n)
        used += n
    return out


def run_job(job: dict) -> dict:
    """Train one (method, seed), stage by stage, then evaluate the final model; runs in a worker process."""
    import torch
    from transformers import TrainerCallback

    from dvsft.core.records import read_jsonl
    from dvsft.experiments import demo
    from dvsft.experiments.demo_eval import transcription
    from dvsft.models.loading import load_model, load_processor
    from dvsft.training.train import train

    torch.set_num_threads(job["threads"])
    if job.get("quiet"):  # a pool worker: its Trainer progress bars and logs go to a file, not the console
        log_file = Path(job["output_dir"]) / "train.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    dp, cp = job["demo_preset"], job["preset"]
    spec: MethodSpec = METHODS[job["method"]]
    pixels = demo.page_pixels(dp)
    queue = job.get("queue")
    done = 0

    class StepsToQueue(TrainerCallback):  # the pool's progress display reads the queue
        def on_step_end(self, args, state, control, **kw):
            if queue is not None:
                queue.put((job["name"], done + state.global_step))

    model_path = job["base"]
    t0 = time.time()
    for i, (stage, n_steps) in enumerate(zip(spec.stages, stage_steps(spec, cp.steps), strict=True)):
        objectives = {k: dict(v) for k, v in stage.objectives.items()}
        if "asvr" in stage.method.split("+"):
            objectives.setdefault("asvr", {})["codes"] = job["codes"]
        if "lsd" in stage.method.split("+"):
            objectives.setdefault("lsd", {})["regions_per_image"] = cp.lsd_regions
        config = demo.train_config(
            dp,
            model_path,
            job["sets"][stage.data],
            str(Path(job["output_dir"]) / f"stage{i + 1}"),
            stage.method,
            job["seed"],
            steps=n_steps,
            batch_size=cp.batch_size,
            logging_steps=max(1, n_steps // 10),
        )
        config["objectives"] = objectives
        result = train(config, callbacks=[StepsToQueue()])
        model_path = str(result.final_dir)
        done += n_steps
    train_seconds = time.time() - t0

    t1 = time.time()
    model = load_model(model_path).eval()
    processor = load_processor(model_path, min_pixels=pixels, max_pixels=pixels)
    heldout_file = Path(job["heldout"])
    metrics = transcription(model, processor, list(read_jsonl(heldout_file)), heldout_file)
    metrics.update(evaluate_regions(model, processor, job["region_items"]))
    return {
        "method": job["method"],
        "seed": job["seed"],
        **metrics,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.time() - t1, 1),
        "final_dir": model_path,
    }


# --------------------------------------------------------------------------- reporting


def summarize(rows: list[dict], methods: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> metric -> {mean, std, n} over seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        out[m] = {}
        for key, _, _ in (*METRICS, ("train_seconds", "", False)):
            vals = [r[key] for r in mine if key in r]
            if vals:
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                out[m][key] = {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}
    return out


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


def plot(summary: dict, methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if m in summary]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.0 * len(METRICS), 4.2), sharey=False)
    colors = plt.get_cmap("tab10")
    for ax, (key, name, higher) in zip(axes, METRICS, strict=True):
        means = [100 * summary[m].get(key, {}).get("mean", float("nan")) for m in shown]
        stds = [100 * summary[m].get(key, {}).get("std", 0.0) for m in shown]
        ax.bar(range(len(shown)), means, yerr=stds, color=[colors(i % 10) for i in range(len(shown))], capsize=3)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{name} ({'↑' if higher else '↓'}, %)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def run_pool(jobs: list[dict], workers: int, steps: int, console: Any) -> list[dict]:
    """Run the jobs in ``workers`` spawned processes with one progress bar each."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows = []
    ctx = mp.get_context("spawn")
    with (
        ctx.Manager() as manager,
        Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        queue = manager.Queue()
        bars = {job["name"]: progress.add_task(job["name"], total=steps) for job in jobs}
        for job in jobs:
            job["queue"] = queue
            job["quiet"] = True
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(run_job, job) for job in jobs]
            while not all(f.done() for f in futures):
                while not queue.empty():
                    name, step = queue.get()
                    progress.update(bars[name], completed=step)
                time.sleep(0.2)
            for f in futures:
                rows.append(f.result())
    for job in jobs:
        job.pop("queue", None)
        job.pop("quiet", None)
    return rows


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
    from dvsft.testing.tiny import save_tiny

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

    jobs = []
    for seed in range(n_seeds):
        base = out / "base" / f"seed{seed}"
        if not (base / "config.json").is_file():
            save_tiny(base, replace(dp.tiny, seed=seed, min_pixels=pixels, max_pixels=pixels))
        codes = None
        if any("asvr" in s.method.split("+") for m in methods for s in METHODS[m].stages):
            with console.status(f"fitting ASVR codes for seed {seed}"):
                codes = str(
                    fit_codes(base, train_file, out / "codes" / f"seed{seed}", cp.asvr_k, cp.asvr_fit_images, pixels)
                )
        for m in methods:
            jobs.append(
                {
                    "name": f"{m} s{seed}",
                    "method": m,
                    "seed": seed,
                    "preset": cp,
                    "demo_preset": dp,
                    "base": str(base),
                    "codes": codes,
                    "sets": sets,
                    "heldout": str(heldout_file),
                    "region_items": items,
                    "output_dir": str(out / "runs" / f"{m}-seed{seed}"),
                }
            )
    cores = os.cpu_count() or 1
    if workers is None:
        workers = 1 if dp.device == "cuda" else min(2, cores)
    for job in jobs:
        job["threads"] = max(1, cores // max(1, workers))

    rows: list[dict] = []
    if workers == 0:  # in this process, one after another (tests, debugging)
        for job in jobs:
            job["threads"] = cores
            rows.append(run_job(job))
    else:
        rows = run_pool(jobs, workers, cp.steps, console)

    rows.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    summary = summarize(rows, methods)
    seconds = time.time() - t0
    title = (
        f"dvsft compare, preset {cp.name}: tiny Qwen3-VL, {cp.steps} steps x batch {cp.batch_size}, "
        f"{n_seeds} seed(s); mean ± std over seeds"
    )
    table = markdown_table(summary, methods)
    plot(summary, methods, out / "compare.png", title)
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


def register_compare(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    def compare(
        preset: str = typer.Option("cpu", help=f"size preset: {', '.join(PRESETS)}"),
        seeds: int | None = typer.Option(None, help="seeds per method (default: the preset's)"),
        steps: int | None = typer.Option(None, help="optimizer steps per method (default: the preset's)"),
        methods: str | None = typer.Option(None, help=f"comma-separated subset of: {', '.join(METHODS)}"),
        out: Path = typer.Option(Path("dvsft-compare"), help="output directory"),
        workers: int | None = typer.Option(None, help="runs in parallel (default: 2 on CPU; 0: in this process)"),
    ) -> None:
        """Train every method (SFT, DV-SFT, BASIC, ASVR, region-task variants) on the same data and compare."""
        chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        try:
            run_compare(preset, seeds, steps, chosen, out, workers)
        except ValueError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from err
