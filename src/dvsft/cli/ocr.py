"""`dvsft label` (image-to-label OCR) and `dvsft bench label`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dvsft.cli.common import fail


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `label` to the app and `label` to the bench group."""
    app.command("label")(label)
    bench_app.command("label")(bench_label)


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["Det.limit_side_len=960", ...]`` -> ``{"Det.limit_side_len": 960}`` (values parsed as YAML scalars)."""
    import yaml

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--ocr-param")
        params[key.strip()] = yaml.safe_load(value)
    return params


def label(
    source: Path = typer.Argument(
        ..., help="Folder of images (recursive), one image, or a ShareGPT/LLaVA dataset (.json/.jsonl)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output word records (JSONL, resumed if it exists); errors go to <stem>.errors.jsonl."
    ),
    workers: int = typer.Option(1, min=1, help="OCR processes, each with its own engine."),
    shard: str | None = typer.Option(None, help="Process only inputs i, i+N, i+2N, ... of the full list: 'i/N'."),
    engine: str = typer.Option("rapidocr", help="OCR engine name."),
    min_score: float = typer.Option(0.5, help="Drop words whose recognition score is below this."),
    image_root: Path | None = typer.Option(None, help="Resolve a dataset's relative image paths here first."),
    threads: int | None = typer.Option(None, min=1, help="onnxruntime threads per worker (default: cores // workers)."),
    cls: bool = typer.Option(False, "--cls/--no-cls", help="Run rapidocr's 180-degree line classifier."),
    ocr_param: list[str] = typer.Option([], help="Extra rapidocr config, KEY=VALUE, e.g. Det.limit_side_len=960."),
    retry_errors: bool = typer.Option(False, help="Try the inputs listed in the errors file again."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl, or parquet: --out is a folder of Parquet shards."),
    rows_per_shard: int = typer.Option(10_000, min=1, help="Records per Parquet shard (--format parquet)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N (rapidocr on onnxruntime-gpu's CUDA provider)."),
) -> None:
    """OCR images into word records (resumable: rerun the same command after an interruption)."""
    from rich.console import Console
    from rich.markup import escape

    from dvsft.core.outputs import refuse_inputs
    from dvsft.core.progress import progress_bar
    from dvsft.sources.image_to_label import collect_inputs, errors_path, label_inputs, parse_shard
    from dvsft.sources.image_to_label import shard as take_shard
    from dvsft.sources.ocr import rapidocr_options

    console = Console(stderr=True, soft_wrap=True)
    options: dict[str, Any] = {}
    try:
        refuse_inputs([out, errors_path(out)], [source])
        inputs = collect_inputs(source, image_root=image_root)
        if shard:
            inputs = take_shard(inputs, *parse_shard(shard))
        if engine == "rapidocr":
            options = rapidocr_options(min_score, cls, parse_params(ocr_param), threads, device)
    except (OSError, ValueError) as err:
        fail(err, console)
    if engine != "rapidocr" and (ocr_param or threads or cls or device != "cpu"):
        note = "--threads/--cls/--ocr-param/--device only apply to rapidocr"
        console.print(f"[yellow]note:[/yellow] {note}, not {engine!r}")
    with progress_bar(console, unit="img", enabled=progress) as bar:
        try:
            stats = label_inputs(
                inputs, out, engine=engine, engine_options=options, workers=workers, retry_errors=retry_errors,
                on_progress=bar.position("OCR", len(inputs)), fmt=fmt, rows_per_shard=rows_per_shard,
            )  # fmt: skip
        except (ValueError, TypeError, RuntimeError) as err:  # bad engine name/options, a dead worker
            fail(err, console)
    n_err = sum(stats.errors.values())
    console.print(
        f"{stats.total} inputs: {stats.skipped} already done, {stats.records} records ({stats.words} words) "
        f"and {n_err} errors written in {stats.seconds:.1f} s -> {escape(str(out))}"
    )
    for reason, count in stats.errors.most_common():
        console.print(f"  {count} x {reason} (see {escape(str(errors_path(out)))})")


def bench_label(
    images: int = typer.Option(24, min=2, help="Generated document images (~200 words each)."),
    size: int = typer.Option(1024, help="Image side in pixels."),
    workers: int = typer.Option(2, min=2, help="Workers of the parallel run."),
    keep: Path | None = typer.Option(None, help="Keep the generated images and outputs in this folder."),
    single_thread: bool = typer.Option(
        True, "--single-thread/--no-single-thread", help="Also time 1 worker with 1 onnxruntime thread."
    ),
) -> None:
    """Images/s of raw rapidocr vs `dvsft label` with 1 and N workers, on the same generated pages."""
    from rich.console import Console

    from dvsft.experiments.bench.ocr import bench_label as run

    console = Console()
    result = run(images, size, workers, keep, single_thread, log=console.print)
    console.print(result["table"])
    for line in result["lines"]:
        console.print(line)
