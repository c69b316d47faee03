"""`dvsft compare`: data sets, summaries, and a toy-size run end to end through the CLI."""

import json
import random

import pytest
from typer.testing import CliRunner

from dvsft.core.records import read_jsonl, write_jsonl
from dvsft.experiments.compare import (
    METHODS,
    METRICS,
    REGION_EVAL,
    SUMMARY_KEYS,
    build_sets,
    heldout_region_items,
    markdown_table,
    stage_steps,
)
from dvsft.experiments.runner import summarize


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    from dvsft.sources.corpora import corpus_text
    from dvsft.sources.render import Renderer

    d = tmp_path_factory.mktemp("cmp_pages")
    r = Renderer("qwen3-vl", cols=8, max_rows=3, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
    rows = []
    for i, p in enumerate(r.render_text(corpus_text()[12000:13500], random.Random(4))[:6]):
        p.save(d / f"p{i}.png")
        messages = [{"role": "user", "content": "<image>Read."}, {"role": "assistant", "content": p.text}]
        rows.append({"id": f"p{i}", "image": f"p{i}.png", "width": p.width, "height": p.height, "words": p.words})
        rows[-1]["messages"] = messages
    write_jsonl(d / "train.jsonl", rows)
    return d


def test_training_sets_share_and_heldout_items(pages, tmp_path):
    sets = build_sets(pages / "train.jsonl", tmp_path, share=0.25, seed=0)
    ocr, mix, regions = (list(read_jsonl(sets[k])) for k in ("ocr", "mix", "regions"))
    assert len(ocr) == 6 and len(mix) == 6 + 2  # 25% of the mixed samples are region QA
    assert sum("tasks" in r for r in mix) == 2
    assert all("tasks" in r for r in regions) and len(regions) == 6
    assert {r["tasks"][0]["name"] for r in regions} <= {"bbox2caption", "caption2bbox", "bbox2ocr", "ocr2bbox"}
    assert all(r["image"].startswith("/") for r in mix)  # absolute: the sets live elsewhere than the images
    items = heldout_region_items(pages / "train.jsonl", seed=0)
    assert len(items) == 6 * len(REGION_EVAL)
    assert [i["tasks"][0]["name"] for i in items[:4]] == [t for t, _ in REGION_EVAL]


def test_stage_steps_add_up():
    assert stage_steps(METHODS["finevit-staged"], 7) == [4, 3]
    assert stage_steps(METHODS["sft"], 7) == [7]


def test_summary_and_table_mark_the_best():
    rows = []
    for seed, (a, b) in enumerate([(0.2, 0.4), (0.4, 0.6)]):
        for method, acc in (("sft", a), ("dvsft", b)):
            row = {k: 0.5 for k, _, _ in METRICS}
            row.update(method=method, seed=seed, word_acc=acc, cer=1 - acc, train_seconds=10.0)
            rows.append(row)
    summary = summarize(rows, ["sft", "dvsft"], SUMMARY_KEYS)
    assert summary["dvsft"]["word_acc"]["mean"] == pytest.approx(0.5)
    assert summary["sft"]["word_acc"]["std"] == pytest.approx(0.1414, abs=1e-3)
    table = markdown_table(summary, ["sft", "dvsft"])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == len(METRICS) + 3
    assert "**50.0 ± 14.1**" in lines[3] and "**50.0 ± 14.1**" not in lines[2]  # best word acc, best (lowest) CER
    assert lines[2].split("|")[2].strip() == "30.0 ± 14.1"


@pytest.mark.slow
def test_toy_compare_end_to_end(tmp_path):
    from dvsft.cli import app

    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        app,
        ["compare", "--preset", "toy", "--methods", "sft,finevit-staged", "--workers", "0", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["sft", "finevit-staged"]
    for run in results["runs"]:
        for key, _, _ in METRICS:
            assert 0.0 <= run[key] <= (10.0 if key == "cer" else 1.0), key
    table = (out / "table.md").read_text()
    assert "SFT (`sft`)" in table and "FineViT staged (`finevit-staged`)" in table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the staged method trained twice (region stage, then DV-SFT) from the same base model
    stage_dirs = sorted(p.name for p in (out / "runs" / "finevit-staged-seed0").iterdir())
    assert stage_dirs == ["stage1", "stage2"]
    cfg2 = json.loads((out / "runs" / "finevit-staged-seed0" / "stage2" / "dvsft_train.json").read_text())
    assert cfg2["method"] == "dvsft" and cfg2["model"].endswith("stage1/final")
    res = CliRunner().invoke(app, ["compare", "--preset", "toy", "--methods", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "unknown method" in res.output
