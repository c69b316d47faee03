"""The demo's forward and backward with Qwen's patch embedding as nn.Conv3d and as one matrix product.

Usage: python scripts/bench_patch_conv.py [--blocks 40] [--pages 8] [--repeats 3]

The tiny Qwen3-VL of the `cpu` demo preset runs the forward and backward of its loss on ``--pages`` demo pages
(160 x 256 px, 160 patches), one torch thread. The patch embedding alternates between PyTorch's convolution
(``nn.Conv3d``) and :class:`dvsft.models.patch_conv.PatchConv3d` block by block in the same process, so a
machine whose speed drifts slows both alike. Each repeat reports the median over ``--blocks`` blocks of the
process CPU time and the wall time per page; the last line is the median over repeats. The FLOPs are equal
both ways (one 1,536-long dot product per patch and output channel), so the bound on the ratio is a third
variant in the same alternation: the step whose patch embedding costs nothing (:class:`FreeConv3d` returns
zeros of the output's shape; every other layer runs on the same shapes). The layer alone is timed too, on
its own, for the table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from dvsft.models.patch_conv import PatchConv3d

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


class FreeConv3d(nn.Conv3d):
    """The bound of the step: a patch embedding that computes nothing (zeros of its output's shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.out_channels, 1, 1, 1)


def clocks() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def alternate(run: dict[str, Callable[[], None]], blocks: int) -> dict[str, tuple[float, float]]:
    """name -> (median CPU s, median wall s) of ``run[name]()`` over ``blocks`` alternations, after one untimed
    call of each (first-call costs would otherwise fall on whichever runs first)."""
    for fn in run.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in run}
    for _ in range(blocks):
        for name, fn in run.items():
            c0, w0 = clocks()
            fn()
            c1, w1 = clocks()
            times[name].append((c1 - c0, w1 - w0))
    return {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--pages", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from dvsft.core.records import read_jsonl
    from dvsft.data.collator import VisionCollator
    from dvsft.experiments.bench.families import demo_pages
    from dvsft.experiments.demo_eval import resolved
    from dvsft.experiments.settings import DEMO_PRESETS, page_pixels
    from dvsft.testing.tiny import build_tiny

    torch.set_num_threads(1)
    preset = DEMO_PRESETS["cpu"]
    pixels = page_pixels(preset)
    model, processor = build_tiny(replace(preset.tiny, min_pixels=pixels, max_pixels=pixels))
    with tempfile.TemporaryDirectory() as tmp:
        data = demo_pages(preset, args.pages, Path(tmp) / "data")
        records = resolved(list(read_jsonl(data)), data)[: args.pages]
        collate = VisionCollator(processor)
        batches = [{k: v for k, v in collate([r]).items() if k in KEYS} for r in records]
    conv = model.model.visual.patch_embed.proj
    assert type(conv) is nn.Conv3d, "the tiny model is built without dvsft's loaders: its layer is PyTorch's"

    def steps(cls: type) -> None:
        conv.__class__ = cls
        for b in batches:
            model(**b, labels=b["input_ids"]).loss.backward()
            model.zero_grad(set_to_none=True)

    x = torch.randn(160, 3, 2, 16, 16)

    def layer(cls: type) -> None:
        conv.__class__ = cls
        for _ in range(len(batches)):
            conv(x).sum().backward()

    print(f"{args.pages} demo pages, 1 thread; ms per page, medians over {args.blocks} alternating blocks")
    print(
        "| repeat | step Conv3d CPU (wall) | step linear CPU (wall) | step free CPU | ratio | bound | "
        "layer Conv3d | layer linear |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    variants = {"conv": nn.Conv3d, "linear": PatchConv3d, "free": FreeConv3d}
    ratios, rows = [], []
    for rep in range(args.repeats):
        step = alternate({k: (lambda c=c: steps(c)) for k, c in variants.items()}, args.blocks)
        one = alternate({"conv": lambda: layer(nn.Conv3d), "linear": lambda: layer(PatchConv3d)}, args.blocks)
        ms = {k: (1000 * c / len(batches), 1000 * w / len(batches)) for k, (c, w) in step.items()}
        lay = {k: 1000 * c / len(batches) for k, (c, _) in one.items()}
        ratio, bound = ms["conv"][0] / ms["linear"][0], ms["conv"][0] / ms["free"][0]
        ratios.append(ratio)
        rows.append((ms, lay, bound))
        print(
            f"| {rep + 1} | {ms['conv'][0]:.1f} ({ms['conv'][1]:.1f}) | {ms['linear'][0]:.1f} ({ms['linear'][1]:.1f})"
            f" | {ms['free'][0]:.1f} | {ratio:.3f} | {bound:.3f} | {lay['conv']:.2f} | {lay['linear']:.2f} |"
        )
    mid = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    ms, lay, bound = rows[mid]
    print(
        f"median repeat: step {ms['conv'][0]:.1f} -> {ms['linear'][0]:.1f} ms CPU ({ratios[mid]:.3f}x); "
        f"bound, the step with a patch embedding that costs nothing: {ms['free'][0]:.1f} ms ({bound:.3f}x); "
        f"the layer alone {lay['conv']:.2f} -> {lay['linear']:.2f} ms"
    )


if __name__ == "__main__":
    main()
