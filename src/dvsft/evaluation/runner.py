"""Run one benchmark: generate in batches, append predictions durably, score, write the outputs.

Outputs under ``OUT/<bench>/``: ``predictions.jsonl`` (one row per item, appended as batches
finish, so a killed run resumes where it stopped), ``scores.json``, ``run.json`` (the settings;
a resume with different settings is refused; one whose model weights or data changed since, by their
sha256, discards the earlier predictions and generates every item again), ``errors.jsonl`` (items
skipped with ``skip_bad``: id and reason) and, for DocVQA/InfoVQA, ``submission.json``. Without
``skip_bad`` an unreadable item stops the run with an error naming it, after the items before it are
generated and saved.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from dvsft.core.records import JsonlAppender, read_jsonl
from dvsft.evaluation import metrics as M
from dvsft.evaluation.benchmarks import Benchmark
from dvsft.evaluation.items import EvalItem

PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
RUN = "run.json"
SUBMISSION = "submission.json"
ERRORS = "errors.jsonl"
SCORING_ONLY = ("metric_rules",)  # settings that change scores, not predictions: a resume may change them
# what the predictions were made from, by content: a resume after a change generates every item again
CONTENT = {"model_sha256": "model weights", "data_sha256": "data"}
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def expand_scales(items: Iterable[EvalItem], scales: list[float]) -> Iterator[EvalItem]:
    """One item per resolution scale (OCR tasks): ids ``{id}@{scale}``, the scale in ``meta``."""
    for item in items:
        for s in scales:
            yield replace(item, id=f"{item.id}@{s}", meta={**item.meta, "scale": s})


def scaled(image: Image.Image, scale: float) -> Image.Image:
    """``image`` resized by ``scale`` (bicubic), before the processor's own resize."""
    if scale == 1.0:
        return image
    w, h = image.size
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def content_sha256(path: str | Path, patterns: tuple[str, ...] = ("**/*",)) -> str:
    """sha256 of a file's bytes, or of a folder's files matching ``patterns`` (their relative names and
    bytes; hidden files and folders left out). Read every time: nothing is cached."""
    root = Path(path)
    if root.is_file():
        files = [root]
    else:
        found = {f for pattern in patterns for f in root.glob(pattern) if f.is_file()}
        files = sorted(f for f in found if not any(part.startswith(".") for part in f.relative_to(root).parts))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def check_settings(out: Path, settings: dict[str, Any]) -> str | None:
    """Refuse to mix predictions made with different settings in one predictions file.

    Predictions made from other model weights or data (:data:`CONTENT`) are deleted instead: the
    return value says what changed (None when nothing did).
    """
    run_file, pred_file = out / RUN, out / PREDICTIONS
    changed = None
    if run_file.is_file() and pred_file.is_file():
        old = json.loads(run_file.read_text())
        skip = (*SCORING_ONLY, *CONTENT)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v and k not in skip}
        if diff:
            changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{pred_file} holds predictions made with other settings ({changes}); "
                "use another --out or pass --overwrite"
            )
        changed = "; ".join(_content_change(k, old.get(k), v) for k in CONTENT if old.get(k) != (v := settings.get(k)))
        if changed:
            pred_file.unlink()
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2))
    return changed or None


def _content_change(key: str, old: str | None, new: str | None) -> str:
    before = f"sha256 {old[:12]}" if old else "not recorded"
    return f"{CONTENT[key]} changed ({before} -> sha256 {(new or '')[:12]})"


def run_benchmark(
    bench: Benchmark,
    items: Iterable[EvalItem],
    generate: Callable[[list[str], list[list[Image.Image]]], list[str]],
    out_dir: str | Path,
    settings: dict[str, Any],
    batch_size: int = 8,
    limit: int | None = None,
    post_prompt: str | None = None,
    on_done: Callable[[int], None] | None = None,
    skip_bad: bool = False,
    prompt_style: str = "paper",
    rules: str = "lmms-eval",
) -> dict[str, Any]:
    """Evaluate ``items`` (the first ``limit``) and return the scores written to ``scores.json``.

    ``post_prompt`` None takes ``prompt_style``'s own (``dvsft.evaluation.prompts``); ``rules``: the
    metric rules (``metrics.RULES``). ``skip_bad``: an item whose images cannot be read is written to
    ``errors.jsonl`` and left out.
    """
    out = Path(out_dir) / bench.name
    changed = check_settings(out, settings)
    pred_file = out / PREDICTIONS
    done = {row["id"] for row in read_jsonl(pred_file, own=True)} if pred_file.is_file() else set()
    seen: set[str] = set()
    pending: list[EvalItem] = []
    gen_seconds, generated = 0.0, 0
    scales = settings.get("scales") or [1.0]
    source = items if limit is None else _take(items, limit)
    if bench.name == "ocr":
        source = expand_scales(source, scales)
    (out / ERRORS).unlink(missing_ok=True)  # items that failed before are retried
    bad = 0
    with JsonlAppender(pred_file) as sink, JsonlAppender(out / ERRORS) as error_sink:

        def flush() -> None:
            nonlocal gen_seconds, generated, bad
            if not pending:
                return
            ready, images, failure = [], [], None
            for it in pending:
                try:
                    images.append([scaled(im, it.meta.get("scale", 1.0)) for im in it.load_images()])
                except ValueError as err:
                    if not skip_bad:
                        failure = (it, err)
                        break
                    error_sink.write({"id": it.id, "reason": str(err)})
                    bad += 1
                    if on_done:
                        on_done(1)
                    continue
                ready.append(it)
            pending.clear()
            if ready:
                prompts = [bench.prompt(it, post_prompt, prompt_style) for it in ready]
                t0 = time.perf_counter()
                predictions = generate(prompts, images)
                gen_seconds += time.perf_counter() - t0
                generated += len(ready)
                for it, prompt, pred in zip(ready, prompts, predictions, strict=True):
                    sink.write(make_row(bench, it, prompt, pred, rules))
                if on_done:
                    on_done(len(ready))
            if failure is not None:
                raise ValueError(
                    f"{bench.name}: {failure[1]} (predictions so far are kept in {pred_file}; "
                    "--skip-bad records unreadable items in errors.jsonl and goes on)"
                ) from failure[1]

        for item in source:
            if item.id in seen:
                raise ValueError(f"{bench.name}: item id {item.id!r} occurs twice in the data; ids must be unique")
            seen.add(item.id)
            if item.id in done:
                if on_done:
                    on_done(1)
                continue
            pending.append(item)
            if len(pending) >= batch_size:
                flush()
        flush()
    if not bad:
        (out / ERRORS).unlink(missing_ok=True)
    rows = [row for row in read_jsonl(pred_file, own=True) if row["id"] in seen]
    scores = score_summary(bench, rows, settings, rules)
    scores["generated_now"] = generated
    scores["skipped_bad"] = bad
    if changed:
        scores["regenerated"] = changed  # why the earlier predictions were discarded
    if generated:
        scores["samples_per_s"] = generated / gen_seconds
    (out / SCORES).write_text(json.dumps(scores, indent=2))
    if bench.submission and rows and all("questionId" in row.get("meta", {}) for row in rows):
        write_submission(out / SUBMISSION, rows, rules)
        scores["submission"] = str(out / SUBMISSION)
        (out / SCORES).write_text(json.dumps(scores, indent=2))
    return scores


def _take(items: Iterable[EvalItem], n: int) -> Iterator[EvalItem]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def make_row(
    bench: Benchmark, item: EvalItem, prompt: str, prediction: str, rules: str = "lmms-eval"
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": item.id,
        "question": item.question,
        "prompt": prompt,
        "answers": item.answers,
        "prediction": prediction,
        "meta": item.meta,
    }
    row.update(rescore(bench, row, rules))
    return row


def rescore(bench: Benchmark, row: dict[str, Any], rules: str = "lmms-eval") -> dict[str, Any]:
    """The row's metric fields (``score`` and extras) from its prediction and answers."""
    metrics = bench.score(row, rules)
    return {"score": None} if metrics is None else metrics


def score_summary(
    bench: Benchmark, rows: list[dict[str, Any]], settings: dict[str, Any], rules: str = "lmms-eval"
) -> dict[str, Any]:
    rows = [{**row, **rescore(bench, row, rules)} for row in rows]
    metrics = bench.aggregate(rows)
    return {
        "bench": bench.name,
        "title": bench.title,
        "primary": bench.primary,
        "n": len(rows),
        "metrics": metrics,
        "answers_private": all(row.get("score") is None for row in rows) and bool(rows),
        "settings": settings,
    }


def write_submission(path: Path, rows: list[dict[str, Any]], rules: str = "lmms-eval") -> None:
    """DocVQA / InfographicVQA server format: ``[{"questionId": int, "answer": str}]``; each answer is the prediction
    the metrics score (``metrics.clean_prediction`` under ``rules``: reasoning blocks cut, stripped)."""
    sub = []
    for row in rows:
        qid = row["meta"]["questionId"]
        try:
            qid = int(qid)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: item {row['id']}: questionId {qid!r} is not an integer") from err
        sub.append({"questionId": qid, "answer": M.clean_prediction(row["prediction"], rules)})
    path.write_text(json.dumps(sub, ensure_ascii=False))
