"""CLI: `dvsft demo` and `dvsft compare` (the experiments of :mod:`dvsft.experiments`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dvsft.experiments.settings import COMPARE_PRESETS, DEMO_PRESETS


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    def demo(
        preset: str = typer.Option("cpu", help=f"size preset: {', '.join(DEMO_PRESETS)}"),
        seeds: int | None = typer.Option(None, help="seeds per method (default: the preset's, 3 on cpu)"),
        steps: int | None = typer.Option(None, help="training steps per run (default: the preset's)"),
        out: Path = typer.Option(Path("dvsft-demo"), help="output directory"),
        workers: int | None = typer.Option(None, help="runs in parallel (default: 2 on CPU, 1 on GPU)"),
        vision_lambda: float | None = typer.Option(None, help="DV-SFT vision-loss weight (default: the preset's)"),
        vision_eps: float | None = typer.Option(None, help="vision smoothing eps (default: the preset's)"),
        methods: str = typer.Option("sft,dvsft", help="methods to run (e.g. only dvsft for a lambda/eps sweep)"),
        threads: int | None = typer.Option(None, help="torch threads per run (default: cores / workers)"),
        set_: list[str] = typer.Option(
            [], "--set", help="preset override KEY=VALUE (e.g. text_steps=0, noncontextual=0.5, tiny.layers=4)"
        ),
        split: str = typer.Option("heldout", help="pages to evaluate on: heldout (the report) or val (for tuning)"),
        family: str | None = typer.Option(None, help="tiny model family (qwen3-vl, qwen3.5, internvl, …)"),
    ) -> None:
        """Train SFT and DV-SFT on rendered text with a tiny Qwen3-VL and compare how fast they learn to read."""
        from dvsft.experiments.demo import demo_preset, parse_methods, run_demo

        try:
            chosen = parse_methods(methods)
            sizes = demo_preset(preset, set_, steps, vision_lambda, vision_eps, family)
            if split not in ("heldout", "val"):
                raise ValueError(f"split must be heldout or val, got {split!r}")
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        run_demo(sizes, seeds, out, workers, chosen, threads, split)

    @app.command()
    def compare(
        preset: str = typer.Option("cpu", help=f"size preset: {', '.join(COMPARE_PRESETS)}"),
        seeds: int | None = typer.Option(None, help="seeds per method (default: the preset's)"),
        steps: int | None = typer.Option(None, help="optimizer steps per method (default: the preset's)"),
        methods: str | None = typer.Option(None, help="comma-separated subset of: " + ", ".join(_compare_methods())),
        out: Path = typer.Option(Path("dvsft-compare"), help="output directory"),
        workers: int | None = typer.Option(None, help="runs in parallel (default: 2 on CPU; 0 or 1: in this process)"),
    ) -> None:
        """Train every method (SFT, DV-SFT, BASIC, ASVR, region-task variants) on the same data and compare."""
        from dvsft.experiments.compare import run_compare

        chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        try:
            run_compare(preset, seeds, steps, chosen, out, workers)
        except ValueError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from err


def _compare_methods() -> list[str]:
    from dvsft.experiments.compare import METHODS

    return list(METHODS)
