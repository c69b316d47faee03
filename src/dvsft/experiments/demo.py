"""`dvsft demo`: the embedded default — DV-SFT vs SFT learning to read, on a CPU in minutes.

Paper section 5.3: direct vision supervision makes a model learn to read images far more
efficiently than text-only supervision. The demo reproduces that from scratch and offline:

1. a corpus of real English prose that ships with Python (``pydoc_data.topics``), restricted
   to its most frequent words, split by position into training and held-out text;
2. pages rendered word by word onto the visual-token grid (the label-to-image renderer);
3. a tiny real Qwen3-VL (``model: tiny``) trained with SFT and with DV-SFT, same data order,
   seed and budget, over several seeds (the two methods run side by side in two processes:
   :mod:`dvsft.experiments.runner`, which `dvsft compare` shares);
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
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from dvsft.align.aligner import AlignConfig
from dvsft.experiments.runner import Job, TrainStage, final_dir, pool_size, quiet_transformers, run_jobs
from dvsft.experiments.settings import DEMO_PRESETS, SCENE_PRESETS, DemoPreset, page_pixels
from dvsft.models.families import DEFAULT_FAMILY

METHODS = ("sft", "dvsft")
TASKS = ("text", "scenes")  # rendered text (this module), coloured shapes (demo_scenes)
PRESETS: dict[str, DemoPreset] = DEMO_PRESETS  # presets/demo.yaml


# --------------------------------------------------------------------------- data


def demo_stream(vocab_words: int) -> list[str]:
    """The bundled corpus, lowercased, keeping only its ``vocab_words`` most frequent words (in order)."""
    from dvsft.sources.corpora import corpus_words

    words = [w.lower() for w in corpus_words()]
    vocab = {w for w, _ in Counter(words).most_common(vocab_words)}
    return [w for w in words if w in vocab]


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
        family=DEFAULT_FAMILY,
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
        page = first_page(renderer, " ".join(words), rng)
        rel = f"images/{name}_{i:05d}.png"
        page.save(out_dir / rel)
        rows.append(page.record(f"{name}_{i:05d}", rel))
    path = out_dir / f"{name}.jsonl"
    write_jsonl(path, rows)
    return path


def first_page(renderer: Any, text: str, rng: random.Random) -> Any:
    """``renderer.render_text(text, rng)[0]``, leaving ``rng`` as that call does, without drawing the later pages
    (drawing a page takes only its colours from ``rng``; the demo keeps the first page of each window)."""
    from dvsft.sources.render import pick_colours

    first, *rest = renderer.layout(text, rng)
    page = renderer.draw(first, rng)
    for _ in rest:
        pick_colours(rng, renderer.style.dark_text)
    return page


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


# --------------------------------------------------------------------------- evaluation


def eval_sets(files: dict[str, Path], split: str) -> dict[str, list[dict]]:
    """The evaluation pages (``text``, ``random``) of ``split``: ``heldout`` (the report) or ``val`` (tuning)."""
    from dvsft.core.records import read_jsonl
    from dvsft.experiments.demo_eval import resolved

    prefix = "" if split == "heldout" else "val_"
    return {name: resolved(list(read_jsonl(files[prefix + name])), files[prefix + name]) for name in EVAL_SETS}


@dataclass(frozen=True)
class PageEvaluation:
    """A job's evaluation: :func:`~dvsft.experiments.demo_eval.evaluate` on the pages of ``split``."""

    files: dict[str, str]
    split: str

    @cached_property
    def sets(self) -> dict[str, list[dict]]:
        return eval_sets({k: Path(v) for k, v in self.files.items()}, self.split)

    def __call__(self, model: Any, processor: Any) -> dict[str, float]:
        from dvsft.experiments.demo_eval import evaluate

        return evaluate(model, processor, self.sets)


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
        f"Preset `{preset.name}`: tiny {preset.tiny.family} ({preset.tiny.layers} LLM layers, "
        f"hidden {preset.tiny.hidden_size}); "
        f"{preset.train_pages} training pages of {preset.cols}x{preset.rows} visual tokens "
        f"({100 * preset.noncontextual:.0f}% of them random words); {text}"
        f"{preset.steps} steps of batch {preset.batch_size} per run, lr {preset.learning_rate} "
        f"{preset.lr_scheduler}, lambda {preset.vision_lambda}, eps {preset.vision_eps}, "
        f"label policy {preset.label_policy}{' (multi-label)' if preset.multi_label else ''}, {seeds} seed(s)"
    )


# --------------------------------------------------------------------------- orchestration


def eval_steps(preset: DemoPreset, steps: int) -> list[int]:
    return sorted({max(1, round(steps * (i + 1) / preset.eval_points)) for i in range(preset.eval_points)})


def parse_bool(value: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, any case); ``ValueError`` otherwise (``bool("false")``
    would be True)."""
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value.lower() not in words:
        raise ValueError(f"expected true or false, got {value!r}")
    return words[value.lower()]


def apply_overrides(preset: DemoPreset, items: list[str]) -> DemoPreset:
    """``KEY=VALUE`` settings of the preset (``tiny.KEY=VALUE`` for the model), typed like the field.

    Raises ``ValueError`` naming the item for an unknown key or a value of the wrong type.
    """
    for item in items:
        key, sep, value = item.partition("=")
        target = preset.tiny if key.startswith("tiny.") else preset
        name = key.removeprefix("tiny.")
        if not sep or name not in {f.name for f in fields(target)}:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY a preset field")
        kind = type(getattr(target, name))
        try:
            typed = parse_bool(value) if kind is bool else kind(value)
        except ValueError as err:
            raise ValueError(f"--set {item!r}: {err}") from err
        if target is preset:
            preset = replace(preset, **{name: typed})
        else:
            preset = replace(preset, tiny=replace(preset.tiny, **{name: typed}))
    return preset


def demo_preset(
    name: str = "cpu",
    settings: list[str] | None = None,
    steps: int | None = None,
    vision_lambda: float | None = None,
    vision_eps: float | None = None,
    family: str | None = None,
    task: str = "text",
    label_policy: str | None = None,
) -> DemoPreset:
    """The preset ``name`` of ``task`` (``text``: presets/demo.yaml, ``scenes``: presets/scenes.yaml) with the
    ``--set`` items, then the options given (not None), then the family's own learning rate
    (``family_learning_rate``) unless ``--set learning_rate=...`` names one; ``ValueError`` if bad."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    presets = SCENE_PRESETS if task == "scenes" else PRESETS
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
    preset = apply_overrides(presets[name], list(settings or []))
    overrides = {"steps": steps, "vision_lambda": vision_lambda, "vision_eps": vision_eps, "label_policy": label_policy}
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    if family is not None:
        preset = replace(preset, tiny=replace(preset.tiny, family=family))
    rate = preset.family_learning_rate.get(preset.tiny.family)
    if rate is not None and not any(item.partition("=")[0] == "learning_rate" for item in settings or []):
        preset = replace(preset, learning_rate=rate)
    AlignConfig(label_policy=preset.label_policy)  # ValueError naming the choices
    return preset


def parse_methods(methods: str) -> tuple[str, ...]:
    """``sft,dvsft`` -> the methods, each one of :data:`METHODS`; ``ValueError`` otherwise."""
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not chosen or set(chosen) - set(METHODS):
        raise ValueError(f"methods must be among {', '.join(METHODS)}; got {methods!r}")
    return chosen


def base_model(
    preset: DemoPreset, seed: int, out: Path, text_dir: Path | None, extra_text: list[str] | None = None
) -> Path:
    """The seed's starting model: a fresh tiny Qwen3-VL, with the text-trained LLM grafted in if any
    (``extra_text``: more lines for its tokenizer, e.g. the scene vocabulary)."""
    from dvsft.experiments.demo_text import graft
    from dvsft.testing.tiny import save_tiny

    base = out / "base" / f"seed{seed}"
    pixels = page_pixels(preset)
    tiny = replace(preset.tiny, seed=seed, min_pixels=pixels, max_pixels=pixels)
    settings = {"tiny": asdict(tiny), "text": str(text_dir) if text_dir else None}
    if extra_text:
        settings["extra_text"] = extra_text
    meta = base / "dvsft_demo_base.json"
    if (base / "config.json").is_file() and meta.is_file() and json.loads(meta.read_text()) == settings:
        return base
    if base.exists():
        shutil.rmtree(base)
    save_tiny(base, tiny, extra_text)
    if text_dir is not None:
        graft(text_dir, base)
    meta.write_text(json.dumps(settings))
    return base


def demo_jobs(
    preset: DemoPreset,
    methods: tuple[str, ...],
    seeds: int,
    files: dict[str, Path],
    split: str,
    out: Path,
    text_dir: Path | None,
    threads: int,
    evaluation: Any = None,
    extra_text: list[str] | None = None,
) -> list[Job]:
    """One job per (seed, method): ``preset.steps`` steps from the seed's base model (with the text stage's
    LLM grafted in when ``text_dir`` is given), evaluated at :func:`eval_steps` on the ``split`` pages
    (``evaluation``: another task's evaluation; ``extra_text``: see :func:`base_model`)."""
    evaluation = evaluation or PageEvaluation({k: str(v) for k, v in files.items()}, split)
    jobs = []
    for seed in range(seeds):
        base = base_model(preset, seed, out, text_dir, extra_text)
        for method in methods:
            output_dir = str(out / "runs" / f"{method}-seed{seed}")
            stage = TrainStage(method, str(files["train"]), preset.steps, output_dir, logging_steps=10)
            jobs.append(
                Job(
                    f"{method} seed {seed}",
                    method,
                    seed,
                    preset,
                    str(base),
                    output_dir,
                    (stage,),
                    evaluation,
                    tuple(eval_steps(preset, preset.steps)),
                    threads,
                )
            )
    return jobs


def keep_first_seed(jobs: list[Job], out: Path) -> None:
    """Copy the final model of each method's seed 0 to ``out/{method}``."""
    for job in jobs:
        if job.seed == 0:
            if (out / job.method).exists():
                shutil.rmtree(out / job.method)
            shutil.copytree(final_dir(job), out / job.method)


def run_demo(
    preset: DemoPreset,
    seeds: int | None = None,
    out: Path = Path("dvsft-demo"),
    workers: int | None = None,
    methods: tuple[str, ...] = METHODS,
    threads: int | None = None,
    split: str = "heldout",
) -> dict:
    """Run the whole experiment; returns the results dictionary also written to ``out/results.json``.

    ``preset``: see :func:`demo_preset` (``--set`` items, ``tiny.family``: qwen3-vl, qwen3.5,
    qwen3-vl-moe, internvl, llava_onevision, idefics3, smolvlm; the pages are the same);
    ``split="val"`` evaluates on the validation pages (for choosing settings) instead of the held-out ones.
    """
    from rich.console import Console

    from dvsft.core.records import read_jsonl
    from dvsft.experiments.demo_report import plot_curves, plot_lens, progress_line, results_summary, write_report

    if split not in ("heldout", "val"):
        raise ValueError(f"split must be heldout or val, got {split!r}")
    quiet_transformers()
    console = Console()
    if preset.text_steps and preset.tiny.family != DEFAULT_FAMILY:
        # oracle visual tokens go in through Qwen3-VL's mm_encoder_outputs; other families start from scratch
        console.print(f"[yellow]![/] no text stage for family {preset.tiny.family} ({DEFAULT_FAMILY} only)")
        preset = replace(preset, text_steps=0)
    n_seeds = seeds if seeds is not None else preset.seeds
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    text_threads = threads or os.cpu_count() or 1  # the text stage runs alone: every core
    workers, threads = pool_size(workers, threads, preset.device)

    with console.status("rendering training, validation and held-out pages"):
        files = build_data(preset, out)
    console.print(
        f"[green]✓[/] {preset.train_pages} training pages, validation and held-out pages "
        f"({preset.heldout_pages} each of running text and random words) in {out / 'data'}"
    )
    with console.status(f"text stage: {preset.text_steps} steps of the LLM on oracle pages"):
        stage = text_stage(preset, files, out, text_threads)
    text_dir, probes = stage if stage else (None, None)
    if probes:
        console.print(
            f"[green]✓[/] text stage: validation teacher-forced accuracy running text "
            f"{100 * probes['val_text']:.1f}%, random words {100 * probes['val_random']:.1f}%"
        )

    jobs = demo_jobs(preset, methods, n_seeds, files, split, out, text_dir, threads)
    rows = run_jobs(jobs, workers, console, progress_line)
    rows.sort(key=lambda r: (r["method"], r["seed"], r["step"]))
    keep_first_seed(jobs, out)
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
