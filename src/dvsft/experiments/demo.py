"""`dvsft demo`: the embedded default — DV-SFT vs SFT learning to read, on a CPU in minutes.

Paper section 5.3: direct vision supervision makes a model learn to read images far more
efficiently than text-only supervision. The demo reproduces that from scratch and offline:

1. a corpus of real English prose that ships with Python (``pydoc_data.topics``), restricted
   to its most frequent words, split by position into training and held-out text;
2. pages rendered word by word onto the visual-token grid (the label-to-image renderer);
3. a tiny real Qwen3-VL (``model: tiny``) trained with SFT and with DV-SFT, same data order,
   seed and budget, over several seeds (the two methods run side by side in two processes);
4. greedy transcription of the held-out pages (word accuracy, CER) and the vision-label top-1
   accuracy of the visual tokens, at several points of training;
5. ``results.json``, ``curves.png``, ``lens.png``, ``report.md`` and the final models.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import typer

from dvsft.testing.tiny import TinyConfig

METHODS = ("sft", "dvsft")


@dataclass(frozen=True)
class DemoPreset:
    """Sizes of one demo run; ``cpu`` is the default, ``toy`` is for tests, ``gpu`` for a lent GPU."""

    name: str
    vocab_words: int  # documents use only the corpus's most frequent words
    cols: int  # page width in visual-token cells (32 px each for qwen3-vl)
    rows: int  # page height in cells
    font_size: int
    train_pages: int
    heldout_pages: int
    steps: int
    batch_size: int
    learning_rate: float
    vision_lambda: float
    vision_eps: float
    eval_points: int  # evaluations during training, evenly spaced, plus step 0
    seeds: int
    noncontextual: float = 0.0  # share of training pages that are random words
    words_per_row: int = 0  # at most this many words on a row (1: a word list); 0 = fill the rows
    text_steps: int = 0  # text stage: steps of the LLM on oracle pages before the graft (0: none)
    text_batch_size: int = 32
    text_learning_rate: float = 3e-3
    lr_scheduler: str = "cosine"  # of the vision-language runs (HF scheduler names)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    device: str = "cpu"


PRESETS: dict[str, DemoPreset] = {
    "cpu": DemoPreset(
        name="cpu",
        vocab_words=300,
        cols=5,  # 160 px: the longest demo word fits a row
        rows=8,
        words_per_row=1,  # a word list: reading order is row order (docs/BENCHMARKS.md)
        font_size=18,
        train_pages=2000,
        heldout_pages=48,
        steps=2400,  # the 6-minute budget on 2 cores; many small steps beat few large ones
        batch_size=1,
        learning_rate=2e-3,
        vision_lambda=1.0,
        vision_eps=0.0,
        eval_points=3,
        seeds=3,
        lr_scheduler="constant_with_warmup",  # 5% warmup, no decay: the copy circuit forms late
        tiny=TinyConfig(
            vocab_size=2048,
            hidden_size=128,
            layers=3,
            heads=4,
            kv_heads=2,
            vision_hidden_size=64,
            vision_depth=1,
            vision_heads=4,
        ),
    ),
    "gpu": DemoPreset(
        name="gpu",
        vocab_words=1000,
        cols=16,
        rows=8,
        font_size=18,
        train_pages=20000,
        heldout_pages=200,
        steps=3000,
        batch_size=32,
        learning_rate=1e-3,
        vision_lambda=1.0,
        vision_eps=0.0,
        eval_points=6,
        seeds=3,
        tiny=TinyConfig(
            vocab_size=4096,
            hidden_size=384,
            layers=6,
            heads=6,
            kv_heads=2,
            vision_hidden_size=256,
            vision_depth=4,
            vision_heads=4,
        ),
        device="cuda",
    ),
    "toy": DemoPreset(
        name="toy",
        vocab_words=60,
        cols=4,
        rows=2,
        font_size=18,
        train_pages=24,
        heldout_pages=4,
        steps=4,
        batch_size=4,
        learning_rate=3e-3,
        vision_lambda=1.0,
        vision_eps=0.0,
        eval_points=2,
        seeds=1,
        noncontextual=0.25,
        text_steps=2,
        text_batch_size=4,
        tiny=TinyConfig(
            vocab_size=600,
            hidden_size=32,
            layers=1,
            heads=2,
            kv_heads=1,
            vision_hidden_size=32,
            vision_depth=1,
            vision_heads=2,
        ),
    ),
}


# --------------------------------------------------------------------------- data


def demo_stream(vocab_words: int) -> list[str]:
    """The bundled corpus, lowercased, keeping only its ``vocab_words`` most frequent words (in order)."""
    from dvsft.sources.corpora import corpus_words

    words = [w.lower() for w in corpus_words()]
    vocab = {w for w, _ in Counter(words).most_common(vocab_words)}
    return [w for w in words if w in vocab]


def page_pixels(preset: DemoPreset) -> int:
    return preset.cols * preset.rows * 32 * 32


def render_split(
    stream: list[str],
    n_pages: int,
    out_dir: Path,
    name: str,
    preset: DemoPreset,
    seed: int,
    noncontextual: float = 0.0,
    vocab: list[str] | None = None,
) -> Path:
    """Render ``n_pages`` pages; write images + word records.

    A page is a random window of ``stream`` (running text), or with probability ``noncontextual``
    the words of ``vocab`` (default: the stream's) in random order.
    """
    from dvsft.core.records import write_jsonl
    from dvsft.sources.render import Renderer, RenderStyle

    pixels = page_pixels(preset)
    renderer = Renderer(
        family="qwen3-vl",
        cols=preset.cols,
        max_rows=preset.rows,
        style=RenderStyle(font_size=preset.font_size, full_height=True, words_per_row=preset.words_per_row or None),
        min_pixels=pixels,
        max_pixels=pixels,
    )
    rng = random.Random(seed)
    vocab = sorted(set(vocab or stream))
    window = preset.cols * preset.rows * 2  # more words than a page holds; the rest goes unused
    rows = []
    for i in range(n_pages):
        if rng.random() < noncontextual:
            words = [rng.choice(vocab) for _ in range(window)]
        else:
            start = rng.randrange(0, max(1, len(stream) - window))
            words = stream[start : start + window]
        page = renderer.render_text(" ".join(words), rng=rng)[0]
        rel = f"images/{name}_{i:05d}.png"
        page.save(out_dir / rel)
        rows.append(page.record(f"{name}_{i:05d}", rel))
    path = out_dir / f"{name}.jsonl"
    write_jsonl(path, rows)
    return path


# the evaluation sets: held-out running text, and the same vocabulary in random order
EVAL_SETS = ("text", "random")


def build_data(preset: DemoPreset, out_dir: Path) -> dict[str, Path]:
    """Training, validation and held-out pages (name -> records file).

    The corpus is cut by position: 80% for training, 10% for validation (``val_text``,
    ``val_random``: for choosing settings) and 10% for the held-out evaluation (``text``,
    ``random``: what the report shows). Random-word pages draw from the whole demo vocabulary.
    Pages are reused when ``out_dir/data`` already holds them for the same data settings.
    """
    data_dir = out_dir / "data"
    keys = (
        "vocab_words",
        "cols",
        "rows",
        "font_size",
        "train_pages",
        "heldout_pages",
        "noncontextual",
        "words_per_row",
    )
    settings = {k: getattr(preset, k) for k in keys}
    meta = data_dir / "settings.json"
    names = ("train", "val_text", "val_random", *EVAL_SETS)
    files = {n: data_dir / f"{n}.jsonl" for n in names}
    if meta.is_file() and json.loads(meta.read_text()) == settings and all(f.is_file() for f in files.values()):
        return files
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    stream = demo_stream(preset.vocab_words)
    a, b = int(len(stream) * 0.8), int(len(stream) * 0.9)
    n = preset.heldout_pages
    vocab = sorted(set(stream))
    render_split(stream[:a], preset.train_pages, data_dir, "train", preset, 1, preset.noncontextual, vocab)
    render_split(stream[a:b], n, data_dir, "val_text", preset, 2)
    render_split(stream[a:b], n, data_dir, "val_random", preset, 3, 1.0, vocab)
    render_split(stream[b:], n, data_dir, "text", preset, 4)
    render_split(stream[b:], n, data_dir, "random", preset, 5, 1.0, vocab)
    meta.write_text(json.dumps(settings))
    return files


# --------------------------------------------------------------------------- one training run


def train_config(
    preset: DemoPreset,
    model_path: str,
    data: str,
    output_dir: str,
    method: str,
    seed: int,
    steps: int,
    batch_size: int,
    logging_steps: int,
) -> dict[str, Any]:
    """The `dvsft train` keys of a demo-style run: a tiny model learning to read from scratch."""
    pixels = page_pixels(preset)
    return {
        "model": {"path": model_path},
        "train": {"vision": True, "projector": True, "llm": "all"},  # from scratch: every part learns
        "data": data,
        "output_dir": output_dir,
        "method": method,
        "vision_lambda": preset.vision_lambda,
        "vision_eps": preset.vision_eps,
        "qa_per_image": 1,
        "min_pixels": pixels,
        "max_pixels": pixels,
        "max_length": 1024,
        "learning_rate": preset.learning_rate,
        "warmup_steps": 0.05,
        "lr_scheduler_type": preset.lr_scheduler,
        "global_batch_size": batch_size,
        "per_device_train_batch_size": batch_size,
        "max_steps": steps,
        "seed": seed,
        "bf16": bf16_supported(),
        "logging_steps": logging_steps,
        "save_steps": 10**9,
        "save_total_limit": 1,
        "report_to": "none",
    }


def bf16_supported() -> bool:
    """bfloat16 where the GPU supports it, else float32."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def quiet_transformers() -> None:
    """No per-file progress bars or warnings from transformers under the demo's own progress display."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def eval_sets(files: dict[str, Path], split: str) -> dict[str, list[dict]]:
    """The evaluation pages (``text``, ``random``) of ``split``: ``heldout`` (the report) or ``val`` (tuning)."""
    from dvsft.core.records import read_jsonl
    from dvsft.experiments.demo_eval import resolved

    prefix = "" if split == "heldout" else "val_"
    return {name: resolved(list(read_jsonl(files[prefix + name])), files[prefix + name]) for name in EVAL_SETS}


def run_one(job: dict) -> list[dict]:
    """Train one (method, seed) and evaluate it at the requested steps; runs in a worker process."""
    import torch
    from transformers import TrainerCallback

    quiet_transformers()

    from dvsft.experiments.demo_eval import evaluate
    from dvsft.models.loading import load_processor
    from dvsft.training.train import train

    torch.set_num_threads(job["threads"])
    preset: DemoPreset = job["preset"]
    sets = eval_sets({k: Path(v) for k, v in job["files"].items()}, job["split"])
    pixels = page_pixels(preset)
    processor = load_processor(job["base"], min_pixels=pixels, max_pixels=pixels)
    rows: list[dict] = []
    queue, progress = job.get("queue"), job.get("progress")

    def record(model: Any, step: int) -> None:
        t = time.time()
        row = {
            "method": job["method"],
            "seed": job["seed"],
            "step": step,
            **evaluate(model, processor, sets),
            "eval_seconds": round(time.time() - t, 2),
        }
        rows.append(row)
        if queue is not None:
            queue.put(("eval", row))
        if job.get("on_eval") is not None:
            job["on_eval"](row)

    class EvalCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if queue is not None:
                queue.put(("step", job["name"], state.global_step))
            if progress is not None:
                progress(job["name"], state.global_step)
            if state.global_step in job["eval_steps"]:
                record(model, state.global_step)

    config = train_config(
        preset,
        job["base"],
        job["files"]["train"],
        job["output_dir"],
        job["method"],
        job["seed"],
        steps=preset.steps,
        batch_size=preset.batch_size,
        logging_steps=10,
    )
    config["disable_tqdm"] = True  # no progress bar and no printed logs (log.jsonl is still written)
    t0 = time.time()
    result = train(config, callbacks=[EvalCallback()])
    for row in rows:
        row["train_seconds"] = round(time.time() - t0, 1)
    job_out = {"rows": rows, "final_dir": str(result.final_dir)}
    Path(job["output_dir"], "demo_rows.json").write_text(json.dumps(job_out))
    return rows


def text_stage(preset: DemoPreset, files: dict[str, Path], out: Path, threads: int) -> tuple[Path, dict] | None:
    """The text-trained LLM of the preset (cached in ``out/data``), or None when the preset has no text stage."""
    if not preset.text_steps:
        return None
    import torch

    from dvsft.core.records import read_jsonl
    from dvsft.experiments.demo_eval import resolved
    from dvsft.experiments.demo_text import train_text
    from dvsft.testing.tiny import save_tiny

    settings = {
        "data": json.loads((files["train"].parent / "settings.json").read_text()),
        "tiny": asdict(preset.tiny),
        **{k: getattr(preset, k) for k in ("text_steps", "text_batch_size", "text_learning_rate")},
    }
    text_dir = out / "data" / "text_llm"
    meta = text_dir / "dvsft_text_stage.json"
    if meta.is_file() and json.loads(meta.read_text())["settings"] == settings:
        return text_dir, json.loads(meta.read_text())["probes"]
    torch.set_num_threads(threads)
    pixels = page_pixels(preset)
    start = save_tiny(out / "data" / "text_base", replace(preset.tiny, seed=0, min_pixels=pixels, max_pixels=pixels))
    records = {k: resolved(list(read_jsonl(files[k])), files[k]) for k in ("train", "val_text", "val_random")}
    probes: dict = {}
    train_text(
        start,
        records["train"],
        preset.text_steps,
        preset.text_batch_size,
        preset.text_learning_rate,
        0,
        text_dir,
        probes={"val_text": records["val_text"], "val_random": records["val_random"]},
        on_probe=lambda step, acc: probes.update(acc),
    )
    shutil.rmtree(start)
    meta.write_text(json.dumps({"settings": settings, "probes": probes}, indent=2))
    return text_dir, probes


def setup_line(preset: DemoPreset, seeds: int, probes: dict | None) -> str:
    """One sentence describing the run, for the report."""
    text = (
        f"{preset.text_steps} text-stage steps of batch {preset.text_batch_size} on oracle pages (validation "
        f"teacher-forced accuracy after it: running text {100 * probes['val_text']:.0f}%, non-contextual "
        f"{100 * probes['val_random']:.0f}%), then a fresh vision tower grafted; "
        if probes
        else "no text stage; "
    )
    return (
        f"Preset `{preset.name}`: tiny Qwen3-VL ({preset.tiny.layers} LLM layers, hidden {preset.tiny.hidden_size}); "
        f"{preset.train_pages} training pages of {preset.cols}x{preset.rows} visual tokens "
        f"({100 * preset.noncontextual:.0f}% of them random words); {text}"
        f"{preset.steps} steps of batch {preset.batch_size} per run, lr {preset.learning_rate} "
        f"{preset.lr_scheduler}, lambda {preset.vision_lambda}, eps {preset.vision_eps}, {seeds} seed(s)"
    )


# --------------------------------------------------------------------------- orchestration


def eval_steps(preset: DemoPreset, steps: int) -> list[int]:
    return sorted({max(1, round(steps * (i + 1) / preset.eval_points)) for i in range(preset.eval_points)})


def run_parallel(jobs: list[dict], workers: int, on_step: Any, on_eval: Any) -> list[dict]:
    """Run jobs in ``workers`` spawned processes, relaying ``on_step(name, step)`` and ``on_eval(row)``."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    rows: list[dict] = []
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(run_one, {**job, "queue": queue}) for job in jobs]
        while not all(f.done() for f in futures):
            while not queue.empty():
                kind, *payload = queue.get()
                (on_step if kind == "step" else on_eval)(*payload)
            time.sleep(0.2)
        while not queue.empty():
            kind, *payload = queue.get()
            (on_step if kind == "step" else on_eval)(*payload)
        for f in futures:
            rows.extend(f.result())
    return rows


def apply_overrides(preset: DemoPreset, items: list[str]) -> DemoPreset:
    """``KEY=VALUE`` settings of the preset (``tiny.KEY=VALUE`` for the model), typed like the field."""
    for item in items:
        key, sep, value = item.partition("=")
        target = preset.tiny if key.startswith("tiny.") else preset
        name = key.removeprefix("tiny.")
        if not sep or name not in {f.name for f in fields(target)}:
            raise typer.BadParameter(f"--set {item!r}: expected KEY=VALUE with KEY a preset field")
        kind = type(getattr(target, name))
        try:
            typed = kind(value)
        except ValueError as err:
            raise typer.BadParameter(f"--set {item!r}: {err}") from err
        if target is preset:
            preset = replace(preset, **{name: typed})
        else:
            preset = replace(preset, tiny=replace(preset.tiny, **{name: typed}))
    return preset


def base_model(preset: DemoPreset, seed: int, out: Path, text_dir: Path | None) -> Path:
    """The seed's starting model: a fresh tiny Qwen3-VL, with the text-trained LLM grafted in if any."""
    from dvsft.experiments.demo_text import graft
    from dvsft.testing.tiny import save_tiny

    base = out / "base" / f"seed{seed}"
    pixels = page_pixels(preset)
    tiny = replace(preset.tiny, seed=seed, min_pixels=pixels, max_pixels=pixels)
    settings = {"tiny": asdict(tiny), "text": str(text_dir) if text_dir else None}
    meta = base / "dvsft_demo_base.json"
    if (base / "config.json").is_file() and meta.is_file() and json.loads(meta.read_text()) == settings:
        return base
    if base.exists():
        shutil.rmtree(base)
    save_tiny(base, tiny)
    if text_dir is not None:
        graft(text_dir, base)
    meta.write_text(json.dumps(settings))
    return base


def run_demo(
    preset_name: str = "cpu",
    seeds: int | None = None,
    steps: int | None = None,
    out: Path = Path("dvsft-demo"),
    workers: int | None = None,
    vision_lambda: float | None = None,
    vision_eps: float | None = None,
    methods: tuple[str, ...] = METHODS,
    threads: int | None = None,
    settings: list[str] | None = None,
    split: str = "heldout",
    family: str | None = None,
) -> dict:
    """Run the whole experiment; returns the results dictionary also written to ``out/results.json``.

    ``settings``: ``KEY=VALUE`` preset overrides; ``split="val"`` evaluates on the validation pages
    (for choosing settings) instead of the held-out ones. ``family`` picks the tiny model's
    architecture (``tiny.family``: qwen3-vl, qwen3.5, qwen3-vl-moe, internvl, llava_onevision,
    idefics3, smolvlm); the pages are the same.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dvsft.core.records import read_jsonl
    from dvsft.experiments.demo_report import plot_curves, plot_lens, progress_line, results_summary, write_report

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the runs already fill the cores
    quiet_transformers()
    console = Console()
    if preset_name not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    if split not in ("heldout", "val"):
        raise typer.BadParameter(f"split must be heldout or val, got {split!r}")
    preset = apply_overrides(PRESETS[preset_name], list(settings or []))
    overrides = {"steps": steps, "vision_lambda": vision_lambda, "vision_eps": vision_eps}
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    if family is not None:
        preset = replace(preset, tiny=replace(preset.tiny, family=family))
    if preset.text_steps and preset.tiny.family != "qwen3-vl":
        # oracle visual tokens go in through Qwen3-VL's mm_encoder_outputs; other families start from scratch
        console.print(f"[yellow]![/] no text stage for family {preset.tiny.family} (qwen3-vl only)")
        preset = replace(preset, text_steps=0)
    n_seeds = seeds if seeds is not None else preset.seeds
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cores = os.cpu_count() or 1

    with console.status("rendering training, validation and held-out pages"):
        files = build_data(preset, out)
    console.print(
        f"[green]✓[/] {preset.train_pages} training pages, validation and held-out pages "
        f"({preset.heldout_pages} each of running text and random words) in {out / 'data'}"
    )
    with console.status(f"text stage: {preset.text_steps} steps of the LLM on oracle pages"):
        stage = text_stage(preset, files, out, threads or cores)
    text_dir, probes = stage if stage else (None, None)
    if probes:
        console.print(
            f"[green]✓[/] text stage: validation teacher-forced accuracy running text "
            f"{100 * probes['val_text']:.1f}%, random words {100 * probes['val_random']:.1f}%"
        )

    jobs = []
    for seed in range(n_seeds):
        base = base_model(preset, seed, out, text_dir)
        for method in methods:
            jobs.append(
                {
                    "name": f"{method} seed {seed}",
                    "method": method,
                    "seed": seed,
                    "preset": preset,
                    "base": str(base),
                    "files": {k: str(v) for k, v in files.items()},
                    "split": split,
                    "output_dir": str(out / "runs" / f"{method}-seed{seed}"),
                    "eval_steps": eval_steps(preset, preset.steps),
                }
            )
    workers = workers or (1 if preset.device == "cuda" else min(2, cores))
    for job in jobs:
        job["threads"] = threads or max(1, cores // workers)

    rows: list[dict] = []
    # in a terminal: live bars; in a log file: one line per evaluation point
    log_lines = not console.is_terminal

    def on_eval(row: dict) -> None:
        if log_lines:
            print(progress_line(row), flush=True)

    with Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=log_lines,
    ) as progress:
        bars = {job["name"]: progress.add_task(job["name"], total=preset.steps) for job in jobs}

        def on_step(name: str, step: int) -> None:
            progress.update(bars[name], completed=step)

        if workers == 1:  # in this process: no start-up cost, progress straight from the callback
            for job in jobs:
                job["progress"], job["on_eval"] = on_step, on_eval
                rows.extend(run_one(job))
        else:
            rows.extend(run_parallel(jobs, workers, on_step, on_eval))

    rows.sort(key=lambda r: (r["method"], r["seed"], r["step"]))
    for method in methods:
        final = json.loads(Path(out / "runs" / f"{method}-seed0" / "demo_rows.json").read_text())["final_dir"]
        if (out / method).exists():
            shutil.rmtree(out / method)
        shutil.copytree(final, out / method)
    plot_curves(rows, out / "curves.png")
    lens_file = files["text" if split == "heldout" else "val_text"]
    first = next(read_jsonl(lens_file))
    plot_lens({m: out / m for m in methods}, lens_file, first, out / "lens.png", page_pixels(preset))
    seconds = time.time() - t0
    setup = setup_line(preset, n_seeds, probes)
    if split == "val":
        setup += " (evaluated on the VALIDATION pages)"
    report = write_report(rows, setup, seconds, out / "report.md")
    results = {
        "runs": rows,
        **results_summary(rows),
        "preset": asdict(preset),
        "text_stage": probes,
        "split": split,
        "seeds": n_seeds,
        "seconds": round(seconds, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(report, soft_wrap=True)  # a log file keeps the table's lines whole
    console.print(
        f"[bold]Files:[/] {out / 'report.md'}, {out / 'results.json'}, {out / 'curves.png'}, "
        f"{out / 'lens.png'}, " + ", ".join(str(out / m) for m in methods),
        soft_wrap=True,
    )
    return results


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    def demo(
        preset: str = typer.Option("cpu", help=f"size preset: {', '.join(PRESETS)}"),
        seeds: int | None = typer.Option(None, help="seeds per method (default: the preset's, 3 on cpu)"),
        steps: int | None = typer.Option(None, help="training steps per run (default: the preset's)"),
        out: Path = typer.Option(Path("dvsft-demo"), help="output directory"),
        workers: int | None = typer.Option(None, help="runs in parallel (default: 2 on CPU, 1 on GPU)"),
        vision_lambda: float | None = typer.Option(None, help="DV-SFT vision-loss weight (default: the preset's)"),
        vision_eps: float | None = typer.Option(None, help="vision smoothing eps (default: the preset's)"),
        methods: str = typer.Option("sft,dvsft", help="methods to run (e.g. only dvsft for a lambda/eps sweep)"),
        threads: int | None = typer.Option(None, help="torch threads per run (default: cores / workers)"),
        set_: list[str] = typer.Option(
            [], "--set", help="preset override KEY=VALUE (e.g. text_steps=0, noncontextual=0.5, tiny.layers=4)"
        ),
        split: str = typer.Option("heldout", help="pages to evaluate on: heldout (the report) or val (for tuning)"),
        family: str | None = typer.Option(None, help="tiny model family (qwen3-vl, qwen3.5, internvl, …)"),
    ) -> None:
        """Train SFT and DV-SFT on rendered text with a tiny Qwen3-VL and compare how fast they learn to read."""
        chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
        if not chosen or set(chosen) - set(METHODS):
            raise typer.BadParameter(f"methods must be among {', '.join(METHODS)}; got {methods!r}")
        run_demo(preset, seeds, steps, out, workers, vision_lambda, vision_eps, chosen, threads, set_, split, family)
