"""The multi-label vision loss (issue #26): a visual token with k labels trains on the normalised mixture of
them (plus vision smoothing over its image's label set), its row through the LM head once, counted once.

References are independent: full float64 logits, ``torch.log_softmax`` on every row, the soft target written
out as a dense vocabulary vector per token."""

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_grads, collated_batch, naive_reference, three_word_pages

from dvsft.align.aligner import AlignConfig
from dvsft.data.collator import VisionCollator, label_weights
from dvsft.objectives.losses import dvsft_loss, group_vision_labels, model_loss, step_tokens

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def soft_target_reference(logits: torch.Tensor, batch: dict, lam: float, eps: float):
    """(loss, text loss, vision loss, labeled tokens, top-1 hits): text CE + lam * the mean over distinct labeled
    tokens of CE(q, p), q = (1 - eps) * sum_j w_j onehot(t_j) / sum_j w_j + eps / |L| * onehot(L)."""
    logp = F.log_softmax(logits.double(), dim=-1)
    claims: dict[tuple[int, int], list[tuple[int, float]]] = defaultdict(list)
    sets: dict[tuple[int, int], set[int]] = {}
    entries = zip(
        batch["vision_positions"].tolist(),
        batch["vision_targets"].tolist(),
        batch["vision_weights"].tolist(),
        batch["vision_label_sets"].tolist(),
        strict=True,
    )
    for (b, p), target, weight, label_set in entries:
        claims[(b, p)].append((target, weight))
        sets[(b, p)] = {v for v in label_set if v >= 0}
    per_token, hits = [], 0
    for (b, p), labels in claims.items():
        q = torch.zeros(logits.shape[-1], dtype=torch.float64)
        total = sum(w for _, w in labels)
        for target, weight in labels:
            q[target] += (1 - eps) * weight / total
        for v in sets[(b, p)]:
            q[v] += eps / len(sets[(b, p)])
        per_token.append(-(q * logp[b, p]).sum())
        hits += int(int(logp[b, p].argmax()) in {t for t, _ in labels})
    vision = torch.stack(per_token).mean()
    v = logits.shape[-1]
    text = F.cross_entropy(logits[:, :-1].reshape(-1, v), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    return text + lam * vision, text, vision, len(claims), hits


def test_label_weights_split_a_token_among_its_labels():
    assert label_weights([(5, 11), (5, 12), (7, 13), (9, 1), (9, 2), (9, 3)]) == [0.5, 0.5, 1.0] + [1 / 3] * 3
    assert label_weights([(5, 11), (7, 13)]) == [1.0, 1.0]


def test_repeats_anywhere_among_the_entries_match_the_reference():
    """Entries of one token need not be adjacent; rows go through the head once per distinct token."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    head = torch.nn.Linear(5, 17).double()
    labels = torch.full((2, 7), -100)
    labels[:, 5:] = torch.tensor([[3, 4], [5, 6]])
    positions = torch.tensor([[0, 1], [1, 2], [0, 1], [0, 3], [1, 2], [0, 1]])
    targets = torch.tensor([2, 9, 4, 7, 9, 11])  # (1, 2) claimed twice by the same id: its mass adds up
    sets = torch.tensor([[2, 4, 7, 11], [9, -1, -1, -1]])[positions[:, 0]]  # each image's label set
    batch = {
        "labels": labels,
        "vision_positions": positions,
        "vision_targets": targets,
        "vision_label_sets": sets,
        "vision_weights": torch.tensor([1.0, 0.5, 1.0, 1.0, 0.5, 2.0]),  # any positive weights, normalised per token
    }
    grouped = group_vision_labels(positions, targets, sets, batch["vision_weights"])
    assert grouped.positions.tolist() == [[0, 1], [1, 2], [0, 3]]  # one row per token, first-entry order
    assert grouped.targets.tolist() == [[2, 4, 11], [9, 9, 0], [7, 0, 0]]
    out = dvsft_loss(hidden, head, labels, positions, targets, sets, 0.7, 0.3, chunk_size=2, vision_weights=batch[
        "vision_weights"])  # fmt: skip
    ref, t_ref, v_ref, n, hits = soft_target_reference(head(hidden), batch, 0.7, 0.3)
    assert out.n_vision == n == 3 and int(out.vision_correct_top1) == hits
    assert torch.allclose(out.loss, ref, atol=1e-12) and torch.allclose(out.vision_loss, v_ref, atol=1e-12)
    params = [hidden, head.weight, head.bias]
    got = torch.autograd.grad(out.loss, params)
    assert_same_grads(params, got, torch.autograd.grad(ref, params))


# ------------------------------------------------------------------ the real tiny Qwen3-VL


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from dvsft.models.loading import load_model, load_processor

    return load_model(tiny_dir, dtype=torch.float64), load_processor(tiny_dir)


def shared_cell_pages() -> list[dict]:
    """Two pages where "the" and "value" end in the same cell (one token, two labels) and "class" in another."""
    return three_word_pages([(160, 96), (128, 128)], [[4, 4, 28, 28], [8, 8, 26, 26], [36, 36, 60, 60]])


def multi_label_batch(processor) -> dict:
    """:func:`shared_cell_pages` collated with multi-label alignment."""
    return VisionCollator(processor, AlignConfig(multi_label=True))(shared_cell_pages())


@pytest.mark.slow
def test_soft_target_loss_and_gradients_match_full_logits_reference(tiny):
    model, processor = tiny
    batch = multi_label_batch(processor)
    positions = batch["vision_positions"].tolist()
    assert len(positions) == 6 and len({tuple(p) for p in positions}) == 4  # 2 tokens with 2 labels, 2 with 1
    assert sorted(batch["vision_weights"].tolist()) == [0.5] * 4 + [1.0] * 2
    eps, lam = 0.2, 0.5
    out = model_loss(model, batch, vision_weight=lam, eps=eps, chunk_size=3)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)

    logits = model(**{k: batch[k] for k in MODEL_INPUTS}).logits
    ref, t_ref, v_ref, n, hits = soft_target_reference(logits, batch, lam, eps)
    assert out.n_vision == n == 4 and int(out.vision_correct_top1) == hits
    assert torch.allclose(out.loss, ref, atol=1e-10)
    assert torch.allclose(out.text_loss, t_ref.detach(), atol=1e-10)
    assert torch.allclose(out.vision_loss, v_ref.detach(), atol=1e-10)
    assert_same_grads(params, got, torch.autograd.grad(ref, params, allow_unused=True))


@pytest.mark.slow
def test_trainer_compute_loss_counts_each_token_once(tiny, tmp_path):
    """DVSFTTrainer's training path with ``align_multi_label``: its collator makes the multi-label batch, the step's
    vision count is distinct tokens, so one micro-batch's share of the step's loss is the whole reference loss, and
    the logged terms are the reference's."""
    from dvsft.training.config import DVSFTConfig
    from dvsft.training.trainer import DVSFTTrainer

    model, processor = tiny
    pixels = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 256}  # the tiny processor's own: pages as they are
    args = DVSFTConfig(
        output_dir=str(tmp_path), vision_lambda=0.5, vision_eps=0.2, loss_chunk_size=3, align_multi_label=True, **pixels
    )
    trainer = DVSFTTrainer(model=model, args=args, processing_class=processor)
    batch = trainer.data_collator(shared_cell_pages())
    for key, value in multi_label_batch(processor).items():
        assert torch.equal(batch[key], value), key
    tokens = step_tokens([batch])
    assert tokens.vision == 4
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, batch, return_outputs=True, num_items_in_batch=tokens)
        ref, t_ref, v_ref, n, hits = soft_target_reference(model(**{k: batch[k] for k in MODEL_INPUTS}).logits, batch,
                                                          0.5, 0.2)  # fmt: skip
    terms = out["terms"]
    assert torch.allclose(loss, ref, atol=1e-10)
    assert torch.allclose(terms["vision_loss"], v_ref, atol=1e-10) and float(terms["vision_tokens"]) == n
    assert float(terms["vision_acc"]) == hits / n


@pytest.mark.slow
def test_single_label_batches_keep_the_loss_of_one_label_per_token(tiny):
    """Without a repeated position every weight is 1.0 and the loss is the single-label path's, to the bit: the
    same as the batch without ``vision_weights`` (the code before multi-label) and as Eq. 3's reference."""
    model, processor = tiny
    batch = collated_batch(processor)
    assert batch["vision_weights"].tolist() == [1.0] * 6
    assert group_vision_labels(batch["vision_positions"], batch["vision_targets"]).mix is None
    without = {k: v for k, v in batch.items() if k != "vision_weights"}
    params = [p for p in model.parameters() if p.requires_grad]
    outs = [model_loss(model, b, vision_weight=0.5, eps=0.2, chunk_size=3) for b in (batch, without)]
    grads = [torch.autograd.grad(o.loss, params, allow_unused=True) for o in outs]
    assert torch.equal(outs[0].loss, outs[1].loss) and torch.equal(outs[0].vision_loss, outs[1].vision_loss)
    for a, b in zip(*grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    logits = model(**{k: batch[k] for k in MODEL_INPUTS}).logits
    ref, _, v_ref = naive_reference(logits, batch, 0.5, 0.2)
    assert torch.allclose(outs[0].loss, ref, atol=1e-10) and torch.allclose(outs[0].vision_loss, v_ref, atol=1e-10)
