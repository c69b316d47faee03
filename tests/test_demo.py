"""`dvsft demo` end to end at toy size: every output file is written and well formed."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from dvsft.experiments.demo import METHODS, PRESETS, eval_steps
from dvsft.experiments.demo_report import KEYS, per_seed_margins
from dvsft.experiments.runner import summarize


@pytest.mark.slow
def test_demo_toy_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dvsft.cli",
            "demo",
            "--preset",
            "toy",
            "--steps",
            "3",
            "--workers",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "1000"},  # rich wraps at 80 columns when piped, possibly inside a long path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DV-SFT" in proc.stdout and "report.md" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    rows = results["runs"]
    assert {r["method"] for r in rows} == {"sft", "dvsft"}
    assert {r["step"] for r in rows} == set(eval_steps(PRESETS["toy"], 3))
    for r in rows:
        assert set(r) >= {"method", "seed", "step", *KEYS}
        assert isinstance(r["seed"], int) and isinstance(r["step"], int)
    # the saved models are seed 0's final ones: evaluated again here without the encoded-sample cache (the run's
    # evaluations encoded their pages through it), they give that row's numbers
    from dvsft.experiments.demo import EVAL_SETS, eval_sets
    from dvsft.experiments.demo_eval import evaluate
    from dvsft.models.loading import load_model, load_processor

    sets = eval_sets({n: out / "data" / f"{n}.jsonl" for n in EVAL_SETS}, "heldout")
    last = max(r["step"] for r in rows)
    for method in ("sft", "dvsft"):
        (final,) = [r for r in rows if r["method"] == method and r["seed"] == 0 and r["step"] == last]
        again = evaluate(load_model(out / method), load_processor(out / method), sets, cache_dir="none")
        # nan_ok: text_long_word_acc is NaN when the held-out pages hold no word of 4+ sub-tokens
        assert again == pytest.approx({k: final[k] for k in again}, abs=1e-9, nan_ok=True), method
    # the text stage ran, was probed on validation pages and is cached beside the pages
    assert set(results["text_stage"]) == {"val_text", "val_random"}
    assert (out / "data" / "text_llm" / "dvsft_text_stage.json").is_file()
    assert results["split"] == "heldout" and isinstance(results["dvsft_wins_every_seed"], bool)

    for name in ("curves.png", "lens.png"):
        with Image.open(out / name) as im:
            assert im.width > 200 and im.height > 200
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # a drawing, not a blank
    report = (out / "report.md").read_text()
    assert "| SFT |" in report and "| DV-SFT |" in report and "±" in report
    assert "non-contextual" in report and "image swap" in report.lower()

    for method in ("sft", "dvsft"):
        model = load_model(out / method)
        processor = load_processor(out / method)
        assert model.config.model_type == "qwen3_vl" and processor.tokenizer is not None


@pytest.mark.slow
def test_demo_methods_option_and_log_lines(tmp_path):
    """`--methods dvsft` trains DV-SFT only; piped output gets one line per evaluation point."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dvsft.cli", "demo", "--preset", "toy", "--steps", "2", "--workers", "1"]
    proc = subprocess.run([*cmd, "--methods", "dvsft", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert {r["method"] for r in rows} == {"dvsft"}
    assert not (out / "runs" / "sft-seed0").exists() and not (out / "sft").exists()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DV-SFT seed 0 step ")]
    assert len(lines) == len(rows) == len(eval_steps(PRESETS["toy"], 2))
    assert all("word accuracy text " in line and ", swap " in line and line.endswith("%") for line in lines)


@pytest.mark.slow
def test_demo_pool_gives_the_in_process_numbers(tmp_path):
    """`--workers 2` (spawned processes) and `--workers 1` (this process) give the same numbers to the digit."""
    from dvsft.experiments.demo import demo_preset, run_demo

    timings = {"train_seconds", "eval_seconds"}
    runs = {}
    for workers in (1, 2):
        results = run_demo(demo_preset("toy", steps=2), 1, tmp_path / f"w{workers}", workers, METHODS, threads=1)
        # NaN (a metric with nothing to score, e.g. no long word on the toy pages) compares equal to itself here
        runs[workers] = [{k: repr(v) for k, v in r.items() if k not in timings} for r in results["runs"]]
    assert len(runs[1]) == 2 * len(eval_steps(PRESETS["toy"], 2)) and runs[1] == runs[2]


def row(method, seed, step, text, random, swap):
    out = {"method": method, "seed": seed, "step": step, "vision_top1": 0.5}
    for name, acc in (("text", text), ("random", random), ("swap", swap)):
        out.update({f"{name}_word_acc": acc, f"{name}_tf_acc": acc, f"{name}_cer": 1 - acc})
    return out


def test_summary_and_margins():
    rows = [
        row("sft", 0, 10, 0.1, 0.0, 0.1),
        row("sft", 1, 10, 0.3, 0.1, 0.2),
        row("dvsft", 0, 10, 0.7, 0.5, 0.0),
        row("dvsft", 1, 10, 0.5, 0.4, 0.1),
        row("dvsft", 0, 5, 0.0, 0.0, 0.0),  # an earlier step: not in the summary
    ]
    summary = summarize(rows, METHODS, KEYS)
    assert abs(summary["sft"]["text_word_acc"]["mean"] - 0.2) < 1e-9
    assert abs(summary["dvsft"]["text_cer"]["mean"] - 0.4) < 1e-9
    assert summary["dvsft"]["text_word_acc"]["std"] == pytest.approx(0.2 / 2**0.5)  # sample std of 0.7 and 0.5
    assert summary["sft"]["random_cer"] == pytest.approx({"mean": 0.95, "std": 0.1 / 2**0.5, "n": 2})
    nan = row("sft", 2, 10, 0.5, 0.5, 0.5) | {"vision_top1": float("nan")}  # a seed without labeled tokens
    assert summarize([*rows, nan], METHODS, KEYS)["sft"]["vision_top1"] == {"mean": 0.5, "std": 0.0, "n": 2}
    margins = per_seed_margins(rows)
    assert [round(m["text"], 6) for m in margins] == [0.6, 0.2]
    assert [round(m["random"], 6) for m in margins] == [0.5, 0.3]
    # reading gap: (0.7 - 0.0) - (0.1 - 0.1) and (0.5 - 0.1) - (0.3 - 0.2)
    assert [round(m["swap"], 6) for m in margins] == [0.7, 0.3]


FAMILY_TYPES = {
    "qwen3.5": "qwen3_5",
    "qwen3-vl-moe": "qwen3_vl_moe",
    "internvl": "internvl",
    "llava_onevision": "llava_onevision",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
}


@pytest.fixture(scope="module")
def toy_pages(tmp_path_factory):
    from dvsft.experiments.demo import build_data

    out = tmp_path_factory.mktemp("toy_pages")
    build_data(PRESETS["toy"], out)
    return out / "data"


@pytest.mark.parametrize("family", list(FAMILY_TYPES))
@pytest.mark.slow
def test_demo_toy_runs_for_each_family(family, toy_pages, tmp_path):
    """`dvsft demo --family F`: the same pages, the family's tiny model, DV-SFT, evaluation and lens figure."""
    import shutil

    from typer.testing import CliRunner

    from dvsft.cli import app
    from dvsft.models.loading import load_model

    out = tmp_path / "demo"
    shutil.copytree(toy_pages, out / "data")  # the rendered pages are reused, not rendered again
    args = ["demo", "--preset", "toy", "--steps", "1", "--workers", "1", "--methods", "dvsft", "--family", family]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert {r["method"] for r in rows} == {"dvsft"} and {r["step"] for r in rows} == {1}
    assert (out / "lens.png").is_file()
    model = load_model(out / "dvsft")
    assert model.config.model_type == FAMILY_TYPES[family]
    # the family's visual tokens were labeled and scored: the saved model gives the row's vision top-1 again
    from dvsft.experiments.demo import EVAL_SETS, eval_sets
    from dvsft.lens.visual_logits import vision_label_accuracy
    from dvsft.models.loading import load_processor

    pages = eval_sets({n: out / "data" / f"{n}.jsonl" for n in EVAL_SETS}, "heldout")["text"][:16]
    scored = vision_label_accuracy(model.eval(), load_processor(out / "dvsft"), pages)
    assert scored["n"] > 0 and scored["top1"] == pytest.approx(rows[0]["vision_top1"], abs=1e-9)
