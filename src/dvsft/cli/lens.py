"""CLI commands of this stage: ``dvsft lens``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] or "record"


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this stage's commands to the `dvsft` app and its `bench` group."""

    @app.command()
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
        import itertools

        import torch
        from rich.console import Console
        from rich.progress import Progress

        from dvsft.core.records import image_path, read_jsonl
        from dvsft.evaluation.items import open_image
        from dvsft.lens.visual_logits import lens_overlay, run_lens, vision_label_accuracy
        from dvsft.models.loading import load_model, load_processor

        console = Console()
        if (image is None) == (records is None):
            console.print("[red]error:[/red] pass exactly one of --image or --records")
            raise typer.Exit(code=2)
        if top_k < 1:
            raise typer.BadParameter("--top-k must be >= 1")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            mdl = load_model(model).to(device).eval()
            proc = load_processor(model, min_pixels=min_pixels, max_pixels=max_pixels)
            out.mkdir(parents=True, exist_ok=True)
            if image is not None:
                img = open_image(image, str(image))
                result = run_lens(mdl, proc, img, top_k=top_k)
                overlay = out / "lens.png"
                lens_overlay(img, result.geometry, result.top1_texts(), upscale=upscale).save(overlay)
                (out / "lens.json").write_text(
                    json.dumps({"image": str(image), **result.to_json()}, ensure_ascii=False, indent=1)
                )
                n = result.layout.num_tokens if result.layout is not None else result.grid.num_tokens
                console.print(f"wrote {overlay} and {out / 'lens.json'} ({n} visual tokens)")
                return
            rows = list(itertools.islice(read_jsonl(records), limit))
            entries = []
            with Progress(console=console) as prog:
                task = prog.add_task("lens", total=len(rows))

                def on_record(record, result, labels):
                    rid = str(record.get("id", len(entries)))
                    top1 = [ids[0] for ids in result.top_ids]
                    correct = {k: top1[k] == v for k, v in labels.items()}
                    img = open_image(image_path(record, records), rid)
                    path = out / "overlays" / f"{len(entries):05d}_{_safe(rid)}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    lens_overlay(img, result.geometry, result.top1_texts(), correct, upscale=upscale).save(path)
                    data = result.to_json()
                    for tok in data["tokens"]:
                        tok["top"] = tok["top"][:top_k]
                        if tok["token"] in labels:
                            tok["label_id"] = labels[tok["token"]]
                    entries.append({"id": rid, "image": record["image"], "overlay": str(path), **data})
                    prog.advance(task)

                acc = vision_label_accuracy(mdl, proc, rows, records, on_record=on_record, top_k=top_k)
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(code=2) from err
        (out / "lens.json").write_text(json.dumps({"records": entries}, ensure_ascii=False))
        (out / "accuracy.json").write_text(json.dumps({"records": str(records), **acc}, indent=2))
        console.print(
            f"vision-label accuracy over {acc['n']} labeled tokens in {acc['images']} images: "
            f"top-1 {acc['top1']:.4f}, top-5 {acc['top5']:.4f}"
        )
        console.print(f"wrote {out / 'lens.json'}, {out / 'accuracy.json'} and {len(entries)} overlays")
