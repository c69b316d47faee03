"""Per-item parity with lmms-eval's own task code, the test oracle of dvsft.evaluation's metrics and prompts.

A deterministic fuzz set (generated here: case, punctuation, articles, number words, percent and 5% edges,
zero targets, ANLS at and around 0.5, empty and whitespace predictions, raw generations padded with spaces,
newlines, tabs, ``\r\n``, U+3000 and U+00A0, reasoning blocks, 10-answer TextVQA lists, every OCRBench
question type with full-width text, MME pairs in every category) is scored by dvsft's pipeline (the row a
run stores, rescored) and by lmms-eval end to end: the evaluator's reasoning-tag cut, then lmms-eval's own
``Task.process_results`` for the task built from its YAML (it strips, then runs the task's
``process_results`` or metric). The metric functions are also compared one to one on unstripped text.
Needs the ``parity`` extra and lmms-eval itself:
``pip install -e '.[parity]' && pip install lmms-eval==0.7.3 --no-deps`` (setup.sh does both).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest

from dvsft.evaluation import metrics as M
from dvsft.evaluation.benchmarks import MME_COGNITION, MME_PERCEPTION, OCRBENCH_TYPES, get_benchmark
from dvsft.evaluation.items import EvalItem
from dvsft.evaluation.prompts import build_prompt
from dvsft.evaluation.runner import rescore

INSTALL = f"pip install -e '.[parity]' && pip install lmms-eval=={M.LMMS_EVAL_VERSION} --no-deps"
TASKS = ("docvqa", "infovqa", "chartqa", "ocrbench", "textvqa", "mme")
# lmms-eval's default --reasoning_tags (checked against its __main__.py below)
CLI_REASONING_TAGS = '[["<think>", "</think>"], ["<analysis>", "</analysis>"]]'


def import_lmms_eval() -> dict[str, Any]:
    """lmms-eval's task utils and metrics, imported without leaking its global changes.

    Importing ``lmms_eval.api.task`` sets PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` (and an
    environment variable); both are put back so tests of corrupt images elsewhere still see PIL's default.
    """
    try:
        import lmms_eval  # noqa: F401 - an empty package module: cheap
    except ImportError:
        pytest.skip(f"lmms-eval is not installed; the parity tests need it ({INSTALL})")
    from importlib.metadata import version

    from PIL import ImageFile

    truncated, env = ImageFile.LOAD_TRUNCATED_IMAGES, dict(os.environ)
    try:
        mods = {t: importlib.import_module(f"lmms_eval.tasks.{t}.utils") for t in TASKS}
        mods["metrics"] = importlib.import_module("lmms_eval.api.metrics")
        mods["reasoning"] = importlib.import_module("lmms_eval.api.reasoning")
        mods["evalai"] = importlib.import_module("lmms_eval.tasks._task_utils.vqa_eval_metric")
    except ImportError as err:
        pytest.skip(f"lmms-eval's task utils cannot be imported ({err}); install the parity extra ({INSTALL})")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated
        os.environ.clear()
        os.environ.update(env)
    mods["version"] = version("lmms-eval")
    return mods


@pytest.fixture(scope="module")
def lmms():
    mods = import_lmms_eval()
    assert mods["version"] == M.LMMS_EVAL_VERSION, (
        f"lmms-eval {mods['version']} is installed but dvsft follows {M.LMMS_EVAL_VERSION} ({INSTALL})"
    )
    from loguru import logger

    logger.disable("lmms_eval")  # its aggregations log every call
    mods["tasks"] = {bench: lmms_task(mods, bench) for bench in TASKS}
    yield mods
    logger.enable("lmms_eval")


# The one document each in-memory task is built with (lmms-eval's Task reads a first document's target)
FIRST_DOCS = {
    "docvqa": {"questionId": 0, "question": "q", "answers": ["a"]},
    "infovqa": {"questionId": 0, "question": "q", "answers": ["a"]},
    "chartqa": {"question": "q", "answer": "0", "type": "human_test"},
    "ocrbench": {"question": "q", "answer": ["a"], "dataset": "IIIT5K", "question_type": "Doc-oriented VQA"},
    "textvqa": {"question": "q", "answers": ["a"] * 10, "question_id": 0, "ocr_tokens": []},
    "mme": {"question": "q", "answer": "Yes", "category": "OCR", "question_id": "q.png"},
}


def lmms_task(mods: dict[str, Any], bench: str) -> Any:
    """lmms-eval's ``ConfigurableTask`` from the task's own YAML, its dataset one in-memory document."""
    import lmms_eval
    from datasets import Dataset, DatasetDict
    from lmms_eval.api.task import ConfigurableTask

    config = _YamlLoader.load(Path(lmms_eval.__file__).parent / "tasks" / PROMPT_YAML[bench], mods[bench])

    class InMemoryTask(ConfigurableTask):
        def download(self, dataset_kwargs: dict | None = None) -> None:
            self.dataset = DatasetDict({config["test_split"]: Dataset.from_list([FIRST_DOCS[bench]])})

    return InMemoryTask(config=config)


def lmms_scores(lmms: dict[str, Any], bench: str, doc: dict[str, Any], raw: str) -> dict[str, Any]:
    """lmms-eval's scoring of one raw generation: the evaluator cuts reasoning blocks
    (``_process_document_results``), then the task's ``Task.process_results`` strips and scores."""
    tags = lmms["reasoning"].parse_reasoning_tags_config(cli_value=CLI_REASONING_TAGS)
    return lmms["tasks"][bench].process_results(doc, [lmms["reasoning"].strip_reasoning_tags(raw, tags)])


def lmms_prediction(lmms: dict[str, Any], raw: str) -> str:
    """What lmms-eval's task code gets: reasoning blocks cut (evaluator), then ``strip()`` (Task.process_results)."""
    tags = lmms["reasoning"].parse_reasoning_tags_config(cli_value=CLI_REASONING_TAGS)
    return lmms["reasoning"].strip_reasoning_tags(raw, tags).strip()


def ours(bench: str, raw: str, answers: list[str], meta: dict | None = None) -> dict[str, Any]:
    """dvsft's scores of a raw generation, as a run rescores its stored row; the row as ``Generator`` stores
    it (the decoded text stripped) scores the same."""
    rows = [{"id": "x", "prediction": p, "answers": answers, "meta": meta or {}} for p in (raw, raw.strip())]
    metrics, stored = (rescore(get_benchmark(bench), row, "lmms-eval") for row in rows)
    assert metrics == stored, (bench, raw, metrics, stored)
    return metrics


def report(name: str, n: int, mismatches: list) -> None:
    print(f"\n{name}: {n} items, {len(mismatches)} mismatches")
    assert not mismatches, f"{name}: {len(mismatches)}/{n} items differ from lmms-eval, e.g. {mismatches[:8]}"


# ------------------------------------------------------------------------------------ fuzz pieces

WORDS = [
    "total", "Revenue", "the", "a", "an", "dog", "Dogs", "New York", "march", "McDonald's", "cant", "dont", "its",
    "two", "ten", "none", "zero", "one", "3", "10", "1,000", "1.5", "3.14", "50%", "$12", "N/A", "yes", "No",
    "e-mail", "co-op", "U.S.A.", "p.m.", "(a)", "x/y", "mr. smith", "well-known", "they're", "youre", "isnt",
    "2019-2020", "#1", "1st", "ＣＥＮＴＲＡＬ", "ｔｏｔａｌ", "１２", "Ａ\u3000Ｂ", "Café", "naïve", "ß", "İstanbul",
]  # fmt: skip
PUNCT = [".", ",", "?", "!", ";", ":", "-", "'", '"', "(", ")", "/", "\\", "_", "@", "`", "=", "+", "<", ">"]
# What raw generations carry around (and in) an answer: spaces, newlines, tabs, CRLF, ideographic and no-break spaces
WHITESPACE = [" ", "  ", "\n", "\t", "\r\n", "\u3000", "\xa0"]
# ChartQA compares a zero target as text (a falsy float): whitespace on either side counts there
ZERO_TARGETS = ["0", "0.0", "0%", "-0", "0.00", " 0", "0\n", "0\u3000", "\xa00", "0\r\n"]


def whitespace_run(rng: random.Random) -> str:
    return "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(0, 3)))


def pad_whitespace(rng: random.Random, text: str) -> str:
    """``text`` between whitespace runs, its spaces sometimes another whitespace character."""
    if rng.random() < 0.3:
        text = text.replace(" ", rng.choice(WHITESPACE))
    return whitespace_run(rng) + text + whitespace_run(rng)


def variant(rng: random.Random, text: str) -> str:
    """A perturbation of ``text`` of the kinds models produce."""
    kind = rng.randrange(17)
    if kind == 0:
        return text
    if kind == 1:
        return text.upper()
    if kind == 2:
        return text.lower()
    if kind == 3:
        return f"  {text} \n"
    if kind == 4:
        return text + rng.choice(PUNCT)
    if kind == 5:
        return f"{rng.choice(['The', 'the', 'A', 'an'])} {text}"
    if kind == 6 and text:
        i = rng.randrange(len(text))
        return text[:i] + rng.choice("abcxyz019 .") + text[i + 1 :]
    if kind == 7 and text:
        i = rng.randrange(len(text))
        return text[:i] + text[i + 1 :]
    if kind == 8:
        return f"<think>{rng.choice(WORDS)} maybe</think>{text}"
    if kind == 9:
        return f"reasoning</analysis> {text}"
    if kind == 10:
        return rng.choice(["", " ", "\n", "\t "])
    if kind == 11:
        return text.replace(" ", "  ")
    if kind == 12:
        return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)
    if kind == 13:
        return f"{text} {rng.choice(WORDS)}"
    if kind == 14:
        return text.title()
    if kind == 15:
        return pad_whitespace(rng, text)
    return rng.choice(WORDS)


def phrase(rng: random.Random, k: int = 3) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, k)))


def half_distance_pair(rng: random.Random) -> tuple[str, str]:
    """(answer, prediction) at normalised Levenshtein distance exactly 0.5, or one edit either side of it."""
    n = rng.randint(1, 6)
    answer = "".join(rng.choice("abcdefgh") for _ in range(2 * n))
    kept = n + rng.choice([-1, 0, 0, 1]) if n > 1 else n
    return answer, answer[:kept] + "z" * (2 * n - kept)


# ------------------------------------------------------------------------------------ ANLS


@pytest.mark.parametrize("bench,seed", [("docvqa", 1), ("infovqa", 2)])
def test_anls_matches_lmms_eval(lmms, bench, seed):
    rng = random.Random(seed)
    cases: list[tuple[str, list[str]]] = []
    for _ in range(600):
        answers = [phrase(rng) for _ in range(rng.randint(1, 3))]
        cases.append((variant(rng, rng.choice(answers)), answers))
    for _ in range(200):  # whitespace around answers too: the divisor is the max of the raw lengths
        answers = [pad_whitespace(rng, phrase(rng)) if rng.random() < 0.4 else phrase(rng) for _ in range(3)]
        cases.append((pad_whitespace(rng, rng.choice(answers).strip()), answers[: rng.randint(1, 3)]))
    for _ in range(250):
        answer, pred = half_distance_pair(rng)
        cases.append((pred if rng.random() < 0.8 else f" {pred.upper()} ", [answer]))
    cases += [("", [""]), (" ", ["a"]), ("abc", ["", "abc"]), ("A  B", ["a b"]), ("ab", ["abcd"]), ("abcd", ["ab"])]
    mismatches = []
    for i, (raw, answers) in enumerate(cases):
        want = lmms_scores(lmms, bench, {"questionId": i, "question": "q", "answers": answers}, raw)["anls"]
        got = ours(bench, raw, answers)["score"]
        if got != want:
            mismatches.append((raw, answers, got, want))
    assert sum(0 < ours(bench, p, a)["score"] <= 0.5 for p, a in cases) >= 50  # the 0.5 boundary is exercised
    report(f"{bench} ANLS", len(cases), mismatches)


# ------------------------------------------------------------------------------------ ChartQA


def chartqa_cases(rng: random.Random) -> list[tuple[str, str]]:
    cases = []
    for _ in range(500):
        target = rng.choice(
            [
                str(rng.randint(-100, 2000)),
                f"{rng.uniform(-50, 500):.{rng.randint(0, 3)}f}",
                f"{rng.randint(0, 100)}%",
                f"{rng.uniform(0, 1):.2f}",
                "0",
                "0.0",
                rng.choice(WORDS),
            ]
        )
        try:
            value = float(target.rstrip("%")) / (100 if target.endswith("%") else 1)
        except ValueError:
            cases.append((variant(rng, target), target))
            continue
        factor = rng.choice([1, 1.05, 0.95, 1.049, 1.051, 0.951, 0.949, 1.1, 0.5, 100, 0.01, -1])
        pred = value * factor
        pred_text = rng.choice([f"{pred}", f"{pred:.2f}", f"{pred:.0f}", f"{pred * 100:.1f}%", f"{pred:g}"])
        cases.append((rng.choice([pred_text, f" {pred_text} ", pred_text + "%", pred_text.replace(".", ",")]), target))
    for _ in range(300):
        target = rng.choice(WORDS + ["12%", "1e3", "nan", "inf", "-0", "1_000", "٣", "Yes"])
        cases.append((variant(rng, target), target))
    for _ in range(200):
        target = rng.choice(ZERO_TARGETS)
        cases.append((pad_whitespace(rng, rng.choice(["0", "0.0", "0%", "00", target.strip()])), target))
    cases += [("12%", "0.12"), ("0.12", "12%"), ("105", "100"), ("95", "100"), ("", "0"), ("nan", "nan"), ("", "")]
    cases += [("12% ", "12%"), ("<think>no</think> 7", "7"), ("1e3", "1000"), ("infinity", "inf")]
    return cases


def test_chartqa_relaxed_accuracy_matches_lmms_eval(lmms):
    cases = chartqa_cases(random.Random(3))
    mismatches = []
    for i, (raw, target) in enumerate(cases):
        doc = {"answer": target, "type": "human_test" if i % 2 else "augmented_test"}
        theirs = lmms_scores(lmms, "chartqa", doc, raw)
        split = "relaxed_human_split" if i % 2 else "relaxed_augmented_split"
        got = ours("chartqa", raw, [target], {"type": doc["type"]})["score"]
        if (got, got) != (theirs["relaxed_overall"], theirs[split]):
            mismatches.append((raw, target, got, theirs))
    report("ChartQA relaxed accuracy", len(cases), mismatches)


# ------------------------------------------------------------------------------------ TextVQA

VQA_FORMS = [
    "two", "2", "Two.", "the dog", "dog", "a dog", "Dogs", "dont", "don't", "can't", "cant", "1,000", "1000",
    "3.5", "3.5.", "mr. smith", "e-mail", "email", "coca cola", "coca-cola", "yes", "Yes!", "no", "none", "0",
    "it's", "its", "10:30", "10 30", "u.s.a.", "usa", "o'clock", "oclock", "new york city", "(new) york",
    "a/b", "a b", "ten", "10", "the end.", "end", "#5", "5", "$5", "5 dollars", "hello, world", "hello world",
]  # fmt: skip


def test_evalai_answer_processor_matches_lmms_eval(lmms):
    rng = random.Random(4)
    processor = lmms["evalai"].EvalAIAnswerProcessor()
    texts = VQA_FORMS + WORDS + [variant(rng, rng.choice(VQA_FORMS)) for _ in range(600)]
    texts += ["a" + "." * 40 + "b", "1. 2. 3.", "x,y", "3,000,000", "3 , 4", "\tan apple\n", "who'll", "whos"]
    mismatches = [(t, M.vqa_normalize(t), processor(t)) for t in texts if M.vqa_normalize(t) != processor(t)]
    report("EvalAI answer processor", len(texts), mismatches)


def test_textvqa_accuracy_matches_lmms_eval(lmms):
    rng = random.Random(5)
    cases = []
    for _ in range(500):
        pool = rng.sample(VQA_FORMS, rng.randint(1, 4))
        n = 10 if rng.random() < 0.85 else rng.randint(2, 9)
        answers = [pad_whitespace(rng, a) if rng.random() < 0.1 else a for a in rng.choices(pool, k=n)]
        cases.append((variant(rng, rng.choice(pool + [rng.choice(VQA_FORMS)])), answers))
    mismatches = []
    for i, (raw, answers) in enumerate(cases):
        doc = {"answers": list(answers), "question_id": i}  # lmms-eval normalises doc["answers"] in place
        want = lmms_scores(lmms, "textvqa", doc, raw)["exact_match"]
        got = ours("textvqa", raw, answers)["score"]
        if got != want:
            mismatches.append((raw, answers, got, want))
    assert len({round(ours("textvqa", p, a)["score"], 4) for p, a in cases}) >= 5  # partial credit exercised
    report("TextVQA VQA accuracy", len(cases), mismatches)
    # The one documented difference: a single answer (word records) is normalised exact match here, 0 there.
    single = lmms_scores(lmms, "textvqa", {"answers": ["dog"], "question_id": 0}, "dog")
    assert single["exact_match"] == 0 and ours("textvqa", "dog", ["dog"])["score"] == 1.0


# ------------------------------------------------------------------------------------ OCRBench

OCRBENCH_DATASETS = {
    "Regular Text Recognition": ["IIIT5K", "svt", "IC13_857"],
    "Irregular Text Recognition": ["IC15_1811", "svtp", "ct80"],
    "Artistic Text Recognition": ["WordArt"],
    "Handwriting Recognition": ["IAM"],
    "Digit String Recognition": ["ReCTS"],
    "Non-Semantic Text Recognition": ["HOST", "WOST"],
    "Scene Text-centric VQA": ["textVQA", "STVQA", "ESTVQA"],
    "Doc-oriented VQA": ["docVQA", "ChartQA", "InfoVQA"],
    "Key Information Extraction": ["FUNSD", "SROIE", "POIE"],
    "Handwritten Mathematical Expression Recognition": ["HME100k"],
}
LATEX = [r"x^{2}+1", r"\frac{A}{B}", r"\sqrt { 2 }", r"a _ { 1 } + B", r"\alpha+\beta", r"E = m c ^ { 2 }"]


def ocrbench_cases(rng: random.Random) -> list[dict[str, Any]]:
    cases = []
    for _ in range(1000):
        qtype = rng.choice(OCRBENCH_TYPES)
        dataset = rng.choice(OCRBENCH_DATASETS[qtype])
        pool = LATEX if dataset == "HME100k" else WORDS
        answers = [rng.choice(pool) for _ in range(rng.randint(1, 3))]
        truth = rng.choice(answers)
        pred = rng.choice(
            [
                variant(rng, truth),
                f"The answer is {variant(rng, truth)}.",
                truth.replace(" ", "\n"),
                "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in truth),
                truth.replace(" ", "\u3000"),
                pad_whitespace(rng, truth),
                variant(rng, rng.choice(pool)),
            ]
        )
        cases.append(
            {"pred": pred, "answer": answers if rng.random() < 0.8 else truth, "dataset": dataset, "qtype": qtype}
        )
    return cases


def test_ocrbench_per_item_and_aggregate_match_lmms_eval(lmms, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lmms-eval's aggregation writes results/ocrbench_results.txt under the cwd
    utils = lmms["ocrbench"]
    cases = ocrbench_cases(random.Random(6))
    mismatches, theirs, rows = [], [], []
    for i, c in enumerate(cases):
        doc = {"answer": copy.deepcopy(c["answer"]), "dataset": c["dataset"], "question_type": c["qtype"]}
        result = lmms_scores(lmms, "ocrbench", doc, c["pred"])["ocrbench_accuracy"]
        answers = c["answer"] if isinstance(c["answer"], list) else [c["answer"]]
        meta = {"dataset": c["dataset"], "question_type": c["qtype"]}
        got = ours("ocrbench", c["pred"], answers, meta)["score"]
        if got != result["score"]:
            mismatches.append((c, got, result["score"]))
        theirs.append(result)
        rows.append({"id": str(i), "prediction": c["pred"], "answers": answers, "meta": meta, "score": got})
    assert {c["qtype"] for c in cases} == set(OCRBENCH_TYPES)
    assert sum(r["score"] for r in rows) >= 200 and sum(not r["score"] for r in rows) >= 200
    report("OCRBench per item", len(cases), mismatches)

    bench = get_benchmark("ocrbench")
    subsets = [range(len(rows))] + [sorted(random.Random(k).sample(range(len(rows)), 150)) for k in range(20)]
    agg_mismatches = []
    for subset in subsets:
        utils.OCRBench_score.update(dict.fromkeys(utils.OCRBench_score, 0))  # its totals are module globals
        final = utils.ocrbench_aggregate_accuracy([theirs[i] for i in subset], None)
        agg = bench.aggregate([rows[i] for i in subset])
        per_type = {t: agg["per_type"].get(t, {"correct": 0})["correct"] for t in OCRBENCH_TYPES}
        if agg["final_score"] / 1000 != final or per_type != utils.OCRBench_score:
            agg_mismatches.append((agg["final_score"], final))
        text = Path("results/ocrbench_results.txt").read_text()
        if f"Text Recognition(Total 300): {agg['text_recognition']}\n" not in text:
            agg_mismatches.append(("text recognition", agg["text_recognition"]))
    report("OCRBench aggregate (full set and 20 subsets)", len(subsets), agg_mismatches)


def test_ocrbench_official_rules_differ_only_by_folding(lmms):
    """--rules official: lmms-eval's code minus the full-width folding (the official script)."""
    utils = lmms["ocrbench"]
    cases = ocrbench_cases(random.Random(7))
    differ = 0
    for c in cases:
        answers = c["answer"] if isinstance(c["answer"], list) else [c["answer"]]
        official = M.ocrbench_score(M.clean_prediction(c["pred"], "official"), answers, c["dataset"], "official")
        no_fold = M.ocrbench_score(c["pred"].strip(), answers, c["dataset"], "lmms-eval")
        unfolded = c["pred"] != M.fold_fullwidth(c["pred"]) or any(a != M.fold_fullwidth(a) for a in answers)
        if not unfolded:
            assert official == no_fold, c
        differ += official != no_fold
    assert differ > 0
    assert utils._fold_fullwidth_ascii("ＣＥＮＴＲＡＬ\u3000１") == M.fold_fullwidth("ＣＥＮＴＲＡＬ\u3000１")


# ------------------------------------------------------------------------------------ MME

MME_PREDICTIONS = [
    "Yes", "No", "yes", "no", "Yes.", "No.", "YES", "NO", "Y", "N", "y", "n", "y.", "N.", "Yes, there is.",
    "No, there is not.", "There is no dog.", "The answer is yes.", "not sure", "Nope", "yesno", "noyes", "",
    " ", ".", "Maybe", "I cannot tell", "<think>no</think>Yes", "no</analysis>yes", " yes ", "Yes\nNo", "ye s",
    "n o", "Absolutely", "know", "snow", "a yes", "Non", "Yesterday", "nobody", "1", "x",
]  # fmt: skip


def mme_cases(rng: random.Random) -> list[dict[str, Any]]:
    cases = []
    categories = list(MME_PERCEPTION) + list(MME_COGNITION)
    for image in range(320):
        category = categories[image % len(categories)] if image < 28 else rng.choice(categories)
        for k, answer in enumerate(["Yes", "No"] if rng.random() < 0.9 else [rng.choice(["Yes", "No", "yes."])] * 2):
            pred = rng.choice(MME_PREDICTIONS) if rng.random() < 0.7 else variant(rng, answer)
            pred = pad_whitespace(rng, pred) if rng.random() < 0.2 else pred
            cases.append(
                {"pred": pred, "answer": answer, "category": category, "question_id": f"{category}/{image}.png", "k": k}
            )
    return cases


def test_mme_parse_per_item_and_totals_match_lmms_eval(lmms):
    utils = lmms["mme"]
    cases = mme_cases(random.Random(8))
    parse_mismatches, item_mismatches, results, rows = [], [], {"perception": [], "cognition": []}, []
    for c in cases:
        pred = lmms_prediction(lmms, c["pred"])
        if M.mme_parse(M.clean_prediction(c["pred"])) != utils.parse_pred_ans(pred):
            parse_mismatches.append((c["pred"], M.mme_parse(M.clean_prediction(c["pred"])), utils.parse_pred_ans(pred)))
        doc = {"answer": c["answer"], "category": c["category"], "question_id": c["question_id"]}
        ((key, result),) = lmms_scores(lmms, "mme", doc, c["pred"]).items()
        meta = {"category": c["category"], "pair": c["question_id"]}
        got = ours("mme", c["pred"], [c["answer"]], meta)
        if (
            got["score"] != result["score"]
            or key != f"mme_{'perception' if c['category'] in MME_PERCEPTION else 'cognition'}_score"
        ):
            item_mismatches.append((c, got, result))
        results["perception" if key == "mme_perception_score" else "cognition"].append(result)
        rows.append(
            {
                "id": f"{c['question_id']}#{c['k']}",
                "prediction": c["pred"],
                "answers": [c["answer"]],
                "meta": meta,
                **got,
            }
        )
    report("MME parse", len(cases), parse_mismatches)
    report("MME per item", len(cases), item_mismatches)
    agg = get_benchmark("mme").aggregate(rows)
    totals = {part: utils.mme_aggregate_results(results[part]) for part in results}
    mismatches = [(part, agg[part], totals[part]) for part in totals if agg[part] != totals[part]]
    assert len(agg["categories"]) == 14 and 0 < agg["yes_no_accuracy"] < 100
    report("MME perception / cognition totals", 2, mismatches)


# ------------------------------------------------------------------------------------ metric functions, raw text


def raw_text_cases(rng: random.Random, n: int = 400) -> list[tuple[str, list[str]]]:
    """(prediction, answers) with whitespace left in place on both sides, as a caller may pass them."""
    cases = []
    for _ in range(n):
        if rng.random() < 0.25:  # a zero target (compared as text by relaxed accuracy) and a zero prediction
            target = rng.choice(ZERO_TARGETS)
            cases.append((pad_whitespace(rng, rng.choice(["0", "0.0", "0%", target.strip()])), [target]))
            continue
        answers = [rng.choice(WORDS + VQA_FORMS) for _ in range(rng.randint(1, 3))]
        answers = [pad_whitespace(rng, a) if rng.random() < 0.3 else a for a in answers]
        truth = rng.choice(answers).strip()
        cases.append((pad_whitespace(rng, rng.choice([truth, variant(rng, truth), phrase(rng)])), answers))
    return cases


def raw_scores(lmms: dict[str, Any], pred: str, answers: list[str], yes_no: str) -> dict[str, tuple]:
    """(dvsft, lmms-eval) per metric function, both called on the unstripped ``pred`` and answers."""
    ten = (answers * 10)[:10]
    out = {
        "anls": (M.anls(pred, answers), lmms["metrics"].anls(references=answers, predictions=[pred])["anls"]),
        "relaxed_correctness": (
            M.relaxed_correctness(pred, answers[0]),
            lmms["chartqa"].relaxed_correctness(pred, answers[0]),
        ),
        "EvalAI normalisation": (M.vqa_normalize(pred), lmms["evalai"].EvalAIAnswerProcessor()(pred)),
        "vqa_accuracy": (
            M.vqa_accuracy(pred, ten),
            lmms["textvqa"].textvqa_process_results({"answers": list(ten), "question_id": 0}, [pred])["exact_match"],
        ),
        "mme_parse": (M.mme_parse(pred), lmms["mme"].parse_pred_ans(pred)),
        "mme_correct": (
            M.mme_correct(pred, yes_no),
            lmms["mme"].mme_process_results({"answer": yes_no, "category": "OCR", "question_id": "q"}, [pred])[
                "mme_perception_score"
            ]["score"],
        ),
    }
    for dataset in ("IIIT5K", "HME100k"):
        doc = {"answer": list(answers), "dataset": dataset, "question_type": "Doc-oriented VQA"}
        theirs = lmms["ocrbench"].ocrbench_process_results(doc, [pred])["ocrbench_accuracy"]["score"]
        out[f"ocrbench_score, {dataset}"] = (M.ocrbench_score(pred, answers, dataset), theirs)
    return out


def test_metric_functions_match_lmms_eval_on_unstripped_text(lmms):
    """Each metric called directly on text nobody stripped normalises it as lmms-eval's function does."""
    rng = random.Random(9)
    cases = raw_text_cases(rng)
    mismatches: dict[str, list] = {}
    whitespace_matters = {"anls": 0, "relaxed_correctness": 0}
    for pred, answers in cases:
        yes_no = pad_whitespace(rng, rng.choice(["Yes", "No"]))
        scores = raw_scores(lmms, pred, answers, yes_no)
        stripped = raw_scores(lmms, pred.strip(), answers, yes_no)
        for name, (got, want) in scores.items():
            mismatches.setdefault(name, [])
            if got != want:
                mismatches[name].append((pred, answers, yes_no, got, want))
            if name in whitespace_matters:
                whitespace_matters[name] += want != stripped[name][1]
    # lmms-eval's own results change when the prediction is stripped first: the cases reach that difference
    assert min(whitespace_matters.values()) >= 20, whitespace_matters
    for name, found in mismatches.items():
        report(f"{name} on unstripped text", len(cases), found)


# ------------------------------------------------------------------------------------ prompts


class _YamlLoader:
    """lmms-eval task YAML with ``include`` followed and its ``!function utils.NAME`` tags read as plain
    strings, or as ``NAME`` of ``functions`` (the task's utils module) where given."""

    @staticmethod
    def load(path: Path, functions: Any = None) -> dict[str, Any]:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def function(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
            name = loader.construct_scalar(node)
            return name if functions is None else getattr(functions, name.removeprefix("utils."))

        Loader.add_constructor("!function", function)
        config = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader subclass
        if "include" in config:
            base = _YamlLoader.load(path.parent / config.pop("include"), functions)
            config = {**base, **config}
        return config


PROMPT_YAML = {
    "docvqa": "docvqa/docvqa_val.yaml",
    "infovqa": "infovqa/infovqa_val.yaml",
    "chartqa": "chartqa/chartqa.yaml",
    "ocrbench": "ocrbench/ocrbench.yaml",
    "textvqa": "textvqa/textvqa_val.yaml",
    "mme": "mme/mme.yaml",
}
QUESTIONS = [
    "What is the title?",
    "  what is written in the image?  ",
    "WHAT brand is this?",
    "Is there a dog in the image? Please answer yes or no.",
    "Is this photo taken indoors?  Please answer yes or no.",
    "how many people are there?\n",
    "What year? Please answer yes or no. Really?",
    "",
    "multi\nline question",
    "what's the value of 'x'?",
]


def lmms_doc_to_text(lmms: dict[str, Any], bench: str, question: str) -> str:
    import lmms_eval

    root = Path(lmms_eval.__file__).parent / "tasks"
    kwargs = _YamlLoader.load(root / PROMPT_YAML[bench])["lmms_eval_specific_kwargs"]["default"]
    fn = getattr(lmms[bench], f"{bench}_doc_to_text")
    return fn({"question": question, "ocr_tokens": []}, dict(kwargs))


@pytest.mark.parametrize("bench", TASKS)
def test_lmms_eval_prompt_style_reproduces_its_prompts(lmms, bench):
    for question in QUESTIONS:
        want = lmms_doc_to_text(lmms, bench, question)
        assert build_prompt(bench, question, "lmms-eval") == want, (bench, question)
        assert get_benchmark(bench).prompt(EvalItem("1", question, []), style="lmms-eval") == want


def test_chartqa_prompts_differ_between_styles(lmms):
    q = "What is the peak?"
    assert lmms_doc_to_text(lmms, "chartqa", q).endswith("\nAnswer the question with a single word.")
    assert build_prompt("chartqa", q) == q + "\nAnswer the question using a single word or phrase."


def test_reasoning_tags_default_is_lmms_eval_cli_default(lmms):
    import lmms_eval

    main = (Path(lmms_eval.__file__).parent / "__main__.py").read_text()
    match = re.search(r'"--reasoning_tags",\s*type=str,\s*default=\'([^\']*)\'', main)
    assert match and json.loads(match.group(1)) == json.loads(CLI_REASONING_TAGS)
    assert [list(p) for p in M.REASONING_TAGS] == json.loads(CLI_REASONING_TAGS)
    for raw in ["<think>a</think> b", "x</think>y", "<analysis>q</analysis><think>r</think> z ", "<think>open"]:
        assert M.clean_prediction(raw) == lmms_prediction(lmms, raw)
