"""dvsft.models.geometry against the real transformers image processors."""

import json
import random

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from dvsft.models.families import families, family_spec
from dvsft.models.geometry import grid_for, grid_rule, smart_resize

GRID_FAMILIES = [name for name in families() if family_spec(name).grid is not None]  # the Qwen-VL families

SETTINGS = [  # (min_pixels, max_pixels) overrides; None = the family's default
    (None, None),
    (32 * 32 * 64, 32 * 32 * 2048),
    (28 * 28 * 4, 28 * 28 * 256),
    (256 * 256, 512 * 512),
    (16 * 16, 10_000_000),
]


def processor_for(fam_name: str, min_pixels=None, max_pixels=None) -> Qwen2VLImageProcessorPil:
    fam = grid_rule(fam_name)
    return Qwen2VLImageProcessorPil(
        patch_size=fam.patch_size,
        merge_size=fam.merge_size,
        size={"shortest_edge": min_pixels or fam.min_pixels, "longest_edge": max_pixels or fam.max_pixels},
    )


def random_sizes(rng: random.Random, n: int) -> list[tuple[int, int]]:
    sizes = []
    while len(sizes) < n:
        kind = rng.random()
        if kind < 0.3:
            w, h = rng.randint(1, 64), rng.randint(1, 64)  # tiny
        elif kind < 0.6:
            w, h = rng.randint(64, 4000), rng.randint(64, 4000)  # ordinary
        elif kind < 0.8:
            w, h = rng.randint(4000, 30000), rng.randint(4000, 30000)  # huge
        else:
            short = rng.randint(1, 300)  # extreme aspect, at most 200
            w, h = short, min(short * 200, int(short * rng.uniform(20, 200)))
            if rng.random() < 0.5:
                w, h = h, w
        if max(w, h) / min(w, h) <= 200:
            sizes.append((w, h))
    return sizes


@pytest.mark.parametrize("fam_name", GRID_FAMILIES)
def test_grid_matches_processor_for_500_sizes(fam_name):
    rng = random.Random(fam_name)
    fam = grid_rule(fam_name)
    processors = {s: processor_for(fam_name, *s) for s in SETTINGS}
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for i, (w, h) in enumerate(random_sizes(rng, 500)):
        setting = SETTINGS[i % len(SETTINGS)]
        proc = processors[setting]
        g = grid_for(fam_name, w, h, *setting)
        size = proc.size
        ref_h, ref_w = hf_smart_resize(h, w, fam.cell, size["shortest_edge"], size["longest_edge"])
        assert (g.resized_height, g.resized_width) == (ref_h, ref_w), (w, h, setting)
        n_patches = proc.get_number_of_image_patches(h, w)
        assert g.num_tokens == n_patches // fam.merge_size**2, (w, h, setting)
        assert g.rows * g.cols == g.num_tokens and g.resized_width % g.cell == 0


@pytest.mark.parametrize("fam_name", GRID_FAMILIES)
def test_grid_matches_processor_output_on_real_images(fam_name):
    rng = random.Random(1 + len(fam_name))
    for _ in range(15):
        w, h = rng.randint(1, 900), rng.randint(1, 900)
        if max(w, h) / min(w, h) > 200:
            continue
        setting = SETTINGS[rng.randrange(len(SETTINGS))]
        proc = processor_for(fam_name, *setting)
        out = proc(images=Image.new("RGB", (w, h), "white"), return_tensors="np")
        g = grid_for(fam_name, w, h, *setting)
        assert tuple(out["image_grid_thw"][0]) == g.grid_thw
        assert out["pixel_values"].shape[0] == g.num_tokens * g.merge_size**2


def changed_tokens(proc, g, before: Image.Image, after: Image.Image) -> set[int]:
    """Tokens whose patches differ, using the processor's own patch order (merge² patches per token)."""
    a = proc(images=before, return_tensors="np")["pixel_values"]
    b = proc(images=after, return_tensors="np")["pixel_values"]
    per_token = np.abs(a - b).reshape(g.num_tokens, -1).max(axis=1)
    return set(np.flatnonzero(per_token > 1e-6).tolist())


@pytest.mark.parametrize("fam_name", GRID_FAMILIES)
def test_pixel_probe_lands_in_token_at(fam_name):
    rng = random.Random(7)
    checked = 0
    while checked < 12:
        w, h = rng.randint(200, 1400), rng.randint(200, 1400)
        setting = (256 * 256, 640 * 640)
        g = grid_for(fam_name, w, h, *setting)
        proc = processor_for(fam_name, *setting)
        k = rng.randrange(g.num_tokens)
        x0, y0, x1, y1 = g.token_box(k)
        # bicubic support: 2 resized pixels, i.e. 2/scale original pixels, plus rounding
        mx, my = 2 / g.scale_x + 2, 2 / g.scale_y + 2
        px0, py0, px1, py1 = int(np.ceil(x0 + mx)), int(np.ceil(y0 + my)), int(x1 - mx), int(y1 - my)
        if px1 <= px0 or py1 <= py0:
            continue
        assert {g.token_at(px0, py0), g.token_at(px1 - 1, py1 - 1)} == {k}
        base = Image.new("RGB", (w, h), (255, 255, 255))
        probe = base.copy()
        probe.paste((0, 0, 0), (px0, py0, px1, py1))
        assert changed_tokens(proc, g, base, probe) == {k}, (fam_name, w, h, k)
        checked += 1


def test_pixel_probe_through_the_real_model_patch_embedding():
    """The tiny real Qwen3-VL vision tower embeds the painted patches in exactly the named token."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[],
        ),
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    fam = grid_rule("qwen3-vl")
    proc = processor_for("qwen3-vl", 256 * 256, 512 * 512)
    w, h = 700, 420
    g = grid_for("qwen3-vl", w, h, 256 * 256, 512 * 512)
    pixel = (300, 200)
    k = g.token_at(*pixel)
    base = Image.new("RGB", (w, h), "white")
    probe = base.copy()
    probe.paste((0, 0, 0), (pixel[0] - 3, pixel[1] - 3, pixel[0] + 4, pixel[1] + 4))
    with torch.no_grad():
        embeds = [
            model.model.visual.patch_embed(torch.from_numpy(proc(images=im, return_tensors="np")["pixel_values"]))
            for im in (base, probe)
        ]
    diff = (embeds[0] - embeds[1]).abs().amax(-1).reshape(g.num_tokens, fam.merge_size**2).amax(-1)
    assert set(torch.nonzero(diff > 1e-6).flatten().tolist()) == {k}


def test_token_box_inverts_token_at():
    g = grid_for("qwen2.5-vl", 1000, 333)
    for k in range(g.num_tokens):
        x0, y0, x1, y1 = g.token_box(k)
        assert g.token_at_point((x0 + x1) / 2, (y0 + y1) / 2) == k


def test_row_major_order():
    g = grid_for("qwen3-vl", 640, 480)
    assert (g.rows, g.cols) == (15, 20)
    assert g.token_at(33, 0) == 1 and g.token_at(0, 33) == 20 and g.token_at(639, 479) == 299


@pytest.mark.parametrize(
    "w,h,match",
    [(0, 10, "not positive"), (10, -3, "not positive"), (201, 1, "aspect ratio"), (1, 1000, "aspect ratio")],
)
def test_bad_sizes_raise_clear_errors(w, h, match):
    with pytest.raises(ValueError, match=match) as err:
        grid_for("qwen3-vl", w, h)
    assert f"{w}x{h}" in str(err.value)


SUPPORTED = r"(known|supported): qwen2-vl, qwen2.5-vl, qwen3-vl, qwen3-vl-moe, qwen3.5, internvl, llava_onevision"


def test_unknown_models_are_errors_naming_the_families(tmp_path):
    """No silent Qwen default: a model no family module knows is a ValueError naming the supported families, even
    a model directory whose preprocessor_config.json reads like a Qwen one (the grid used to come from it)."""
    from transformers import SiglipImageProcessor

    from dvsft.align.aligner import align_record
    from dvsft.models.families import family_source
    from dvsft.models.geometry import layout_for

    qwen_like = {"patch_size": 14, "merge_size": 2, "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 256}}
    glm = tmp_path / "glm"
    glm.mkdir()
    (glm / "config.json").write_text(json.dumps({"model_type": "glm4v"}))
    (glm / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Glm4vImageProcessor", **qwen_like})
    )
    bare = tmp_path / "bare"  # the image processor's files alone, of an unknown image processor
    bare.mkdir()
    (bare / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    record = {"id": "r", "width": 100, "height": 80, "words": []}
    calls = [
        family_source,
        lambda s: layout_for(s, 100, 80),
        lambda s: grid_for(s, 100, 80),
        grid_rule,
        lambda s: align_record(record, s),
    ]
    for source in ["llava-1.5", glm, str(glm), bare, SiglipImageProcessor()]:
        for call in calls:
            with pytest.raises(ValueError, match=SUPPORTED):
                call(source)


def test_a_tiled_family_has_no_grid():
    with pytest.raises(ValueError, match="internvl cuts an image into views, not one grid of tokens: use layout_for"):
        grid_for("internvl", 1000, 700)
    with pytest.raises(ValueError, match="idefics3 cuts an image into views"):
        grid_rule("idefics3")


def test_out_of_image_pixel():
    with pytest.raises(ValueError, match="outside"):
        grid_for("qwen3-vl", 100, 100).token_at(100, 5)


def test_grid_from_model_directory_and_processor(tmp_path):
    cfg = {
        "image_processor_type": "Qwen2VLImageProcessorPil",
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": 128 * 128, "longest_edge": 256 * 256},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    g = grid_for(tmp_path, 1000, 800)
    assert (g.resized_height, g.resized_width) == smart_resize(800, 1000, 32, 128 * 128, 256 * 256)
    proc = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert grid_for(proc, 1000, 800) == g
    out = proc(images=Image.new("RGB", (1000, 800)), return_tensors="np")
    assert tuple(out["image_grid_thw"][0]) == g.grid_thw
    assert grid_for(tmp_path, 1000, 800, max_pixels=512 * 512).num_tokens > g.num_tokens
