"""CLI: `dvsft bench train` and `dvsft bench families` (implementations in :mod:`dvsft.experiments.bench`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from dvsft.cli.common import fail, from_params, split_list


def print_report(console: Any, table: str, report: dict, json_out: Path | None) -> None:
    """A bench's table on the console and, with ``json_out``, its whole report as JSON."""
    console.print(table, markup=False)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"report: {json_out}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `bench train` and `bench families` to the `dvsft bench` group."""
    bench_app.command("train")(bench_train_command)
    bench_app.command("families")(bench_families_command)


def bench_train_command(
    ctx: typer.Context,
    hidden_size: int = typer.Option(256, help="LLM hidden size"),
    layers: int = typer.Option(2, help="LLM decoder layers"),
    vocab_size: int = typer.Option(151_936, help="vocabulary size of the LM head (Qwen3-VL: 151,936)"),
    image_width: int = typer.Option(1024, help="page width in pixels"),
    image_height: int = typer.Option(992, help="page height in pixels (1024x992: 992 visual tokens)"),
    labeled_fraction: float = typer.Option(0.2, help="share of visual tokens that get a word label"),
    answer_words: int = typer.Option(24, help="words in the assistant answer (text labels)"),
    chunk_size: int = typer.Option(1024, help="rows of LM-head logits computed at once"),
    vision_weight: float = typer.Option(0.1, help="lambda"),
    eps: float = typer.Option(0.1, help="vision smoothing"),
    steps: int = typer.Option(3, help="timed forward+backward steps per variant (median reported)"),
    warmup: int = typer.Option(1, help="untimed steps first"),
    threads: int = typer.Option(0, help="torch threads per variant process (0: torch default)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    variants: str = typer.Option(",".join(("sft", "dvsft", "dvsft_separate", "naive", "hf_sft"))),
    json_out: Path | None = typer.Option(None, "--json", help="write the full report as JSON here"),
    packing: bool = typer.Option(
        False,
        "--packing",
        help="instead: tokens/s and padding share of packed vs padded batches of mixed page sizes (uses --hidden-size, "
        "--layers, --steps as repeats, --threads, --json)",
    ),
) -> None:
    """Step time and peak memory of SFT vs DV-SFT vs the naive full-logits vision loss, one run, ratios to SFT."""
    from rich.console import Console

    from dvsft.core.progress import progress_bar
    from dvsft.experiments.bench.training import BenchConfig, bench_train, markdown_table

    if packing:
        bench_packing_command(hidden_size, layers, steps, threads, json_out)
        return
    cfg = from_params(BenchConfig, ctx.params, variants=split_list(variants))
    console = Console()
    try:
        with progress_bar(console, unit="runs", transient=True) as bar:
            task = bar.add_task("building the batch", total=len(cfg.variants) + 1)
            done = iter(range(len(cfg.variants) + 1))  # a memory run per variant, then the timing run
            report = bench_train(cfg, lambda run: bar.update(task, completed=next(done, None), description=run))
    except ValueError as err:  # a bad option value: a user error (exit code 2)
        fail(err)
    except RuntimeError as err:  # a benchmark process that failed: not the user's input
        fail(err, code=1)
    shape = report["shape"]
    console.print(
        f"machine: {report['machine']}; memory: {report['memory_method']}\n"
        f"batch: {shape['visual_tokens']} visual tokens, {shape['labeled_tokens']} labeled, "
        f"{shape['text_tokens']} text label tokens, sequence {shape['sequence_length']}; "
        f"vocab {cfg.vocab_size:,}, hidden {cfg.hidden_size}, {cfg.layers} layers, chunk {cfg.chunk_size}"
    )
    print_report(console, markdown_table(report), report, json_out)


def bench_packing_command(hidden_size: int, layers: int, repeats: int, threads: int, json_out: Path | None) -> None:
    """`dvsft bench train --packing`: packed against padded batches (:mod:`dvsft.experiments.bench.packing`)."""
    from rich.console import Console

    from dvsft.experiments.bench.packing import PackingBenchConfig, bench_packing, markdown_table

    console = Console()
    cfg = PackingBenchConfig(hidden_size=hidden_size, layers=layers, repeats=repeats, threads=threads)
    try:
        with console.status("timing") as status:
            report = bench_packing(cfg, status.update)
    except ValueError as err:
        fail(err)
    c = report["config"]
    console.print(
        f"machine: {report['machine']}; {c['samples']} pages of mixed sizes, padded {c['batch_size']} per batch vs "
        f"packed into {c['rows']} row(s) of {' or '.join(map(str, c['max_lengths']))} tokens; one epoch of forward + "
        f"backward, median of {c['repeats']}, {c['threads'] or 'default'} torch thread(s)"
    )
    print_report(console, markdown_table(report), report, json_out)


def bench_families_command(
    families: str = typer.Option("", help="tiny families, comma separated (default: every one)"),
    preset: str = typer.Option("cpu", help="the demo preset whose page, tiny sizes and batch are used"),
    steps: int = typer.Option(20, help="timed training steps per family (median reported)"),
    warmup: int = typer.Option(5, help="untimed steps first"),
    method: str = typer.Option("dvsft", help="training method of the timed steps"),
    json_out: Path | None = typer.Option(None, "--json", help="write the full report as JSON here"),
) -> None:
    """CPU time of the demo's training step per tiny family, with each family's image tokens per page."""
    from rich.console import Console

    from dvsft.experiments.bench.families import FamilyBenchConfig, bench_families, markdown_table

    console = Console()
    try:
        chosen = split_list(families) if families else None
        picked = {"families": chosen} if chosen else {}
        cfg = FamilyBenchConfig(**picked, preset=preset, steps=steps, warmup=warmup, method=method)
        with console.status("timing") as status:
            report = bench_families(cfg, lambda family: status.update(f"timing {family}"))
    except ValueError as err:
        fail(err)
    console.print(f"machine: {report['machine']}; preset {report['preset']}; process CPU time, 1 torch thread")
    print_report(console, markdown_table(report), report, json_out)
