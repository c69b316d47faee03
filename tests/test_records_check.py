"""Bad input never costs a run: the record validator, strict JSONL input, align's error rows, overlays."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from dvsft.align.aligner import align_words
from dvsft.align.overlay import draw_overlay
from dvsft.align.run import align_file, errors_path
from dvsft.align.stats import file_stats
from dvsft.core.records import JsonlAppender, RecordError, check_record, iter_lines, read_jsonl, write_jsonl
from dvsft.models.geometry import grid_for

W, H = 128, 64


def image(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(path)
    return path


def record(rid: str, img: str = "a.png", **kw) -> dict:
    rec = {
        "id": rid,
        "image": img,
        "width": W,
        "height": H,
        "words": [{"text": "cat", "box": [2.0, 2.0, 30.0, 20.0]}],
        "messages": [{"role": "user", "content": "<image>Read."}, {"role": "assistant", "content": "cat"}],
    }
    rec.update(kw)
    return rec


def reasons(rec: dict, file: Path) -> list[str]:
    return [p.reason for p in check_record(rec, file, 7)]


# ----------------------------------------------------------------------------- validator


def test_validator_accepts_a_good_record_and_fills_the_size(tmp_path):
    image(tmp_path / "a.png")
    assert check_record(record("ok"), tmp_path / "r.jsonl") == []
    rec = record("nosize")
    del rec["width"], rec["height"]
    assert check_record(rec, tmp_path / "r.jsonl") == [] and (rec["width"], rec["height"]) == (W, H)


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        (["12", 2, 30, 20], "box x0 is '12', not a number"),
        ([2, 2, math.nan, 20], "box x1 is nan, not a finite number"),
        ([2, 2, 30, math.inf], "box y1 is inf, not a finite number"),
        ([30, 2, 2, 20], "is inverted"),
        ([2, 20, 30, 2], "is inverted"),
        ([2, 2, 30], "has no [x0, y0, x1, y1] box"),
        ([True, 2, 30, 20], "box x0 is True, not a number"),
    ],
)
def test_validator_names_each_bad_box(tmp_path, box, expected):
    image(tmp_path / "a.png")
    words = [{"text": "a", "box": [1, 1, 2, 2]}, {"text": "b", "box": box}]
    (problem,) = check_record(record("r1", words=words), tmp_path / "r.jsonl")
    assert problem.id == "r1" and problem.reason.startswith("words[1] ") and expected in problem.reason


def test_validator_reports_file_line_id_and_what_is_wrong(tmp_path):
    file = tmp_path / "r.jsonl"
    image(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (problem,) = check_record(record("x", words="Hello"), file, 7)
    assert (problem.file, problem.line, problem.id) == (str(file), 7, "x")
    assert problem.reason == "words must be a list of {text, box} objects, got str 'Hello'"
    assert str(problem) == f"{file}:7: record x: {problem.reason}"
    assert "differ from the image's 128x64" in reasons(record("big", width=W * 2), file)[0]
    assert "undecodable image" in reasons(record("c", img="corrupt.png"), file)[0]
    assert reasons(record("m", img="missing.png"), file) == [f"image file not found: {tmp_path / 'missing.png'}"]
    assert reasons(record("w", width="128"), file) == ["width must be a positive integer, got '128'"]
    assert reasons(record("r", messages=[{"role": "bot", "content": "x"}]), file) == [
        "messages[0] has no role system/user/assistant"
    ]
    bad_words = [{"text": "a", "box": [1, 1, 0, 0]}] * 8
    assert reasons(record("many", words=bad_words), file)[-1] == "3 more bad words"


def test_truncated_png_is_caught_before_training(tmp_path):
    good = image(tmp_path / "a.png")
    data = good.read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    assert "undecodable image" in reasons(record("t", img="t.png"), tmp_path / "r.jsonl")[0]


def test_an_image_is_checked_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """Runs in one process (the demo's seeds) read each image's header and CRCs once; a file rewritten in place
    with bad bytes of the same length is checked again and reported."""
    import dvsft.core.images as images

    good = image(tmp_path / "a.png")
    opens: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opens.append("open") or real_open(*a, **k))
    rec, file = record("a"), tmp_path / "r.jsonl"
    assert reasons(rec, file) == [] and opens
    seen = len(opens)
    assert reasons(record("again"), file) == [] and len(opens) == seen
    with monkeypatch.context() as m:
        m.setattr(images.CHECKED, "limit", 1)  # the memory is bounded: once full, it is forgotten
        image(tmp_path / "other.png")
        assert reasons(record("other", img="other.png"), file) == []
        seen = len(opens)
        assert reasons(record("forgotten"), file) == [] and len(opens) > seen
    data = bytearray(good.read_bytes())
    data[-20] ^= 0xFF  # a flipped byte in the last chunks: a CRC error, same size
    good.write_bytes(bytes(data))
    stamp = good.stat().st_mtime_ns + 10**9
    os.utime(good, ns=(stamp, stamp))
    seen = len(opens)
    assert "undecodable image" in reasons(record("b"), file)[0] and len(opens) > seen


# ----------------------------------------------------------------------------- strict JSONL


def test_invalid_last_line_of_an_input_file_is_an_error(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"')  # no newline, invalid: a user's file, not a torn write
    with pytest.raises(RecordError, match=r"in\.jsonl:2: invalid JSON"):
        list(read_jsonl(path))
    assert [r["id"] for r in read_jsonl(path, own=True)] == ["a"]  # our own appended file: torn tail


def test_every_unreadable_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a"}\n{oops\n\n[1, 2]\n{"id": "caf\xe9"}\n{"id": "z"}\n"last"')
    lines = list(iter_lines(path))
    assert [(ln.number, ln.error is None) for ln in lines] == [
        (1, True),
        (2, False),
        (4, False),
        (5, False),
        (6, True),
        (7, False),
    ]
    assert lines[1].error.startswith("invalid JSON")
    assert lines[2].error == "a JSON list, not an object"
    assert lines[3].error == "not UTF-8: byte 0xe9 at column 12"
    assert lines[5].error == "a JSON str, not an object"


def test_appender_keeps_torn_tail_tolerance_and_refuses_nan(tmp_path):
    path = tmp_path / "own.jsonl"
    with JsonlAppender(path) as out:
        out.write({"id": "a"})
    with open(path, "a") as f:
        f.write('{"id": "b", "x": ')  # killed mid-line
    assert [r["id"] for r in read_jsonl(path, own=True)] == ["a"]
    with JsonlAppender(path) as out, pytest.raises(ValueError, match="NaN"):
        out.write({"id": "n", "box": [math.nan]})


def test_failed_write_leaves_no_tmp_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"id": "old"}])

    def rows():
        yield {"id": "new"}
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        write_jsonl(path, rows())
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert list(read_jsonl(path)) == [{"id": "old"}]
    with pytest.raises(ValueError, match="NaN"):
        write_jsonl(path, [{"id": "nan", "v": math.nan}])
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


# ----------------------------------------------------------------------------- align, stats, overlay


def test_align_turns_every_bad_line_and_record_into_an_error_row(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    lines = [
        json.dumps(record("good")),
        '{"id": "broken", ',
        json.dumps(record("nan", words=[{"text": "x", "box": [1, 1, math.nan, 5]}])),
        json.dumps(record("inv", words=[{"text": "x", "box": [9, 1, 2, 5]}])),
        json.dumps(record("str", words=[{"text": "x", "box": [1, "1", 2, 5]}])),
        json.dumps(record("size", width=W + 1)),
        json.dumps(record("img", img="corrupt.png")),
        json.dumps(record("hello", words="Hello")),
    ]
    src = tmp_path / "words.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "enc\xff"}\n' + b'{"id": "last", ')
    out = tmp_path / "out" / "aligned.jsonl"
    summary = align_file(src, out, "qwen3-vl", min_pixels=32 * 32 * 4, overlay_dir=tmp_path / "ov")
    assert summary["records"] == 10 and summary["aligned"] == 1 and summary["errors"] == 9
    errors = list(read_jsonl(errors_path(out)))
    assert all(e["file"] == str(src) for e in errors)
    by_line = {e["line"]: e for e in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert by_line[2]["reason"].startswith("invalid JSON") and by_line[2]["id"] is None
    assert by_line[3]["id"] == "nan" and "not a finite number" in by_line[3]["reason"]
    assert by_line[4]["id"] == "inv" and "inverted" in by_line[4]["reason"]
    assert by_line[5]["id"] == "str" and "not a number" in by_line[5]["reason"]
    assert "differ from the image's" in by_line[6]["reason"]
    assert "undecodable image" in by_line[7]["reason"]
    assert "words must be a list" in by_line[8]["reason"]
    assert by_line[9]["reason"].startswith("not UTF-8")
    assert by_line[10]["reason"].startswith("invalid JSON")  # the last line is not dropped
    assert "NaN" not in out.read_text() and not list(out.parent.glob("*.tmp"))
    assert [r["id"] for r in read_jsonl(out)] == ["good"]


def test_align_words_gives_non_finite_and_inverted_boxes_their_own_reasons():
    grid = grid_for("qwen3-vl", W, H, min_pixels=32 * 32 * 4)
    words = [
        {"text": "a", "box": [1, 1, math.nan, 5]},
        {"text": "b", "box": [math.nan] * 4},
        {"text": "c", "box": [1, 1, math.inf, 5]},
        {"text": "d", "box": [9, 1, 2, 5]},
        {"text": "e", "box": [1, "x", 2, 5]},
        {"text": "f", "box": [2, 2, 30, 20]},
    ]
    a = align_words(words, grid)
    assert dict(a.dropped) == {"non_finite_box": 3, "inverted_box": 1, "bad_box": 1}
    assert [lab["text"] for lab in a.labels] == ["f"]


def test_overlay_draws_records_with_bad_boxes():
    grid = grid_for("qwen3-vl", W, H, min_pixels=32 * 32 * 4)
    words = [
        {"text": "a", "box": [30, 2, 2, 20]},
        {"text": "b", "box": [1, 1, math.inf, 5]},
        {"text": "c", "box": [math.nan] * 4},
        {"text": "d", "box": [-50, -50, -10, -10]},
        {"text": "e", "box": [2, 2, 30, 20]},
    ]
    out = draw_overlay(Image.new("RGB", (W, H), "white"), grid, [{"token": 0, "text": "e"}], words)
    assert out.size == (W, H)


def test_stats_names_file_and_line_of_a_bad_line(tmp_path):
    path = tmp_path / "aligned.jsonl"
    path.write_text('{"id": "a", "grid": [1, 1], "vision_labels": []}\nnot json\n')
    with pytest.raises(ValueError, match=r"aligned\.jsonl:2: invalid JSON"):
        file_stats(path)


def test_stats_and_region_tasks_refuse_an_invalid_record_by_name(tmp_path):
    from dvsft.sources.region_tasks import TaskConfig, build_task_file

    path = tmp_path / "aligned.jsonl"
    bad = record("r2", words=[{"text": "x", "box": [1, 1, math.nan, 5]}], grid=[1, 1], vision_labels=[])
    path.write_text(json.dumps(record("r1", grid=[1, 1], vision_labels=[])) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"aligned\.jsonl:2: record r2: words\[0\] box x1 is nan"):
        file_stats(path)
    with pytest.raises(ValueError, match=r"aligned\.jsonl:2: record r2: words\[0\] box x1 is nan"):
        build_task_file(path, tmp_path / "tasks.jsonl", TaskConfig())
    assert not list(tmp_path.glob("tasks*"))
