"""Perplexity filter for rendered QA pairs (paper appendix A.1: Qwen3-0.6B; thresholds were lost).

With a local causal LM:

- answer perplexity   = ppl(" " + answer   | document + "\\n\\nQuestion: " + question + "\\nAnswer:")
- question perplexity = ppl(" " + question | document + "\\n\\nQuestion:")

A pair whose answer perplexity is high is a weak or non-fluent answer; a high question
perplexity means the question is weakly related to the document. Pairs above the thresholds
are dropped. Context and target are tokenized separately and concatenated, so the target's
tokens are exact; a context that is too long is cut from the left (the question is kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def answer_context(document: str, question: str) -> str:
    return f"{document}\n\nQuestion: {question.strip()}\nAnswer:"


def question_context(document: str) -> str:
    return f"{document}\n\nQuestion:"


class PerplexityScorer:
    """Batched target perplexities under a local causal LM (``AutoModelForCausalLM``, no remote code)."""

    def __init__(self, model_dir: str | Path, batch_size: int = 8, max_length: int = 2048, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"--ppl-model {model_dir}: not a model directory (no config.json)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def _ids(self, context: str, target: str) -> tuple[list[int], list[int]]:
        ctx = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        tgt = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        if not tgt:
            raise ValueError(f"empty target text {target!r}")
        tgt = tgt[: self.max_length - 1]
        ctx = ctx[-(self.max_length - len(tgt)) :] if ctx else ctx
        bos = self.tokenizer.bos_token_id
        if not ctx:  # the first target token needs something to be predicted from
            ctx = [bos if bos is not None else self.pad_id]
        return ctx, tgt

    def score(self, pairs: Sequence[tuple[str, str]], progress: Callable[[int], Any] | None = None) -> list[float]:
        """Perplexity of each ``target`` given its ``context``."""
        import torch

        out: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = [self._ids(c, t) for c, t in pairs[start : start + self.batch_size]]
            length = max(len(c) + len(t) for c, t in chunk)
            keep = max(len(t) for _, t in chunk) + 1
            ids = torch.full((len(chunk), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (c, t) in enumerate(chunk):  # left padding: every target ends the row
                seq = c + t
                ids[i, length - len(seq) :] = torch.tensor(seq)
                mask[i, length - len(seq) :] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = (
                    self.model(
                        input_ids=ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        position_ids=position_ids.to(self.device),
                        logits_to_keep=keep,
                    )
                    .logits[:, -keep:-1]
                    .float()
                )
            logp = torch.log_softmax(logits, dim=-1)
            for i, (_, t) in enumerate(chunk):
                n = len(t)
                target = torch.tensor(t, device=logp.device)
                nll = -logp[i, keep - 1 - n :].gather(-1, target[:, None]).mean().item()
                out.append(math.exp(nll))
            if progress is not None:
                progress(len(chunk))
        return out

    def qa_scores(
        self, items: Sequence[tuple[str, str, str]], progress: Callable[[int], Any] | None = None
    ) -> list[dict[str, float]]:
        """``[{"answer_ppl", "question_ppl"}]`` for (document, question, answer) triples."""
        answer_pairs = [(answer_context(d, q), " " + a.strip()) for d, q, a in items]
        question_pairs = [(question_context(d), " " + q.strip()) for d, q, _ in items]
        a = self.score(answer_pairs, progress)
        q = self.score(question_pairs, progress)
        return [{"answer_ppl": x, "question_ppl": y} for x, y in zip(a, q, strict=True)]


def keep_pair(scores: dict[str, float], max_answer_ppl: float | None, max_question_ppl: float | None) -> str | None:
    """None to keep a pair, else the name of the filter that drops it."""
    if max_answer_ppl is not None and scores["answer_ppl"] > max_answer_ppl:
        return "answer_ppl"
    if max_question_ppl is not None and scores["question_ppl"] > max_question_ppl:
        return "question_ppl"
    return None
