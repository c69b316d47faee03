"""ASVR head and loss: predict each visual token's semantic code from the LLM hidden state at its position.

No shift: the hidden state at visual position j predicts the code of token j (as DV-SFT's vision loss).
One level: an MLP and a linear classifier. Several (residual) levels: the MLP output starts a short
sequence that a small causal "depth" transformer extends with the embeddings of the previous levels'
codes (teacher forcing), as in RQ-style depth decoders; level l is read at sequence position l.
The loss is cross-entropy averaged over levels (and over labeled tokens within a level).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dvsft.objectives.base import (
    HiddenStates,
    Objective,
    base_model,
    family_of,
    image_token_mask,
    processor_callback,
)

log = logging.getLogger(__name__)


class ASVRHead(nn.Module):
    def __init__(self, hidden_size: int, k: int, levels: int = 1, dim: int | None = None, depth_layers: int = 1):
        super().__init__()
        if levels < 1 or k < 2:
            raise ValueError(f"ASVR head needs levels >= 1 and k >= 2, got levels={levels}, k={k}")
        d = dim or min(hidden_size, 1024)
        self.k, self.levels = k, levels
        self.mlp = nn.Sequential(nn.Linear(hidden_size, d), nn.GELU(), nn.Linear(d, d))
        self.out = nn.Linear(d, k)
        if levels > 1:
            heads = next(h for h in (8, 4, 2, 1) if d % h == 0)
            self.code_embed = nn.Embedding(k * (levels - 1), d)
            self.level_embed = nn.Parameter(torch.zeros(levels, d))
            layer = nn.TransformerEncoderLayer(
                d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True
            )
            self.depth = nn.TransformerEncoder(layer, depth_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, levels, k) from hidden states (N, hidden); ``codes`` (N, levels) feed the depth decoder."""
        h = self.mlp(hidden)
        if self.levels == 1:
            return self.out(h)[:, None]
        if codes is None:
            return self.generate_logits(h)
        offsets = torch.arange(self.levels - 1, device=codes.device) * self.k
        prev = self.code_embed(codes[:, :-1] + offsets)  # (N, levels-1, d)
        seq = torch.cat([h[:, None], prev], 1) + self.level_embed
        mask = nn.Transformer.generate_square_subsequent_mask(self.levels, device=h.device, dtype=h.dtype)
        return self.out(self.norm(self.depth(seq, mask=mask, is_causal=True)))

    @torch.no_grad()
    def generate_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Greedy decoding over levels (inference; training uses teacher forcing)."""
        codes = torch.zeros(h.shape[0], self.levels, dtype=torch.long, device=h.device)
        logits = None
        for level in range(self.levels):
            offsets = torch.arange(self.levels - 1, device=h.device) * self.k
            prev = self.code_embed(codes[:, :-1] + offsets)
            seq = torch.cat([h[:, None], prev], 1)[:, : level + 1] + self.level_embed[: level + 1]
            mask = nn.Transformer.generate_square_subsequent_mask(level + 1, device=h.device, dtype=h.dtype)
            logits = self.out(self.norm(self.depth(seq, mask=mask)))
            codes[:, level] = logits[:, level].argmax(-1)
        return logits


def asvr_terms(head: ASVRHead, hidden: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, level-0 top-1 accuracy): cross-entropy against ``codes`` (N, levels), averaged over levels."""
    if hidden.shape[0] != codes.shape[0]:
        raise ValueError(f"{hidden.shape[0]} visual hidden states but {codes.shape[0]} code rows")
    if codes.shape[1] != head.levels:
        raise ValueError(f"codes have {codes.shape[1]} levels, the head predicts {head.levels}")
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0
        return zero, zero.detach()
    codes = codes.to(hidden.device).long()
    logits = head(hidden, codes).float()
    per_level = [F.cross_entropy(logits[:, lv], codes[:, lv]) for lv in range(head.levels)]
    acc = (logits[:, 0].argmax(-1) == codes[:, 0]).float().mean().detach()
    return torch.stack(per_level).mean(), acc


def asvr_loss(head: ASVRHead, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's predictions against ``codes`` (N, levels), averaged over levels."""
    return asvr_terms(head, hidden, codes)[0]


# ---------------------------------------------------------------- the `asvr` training objective


@dataclass
class ASVROptions:
    codes: str | None = None  # codes dir from `dvsft codes fit` (required)
    weight: float = 1.0  # ASVR adds its loss unweighted (1.0)
    head_dim: int | None = None  # width of the head (default: the LLM hidden size, at most 1024)
    depth_layers: int = 1  # depth-transformer layers when the codebook has several levels
    frozen_tokenizer: bool = True  # codes from a frozen copy of the initial vision parts (else the live ones)


class ASVRObjective(Objective):
    """Predict each visual token's semantic code from the LLM's last hidden state at its position."""

    requires = ("sft",)
    needs_records = True  # image paths in the batch: codes are read from the code cache
    Options = ASVROptions

    def setup(self, model: nn.Module, config: Any) -> None:
        from dvsft.objectives.codes import Codebook, CodeCache, model_fingerprint

        opts = self.options
        if not opts.codes:
            raise ValueError(
                "objectives.asvr.codes is not set: fit codes first (`dvsft codes fit --model DIR --records "
                "words.jsonl --out codes/`) and pass --objectives.asvr.codes codes/"
            )
        self.codebook = Codebook.load(opts.codes)
        base = base_model(model)
        fp = model_fingerprint(base)
        expected = self.codebook.meta.get("model_fingerprint")
        if expected and expected != fp:
            log.warning(
                "ASVR codes in %s were fitted on another vision tower (%s, this model: %s); codes are computed with "
                "this model's features",
                opts.codes,
                expected,
                fp,
            )
        hidden_size = base.config.get_text_config().hidden_size
        self.head = ASVRHead(hidden_size, self.codebook.k, self.codebook.levels, opts.head_dim, opts.depth_layers)
        # the frozen tokenizer: a copy of the initial vision parts (tower, projector) that codes are computed with
        parts = family_of(base).vision_parts(base)
        self.tokenizer = copy.deepcopy(parts).requires_grad_(False).eval() if opts.frozen_tokenizer else None
        self._centroids = None
        # the cache of `dvsft codes fit/encode`, valid while codes come from the fitted (initial) tower; read once
        # the run's processor tells the resolution (:meth:`callbacks`)
        self.cache = CodeCache(opts.codes, fp, self.codebook.id) if opts.frozen_tokenizer else None
        self.resolution: dict[str, Any] | None = None

    def callbacks(self) -> list[Any]:
        """The run's processor gives the resolution that keys the code cache."""
        from dvsft.objectives.codes import resolution

        def receive(processor: Any) -> None:
            self.resolution = resolution(processor) if processor is not None else None

        return [processor_callback(receive)]

    def modules(self) -> dict[str, nn.Module]:
        return {"asvr_head": self.head}

    def weights(self) -> dict[str, float]:
        return {"asvr_loss": float(self.options.weight)}

    @torch.no_grad()
    def computed_codes(self, model: nn.Module, batch: dict[str, Any], counts: list[int]) -> list[torch.Tensor]:
        """Codes per sample (``counts`` visual tokens each) from the frozen tokenizer's features (or the live
        vision parts')."""
        from dvsft.objectives.codes import image_features

        device = batch["input_ids"].device
        if self.tokenizer is not None:
            self.tokenizer.to(device)
        feats = image_features(model, batch, counts, self.tokenizer)
        if self._centroids is None or self._centroids[0].device != device:
            self._centroids = [c.to(device) for c in self.codebook.centroids]
        out = []
        for f in feats:
            residual, levels = f.float(), []
            for c in self._centroids:
                d = (residual * residual).sum(1, keepdim=True) - 2 * residual @ c.T + (c * c).sum(1)[None]
                idx = d.argmin(1)
                levels.append(idx)
                residual = residual - c[idx]
            out.append(torch.stack(levels, 1))
        return out

    @torch.no_grad()
    def batch_codes(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Codes (visual tokens of the batch, levels): from the code cache when the batch carries its records
        (image paths) and the run's resolution is known, otherwise (and for cache misses) computed from the
        batch's pixel inputs."""
        counts = image_token_mask(model, batch["input_ids"]).sum(1).tolist()
        records, settings = batch.get("records"), self.resolution
        if records is None or self.cache is None or settings is None:
            return torch.cat(self.computed_codes(model, batch, counts))
        cached = [self.cache.get(r["image"], settings) for r in records]
        if any(c is None or len(c) != n for c, n in zip(cached, counts, strict=True)):
            computed = self.computed_codes(model, batch, counts)
            for i, rec in enumerate(records):
                if cached[i] is None or len(cached[i]) != counts[i]:
                    cached[i] = computed[i].cpu().numpy()
                    self.cache.put(rec["image"], settings, cached[i])
        device = batch["input_ids"].device
        return torch.cat([torch.as_tensor(c, dtype=torch.long) for c in cached]).to(device)

    def loss(self, model, batch, hidden: HiddenStates):
        codes = self.batch_codes(model, batch)
        vis = hidden.last[hidden.image_mask]
        if vis.shape[0] != codes.shape[0]:
            raise ValueError(
                f"ASVR: {vis.shape[0]} visual positions in the sequences but {codes.shape[0]} codes of the images' "
                "visual tokens"
            )
        head_dtype = next(self.head.parameters()).dtype
        value, acc = asvr_terms(self.head, vis.to(head_dtype), codes)
        return {"asvr_loss": value, "asvr_acc": acc}
