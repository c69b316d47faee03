"""BASIC (Tang et al., ICCV 2025) as DV-SFT reproduced it: self-distilled supervision of the projector.

The projector's visual embeddings ``v`` (the LLM's input at image positions) are pulled towards the
LLM's own hidden states ``h_l`` of the same visual tokens at early-to-middle layers ``l``, which act as
fixed (stop-gradient) targets:

    L_basic = mean_l [ ||v/|v| - h_l/|h_l| ||^2  +  lambda2 * KL(softmax(W n(h_l)) || softmax(W n(v))) ]

averaged over visual tokens, layers weighted uniformly (DV-SFT disabled BASIC's attention-based
weighting for FlashAttention compatibility); ``W`` is ``lm_head`` and ``n`` the LLM's final norm
(a logit lens). The KL runs over chunks of visual tokens, each recomputed in the backward pass, so
no ``tokens x vocab`` tensor is kept. By default only the projector and the first LLM layer train.
"""

from __future__ import annotations

from dataclasses import dataclass

from dvsft.objectives.base import HiddenStates, Objective, language_model_of, lm_head_of


@dataclass
class BasicOptions:
    weight: float = 1.0  # weight of L_basic in the total loss (the text loss has weight 1)
    lambda2: float = 0.01  # weight of the KL term inside L_basic (BASIC paper)
    layers: list[int] | None = None  # target layers (1-based decoder outputs); None = 1 .. num_layers // 2
    chunk_size: int = 512  # visual tokens per KL chunk


def target_layers(num_layers: int, layers: list[int] | None) -> list[int]:
    """The early-to-middle layers whose hidden states supervise the projector."""
    if layers is None:
        return list(range(1, max(1, num_layers // 2) + 1))
    bad = [i for i in layers if not 1 <= int(i) <= num_layers]
    if bad or not layers:
        raise ValueError(f"objectives.basic.layers must be non-empty, within 1..{num_layers}; got {layers}")
    return [int(i) for i in layers]


def _kl_chunk(student, target, norm, weight, bias):
    import torch
    import torch.nn.functional as F

    log_q = torch.log_softmax(F.linear(norm(student), weight, bias).float(), dim=-1)
    with torch.no_grad():
        log_p = torch.log_softmax(F.linear(norm(target), weight, bias).float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).sum()


def kl_logit_lens(student, target, norm, head, chunk_size: int = 512):
    """Sum over tokens of KL(p_target || p_student) of the vocabulary projections, chunked with recompute.

    The chunks run as ``head``'s own forward (:func:`~dvsft.objectives.losses.through_head`), so DeepSpeed
    ZeRO-3 and FSDP gather the head's weight for them and again for their recompute in the backward.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from dvsft.objectives.losses import through_head

    def chunks(inner, student, target):
        weight, bias = inner.weight, getattr(inner, "bias", None)
        total = student.new_zeros((), dtype=torch.float32)
        for i in range(0, student.shape[0], chunk_size):
            s, t = student[i : i + chunk_size], target[i : i + chunk_size]
            if torch.is_grad_enabled() and s.requires_grad:
                total = total + checkpoint(_kl_chunk, s, t, norm, weight, bias, use_reentrant=False)
            else:
                total = total + _kl_chunk(s, t, norm, weight, bias)
        return total

    return through_head(head, chunks, student, target)


class BasicObjective(Objective):
    """Direction (normalised MSE) + lambda2 * KL between projector outputs and the LLM's own hidden states."""

    requires = ("sft",)
    needs_hidden_states = True
    train_llm = "first_layer"
    Options = BasicOptions

    def weights(self) -> dict[str, float]:
        return {"basic_loss": float(self.options.weight)}

    def loss(self, model, batch, hidden: HiddenStates):
        import torch
        import torch.nn.functional as F

        if hidden.layers is None:
            raise ValueError("the BASIC objective needs all hidden states (needs_hidden_states)")
        lm = language_model_of(model)
        layers = target_layers(len(lm.layers), self.options.layers)
        mask = hidden.image_mask
        v = hidden.layers[0][mask]  # projector output at the visual positions [M, D]
        if v.shape[0] == 0:
            zero = hidden.last.sum() * 0.0
            return {"basic_loss": zero, "basic_dir": zero.detach(), "basic_kl": zero.detach()}
        head, norm = lm_head_of(model), lm.norm
        v_dir = F.normalize(v.float(), dim=-1)
        direction = v.new_zeros((), dtype=torch.float32)
        kl = v.new_zeros((), dtype=torch.float32)
        for layer in layers:
            t = hidden.layers[layer][mask].detach()
            direction = direction + (v_dir - F.normalize(t.float(), dim=-1)).pow(2).sum(-1).mean()
            kl = kl + kl_logit_lens(v, t, norm, head, self.options.chunk_size) / v.shape[0]
        direction, kl = direction / len(layers), kl / len(layers)
        total = direction + float(self.options.lambda2) * kl
        return {"basic_loss": total, "basic_dir": direction.detach(), "basic_kl": kl.detach()}
