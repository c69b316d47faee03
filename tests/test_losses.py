"""dvsft.objectives.losses against naive full-logits references (float64), and the API example script."""

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import assert_same_grads, collated_batch, naive_reference, naive_vision

from dvsft.objectives import losses
from dvsft.objectives.losses import dvsft_loss, fused_linear_ce, model_loss, text_loss, vision_loss

ROOT = Path(__file__).resolve().parents[1]


def problem(n=9, d=6, v=13, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.nn.Linear(d, v, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, dtype=torch.float64, generator=g))
        if bias:
            head.bias.copy_(torch.randn(v, dtype=torch.float64, generator=g))
    # two "images": tokens 0..4 have label set {1, 2, 7}, tokens 5.. have {3, 11}
    sets = torch.tensor([[1, 2, 7]] * 5 + [[3, 11, -1]] * (n - 5))
    targets = torch.tensor([1, 2, 7, 1, 2] + [3, 11, 3, 11][: n - 5])
    return hidden, head, targets, sets


def grads(loss, hidden, head):
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("chunk", [1, 3, 9, 1024])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
def test_vision_loss_matches_naive_reference_loss_and_gradients(chunk, eps):
    hidden, head, targets, sets = problem()
    out = vision_loss(hidden, head, targets, sets, eps=eps, chunk_size=chunk)
    ref = naive_vision(head(hidden), targets, sets, eps)
    assert out.n == 9
    assert torch.allclose(out.loss, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads(out.loss, hidden, head), grads(ref, hidden, head), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_chunk_sizes_agree_in_float32():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    sets = torch.stack([torch.randperm(101)[:5] for _ in range(37)])
    sets[:, 0] = targets
    results = []
    for chunk in (1, 3, 37):
        out = vision_loss(hidden, weight, targets, sets, eps=0.2, chunk_size=chunk)
        results.append((out.loss, *torch.autograd.grad(out.loss, [hidden, weight]), out.correct_top1))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eps_zero_is_plain_cross_entropy():
    hidden, head, targets, sets = problem(bias=False)
    out = vision_loss(hidden, head.weight, targets, sets, eps=0.0, chunk_size=4)
    ref = F.cross_entropy(head(hidden), targets)
    assert torch.allclose(out.loss, ref, atol=1e-12)
    no_sets = vision_loss(hidden, head.weight, targets, None, eps=0.0)
    assert torch.allclose(no_sets.loss, ref, atol=1e-12)


def test_smoothing_hand_computed():
    # identity head: logits = hidden = log([1/2, 1/4, 1/4]); target 0, L = {0, 1}, eps = 0.2
    # loss = -0.8 log(1/2) - 0.1 (log(1/2) + log(1/4)) = 0.8 ln2 + 0.3 ln2 = 1.1 ln2
    hidden = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    out = vision_loss(hidden, torch.eye(3, dtype=torch.float64), torch.tensor([0]), torch.tensor([[0, 1]]), eps=0.2)
    assert out.loss.item() == pytest.approx(1.1 * math.log(2), abs=1e-12)
    assert int(out.correct_top1) == 1
    # gradient wrt the logits: softmax - q, q = 0.8 e0 + 0.1 e0 + 0.1 e1 = (0.9, 0.1, 0)
    h = hidden.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(
        vision_loss(h, torch.eye(3, dtype=torch.float64), torch.tensor([0]), torch.tensor([[0, 1]]), eps=0.2).loss, [h]
    )
    assert torch.allclose(g, torch.tensor([[0.5 - 0.9, 0.25 - 0.1, 0.25]], dtype=torch.float64), atol=1e-12)


def test_top1_counts_argmax_hits():
    weight = torch.eye(4)
    hidden = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    out = vision_loss(hidden, weight, torch.tensor([0, 1, 3]), torch.tensor([[0, 1, 3]] * 3))
    assert int(out.correct_top1) == 2 and out.n == 3


def test_empty_vision_rows_give_zero_with_graph():
    _, head, _, _ = problem()
    hidden = torch.zeros(0, 6, dtype=torch.float64, requires_grad=True)
    out = vision_loss(hidden, head, torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), eps=0.1)
    assert out.n == 0 and out.loss.item() == 0.0 and int(out.correct_top1) == 0
    assert out.loss.requires_grad
    (out.loss * 2).backward()  # the graph is intact; nothing flows
    assert head.weight.grad is None or not head.weight.grad.any()


def test_text_loss_is_the_shifted_cross_entropy():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100
    labels[1, 5:] = -100
    loss, n = text_loss(hidden, weight, labels, chunk_size=2)
    logits = hidden @ weight.T
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert n == int((labels[:, 1:] != -100).sum()) == 8
    assert torch.allclose(loss, ref, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(loss, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight]), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-12)


def test_combined_loss_equals_text_plus_weighted_vision():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 8, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(17, 5, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.full((2, 8), -100)
    labels[0, 5:] = torch.tensor([3, 4, 5])
    labels[1, 6:] = torch.tensor([9, 2])
    pos = torch.tensor([[0, 1], [0, 2], [1, 3]])
    targets = torch.tensor([7, 8, 1])
    sets = torch.tensor([[7, 8], [7, 8], [1, -1]])
    out = dvsft_loss(hidden, weight, labels, pos, targets, sets, vision_weight=0.25, eps=0.4, chunk_size=2)
    t, _ = text_loss(hidden, weight, labels)
    v = vision_loss(hidden[pos[:, 0], pos[:, 1]], weight, targets, sets, eps=0.4)
    ref = t + 0.25 * v.loss
    assert (out.n_text, out.n_vision) == (5, 3)
    assert torch.allclose(out.loss, ref, atol=1e-12)
    assert torch.allclose(out.text_loss, t.detach()) and torch.allclose(out.vision_loss, v.loss.detach())
    for a, b in zip(
        torch.autograd.grad(out.loss, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight]), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-12)
    sft = dvsft_loss(hidden, weight, labels, pos, targets, sets, vision_weight=0.0)
    assert sft.n_vision == 0 and torch.allclose(sft.loss, t)


def test_upstream_gradient_scale_is_applied():
    hidden, head, targets, sets = problem()
    out = vision_loss(hidden, head, targets, sets, eps=0.3)
    ref = naive_vision(head(hidden), targets, sets, 0.3)
    for a, b in zip(grads(3.5 * out.loss, hidden, head), grads(3.5 * ref, hidden, head), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_no_grad_mode_and_frozen_head():
    hidden, head, targets, sets = problem()
    with torch.no_grad():
        out = vision_loss(hidden, head, targets, sets, eps=0.3)
    assert not out.loss.requires_grad
    head.requires_grad_(False)
    out = vision_loss(hidden, head, targets, sets, eps=0.3)
    (g,) = torch.autograd.grad(out.loss, [hidden])
    ref = naive_vision(head(hidden), targets, sets, 0.3)
    assert torch.allclose(g, torch.autograd.grad(ref, [hidden])[0], atol=1e-12)


def test_backward_twice_is_a_clear_error():
    hidden, head, targets, sets = problem()
    out = vision_loss(hidden, head, targets, sets)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


def test_never_more_than_chunk_rows_of_vocabulary_logits(monkeypatch):
    seen = []
    real_linear = F.linear

    def spy(x, w, b=None):
        out = real_linear(x, w, b)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(losses.F, "linear", spy)
    hidden, head, targets, sets = problem()
    out = vision_loss(hidden, head, targets, sets, eps=0.1, chunk_size=4)
    out.loss.backward()
    assert seen == [(4, 13), (4, 13), (1, 13)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=torch.tensor([0, 99])), "token ids"),
        (dict(targets=torch.tensor([0])), "targets must be"),
        (dict(label_sets=torch.tensor([[0]])), "label_sets must be"),
        (dict(eps=1.5), "eps must be in"),
        (dict(label_sets=None, eps=0.1), "needs label_sets"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments_are_reported(kwargs, match):
    args = dict(
        hidden=torch.randn(2, 3),
        lm_head=torch.randn(5, 3),
        targets=torch.tensor([0, 1]),
        label_sets=torch.tensor([[0, 1], [0, 1]]),
        eps=0.0,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        vision_loss(**args)


def test_bfloat16_weights_close_to_float32():
    torch.manual_seed(3)
    hidden = torch.randn(6, 8)
    weight = torch.randn(50, 8)
    targets = torch.randint(0, 50, (6,))
    sets = targets[:, None].clone()
    ref = vision_loss(hidden, weight, targets, sets, eps=0.1)
    low = vision_loss(hidden.bfloat16(), weight.bfloat16(), targets, sets, eps=0.1)
    assert low.loss.dtype == torch.float32
    assert low.loss.item() == pytest.approx(ref.loss.item(), rel=0.05)
    loss, _, _ = fused_linear_ce(hidden.bfloat16().requires_grad_(), weight.bfloat16(), targets)
    loss.backward()


# ------------------------------------------------------------------ the real tiny Qwen3-VL


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from dvsft.models.loading import load_model, load_processor

    return load_model(tiny_dir, dtype=torch.float64), load_processor(tiny_dir), tiny_dir


@pytest.mark.slow
def test_model_loss_matches_full_logits_reference(tiny):
    model, processor, _ = tiny
    batch = collated_batch(processor)
    eps, lam = 0.2, 0.5
    out = model_loss(model, batch, vision_weight=lam, eps=eps, chunk_size=3)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)

    inputs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    }
    logits = model(**inputs).logits  # [B, L, V]: the naive path
    ref, t_ref, v_ref = naive_reference(logits, batch, lam, eps)
    assert out.n_vision == 6 and out.n_text > 0
    assert torch.allclose(out.loss, ref, atol=1e-10)
    assert torch.allclose(out.text_loss, t_ref.detach(), atol=1e-10)
    assert torch.allclose(out.vision_loss, v_ref.detach(), atol=1e-10)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    assert_same_grads(params, got, want)


@pytest.mark.slow
def test_dvsft_objective_is_text_plus_lambda_vision_and_sft_is_lambda_zero(tiny):
    from types import SimpleNamespace

    from dvsft.objectives.base import forward_hidden
    from dvsft.objectives.registry import build_objectives

    model, processor, _ = tiny
    batch = collated_batch(processor)
    inputs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    }
    logits = model(**inputs).logits
    hidden = forward_hidden(model, batch)
    # sft ignores vision_lambda: it is dvsft at lambda 0
    for method, config_lambda, lam in (("dvsft", 0.5, 0.5), ("dvsft", 0.0, 0.0), ("sft", 0.5, 0.0)):
        config = SimpleNamespace(vision_lambda=config_lambda, vision_eps=0.2, loss_chunk_size=3)
        (objective,) = build_objectives(method, config)
        ref, t_ref, v_ref = naive_reference(logits, batch, lam, 0.2)
        terms = objective.loss(model, batch, hidden)
        assert objective.weights() == {f"{method}_step_loss": 1.0}
        assert torch.allclose(terms[f"{method}_step_loss"], ref, atol=1e-10), (method, config_lambda)
        assert torch.allclose(terms["text_loss"], t_ref, atol=1e-10)
        assert objective.needs_vision_labels == (lam != 0)  # the collator aligns no words for lambda 0
        if lam:
            assert torch.allclose(terms["vision_loss"], v_ref, atol=1e-10) and float(terms["vision_tokens"]) == 6
        else:  # the vision term is skipped, not computed and weighted by 0
            assert sorted(terms) == sorted([f"{method}_step_loss", "text_loss", "text_tokens"])


def test_example_custom_trainer_runs(tmp_path, monkeypatch, tiny):
    _, _, model_dir = tiny
    monkeypatch.setattr(
        sys, "argv", ["custom_trainer.py", "--model", str(model_dir), "--out", str(tmp_path), "--steps", "2"]
    )
    result = runpy.run_path(str(ROOT / "examples" / "custom_trainer.py"), run_name="__main__")
    history = result["HISTORY"]
    assert len(history) == 2
    assert all(math.isfinite(h["loss"]) and h["vision_tokens"] > 0 and h["text_tokens"] > 0 for h in history)


def test_extreme_logit_ranges_stay_accurate_in_float32():
    """Logits spanning hundreds of nats (probabilities far below float32's normal range) lose nothing."""
    g = torch.Generator().manual_seed(4)
    hidden64 = (30 * torch.randn(5, 8, dtype=torch.float64, generator=g)).requires_grad_(True)
    weight64 = torch.randn(40, 8, dtype=torch.float64, generator=g).requires_grad_(True)
    targets = torch.tensor([0, 5, 9, 17, 39])
    sets = torch.tensor([[0, 5, 9], [0, 5, 9], [0, 5, 9], [17, 39, -1], [17, 39, -1]])
    ref = naive_vision(hidden64 @ weight64.T, targets, sets, 0.3)
    h32 = hidden64.detach().float().requires_grad_(True)
    w32 = weight64.detach().float().requires_grad_(True)
    out = vision_loss(h32, w32, targets, sets, eps=0.3, chunk_size=2)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    got = torch.autograd.grad(out.loss, [h32, w32])
    for a, b in zip(got, torch.autograd.grad(ref, [hidden64, weight64]), strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5)


def test_bench_train_smoke(tmp_path):
    """`dvsft bench train` machinery end to end on a toy size (numbers are not checked: no timing in tests)."""
    from dvsft.experiments.bench.training import VARIANTS, BenchConfig, build_batch, measure_times

    cfg = BenchConfig(
        vocab_size=4096,
        hidden_size=32,
        layers=1,
        heads=2,
        kv_heads=1,
        vision_hidden_size=32,
        image_width=192,
        image_height=128,
        answer_words=4,
        steps=1,
        warmup=0,
    )
    shape = build_batch(cfg, tmp_path)
    assert shape["visual_tokens"] == 24 and 0 < shape["labeled_tokens"] <= round(0.2 * 24)
    times = measure_times(cfg, tmp_path)  # every variant's step, in this process
    assert set(times) == {*VARIANTS, "_info"}
    for v in VARIANTS:  # one timed step each (steps=1): the reported median is that step, wall and CPU
        assert len(times[v]["step_s_all"]) == len(times[v]["cpu_s_all"]) == cfg.steps
        assert times[v]["step_s"] == times[v]["step_s_all"][0] and times[v]["cpu_s"] == times[v]["cpu_s_all"][0]
    model = transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig.from_json_file(tmp_path / "config.json")
    )
    assert times["_info"]["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_bench_train_spawns_fresh_processes():
    from dvsft.experiments.bench.training import BenchConfig, bench_train, markdown_table

    small = dict(vocab_size=4096, hidden_size=32, layers=1, heads=2, kv_heads=1, vision_hidden_size=32)
    cfg = BenchConfig(**small, image_width=96, image_height=64, answer_words=2, steps=1, warmup=0, variants=["sft"])
    report = bench_train(cfg)
    result = report["results"]["sft"]
    # the peak is measured over the RSS after the imports, so it holds at least the float32 weights and gradients
    assert result["peak_bytes"] >= 2 * 4 * result["params"] and result["params"] > 100_000
    assert result["step_s"] == result["step_s_all"][0] and len(result["step_s_all"]) == cfg.steps
    assert report["ratios"]["sft"]["time"] == 1.0 and "| sft |" in markdown_table(report)
    with pytest.raises(ValueError, match="unknown variant"):
        bench_train(BenchConfig(variants=["sft", "fast"]))


def test_model_loss_through_a_peft_lora_wrapper(tiny):
    from peft import LoraConfig, get_peft_model

    _, processor, model_dir = tiny
    from dvsft.models.loading import load_model

    model = get_peft_model(load_model(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = collated_batch(processor)
    out = model_loss(model, batch, vision_weight=0.5, eps=0.1)
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)  # the LM head stays frozen: no [V, D] gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert out.n_vision == 6 and torch.isfinite(out.loss)


@pytest.mark.parametrize("factor", [0.1, 0.5])
def test_label_smoothing_factor_is_hf_label_smoother(factor, tiny):
    """``label_smoothing_factor`` smooths the text loss exactly as the HF Trainer's ``LabelSmoother`` does on
    the model's own logits (loss and gradients), in both the text-only and the combined pass."""
    from types import SimpleNamespace

    from transformers.trainer_pt_utils import LabelSmoother

    from dvsft.objectives.base import forward_hidden
    from dvsft.objectives.registry import build_objectives

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 8, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(17, 5, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.full((2, 8), -100)
    labels[0, 4:] = torch.tensor([3, 4, 5, 6])
    labels[1, 6:] = torch.tensor([9, 2])

    def reference():
        return LabelSmoother(epsilon=factor)({"logits": hidden @ weight.T}, labels, shift_labels=True)

    ref = reference()
    loss, _ = text_loss(hidden, weight, labels, chunk_size=3, label_smoothing=factor)
    combined = dvsft_loss(hidden, weight, labels, vision_weight=0.0, label_smoothing=factor).loss
    plain, _ = text_loss(hidden, weight, labels)
    assert not torch.allclose(loss, plain)  # the option does something
    for ours in (loss, combined):
        assert torch.allclose(ours, ref, atol=1e-12)
        for a, b in zip(
            torch.autograd.grad(ours, [hidden, weight]), torch.autograd.grad(reference(), [hidden, weight]), strict=True
        ):
            assert torch.allclose(a, b, atol=1e-12)
    # vision rows keep their own smoothing: the combined loss is smoothed text + lambda * vision
    pos, targets, sets = torch.tensor([[0, 1], [1, 3]]), torch.tensor([7, 1]), torch.tensor([[7, 8], [1, -1]])
    out = dvsft_loss(hidden, weight, labels, pos, targets, sets, vision_weight=0.3, eps=0.2, label_smoothing=factor)
    v = vision_loss(hidden[pos[:, 0], pos[:, 1]], weight, targets, sets, eps=0.2)
    assert torch.allclose(out.loss, ref + 0.3 * v.loss, atol=1e-12)

    # through the objective, as the Trainer runs it, on the tiny Qwen3-VL's logits
    model, processor, _ = tiny
    batch = collated_batch(processor)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    logits = model(**{k: batch[k] for k in keys}).logits
    (objective,) = build_objectives("sft", SimpleNamespace(label_smoothing_factor=factor, loss_chunk_size=3))
    terms = objective.loss(model, batch, forward_hidden(model, batch))
    expected = LabelSmoother(epsilon=factor)({"logits": logits}, batch["labels"], shift_labels=True)
    assert torch.allclose(terms["sft_step_loss"], expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 512])
def test_basic_kl_logit_lens_matches_full_logits(chunk):
    """BASIC's chunked, recomputed KL (run inside the head's own call) equals KL(p_target || p_student) on
    the full logits, loss and gradients (float64)."""
    from dvsft.objectives.basic import kl_logit_lens

    g = torch.Generator().manual_seed(4)
    student = torch.randn(7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randn(7, 6, dtype=torch.float64, generator=g)
    norm = torch.nn.LayerNorm(6).double()
    head = torch.nn.Linear(6, 13, bias=False).double()
    ours = kl_logit_lens(student, target, norm, head, chunk_size=chunk)
    log_q = torch.log_softmax(head(norm(student)), -1)
    log_p = torch.log_softmax(head(norm(target)), -1).detach()
    ref = (log_p.exp() * (log_p - log_q)).sum()
    assert ours.item() > 0 and torch.allclose(ours.double(), ref, atol=1e-6)
    params = [student, head.weight, norm.weight]
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params), strict=True):
        assert torch.allclose(a.double(), b, atol=1e-6)
