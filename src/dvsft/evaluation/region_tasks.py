"""Scores of the GranViT / FineViT region tasks: a model's answers about boxes and texts on a page."""

from __future__ import annotations

import statistics
from typing import Any

from dvsft.core.records import IMAGE_PLACEHOLDER
from dvsft.evaluation.generation import Generator
from dvsft.evaluation.metrics import iou, rouge_l
from dvsft.sources.region_tasks import TASKS, BoxCodec


def region_task_scores(model: Any, processor: Any, items: list[dict], batch_size: int = 16) -> dict[str, float]:
    """Greedy answers to region-task records (:mod:`dvsft.sources.region_tasks`), scored per task:
    ROUGE-L of box-to-text answers (``<task>_rouge``), Acc@IoU0.5 of text-to-box answers (``<task>_acc``)."""
    from dvsft.core.images import load_image

    codec = BoxCodec()
    generator = Generator(model, processor, max_new_tokens=48)
    scores: dict[str, list[float]] = {}
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        prompts = [r["messages"][0]["content"].replace(IMAGE_PLACEHOLDER, "") for r in batch]
        images = [[load_image(r["image"])] for r in batch]
        for r, pred in zip(batch, generator(prompts, images), strict=True):
            task = r["tasks"][0]
            if TASKS[task["name"]].answers_box:
                box = codec.parse(pred, r["width"], r["height"])
                score = float(box is not None and iou(box, task["box"]) >= 0.5)
                key = f"{task['name']}_acc"
            else:
                score = rouge_l(pred, task["text"])
                key = f"{task['name']}_rouge"
            scores.setdefault(key, []).append(score)
    return {k: statistics.fmean(v) for k, v in scores.items()}
