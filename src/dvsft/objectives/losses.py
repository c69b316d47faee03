"""Memory-lean DV-SFT losses: text CE, vision CE with vision smoothing, both fused over the LM head.

The vocabulary projection is never materialised for every position. Only the rows that carry a
label are gathered (answer tokens for the text loss, labeled visual tokens for the vision loss),
and those rows are pushed through the LM head ``chunk_size`` rows at a time by one autograd
function that computes the loss AND its gradient per chunk, in float32 (float64 inputs stay
float64), and keeps only the gradients (``[N, D]`` for the rows, one ``[V, D]`` buffer for the
head). The peak extra memory is therefore one chunk of logits, whatever N is; fed through one
call (:func:`dvsft_loss`), the vision rows share the text rows' chunks and head-gradient buffer,
so DV-SFT's peak memory stays that of SFT computed the same way.

Per labeled visual token j (paper Eq. 2-3, docs/design.md), with no shift::

    loss_j = -(1 - eps) log p_j(l_j) - (eps / |L|) sum_{l in L} log p_j(l)

where ``L`` is the deduplicated set of first-token ids of all vision labels of j's image; the
vision loss is the mean over labeled tokens and ``L = L_text + lambda * L_vision``. A token with
several labels (multi-label alignment) replaces ``log p_j(l_j)`` by ``sum_k w_k log p_j(l_k)``, its
labels' weights normalised to sum 1 (CE against the mixture), and still counts as one token.

The LM head is applied through the head module's own call (:func:`through_head`), so a wrapper that
shards it (DeepSpeed ZeRO-3, FSDP) gathers it for the loss and reduces its gradient, as it does for
any module. With gradient accumulation or several processes, pass the step's token counts
(:class:`StepTokens`, from :func:`step_tokens`): each micro-batch then returns its exact share of
the loss of the whole optimizer step, so accumulation 2 x b equals 1 x 2b and N processes equal one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
T = TypeVar("T")


@dataclass(frozen=True)
class LossSettings:
    """DV-SFT's loss keys and their defaults, the one source of both: ``DVSFTConfig``'s fields and the loss
    functions here default to these, and the objectives read them from any config with :meth:`of`."""

    vision_lambda: float = 0.1  # lambda in L = L_text + lambda * L_vision
    vision_eps: float = 0.1  # vision smoothing: mass spread over the image's label set
    loss_chunk_size: int = 1024  # rows per LM-head chunk

    @classmethod
    def of(cls, config: Any) -> LossSettings:
        """``config``'s values of these keys, the defaults for those it lacks (a plain ``TrainingArguments``, None)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})


@dataclass
class StepTokens:
    """Labeled tokens of one optimizer step: every accumulated micro-batch on every process.

    ``text`` answer tokens (after the causal shift), ``vision`` labeled visual tokens (distinct: a token with
    several labels counts once), ``processes``
    the data-parallel processes whose gradients are averaged (DDP / FSDP / DeepSpeed).
    """

    text: float
    vision: float
    processes: int = 1


def step_tokens(batches: Sequence[dict[str, Any]], accelerator: Any = None) -> StepTokens:
    """Count the step's labeled tokens over ``batches`` (the micro-batches of one step) and all processes.

    Use it in ``Trainer.get_batch_samples`` (see docs/api.md); ``accelerator`` (``trainer.accelerator``)
    sums the counts over processes, else ``torch.distributed`` when it is initialised.
    """
    text = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in batches)
    vision = sum(distinct_positions(b["vision_positions"]) for b in batches if b.get("vision_positions") is not None)
    counts = torch.tensor([float(text), float(vision)], dtype=torch.float64)
    processes = 1
    if accelerator is not None and accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        processes = accelerator.num_processes
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        processes = torch.distributed.get_world_size()
        if processes > 1:
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            counts = counts.to(device)
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
    return StepTokens(text=float(counts[0]), vision=float(counts[1]), processes=processes)


def through_head(lm_head: nn.Module, fn: Callable[..., T], *inputs: Tensor) -> T:
    """``fn(head, *inputs)`` run as ``lm_head``'s own forward: its wrapper's hooks run around it.

    DeepSpeed ZeRO-3 gathers the module's parameters in its pre-forward hook and re-gathers them for
    the backward; an FSDP unit around the head unshards it the same way; elsewhere this is a plain
    call. ``head`` is the innermost module (an FSDP wrapper's ``_fsdp_wrapped_module``).
    """
    inner = lm_head
    while isinstance(getattr(inner, "_fsdp_wrapped_module", None), nn.Module):
        inner = inner._fsdp_wrapped_module
    saved = inner.__dict__.get("forward")

    def forward(*args: Tensor) -> T:
        return fn(inner, *args)

    inner.forward = forward
    try:
        return lm_head(*inputs)
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


@dataclass
class VisionLossOutput:
    loss: Tensor  # mean over labeled tokens (0.0 with its graph intact when n == 0)
    correct_top1: Tensor  # how many labeled tokens have their label as the arg-max of their logits
    n: int  # labeled tokens


@dataclass
class DVSFTLossOutput:
    loss: Tensor  # text_loss + vision_weight * vision_loss (differentiable)
    text_loss: Tensor  # detached means, for logging
    vision_loss: Tensor
    n_text: int
    n_vision: int
    vision_correct_top1: Tensor

    @property
    def vision_accuracy(self) -> float:
        return float(self.vision_correct_top1) / self.n_vision if self.n_vision else float("nan")


def _head_params(lm_head: nn.Module | Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(weight [V, D], bias [V] or None) of an ``nn.Linear`` or a bare weight tensor."""
    if isinstance(lm_head, Tensor):
        return lm_head, bias
    weight = getattr(lm_head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"lm_head must be an nn.Linear-like module or a [V, D] weight tensor, got {type(lm_head)}")
    return weight, getattr(lm_head, "bias", None) if bias is None else bias


class _FusedLinearCE(torch.autograd.Function):
    """``sum_i w_i * loss_i`` over rows, the head's logits built chunk by chunk; gradients computed in forward."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, target_mix, label_sets, eps_rows, vocab_eps, row_weights, chunk_size, need
    ):
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        smooth_vocab = bool(vocab_eps.any())
        cutoff = -600.0 if acc == torch.float64 else -60.0
        losses = torch.zeros(n, dtype=acc, device=hidden.device)
        correct = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need[0] else None
        grad_w = torch.zeros_like(weight) if need[1] else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need[2] else None
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            h, t = hidden[s:e], targets[s:e]  # t [c, K]: K labels per row, mixed by target_mix (1.0 when K == 1)
            mix = target_mix[s:e].to(acc)
            logits = F.linear(h, weight, bias).to(acc)  # [c, V]: the only vocabulary-sized tensor
            u = vocab_eps[s:e, None].to(acc)  # label smoothing over the whole vocabulary (text rows)
            mean_z = logits.mean(-1, keepdim=True) if smooth_vocab else torch.zeros_like(u)
            top, arg = logits.max(dim=-1, keepdim=True)
            correct[s:e] = ((t == arg) & (mix > 0)).any(-1)
            z_t = (logits.gather(1, t) * mix).sum(-1, keepdim=True)  # sum_k mix_k z_{t_k}: z_t itself when K == 1
            eps = eps_rows[s:e, None].to(acc)
            if label_sets is not None and label_sets.shape[1] > 0:
                sets = label_sets[s:e]
                valid = (sets >= 0).to(acc)
                count = valid.sum(-1, keepdim=True)
                eps = torch.where(count > 0, eps, torch.zeros_like(eps))  # empty set: plain CE
                set_w = eps * valid / count.clamp(min=1)  # eps / |L| on each member of L
                set_idx = sets.clamp(min=0)
                smooth = (logits.gather(1, set_idx) * set_w).sum(-1, keepdim=True)
            else:
                set_w = set_idx = None
                smooth = torch.zeros_like(z_t)
                eps = torch.zeros_like(eps)
            # softmax in place: the chunk's logits are the only [c, V] buffer. Probabilities below
            # exp(cutoff) relative to the top one become exact zeros instead of denormals, which
            # are ~40x slower on CPUs (error <= V * exp(cutoff), ~1e-21 in float32).
            g = F.threshold_(logits.sub_(top), cutoff, float("-inf")).exp_()
            total = g.sum(-1, keepdim=True)
            lse = top + total.log()
            losses[s:e] = (lse - (1 - eps - u) * z_t - smooth - u * mean_z)[:, 0]
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            # d loss_i / d logits = softmax - q_i, with
            # q_i = (1 - eps - u) sum_k mix_k onehot(t_k) + eps / |L| onehot(L) + u / V
            w = row_weights[s:e, None].to(acc)  # the row's weight in the total, folded into every term
            g.div_(total / w)
            g.scatter_add_(1, t, -(1 - eps - u) * w * mix)
            if smooth_vocab:
                g.sub_(u * w / logits.shape[1])
            if set_w is not None:
                g.scatter_add_(1, set_idx, -set_w * w)
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(weight.dtype)
            if grad_h is not None:
                grad_h[s:e] = g @ weight
            if grad_w is not None:
                grad_w.addmm_(g.t(), h.to(weight.dtype))
            del g, logits
        ctx.grads = (grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(losses, correct)
        return (losses * row_weights.to(acc)).sum(), losses, correct

    @staticmethod
    def backward(ctx, grad_out, _grad_losses, _grad_correct):
        if ctx.grads is None:
            raise RuntimeError("dvsft fused loss: backward ran twice; its gradients are computed once, in forward")
        grads, ctx.grads = ctx.grads, None  # hand the buffers over (autograd can then adopt them without a copy)
        for g in grads:
            if g is not None:
                g.mul_(grad_out.to(g.dtype))
        return (*grads, None, None, None, None, None, None, None, None)


def fused_linear_ce(
    hidden: Tensor,
    lm_head: nn.Module | Tensor,
    targets: Tensor,
    label_sets: Tensor | None = None,
    eps: float | Tensor = 0.0,
    row_weights: Tensor | None = None,
    chunk_size: int = LossSettings.loss_chunk_size,
    bias: Tensor | None = None,
    vocab_eps: float | Tensor = 0.0,
    target_mix: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The engine of every loss here: ``(sum_i w_i loss_i, per-row losses (detached), per-row top-1 hits)``.

    ``hidden`` [N, D] rows, ``targets`` [N], or [N, K] with ``target_mix`` [N, K] (each row's target is then the
    mixture ``sum_k mix_k onehot(targets_k)``, padding entries weighted 0; a hit is an arg-max among them),
    ``label_sets`` [N, S] (-1 padded) smoothing sets,
    ``eps`` scalar or [N] (smoothing over the row's set), ``vocab_eps`` scalar or [N] (label smoothing over
    the whole vocabulary, as ``torch.nn.functional.cross_entropy(label_smoothing=...)`` and the HF Trainer's
    ``LabelSmoother`` define it), ``row_weights`` [N] (default 1/N: the mean).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D], got shape {tuple(hidden.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(lm_head, nn.Module):

        def run(head: nn.Module, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            params = _head_params(head, bias)
            return _fused_linear_ce(
                rows, *params, targets, target_mix, label_sets, eps, vocab_eps, row_weights, chunk_size
            )

        return through_head(lm_head, run, hidden)
    weight, bias = _head_params(lm_head, bias)
    return _fused_linear_ce(
        hidden, weight, bias, targets, target_mix, label_sets, eps, vocab_eps, row_weights, chunk_size
    )


def _target_columns(targets: Tensor, target_mix: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
    """(targets [N, K], mix [N, K] float64): a 1-D ``targets`` is one column of weight 1.0."""
    if targets.dim() == 1 and target_mix is None:
        if targets.shape != (n,):
            raise ValueError(f"targets must be [{n}], got shape {tuple(targets.shape)}")
        return targets[:, None], torch.ones((n, 1), dtype=torch.float64, device=targets.device)
    if targets.dim() != 2 or targets.shape[0] != n or target_mix is None or target_mix.shape != targets.shape:
        shown = None if target_mix is None else tuple(target_mix.shape)
        raise ValueError(f"targets [{n}, K] need target_mix of the same shape, got {tuple(targets.shape)} and {shown}")
    return targets, target_mix.to(torch.float64)


def _fused_linear_ce(hidden, weight, bias, targets, target_mix, label_sets, eps, vocab_eps, row_weights, chunk_size):
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"lm_head weight must be a [V, D] tensor, got {type(weight)}")
    n = hidden.shape[0]
    targets, target_mix = _target_columns(targets, target_mix, n)
    if label_sets is not None and (label_sets.dim() != 2 or label_sets.shape[0] != n):
        raise ValueError(f"label_sets must be [{n}, S], got shape {tuple(label_sets.shape)}")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must be token ids in [0, {weight.shape[0]}), got {int(targets.min())}..")
    device = hidden.device
    eps_rows = torch.as_tensor(eps, dtype=torch.float64, device=device).expand(n).contiguous()
    vocab_eps_rows = torch.as_tensor(vocab_eps, dtype=torch.float64, device=device).expand(n).contiguous()
    if row_weights is None:
        row_weights = torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64, device=device)
    grad_on = torch.is_grad_enabled() and n > 0
    need = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return _FusedLinearCE.apply(
        hidden, weight, bias, targets.long(), target_mix, label_sets, eps_rows, vocab_eps_rows, row_weights,
        int(chunk_size), need,
    )  # fmt: skip


def check_smoothing(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def vision_loss(
    hidden: Tensor,
    lm_head: nn.Module | Tensor,
    targets: Tensor,
    label_sets: Tensor | None = None,
    eps: float = 0.0,
    chunk_size: int = LossSettings.loss_chunk_size,
    bias: Tensor | None = None,
    target_mix: Tensor | None = None,
) -> VisionLossOutput:
    """Vision loss with vision smoothing on the hidden states of the labeled visual tokens (no shift).

    ``hidden`` [N, D] at the labeled tokens' own positions; ``targets`` [N] first sub-token of each
    token's word; ``label_sets`` [N, S] (-1 padded) row j = the smoothing set of j's image. Multi-label:
    ``targets`` [N, K] and ``target_mix`` [N, K] (see :func:`group_vision_labels`).
    """
    check_smoothing(eps, "vision smoothing eps")
    if eps > 0 and label_sets is None:
        raise ValueError("vision smoothing (eps > 0) needs label_sets")
    loss, _, correct = fused_linear_ce(
        hidden, lm_head, targets, label_sets, eps, chunk_size=chunk_size, bias=bias, target_mix=target_mix
    )
    return VisionLossOutput(loss=loss, correct_top1=correct.sum(), n=int(hidden.shape[0]))


def shifted_text_rows(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(hidden rows [T, D], targets [T]) of the causal shift: position i predicts ``labels[:, i + 1]``."""
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [B, L]")
    shift = labels[:, 1:]
    mask = shift != IGNORE_INDEX
    return hidden[:, :-1][mask], shift[mask]


def _liger_ok(hidden: Tensor) -> bool:
    if not hidden.is_cuda:
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def text_loss(
    hidden: Tensor,
    lm_head: nn.Module | Tensor,
    labels: Tensor,
    chunk_size: int = LossSettings.loss_chunk_size,
    use_liger: bool | None = None,
    bias: Tensor | None = None,
    tokens: StepTokens | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, int]:
    """Standard shifted next-token CE over the label tokens (``-100`` ignored): ``(mean loss, n_tokens)``.

    ``label_smoothing``: the HF Trainer's ``label_smoothing_factor`` (uniform over the vocabulary).

    ``use_liger`` (default: where ``liger_kernel`` is installed and the tensors are on CUDA) uses
    Liger's fused linear cross-entropy kernel instead of this module's chunked one. With ``tokens``
    the loss is this batch's share of the step's (sum over rows x processes / ``tokens.text``).
    """
    check_smoothing(label_smoothing, "label_smoothing_factor")
    rows, targets = shifted_text_rows(hidden, labels)
    n = int(rows.shape[0])
    scale = 1.0 if tokens is None else n * tokens.processes / max(tokens.text, 1.0)
    if use_liger is None:
        use_liger = _liger_ok(hidden)
    if use_liger and n:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        def liger(head: nn.Module | Tensor, rows: Tensor) -> Tensor:
            weight, b = _head_params(head, bias)
            return LigerFusedLinearCrossEntropyLoss(label_smoothing=label_smoothing)(weight, rows, targets, b)

        loss = through_head(lm_head, liger, rows) if isinstance(lm_head, nn.Module) else liger(lm_head, rows)
        return loss * scale, n
    weights = torch.full((n,), scale / max(n, 1), dtype=torch.float64, device=rows.device)
    loss, _, _ = fused_linear_ce(
        rows, lm_head, targets, row_weights=weights, chunk_size=chunk_size, bias=bias, vocab_eps=label_smoothing
    )
    return loss, n


@dataclass
class VisionLabels:
    """The labeled visual tokens of a batch, one row per distinct token (what :func:`group_vision_labels` gives)."""

    positions: Tensor  # [M, 2] (batch index, sequence position), in the order of each token's first entry
    targets: Tensor  # [M, K] label ids, 0 on padding
    mix: Tensor | None  # [M, K] float64, each row summing to 1 (0 on padding); None: one label per token
    label_sets: Tensor | None  # [M, S] smoothing sets (-1 padded)


def distinct_positions(positions: Tensor) -> int:
    """How many distinct tokens ``positions`` [N, 2] name (a multi-label token has several entries)."""
    return int(torch.unique(positions, dim=0).shape[0]) if positions.shape[0] > 1 else int(positions.shape[0])


def group_vision_labels(
    positions: Tensor, targets: Tensor, label_sets: Tensor | None = None, weights: Tensor | None = None
) -> VisionLabels:
    """The collator's entries (one per (token, label): ``positions`` [N, 2], ``targets`` [N], ``label_sets``
    [N, S], ``weights`` [N], default 1) as one row per distinct token: its labels side by side, mixed by their
    weights normalised to sum 1 per token. Without a repeated position the entries are returned as they are
    (``mix`` None): the single-label loss, unchanged."""
    n = int(positions.shape[0])
    uniq, inverse = torch.unique(positions, dim=0, return_inverse=True)
    m = int(uniq.shape[0])
    if m == n:
        return VisionLabels(positions, targets, None, label_sets)
    entries = torch.arange(n, device=positions.device)
    first = torch.full((m,), n, dtype=torch.long, device=positions.device).scatter_reduce(0, inverse, entries, "amin")
    first_sorted, order = first.sort()  # rows in the order of their first entry
    rank = torch.empty_like(order)
    rank[order] = torch.arange(m, device=positions.device)
    row = rank[inverse]  # each entry's row
    by_row = torch.sort(row, stable=True).indices
    counts = torch.bincount(row, minlength=m)
    start = counts.cumsum(0) - counts
    slot = torch.empty_like(row)
    slot[by_row] = entries - start[row[by_row]]
    k = int(counts.max())
    grouped = targets.new_zeros((m, k))
    grouped[row, slot] = targets
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    if bool((w <= 0).any()):
        raise ValueError("vision_weights must be > 0")
    mix = torch.zeros((m, k), dtype=torch.float64, device=positions.device)
    mix[row, slot] = w.to(positions.device)
    mix /= mix.sum(-1, keepdim=True)
    sets = None if label_sets is None else label_sets[first_sorted]
    return VisionLabels(positions[first_sorted], grouped, mix, sets)


def gather_vision_rows(hidden: Tensor, positions: Tensor) -> Tensor:
    """Hidden states [N, D] at ``positions`` [N, 2] = (batch index, sequence position)."""
    if positions.numel() == 0:
        return hidden.new_zeros((0, hidden.shape[-1])) + hidden.sum() * 0
    return hidden[positions[:, 0], positions[:, 1]]


def dvsft_loss(
    hidden: Tensor,
    lm_head: nn.Module | Tensor,
    labels: Tensor,
    vision_positions: Tensor | None = None,
    vision_targets: Tensor | None = None,
    vision_label_sets: Tensor | None = None,
    vision_weight: float = LossSettings.vision_lambda,
    eps: float = LossSettings.vision_eps,
    chunk_size: int = LossSettings.loss_chunk_size,
    tokens: StepTokens | None = None,
    label_smoothing: float = 0.0,
    vision_weights: Tensor | None = None,
) -> DVSFTLossOutput:
    """``L_text + vision_weight * L_vision`` in ONE pass over the LM head (text and vision rows share chunks).

    ``hidden`` [B, L, D] last hidden states (after the final norm); ``labels`` [B, L] text labels;
    the ``vision_*`` tensors as :class:`dvsft.data.collator.VisionCollator` returns them. With no
    vision rows (or ``vision_weight == 0``) this is exactly the chunked SFT loss. ``tokens``: the
    optimizer step's counts; ``loss`` is then this batch's share of the step's loss (each term a sum
    over this batch's rows divided by the step's count, times ``tokens.processes``); the logged
    ``text_loss`` / ``vision_loss`` stay this batch's means. ``label_smoothing`` smooths the text rows over
    the whole vocabulary (the HF Trainer's ``label_smoothing_factor``); ``eps`` smooths the vision rows.

    Multi-label: a position repeated in ``vision_positions`` is one token with several labels; its row goes
    through the LM head once, against the mixture of its labels weighted by ``vision_weights`` [N] (the
    collator's 1/k; normalised per token), plus the smoothing; it counts once in ``N_vision``.
    """
    check_smoothing(eps, "vision smoothing eps")
    check_smoothing(label_smoothing, "label_smoothing_factor")
    t_rows, t_targets = shifted_text_rows(hidden, labels)
    n_t = int(t_rows.shape[0])
    use_vision = vision_positions is not None and vision_weight != 0 and vision_positions.numel() > 0
    device = hidden.device
    if use_vision:
        sets_in = None if vision_label_sets is None else vision_label_sets.to(device)
        grouped = group_vision_labels(vision_positions.to(device), vision_targets.to(device), sets_in, vision_weights)
    n_v = int(grouped.positions.shape[0]) if use_vision else 0
    text_den = max(n_t, 1) if tokens is None else max(tokens.text, 1.0) / tokens.processes
    vision_den = n_v if tokens is None else max(tokens.vision, 1.0) / tokens.processes
    weights = [torch.full((n_t,), 1.0 / text_den, dtype=torch.float64, device=device)]
    eps_rows = [torch.zeros(n_t, dtype=torch.float64, device=device)]
    rows, targets, mix = [t_rows], [t_targets], None
    sets = None
    if use_vision:
        rows.append(gather_vision_rows(hidden, grouped.positions))
        targets.append(grouped.targets)
        weights.append(torch.full((n_v,), float(vision_weight) / vision_den, dtype=torch.float64, device=device))
        eps_rows.append(torch.full((n_v,), float(eps), dtype=torch.float64, device=device))
        if grouped.label_sets is not None and grouped.label_sets.shape[1] > 0:
            v_sets = grouped.label_sets
            sets = torch.cat([v_sets.new_full((n_t, v_sets.shape[1]), -1), v_sets])
        elif eps > 0:
            raise ValueError("vision smoothing (eps > 0) needs vision_label_sets")
        if grouped.mix is not None:  # the text rows: their one target in column 0, weight 1
            k = grouped.mix.shape[1]
            targets[0] = torch.cat([t_targets[:, None], t_targets.new_zeros((n_t, k - 1))], 1)
            text_mix = torch.zeros((n_t, k), dtype=torch.float64, device=device)
            text_mix[:, 0] = 1.0
            mix = torch.cat([text_mix, grouped.mix])
    vocab_eps = torch.zeros(n_t + n_v, dtype=torch.float64, device=device)
    vocab_eps[:n_t] = float(label_smoothing)
    loss, losses, correct = fused_linear_ce(
        torch.cat(rows), lm_head, torch.cat(targets), sets, torch.cat(eps_rows), torch.cat(weights), chunk_size,
        vocab_eps=vocab_eps, target_mix=mix,
    )  # fmt: skip
    zero = losses.new_zeros(())
    return DVSFTLossOutput(
        loss=loss,
        text_loss=losses[:n_t].mean() if n_t else zero,
        vision_loss=losses[n_t:].mean() if n_v else zero,
        n_text=n_t,
        n_vision=n_v,
        vision_correct_top1=correct[n_t:].sum(),
    )


def model_loss(
    model: nn.Module,
    batch: dict[str, Any],
    vision_weight: float = LossSettings.vision_lambda,
    eps: float = LossSettings.vision_eps,
    chunk_size: int = LossSettings.loss_chunk_size,
    tokens: StepTokens | None = None,
) -> DVSFTLossOutput:
    """The whole DV-SFT loss of a model on a :class:`~dvsft.data.collator.VisionCollator` batch.

    ``model`` as the Trainer hands it (DDP / FSDP / DeepSpeed / PEFT wrapped or not): its own forward
    runs (:func:`dvsft.objectives.base.forward_hidden`) and the LM head is applied in the chunked
    loss. ``vision_weight=0`` (or a batch without ``vision_positions``) gives the chunked SFT loss.
    ``tokens``: the optimizer step's token counts (:func:`step_tokens`) for exact gradient accumulation.
    """
    from dvsft.objectives.base import forward_hidden, lm_head_of

    hidden = forward_hidden(model, batch).last
    return dvsft_loss(
        hidden,
        lm_head_of(model),
        batch["labels"].to(hidden.device),
        batch.get("vision_positions"),
        batch.get("vision_targets"),
        batch.get("vision_label_sets"),
        vision_weight=vision_weight,
        eps=eps,
        chunk_size=chunk_size,
        tokens=tokens,
        vision_weights=batch.get("vision_weights"),
    )
