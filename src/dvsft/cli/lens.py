"""CLI commands of this stage: ``dvsft lens``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dvsft.cli.common import fail


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this stage's commands to the `dvsft` app and its `bench` group."""
    app.command()(lens)


def lens(
    model: Annotated[Path, typer.Option(help="HF model directory.")],
    out: Annotated[Path, typer.Option(help="Output folder: lens.json, overlay PNG(s), accuracy.json.")],
    image: Annotated[Path | None, typer.Option(help="One image to read.")] = None,
    records: Annotated[
        Path | None,
        typer.Option(help="Aligned or word records (.jsonl): overlays per record plus vision-label accuracy."),
    ] = None,
    top_k: Annotated[int, typer.Option(help="Readings kept per visual token in lens.json.")] = 5,
    limit: Annotated[int | None, typer.Option(help="Only the first N records.")] = None,
    min_pixels: Annotated[int | None, typer.Option(help="Processor min_pixels override.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Processor max_pixels override.")] = None,
    upscale: Annotated[float, typer.Option(help="Enlarge overlays by this factor (small cells).")] = 1.0,
    device: Annotated[str | None, typer.Option(help="cpu / cuda (default: cuda when available).")] = None,
) -> None:
    """Visual logit lens: decode the LLM's logits at every visual token and draw them on the image grid."""
    import math

    import torch
    from rich.console import Console

    from dvsft.core.progress import progress_bar
    from dvsft.data.skips import REASONS_FILE
    from dvsft.lens.run import lens_image, lens_records
    from dvsft.models.loading import load_model, load_processor

    console = Console()
    if (image is None) == (records is None):
        fail("pass exactly one of --image or --records", console)
    if top_k < 1:
        raise typer.BadParameter("--top-k must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        mdl = load_model(model).to(device).eval()
        proc = load_processor(model, min_pixels=min_pixels, max_pixels=max_pixels)
        if image is not None:
            overlay, n = lens_image(mdl, proc, image, out, top_k, upscale)
            console.print(f"wrote {overlay} and {out / 'lens.json'} ({n} visual tokens)")
            return
        with progress_bar(console, unit="records") as bar:
            acc, n = lens_records(mdl, proc, records, out, top_k, upscale, limit, progress=bar.counter)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        fail(err, console)
    top1, top5 = ("n/a" if math.isnan(acc[k]) else f"{acc[k]:.4f}" for k in ("top1", "top5"))  # NaN: no labels
    console.print(
        f"vision-label accuracy over {acc['n']} labeled tokens in {acc['images']} images: top-1 {top1}, top-5 {top5}"
    )
    if acc["skipped"]:
        total = acc["skipped"] + acc["images"]
        console.print(
            f"skipped {acc['skipped']} of {total} records that could not be read; reasons in {out / REASONS_FILE}"
        )
    console.print(f"wrote {out / 'lens.json'}, {out / 'accuracy.json'} and {n} overlays")
