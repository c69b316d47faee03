"""ASVR head and loss: predict each visual token's semantic code from the LLM hidden state at its position.

No shift: the hidden state at visual position j predicts the code of token j (as DV-SFT's vision loss).
One level: an MLP and a linear classifier. Several (residual) levels: the MLP output starts a short
sequence that a small causal "depth" transformer extends with the embeddings of the previous levels'
codes (teacher forcing), as in RQ-style depth decoders; level l is read at sequence position l.
The loss is cross-entropy averaged over levels (and over labeled tokens within a level).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


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


def asvr_loss(head: ASVRHead, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's predictions against ``codes`` (N, levels), averaged over levels."""
    if hidden.shape[0] != codes.shape[0]:
        raise ValueError(f"{hidden.shape[0]} visual hidden states but {codes.shape[0]} code rows")
    if codes.shape[1] != head.levels:
        raise ValueError(f"codes have {codes.shape[1]} levels, the head predicts {head.levels}")
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    codes = codes.to(hidden.device).long()
    logits = head(hidden, codes).float()
    per_level = [F.cross_entropy(logits[:, lv], codes[:, lv]) for lv in range(head.levels)]
    return torch.stack(per_level).mean()
