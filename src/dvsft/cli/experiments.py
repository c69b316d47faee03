"""CLI commands of the experiments (:mod:`dvsft.experiments`): ``dvsft demo`` and ``dvsft compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dvsft.align.aligner import LABEL_POLICIES
from dvsft.cli.common import fail, split_list
from dvsft.experiments.compare import METHODS
from dvsft.experiments.settings import COMPARE_PRESETS, DEMO_PRESETS
from dvsft.testing.tiny import TINY_FAMILIES


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add the experiments' commands to the `dvsft` app."""
    app.command("demo")(demo)
    app.command("compare")(compare)


def demo(
    preset: Annotated[str, typer.Option(help=f"size preset: {', '.join(DEMO_PRESETS)}")] = "cpu",
    seeds: Annotated[int | None, typer.Option(help="seeds per method (default: the preset's, 3 on cpu)")] = None,
    steps: Annotated[int | None, typer.Option(help="training steps per run (default: the preset's)")] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("dvsft-demo"),
    workers: Annotated[int | None, typer.Option(help="runs in parallel (default: 2 on CPU, 1 on GPU)")] = None,
    vision_lambda: Annotated[
        float | None, typer.Option(help="DV-SFT vision-loss weight (default: the preset's)")
    ] = None,
    vision_eps: Annotated[float | None, typer.Option(help="vision smoothing eps (default: the preset's)")] = None,
    methods: Annotated[str, typer.Option(help="methods to run (e.g. only dvsft for a lambda/eps sweep)")] = "sft,dvsft",
    threads: Annotated[int | None, typer.Option(help="torch threads per run (default: cores / workers)")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="preset override KEY=VALUE (e.g. text_steps=0, noncontextual=0.5, tiny.layers=4)"),
    ] = None,
    split: Annotated[
        str, typer.Option(help="pages to evaluate on: heldout (the report) or val (for tuning)")
    ] = "heldout",
    family: Annotated[str | None, typer.Option(help=f"tiny model family: {', '.join(TINY_FAMILIES)}")] = None,
    task: Annotated[
        str, typer.Option(help="text (read rendered text) or scenes (what is where among coloured shapes)")
    ] = "text",
    label_policy: Annotated[
        str | None,
        typer.Option(help=f"DV-SFT's label policy: {', '.join(LABEL_POLICIES)} (default: the preset's)"),
    ] = None,
) -> None:
    """Train SFT and DV-SFT on rendered text (or scenes) with a tiny Qwen3-VL and compare how fast they learn."""
    from dvsft.experiments.demo import demo_preset, parse_methods, run_demo
    from dvsft.experiments.demo_scenes import run_scenes

    try:
        chosen = parse_methods(methods)
        sizes = demo_preset(preset, set_, steps, vision_lambda, vision_eps, family, task, label_policy)
        if split not in ("heldout", "val"):
            raise ValueError(f"split must be heldout or val, got {split!r}")
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    (run_scenes if task == "scenes" else run_demo)(sizes, seeds, out, workers, chosen, threads, split)


def compare(
    preset: Annotated[str, typer.Option(help=f"size preset: {', '.join(COMPARE_PRESETS)}")] = "cpu",
    seeds: Annotated[int | None, typer.Option(help="seeds per method (default: the preset's)")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps per method (default: the preset's)")] = None,
    methods: Annotated[str | None, typer.Option(help=f"comma-separated subset of: {', '.join(METHODS)}")] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("dvsft-compare"),
    workers: Annotated[
        int | None, typer.Option(help="runs in parallel (default: 2 on CPU; 0 or 1: in this process)")
    ] = None,
) -> None:
    """Train every method (SFT, DV-SFT, BASIC, ASVR, region-task variants) on the same data and compare."""
    from dvsft.experiments.compare import run_compare

    try:
        run_compare(preset, seeds, steps, split_list(methods) if methods else None, out, workers)
    except ValueError as err:
        fail(err)
