"""Tiled families (InternVL, LLaVA-OneVision, Idefics3, SmolVLM) through the DV-SFT code paths.

Tiny real models and real processors (``TinyConfig.family``, 128-px tiles): the collator finds the
family's image tokens by its own id and labels each view on its own (by default only the finest
views), the chunked loss equals the naive full-logits reference, training runs and resumes,
``dvsft eval --bench ocr`` and ``dvsft lens`` run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_grads, losses, make_records, naive_reference, overrides, three_word_pages
from typer.testing import CliRunner

from dvsft.cli import app
from dvsft.data.collator import VisionCollator
from dvsft.objectives.losses import model_loss
from dvsft.testing.tiny import TinyConfig, save_tiny
from dvsft.training.config import load_config
from dvsft.training.train import train

FAMILIES = ["internvl", "llava_onevision", "idefics3", "smolvlm"]
runner = CliRunner()


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> tuple[str, Path]:
    fam = request.param
    return fam, save_tiny(tmp_path_factory.mktemp(f"tiny_{fam}") / "model", TinyConfig(family=fam, vocab_size=512))


def records(n: int = 2) -> list[dict]:
    boxes = [[4, 4, 28, 20], [36, 36, 70, 50], [60, 70, 90, 84]]
    return three_word_pages([(160, 96), (100, 140), (130, 130)][:n], boxes)


def test_collator_labels_every_view_at_the_family_tokens(family_dir):
    from dvsft.align.aligner import AlignConfig
    from dvsft.models.families import family_spec
    from dvsft.models.loading import load_processor

    fam, path = family_dir
    processor = load_processor(path)
    collator = VisionCollator(processor, align_config=AlignConfig(views="all"))
    image_id = family_spec(fam).image_token_id(processor)
    assert collator.image_token_id == image_id
    tiled = 0
    for rec in records(3):
        enc = collator.encode(rec)
        lay = enc.layout
        positions = torch.nonzero(enc.input_ids == image_id).flatten()
        assert positions.numel() == lay.num_tokens  # the processor's tokens, as the view list says
        assert processor.tokenizer.decode(enc.labels[enc.labels != -100]) == "the value class<|im_end|>"
        labels = enc.alignment.labels
        kinds = {v.kind for v in lay.views}
        assert set(enc.alignment.per_view) == kinds
        assert sum(c["labels"] for c in enc.alignment.per_view.values()) == len(labels)
        assert {lab["view"] for lab in labels} == kinds  # every kind of view got its own labels
        for lab in labels:
            word = next(w for w in rec["words"] if w["text"] == lab["text"])
            x, y = word["box"][2] - 0.5, word["box"][3] - 0.5
            view = lay.views[lab["view_index"]]
            assert view.token_at_point(x, y) == lab["token"]  # that view's token that sees the corner
            assert lab["token"] not in lay.separators
        # vision positions are the image tokens the labels name, in sequence order
        assert enc.vision_tokens == [(int(positions[lab["token"]]), lab["token_id"]) for lab in labels]
        per_word = {}
        for lab in labels:
            per_word.setdefault(lab["text"], []).append(lab["view"])
        if len(lay.views) > 1:
            tiled += 1
            assert any(len(v) > 1 for v in per_word.values())  # one word, several views
    assert tiled  # a page of several views among them


def test_finest_views_label_each_word_where_it_is_largest(family_dir):
    """The default ``views="finest"``: a word is labeled only in the views that show it at the finest scale (the tiles
    or crops, not the thumbnail / global / base image of the same text), exactly the fine-view labels of ``all``."""
    from dvsft.align.aligner import AlignConfig
    from dvsft.models.loading import load_processor

    _, path = family_dir
    processor = load_processor(path)
    every = VisionCollator(processor, align_config=AlignConfig(views="all"))
    finest = VisionCollator(processor)
    coarse_labels = 0
    for rec in records(3):
        both = every.encode(rec)
        scale = {v.index: v.pixels_per_token for v in both.layout.views}
        all_labels = both.alignment.labels
        enc = finest.encode(rec)
        best = {}
        for lab in all_labels:
            best[lab["text"]] = min(best.get(lab["text"], float("inf")), scale[lab["view_index"]])
        want = [lab for lab in all_labels if scale[lab["view_index"]] == best[lab["text"]]]
        assert enc.alignment.labels == want
        assert {lab["text"] for lab in enc.alignment.labels} == {lab["text"] for lab in all_labels}  # no word lost
        coarse = len(all_labels) - len(want)
        coarse_labels += coarse
        assert sum(c.get("coarser_view", 0) for c in enc.alignment.per_view.values()) == coarse
        assert enc.alignment.dropped.get("coarser_view", 0) == coarse
    assert coarse_labels > 0  # the coarse views did label these words under "all"


def test_collator_count_mismatch_names_the_record(family_dir, monkeypatch):
    import dvsft.data.collator as collator_module
    from dvsft.models.geometry import layout_for
    from dvsft.models.loading import load_processor

    _, path = family_dir
    collator = VisionCollator(load_processor(path))
    real = layout_for

    def one_view_short(source, w, h, **kw):  # geometry that disagrees with the processor
        lay = real(source, w, h, **kw)
        return type(lay)(lay.family, w, h, lay.views[:-1], lay.num_tokens - lay.views[-1].num_slots, lay.prompt)

    monkeypatch.setattr(collator_module, "layout_for", one_view_short)
    with pytest.raises(ValueError, match=r"record r0: the processor made \d+ .* image tokens .* view list has"):
        collator(records(1))


@pytest.mark.slow
def test_tiled_loss_matches_full_logits_reference(family_dir):
    from dvsft.models.loading import load_model, load_processor

    _, path = family_dir
    model, processor = load_model(path, dtype=torch.float64), load_processor(path)
    batch = VisionCollator(processor)(records(2))
    eps, lam = 0.2, 0.5
    out = model_loss(model, batch, vision_weight=lam, eps=eps, chunk_size=3)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images", "pixel_attention_mask")
    inputs = {k: batch[k] for k in keys if k in batch}
    inputs["pixel_values"] = inputs["pixel_values"].double()
    logits = model(**inputs).logits  # the naive path: every position's full-vocabulary logits
    ref, t_ref, v_ref = naive_reference(logits, batch, lam, eps)
    assert out.n_vision == 6 and out.n_text > 0  # each of the six words in its finest view
    assert torch.allclose(out.loss, ref, atol=1e-10)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    assert_same_grads(params, got, want)


@pytest.mark.slow
def test_tiled_trains_and_resumes(family_dir, tmp_path):
    from transformers import TrainerCallback

    from dvsft.models.loading import load_model

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                control.should_training_stop = True

    fam, path = family_dir
    data = make_records(tmp_path / "data", n=2, seed=5)
    args = dict(max_steps=2, save_steps=1)
    full = train(load_config(None, overrides(path, data, tmp_path / "a", **args)))
    vision, text = losses(full.log, "vision_loss"), losses(full.log, "text_loss")
    assert all(row["vision_tokens"] > 0 for row in full.log if "vision_tokens" in row)
    assert vision[-1] < vision[0] and text[-1] < text[0], (vision, text)
    assert load_model(full.final_dir).config.model_type == fam
    part = overrides(path, data, tmp_path / "b", **args, save_final=False)
    first = train(load_config(None, part), callbacks=[Stop()])
    assert losses(first.log) == pytest.approx(losses(full.log)[:1], abs=1e-6)
    resumed = train(load_config(None, [*part, "--resume"]))
    assert losses(resumed.log) == pytest.approx(losses(full.log), abs=1e-5)


@pytest.mark.slow
def test_tiled_eval_ocr_and_lens_run(family_dir, tmp_path):
    from test_benchmarks import word_records

    _, path = family_dir
    ocr = word_records(tmp_path / "ocr" / "words.jsonl", transcription=True)
    out = tmp_path / "eval"
    args = ["eval", "--model", str(path), "--bench", "ocr", "--data", str(ocr), "--out", str(out)]
    result = runner.invoke(app, [*args, "--max-new-tokens", "3", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert len((out / "ocr" / "predictions.jsonl").read_text().splitlines()) == 3
    lens_out = tmp_path / "lens"
    result = runner.invoke(app, ["lens", "--model", str(path), "--records", str(ocr), "--out", str(lens_out)])
    assert result.exit_code == 0, result.output
    acc = json.loads((lens_out / "accuracy.json").read_text())
    assert acc["n"] > 0 and 0.0 <= acc["top1"] <= 1.0
    entry = json.loads((lens_out / "lens.json").read_text())["records"][0]
    assert {t["view"] for t in entry["tokens"]} == {v["kind"] for v in entry["views"]}
    assert Path(entry["overlay"]).is_file()


def test_align_and_stats_report_per_view_kind(family_dir, tmp_path):
    """`dvsft align --family <model dir>` writes each record's view list and per-view labels; `dvsft stats`
    reports labels, tokens and drops per view kind."""
    from test_benchmarks import word_records

    from dvsft.core.records import read_jsonl
    from dvsft.models.geometry import layout_for
    from dvsft.models.loading import load_processor

    _, path = family_dir
    words = word_records(tmp_path / "w" / "words.jsonl")
    out = tmp_path / "aligned.jsonl"
    result = runner.invoke(
        app, ["align", str(words), "--out", str(out), "--family", str(path), "--tokenizer", str(path)]
    )
    assert result.exit_code == 0, result.output
    rows = list(read_jsonl(out))
    lay = layout_for(load_processor(path), 160, 64)
    for row in rows:
        assert [v["kind"] for v in row["views"]] == [v.kind for v in lay.views]
        assert row["visual_tokens"] == sum(v.num_tokens for v in lay.views)
        assert all(
            lab["token"] == lay.views[lab["view_index"]].token_at_point(*corner(row, lab))
            for lab in row["vision_labels"]
        )
    result = runner.invoke(app, ["stats", str(out), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    per_view = stats["per_view"]
    assert set(per_view) == {v.kind for v in lay.views}
    assert sum(v["vision_labels"] for v in per_view.values()) == stats["vision_labels"] > 0
    assert sum(v["visual_tokens"] for v in per_view.values()) == stats["visual_tokens"]


def corner(row: dict, lab: dict) -> tuple[float, float]:
    box = next(w["box"] for w in row["words"] if w["text"] == lab["text"])
    return box[2] - 0.5, box[3] - 0.5


TRUE_SETTINGS = {  # what the tiny models really do (128-px tiles; 16-px patches, LLaVA-OneVision 32-px)
    "internvl": {"tile_size": 128, "patch_size": 16, "downsample_ratio": 0.5, "max_tiles": 2},
    "llava_onevision": {"crop_size": 128, "patch_size": 32},
    "idefics3": {"longest_edge": 256, "tile_size": 128, "patch_size": 16, "scale_factor": 2},
    "smolvlm": {"longest_edge": 256, "tile_size": 128, "patch_size": 16, "scale_factor": 2},
}


def test_layout_from_the_saved_processor_is_the_models_geometry(family_dir):
    """Settings read back from the saved processor give the token cells of the model's real patch and
    merge sizes (a tile that is no multiple of the released patch must not leave a strip unseen)."""
    import random

    from dvsft.models.geometry import layout_for
    from dvsft.models.loading import load_processor
    from dvsft.testing.tiny_tiled import PINPOINTS

    fam, path = family_dir
    processor = load_processor(path)
    truth = dict(TRUE_SETTINGS[fam])
    if fam == "llava_onevision":
        truth["image_grid_pinpoints"] = PINPOINTS
    rng = random.Random(1)
    for _ in range(200):
        w, h = rng.randint(1, 400), rng.randint(1, 400)
        got, want = layout_for(processor, w, h), layout_for(fam, w, h, **truth)
        assert got.num_tokens == want.num_tokens and got.prompt == want.prompt
        for a, b in zip(got.views, want.views, strict=True):
            assert (a.kind, a.offset, a.rows, a.cols) == (b.kind, b.offset, b.rows, b.cols)
            for cuts_a, cuts_b in ((a.x_cuts, b.x_cuts), (a.y_cuts, b.y_cuts)):
                flat_a, flat_b = [v for c in cuts_a for v in c], [v for c in cuts_b for v in c]
                assert flat_a == pytest.approx(flat_b), (fam, w, h, a.kind)
