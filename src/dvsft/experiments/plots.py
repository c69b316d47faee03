"""The experiments' figures: learning curves over training steps (demo) and bars per metric (compare)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, title: str, title_size: float | None, dpi: int) -> None:
    fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)


def plot_curves(
    rows: list[dict],
    panels: Sequence[tuple[str, str]],
    methods: dict[str, tuple[str, str]],
    path: Path,
    title: str,
    grid: tuple[int, int] = (2, 4),
) -> None:
    """One panel per ``(key, title)``: the metric's mean over seeds per step and method, band = min..max.

    ``methods``: method -> (label, colour). Keys ending in ``cer`` are clipped at 1.2, the others drawn on 0..1.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(*grid, figsize=(17, 7.5))
    for ax, (key, panel_title) in zip(axes.flat, panels, strict=True):
        for method, (label, colour) in methods.items():
            mine = [r for r in rows if r["method"] == method and key in r]
            steps = sorted({r["step"] for r in mine})
            if not steps:
                continue
            vals = [[r[key] for r in mine if r["step"] == s] for s in steps]
            mean = [statistics.fmean(v) for v in vals]
            ax.plot(steps, mean, marker="o", color=colour, label=label)
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=colour, alpha=0.2)
        if key.endswith("cer"):  # an untrained model can babble far past the reference
            ax.set_ylim(0, min(1.2, ax.get_ylim()[1]))
        else:
            ax.set_ylim(0, 1)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    _save(fig, path, title, None, 100)


def plot_bars(
    summary: dict[str, dict[str, dict[str, float]]],
    methods: Sequence[str],
    metrics: Sequence[tuple[str, str, bool]],
    path: Path,
    title: str,
) -> None:
    """One bar chart per ``(key, title, higher is better)`` metric: mean ± std over seeds of each method, in %."""
    plt = _pyplot()
    shown = [m for m in methods if m in summary]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 4.2), sharey=False)
    colors = plt.get_cmap("tab10")
    for ax, (key, name, higher) in zip(axes, metrics, strict=True):
        means = [100 * summary[m].get(key, {}).get("mean", float("nan")) for m in shown]
        stds = [100 * summary[m].get(key, {}).get("std", 0.0) for m in shown]
        ax.bar(range(len(shown)), means, yerr=stds, color=[colors(i % 10) for i in range(len(shown))], capsize=3)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{name} ({'↑' if higher else '↓'}, %)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(bottom=0)
    _save(fig, path, title, 10, 110)
