"""`dvsft eval` end to end on the tiny Qwen3-VL: every benchmark type, outputs, resume, submission."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_files import (
    chartqa_parquet,
    infovqa_official,
    lmms_docvqa,
    mme_official,
    ocrbench_official,
    ocrvqa_parquet,
    squad_official,
    textvqa_parquet,
    word_records,
)
from typer.testing import CliRunner

from dvsft.cli import app
from dvsft.core.records import read_jsonl
from dvsft.evaluation import metrics as M
from dvsft.evaluation.benchmarks import get_benchmark

runner = CliRunner()


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval_data")
    (d / "sel").mkdir()
    (d / "sel" / "selection.json").write_text(json.dumps({"ids": ["1234567-1", "7654321-0"]}))
    return {
        "docvqa": lmms_docvqa(d / "lmms_docvqa"),
        "infovqa": infovqa_official(d / "infovqa"),
        "squad": squad_official(d / "squad"),
        "chartqa": chartqa_parquet(d / "chartqa"),
        "ocrbench": ocrbench_official(d / "ocrbench"),
        "ocrvqa": ocrvqa_parquet(d / "ocrvqa"),
        "textvqa": textvqa_parquet(d / "textvqa"),
        "mme": mme_official(d / "mme"),
        "ocr": word_records(d / "ocr" / "words.jsonl", transcription=True),
        "records": word_records(d / "records" / "words.jsonl"),
        "selection": d / "sel" / "selection.json",
    }


def run_eval(model: Path, out: Path, benches: dict[str, Path], *extra: str):
    args = ["eval", "--model", str(model), "--bench", ",".join(benches), "--data", ",".join(map(str, benches.values()))]
    result = runner.invoke(app, [*args, "--out", str(out), "--max-new-tokens", "3", *extra])
    return result


def text(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def rows_of(out: Path, bench: str) -> list[dict]:
    return list(read_jsonl(out / bench / "predictions.jsonl"))


EXPECTED_N = {"docvqa": 3, "infovqa": 2, "squad": 2, "chartqa": 3, "ocrbench": 3, "ocrvqa": 2, "textvqa": 2, "mme": 4}
RULES = {
    "docvqa": M.anls,
    "infovqa": M.anls,
    "squad": M.squad_f1,
    "chartqa": lambda p, a: float(M.relaxed_correctness(p, a[0])),
    "ocrvqa": M.exact_match,
    "textvqa": M.vqa_accuracy,
    "mme": lambda p, a: M.mme_correct(p, a[0]),
}


def test_eval_runs_every_benchmark(tiny_dir, data, tmp_path):
    benches = {b: data[b] for b in [*EXPECTED_N, "ocr"]}
    out = tmp_path / "out"
    result = run_eval(
        tiny_dir, out, benches, "--batch-size", "3", "--scales", "0.5,1.0", "--selection", str(data["selection"])
    )
    assert result.exit_code == 0, result.output
    for bench in benches:
        assert bench in result.output  # the printed table
    summary = json.loads((out / "scores.json").read_text())
    assert set(summary) == set(benches)
    for bench, n in EXPECTED_N.items():
        rows = rows_of(out, bench)
        assert len(rows) == n and len({r["id"] for r in rows}) == n, bench
        scores = json.loads((out / bench / "scores.json").read_text())
        assert scores == summary[bench]
        assert scores["n"] == n and scores["metrics"]["n_scored"] == n
        for row in rows:
            assert isinstance(row["prediction"], str) and row["prompt"].endswith("single word or phrase.")
            if bench in RULES:
                assert row["score"] == pytest.approx(RULES[bench](row["prediction"], row["answers"])), bench
        primary = get_benchmark(bench).primary
        if bench in RULES:
            mean = 100 * sum(r["score"] for r in rows) / n
            assert scores["metrics"][primary] == pytest.approx(mean), bench
    assert {r["id"] for r in rows_of(out, "ocrvqa")} == {"1234567-1", "7654321-0"}  # the selection
    ocrbench = rows_of(out, "ocrbench")
    assert [r["score"] for r in ocrbench] == [
        M.ocrbench_score(r["prediction"], r["answers"], r["meta"]["dataset"]) for r in ocrbench
    ]
    assert json.loads((out / "ocrbench" / "scores.json").read_text())["metrics"]["final_score"] == sum(
        r["score"] for r in ocrbench
    )
    mme = json.loads((out / "mme" / "scores.json").read_text())["metrics"]
    assert set(mme["categories"]) == {"OCR", "code_reasoning"} and mme["total"] == mme["perception"] + mme["cognition"]
    ocr = rows_of(out, "ocr")
    assert sorted(r["id"] for r in ocr) == sorted(f"rec-{i}@{s}" for i in range(3) for s in (0.5, 1.0))
    for r in ocr:
        assert r["prompt"] == "Transcribe the text in the image."
        assert r["cer"] == pytest.approx(M.cer(r["prediction"], r["answers"][0]))
        assert r["word_accuracy"] == pytest.approx(M.word_accuracy(r["prediction"], r["answers"][0]))
    assert set(json.loads((out / "ocr" / "scores.json").read_text())["metrics"]["scales"]) == {"0.5", "1.0"}
    sub = json.loads((out / "docvqa" / "submission.json").read_text())
    assert sub == [
        {"questionId": int(r["id"]), "answer": M.clean_prediction(r["prediction"])} for r in rows_of(out, "docvqa")
    ]


def test_private_test_split_writes_submission(tiny_dir, data, tmp_path):
    out = tmp_path / "out"
    result = run_eval(tiny_dir, out, {"docvqa": data["docvqa"]}, "--split", "test")
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "docvqa" / "scores.json").read_text())
    assert scores["answers_private"] is True and scores["metrics"] == {"n_scored": 0}
    sub = json.loads((out / "docvqa" / "submission.json").read_text())
    assert [s["questionId"] for s in sub] == [57344, 57345] and all(isinstance(s["answer"], str) for s in sub)


def test_submission_holds_the_scored_answer_without_reasoning(tiny_dir, data, tmp_path):
    """lmms-eval submits the prediction after its reasoning cut; the submission must equal what was scored."""
    out = tmp_path / "out"
    assert run_eval(tiny_dir, out, {"docvqa": data["docvqa"]}).exit_code == 0
    rows = rows_of(out, "docvqa")
    for row in rows:
        row["prediction"] = (
            f"<think>Which word is it?\nThe page says {row['answers'][0]}.</think>\n{row['answers'][0]} "
        )
    (out / "docvqa" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(tiny_dir, out, {"docvqa": data["docvqa"]})  # a resume: rescores and rewrites the submission
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "docvqa" / "scores.json").read_text())
    assert scores["generated_now"] == 0 and scores["metrics"]["anls"] == pytest.approx(100.0)
    sub = json.loads((out / "docvqa" / "submission.json").read_text())
    assert sub == [{"questionId": int(r["id"]), "answer": r["answers"][0]} for r in rows]


def test_resume_skips_done_items_and_refuses_other_settings(tiny_dir, data, tmp_path):
    out = tmp_path / "out"
    bench = {"docvqa": data["records"]}
    assert run_eval(tiny_dir, out, bench, "--limit", "2").exit_code == 0
    pred = out / "docvqa" / "predictions.jsonl"
    rows = rows_of(out, "docvqa")
    assert [r["id"] for r in rows] == ["rec-0", "rec-1"]
    rows[0]["prediction"] = "beta"  # a done item: a resumed run must keep it, not regenerate it
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "rec-2", "predi')  # and a torn line
    result = run_eval(tiny_dir, out, bench)
    assert result.exit_code == 0, result.output
    rows = rows_of(out, "docvqa")
    assert [r["id"] for r in rows] == ["rec-0", "rec-1", "rec-2"] and rows[0]["prediction"] == "beta"
    scores = json.loads((out / "docvqa" / "scores.json").read_text())
    assert scores["generated_now"] == 1 and scores["n"] == 3
    expected = 100 * sum(M.anls(r["prediction"], r["answers"]) for r in rows) / 3
    assert scores["metrics"]["anls"] == pytest.approx(expected)
    refused = run_eval(tiny_dir, out, bench, "--post-prompt", " Answer briefly.")
    assert refused.exit_code == 2 and "other settings" in text(refused)
    assert run_eval(tiny_dir, out, bench, "--post-prompt", " Answer briefly.", "--overwrite").exit_code == 0
    assert all(r["prompt"].endswith(" Answer briefly.") for r in rows_of(out, "docvqa"))


def test_batched_and_single_generation_agree(tiny_dir, data, tmp_path):
    bench = {"chartqa": data["chartqa"]}
    assert run_eval(tiny_dir, tmp_path / "b1", bench, "--batch-size", "1").exit_code == 0
    assert run_eval(tiny_dir, tmp_path / "b3", bench, "--batch-size", "3").exit_code == 0
    single = {r["id"]: r["prediction"] for r in rows_of(tmp_path / "b1", "chartqa")}
    batched = {r["id"]: r["prediction"] for r in rows_of(tmp_path / "b3", "chartqa")}
    assert single == batched


def test_bad_arguments_give_clear_errors(tiny_dir, data, tmp_path):
    result = run_eval(tiny_dir, tmp_path / "o", {"docvqa": data["docvqa"], "mme": data["mme"]}, "--data", "x")
    assert result.exit_code == 2 and "2 benchmark(s) but --data gives 1" in text(result)
    result = runner.invoke(
        app, ["eval", "--model", str(tiny_dir), "--bench", "vqav2", "--data", "x", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "unknown benchmark" in text(result)
    result = run_eval(tiny_dir, tmp_path / "o", {"chartqa": tmp_path / "missing"})
    assert result.exit_code == 2 and "missing does not exist" in text(result)


def test_bench_eval_reports_both_batch_sizes(tiny_dir):
    from dvsft.experiments.bench.throughput import throughput_benchmark

    res = throughput_benchmark(n=4, batch_size=4, max_new_tokens=2, model_dir=tiny_dir)
    assert res["single_samples_per_s"] == pytest.approx(4 / res["single_s"])
    assert res["batched_samples_per_s"] == pytest.approx(4 / res["batched_s"])
    assert res["ratio"] == pytest.approx(res["single_s"] / res["batched_s"])
    assert res["agree"] == 4  # left-padded batches generate what one item at a time does (as in the chartqa test)


def test_prompt_style_and_rules_are_used_and_recorded(tiny_dir, data, tmp_path):
    from dvsft.evaluation.metrics import LMMS_EVAL_VERSION

    out = tmp_path / "out"
    benches = {b: data[b] for b in ("chartqa", "ocrbench", "mme", "ocr")}
    result = run_eval(tiny_dir, out, benches, "--prompt-style", "lmms-eval", "--rules", "official")
    assert result.exit_code == 0, result.output
    assert "metric rules: official" in text(result) and "prompt style: lmms-eval" in text(result)
    for row in rows_of(out, "chartqa"):
        assert row["prompt"] == row["question"] + "\nAnswer the question with a single word."
    for row in rows_of(out, "ocrbench"):
        assert row["prompt"] == row["question"].strip()  # lmms-eval's OCRBench appends nothing
    settings = {b: json.loads((out / b / "scores.json").read_text())["settings"] for b in benches}
    assert settings["chartqa"]["prompt"] == "{question}\nAnswer the question with a single word."
    assert settings["ocrbench"]["post_prompt"] == "" and settings["ocrbench"]["prompt"] == "{question}"
    assert settings["ocr"]["post_prompt"] is None and settings["ocr"]["prompt"] == "Transcribe the text in the image."
    assert all(s["prompt_style"] == "lmms-eval" and s["metric_rules"].startswith("official") for s in settings.values())
    mme = json.loads((out / "mme" / "scores.json").read_text())["metrics"]
    assert {"yes_no_accuracy", "yes_no_f1"} <= set(mme) and mme["yes_no"]["n"] == 4

    # Full-width predictions: correct under lmms-eval's rules, wrong under the official script. Changing
    # --rules rescores the stored predictions (a resume generates nothing and is not refused).
    pred_file = out / "ocrbench" / "predictions.jsonl"
    rows = rows_of(out, "ocrbench")
    for row in rows:
        row["prediction"] = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in row["answers"][0])
    pred_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {}
    for rules in ("official", "lmms-eval"):
        res = run_eval(tiny_dir, out, {"ocrbench": data["ocrbench"]}, "--prompt-style", "lmms-eval", "--rules", rules)
        assert res.exit_code == 0, res.output
        scores = json.loads((out / "ocrbench" / "scores.json").read_text())
        assert scores["generated_now"] == 0
        final[scores["settings"]["metric_rules"]] = scores["metrics"]["final_score"]
    assert f"metric rules: lmms-eval {LMMS_EVAL_VERSION}" in text(res)
    # lmms-eval folds the two ordinary items back to ASCII; HME100k (x^{2}+1) is never folded
    assert final == {M.rules_label("official"): 0, f"lmms-eval {LMMS_EVAL_VERSION}": 2}
