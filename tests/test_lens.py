"""The visual logit lens on the tiny Qwen3-VL: top-k at visual tokens, overlays, vision-label accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageChops, ImageDraw, ImageFont
from typer.testing import CliRunner

from dvsft.cli import app
from dvsft.lens.visual_logits import lens_overlay, run_lens, vision_label_accuracy
from dvsft.models.geometry import grid_for

runner = CliRunner()


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from dvsft.models.loading import load_model, load_processor

    return tiny_dir, load_model(tiny_dir).eval(), load_processor(tiny_dir)


def page(path: Path, words=("Potter", "the", "stone")) -> tuple[Path, list[dict]]:
    """A 256x96 image with words drawn at known boxes; returns (path, words with boxes)."""
    from matplotlib import font_manager

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 20)
    image = Image.new("RGB", (256, 96), (250, 250, 240))
    draw = ImageDraw.Draw(image)
    out = []
    for i, w in enumerate(words):
        xy = (6 + 80 * i, 6 + 30 * i)
        draw.text(xy, w, fill="black", font=font)
        out.append({"text": w, "box": [float(v) for v in draw.textbbox(xy, w, font=font)], "score": 1.0})
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path, out


def test_topk_equals_the_full_logits_at_visual_positions(tiny, tmp_path):
    from dvsft.evaluation.generation import generation_inputs
    from dvsft.lens.visual_logits import LENS_PROMPT

    _, model, processor = tiny
    path, _ = page(tmp_path / "p.png")
    image = Image.open(path).convert("RGB")
    result = run_lens(model, processor, image, top_k=4)
    g = grid_for(processor, 256, 96)
    assert (result.grid.rows, result.grid.cols) == (g.rows, g.cols) and len(result.top_ids) == g.num_tokens
    inputs = generation_inputs(processor, model, [LENS_PROMPT], [[image]])
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    visual = logits[inputs["input_ids"][0] == model.config.image_token_id]
    probs, ids = torch.softmax(visual.float(), -1).topk(4, -1)
    assert result.top_ids == ids.tolist()
    assert torch.allclose(torch.tensor(result.top_probs), probs, atol=1e-5)
    assert result.top_texts[0][0] == processor.tokenizer.decode([ids[0, 0].item()])


def test_vision_label_accuracy_counts_top1_and_top5_hits(tiny, tmp_path):
    _, model, processor = tiny
    path, _ = page(tmp_path / "p.png")
    result = run_lens(model, processor, Image.open(path), top_k=6)
    top = result.top_ids
    labels = [
        {"token": 0, "text": "a", "token_id": top[0][0]},  # top-1 hit
        {"token": 1, "text": "b", "token_id": top[1][0]},  # top-1 hit
        {"token": 2, "text": "c", "token_id": top[2][4]},  # 5th: top-5 hit only
        {"token": 3, "text": "d", "token_id": top[3][5]},  # 6th: miss
    ]
    record = {"id": "r", "image": "p.png", "grid": [result.grid.rows, result.grid.cols], "vision_labels": labels}
    acc = vision_label_accuracy(model, processor, [record], tmp_path / "aligned.jsonl")
    assert acc == {"top1": 0.5, "top5": 0.75, "n": 4, "images": 1}


def test_word_records_are_aligned_on_the_fly(tiny, tmp_path):
    from dvsft.align.aligner import align_words

    _, model, processor = tiny
    path, words = page(tmp_path / "p.png")
    g = grid_for(processor, 256, 96)
    aligned = align_words(words, g, processor.tokenizer)
    assert aligned.labels  # the words land on tokens
    word_rec = {"id": "w", "image": "p.png", "words": words}
    aligned_rec = {"id": "a", "image": "p.png", "grid": [g.rows, g.cols], "vision_labels": aligned.labels}
    a = vision_label_accuracy(model, processor, [word_rec], tmp_path / "r.jsonl")
    b = vision_label_accuracy(model, processor, [aligned_rec], tmp_path / "r.jsonl")
    assert a == b and a["n"] == len(aligned.labels)
    stale = {**aligned_rec, "grid": [g.rows + 1, g.cols]}  # labels made for another resolution, no words
    with pytest.raises(ValueError, match="record a: .*another grid"):
        vision_label_accuracy(model, processor, [stale], tmp_path / "r.jsonl")


def test_lens_cli_on_an_image_writes_overlay_and_json(tiny, tmp_path):
    model_dir, _, processor = tiny
    path, _ = page(tmp_path / "in" / "p.png")
    out = tmp_path / "lens"
    result = runner.invoke(
        app, ["lens", "--model", str(model_dir), "--image", str(path), "--out", str(out), "--top-k", "3"]
    )
    assert result.exit_code == 0, result.output
    source = Image.open(path).convert("RGB")
    overlay = Image.open(out / "lens.png").convert("RGB")
    assert overlay.size == source.size
    assert len(overlay.getcolors(1 << 16)) > 10  # not blank: grid lines, labels and the page
    assert ImageChops.difference(overlay, source).getbbox() is not None  # something was drawn
    data = json.loads((out / "lens.json").read_text())
    g = grid_for(processor, 256, 96)
    assert data["grid"] == [g.rows, g.cols] and len(data["tokens"]) == g.num_tokens
    for tok in data["tokens"]:
        assert len(tok["top"]) == 3
        probs = [t["prob"] for t in tok["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
        assert tok["top"][0]["text"] == processor.tokenizer.decode([tok["top"][0]["id"]])
    assert data["tokens"][g.cols]["box"] == [0.0, 32.0, 32.0, 64.0]


def test_lens_cli_on_records_reports_accuracy(tiny, tmp_path):
    model_dir, _, _ = tiny
    recs = tmp_path / "data" / "words.jsonl"
    rows = []
    for i in range(2):
        _, words = page(tmp_path / "data" / f"p{i}.png", ("alpha", "beta", "gamma")[i:])
        rows.append({"id": f"doc/{i}", "image": f"p{i}.png", "words": words})
    recs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lens"
    result = runner.invoke(
        app, ["lens", "--model", str(model_dir), "--records", str(recs), "--out", str(out), "--upscale", "2"]
    )
    assert result.exit_code == 0, result.output
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["images"] == 2 and acc["n"] > 0 and 0 <= acc["top1"] <= acc["top5"] <= 1
    entries = json.loads((out / "lens.json").read_text())["records"]
    assert [e["id"] for e in entries] == ["doc/0", "doc/1"]
    labeled = [t for e in entries for t in e["tokens"] if "label_id" in t]
    assert len(labeled) == acc["n"]
    hits = sum(t["top"][0]["id"] == t["label_id"] for t in labeled)
    assert acc["top1"] == pytest.approx(hits / len(labeled))
    for e in entries:
        assert Image.open(e["overlay"]).size == (512, 192)  # upscaled x2
    bad = runner.invoke(app, ["lens", "--model", str(model_dir), "--out", str(out)])
    assert bad.exit_code == 2 and "exactly one of --image or --records" in bad.output


def test_overlay_rejects_wrong_text_count(tmp_path):
    g = grid_for("qwen3-vl", 256, 256, min_pixels=256 * 256, max_pixels=256 * 256)
    with pytest.raises(ValueError, match="3 texts for a grid of 64 tokens"):
        lens_overlay(Image.new("RGB", (256, 256)), g, ["a", "b", "c"])
    img = lens_overlay(Image.new("RGB", (256, 256), "white"), g, ["xx"] * 64, correct={0: True, 1: False})

    def inks(box):  # colours of the text pixels in a cell (not white, not the reddish grid lines)
        pixels = np.asarray(img.crop(box)).reshape(-1, 3).astype(int).tolist()
        return [(r, gr, b) for r, gr, b in pixels if (r, gr, b) != (255, 255, 255) and r < 250]

    hit, miss, plain = inks((2, 2, 30, 30)), inks((34, 2, 62, 30)), inks((66, 2, 94, 30))
    assert hit and all(gr >= r and gr >= b for r, gr, b in hit)  # green: top-1 is the label
    assert miss and all(r >= gr and r >= b for r, gr, b in miss)  # red: it is not
    assert plain and all(b >= r and b >= gr for r, gr, b in plain)  # blue: unlabeled


def lens_cli(model_dir: Path, records: Path, out: Path):
    return runner.invoke(app, ["lens", "--model", str(model_dir), "--records", str(records), "--out", str(out)])


def test_lens_cli_skips_bad_records_with_reasons_and_writes_the_good_ones(tiny, tmp_path):
    model_dir, _, _ = tiny
    data = tmp_path / "data"
    _, words = page(data / "p.png")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot the rest of a PNG")
    stale = [{"token": 0, "text": "a", "token_id": 5}]
    lines = [
        json.dumps({"id": "same", "image": "p.png", "words": words}),
        json.dumps({"id": "gone", "image": "missing.png", "words": words}),
        json.dumps({"id": "broken", "image": "corrupt.png", "words": words}),
        '{"id": "torn", ',
        json.dumps({"id": "inverted", "image": "p.png", "words": [{"text": "x", "box": [9, 9, 1, 1]}]}),
        json.dumps({"id": "stale", "image": "p.png", "grid": [1, 1], "vision_labels": stale}),
        json.dumps({"id": "same", "image": "p.png", "words": words[:1]}),
    ]
    recs = data / "words.jsonl"
    recs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "lens"
    result = lens_cli(model_dir, recs, out)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "skipped 5 of 7 records that could not be read; reasons in" in text  # the path may wrap
    reasons = {row["line"]: row for row in map(json.loads, (out / "skipped_records.jsonl").read_text().splitlines())}
    assert {line: (row["id"], row["file"]) for line, row in reasons.items()} == {
        2: ("gone", str(recs)),
        3: ("broken", str(recs)),
        4: (None, str(recs)),
        5: ("inverted", str(recs)),
        6: ("stale", str(recs)),
    }
    assert "image file not found" in reasons[2]["reason"]
    assert "undecodable image" in reasons[3]["reason"]
    assert "invalid JSON" in reasons[4]["reason"]
    assert "inverted" in reasons[5]["reason"]
    assert "cannot label visual tokens: its vision_labels were made for another grid" in reasons[6]["reason"]
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["images"] == 2 and acc["skipped"] == 5 and acc["n"] > 0
    entries = json.loads((out / "lens.json").read_text())["records"]
    assert [e["id"] for e in entries] == ["same", "same"]
    overlays = {e["overlay"] for e in entries}  # the same id twice: two overlays, neither overwritten
    assert len(overlays) == 2 and all(Path(p).is_file() for p in overlays)


def test_lens_accuracy_json_is_strict_json_when_no_token_is_labeled(tiny, tmp_path):
    model_dir, _, _ = tiny
    page(tmp_path / "p.png")
    recs = tmp_path / "words.jsonl"
    recs.write_text(json.dumps({"id": "blank", "image": "p.png", "words": []}) + "\n")
    result = lens_cli(model_dir, recs, tmp_path / "lens")
    assert result.exit_code == 0, result.output

    def no_constants(name: str):
        raise AssertionError(f"{name} is not JSON")

    acc = json.loads((tmp_path / "lens" / "accuracy.json").read_text(), parse_constant=no_constants)
    assert acc["top1"] is None and acc["top5"] is None and acc["n"] == 0 and acc["images"] == 1
    assert "top-1 n/a, top-5 n/a" in " ".join(result.output.split())


def test_lens_cli_fails_when_every_record_is_bad(tiny, tmp_path):
    model_dir, _, _ = tiny
    recs = tmp_path / "words.jsonl"
    recs.write_text("".join(json.dumps({"id": f"r{i}", "image": f"none{i}.png", "words": []}) + "\n" for i in range(2)))
    out = tmp_path / "lens"
    result = lens_cli(model_dir, recs, out)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert result.output.count("error:") == 1
    assert f"error: {recs}: no record could be read through the lens: all 2 were skipped" in text
    assert len((out / "skipped_records.jsonl").read_text().splitlines()) == 2
