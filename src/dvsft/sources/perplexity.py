"""Perplexity filter for rendered QA pairs (paper appendix A.1; its conditions are lost from the text).

The paper keeps SQuAD pairs that are relevant to their document and fluent, judged by the
perplexity of a small unimodal LM (Qwen3-0.6B). With a local causal LM each pair gets:

- ``answer_ppl`` = ppl(" " + answer | document + "\\n\\nQuestion: " + question + "\\nAnswer:"): how
  predictable the answer is once the model has read the document and the question. High: a
  non-fluent or oddly cut answer span, or one the model cannot find in the document.
- ``answer_ppl_no_doc`` = ppl(" " + answer | "Question: " + question + "\\nAnswer:"): the same
  answer without the document.
- ``doc_gain`` = answer_ppl_no_doc / answer_ppl: how much reading the document helps. Near or
  below 1 the answer is guessable from the question alone (world knowledge, "yes", a year), so
  the pair does not make the model read the image: the relevance criterion of
  ``min_doc_gain``.
- ``question_ppl`` = ppl(" " + question | document + "\\n\\nQuestion:"): how expected the
  question is after the document. High: weakly related to the document, or oddly phrased.

A pair is dropped when ``answer_ppl`` > ``max_answer_ppl``, ``question_ppl`` > ``max_question_ppl``
or ``doc_gain`` < ``min_doc_gain``. There are no default thresholds: perplexities are on the scale
of the scoring model and its tokenizer, and the paper's values did not survive. Score a run without
thresholds, read the quantiles in ``render_stats.json`` (``ppl_quantiles``) and choose there.
Context and target are tokenized separately and concatenated, so the target's tokens are exact;
a context that is too long is cut from the left (the question is kept).
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


def no_document_context(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


SCORES = ("answer_ppl", "answer_ppl_no_doc", "doc_gain", "question_ppl")


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
        """``[{"answer_ppl", "answer_ppl_no_doc", "doc_gain", "question_ppl"}]`` for (document, question, answer)."""
        a = self.score([(answer_context(d, q), " " + ans.strip()) for d, q, ans in items], progress)
        bare = self.score([(no_document_context(q), " " + ans.strip()) for _, q, ans in items], progress)
        q = self.score([(question_context(d), " " + q.strip()) for d, q, _ in items], progress)
        return [
            {"answer_ppl": x, "answer_ppl_no_doc": y, "doc_gain": y / x, "question_ppl": z}
            for x, y, z in zip(a, bare, q, strict=True)
        ]


def keep_pair(
    scores: dict[str, float],
    max_answer_ppl: float | None,
    max_question_ppl: float | None,
    min_doc_gain: float | None = None,
) -> str | None:
    """None to keep a pair, else the name of the filter that drops it."""
    if max_answer_ppl is not None and scores["answer_ppl"] > max_answer_ppl:
        return "answer_ppl"
    if max_question_ppl is not None and scores["question_ppl"] > max_question_ppl:
        return "question_ppl"
    if min_doc_gain is not None and scores["doc_gain"] < min_doc_gain:
        return "doc_gain"
    return None


def quantiles(values: Sequence[float], levels: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)) -> dict:
    """``{"p5": ..., "p50": ..., ...}``: linear-interpolated quantiles of ``values`` (empty: ``{}``)."""
    data = sorted(values)
    if not data:
        return {}
    out = {}
    for q in levels:
        pos = q * (len(data) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        out[f"p{round(q * 100)}"] = round(data[lo] + (data[hi] - data[lo]) * (pos - lo), 4)
    return out
