"""Synthetic scenes (dvsft.sources.scenes), their fill labels through the collator, `dvsft demo --task scenes`
and `dvsft demo --label-policy span` end to end."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dvsft.align.aligner import AlignConfig
from dvsft.core.records import read_jsonl
from dvsft.data.collator import VisionCollator
from dvsft.experiments.demo_eval import long_word_accuracy, resolved
from dvsft.models.loading import load_processor
from dvsft.sources.scenes import (
    COLOURS,
    SHAPES,
    SceneSpec,
    area_names,
    held_out_combos,
    make_scenes,
    vocabulary_text,
    write_scenes,
)
from dvsft.testing.tiny import TinyConfig, save_tiny, train_tokenizer

BOTH = SceneSpec(labels=("colour", "shape"))


def objects_of(record):
    """(colour, shape, box) of each object of a scene written with colour and shape regions."""
    words = record["words"]
    return [(c["text"], s["text"], s["box"]) for c, s in zip(words[0::2], words[1::2], strict=True)]


def test_scenes_are_deterministic_and_drawn_where_their_regions_say():
    a, b = make_scenes(BOTH, 30, "train", 7), make_scenes(BOTH, 30, "train", 7)
    assert a.records == b.records and all(a.images[k].tobytes() == b.images[k].tobytes() for k in a.images)
    assert make_scenes(BOTH, 30, "train", 8).records != a.records
    width, height = BOTH.size
    assert (width, height) == (6 * 32, 6 * 32)
    for r in a.records:
        image = a.images[r["image"]]
        assert image.size == (r["width"], r["height"]) == (width, height)
        assert all(w["kind"] == "object" for w in r["words"])
        objects = objects_of(r)
        assert BOTH.min_objects <= len(objects) <= BOTH.max_objects
        for colour, shape, box in objects:
            assert colour in COLOURS and shape in SHAPES
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            # the outline's centre shows the object's colour
            assert image.getpixel((round((x0 + x1) / 2), round((y0 + y1) / 2))) == COLOURS[colour]
        for i, (_, _, p) in enumerate(objects):  # no two objects overlap
            for _, _, q in objects[i + 1 :]:
                assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]
        region = r["words"][1]
        ring = region["polygon"][0]
        assert region["box"] == [min(ring[0::2]), min(ring[1::2]), max(ring[0::2]), max(ring[1::2])]


def question_object(record):
    """The (colour, shape) a record's question or answer names."""
    user, answer = record["messages"][0]["content"], record["messages"][-1]["content"]
    name = answer if user.startswith("<image>What is in the ") else user.removeprefix("<image>Where is the ")[:-1]
    colour, shape = name.split()
    return colour, shape


def test_held_out_combinations_are_never_in_training_scenes():
    held = held_out_combos(BOTH.colours, BOTH.shapes)
    assert len(held) == 6 and {c for c, _ in held} == set(COLOURS) and {s for _, s in held} == set(SHAPES)
    train = make_scenes(BOTH, 400, "train", 0).records
    shown = {(c, s) for r in train for c, s, _ in objects_of(r)}
    assert not shown & held and len(shown) == 36 - 6  # every other combination appears
    assert {question_object(r) for r in train} <= shown
    unseen = make_scenes(BOTH, 60, "unseen", 0).records
    assert {question_object(r) for r in unseen} <= held
    asks = {r["messages"][0]["content"].split(" the ")[0] for r in unseen}
    assert asks == {"<image>What is in", "<image>Where is"}
    areas = set(area_names(2, 2))
    assert areas == {"top left", "top right", "bottom left", "bottom right"}
    for r in unseen:  # the asked object sits in the area the question or answer names
        colour, shape = question_object(r)
        (box,) = [b for c, s, b in objects_of(r) if (c, s) == (colour, shape)]
        col = "left" if (box[0] + box[2]) / 2 < 96 else "right"
        row = "top" if (box[1] + box[3]) / 2 < 96 else "bottom"
        assert f"{row} {col}" in r["messages"][0]["content"] + r["messages"][-1]["content"]
    with pytest.raises(ValueError, match="labels"):
        SceneSpec(labels=("size",))


def covered_cells(ring, size, cell=32):
    """cell index -> share of its pixels inside the polygon (a raster of it, independent of the aligner)."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon(list(zip(ring[0::2], ring[1::2], strict=True)), fill=255)
    inside = np.asarray(mask) > 127
    cols = size[0] // cell
    shares = {}
    for row in range(size[1] // cell):
        for col in range(cols):
            shares[row * cols + col] = inside[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell].mean()
    return shares


@pytest.fixture(scope="module")
def scene_processor(tmp_path_factory):
    spec = SceneSpec()
    pixels = spec.size[0] * spec.size[1]
    cfg = TinyConfig(vocab_size=400, hidden_size=32, layers=1, heads=2, kv_heads=1, vision_hidden_size=32)
    cfg = replace(cfg, vision_heads=2, min_pixels=pixels, max_pixels=pixels)
    return load_processor(save_tiny(tmp_path_factory.mktemp("scene_tiny"), cfg, vocabulary_text(spec)))


def test_fill_labels_of_scenes_through_the_collator(scene_processor, tmp_path):
    """Every cell at least half inside a shape is labeled with the shape's word; the collator's positions are the
    image tokens of those cells."""
    spec = SceneSpec()
    path = write_scenes(spec, 8, "train", 3, tmp_path)
    records = resolved(list(read_jsonl(path)), path)
    tok = scene_processor.tokenizer
    ids = {s: tok(" " + s, add_special_tokens=False)["input_ids"] for s in SHAPES}
    assert all(len(v) == 1 for v in ids.values())  # the scene tokenizer holds each shape as one token
    batch = VisionCollator(scene_processor, AlignConfig(label_policy="fill"))(records)
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    positions, targets = batch["vision_positions"].tolist(), batch["vision_targets"].tolist()
    checked = 0
    for b, r in enumerate(records):
        image_positions = (batch["input_ids"][b] == image_token).nonzero().flatten().tolist()
        assert len(image_positions) == spec.cols * spec.rows
        got = {image_positions.index(p): t for (bb, p), t in zip(positions, targets, strict=True) if bb == b}
        for region in r["words"]:
            for cell, share in covered_cells(region["polygon"][0], spec.size).items():
                if share >= 0.55:  # objects sit in areas of whole cells: no cell holds two
                    assert got.get(cell) == ids[region["text"]][0], (r["id"], cell, share)
                    checked += 1
                elif 0 < share <= 0.45:
                    assert cell not in got, (r["id"], cell, share)
        assert set(got.values()) <= {ids[w["text"]][0] for w in r["words"]}
    assert checked >= 2 * len(records)  # most shapes cover two or more whole cells
    # the paper's rule labels one cell per object: fill labels more
    corner = VisionCollator(scene_processor)(records)
    assert len(targets) > len(corner["vision_targets"].tolist()) >= sum(len(r["words"]) for r in records) // 2


def test_long_word_accuracy_counts_only_words_of_four_sub_tokens_or_more():
    tok = train_tokenizer(400)
    lengths = {w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in ("the", "function", "attribute")}
    assert lengths["the"] == 1 and lengths["function"] == 3 and lengths["attribute"] >= 4, lengths
    pairs = [("the attribute function", "the attribute function"), ("function the", "attribute function the")]
    assert long_word_accuracy(pairs, tok) == 0.5  # one of two long reference words transcribed
    assert math.isnan(long_word_accuracy([("the", "the")], tok))


def run_demo_cli(args, out):
    proc = subprocess.run(
        [sys.executable, "-m", "dvsft.cli", "demo", *args, "--workers", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "1000"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_scene_demo_toy_end_to_end(tmp_path):
    from dvsft.experiments.demo import eval_steps
    from dvsft.experiments.demo_scenes import KEYS
    from dvsft.experiments.settings import SCENE_PRESETS

    out = tmp_path / "scenes"
    results = run_demo_cli(["--task", "scenes", "--preset", "toy", "--steps", "3"], out)
    assert results["task"] == "scenes" and results["preset"]["label_policy"] == "fill"
    rows = results["runs"]
    assert {r["method"] for r in rows} == {"sft", "dvsft"}
    assert {r["step"] for r in rows} == set(eval_steps(SCENE_PRESETS["toy"], 3))
    assert all(set(r) >= set(KEYS) - {"unseen_what_acc"} for r in rows)
    assert isinstance(results["dvsft_ahead_every_seed"], bool)
    trained = json.loads((out / "runs" / "dvsft-seed0" / "dvsft_train.json").read_text())
    assert trained["align_label_policy"] == "fill"
    for name in ("train", "seen", "unseen", "val_seen", "val_unseen"):
        assert (out / "data" / f"{name}.jsonl").is_file()
    with Image.open(out / "curves.png") as im:
        assert im.width > 200 and im.convert("L").getextrema()[1] - im.convert("L").getextrema()[0] > 100
    report = (out / "report.md").read_text()
    assert "| SFT |" in report and "| DV-SFT |" in report and "held-out combinations" in report


@pytest.mark.slow
def test_text_demo_with_the_span_policy(tmp_path):
    out = tmp_path / "span"
    results = run_demo_cli(["--preset", "toy", "--steps", "2", "--methods", "dvsft", "--label-policy", "span"], out)
    assert results["preset"]["label_policy"] == "span"
    trained = json.loads((out / "runs" / "dvsft-seed0" / "dvsft_train.json").read_text())
    assert trained["align_label_policy"] == "span"
    assert all("text_long_word_acc" in r for r in results["runs"])


def test_bad_task_and_label_policy_are_usage_errors(tmp_path):
    from typer.testing import CliRunner

    from dvsft.cli import app

    for args, message in (
        (["--task", "nope"], "unknown task 'nope'"),
        (["--label-policy", "nope"], "label policy 'nope'"),
        (["--task", "scenes", "--preset", "gpu"], "unknown preset 'gpu'"),
    ):
        res = CliRunner().invoke(app, ["demo", *args, "--out", str(tmp_path / "demo")])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "demo").exists()


def test_boolean_preset_overrides_parse_true_and_false():
    from dvsft.experiments.demo import apply_overrides
    from dvsft.experiments.settings import SCENE_PRESETS

    cpu = SCENE_PRESETS["cpu"]
    assert cpu.multi_label and cpu.scene_labels == "colour+shape" and cpu.label_policy == "fill"
    assert apply_overrides(cpu, ["multi_label=false"]).multi_label is False  # bool("false") is True
    assert apply_overrides(cpu, ["multi_label=True"]).multi_label is True
    with pytest.raises(ValueError, match="expected true or false"):
        apply_overrides(cpu, ["multi_label=maybe"])
