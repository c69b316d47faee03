"""`dvsft label` (image-to-label OCR) and `dvsft bench label`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


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
    out: Path = typer.Option(..., "--out", "-o", help="Output word records (JSONL); errors go to <stem>.errors.jsonl."),
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

    from dvsft.sources.image_to_label import collect_inputs, errors_path, label_inputs, parse_shard
    from dvsft.sources.image_to_label import shard as take_shard

    console = Console(stderr=True, soft_wrap=True)
    try:
        inputs = collect_inputs(source, image_root=image_root)
        if shard:
            inputs = take_shard(inputs, *parse_shard(shard))
    except (OSError, ValueError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from err
    options: dict[str, Any] = {}
    if engine == "rapidocr":
        options = {"min_score": min_score, "use_cls": cls, "params": parse_params(ocr_param)}
        if threads:
            options["threads"] = threads
        if device != "cpu":
            from dvsft.sources.ocr import cuda_params

            try:
                cuda_params(device)
            except ValueError as err:
                console.print(f"[red]error:[/red] {escape(str(err))}")
                raise typer.Exit(2) from err
            options["device"] = device
    elif ocr_param or threads or cls or device != "cpu":
        note = "--threads/--cls/--ocr-param/--device only apply to rapidocr"
        console.print(f"[yellow]note:[/yellow] {note}, not {engine!r}")

    with _progress_bar(console, enabled=progress) as bar:
        task = bar.add_task("OCR", total=len(inputs))
        started = False

        def on_progress(done: int, total: int) -> None:
            nonlocal started
            if not started:  # inputs done by an earlier run must not count in the rate
                bar.reset(task, total=total, completed=done)
                started = True
            bar.update(task, completed=done)

        try:
            stats = label_inputs(
                inputs,
                out,
                engine=engine,
                engine_options=options,
                workers=workers,
                retry_errors=retry_errors,
                on_progress=on_progress,
                fmt=fmt,
                rows_per_shard=rows_per_shard,
            )
        except (ValueError, TypeError, RuntimeError) as err:  # bad engine name/options, a dead worker
            console.print(f"[red]error:[/red] {escape(str(err))}")
            raise typer.Exit(2) from err
    n_err = sum(stats.errors.values())
    console.print(
        f"{stats.total} inputs: {stats.skipped} already done, {stats.records} records ({stats.words} words) "
        f"and {n_err} errors written in {stats.seconds:.1f} s -> {escape(str(out))}"
    )
    for reason, count in stats.errors.most_common():
        console.print(f"  {count} x {reason} (see {escape(str(errors_path(out)))})")


def _progress_bar(console: Any, enabled: bool = True) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.2f} img/s" if task.speed else "-- img/s")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


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
    import tempfile

    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        run_bench(keep, images, size, workers, single_thread)
    else:
        with tempfile.TemporaryDirectory(prefix="dvsft-bench-label-") as tmp:
            run_bench(Path(tmp), images, size, workers, single_thread)


def _render_page(words: list[str], size: int, font_size: int = 22) -> Any:
    """A white ``size`` x ``size`` page with ``words`` in black DejaVu Sans, wrapped into lines."""
    import matplotlib.font_manager as fm
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(fm.findfont("DejaVu Sans"), font_size)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    margin, line_h, x, y = 32, int(font_size * 1.6), 32, 32
    for word in words:
        w = draw.textlength(word, font=font)
        if x + w > size - margin:
            x, y = margin, y + line_h
        if y + line_h > size - margin:
            break
        draw.text((x, y), word, font=font, fill="black")
        x += w + font_size // 2
    return img


def run_bench(folder: Path, n_images: int, size: int, workers: int, single_thread: bool = True) -> dict[str, float]:
    """Render pages into ``folder``/pages, then time raw rapidocr, the pipeline with 1 and ``workers`` workers."""
    import random
    import time

    from rich.console import Console
    from rich.table import Table

    from dvsft.sources.corpora import corpus_words
    from dvsft.sources.image_to_label import collect_inputs, default_threads, label_inputs

    console = Console()
    pages = folder / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    vocab = [w for w in corpus_words() if w.isalnum()]
    rng = random.Random(0)
    for k in range(n_images):
        _render_page([rng.choice(vocab) for _ in range(200)], size).save(pages / f"page{k:04d}.png")
    inputs = collect_inputs(pages)
    console.print(f"{n_images} pages of {size}x{size} px, ~200 words each; {default_threads(1)} cores")

    from rapidocr import RapidOCR

    t0, c0 = time.perf_counter(), _cpu_seconds()  # raw: engine construction + a plain loop, same settings
    raw = RapidOCR(params={"Global.log_level": "error", "Global.use_cls": False, "Global.return_word_box": True})
    raw_words = 0
    for x in inputs:
        for line in raw(str(x.path)).word_results or ():
            raw_words += sum(1 for item in line if isinstance(item, tuple) and item[2] is not None)
    raw_s = time.perf_counter() - t0

    results = {"raw": n_images / raw_s}
    cpu = {"raw": _cpu_seconds() - c0}
    words = {"raw": raw_words}
    runs = [("w1", 1, None), (f"w{workers}", workers, None)]  # threads: cores // workers
    if single_thread:
        runs.insert(1, ("w1t1", 1, 1))
    for key, n, threads in runs:
        out = folder / f"words_{key}.jsonl"
        for p in (out, out.with_name(f"{out.stem}.errors.jsonl")):
            p.unlink(missing_ok=True)
        c0 = _cpu_seconds()
        stats = label_inputs(inputs, out, workers=n, engine_options={"threads": threads} if threads else None)
        cpu[key] = _cpu_seconds() - c0
        results[key] = n_images / stats.seconds
        words[key] = stats.words

    table = Table(title="dvsft bench label (images/s, engine load included)")
    for col in ("run", "images/s", "s/image", "CPU s/image", "cores busy", "words"):
        table.add_column(col)
    cores = default_threads(1)
    names = {
        "raw": "raw rapidocr loop (default threads)",
        "w1": f"dvsft label, 1 worker x {cores} threads",
        "w1t1": "dvsft label, 1 worker x 1 thread",
        f"w{workers}": f"dvsft label, {workers} workers x {default_threads(workers)} threads",
    }
    for key, rate in results.items():
        busy = cpu[key] * rate / n_images
        table.add_row(
            names[key], f"{rate:.3f}", f"{1 / rate:.2f}", f"{cpu[key] / n_images:.2f}", f"{busy:.2f}", str(words[key])
        )
    console.print(table)
    console.print(
        "cores busy = CPU seconds / wall seconds of our processes; well below the cores a run can use means "
        "other programs shared the CPU and the rates are disturbed."
    )
    r1 = results["w1"] / results["raw"]
    rn = results[f"w{workers}"] / results["w1"]
    console.print(f"pipeline 1 worker / raw: {r1:.2f}x (target >= 0.9x)")
    console.print(f"pipeline {workers} workers / 1 worker: {rn:.2f}x (target >= 1.7x for 2 workers)")
    if single_thread:
        console.print(
            f"pipeline {workers} workers / 1 single-threaded worker: {results[f'w{workers}'] / results['w1t1']:.2f}x"
        )
    return {**results, "ratio_w1_raw": r1, "ratio_wn_w1": rn}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pipeline's worker processes)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total
