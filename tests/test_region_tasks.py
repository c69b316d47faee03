"""GranViT / FineViT region tasks: reading order, phrases, verbatim templates, box formats, CLI."""

import json
import random
import re

import pytest
from typer.testing import CliRunner

from dvsft.core.records import read_jsonl, write_jsonl
from dvsft.models.geometry import grid_for
from dvsft.sources.region_tasks import (
    BBOX2CAPTION,
    CAPTION2BBOX,
    COORD_KINDS,
    BoxCodec,
    TaskConfig,
    phrases,
    reading_lines,
    task_records,
    word_regions,
)

GRANVIT_B2C = (
    "Describe the content contained within the normalized bounding box coordinates [bbox] in no more than 10 words."
)
GRANVIT_C2B = "Please provide the bounding box coordinate of the region this sentence describes: [caption]"


def line_words(texts, y, x0=10, h=20, w=40, gap=10):
    out, x = [], x0
    for t in texts:
        out.append({"text": t, "box": [x, y, x + w, y + h], "score": 1.0})
        x += w + gap
    return out


def test_templates_are_granvit_verbatim():
    assert BBOX2CAPTION.replace("{bbox}", "[bbox]") == GRANVIT_B2C
    assert CAPTION2BBOX.replace("{caption}", "[caption]") == GRANVIT_C2B


def test_reading_order_lines_by_y_then_x():
    top = line_words(["alpha", "beta", "gamma"], y=10)
    bottom = line_words(["delta", "epsilon"], y=60)
    # jitter vertical positions a little inside a line, then shuffle
    for i, w in enumerate(top):
        w["box"][1] += i * 2
        w["box"][3] += i * 2
    words = top + bottom
    random.Random(3).shuffle(words)
    lines = reading_lines(words, 400, 200)
    assert [[t for t, _ in line] for line in lines] == [["alpha", "beta", "gamma"], ["delta", "epsilon"]]
    assert [r.text for r in word_regions(words, 400, 200)] == ["alpha", "beta", "gamma", "delta", "epsilon"]


def test_phrases_at_most_ten_words_and_union_boxes():
    texts = [f"w{i}" for i in range(23)]
    words = line_words(texts, y=5, w=20, gap=5)
    out = phrases(words, 2000, 100, max_words=10)
    assert sorted(r.n_words for r in out) == [7, 8, 8]  # balanced chunks, never more than 10
    assert " ".join(r.text for r in out) == " ".join(texts)
    first = out[0]
    assert first.box == (10.0, 5.0, words[7]["box"][2], 25.0)
    # a column break (gap over 2.5 line heights) ends a phrase
    two_cols = line_words(["left", "side"], y=5) + line_words(["right", "side2"], y=5, x0=400)
    assert [r.text for r in phrases(two_cols, 600, 100)] == ["left side", "right side2"]


@pytest.mark.parametrize("kind", COORD_KINDS)
def test_box_formats_round_trip_exactly(kind):
    rng = random.Random(kind)
    codec = BoxCodec(kind, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 400)
    for _ in range(300):
        w, h = rng.randint(20, 3000), rng.randint(20, 3000)
        x0, x1 = sorted(rng.uniform(0, w) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, h) for _ in range(2))
        text = codec.format((x0, y0, x1, y1), w, h)
        back = codec.parse(text, w, h)
        # exact: the parsed numbers are the quantized ones, and formatting them again gives the same text
        assert codec.quantize(back, w, h) == codec.quantize((x0, y0, x1, y1), w, h)
        assert codec.format(back, w, h) == text
        # and the quantization error is at most half a unit of the format
        sx, sy = codec._scale(w, h)
        unit = 10**-codec.decimals if kind == "relative" else 1
        for v, ref, s in zip(back, (x0, y0, x1, y1), (sx, sy, sx, sy), strict=True):
            assert abs(v - ref) <= unit / 2 / s + 1e-6


def test_format_details_per_family():
    w, h = 800, 600
    box = (80, 60, 400, 300)
    rel = BoxCodec("relative").format(box, w, h)
    assert rel == "[0.1, 0.1, 0.5, 0.5]"
    assert all(
        len(n.split(".")[1]) <= 3 for n in re.findall(r"\d+\.\d+", BoxCodec().format((1, 2, 333, 444), 999, 777))
    )
    assert BoxCodec("qwen2-vl").format(box, w, h) == "<|box_start|>(100,100),(500,500)<|box_end|>"
    assert BoxCodec("qwen3-vl").format(box, w, h) == "[100, 100, 500, 500]"
    g = grid_for("qwen2.5-vl", 1000, 700)
    q = BoxCodec("qwen2.5-vl").format((100, 70, 500, 350), 1000, 700)
    assert (
        q == f"[{round(100 * g.scale_x)}, {round(70 * g.scale_y)}, {round(500 * g.scale_x)}, {round(350 * g.scale_y)}]"
    )
    assert g.resized_width != 1000  # the resize matters: 1000 is not a multiple of 28
    # model answers in JSON form parse too
    assert BoxCodec("qwen3-vl").parse('[{"bbox_2d": [100, 100, 500, 500], "label": "x"}]', w, h) == box
    assert BoxCodec("qwen3-vl").parse("no box here", w, h) is None
    with pytest.raises(ValueError, match="unknown coordinate format"):
        BoxCodec("pixels")


def record_with(words, rid="doc"):
    return {"id": rid, "image": "img.png", "width": 600, "height": 200, "words": words}


def test_granvit_records_use_templates_and_parse_back():
    words = line_words(["the", "quick", "brown"], y=10) + line_words(["fox", "jumps"], y=80)
    rec = record_with(words)
    codec = BoxCodec()
    out, stats = task_records(rec, TaskConfig(codec=codec))
    assert stats["qa"] == 4 and len(out) == 4 and stats["duplicates"] == 0
    seen = set()
    for r in out:
        assert r["image"] == "img.png" and r["words"] == words
        (task,) = r["tasks"]
        user, assistant = r["messages"]
        assert user["content"].startswith("<image>")
        q, a = user["content"][len("<image>") :], assistant["content"]
        if task["name"] == "bbox2caption":
            assert q == GRANVIT_B2C.replace("[bbox]", codec.format(task["box"], 600, 200))
            assert a == task["text"]
            box_text = re.search(r"\[[^\]]+\]", q).group(0)
        else:
            assert q == GRANVIT_C2B.replace("[caption]", task["text"])
            box_text = a
        back = codec.parse(box_text, 600, 200)
        assert codec.quantize(back, 600, 200) == codec.quantize(task["box"], 600, 200)
        seen.add((task["name"], task["text"]))
    assert seen == {(t, c) for t in ("bbox2caption", "caption2bbox") for c in ("the quick brown", "fox jumps")}


def test_duplicate_captions_skipped():
    words = line_words(["Total"], y=10) + line_words(["Total"], y=80) + line_words(["Tax"], y=150)
    out, stats = task_records(record_with(words), TaskConfig(tasks=("ocr2bbox",), level="word"))
    assert stats["duplicates"] == 2
    assert [r["tasks"][0]["text"] for r in out] == ["Tax"]


def test_turns_and_sampling():
    words = sum((line_words([f"a{i}", f"b{i}"], y=10 + 30 * i) for i in range(5)), [])
    rec = record_with(words)
    rec["height"] = 400
    out, stats = task_records(rec, TaskConfig(level="word", turns=3, max_per_image=4, tasks=("bbox2ocr",)))
    assert stats["qa"] == 4 and [len(r["tasks"]) for r in out] == [3, 1]
    first = out[0]["messages"]
    assert first[0]["content"].startswith("<image>") and not first[2]["content"].startswith("<image>")
    assert len({r["id"] for r in out}) == 2


def test_bad_records_name_the_record():
    with pytest.raises(ValueError, match="'r7'.*'width'"):
        task_records({"id": "r7", "image": "x.png", "height": 5, "words": []}, TaskConfig())
    with pytest.raises(ValueError, match="'r8' word 0"):
        task_records({"id": "r8", "image": "x.png", "width": 5, "height": 5, "words": [{"text": "a"}]}, TaskConfig())
    with pytest.raises(ValueError, match="unknown task"):
        TaskConfig(tasks=("bbox2poem",))


def test_cli_tasks_granvit_and_finevit(tmp_path):
    from PIL import Image

    from dvsft.cli import app

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.new("RGB", (600, 200), "white").save(img_dir / "a.png")
    words = line_words(["one", "two", "three"], y=10) + line_words(["four"], y=80)
    src = img_dir / "words.jsonl"
    write_jsonl(src, [{"id": "a", "image": "a.png", "width": 600, "height": 200, "words": words}])
    out = tmp_path / "out" / "tasks.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["tasks", "granvit", str(src), "--out", str(out), "--coords", "qwen3-vl"])
    assert res.exit_code == 0, res.output
    rows = list(read_jsonl(out))
    assert len(rows) == 4
    assert (out.parent / rows[0]["image"]).resolve() == (img_dir / "a.png").resolve()
    c2b = next(r for r in rows if r["tasks"][0]["name"] == "caption2bbox" and r["tasks"][0]["text"] == "four")
    assert json.loads(c2b["messages"][1]["content"]) == BoxCodec("qwen3-vl").quantize(words[3]["box"], 600, 200)
    res = runner.invoke(app, ["tasks", "finevit", str(src), "--out", str(out), "--level", "word", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert {r["tasks"][0]["name"] for r in read_jsonl(out)} == {"bbox2ocr", "ocr2bbox"}
    assert len(list(read_jsonl(out))) == 8
    res = runner.invoke(app, ["tasks", "finevit", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert res.exit_code == 2 and "no such records file" in res.output


def test_region_task_scores_grade_the_models_own_answers(tiny_dir, tmp_path):
    """Truths set from the model's greedy answers: its own text scores ROUGE-L 1, a foreign text 0, and a
    text-to-box answer counts as right exactly when it parses to a box with IoU >= 0.5."""
    from PIL import Image

    from dvsft.core.records import IMAGE_PLACEHOLDER
    from dvsft.evaluation.generation import Generator
    from dvsft.evaluation.region_tasks import region_task_scores
    from dvsft.models.loading import load_model, load_processor

    Image.new("RGB", (600, 200), "white").save(tmp_path / "a.png")
    words = line_words(["one", "two", "three"], y=10) + line_words(["four"], y=80)
    record = {"id": "a", "image": str(tmp_path / "a.png"), "width": 600, "height": 200, "words": words}
    items, _ = task_records(record, TaskConfig(tasks=("bbox2caption", "caption2bbox")))
    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    prompts = [r["messages"][0]["content"].replace(IMAGE_PLACEHOLDER, "") for r in items]
    images = [[Image.open(r["image"]).convert("RGB")] for r in items]
    answers = Generator(model, processor, max_new_tokens=48)(prompts, images)
    texts = [(r, a) for r, a in zip(items, answers, strict=True) if r["tasks"][0]["name"] == "bbox2caption"]
    boxes = [(r, a) for r, a in zip(items, answers, strict=True) if r["tasks"][0]["name"] == "caption2bbox"]
    assert texts and boxes
    for i, (r, answer) in enumerate(texts):
        r["tasks"][0]["text"] = answer if i % 2 == 0 else "zebra"  # the model's own words, or a word it never says
    own = sum(i % 2 == 0 for i in range(len(texts)))
    right = 0
    for r, answer in boxes:
        box = BoxCodec().parse(answer, 600, 200)
        if box is not None:
            r["tasks"][0]["box"], right = list(box), right + 1
    scores = region_task_scores(model, processor, items, batch_size=3)
    assert scores["bbox2caption_rouge"] == pytest.approx(own / len(texts))
    assert scores["caption2bbox_acc"] == pytest.approx(right / len(boxes))
