"""The demo's evaluations: does the model read the page, or guess from the language?

Three page sets, each scored teacher-forced (next-token accuracy of the reference transcription)
and by greedy transcription (word accuracy, CER):

* ``text``: held-out running text (prose never seen in training);
* ``random``: the demo vocabulary in random order (the paper's non-contextual OCR): a language
  prior cannot help here;
* ``swap``: the ``text`` pages, each scored against its own transcription but shown the image of
  another page. A model that reads falls to near zero; one that guesses from the language keeps
  its score.

Plus the vision-label top-1 of the visual tokens on the ``text`` pages, and the word accuracy of the ``text``
pages restricted to their long words (:data:`LONG_WORD` or more sub-tokens: those the paper's rule leaves
unlabeled).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

EVALS = ("text", "random", "swap")
EVAL_NAMES = {
    "text": "held-out running text",
    "random": "non-contextual (random word order)",
    "swap": "image swap (another page's image)",
}
METRICS = ("word_acc", "cer", "tf_acc")


def resolved(records: list[dict], records_file: Path) -> list[dict]:
    """Records with absolute image paths."""
    from dvsft.core.records import image_path

    return [{**r, "image": str(image_path(r, records_file))} for r in records]


def swapped(records: list[dict]) -> list[dict]:
    """Each record with the next record's image (a derangement: no page keeps its own)."""
    n = len(records)
    if n < 2:
        return []
    out = []
    for i, r in enumerate(records):
        other = records[(i + 1) % n]
        out.append({**r, "image": other["image"], "width": other["width"], "height": other["height"]})
    return out


def teacher_forced(model: Any, collator: Any, records: list[dict], batch_size: int = 16) -> float:
    """Next-token accuracy over the reference transcription tokens (end-of-turn token included)."""
    import torch

    from dvsft.experiments.demo_text import token_accuracy
    from dvsft.objectives.base import model_inputs

    hits = total = 0
    for i in range(0, len(records), batch_size):
        batch = collator(records[i : i + batch_size])
        with torch.inference_mode():
            logits = model(**model_inputs(batch)).logits
        h, t = token_accuracy(logits, batch["labels"])
        hits, total = hits + h, total + t
    return hits / max(total, 1)


def predictions(
    model: Any, processor: Any, records: list[dict], max_new_tokens: int, batch_size: int = 16
) -> list[tuple[str, str]]:
    """(greedy answer, reference) per record: its first user turn (without the image placeholder) as the prompt,
    its last turn as the reference."""
    from dvsft.core.images import load_image
    from dvsft.core.records import IMAGE_PLACEHOLDER
    from dvsft.evaluation.generation import Generator

    generator = Generator(model, processor, max_new_tokens=max_new_tokens)
    out = []
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        images = [[load_image(r["image"])] for r in batch]
        prompts = [r["messages"][0]["content"].replace(IMAGE_PLACEHOLDER, "") for r in batch]
        out += [(pred, r["messages"][-1]["content"]) for r, pred in zip(batch, generator(prompts, images), strict=True)]
    return out


def transcriptions(model: Any, processor: Any, records: list[dict], batch_size: int = 16) -> list[tuple[str, str]]:
    """(greedy transcription, reference) of each page."""
    max_new_tokens = max(len(r["words"]) for r in records) * 3 + 8
    return predictions(model, processor, records, max_new_tokens, batch_size)


def greedy(model: Any, processor: Any, records: list[dict], batch_size: int = 16) -> tuple[float, float]:
    """(word accuracy, CER) of greedy transcriptions against each record's reference."""
    return word_scores(transcriptions(model, processor, records, batch_size))


def word_scores(pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """(mean word accuracy, mean CER) of (transcription, reference) pairs."""
    from dvsft.evaluation.metrics import cer, word_accuracy

    accs = [word_accuracy(pred, ref) for pred, ref in pairs]
    cers = [cer(pred, ref) for pred, ref in pairs]
    return statistics.fmean(accs), statistics.fmean(cers)


LONG_WORD = 4  # sub-tokens: the paper's rule drops longer-than-3 words, the span policy labels them


def long_word_accuracy(pairs: list[tuple[str, str]], tokenizer: Any, min_subtokens: int = LONG_WORD) -> float:
    """Share of the reference words whose label tokenization (:func:`~dvsft.align.aligner.first_token_ids`, with
    the leading space) has at least ``min_subtokens`` sub-tokens that the transcription holds (each occurrence
    matched once, in any order); NaN when the references hold no such word."""
    from collections import Counter

    from dvsft.align.aligner import first_token_ids

    hits = total = 0
    for pred, ref in pairs:
        words = ref.split()
        ids = first_token_ids(words, tokenizer, leading_space=True)
        long = Counter(w for w, i in zip(words, ids, strict=True) if len(i) >= min_subtokens)
        hits += sum((long & Counter(pred.split())).values())
        total += sum(long.values())
    return hits / total if total else float("nan")


def evaluate(
    model: Any, processor: Any, sets: dict[str, list[dict]], vision_pages: int = 16, cache_dir: str | None = "auto"
) -> dict[str, float]:
    """Every evaluation of one model: ``{set}_{metric}`` for the sets and metrics above, ``vision_top1`` and
    ``text_long_word_acc``.

    ``sets`` maps ``text`` and ``random`` to records with absolute image paths. The teacher-forced pages are
    encoded through the encoded-sample cache (``cache_dir``: see ``encoded_cache_dir``, ``none`` for none), so the
    later evaluations of a demo, in any of its processes, read them back.
    """
    from dvsft.data.collator import VisionCollator
    from dvsft.lens.visual_logits import vision_label_accuracy

    was_training = model.training
    model.eval()
    collator = VisionCollator(processor, vision_labels=False, cache_dir=cache_dir)
    out: dict[str, float] = {}
    pages = {"text": sets["text"], "random": sets["random"], "swap": swapped(sets["text"])}
    for name in EVALS:
        out[f"{name}_tf_acc"] = teacher_forced(model, collator, pages[name])
        pairs = transcriptions(model, processor, pages[name])
        out[f"{name}_word_acc"], out[f"{name}_cer"] = word_scores(pairs)
        if name == "text":
            out["text_long_word_acc"] = long_word_accuracy(pairs, processor.tokenizer)
    out["vision_top1"] = vision_label_accuracy(model, processor, sets["text"][:vision_pages])["top1"]
    model.train(was_training)
    return out


def transcription(model: Any, processor: Any, records: list[dict], records_file: Path) -> dict[str, float]:
    """Greedy word accuracy and CER, and vision-label top-1, on one page set (as `dvsft compare` reports)."""
    from dvsft.lens.visual_logits import vision_label_accuracy

    pages = resolved(records, records_file)
    word_acc, char_err = greedy(model, processor, pages)
    return {
        "word_acc": word_acc,
        "cer": char_err,
        "vision_top1": vision_label_accuracy(model, processor, pages)["top1"],
    }
