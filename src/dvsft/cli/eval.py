"""CLI commands of this stage: ``dvsft eval``, ``dvsft ocr-set`` and ``dvsft bench eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dvsft.cli.common import fail, split_list
from dvsft.core.outputs import OVERWRITE_HELP
from dvsft.models.families import DEFAULT_FAMILY

POST_PROMPT_HELP = (
    "Text appended to each question (default: the prompt style's; the paper's is "
    "'\\nAnswer the question using a single word or phrase.')."
)
CORPUS_HELP = (
    "Text corpus (.txt, .jsonl with 'document'/'text', .parquet, or a folder of .txt); default: bundled prose."
)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this stage's commands to the `dvsft` app and its `bench` group."""
    app.command("eval")(eval_cmd)
    app.command("ocr-set")(ocr_set)
    bench_app.command("eval")(bench_eval)


def eval_cmd(
    model: Annotated[Path, typer.Option(help="HF model directory (a trained checkpoint or `dvsft` tiny model).")],
    bench: Annotated[
        str,
        typer.Option(
            help="Benchmark name(s), comma separated: docvqa, infovqa, squad, "
            "chartqa, ocrbench, ocrvqa, textvqa, mme, ocr."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            help="Data path per benchmark, comma separated, same order as --bench: "
            "a downloaded dataset folder, a .parquet/.json file or word records .jsonl."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder: OUT/<bench>/predictions.jsonl, scores.json.")],
    split: Annotated[
        str | None,
        typer.Option(help="Split to read (default per benchmark, e.g. validation for docvqa, test for chartqa)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N items (N >= 1).")] = None,
    batch_size: Annotated[int, typer.Option(help="Generation batch size (left padding).")] = 8,
    min_pixels: Annotated[int | None, typer.Option(help="Processor min_pixels override.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Processor max_pixels override.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length (default per benchmark).")] = None,
    scales: Annotated[str, typer.Option(help="OCR tasks: image scale factors, e.g. 0.5,0.75,1.0.")] = "1.0",
    select_visible: Annotated[
        int | None,
        typer.Option(
            help="OCR-VQA: draw N random questions whose answer our OCR sees; writes OUT/ocrvqa/selection.json."
        ),
    ] = None,
    selection: Annotated[Path | None, typer.Option(help="OCR-VQA: evaluate the ids of this selection file.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the OCR-VQA selection.")] = 0,
    post_prompt: Annotated[str | None, typer.Option(help=POST_PROMPT_HELP)] = None,
    prompt_style: Annotated[
        str,
        typer.Option(help="paper (the paper's protocol) or lmms-eval (lmms-eval's own prompt per benchmark)."),
    ] = "paper",
    rules: Annotated[
        str,
        typer.Option(
            help="Metric rules: lmms-eval (its current release, see docs/evaluation.md) or official "
            "(OCRBench: the official script, no full-width folding)."
        ),
    ] = "lmms-eval",
    overwrite: Annotated[bool, typer.Option(help="Discard earlier predictions instead of resuming.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu / cuda (default: cuda when available).")] = None,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad", help="Record unreadable items in OUT/<bench>/errors.jsonl and go on (default: stop)."
        ),
    ] = False,
) -> None:
    """Evaluate a model on the paper's benchmarks and OCR tasks (resumable; greedy decoding)."""
    from rich.console import Console

    from dvsft.core.progress import progress_bar
    from dvsft.evaluation.metrics import RULES, rules_label
    from dvsft.evaluation.ocr_tasks import parse_scales
    from dvsft.evaluation.prompts import PROMPT_STYLES
    from dvsft.evaluation.suite import run_benchmarks, scores_table

    console = Console()
    if prompt_style not in PROMPT_STYLES:
        raise typer.BadParameter(f"--prompt-style {prompt_style!r}: use one of {', '.join(PROMPT_STYLES)}")
    if rules not in RULES:
        raise typer.BadParameter(f"--rules {rules!r}: use one of {', '.join(RULES)}")
    try:
        scale_values = parse_scales(scales)
    except ValueError as err:
        raise typer.BadParameter(f"--scales {scales!r}: {err}") from err
    try:
        with progress_bar(console, unit="items") as bar:
            results = run_benchmarks(
                model, split_list(bench), split_list(data), out, split=split, limit=limit, batch_size=batch_size,
                min_pixels=min_pixels, max_pixels=max_pixels, max_new_tokens=max_new_tokens, scales=scale_values,
                post_prompt=post_prompt, selection=selection, select_visible_n=select_visible, seed=seed,
                overwrite=overwrite, device=device, progress=bar.counter, skip_bad=skip_bad,
                prompt_style=prompt_style, rules=rules,
            )  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        fail(err)  # on stderr, once the progress display is closed
    console.print(scores_table(results))
    console.print(f"metric rules: {rules_label(rules)}; prompt style: {prompt_style}")
    for name, res in results.items():
        if res.get("regenerated"):
            console.print(f"[yellow]{name}: {res['regenerated']}: earlier predictions discarded, all generated now[/]")
        if res.get("skipped_bad"):
            errors = out / name / "errors.jsonl"
            console.print(f"[yellow]{name}: {res['skipped_bad']} unreadable items skipped, see {errors}[/]")
    console.print(f"scores: {out / 'scores.json'}")


def ocr_set(
    kind: Annotated[str, typer.Argument(help="contextual (real passages) or noncontextual (word salad).")],
    out: Annotated[Path, typer.Option(help="Output folder: images/ and words.jsonl.")],
    n: Annotated[int, typer.Option(help="Number of test images.")] = 500,
    corpus: Annotated[Path | None, typer.Option(help=CORPUS_HELP)] = None,
    seed: Annotated[int, typer.Option()] = 0,
    family: Annotated[str, typer.Option(help="Token grid the pages are drawn on.")] = DEFAULT_FAMILY,
    cols: Annotated[int, typer.Option(help="Token cells per row.")] = 32,
    max_rows: Annotated[int, typer.Option(help="Rows per page.")] = 32,
    font: Annotated[str, typer.Option(help="Font face (dvsft.sources.fonts) or 'random'.")] = "DejaVuSans",
    min_chars: Annotated[int | None, typer.Option(help="Shortest text (default 200).")] = None,
    max_chars: Annotated[int | None, typer.Option(help="Longest text (default 600 contextual, 500 non).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Render an OCR test set (paper section 5.4) as word records for `dvsft eval --bench ocr`."""
    from rich.console import Console

    from dvsft.core.progress import progress_bar
    from dvsft.evaluation.ocr_tasks import build_ocr_set, check_output

    console = Console()
    try:
        check_output(out, corpus, overwrite)  # before the progress bar: a refusal is the only output
        with progress_bar(console, unit="pages") as bar:
            records = build_ocr_set(
                kind, out, n, corpus, seed, family, cols, max_rows, font,
                min_chars=min_chars, max_chars=max_chars, on_page=bar.counter(f"rendering {kind}", n),
                overwrite=overwrite,
            )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        fail(err)
    console.print(f"wrote {records}")


def bench_eval(
    n: Annotated[int, typer.Option(help="Generated test items.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Batched run's batch size (baseline: 1).")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per item (fixed length).")] = 16,
    model: Annotated[Path | None, typer.Option(help="Model directory (default: a fresh tiny model).")] = None,
    hidden_size: Annotated[int, typer.Option(help="Tiny model width when --model is not given.")] = 128,
    layers: Annotated[int, typer.Option(help="Tiny model depth when --model is not given.")] = 4,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
) -> None:
    """Evaluation throughput: batch size 1 vs batched generation on the same items."""
    from rich.console import Console

    from dvsft.experiments.bench.throughput import throughput_benchmark

    console = Console()
    result = throughput_benchmark(n, batch_size, max_new_tokens, model, hidden_size, layers, threads)
    console.print(result["table"])
    console.print(
        f"batched / single throughput ratio: [bold]{result['ratio']:.2f}x[/bold] "
        f"(predictions identical for {result['agree']}/{n} items)"
    )
