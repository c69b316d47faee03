"""The demo's text stage: the tiny LLM learns to read out words before any vision encoder is grafted.

The paper fine-tunes a pretrained LLM (Qwen3-VL, or Qwen3 with a grafted encoder) that can already
copy text. The demo's tiny LLM starts from scratch, so it first learns that skill on *oracle
pages*: each page's transcription task exactly as the vision-language model sees it (same chat
template, same visual-token grid and 3-D positions), but every visual token is the input embedding
of the word whose bottom-right corner it holds (the DV-SFT label) and the embedding of the image
pad token where no word ends. No pixels, no vision tower: a cheap step.

Both methods then start from the same text-trained LLM with a fresh vision tower (the graft
setting), so the comparison stays fair; the LLM is cached in ``out/data`` like the pages.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from dvsft.align.aligner import align_words
from dvsft.data.collator import VisionCollator, to_processor_messages
from dvsft.models.geometry import grid_for


def oracle_encode(record: dict[str, Any], collator: VisionCollator) -> dict[str, torch.Tensor]:
    """One record as token ids, text labels and per-cell oracle ids (no image is read)."""
    processor, tok = collator.processor, collator.tokenizer
    grid = grid_for(processor, int(record["width"]), int(record["height"]))
    messages = to_processor_messages(record["messages"])
    rid = str(record.get("id", "?"))
    text, spans = collator.answer_spans(messages, rid)
    n = grid.num_tokens
    enc = tok(
        text.replace(collator.image_token, collator.image_token * n),
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    ids = enc["input_ids"][0]
    grow = (n - 1) * len(collator.image_token)  # characters the image placeholder grew by
    labels = collator.text_labels(ids, enc["offset_mapping"][0], text, spans, grow, rid)
    cells = torch.full((n,), collator.image_token_id, dtype=torch.long)
    for lab in align_words(record.get("words") or [], grid, tokenizer=tok, config=collator.align_config).labels:
        cells[lab["token"]] = int(lab["token_id"])
    return {"input_ids": ids, "labels": labels, "cells": cells, "thw": torch.tensor(grid.grid_thw)}


def oracle_batch(encoded: list[dict[str, torch.Tensor]], pad_id: int, image_id: int) -> dict[str, torch.Tensor]:
    length = max(e["input_ids"].numel() for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        k = e["input_ids"].numel()
        ids[i, :k], labels[i, :k], mask[i, :k] = e["input_ids"], e["labels"], 1
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == image_id).int(),
        "image_grid_thw": torch.stack([e["thw"] for e in encoded]),
        "cells": torch.cat([e["cells"] for e in encoded]),
    }


def oracle_forward(model: Any, batch: dict[str, torch.Tensor]) -> Any:
    """The model on a batch whose visual tokens are the oracle cells' input embeddings."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    cells = model.get_input_embeddings()(batch["cells"])
    merge = model.config.vision_config.spatial_merge_size**2
    per_image = [int(t.prod()) // merge for t in batch["image_grid_thw"]]
    image = BaseModelOutputWithDeepstackFeatures(pooler_output=list(cells.split(per_image)), deepstack_features=[])
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        mm_encoder_outputs={"image": image},
    )


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) next-token predictions over the labeled positions."""
    pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
    keep = gold != -100
    return int((pred[keep] == gold[keep]).sum()), int(keep.sum())


@torch.no_grad()
def oracle_accuracy(model: Any, encoded: list[dict[str, torch.Tensor]], pad_id: int, image_id: int) -> float:
    """Teacher-forced token accuracy of the transcriptions of oracle pages."""
    was = model.training
    model.eval()
    hits = total = 0
    for i in range(0, len(encoded), 32):
        batch = oracle_batch(encoded[i : i + 32], pad_id, image_id)
        h, t = token_accuracy(oracle_forward(model, batch).logits, batch["labels"])
        hits, total = hits + h, total + t
    model.train(was)
    return hits / max(total, 1)


def train_text(
    base_dir: Path,
    records: list[dict[str, Any]],
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    out_dir: Path,
    probes: dict[str, list[dict[str, Any]]] | None = None,
    on_probe: Any = None,
    probe_every: int = 0,
) -> Path:
    """Train the LLM of the tiny model in ``base_dir`` on oracle pages; save it to ``out_dir``.

    ``probes`` (name -> records) are scored every ``probe_every`` steps and at the end, reported
    to ``on_probe(step, {name: accuracy})``.
    """
    from dvsft.models.loading import load_model, load_processor, save_processor

    torch.manual_seed(seed)
    model = load_model(base_dir)
    model.config.use_cache = False
    processor = load_processor(base_dir)
    collator = VisionCollator(processor)
    pad_id, image_id = collator.pad_token_id, collator.image_token_id
    encoded = [oracle_encode(r, collator) for r in records]
    probe_sets = {k: [oracle_encode(r, collator) for r in v] for k, v in (probes or {}).items()}
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.visual"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(seed)
    order: list[int] = []
    model.train()

    def probe(step: int) -> None:
        if probe_sets and on_probe is not None:
            on_probe(step, {k: oracle_accuracy(model, v, pad_id, image_id) for k, v in probe_sets.items()})

    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        loss = oracle_forward(model, oracle_batch([encoded[i] for i in idx], pad_id, image_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if probe_every and (step + 1) % probe_every == 0 and step + 1 < steps:
            probe(step + 1)
    probe(steps)
    model.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir)
    return out_dir


def graft(text_dir: Path, base_dir: Path) -> None:
    """Replace the LLM of the tiny model in ``base_dir`` (fresh vision tower) by the text-trained one."""
    from safetensors.torch import load_file, save_file

    text = load_file(str(text_dir / "model.safetensors"))
    path = base_dir / "model.safetensors"
    weights = load_file(str(path))
    for key, value in text.items():
        if not key.startswith("model.visual") and key in weights:
            weights[key] = value
    save_file(weights, str(path), metadata={"format": "pt"})
