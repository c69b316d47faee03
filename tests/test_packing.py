"""Sequence packing (issue #25): samples with their images bin-packed into sequences, each keeping its own position ids
(Qwen's M-RoPE from the model's get_rope_index per sample) and attending within itself, give the loss, text loss,
vision loss and gradients of the unpacked batch; `dvsft train --packing true` logs the first-step losses of
`--packing false`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_grads, losses, make_records, overrides, three_word_pages

from dvsft.data.collator import VisionCollator
from dvsft.data.packing import (
    PACKED,
    PackedSamples,
    PackingCollator,
    best_fit_decreasing,
    packed_inputs,
    packed_position_ids,
)
from dvsft.models.families import spec_for_model
from dvsft.models.loading import load_processor
from dvsft.objectives.base import model_inputs
from dvsft.objectives.losses import model_loss
from dvsft.testing.tiny import TinyConfig, build_tiny
from dvsft.training.config import ConfigError, load_config
from dvsft.training.train import prepare, train

SLOW = ("qwen3-vl-moe", "internvl", "llava_onevision", "idefics3", "smolvlm")
FAMILIES = ["qwen3-vl", *(pytest.param(f, marks=pytest.mark.slow) for f in ("qwen3.5", *SLOW))]
BOXES = [[4, 4, 28, 28], [36, 36, 60, 60], [70, 4, 94, 28]]


def test_best_fit_decreasing_puts_each_sample_in_the_fullest_bin_it_fits():
    lengths = [5, 3, 7, 2, 4]
    # 7 opens bin 0 (3 left), 5 bin 1 (5 left), 4 fits bin 1 only, 3 fills bin 0, 2 fits nowhere: bin 2
    assert best_fit_decreasing(lengths, 10) == [[1, 2], [0, 4], [3]]
    bins = best_fit_decreasing([9, 1, 8, 2, 2, 7, 3, 5, 5], 10)
    assert sorted(i for b in bins for i in b) == list(range(9)) and len(bins) == 5  # 42 tokens: 5 bins is optimal
    assert all(sum([9, 1, 8, 2, 2, 7, 3, 5, 5][i] for i in b) <= 10 for b in bins)
    with pytest.raises(ValueError, match="sample 0 has 11 tokens, more than the packed length 10"):
        best_fit_decreasing([11], 10)


def mixed_samples() -> list[dict]:
    """Pages of four sizes with answers of different lengths, and a text-only sample."""
    pages = three_word_pages([(160, 96), (96, 64), (128, 128), (96, 96)], BOXES)
    answers = ["the value class", "the", "the value class and the value class again", "value"]
    for page, answer in zip(pages, answers, strict=True):
        page["messages"][1]["content"] = answer
    chat = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "the old cat sat on a mat"}]
    return [*pages[:2], {"id": "chat", "messages": chat}, *pages[2:]]


def loss_and_grads(model, batch, params):
    out = model_loss(model, batch, vision_weight=0.5, eps=0.1, chunk_size=7)
    return out, torch.autograd.grad(out.loss, params, allow_unused=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_gives_the_unpacked_losses_and_gradients(family):
    """Two packed rows (three samples and two, one text-only) against the five samples padded (float64)."""
    model, processor = build_tiny(TinyConfig(family=family, vocab_size=512))
    model = model.double().train()
    if family == "qwen3-vl-moe":
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    samples, collator = mixed_samples(), VisionCollator(processor)
    flat = collator(samples)
    packed = PackingCollator(collator)([samples[:3], samples[3:]])
    assert packed["input_ids"].shape[0] == 2 and packed[PACKED].tolist()[1][2] == 0
    real = flat["attention_mask"].bool()
    assert torch.equal(packed["input_ids"][packed["attention_mask"].bool()], flat["input_ids"][real])
    assert packed["input_ids"].numel() < flat["input_ids"].numel()
    pos = packed["vision_positions"]
    assert torch.equal(packed["input_ids"][pos[:, 0], pos[:, 1]], flat["input_ids"][tuple(flat["vision_positions"].T)])

    spec = spec_for_model(model)
    if spec.prepare_packing is not None:  # Qwen3.5: the position ids alone let the DeltaNet state run across samples
        inputs = {k: v for k, v in model_inputs(packed).items() if k != "attention_mask"}
        with torch.no_grad():
            leaky = model(**inputs, position_ids=packed_position_ids(model, packed)).logits
            apart = model(**packed_inputs(model, packed, model_inputs(packed))).logits
        assert not torch.allclose(leaky, apart, atol=1e-6)

    params = [p for p in model.parameters() if p.requires_grad]
    want, want_grads = loss_and_grads(model, flat, params)
    got, got_grads = loss_and_grads(model, packed, params)
    assert (got.n_text, got.n_vision) == (want.n_text, want.n_vision) and want.n_vision >= 12
    for name in ("loss", "text_loss", "vision_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)
    if family == "qwen3.5":  # transformers' torch Gated DeltaNet computes in float32 whatever the model's dtype
        for a, b in zip(got_grads, want_grads, strict=True):
            assert (a is None) == (b is None)
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    else:
        assert_same_grads(params, got_grads, want_grads)


def test_each_packed_sample_keeps_its_unpacked_mrope_positions():
    """The packed rows' M-RoPE positions are those get_rope_index gives each sample in the padded batch; the text row
    counts 0 .. n-1 per sample, so transformers' mask keeps each sample's attention inside it."""
    model, processor = build_tiny(TinyConfig(vocab_size=512))
    samples, collator = mixed_samples(), VisionCollator(processor)
    flat = collator(samples)
    packed = PackingCollator(collator)([samples[:3], samples[3:]])
    want, _ = model.model.get_rope_index(
        flat["input_ids"], flat["mm_token_type_ids"], flat["image_grid_thw"], attention_mask=flat["attention_mask"]
    )
    got = packed_position_ids(model, packed)
    assert got.shape == (4, 2, packed["input_ids"].shape[1])
    real = packed["attention_mask"].bool()
    assert torch.equal(got[1:][:, real], want[:, flat["attention_mask"].bool()])
    ends = packed[PACKED][0].cumsum(0).tolist()
    counts = [list(range(e - s)) for s, e in zip([0, *ends[:-1]], ends, strict=True)]
    assert got[0, 0, : ends[-1]].tolist() == sum(counts, [])


def mixed_records(folder: Path) -> Path:
    """Six rendered pages of two sizes (3x2 and 4x3 token cells) with answers of different lengths."""
    rows = []
    for k, (cols, n_rows) in enumerate([(3, 2), (4, 3)]):
        path = make_records(folder / f"size{k}", n=3, cols=cols, rows=n_rows, seed=k)
        for i, line in enumerate(path.read_text().splitlines()):
            row = json.loads(line)
            row.update(id=f"s{k}-{i}", image=str(path.parent / row["image"]))
            row["messages"][1]["content"] = " ".join(w["text"] for w in row["words"][: 1 + 2 * i])
            rows.append(row)
    out = folder / "mixed.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.slow
def test_dvsft_train_logs_the_same_first_step_losses_packed(tiny_dir, tmp_path):
    """One optimizer step over all six samples: padded in one batch of 6, or packed into bins of max_length tokens
    (every bin in the step's batch), logs the same loss, text loss and vision loss."""
    data = mixed_records(tmp_path)
    collator = VisionCollator(load_processor(tiny_dir), min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16)
    lengths = [int(collator.check(json.loads(x)).input_ids.numel()) for x in data.read_text().splitlines()]
    capacity = max(lengths) + min(lengths) + 1
    bins = best_fit_decreasing(lengths, capacity)
    assert 1 < len(bins) < 6 and any(len(b) > 1 for b in bins)
    run = {"max_steps": 1, "save_final": False, "logging_steps": 1}
    plain = train(load_config(None, overrides(tiny_dir, data, tmp_path / "a", per_device_train_batch_size=6,
                                              global_batch_size=6, **run)))  # fmt: skip
    packed_args = dict(per_device_train_batch_size=len(bins), global_batch_size=len(bins), max_length=capacity, **run)
    packed = train(load_config(None, [*overrides(tiny_dir, data, tmp_path / "b", **packed_args), "--packing", "true"]))
    for key in ("loss", "text_loss", "vision_loss", "text_tokens", "vision_tokens"):
        assert losses(packed.log, key) == pytest.approx(losses(plain.log, key), rel=1e-5), key
    samples = [row["samples_per_s"] / row["tokens_per_s"] for row in (plain.log[0], packed.log[0])]
    assert samples[0] == pytest.approx(samples[1], rel=1e-6)  # both steps count six samples and their real tokens


def test_packing_refuses_streaming_and_objectives_that_read_samples_by_row(tiny_dir, train_records, tmp_path):
    with pytest.raises(ConfigError, match="packing bins the samples by the lengths measured at load, which streaming"):
        load_config(None, ["--model", str(tiny_dir), "--data", str(train_records), "--packing", "true",
                           "--streaming", "true", "--max_steps", "1"])  # fmt: skip
    args = overrides(tiny_dir, train_records, tmp_path / "lsd", method="dvsft+lsd", max_steps=1)
    with pytest.raises(ValueError, match="packing: a packed row holds several samples, and lsd reads each sample"):
        prepare(load_config(None, [*args, "--packing", "true"]))


def test_packed_samples_fill_their_bins():
    samples = [{"id": str(i)} for i in range(5)]
    packed = PackedSamples(samples, [5, 3, 7, 2, 4], 10)
    assert len(packed) == 3 and [s["id"] for s in packed[0]] == ["1", "2"]
    assert packed.fill() == pytest.approx(21 / 30)


@pytest.mark.slow
def test_bench_packing_runs_the_same_tokens_with_less_padding():
    from dvsft.experiments.bench.packing import PackingBenchConfig, bench_packing, markdown_table

    report = bench_packing(PackingBenchConfig(samples=8, hidden_size=32, layers=1, repeats=1, max_lengths=(768,)))
    padded, packed = report["results"]["padded"], report["results"]["packed 768"]
    assert padded["real_tokens"] == packed["real_tokens"] and packed["model_tokens"] < padded["model_tokens"]
    assert packed["padding_share"] == 0 < padded["padding_share"]  # one packed row per batch: nothing to pad
    assert all(r["cpu_s"] > 0 and r["tokens_per_s_cpu"] > 0 for r in (padded, packed))
    assert "| packed 768 |" in markdown_table(report)
