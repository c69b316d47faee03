"""CLI: `dvsft tasks granvit|finevit`, `dvsft codes fit|encode`, `dvsft compare`."""

from __future__ import annotations

from pathlib import Path

import typer

COORDS_HELP = "box format: relative (GranViT, 3 decimals), qwen2-vl, qwen2.5-vl (resized pixels), qwen3-vl (0-1000)"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _codec(coords: str, model: Path | None, min_pixels: int | None, max_pixels: int | None):
    from dvsft.sources.region_tasks import BoxCodec

    source = str(model) if model is not None else (coords if coords == "qwen2.5-vl" else None)
    return BoxCodec(coords, source=source, min_pixels=min_pixels, max_pixels=max_pixels)


def _run_tasks(records: Path, out: Path, config, limit: int | None) -> None:
    from dvsft.sources.region_tasks import build_task_file

    try:
        stats = build_task_file(records, out, config, limit=limit)
    except ValueError as err:
        _fail(str(err))
    print(
        f"{stats['records']} task records ({stats['qa']} QA pairs) from {stats['images']} images -> {out}; "
        f"{stats['regions']} regions, {stats['duplicates']} skipped as duplicate captions"
    )


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    tasks_app = typer.Typer(no_args_is_help=True, help="Region-task QA records from word records (GranViT, FineViT).")
    codes_app = typer.Typer(no_args_is_help=True, help="ASVR targets: k-means codes of the model's visual features.")
    app.add_typer(tasks_app, name="tasks")
    app.add_typer(codes_app, name="codes")

    @tasks_app.command("granvit")
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
    ) -> None:
        """GranViT Bbox2Caption / Caption2Bbox QA (verbatim templates) over phrases of the OCR words."""
        from dvsft.sources.region_tasks import TaskConfig

        try:
            cfg = TaskConfig(
                tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                level="phrase",
                max_words=max_words,
                codec=_codec(coords, model, min_pixels, max_pixels),
                max_per_image=max_per_image,
                turns=turns,
                seed=seed,
            )
        except ValueError as err:
            _fail(str(err))
        _run_tasks(records, out, cfg, limit)

    @tasks_app.command("finevit")
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
    ) -> None:
        """FineViT region OCR QA: bbox-to-ocr and ocr-to-bbox at word or phrase level."""
        from dvsft.sources.region_tasks import TaskConfig

        try:
            cfg = TaskConfig(
                tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                level=level,
                max_words=max_words,
                codec=_codec(coords, model, min_pixels, max_pixels),
                max_per_image=max_per_image,
                turns=turns,
                seed=seed,
            )
            if level not in ("word", "phrase"):
                raise ValueError(f"--level must be word or phrase, got {level!r}")
        except ValueError as err:
            _fail(str(err))
        _run_tasks(records, out, cfg, limit)

    @codes_app.command("fit")
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
    ) -> None:
        """Fit residual k-means codebooks over the model's post-projector visual features; cache all codes."""
        from dvsft.objectives.codes import fit_from_files

        model_obj, processor, paths = _load_for_codes(model, records, min_pixels, max_pixels, max_images)
        with _progress(len(paths), "features") as advance:
            try:
                codebook, _ = fit_from_files(
                    model_obj, processor, paths, out, k, levels, seed, iters, max_features, batch_size, advance
                )
            except ValueError as err:
                _fail(str(err))
        codebook.meta["model_dir"] = str(model.resolve())
        codebook.save(out)
        mse = ", ".join(f"{v:.4g}" for v in codebook.meta["mse"])
        print(
            f"codebook k={k} levels={levels} dim={codebook.dim} id={codebook.id} -> {out}; residual MSE per level {mse}"
        )

    @codes_app.command("encode")
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
        from dvsft.objectives.codes import Codebook, Encoder

        try:
            codebook = Codebook.load(codes)
        except ValueError as err:
            _fail(str(err))
        model = model or Path(codebook.meta.get("model_dir", ""))
        min_pixels = min_pixels or codebook.meta.get("min_pixels")
        max_pixels = max_pixels or codebook.meta.get("max_pixels")
        model_obj, processor, paths = _load_for_codes(model, records, min_pixels, max_pixels, max_images)
        enc = Encoder(model_obj, processor, codebook, codes)
        if not enc.fingerprint_matches:
            typer.secho("warning: the model's vision tower differs from the one the codebook was fitted on", err=True)
        with _progress(len(paths), "encode") as advance:
            try:
                out = enc.encode_files(paths, batch_size, advance)
            except ValueError as err:
                _fail(str(err))
        n_tokens = sum(len(c) for c in out)
        print(f"{len(out)} images, {n_tokens} visual tokens: {enc.cache.hits} cached, {enc.cache.misses} encoded")

    from dvsft.experiments.compare import register_compare

    register_compare(app, bench_app)


def _load_for_codes(model: Path, records: Path, min_pixels, max_pixels, max_images):
    from dvsft.core.records import image_path, read_jsonl
    from dvsft.models.loading import load_model, load_processor

    if not (model / "config.json").is_file():
        _fail(f"{model}: not a model directory (no config.json)")
    if not records.is_file():
        _fail(f"{records}: no such records file")
    paths, seen = [], set()
    for n, rec in enumerate(read_jsonl(records)):
        if "image" not in rec:
            _fail(f"{records}: record {rec.get('id', n)!r} has no 'image' field")
        p = image_path(rec, records).resolve()
        if p not in seen:
            seen.add(p)
            paths.append(p)
        if max_images is not None and len(paths) >= max_images:
            break
    size = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    model_obj = load_model(model).eval()
    return model_obj, load_processor(model, **size), paths


class _progress:
    """A rich progress bar; ``with _progress(n, label) as advance: advance(k)``."""

    def __init__(self, total: int, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.total = total

    def __enter__(self):
        self.bar.start()
        task = self.bar.add_task("", total=self.total)
        return lambda k=1: self.bar.advance(task, k)

    def __exit__(self, *exc):
        self.bar.stop()
