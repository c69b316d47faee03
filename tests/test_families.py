"""dvsft.models.families / dvsft.models.geometry.layout_for against the real transformers processors and models.

For every tiled family: the view list (tile counts, grids, token counts, order, separators) is
checked against the real PIL image processor and the real multimodal processor's expanded
prompt for 500 random sizes (at a scaled-down tile size, where the rules are the same code
with smaller constants, so the pixel pipeline runs in milliseconds), against the processors'
own count rules at the released settings, and painted-pixel probes go through the real
processor, the tiny model's patch embedding and the model's own token ordering (pixel
shuffle / ``pack_image_features``) to land in exactly the tokens ``token_at`` names.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dvsft.models.families import families, family_spec, spec_for_processor
from dvsft.models.geometry import grid_for, layout_for
from dvsft.models.loading import _image_only

N_SIZES = 500


def make_tokenizer(specials: list[str], attrs: dict[str, str] | None = None):
    """A small byte-level BPE fast tokenizer with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["what does the page say?\n\nit says hello"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", extra_special_tokens=attrs or {})


def random_sizes(rng: random.Random, n: int, small: int, large: int) -> list[tuple[int, int]]:
    """Mixed sizes: tiny, ordinary, and extreme aspect ratios (both orientations)."""
    out = []
    while len(out) < n:
        kind = rng.random()
        if kind < 0.2:
            w, h = rng.randint(1, small), rng.randint(1, small)
        elif kind < 0.8:
            w, h = rng.randint(small, large), rng.randint(small, large)
        else:
            short = rng.randint(1, large // 8)
            w, h = short, int(short * rng.uniform(3, 40))
            if rng.random() < 0.5:
                w, h = h, w
        out.append((max(w, 1), max(h, 1)))
    return out


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- registry and Qwen


def test_registry_names_and_errors():
    for name in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5", "internvl", "llava_onevision"):
        assert name in families()
    for alias, name in [("qwen3_5", "qwen3.5"), ("qwen3_vl_moe", "qwen3-vl-moe"), ("SMOLVLM", "smolvlm")]:
        assert family_spec(alias).name == name
    with pytest.raises(ValueError, match="unknown model family 'llava-1.5'"):
        family_spec("llava-1.5")
    with pytest.raises(ValueError, match="not positive"):
        layout_for("internvl", 0, 10)


@pytest.mark.parametrize("name", ["qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5"])
def test_qwen_layout_is_the_grid(name):
    rng = random.Random(name)
    for _ in range(200):
        w, h = rng.randint(1, 3000), rng.randint(1, 3000)
        if max(w, h) / min(w, h) > 200:
            continue
        g, lay = grid_for(name, w, h), layout_for(name, w, h)
        (view,) = lay.views
        assert (view.rows, view.cols, lay.num_tokens, lay.separators) == (g.rows, g.cols, g.num_tokens, ())
        for _ in range(5):
            x, y = rng.randrange(w), rng.randrange(h)
            assert lay.token_at(x, y) == [g.token_at(x, y)]
        k = rng.randrange(g.num_tokens)
        assert view.token_box(k) == pytest.approx(g.token_box(k))


def test_qwen_family_from_processor():
    from transformers import Qwen2VLImageProcessorPil

    size = {"shortest_edge": 64 * 64, "longest_edge": 512 * 512}
    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, size=size)
    assert spec_for_processor(ip).name == "qwen3-vl"
    lay = layout_for(ip, 900, 700)
    assert lay.num_tokens == grid_for(ip, 900, 700).num_tokens


# --------------------------------------------------------------------------- InternVL

INTERNVL_SMALL = {"tile_size": 28, "patch_size": 7, "downsample_ratio": 0.5, "min_tiles": 1, "max_tiles": 12}


def internvl_processor(tile: int, max_tiles: int, seq: int, min_tiles: int = 1):
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    specials = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    attrs = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    ip = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=min_tiles, max_patches=max_tiles
    )
    return _image_only(InternVLProcessor)(
        image_processor=ip, tokenizer=make_tokenizer(specials, attrs), video_processor=None, image_seq_length=seq
    )


def test_a_model_directory_gives_its_processors_layout(tmp_path):
    """A tiled family's model directory is a layout source like its loaded processor (its settings read once)."""
    import json

    from dvsft.models.families import family_source
    from dvsft.models.loading import save_processor

    proc = internvl_processor(28, 6, seq=4)
    save_processor(proc, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    found = family_source(tmp_path)
    assert found.spec.name == "internvl" and found.settings == family_source(proc).settings
    assert found.settings["tile_size"] == 28
    for w, h in [(100, 60), (30, 200), (28, 28)]:
        assert layout_for(tmp_path, w, h) == layout_for(str(tmp_path), w, h) == layout_for(proc, w, h)


def test_internvl_views_match_processor_500_sizes():
    s = INTERNVL_SMALL
    proc = internvl_processor(s["tile_size"], s["max_tiles"], seq=4)
    rng = random.Random(0)
    for w, h in random_sizes(rng, N_SIZES, 28, 300):
        lay = layout_for("internvl", w, h, **s)
        out = proc(text=["a <IMG_CONTEXT> b"], images=[Image.new("RGB", (w, h))], return_tensors="np")
        assert out["pixel_values"].shape[0] == len(lay.views), (w, h)
        kinds = [v.kind for v in lay.views]
        assert kinds == (["image"] if len(kinds) == 1 else ["tile"] * (len(kinds) - 1) + ["thumbnail"])
        assert all((v.rows, v.cols) == (2, 2) for v in lay.views)
        assert [v.offset for v in lay.views] == [4 * i for i in range(len(lay.views))]
        assert list(out["input_ids"][0]) == ids_of(proc.tokenizer, "a " + lay.prompt + " b"), (w, h)
        assert int((out["input_ids"][0] == proc.image_token_id).sum()) == lay.num_tokens
        # the tiles partition the image in row-major order
        tiles = [v for v in lay.views if v.kind == "tile"]
        if tiles:
            assert tiles[0].region[:2] == (0, 0) and tiles[-1].region[2:] == pytest.approx((w, h))


def test_internvl_released_settings_match_processor_counts():
    from transformers import GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, max_patches=12)
    assert spec_for_processor(ip).name == "internvl"
    assert family_spec("internvl").settings_from(ip)["tile_size"] == 448
    rng = random.Random(1)
    for w, h in random_sizes(rng, N_SIZES, 448, 6000):
        lay = layout_for("internvl", w, h)
        assert ip.get_number_of_image_patches(h, w) == len(lay.views), (w, h)
        assert lay.num_tokens == 256 * len(lay.views)


# --------------------------------------------------------------------------- LLaVA-OneVision

LLAVA_SMALL = {
    "crop_size": 28,
    "patch_size": 7,
    "image_grid_pinpoints": [[h, w] for h in range(28, 169, 28) for w in range(28, 169, 28)],
    "vision_aspect_ratio": "anyres_max_9",
}


def llava_processor(crop: int, pinpoints: list[list[int]], tokens: int):
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    ip = LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints)
    return _image_only(LlavaOnevisionProcessor)(
        image_processor=ip,
        tokenizer=make_tokenizer(["<image>", "<video>"]),
        video_processor=None,
        num_image_tokens=tokens,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def test_llava_onevision_views_match_processor_500_sizes():
    s = LLAVA_SMALL
    proc = llava_processor(s["crop_size"], s["image_grid_pinpoints"], tokens=16)
    rng = random.Random(2)
    shrunk = 0
    for w, h in random_sizes(rng, N_SIZES, 28, 400):
        lay = layout_for("llava_onevision", w, h, **s)
        base, crops = lay.views
        out = proc(text=["a <image> b"], images=[Image.new("RGB", (w, h))], return_tensors="np")
        assert out["pixel_values"].shape[1] == 1 + crops.crops[0] * crops.crops[1], (w, h)
        assert (base.rows, base.cols, base.offset) == (4, 4, 0)
        assert crops.offset == 16 and crops.row_stride == crops.cols + 1
        assert list(out["input_ids"][0]) == ids_of(proc.tokenizer, "a " + lay.prompt + " b"), (w, h)
        n_img = int((out["input_ids"][0] == proc.image_token_id).sum())
        assert n_img == lay.num_tokens == 16 + crops.rows * (crops.cols + 1), (w, h)
        assert lay.separators == tuple(16 + r * (crops.cols + 1) + crops.cols for r in range(crops.rows))
        shrunk += crops.rows < crops.crops[0] * 4 and crops.cols < crops.crops[1] * 4
    assert shrunk > 20  # the anyres_max shrink is exercised


def test_llava_onevision_released_settings_match_processor_counts():
    proc = llava_processor(384, family_spec("llava_onevision").defaults["image_grid_pinpoints"], tokens=729)
    settings = family_spec("llava_onevision").settings_from(proc)
    assert settings["patch_size"] == 14 and settings["crop_size"] == 384
    rng = random.Random(3)
    sizes = random_sizes(rng, N_SIZES, 384, 5000)
    counts = proc._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]
    for (w, h), n in zip(sizes, counts, strict=True):
        assert layout_for(proc, w, h).num_tokens == n, (w, h)


# --------------------------------------------------------------------------- Idefics3 / SmolVLM

IDEFICS_SMALL = {"longest_edge": 4 * 28, "tile_size": 28, "patch_size": 7, "scale_factor": 2}
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]


def idefics3_processor(longest: int, tile: int, seq: int):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    ip = Idefics3ImageProcessorPil(size={"longest_edge": longest}, max_image_size={"longest_edge": tile})
    tok = make_tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *ROW_COL])
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq)


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_idefics3_smolvlm_views_match_processor_500_sizes(name):
    from transformers import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    s = IDEFICS_SMALL
    proc = idefics3_processor(s["longest_edge"], s["tile_size"], seq=4)
    smol = SmolVLMImageProcessorPil(size={"longest_edge": s["longest_edge"]}, max_image_size={"longest_edge": 28})
    rng = random.Random(name)
    for w, h in random_sizes(rng, N_SIZES, 28, 400):
        lay = layout_for(name, w, h, **s)
        image = Image.new("RGB", (w, h))
        if name == "idefics3":
            out = proc(text=["a <image> b"], images=[image], return_tensors="np")
            assert list(out["input_ids"][0]) == ids_of(proc.tokenizer, "a " + lay.prompt + " b"), (w, h)
            assert int((out["input_ids"][0] == proc.image_token_id).sum()) == lay.num_tokens
            n_frames = out["pixel_values"].shape[1]
        else:  # SmolVLMProcessor needs num2words; its prompt rule is this module function
            info = smol(images=image, return_row_col_info=True, return_tensors="np")
            rows, cols = info["rows"][0][0], info["cols"][0][0]
            prompt = get_image_prompt_string(rows, cols, 4, "<fake_token_around_image>", "<image>", "<global-img>")
            assert prompt == lay.prompt, (w, h)
            n_frames = info["pixel_values"].shape[1]
        assert n_frames == len(lay.views), (w, h)
        assert [v.kind for v in lay.views] == ["tile"] * (len(lay.views) - 1) + ["global"]
        assert [v.offset for v in lay.views] == [4 * i for i in range(len(lay.views))]


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_idefics3_smolvlm_released_settings_match_processor_counts(name):
    from transformers import Idefics3ImageProcessorPil, SmolVLMImageProcessorPil

    d = family_spec(name).defaults
    cls = Idefics3ImageProcessorPil if name == "idefics3" else SmolVLMImageProcessorPil
    ip = cls(size={"longest_edge": d["longest_edge"]}, max_image_size={"longest_edge": d["tile_size"]})
    assert family_spec(name).settings_from(ip)["tile_size"] == d["tile_size"]
    rng = random.Random(4)
    for w, h in random_sizes(rng, N_SIZES, 64, 6000):
        lay = layout_for(name, w, h)
        n, rows, cols = ip.get_number_of_image_patches(h, w)
        assert n == (len(lay.views) if len(lay.views) > 1 else 0), (w, h)
        tiles = [v for v in lay.views if v.kind == "tile"]
        assert len(tiles) == rows * cols
        assert lay.prompt.count("<row_") == rows * cols and lay.prompt.count(f"<row_{rows}_col_{cols}>") == (n > 0)


# --------------------------------------------------------------------------- painted-pixel probes
# Mid-scale settings (InternVL / LLaVA-OneVision: tiles of 56 px, patches of 7 px; Idefics3 /
# SmolVLM: tiles of 112 px, patches of 14 px, two Lanczos resizes) so that the resampling
# kernels (bicubic: 2 px, Lanczos: 3 px, per resize) stay inside one token for many pixels.

TEXT = dict(model_type="qwen2", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
TEXT.update(num_attention_heads=2, num_key_value_heads=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def inside_one_cut(cuts, lo: float, hi: float) -> int | None | bool:
    """The index whose single cut holds [lo, hi]; None when no cut meets it; False when it straddles."""
    hit = [(a, b, k) for a, b, k in cuts if a < hi and b > lo]
    if not hit:
        return None
    if len(hit) == 1 and hit[0][0] <= lo and hi <= hit[0][1]:
        return hit[0][2]
    return False


def clean_probe(lay, x: int, y: int, margins: list[tuple[float, float]]) -> bool:
    """True when each view sees the painted pixel's blur box (pixel +- the view's margins) in one token or none."""
    for v, (mx, my) in zip(lay.views, margins, strict=True):
        c = inside_one_cut(v.x_cuts, x - mx, x + 1 + mx)
        r = inside_one_cut(v.y_cuts, y - my, y + 1 + my)
        if c is False or r is False:
            return False
    return True


def run_probes(name, settings, proc, token_changes, sizes, margin_of, per_image=3, shrink_view=None):
    """Paint one pixel black; the changed tokens (in the model's sequence order) are exactly layout.token_at."""
    rng = random.Random(name)
    checked = 0
    for w, h in sizes:
        lay = layout_for(name, w, h, **settings)
        base = Image.new("RGB", (w, h), (255, 255, 255))
        before = token_changes(proc, base, lay, None)
        margins = margin_of(lay)
        done = 0
        for _ in range(400):
            if done == per_image:
                break
            x, y = rng.randrange(w), rng.randrange(h)
            if not clean_probe(lay, x, y, margins):
                continue
            probe = base.copy()
            probe.putpixel((x, y), (0, 0, 0))
            change = token_changes(proc, probe, lay, before)
            assert change.shape == (lay.num_tokens,), (w, h)
            changed = set(np.flatnonzero(change > 1e-6).tolist())
            expected = set(lay.token_at(x, y))
            for v in lay.views:
                mine = {p for p in changed if v.local(p) is not None}
                want = {p for p in expected if v.local(p) is not None}
                if v.kind == shrink_view and want:  # bilinear shrink blends neighbours: the named one weighs most
                    (p,) = want
                    assert change[p] == max(change[q] for q in mine), (w, h, x, y, v.kind)
                else:
                    assert mine == want, (name, w, h, x, y, v.kind, v.index)
            assert not changed & set(lay.separators)
            done += 1
            checked += 1
    assert checked >= 2 * len(sizes), f"only {checked} clean probe pixels"


def test_internvl_probe_through_processor_and_tiny_model():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(VISION, image_size=[56, 56], patch_size=[7, 7])
    model = InternVLForConditionalGeneration(
        InternVLConfig(vision_config=vision, text_config=TEXT, image_token_id=5, downsample_ratio=0.5)
    ).eval()
    settings = {"tile_size": 56, "patch_size": 7, "downsample_ratio": 0.5, "max_tiles": 6}
    proc = internvl_processor(56, 6, seq=16)

    def token_changes(proc, image, lay, before):
        pv = proc.image_processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            emb = model.model.vision_tower.embeddings(pv)[:, 1:]  # the model drops CLS ("default" strategy)
            n, p2, d = emb.shape
            side = int(p2**0.5)
            tokens = model.model.pixel_shuffle(emb.reshape(n, side, side, d), scale_factor=0.5).reshape(-1, 4 * d)
        return tokens if before is None else (tokens - before).abs().amax(-1).numpy()

    def margin(lay):  # bicubic: 2 px of the tile (or of the image, when upsampling), in original pixels
        return [
            (2 * max(1.0, (v.region[2] - v.region[0]) / 56) + 1, 2 * max(1.0, (v.region[3] - v.region[1]) / 56) + 1)
            for v in lay.views
        ]

    sizes = [(300, 120), (90, 260), (200, 200), (57, 40), (420, 330), (150, 75)]
    run_probes("internvl", settings, proc, token_changes, sizes, margin)


def test_llava_onevision_probe_through_processor_and_tiny_model():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    pins = [[h, w] for h in range(56, 337, 56) for w in range(56, 337, 56)]
    vision = dict(VISION, model_type="siglip_vision_model", image_size=56, patch_size=7)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=TEXT,
        image_token_index=5,
        image_grid_pinpoints=pins,
        vision_feature_select_strategy="full",
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    settings = {"crop_size": 56, "patch_size": 7, "image_grid_pinpoints": pins}
    proc = llava_processor(56, pins, tokens=64)
    newline = torch.zeros(32)

    def token_changes(proc, image, lay, before):
        out = proc.image_processor(images=image, return_tensors="pt")
        with torch.no_grad():
            emb = model.model.vision_tower.embeddings(out["pixel_values"][0])
            (packed,), _ = model.model.pack_image_features([emb], out["image_sizes"], image_newline=newline)
        return packed if before is None else (packed - before).abs().amax(-1).numpy()

    def margin(lay):  # bicubic: 2 px of the base image / the crop canvas, in original pixels
        crops = lay.views[1]
        x0, y0, x1, y1 = crops.region
        return [
            (2 * max(1.0, lay.width / 56) + 1, 2 * max(1.0, lay.height / 56) + 1),
            (2 * max(1.0, (x1 - x0) / (56 * crops.crops[1])) + 1, 2 * max(1.0, (y1 - y0) / (56 * crops.crops[0])) + 1),
        ]

    sizes = [(600, 240), (180, 520), (400, 400), (700, 650), (660, 120)]
    run_probes("llava_onevision", settings, proc, token_changes, sizes, margin, shrink_view="crops")


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_idefics3_smolvlm_probe_through_processor_and_tiny_model(name):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    from dvsft.models.families.idefics3 import _rescale_to_max_len

    torch.manual_seed(0)
    cfg_cls, model_cls = (
        (Idefics3Config, Idefics3ForConditionalGeneration)
        if name == "idefics3"
        else (SmolVLMConfig, SmolVLMForConditionalGeneration)
    )
    text = dict(TEXT, model_type="llama")
    vision = dict(VISION, image_size=112, patch_size=14)
    model = model_cls(cfg_cls(vision_config=vision, text_config=text, image_token_id=5, scale_factor=2)).eval()
    settings = {"longest_edge": 4 * 112, "tile_size": 112, "patch_size": 14, "scale_factor": 2}
    proc = idefics3_processor(4 * 112, 112, seq=16)

    def token_changes(proc, image, lay, before):
        pv = proc.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        with torch.no_grad():
            mask = torch.ones(pv.shape[0], 8, 8, dtype=torch.bool)  # 112 / 14 patches per side
            emb = model.model.vision_model.embeddings(pv, patch_attention_mask=mask).contiguous()
            tokens = model.model.connector.pixel_shuffle(emb, 2).reshape(-1, emb.shape[-1] * 4)
        return tokens if before is None else (tokens - before).abs().amax(-1).numpy()

    def margin(lay):  # Lanczos: 3 px per resize (to 448 longest side, to whole tiles, global: to one tile)
        h1, w1 = _rescale_to_max_len(lay.height, lay.width, 448)
        out = []
        for v in lay.views:
            m = []
            for size, first, whole in (
                (lay.width, w1, v.region[2] - v.region[0]),
                (lay.height, h1, v.region[3] - v.region[1]),
            ):
                a1, a2 = size / first, whole / 112  # original pixels per pixel after each resize
                extra = 3 * max(a2, size / 112) if v.kind == "global" else 0.0
                m.append(3 * max(1.0, a1) + 3 * max(a1, a2) + extra + 1)
            out.append(tuple(m))
        return out

    sizes = [(900, 360), (300, 800), (700, 700), (1000, 500), (460, 90)]
    run_probes(name, settings, proc, token_changes, sizes, margin)
