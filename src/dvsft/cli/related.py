"""CLI: `dvsft tasks granvit|finevit`, `dvsft codes fit|encode`."""

from __future__ import annotations

from pathlib import Path

import typer

from dvsft.cli.common import fail, split_list
from dvsft.core.outputs import OVERWRITE_HELP

COORDS_HELP = "box format: relative (GranViT, 3 decimals), qwen2-vl, qwen2.5-vl (resized pixels), qwen3-vl (0-1000)"


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add the `tasks` and `codes` groups to the app."""
    tasks_app = typer.Typer(no_args_is_help=True, help="Region-task QA records from word records (GranViT, FineViT).")
    codes_app = typer.Typer(no_args_is_help=True, help="ASVR targets: k-means codes of the model's visual features.")
    app.add_typer(tasks_app, name="tasks")
    app.add_typer(codes_app, name="codes")
    tasks_app.command("granvit")(tasks_granvit)
    tasks_app.command("finevit")(tasks_finevit)
    codes_app.command("fit")(codes_fit)
    codes_app.command("encode")(codes_encode)


def _write_tasks(
    records: Path, out: Path, tasks: str, level: str, coords: str, model: Path | None, *,
    min_pixels: int | None, max_pixels: int | None, limit: int | None, overwrite: bool, **config,
) -> None:  # fmt: skip
    """Write the task records of a `tasks` command; ``config``: the rest of its TaskConfig fields."""
    from dvsft.sources.region_tasks import TaskConfig, box_codec, build_task_file

    try:
        codec = box_codec(coords, model, min_pixels, max_pixels)
        cfg = TaskConfig(tasks=tuple(split_list(tasks)), level=level, codec=codec, **config)
        if level not in ("word", "phrase"):
            raise ValueError(f"--level must be word or phrase, got {level!r}")
        stats = build_task_file(records, out, cfg, limit=limit, overwrite=overwrite)
    except ValueError as err:
        fail(err)
    print(
        f"{stats['records']} task records ({stats['qa']} QA pairs) from {stats['images']} images -> {out}; "
        f"{stats['regions']} regions, {stats['duplicates']} skipped as duplicate captions"
    )


def tasks_granvit(
    records: Path = typer.Argument(..., help="word records (JSONL)"),
    out: Path = typer.Option(..., "--out", help="output task records (JSONL)"),
    tasks: str = typer.Option("bbox2caption,caption2bbox", help="comma-separated subset of the two tasks"),
    coords: str = typer.Option("relative", help=COORDS_HELP),
    model: Path = typer.Option(None, help="model dir whose resize rule qwen2.5-vl coordinates follow"),
    min_pixels: int = typer.Option(None, help="resize override for qwen2.5-vl coordinates"),
    max_pixels: int = typer.Option(None, help="resize override for qwen2.5-vl coordinates"),
    max_words: int = typer.Option(10, help="words per phrase (GranViT: captions of at most 10 words)"),
    max_per_image: int = typer.Option(None, help="regions sampled per image (default: all)"),
    turns: int = typer.Option(1, help="QA pairs per output record (multi-turn over one image)"),
    seed: int = typer.Option(0),
    limit: int = typer.Option(None, help="only the first N input records"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """GranViT Bbox2Caption / Caption2Bbox QA (verbatim templates) over phrases of the OCR words."""
    _write_tasks(
        records, out, tasks, "phrase", coords, model, min_pixels=min_pixels, max_pixels=max_pixels,
        max_words=max_words, max_per_image=max_per_image, turns=turns, seed=seed, limit=limit, overwrite=overwrite,
    )  # fmt: skip


def tasks_finevit(
    records: Path = typer.Argument(..., help="word records (JSONL)"),
    out: Path = typer.Option(..., "--out", help="output task records (JSONL)"),
    level: str = typer.Option("word", help="word or phrase regions"),
    tasks: str = typer.Option("bbox2ocr,ocr2bbox", help="comma-separated subset of the two tasks"),
    coords: str = typer.Option("relative", help=COORDS_HELP),
    model: Path = typer.Option(None, help="model dir whose resize rule qwen2.5-vl coordinates follow"),
    min_pixels: int = typer.Option(None),
    max_pixels: int = typer.Option(None),
    max_words: int = typer.Option(10, help="words per phrase at --level phrase"),
    max_per_image: int = typer.Option(None, help="regions sampled per image (default: all)"),
    turns: int = typer.Option(1, help="QA pairs per output record"),
    seed: int = typer.Option(0),
    limit: int = typer.Option(None, help="only the first N input records"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """FineViT region OCR QA: bbox-to-ocr and ocr-to-bbox at word or phrase level."""
    _write_tasks(
        records, out, tasks, level, coords, model, min_pixels=min_pixels, max_pixels=max_pixels,
        max_words=max_words, max_per_image=max_per_image, turns=turns, seed=seed, limit=limit, overwrite=overwrite,
    )  # fmt: skip


def codes_fit(
    model: Path = typer.Option(..., help="HF model directory (its own visual features are clustered)"),
    records: Path = typer.Option(..., help="word records (JSONL) naming the training images"),
    out: Path = typer.Option(..., "--out", help="codes directory (codebook + per-image cache)"),
    k: int = typer.Option(256, help="codes per level"),
    levels: int = typer.Option(1, help="residual levels (ASVR paper: 8)"),
    iters: int = typer.Option(50, help="Lloyd iterations per level"),
    max_features: int = typer.Option(200_000, help="feature vectors sampled for fitting"),
    max_images: int = typer.Option(None, help="only the first N distinct images"),
    batch_size: int = typer.Option(8),
    min_pixels: int = typer.Option(None),
    max_pixels: int = typer.Option(None),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Fit residual k-means codebooks over the model's post-projector visual features; cache all codes."""
    from dvsft.core.outputs import add_to_marker, refuse_inputs, start_folder
    from dvsft.core.progress import progress_bar
    from dvsft.objectives.codes import CODEBOOK_FILE, META_FILE, fit_from_files, load_for_codes

    try:
        refuse_inputs([out], [model, records])
        start_folder(out, "codes", overwrite)
        model_obj, processor, paths = load_for_codes(model, records, min_pixels, max_pixels, max_images)
        with progress_bar(unit="img") as bar:
            advance = bar.counter("features", len(paths))
            codebook, _ = fit_from_files(
                model_obj, processor, paths, out, k, levels, seed, iters, max_features, batch_size, advance
            )
    except ValueError as err:
        fail(err)
    codebook.meta["model_dir"] = str(model.resolve())
    codebook.save(out)
    add_to_marker(out, "codes", [out / CODEBOOK_FILE, out / META_FILE, *(out / "cache").rglob("*.npy")])
    mse = ", ".join(f"{v:.4g}" for v in codebook.meta["mse"])
    print(f"codebook k={k} levels={levels} dim={codebook.dim} id={codebook.id} -> {out}; residual MSE per level {mse}")


def codes_encode(
    codes: Path = typer.Option(..., help="codes directory written by `dvsft codes fit`"),
    records: Path = typer.Option(..., help="word records (JSONL)"),
    model: Path = typer.Option(None, help="model directory (default: the one the codebook was fitted on)"),
    batch_size: int = typer.Option(8),
    min_pixels: int = typer.Option(None),
    max_pixels: int = typer.Option(None),
    max_images: int = typer.Option(None),
) -> None:
    """Encode every image of the records into the cache (cached images are only read)."""
    from dvsft.core.progress import progress_bar
    from dvsft.objectives.codes import Codebook, Encoder, load_for_codes

    try:
        codebook = Codebook.load(codes)
        model = model or Path(codebook.meta.get("model_dir", ""))
        min_pixels = min_pixels or codebook.meta.get("min_pixels")
        max_pixels = max_pixels or codebook.meta.get("max_pixels")
        model_obj, processor, paths = load_for_codes(model, records, min_pixels, max_pixels, max_images)
        enc = Encoder(model_obj, processor, codebook, codes)
        if not enc.fingerprint_matches:
            typer.secho("warning: the model's vision tower differs from the one the codebook was fitted on", err=True)
        with progress_bar(unit="img") as bar:
            out = enc.encode_files(paths, batch_size, bar.counter("encode", len(paths)))
    except ValueError as err:
        fail(err)
    n_tokens = sum(len(c) for c in out)
    print(f"{len(out)} images, {n_tokens} visual tokens: {enc.cache.hits} cached, {enc.cache.misses} encoded")
