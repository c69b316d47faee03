"""The benchmarks: prompt, per-item score and the aggregate each one reports.

A prediction row (one line of ``predictions.jsonl``) is
``{"id", "question", "answers", "prediction", "score", "meta", ...}``; scores are always
recomputed from the stored prediction and answers, so resumed and fresh runs agree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dvsft.evaluation import metrics as M
from dvsft.evaluation.items import EvalItem
from dvsft.evaluation.prompts import MME_YES_NO, SHORT_ANSWER_PROMPT, TRANSCRIBE_PROMPT, build_prompt

__all__ = ["BENCHMARKS", "MME_YES_NO", "SHORT_ANSWER_PROMPT", "TRANSCRIBE_PROMPT", "Benchmark", "get_benchmark"]

OCRBENCH_RECOGNITION = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
OCRBENCH_TYPES = OCRBENCH_RECOGNITION + (
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

Row = dict[str, Any]


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    primary: str  # the metric printed first
    max_new_tokens: int
    score_row: Callable[[str, Row, str], dict[str, float]]  # (cleaned prediction, row, rules) -> metrics
    aggregate: Callable[[list[Row]], dict[str, Any]]
    submission: bool = False  # writes the DocVQA/InfoVQA server's submission JSON

    def prompt(self, item: EvalItem, post_prompt: str | None = None, style: str = "paper") -> str:
        """The user text that follows the image(s) (``dvsft.evaluation.prompts``)."""
        return build_prompt(self.name, item.question, style, post_prompt)

    def score(self, row: Row, rules: str = "lmms-eval") -> dict[str, float] | None:
        """Per-item metrics under ``rules`` (``metrics.RULES``), or None where the answers are private."""
        if not row.get("answers"):
            return None
        return self.score_row(M.clean_prediction(row["prediction"], rules), row, rules)


def _pct(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else float("nan")


def _scored(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.get("score") is not None]


def _mean_of(key: str, name: str) -> Callable[[list[Row]], dict[str, Any]]:
    def aggregate(rows: list[Row]) -> dict[str, Any]:
        scored = _scored(rows)
        return {name: _pct([r[key] for r in scored]), "n_scored": len(scored)} if scored else {"n_scored": 0}

    return aggregate


def _chartqa_aggregate(rows: list[Row]) -> dict[str, Any]:
    scored = _scored(rows)
    out: dict[str, Any] = {"relaxed_overall": _pct([r["score"] for r in scored]), "n_scored": len(scored)}
    human = [r["score"] for r in scored if r.get("meta", {}).get("type") == "human_test"]
    augmented = [r["score"] for r in scored if r.get("meta", {}).get("type") != "human_test"]
    if human:
        out["relaxed_human_split"] = _pct(human)
    if augmented:
        out["relaxed_augmented_split"] = _pct(augmented)
    return out


def _ocrbench_aggregate(rows: list[Row]) -> dict[str, Any]:
    """Sums per question type (correct answers, as OCRBench reports them) and the final score."""
    scored = _scored(rows)
    per_type: dict[str, int] = dict.fromkeys(OCRBENCH_TYPES, 0)
    counts: dict[str, int] = defaultdict(int)
    for r in scored:
        qtype = r.get("meta", {}).get("question_type", "")
        per_type[qtype] = per_type.get(qtype, 0) + int(r["score"])
        counts[qtype] += 1
    final = sum(per_type.values())
    return {
        "final_score": final,
        "text_recognition": sum(per_type[t] for t in OCRBENCH_RECOGNITION),
        "accuracy": _pct([r["score"] for r in scored]),
        "per_type": {t: {"correct": per_type[t], "n": counts.get(t, 0)} for t in per_type if counts.get(t)},
        "n_scored": len(scored),
        "complete": len(scored) == 1000,
    }


def _mme_aggregate(rows: list[Row]) -> dict[str, Any]:
    """lmms-eval's MME: per image (question pair) acc = mean correct * 100, acc+ = all correct * 100;
    a category scores mean(acc) + mean(acc+); perception / cognition are sums over categories.
    Beside them the paper's numbers: yes/no accuracy and F1 over all questions (``metrics.yes_no_metrics``)."""
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    answered: list[tuple[str, str]] = []
    for r in _scored(rows):
        answered.append((r["answers"][0], r.get("parsed", r["prediction"])))
        meta = r.get("meta", {})
        by_cat[meta.get("category", "")][meta.get("pair", r["id"])].append(r["score"])
    categories = {}
    for cat, pairs in by_cat.items():  # summed in order of appearance, as lmms-eval (same float rounding)
        acc = sum(sum(s) / len(s) * 100.0 for s in pairs.values()) / len(pairs)
        acc_plus = sum(100.0 * all(s) for s in pairs.values()) / len(pairs)
        score = sum(100.0 * all(s) + sum(s) / len(s) * 100.0 for s in pairs.values()) / len(pairs)
        categories[cat] = {"acc": acc, "acc_plus": acc_plus, "score": score, "images": len(pairs)}
    perception = sum(v["score"] for c, v in categories.items() if c in MME_PERCEPTION)
    cognition = sum(v["score"] for c, v in categories.items() if c not in MME_PERCEPTION)
    yes_no = M.yes_no_metrics(answered)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "yes_no_accuracy": yes_no.get("accuracy", float("nan")),
        "yes_no_f1": yes_no.get("f1", float("nan")),
        "yes_no": yes_no,
        "categories": dict(sorted(categories.items())),
        "n_scored": sum(1 for _ in _scored(rows)),
    }


def _ocr_aggregate(rows: list[Row]) -> dict[str, Any]:
    """CER and word accuracy per resolution scale: per-sample means and corpus (pooled) rates, in %."""
    by_scale: dict[str, list[Row]] = defaultdict(list)
    for r in _scored(rows):
        by_scale[str(r.get("meta", {}).get("scale", 1.0))].append(r)
    scales = {}
    for scale, group in sorted(by_scale.items(), key=lambda kv: float(kv[0])):
        scales[scale] = {
            "cer": _pct([r["cer"] for r in group]),
            "word_accuracy": _pct([r["word_accuracy"] for r in group]),
            "corpus_cer": 100.0 * sum(r["edits"] for r in group) / max(1, sum(r["ref_chars"] for r in group)),
            "corpus_word_accuracy": 100.0
            * sum(r["matched"] for r in group)
            / max(1, sum(r["ref_words"] for r in group)),
            "n": len(group),
        }
    out: dict[str, Any] = {"scales": scales, "n_scored": len(_scored(rows))}
    if "1.0" in scales or len(scales) == 1:
        main = scales.get("1.0") or next(iter(scales.values()))
        out.update(cer=main["cer"], word_accuracy=main["word_accuracy"])
    return out


def _ocr_row(pred: str, row: Row, rules: str) -> dict[str, float]:
    ref = row["answers"][0]
    p, r = M.normalize_whitespace(pred), M.normalize_whitespace(ref)
    p_words, r_words = p.split(), r.split()
    edits = M.levenshtein(p, r)
    matched = M.aligned_word_matches(p_words, r_words)  # once: the cost of the row
    accuracy = M.matched_share(matched, len(r_words), len(p_words))  # = M.word_accuracy(p, r)
    return {
        "score": accuracy,
        "cer": M.error_rate(edits, len(r), len(p)),  # = M.cer(p, r)
        "word_accuracy": accuracy,
        "edits": edits,
        "ref_chars": len(r),
        "matched": matched,
        "ref_words": len(r_words),
    }


def _squad_row(pred: str, row: Row, rules: str) -> dict[str, float]:
    return {"score": M.squad_f1(pred, row["answers"]), "em": M.squad_em(pred, row["answers"])}


def _squad_aggregate(rows: list[Row]) -> dict[str, Any]:
    scored = _scored(rows)
    if not scored:
        return {"n_scored": 0}
    return {
        "f1": _pct([r["score"] for r in scored]),
        "exact_match": _pct([r["em"] for r in scored]),
        "n_scored": len(scored),
    }


def _one(fn: Callable[[str, Any], float]) -> Callable[[str, Row, str], dict[str, float]]:
    return lambda pred, row, rules: {"score": float(fn(pred, row["answers"]))}


def _chartqa_row(pred: str, row: Row, rules: str) -> dict[str, float]:
    return {"score": float(any(M.relaxed_correctness(pred, a) for a in row["answers"]))}


def _ocrbench_row(pred: str, row: Row, rules: str) -> dict[str, float]:
    return {"score": float(M.ocrbench_score(pred, row["answers"], row.get("meta", {}).get("dataset", ""), rules))}


def _mme_row(pred: str, row: Row, rules: str) -> dict[str, Any]:
    return {"score": M.mme_correct(pred, row["answers"][0]), "parsed": M.mme_parse(pred)}


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark("docvqa", "DocVQA", "anls", 32, _one(M.anls), _mean_of("score", "anls"), submission=True),
        Benchmark("infovqa", "InfographicVQA", "anls", 32, _one(M.anls), _mean_of("score", "anls"), submission=True),
        Benchmark("squad", "SQuAD (rendered)", "f1", 32, _squad_row, _squad_aggregate),
        Benchmark("chartqa", "ChartQA", "relaxed_overall", 16, _chartqa_row, _chartqa_aggregate),
        Benchmark("ocrbench", "OCRBench", "final_score", 128, _ocrbench_row, _ocrbench_aggregate),
        Benchmark("ocrvqa", "OCR-VQA", "exact_match", 32, _one(M.exact_match), _mean_of("score", "exact_match")),
        Benchmark("textvqa", "TextVQA", "vqa_accuracy", 32, _one(M.vqa_accuracy), _mean_of("score", "vqa_accuracy")),
        Benchmark("mme", "MME", "total", 16, _mme_row, _mme_aggregate),
        Benchmark("ocr", "OCR transcription", "word_accuracy", 1024, _ocr_row, _ocr_aggregate),
    ]
}


def get_benchmark(name: str) -> Benchmark:
    key = name.strip().lower()
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]
