"""`dvsft bench families`, the demo-page sizes of the tiny families (what keeps their steps cheap), the family demo."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_cli_errors import run_cli

from dvsft.cli import app
from dvsft.experiments.settings import DEMO_PRESETS, page_pixels
from dvsft.models.geometry import layout_for
from dvsft.testing.tiny import TinyConfig, build_tiny, qwen35_layer_types

CPU = DEMO_PRESETS["cpu"]
PAGE = (CPU.cols * 32, CPU.rows * 32)  # the cpu demo page: 160 x 256 px


def demo_page_layout(family: str):
    """The view list of a cpu-preset demo page through the tiny family's real processor."""
    pixels = page_pixels(CPU)
    _, processor = build_tiny(replace(CPU.tiny, family=family, layers=1, min_pixels=pixels, max_pixels=pixels))
    return layout_for(processor, *PAGE)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_a_demo_page_is_four_tiles_and_a_whole_image_view(family):
    """2 x 2 tiles of 4 x 4 tokens of 32 px + the global image: 80 image tokens, a token row a 32-px page row."""
    lay = demo_page_layout(family)
    assert [v.kind for v in lay.views] == ["tile"] * 4 + ["global"]
    assert all((v.rows, v.cols) == (4, 4) for v in lay.views) and lay.num_tokens == 80
    assert {round(v.token_box(0)[3] - v.token_box(0)[1]) for v in lay.views[:4]} == {32}


def test_internvl_demo_page_is_two_tiles_of_page_rows_and_a_thumbnail():
    """1 x 2 tiles of 128 px (every word inside one tile, one word per token row) + the thumbnail: 48 tokens."""
    lay = demo_page_layout("internvl")
    assert [v.kind for v in lay.views] == ["tile", "tile", "thumbnail"] and lay.num_tokens == 48
    assert {round(v.token_box(0)[3] - v.token_box(0)[1]) for v in lay.views[:2]} == {32}


def test_llava_onevision_demo_page_is_a_small_base_and_crop_grid():
    """32-px patches on 128-px crops: a 4 x 4 base and an 8 x 6 crop grid of 32-px rows with its newlines."""
    lay = demo_page_layout("llava_onevision")
    base, crops = lay.views
    assert (base.kind, base.rows, base.cols) == ("base", 4, 4)
    assert (crops.kind, crops.rows, crops.cols) == ("crops", 8, 6)
    assert lay.num_tokens == 16 + 8 * 7 == 72
    assert round(crops.token_box(0)[3] - crops.token_box(0)[1]) == 32


def test_qwen35_keeps_one_gated_deltanet_layer():
    """One linear-attention layer (the CPU fallback's cost), attention in the rest; one layer: attention only."""
    assert qwen35_layer_types(1) == ["full_attention"]
    assert qwen35_layer_types(2) == ["linear_attention", "full_attention"]
    assert qwen35_layer_types(3) == ["linear_attention", "full_attention", "full_attention"]
    model, _ = build_tiny(TinyConfig(family="qwen3.5", layers=3, hidden_size=32, heads=2, kv_heads=1))
    kinds = [layer.block_type for layer in model.model.language_model.layers]
    assert kinds == ["linear_attention", "full_attention", "full_attention"]


@pytest.mark.slow
def test_bench_families_times_the_demo_step_of_each_family(tmp_path, capsys):
    out = tmp_path / "families.json"
    args = ["bench", "families", "--preset", "toy", "--families", "qwen3-vl,internvl", "--steps", "2", "--warmup", "1"]
    with pytest.raises(SystemExit) as exit_info:
        app(args=[*args, "--json", str(out)], prog_name="dvsft")
    assert exit_info.value.code in (0, None)
    assert "| internvl |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {r["family"]: r for r in report["rows"]}
    assert list(rows) == ["qwen3-vl", "internvl"] and report["preset"] == "toy"
    toy = DEMO_PRESETS["toy"]
    for family, row in rows.items():
        pixels = page_pixels(toy)
        tiny = replace(toy.tiny, family=family, min_pixels=pixels, max_pixels=pixels)
        want = layout_for(build_tiny(tiny)[1], toy.cols * 32, toy.rows * 32)
        assert (row["image_tokens"], row["views"]) == (want.num_tokens, len(want.views))
        assert row["sequence"] > row["image_tokens"] and row["vision_labels"] > 0
        assert row["timed_steps"] == 2 and row["step_cpu_s"] > 0 and row["step_wall_s"] > 0
    assert rows["qwen3-vl"]["cpu_ratio"] == 1.0
    assert rows["internvl"]["cpu_ratio"] == rows["internvl"]["step_cpu_s"] / rows["qwen3-vl"]["step_cpu_s"]


def test_bench_families_unknown_family_is_one_error_line(capsys):
    code, err = run_cli(["bench", "families", "--families", "qwen3-vl,nope"], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: unknown family 'nope'; choose from ") and "internvl" in line


def test_the_demo_report_names_the_family():
    from dvsft.experiments.demo import setup_line

    line = setup_line(replace(CPU, tiny=replace(CPU.tiny, family="internvl")), 3, None)
    assert line.startswith("Preset `cpu`: tiny internvl (3 LLM layers, hidden 128); ") and "Qwen3-VL" not in line
