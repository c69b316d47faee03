"""`dvsft prepare`: convert public dataset layouts into records with conversations."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from dvsft.cli.common import fail
from dvsft.core.outputs import OVERWRITE_HELP


class DatasetName(StrEnum):
    docvqa = "docvqa"
    infovqa = "infovqa"
    squad = "squad"
    coco = "coco"


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `prepare`, `convert` and `merge` to the app."""
    app.command("prepare")(prepare)
    app.command("convert")(convert)
    app.command("merge")(merge)
    bench_app.command("data")(bench_data)


def bench_data(
    sizes: str = typer.Option("10000,200000", help="Record counts, comma-separated (first vs last is compared)."),
    repeats: int = typer.Option(3, min=1, help="Runs per measurement (the median is reported)."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers of the collator measurement."),
    collate_samples: int = typer.Option(256, min=8, help="Samples through the collator per run."),
    steps: int = typer.Option(10, min=1, help="Tiny-model optimizer steps per run."),
    batch_size: int = typer.Option(4, min=1, help="Samples per batch (collator and model)."),
    keep: Path | None = typer.Option(None, help="Keep the generated data in this folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Peak RSS of one epoch, Parquet streaming vs JSONL in memory; collator vs tiny-model samples/s."""
    import json

    from dvsft.experiments.bench.data import bench_data as run
    from dvsft.experiments.bench.data import report_lines

    counts = tuple(int(x) for x in sizes.split(","))
    result = run(counts, repeats, workers, collate_samples, steps, batch_size, keep, lambda m: typer.echo(m, err=True))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for line in report_lines(result, steps):
        typer.echo(line)


def convert(
    source: Path = typer.Argument(..., help="Records: JSONL, Parquet, a folder of shards or a datasets folder."),
    out: Path = typer.Argument(..., help="Output: a .jsonl file, a .parquet file, or a folder (shards/datasets)."),
    to: str = typer.Option("auto", help="jsonl, parquet or datasets; auto = from OUT's suffix (.jsonl/.parquet)."),
    rows_per_shard: int = typer.Option(10_000, min=1, help="Records per Parquet shard."),
    embed_images: bool = typer.Option(False, help="Store the image files inside the records (image_bytes)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Convert word records between JSONL, Parquet shards and a Hugging Face datasets folder (lossless)."""
    from dvsft.core.convert import convert as run

    n = run(source, out, to, rows_per_shard, embed_images, overwrite)
    typer.echo(f"{n} records -> {out}")


def merge(
    parts: list[Path] = typer.Argument(..., help="Outputs of `dvsft label --shard i/N` (JSONL files or folders)."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged records; error rows go to <stem>.errors.jsonl."),
    source: Path | None = typer.Option(None, help="The labeling input: check each of its inputs landed once."),
    image_root: Path | None = typer.Option(None, help="--image-root of the label runs (for --source)."),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl, or parquet: OUT is a folder of shards."),
    rows_per_shard: int = typer.Option(10_000, min=1, help="Records per Parquet shard (--format parquet)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Join sharded label outputs, checking that no input is missing or present twice."""
    from dvsft.sources.merge import merge as run

    report = run(parts, out, fmt, rows_per_shard, source, image_root, overwrite)
    checked = f", all {report.expected} inputs of {source} exactly once" if report.expected is not None else ""
    typer.echo(f"{report.parts} parts: {report.records} records and {report.errors} error rows{checked} -> {out}")


def prepare(
    dataset: DatasetName = typer.Argument(..., help="Which dataset layout PATH holds."),
    path: Path = typer.Argument(
        ..., help="Parquet file/folder (lmms-lab), official JSON (+ images), SQuAD JSON, or COCO/LVIS instances JSON."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder: <dataset>[_<split>].jsonl (+ images/); coco: <instances stem>.jsonl."
    ),
    qa_per_image: int | None = typer.Option(
        None, min=0, help="QA pairs kept per image/document, at random (default 1, 2 for infovqa; 0 = all)."
    ),
    split: str | None = typer.Option(None, help="Pick files of this split in a folder (train, validation, ...)."),
    seed: int = typer.Option(0, help="Seed of the QA selection."),
    multi_turn: bool = typer.Option(
        True, "--multi-turn/--separate", help="Several QA pairs of one image: one conversation, or one record each."
    ),
    image_root: Path | None = typer.Option(None, help="Where the official JSON's images are (searched first)."),
    instructions: bool = typer.Option(
        True,
        "--instructions/--no-instructions",
        help="Follow each question with a random format-control instruction (SQuAD: dvsft render adds them).",
    ),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl, or parquet: a folder <dataset>[_<split>]/ of shards."),
    rows_per_shard: int = typer.Option(10_000, min=1, help="Records per Parquet shard (--format parquet)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    images: Path | None = typer.Option(None, help="coco: the folder of the annotated images (required)."),
    conversations: Path | None = typer.Option(
        None, help="coco: LLaVA / ShareGPT conversations joined by image file name (else a listing question)."
    ),
) -> None:
    """Convert DocVQA / InfographicVQA / SQuAD downloads into records with conversations (no OCR yet); COCO / LVIS
    instances into region records."""
    from rich.console import Console
    from rich.markup import escape

    from dvsft.sources.prepare import prepare_dataset

    console = Console(stderr=True, soft_wrap=True)
    if dataset is DatasetName.coco:
        if qa_per_image is not None or split is not None or image_root is not None:
            fail("--qa-per-image, --split and --image-root are not for prepare coco (it takes --images)", console)
        if images is None:
            fail("prepare coco needs --images DIR, the folder of the annotated images", console)
        _prepare_coco(path, images, out, conversations, fmt, rows_per_shard, overwrite, console)
        return
    if images is not None or conversations is not None:
        fail("--images and --conversations are for prepare coco", console)
    try:
        stats = prepare_dataset(
            dataset.value,
            path,
            out,
            qa_per_image=qa_per_image,
            split=split,
            seed=seed,
            multi_turn=multi_turn,
            image_root=image_root,
            instructions=instructions,
            fmt=fmt,
            rows_per_shard=rows_per_shard,
            overwrite=overwrite,
        )
    except (OSError, ValueError) as err:
        fail(err, console)
    what = "documents" if dataset is DatasetName.squad else "images"
    console.print(
        f"{stats.records} records from {stats.images} {what}; kept {stats.qa_kept} of {stats.qa_total} QA pairs "
        f"-> {escape(str(stats.out))}"
    )
    for reason, count in sorted(stats.skipped.items()):
        console.print(f"  skipped {count} x {reason}")
    if stats.missing_images:
        console.print(f"[yellow]warning:[/yellow] {stats.missing_images} images not found (try --image-root)")
    nxt = "dvsft render" if dataset is DatasetName.squad else "dvsft label"
    console.print(f"next: {nxt} {escape(str(stats.out))} --out ...")


def _prepare_coco(
    instances: Path,
    images: Path,
    out: Path,
    conversations: Path | None,
    fmt: str,
    rows_per_shard: int,
    overwrite: bool,
    console: Any,
) -> None:
    """`dvsft prepare coco`: what was written and joined, how many entries were left out and the first few."""
    from rich.markup import escape

    from dvsft.sources.coco import prepare_coco

    try:
        stats = prepare_coco(instances, images, out, conversations, fmt, rows_per_shard, overwrite)
    except (OSError, ValueError) as err:
        fail(err, console)
    console.print(
        f"{stats.records} records, {stats.regions} regions ({stats.polygons} with a polygon, {stats.box_only} "
        f"box only) -> {escape(str(stats.out))}"
    )
    if conversations is not None:
        console.print(
            f"  joined {stats.conversations} conversation samples; {stats.unjoined} name images the annotations lack"
        )
    if stats.problems:
        console.print(
            f"[yellow]{len(stats.problems)} left out[/yellow], each with its reason in {escape(str(stats.errors))}:"
        )
        for problem in stats.problems[:5]:
            console.print(
                f"  {escape(Path(str(problem.file)).name)}: {escape(str(problem.id))}: {escape(problem.reason)}"
            )
    console.print(f"next: dvsft align {escape(str(stats.out))} --label-policy fill --out ...")
