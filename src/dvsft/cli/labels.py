"""CLI commands of this stage: `dvsft render`, `dvsft align`, `dvsft stats`, `dvsft bench render`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dvsft.align.aligner import AlignConfig
from dvsft.cli.common import fail, from_params
from dvsft.core.outputs import OVERWRITE_HELP
from dvsft.core.progress import progress_bar
from dvsft.models.families import DEFAULT_FAMILY


def _table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    table = Table(title=title, show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


def render(
    ctx: typer.Context,
    source: Path = typer.Argument(..., help="SQuAD JSON (v1.1/v2.0), plain text (blank-line separated) or JSONL."),
    out: Path = typer.Option(..., "--out", help="Output folder: images/, words.jsonl, render_stats.json."),
    family: str = typer.Option(DEFAULT_FAMILY, help="Model family whose token grid pages align to."),
    cols: int = typer.Option(32, help="Token cells per line (page width = cols x cell)."),
    max_rows: int = typer.Option(32, help="Token rows per page at most."),
    font: str = typer.Option("random", help="DejaVu face (e.g. DejaVuSans, DejaVuSerif-Bold) or 'random'."),
    font_size: int = typer.Option(20, help="Font size in px (clamped to fit a token row)."),
    dark_text: bool = typer.Option(
        False, "--dark-text", help="Dark text on light background (default: light on dark)."
    ),
    full_height: bool = typer.Option(False, "--full-height", help="Every page max-rows tall."),
    min_pixels: int = typer.Option(None, help="Override the family's min_pixels."),
    max_pixels: int = typer.Option(None, help="Override the family's max_pixels."),
    qa_per_image: int = typer.Option(1, help="QA pairs per image (each group gets its own image)."),
    seed: int = typer.Option(0, help="Random seed (per document: seed + document id)."),
    png: str = typer.Option("palette", help="PNG mode: 'palette' (8-bit, fast, small) or 'rgb'."),
    source_format: str = typer.Option("auto", "--format", help="auto, squad, jsonl or text."),
    ppl_model: Path = typer.Option(None, help="Local causal LM directory for the perplexity filter."),
    max_answer_ppl: float = typer.Option(None, help="Drop QA pairs whose answer perplexity is above this."),
    max_question_ppl: float = typer.Option(None, help="Drop QA pairs whose question perplexity is above this."),
    min_doc_gain: float = typer.Option(
        None, help="Drop QA pairs whose answer perplexity without the document is not this many times higher."
    ),
    ppl_batch_size: int = typer.Option(8, help="Batch size of the perplexity model."),
    workers: int = typer.Option(1, help="Rendering processes."),
    max_word_chars: int = typer.Option(
        10_000, help="Skip words longer than this many characters (word_too_long); 0 = split them all."
    ),
    out_format: str = typer.Option(
        "jsonl", "--out-format", help="parquet: also write OUT/words/ as Parquet shards (from words.jsonl)."
    ),
    rows_per_shard: int = typer.Option(10_000, min=1, help="Records per Parquet shard (--out-format parquet)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Render text documents onto token-aligned images (label-to-image) and write word records."""
    from rich.console import Console

    from dvsft.sources.label_to_image import RenderOptions, render_source

    try:
        options = from_params(RenderOptions, ctx.params, ppl_model=str(ppl_model) if ppl_model else None)
    except ValueError as err:
        fail(err)
    with progress_bar() as bar:
        try:
            stats = render_source(source, out, options, bar.stages(), overwrite)
        except ValueError as err:
            fail(err)
    keys = [k for k in stats if isinstance(stats[k], int | float) and not isinstance(stats[k], bool)]
    Console().print(_table(f"dvsft render -> {out}", [(k, str(stats[k])) for k in keys]))


def align(
    words: Path = typer.Argument(..., help="Word records: JSONL, Parquet, a folder of shards or a datasets folder."),
    out: Path = typer.Option(..., "--out", help="Aligned records (JSONL; a folder of shards with --format parquet)."),
    family: str = typer.Option(DEFAULT_FAMILY, help="Model family or a local model directory (its processor config)."),
    tokenizer: Path = typer.Option(None, help="Model directory whose tokenizer gives label token ids."),
    min_pixels: int = typer.Option(None, help="Min pixels [default: dvsft train's, 65536 = 64 tokens of 32 px]."),
    max_pixels: int = typer.Option(None, help="Max pixels [default: dvsft train's, 2097152 = 2048 tokens of 32 px]."),
    processor_pixels: bool = typer.Option(
        False, "--processor-pixels", help="Use the family's / model dir's own min and max pixels instead."
    ),
    max_height_cells: float = typer.Option(
        AlignConfig.max_height_cells, help="Drop words taller than this many token cells."
    ),
    max_subtokens: int = typer.Option(
        AlignConfig.max_subtokens, help="Drop words longer than this many tokens (needs --tokenizer)."
    ),
    leading_space: bool = typer.Option(
        AlignConfig.leading_space,
        "--leading-space/--no-leading-space",
        help="Tokenize labels as ' word' (mid-sentence form), or as 'word'.",
    ),
    label_policy: str = typer.Option(
        AlignConfig.label_policy,
        "--label-policy",
        help="Which cells an entry labels: bottom-right (the paper's rule), span (every cell of a word's ink, "
        "the sub-token drawn there) or fill (every cell half inside a region).",
    ),
    multi_label: bool = typer.Option(
        AlignConfig.multi_label, "--multi-label", help="A cell several entries claim keeps all their labels."
    ),
    views: str = typer.Option(
        AlignConfig.views,
        "--views",
        help="Which views of a tiled image label an entry: finest (the tiles, not a thumbnail of the same text) "
        "or all.",
    ),
    overlay: Path = typer.Option(None, help="Write alignment overlay PNGs into this folder."),
    overlay_limit: int = typer.Option(20, help="At most this many overlays."),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl, or parquet: --out is a folder of Parquet shards."),
    rows_per_shard: int = typer.Option(10_000, min=1, help="Records per Parquet shard (--format parquet)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Align word boxes and regions to a model's visual tokens (a label policy + the paper's filters)."""
    from rich.console import Console

    from dvsft.align.run import align_file, check_outputs, errors_path, load_tokenizer
    from dvsft.core.record_sources import count_records
    from dvsft.models.geometry import TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS

    if not processor_pixels:  # the grid `dvsft train` sees (it sets these on every processor)
        min_pixels = TRAIN_MIN_PIXELS if min_pixels is None else min_pixels
        max_pixels = TRAIN_MAX_PIXELS if max_pixels is None else max_pixels
    try:
        config = AlignConfig(max_height_cells, max_subtokens, leading_space, label_policy, multi_label, views)
        if words.exists():
            check_outputs(words, out, fmt, overlay, overwrite)
        tok = load_tokenizer(tokenizer) if tokenizer else None
        total = count_records(words) if words.exists() else 0
        with progress_bar(unit="records") as bar:
            summary = align_file(
                words,
                out,
                family,
                tok,
                config,
                min_pixels,
                max_pixels,
                overlay,
                overlay_limit,
                bar.counter("align", total),
                fmt,
                rows_per_shard,
                overwrite,
            )
    except (ValueError, OSError) as err:
        fail(err)
    rows = [(k, str(v)) for k, v in summary.items() if k != "dropped"]
    rows += [(f"dropped: {k}", str(v)) for k, v in summary["dropped"].items()]
    if summary["visual_tokens"]:
        rows.append(("vision coverage", f"{100 * summary['labeled_tokens'] / summary['visual_tokens']:.2f}%"))
    console = Console()
    console.print(_table(f"dvsft align -> {out}", rows))
    if summary["errors"]:
        console.print(f"[yellow]{summary['errors']} records could not be aligned: see {errors_path(out)}[/]")


def stats(
    aligned: Path = typer.Argument(..., help="Aligned records (output of `dvsft align`)."),
    tokenizer: Path = typer.Option(None, help="Model directory: count text labels in tokens (else in words)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Dataset statistics as in the paper's Table 1 (samples, images, text/vision labels, coverage)."""
    from rich.console import Console

    from dvsft.align.run import load_tokenizer
    from dvsft.align.stats import file_stats, stats_rows

    try:
        tok = load_tokenizer(tokenizer) if tokenizer else None
        result = file_stats(aligned, tok)
    except ValueError as err:
        fail(err)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    Console().print(_table(str(aligned), stats_rows(result)))


def bench_render_cmd(
    pages: int = typer.Option(50, help="Pages to render."),
    words_per_page: int = typer.Option(200, help="Words per page."),
) -> None:
    """Rendering throughput: 1024x1024 qwen3-vl pages (32x32 cells) incl. PNG encoding, one process."""
    from rich.console import Console

    from dvsft.experiments.bench.render import bench_render, report_rows

    Console().print(_table("dvsft bench render", report_rows(bench_render(pages, words_per_page))))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this stage's commands to the `dvsft` app and its `bench` group."""
    app.command("render")(render)
    app.command("align")(align)
    app.command("stats")(stats)
    bench_app.command("render")(bench_render_cmd)
