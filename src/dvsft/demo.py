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
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import typer

from dvsft.labels.instructions import TRANSCRIBE_INSTRUCTION as TRANSCRIBE
from dvsft.training.tiny import TinyConfig

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
    tiny: TinyConfig = field(default_factory=TinyConfig)
    device: str = "cpu"


PRESETS: dict[str, DemoPreset] = {
    "cpu": DemoPreset(
        name="cpu",
        vocab_words=300,
        cols=8,
        rows=4,
        font_size=18,
        train_pages=2000,
        heldout_pages=48,
        steps=400,
        batch_size=16,
        learning_rate=3e-3,
        vision_lambda=1.0,
        vision_eps=0.0,
        eval_points=4,
        seeds=3,
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
    from dvsft.training.tiny import corpus_words

    words = [w.lower() for w in corpus_words()]
    vocab = {w for w, _ in Counter(words).most_common(vocab_words)}
    return [w for w in words if w in vocab]


def page_pixels(preset: DemoPreset) -> int:
    return preset.cols * preset.rows * 32 * 32


def render_split(stream: list[str], n_pages: int, out_dir: Path, name: str, preset: DemoPreset, seed: int) -> Path:
    """Render ``n_pages`` pages from random windows of ``stream``; write images + word records."""
    from dvsft.labels.render import Renderer, RenderStyle
    from dvsft.records import write_jsonl

    pixels = page_pixels(preset)
    renderer = Renderer(
        family="qwen3-vl",
        cols=preset.cols,
        max_rows=preset.rows,
        style=RenderStyle(font_size=preset.font_size, full_height=True),
        min_pixels=pixels,
        max_pixels=pixels,
    )
    rng = random.Random(seed)
    window = preset.cols * preset.rows * 2  # more words than a page holds; the rest goes unused
    rows = []
    for i in range(n_pages):
        start = rng.randrange(0, max(1, len(stream) - window))
        page = renderer.render_text(" ".join(stream[start : start + window]), rng=rng)[0]
        rel = f"images/{name}_{i:05d}.png"
        page.save(out_dir / rel)
        rows.append(page.record(f"{name}_{i:05d}", rel))
    path = out_dir / f"{name}.jsonl"
    write_jsonl(path, rows)
    return path


def build_data(preset: DemoPreset, out_dir: Path) -> tuple[Path, Path]:
    """Training and held-out pages; held-out pages come from text never used for training.

    Pages are reused when ``out_dir/data`` already holds them for the same data settings.
    """
    data_dir = out_dir / "data"
    settings = {
        k: getattr(preset, k) for k in ("vocab_words", "cols", "rows", "font_size", "train_pages", "heldout_pages")
    }
    meta = data_dir / "settings.json"
    train, heldout = data_dir / "train.jsonl", data_dir / "heldout.jsonl"
    if meta.is_file() and json.loads(meta.read_text()) == settings and train.is_file() and heldout.is_file():
        return train, heldout
    stream = demo_stream(preset.vocab_words)
    cut = int(len(stream) * 0.9)
    train = render_split(stream[:cut], preset.train_pages, data_dir, "train", preset, seed=1)
    heldout = render_split(stream[cut:], preset.heldout_pages, data_dir, "heldout", preset, seed=2)
    meta.write_text(json.dumps(settings))
    return train, heldout


# --------------------------------------------------------------------------- evaluation


def evaluate(model: Any, processor: Any, records: list[dict], records_file: Path, batch_size: int = 16) -> dict:
    """Held-out greedy transcription (word accuracy, CER) and vision-label top-1 accuracy."""
    from PIL import Image

    from dvsft.analysis.lens import vision_label_accuracy
    from dvsft.evaluation.generation import Generator
    from dvsft.evaluation.metrics import cer, word_accuracy
    from dvsft.records import image_path

    was_training = model.training
    generator = Generator(model, processor, max_new_tokens=max(len(r["words"]) for r in records) * 3 + 8)
    word_accs, cers = [], []
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        images = [[Image.open(image_path(r, records_file)).convert("RGB")] for r in batch]
        preds = generator([TRANSCRIBE] * len(batch), images)
        for r, pred in zip(batch, preds, strict=True):
            ref = r["messages"][-1]["content"]
            word_accs.append(word_accuracy(pred, ref))
            cers.append(cer(pred, ref))
    vision = vision_label_accuracy(model, processor, records, records_file)
    model.train(was_training)
    return {
        "word_acc": statistics.fmean(word_accs),
        "cer": statistics.fmean(cers),
        "vision_top1": vision["top1"],
    }


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
        "lr_scheduler_type": "cosine",
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


def run_one(job: dict) -> list[dict]:
    """Train one (method, seed) and evaluate it at the requested steps; runs in a worker process."""
    import torch
    from transformers import TrainerCallback

    quiet_transformers()

    from dvsft.models import load_processor
    from dvsft.records import read_jsonl
    from dvsft.training.train import train

    torch.set_num_threads(job["threads"])
    preset: DemoPreset = job["preset"]
    heldout_file = Path(job["heldout"])
    heldout = list(read_jsonl(heldout_file))
    pixels = page_pixels(preset)
    processor = load_processor(job["base"], min_pixels=pixels, max_pixels=pixels)
    rows: list[dict] = []
    queue, progress = job.get("queue"), job.get("progress")

    def record(model: Any, step: int) -> None:
        t = time.time()
        metrics = evaluate(model, processor, heldout, heldout_file)
        row = {
            "method": job["method"],
            "seed": job["seed"],
            "step": step,
            **metrics,
            "eval_seconds": round(time.time() - t, 2),
        }
        rows.append(row)
        if queue is not None:
            queue.put(("eval", row))
        if job.get("on_eval") is not None:
            job["on_eval"](row)

    class EvalCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            record(model, 0)

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
        job["train"],
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


# --------------------------------------------------------------------------- reporting


def summarize(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per method: metric -> (mean, std) over seeds at the last evaluated step."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        last = max(r["step"] for r in mine)
        final = [r for r in mine if r["step"] == last]
        out[method] = {}
        for key in ("word_acc", "cer", "vision_top1"):
            vals = [r[key] for r in final]
            out[method][key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def per_seed_margins(rows: list[dict]) -> list[dict]:
    """DV-SFT minus SFT at the final step, per seed."""
    last = max(r["step"] for r in rows)
    final = {(r["method"], r["seed"]): r for r in rows if r["step"] == last}
    seeds = sorted({s for _, s in final})
    return [
        {
            "seed": s,
            "word_acc": final[("dvsft", s)]["word_acc"] - final[("sft", s)]["word_acc"],
            "cer": final[("dvsft", s)]["cer"] - final[("sft", s)]["cer"],
        }
        for s in seeds
        if ("dvsft", s) in final and ("sft", s) in final
    ]


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("word_acc", "held-out word accuracy"),
        ("cer", "held-out CER (lower is better)"),
        ("vision_top1", "vision-label top-1 accuracy"),
    ]
    colors = {"sft": "#888888", "dvsft": "#d62728"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method]
            steps = sorted({r["step"] for r in mine})
            if not steps:
                continue
            vals = [[r[key] for r in mine if r["step"] == s] for s in steps]
            mean = [statistics.fmean(v) for v in vals]
            lo, hi = [min(v) for v in vals], [max(v) for v in vals]
            label = {"sft": "SFT", "dvsft": "DV-SFT"}[method]
            ax.plot(steps, mean, marker="o", color=colors[method], label=label)
            ax.fill_between(steps, lo, hi, color=colors[method], alpha=0.2)
        if key == "cer":  # an untrained model can babble far past the reference: keep 0..120% in view
            ax.set_ylim(0, min(1.2, ax.get_ylim()[1]))
            title += ", axis clipped at 1.2"
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Tiny Qwen3-VL learning to read rendered text: SFT vs DV-SFT (band = min..max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LENS_LEGEND = (
    ("green: the cell's word", (0, 150, 0)),
    ("red: another word", (200, 0, 0)),
    ("blue: cell with no word label (no word ends in it)", (0, 0, 200)),
    ("red lines: token grid", (255, 0, 0)),
)


def plot_lens(model_dirs: dict[str, Path], heldout_file: Path, record: dict, path: Path, pixels: int) -> None:
    """Visual-logit overlays of the final models, side by side, on one held-out page."""
    from PIL import Image, ImageDraw

    from dvsft.analysis.lens import lens_overlay, record_labels, run_lens
    from dvsft.models import load_model, load_processor
    from dvsft.records import image_path

    image = Image.open(image_path(record, heldout_file)).convert("RGB")
    panels = []
    for method, model_dir in model_dirs.items():
        model = load_model(model_dir).eval()
        processor = load_processor(model_dir, min_pixels=pixels, max_pixels=pixels)
        result = run_lens(model, processor, image)
        labels = record_labels(record, result.geometry, processor.tokenizer, str(heldout_file))
        correct = {token: result.top_ids[token][0] == label for token, label in labels.items()}
        upscale = max(2.0, 768 / image.width)
        panel = lens_overlay(image, result.geometry, result.top1_texts(), correct=correct, upscale=upscale)
        label = {"sft": "SFT", "dvsft": "DV-SFT"}[method]
        titled = Image.new("RGB", (panel.width, panel.height + 40), "white")
        titled.paste(panel, (0, 40))
        draw = ImageDraw.Draw(titled)
        draw.text((6, 4), f"{label}: top-1 token of each visual token's own logits", fill="black")
        x = 6
        for text, colour in LENS_LEGEND:  # the colours lens_overlay uses
            draw.text((x, 22), text, fill=colour)
            x += draw.textlength(text) + 12
        panels.append(titled)
    original = Image.new("RGB", (panels[0].width, image.height * panels[0].width // image.width + 28), "white")
    original.paste(image.resize((panels[0].width, original.height - 28)), (0, 28))
    ImageDraw.Draw(original).text((6, 6), "held-out page (never seen in training)", fill="black")
    panels.insert(0, original)
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels) + 8 * len(panels)), "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height + 8
    out.save(path)


def write_report(summary: dict, margins: list[dict], preset: DemoPreset, seconds: float, path: Path) -> str:
    def fmt(key: str, method: str, pct: bool = True) -> str:
        mean, std = summary[method][key]
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if pct else f"{mean:.3f} ± {std:.3f}"

    lines = [
        "# dvsft demo: SFT vs DV-SFT",
        "",
        f"Preset `{preset.name}`: tiny Qwen3-VL ({preset.tiny.layers} LLM layers, hidden {preset.tiny.hidden_size}), "
        f"{preset.train_pages} training pages of {preset.cols}x{preset.rows} visual tokens, "
        f"{preset.steps} steps of batch {preset.batch_size}, lambda {preset.vision_lambda}, eps {preset.vision_eps}, "
        f"{len(margins)} seed(s); {seconds / 60:.1f} min in all.",
        "",
        "| method | held-out word accuracy (%) | held-out CER (%) | vision-label top-1 (%) |",
        "| --- | --- | --- | --- |",
    ]
    for method in METHODS:
        if method in summary:
            name = {"sft": "SFT", "dvsft": "DV-SFT"}[method]
            lines.append(
                f"| {name} | {fmt('word_acc', method)} | {fmt('cer', method)} | {fmt('vision_top1', method)} |"
            )
    lines += ["", "Mean ± std over seeds at the final step. Per-seed margin (DV-SFT − SFT):", ""]
    lines += [
        f"- seed {m['seed']}: word accuracy {100 * m['word_acc']:+.1f} points, CER {100 * m['cer']:+.1f} points"
        for m in margins
    ]
    lines += [
        "",
        "What the numbers mean: both models see the same pages in the same order with the same budget; "
        "SFT learns to read only through the transcription loss, DV-SFT additionally labels every visual "
        "token with the word whose bottom-right corner it holds. *Word accuracy* is the share of reference "
        "words reproduced in order by greedy decoding on pages of text never seen in training (words matched "
        "along an edit-distance alignment); *CER* is character edit distance over reference length; "
        "*vision-label top-1* is how often a visual token's own logits name its word. The gap is the paper's "
        "alignment-efficiency effect (section 5.3): direct vision supervision teaches the visual tokens to "
        "read, and the text side learns to copy what they read.",
        "",
        "Files: `curves.png` (learning curves, band = seed spread), `lens.png` (visual logit lens of both final "
        "models on one held-out page), `results.json` (every evaluation), `sft/` and `dvsft/` (final models of "
        "the first seed; `dvsft eval` and `dvsft lens` accept them).",
    ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


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


def progress_line(row: dict) -> str:
    """One evaluation point as a plain log line."""
    name = {"sft": "SFT", "dvsft": "DV-SFT"}[row["method"]]
    return f"{name} seed {row['seed']} step {row['step']}: held-out word accuracy {100 * row['word_acc']:.1f}%"


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
    family: str | None = None,
) -> dict:
    """Run the whole experiment; returns the results dictionary also written to ``out/results.json``.

    ``family`` picks the tiny model's architecture (``tiny.family``: qwen3-vl, qwen3.5,
    qwen3-vl-moe, internvl, llava_onevision, idefics3, smolvlm); the pages are the same."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dvsft.training.tiny import save_tiny

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the runs already fill the cores
    quiet_transformers()
    console = Console()
    if preset_name not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    overrides = {"steps": steps, "vision_lambda": vision_lambda, "vision_eps": vision_eps}
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    if family is not None:
        preset = replace(preset, tiny=replace(preset.tiny, family=family))
    n_seeds = seeds if seeds is not None else preset.seeds
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    with console.status("rendering training and held-out pages"):
        train_file, heldout_file = build_data(preset, out)
    console.print(
        f"[green]✓[/] {preset.train_pages} training + {preset.heldout_pages} held-out pages in {out / 'data'}"
    )

    jobs = []
    for seed in range(n_seeds):
        base = out / "base" / f"seed{seed}"
        if not (base / "config.json").is_file():
            save_tiny(
                base, replace(preset.tiny, seed=seed, min_pixels=page_pixels(preset), max_pixels=page_pixels(preset))
            )
        for method in methods:
            jobs.append(
                {
                    "name": f"{method} seed {seed}",
                    "method": method,
                    "seed": seed,
                    "preset": preset,
                    "base": str(base),
                    "train": str(train_file),
                    "heldout": str(heldout_file),
                    "output_dir": str(out / "runs" / f"{method}-seed{seed}"),
                    "eval_steps": eval_steps(preset, preset.steps),
                }
            )
    cores = os.cpu_count() or 1
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
    summary = summarize(rows)
    margins = per_seed_margins(rows)
    for method in methods:
        final = json.loads(Path(out / "runs" / f"{method}-seed0" / "demo_rows.json").read_text())["final_dir"]
        if (out / method).exists():
            shutil.rmtree(out / method)
        shutil.copytree(final, out / method)
    plot_curves(rows, out / "curves.png")
    from dvsft.records import read_jsonl

    first = next(read_jsonl(heldout_file))
    plot_lens({m: out / m for m in methods}, heldout_file, first, out / "lens.png", page_pixels(preset))
    seconds = time.time() - t0
    report = write_report(summary, margins, preset, seconds, out / "report.md")
    results = {
        "runs": rows,
        "summary": {m: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()} for m, s in summary.items()},
        "margins": margins,
        "preset": {**asdict(preset), "steps": preset.steps},
        "seeds": n_seeds,
        "seconds": round(seconds, 1),
        "dvsft_wins_every_seed": all(m["word_acc"] > 0 and m["cer"] < 0 for m in margins) if margins else None,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(report)
    console.print(
        f"[bold]Files:[/] {out / 'report.md'}, {out / 'results.json'}, {out / 'curves.png'}, "
        f"{out / 'lens.png'}, {out / 'sft'}, {out / 'dvsft'}"
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
        family: str | None = typer.Option(None, help="tiny model family (qwen3-vl, qwen3.5, internvl, …)"),
    ) -> None:
        """Train SFT and DV-SFT on rendered text with a tiny Qwen3-VL and compare how fast they learn to read."""
        chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
        if not chosen or set(chosen) - set(METHODS):
            raise typer.BadParameter(f"methods must be among {', '.join(METHODS)}; got {methods!r}")
        run_demo(preset, seeds, steps, out, workers, vision_lambda, vision_eps, chosen, threads, family)
