"""Image-to-label: real rapidocr on rendered pages, image modes, bad inputs, sharding, kill -9 resumption."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import matplotlib.font_manager as fm
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from dvsft.core.images import ImageError, load_image
from dvsft.core.records import image_path, read_jsonl
from dvsft.evaluation.metrics import iou
from dvsft.sources.corpora import corpus_words
from dvsft.sources.image_to_label import (
    collect_inputs,
    errors_path,
    label_inputs,
    parse_shard,
    shard,
)
from dvsft.sources.ocr import get_engine, polygon_to_box, register_engine

FONT = fm.findfont("DejaVu Sans")
VOCAB = sorted({w for w in corpus_words() if w.isalpha() and 3 <= len(w) <= 10})


def render(words, size=(480, 480), font_size=26, fg="black", bg="white", mode="RGB", seed=0):
    """Draw ``words`` wrapped on a page; returns (image, [(word, [x0, y0, x1, y1])])."""
    font = ImageFont.truetype(FONT, font_size)
    img = Image.new(mode, size, bg)
    draw = ImageDraw.Draw(img)
    x, y, placed = 20, 20, []
    for w in words:
        wlen = draw.textlength(w, font=font)
        if x + wlen > size[0] - 20:
            x, y = 20, y + int(font_size * 1.8)
        if y + font_size * 1.5 > size[1] - 10:
            break
        draw.text((x, y), w, font=font, fill=fg)
        placed.append((w, list(draw.textbbox((x, y), w, font=font))))
        x += wlen + font_size * 0.7
    return img, placed


def recall(expected, words, min_iou=0.4):
    """Fraction of drawn words found with the same text and an overlapping box."""
    hits = 0
    for text, box in expected:
        if any(w["text"] == text and iou(box, w["box"]) >= min_iou for w in words):
            hits += 1
    return hits / len(expected)


def words_for(seed, n):
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


@pytest.fixture(scope="session")
def engine():
    eng = get_engine("rapidocr", threads=1)
    register_engine("test-rapidocr")(lambda **_: eng)  # the pipeline reuses this one instance in-process
    return eng


@register_engine("test-blank")
class BlankEngine:
    """Finds nothing: for tests of pipeline plumbing (empty OCR is a valid record)."""

    def __init__(self, **_):
        pass

    def __call__(self, image):
        return []


@register_engine("test-boom")
class BoomEngine:
    def __init__(self, **_):
        pass

    def __call__(self, image):
        raise RuntimeError("engine exploded")


def test_ocr_recovers_known_words(engine):
    img, placed = render(words_for(1, 40))
    words = engine(img)
    assert recall(placed, words) >= 0.8, (placed, words)
    for w in words:
        x0, y0, x1, y1 = w["box"]
        assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
        assert 0.5 <= w["score"] <= 1.0
    assert engine(Image.new("RGB", (120, 90), "white")) == []  # no text: an empty list, not an error


def test_boxes_in_original_pixels_when_rapidocr_downscales():
    # rapidocr shrinks images above Global.max_side_len before detection; boxes must come back in our pixels.
    small = get_engine("rapidocr", threads=1, params={"Global.max_side_len": 400})
    img, placed = render(words_for(2, 24), size=(840, 840), font_size=52)
    words = small(img)
    assert recall(placed, words) >= 0.8, (placed, words)
    assert max(w["box"][2] for w in words) > 600  # not in the ~400 px frame


def test_polygon_to_box_clips_and_drops_degenerate():
    assert polygon_to_box([[-5, 2], [30, 1], [31, 12], [-4, 13]], 25, 10) == [0.0, 1.0, 25.0, 10.0]
    assert polygon_to_box([[5, 5], [5, 5], [5, 9], [5, 9]], 20, 20) is None


# ---- image modes ------------------------------------------------------------------------------------------


def test_modes_convert_to_expected_rgb(tmp_path):
    def roundtrip(img, name, **save):
        p = tmp_path / name
        img.save(p, **save)
        return np.asarray(load_image(p))

    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    rgba.putpixel((2, 0), (255, 0, 0, 128))
    out = roundtrip(rgba, "a.png")
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [255, 127, 127] or out[0, 2].tolist() == [255, 128, 128]

    pal = Image.new("P", (3, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    pal.putdata([0, 1, 2])
    assert roundtrip(pal, "p.png").tolist() == [[[0, 0, 0], [255, 0, 0], [0, 0, 255]]]
    pal.info["transparency"] = 0
    assert roundtrip(pal, "pt.png", transparency=0)[0, 0].tolist() == [255, 255, 255]

    i16 = Image.fromarray(np.array([[0, 65535, 32896, 257]], dtype=np.uint16))
    assert roundtrip(i16, "i16.png")[0, :, 0].tolist() == [0, 255, 128, 1]

    i32 = Image.fromarray(np.array([[0, 1000, 500]], dtype=np.int32))
    assert roundtrip(i32, "i32.tif")[0, :, 0].tolist() == [0, 255, 128]

    gray = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert roundtrip(gray, "l.png")[0].tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]

    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    assert roundtrip(la, "la.png")[0].tolist() == [[255, 255, 255], [0, 0, 0]]

    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    assert roundtrip(cmyk, "c.tif")[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_modes_and_exif_rotation_through_the_pipeline(tmp_path, engine):
    folder = tmp_path / "imgs"
    folder.mkdir()
    expected = {}
    # EXIF: pixels stored rotated 90 degrees counter-clockwise, orientation 6 says "rotate back clockwise".
    upright, placed = render(words_for(3, 16), size=(480, 320))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", quality=95, exif=exif)
    expected["rotated.jpg"] = (upright.size, placed)
    # RGBA: black text on a fully transparent background (a naive convert("RGB") is black on black).
    img, placed = render(words_for(4, 16), size=(400, 320), bg=(0, 0, 0, 0), fg=(0, 0, 0, 255), mode="RGBA")
    img.save(folder / "rgba.png")
    expected["rgba.png"] = (img.size, placed)
    # 16-bit grayscale.
    img, placed = render(words_for(5, 16), size=(400, 320), mode="L")
    Image.fromarray(np.asarray(img).astype(np.uint16) * 257).save(folder / "gray16.png")
    expected["gray16.png"] = (img.size, placed)

    out = tmp_path / "words.jsonl"
    stats = label_inputs(collect_inputs(folder), out, engine="test-rapidocr")
    assert stats.records == 3 and not stats.errors
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == set(expected)
    for name, (size, placed) in expected.items():
        row = rows[name]
        assert (row["width"], row["height"]) == size, name
        assert image_path(row, out).resolve() == (folder / name).resolve()
        assert recall(placed, row["words"]) >= 0.8, (name, placed, row["words"])


# ---- bad inputs ------------------------------------------------------------------------------------------


def write_png(path, size=(40, 30)):
    Image.new("RGB", size, "white").save(path)


def test_every_bad_input_is_reported_once_with_its_reason(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    write_png(imgs / "good.png")
    (imgs / "garbage.png").write_bytes(b"this is not an image at all")
    (imgs / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    (imgs / "truncated.png").write_bytes(buf.getvalue()[:60])
    write_png(imgs / "thin.png", size=(2, 402))  # aspect 201 > 200
    write_png(imgs / "ok_aspect.png", size=(2, 400))  # exactly 200 is allowed
    dataset = tmp_path / "data.jsonl"
    samples = [{"id": f"s-{p.stem}", "image": f"imgs/{p.name}"} for p in sorted(imgs.iterdir())]
    samples += [
        {"id": "gone", "image": "imgs/does_not_exist.png"},
        {"id": "two", "images": ["imgs/good.png", "imgs/good.png"]},
        {"id": "none", "messages": [{"role": "user", "content": "hi"}]},
    ]
    dataset.write_text("".join(json.dumps(s) + "\n" for s in samples))

    out = tmp_path / "words.jsonl"
    stats = label_inputs(collect_inputs(dataset), out, engine="test-boom")
    errors = {r["id"]: r for r in read_jsonl(errors_path(out))}
    assert list(read_jsonl(out)) == []
    assert {k: v["reason"] for k, v in errors.items()} == {
        "s-good": "OCR failure",
        "s-ok_aspect": "OCR failure",
        "s-garbage": "undecodable image",
        "s-truncated": "undecodable image",
        "s-empty": "zero size",
        "s-thin": "aspect ratio too extreme",
        "gone": "missing file",
        "two": "multi-image sample",
        "none": "no image",
    }
    assert "engine exploded" in errors["s-good"]["detail"]
    assert errors["gone"]["image"] == "imgs/does_not_exist.png"
    assert sum(stats.errors.values()) == len(samples)

    # A rerun finds everything done and writes nothing.
    again = label_inputs(collect_inputs(dataset), out, engine="test-boom")
    assert again.skipped == len(samples) and again.records == 0 and not again.errors
    assert len(list(read_jsonl(errors_path(out)))) == len(samples)

    # --retry-errors: the failed inputs are tried again (now with an engine that works) and listed once.
    retried = label_inputs(collect_inputs(dataset), out, engine="test-blank", retry_errors=True)
    assert retried.records == 2 and sum(retried.errors.values()) == len(samples) - 2
    assert {r["id"] for r in read_jsonl(out)} == {"s-good", "s-ok_aspect"}
    assert len(list(read_jsonl(errors_path(out)))) == len(samples) - 2


def test_load_image_errors_are_typed(tmp_path):
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "nope.png")
    assert err.value.reason == "missing file" and "nope.png" in str(err.value)


def test_blank_ocr_is_a_record_not_an_error(tmp_path):
    write_png(tmp_path / "blank.png")
    out = tmp_path / "o" / "words.jsonl"
    label_inputs(collect_inputs(tmp_path / "blank.png"), out, engine="test-blank")
    (row,) = read_jsonl(out)
    assert row["words"] == [] and (row["width"], row["height"]) == (40, 30)
    assert image_path(row, out).resolve() == (tmp_path / "blank.png").resolve()


# ---- sharding ---------------------------------------------------------------------------------------------


def test_shards_partition_the_inputs(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for k in range(7):
        write_png(folder / f"{k}.png")
    write_png(folder / "sub" / "x.PNG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    inputs = collect_inputs(folder)
    ids = [x.id for x in inputs]
    assert ids == sorted(ids) and "sub/x.PNG" in ids and len(ids) == 8
    parts = [shard(inputs, i, 3) for i in range(3)]
    assert sorted(x.id for p in parts for x in p) == sorted(ids)
    assert [x.id for x in parts[1]] == ids[1::3]

    outs = []
    for i in range(3):
        out = tmp_path / f"words.{i}.jsonl"
        label_inputs(shard(collect_inputs(folder), *parse_shard(f"{i}/3")), out, engine="test-blank")
        outs.append({r["id"] for r in read_jsonl(out)})
    assert set.union(*outs) == set(ids) and sum(len(o) for o in outs) == len(ids)
    for bad in ("3/3", "1", "a/b", "0/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


# ---- kill -9 and resume ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_label_resumes_after_sigkill_exactly_once(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(8):
        render(words_for(10 + k, 6), size=(320, 320), font_size=28)[0].save(folder / f"p{k}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = tmp_path / "words.jsonl"
    cmd = [sys.executable, "-c", "from dvsft.cli import app; app()", "label", str(folder), "--out", str(out)]
    cmd += ["--threads", "1", "--ocr-param", "Det.limit_side_len=320", "--no-progress"]

    proc = subprocess.Popen([*cmd, "--workers", "2"], start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the driver and its OCR workers
    proc.wait()
    first = [r["id"] for r in read_jsonl(out)]
    assert 1 <= len(first) < 8
    with open(out, "a") as f:  # a torn line, as if killed mid-write
        f.write('{"id": "p7.png", "ima')

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    records = [r["id"] for r in read_jsonl(out)]
    errors = [r["id"] for r in read_jsonl(errors_path(out))]
    assert len(records) == len(set(records)) == 8
    assert records[: len(first)] == first  # earlier work kept, not redone
    assert errors == ["broken.png"]
    assert set(records) | set(errors) == {p.name for p in folder.iterdir()}
    assert all(r["words"] for r in read_jsonl(out))
