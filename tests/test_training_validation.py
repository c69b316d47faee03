"""Validation that matches training: every record the collator would fail on is skipped with its reason before the
first step, in memory and streaming, and data that would train on nothing is refused at load (issue #27)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import losses, make_records, overrides

from dvsft.align.aligner import align_words
from dvsft.cli import app
from dvsft.core.convert import convert
from dvsft.core.images import load_image
from dvsft.core.records import check_record, read_jsonl
from dvsft.data.collator import VisionCollator, to_processor_messages
from dvsft.data.dataset import load_records
from dvsft.data.skips import EVAL_REASONS_FILE, REASONS_FILE
from dvsft.data.streaming import StreamingSamples
from dvsft.models.geometry import grid_for
from dvsft.models.loading import load_processor, set_pixels
from dvsft.training.config import load_config
from dvsft.training.train import prepare, train

MAX_LENGTH = 48  # the good records have about 26 tokens (6 of them visual)
QUESTION = "Which word is first?"
STREAM = dict(streaming=True, stream_window=4, save_final=False, dataloader_num_workers=0)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    proc = load_processor(tiny_dir)
    set_pixels(proc, 32 * 32 * 4, 32 * 32 * 16)  # as helpers.overrides: 96x64 images, 6 visual tokens
    return proc


def rows_of(path: Path) -> list[dict]:
    return list(read_jsonl(path))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(question, answer) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def truncate_image(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# each bad kind: (id, how the record is changed, its reason as a regular expression)
BAD_KINDS = [
    ("image_in_answer", conversation(QUESTION, "the <image> cat"), r"messages\[1\] is an answer holding an image"),
    (
        "answer_only",
        [{"role": "assistant", "content": "cat"}],
        r"messages\[0\] is an answer with no user turn before it",
    ),
    (
        "bare_part",
        conversation([{"type": "image"}, QUESTION], "cat"),
        r"messages\[0\] content\[1\] must be a \{type: text\|image\} object, got 'Which word is first\?'",
    ),
    (
        "image_pad",
        conversation("<image>Which <|image_pad|> word?", "cat"),
        r"messages\[0\] holds the model's special token <\|image_pad\|> as text",
    ),
    (
        "vision_start",
        conversation("<image>Which word?", "cat <|vision_start|>"),
        r"messages\[1\] holds the model's special token <\|vision_start\|> as text",
    ),
    ("too_long", conversation("<image>" + QUESTION, "cat " * 40), rf"^\d+ tokens > max_length {MAX_LENGTH}$"),
]


def mixed_records(folder: Path) -> tuple[Path, dict[str, str], list[str]]:
    """Four good records, one of each bad kind and one with a truncated image: the file, the expected reasons
    by id, the ids in file order."""
    path = make_records(folder, n=5)
    rows = rows_of(path)
    good, spare = rows[:4], rows[4]
    truncate_image(folder / spare["image"])
    bad = [dict(good[0], id=rid, messages=messages) for rid, messages, _ in BAD_KINDS]
    bad.append(dict(spare, id="truncated"))
    expected = {rid: reason for rid, _, reason in BAD_KINDS} | {"truncated": "undecodable image"}
    ordered = [good[0], *bad[:3], good[1], good[2], *bad[3:], good[3]]
    write_rows(path, ordered)
    return path, expected, [r["id"] for r in ordered]


def assert_reasons(rows: list[dict], expected: dict[str, str], where: dict[str, tuple[str, int]]) -> None:
    """Each bad record reported once, with its file, line and reason."""
    assert sorted(r["id"] for r in rows) == sorted(expected)
    for row in rows:
        assert re.search(expected[row["id"]], row["reason"]), row
        assert (row["file"], row["line"]) == where[row["id"]], row


# ----------------------------------------------------------------------------- the validator, case by case


@pytest.mark.parametrize("rid, messages, pattern", BAD_KINDS[:3], ids=[k[0] for k in BAD_KINDS[:3]])
def test_validator_refuses_conversations_the_collator_cannot_encode(tmp_path, rid, messages, pattern):
    rec = dict(rows_of(make_records(tmp_path, n=1))[0], id=rid, messages=messages)
    (problem,) = check_record(rec, tmp_path / "records.jsonl", 3)
    assert (problem.file, problem.line, problem.id) == (str(tmp_path / "records.jsonl"), 3, rid)
    assert re.search(pattern, problem.reason), problem.reason


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
def test_a_special_token_written_as_text_is_refused_by_name(processor, tmp_path, token):
    rec = rows_of(make_records(tmp_path, n=1))[0]
    rec = dict(rec, image=str(tmp_path / rec["image"]), messages=conversation(f"<image>Read {token} this.", "cat"))
    with pytest.raises(ValueError, match=re.escape(f"holds the model's special token {token} as text")):
        VisionCollator(processor).encode(rec)


@pytest.mark.slow
def test_special_tokens_of_another_family_are_refused(tmp_path_factory):
    from dvsft.testing.tiny import TinyConfig, save_tiny

    model = save_tiny(tmp_path_factory.mktemp("tiny_internvl") / "model", TinyConfig(family="internvl", vocab_size=512))
    folder = tmp_path_factory.mktemp("internvl_records")
    rec = rows_of(make_records(folder, n=1))[0]
    rec = dict(rec, image=str(folder / rec["image"]), messages=conversation("<image>Read <IMG_CONTEXT> it.", "cat"))
    with pytest.raises(ValueError, match=re.escape("holds the model's special token <IMG_CONTEXT> as text")):
        VisionCollator(load_processor(model)).encode(rec)


def test_a_record_longer_than_max_length_is_skipped_with_the_processors_token_count(processor, tmp_path):
    path = make_records(tmp_path, n=2)
    rows = rows_of(path)
    rows[1]["messages"] = conversation("<image>" + QUESTION, "cat " * 40)
    write_rows(path, rows)
    loaded = load_records(path, collator=VisionCollator(processor, max_length=MAX_LENGTH))
    assert [s["id"] for s in loaded] == ["doc0"]
    (problem,) = loaded.problems
    # the real processor's count of the whole sample: its text and the image's visual tokens
    messages = to_processor_messages(rows[1]["messages"])
    text = processor.apply_chat_template(messages, tokenize=False)
    n = len(processor(text=[text], images=[load_image(tmp_path / rows[1]["image"])])["input_ids"][0])
    assert n > MAX_LENGTH
    assert (problem.line, problem.id, problem.reason) == (2, "doc1", f"{n} tokens > max_length {MAX_LENGTH}")
    (text, vision), *_ = loaded.labels
    assert text > 0 and vision > 0


def test_the_check_in_dataloader_workers_gives_the_same_samples_labels_and_reasons(processor, tmp_path):
    data, _, _ = mixed_records(tmp_path)
    collator = VisionCollator(processor, max_length=MAX_LENGTH)
    here, workers = (load_records(data, collator=collator, workers=n) for n in (0, 2))
    assert [s["id"] for s in workers] == [s["id"] for s in here] == [f"doc{i}" for i in range(4)]
    assert workers.labels == here.labels and workers.problems == here.problems and len(here.problems) == 7


def test_streaming_skips_a_truncated_image_as_the_in_memory_reader_does(tmp_path, caplog):
    path = make_records(tmp_path / "raw", n=3)
    truncate_image(tmp_path / "raw" / "img1.png")
    convert(path, tmp_path / "shards", "parquet")  # image paths, as the JSONL holds them
    assert sorted(s["id"] for s in StreamingSamples([tmp_path / "shards"], seed=0)) == ["doc0", "doc2"]
    (in_memory,) = load_records(path).problems
    assert "undecodable image" in in_memory.reason
    assert "part-00000.parquet:2: record doc1: image " in caplog.text
    assert in_memory.reason.split(".png: ", 1)[1] in caplog.text  # the same reason (the path written otherwise)


def test_invisible_words_label_no_visual_token(processor, tmp_path):
    rec = rows_of(make_records(tmp_path, n=1))[0]
    invisible = ["\u200b", "\ufeff", "\u200b\u200c\u2060", " \u200d "]
    words = [dict(w, text=t) for w, t in zip(rec["words"][1:], invisible, strict=False)]
    grid = grid_for(processor, rec["width"], rec["height"])
    alignment = align_words([rec["words"][0], *words], grid, tokenizer=processor.tokenizer)
    assert [lab["text"] for lab in alignment.labels] == [rec["words"][0]["text"]]
    assert alignment.dropped["empty"] == 4


# ----------------------------------------------------------------------------- refused at load


def test_max_length_that_cuts_every_answer_is_refused_with_one_line(tiny_dir, tmp_path, capsys):
    data = make_records(tmp_path / "data", n=3)
    with pytest.raises(SystemExit) as exit_info:
        app(args=["train", *overrides(tiny_dir, data, tmp_path / "run", max_length=20)], prog_name="dvsft")
    assert exit_info.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]  # besides: the weights' progress bar
    assert line.startswith(f"error: no trainable samples in {data}: all 3 records were skipped")
    assert re.search(r"record doc0: \d+ tokens > max_length 20\), reasons in .*skipped_records\.jsonl", line)
    assert len(rows_of(tmp_path / "run" / REASONS_FILE)) == 3


def test_dvsft_without_vision_labels_is_refused_in_memory_and_streaming(tiny_dir, tmp_path):
    path = make_records(tmp_path / "raw", n=3)
    write_rows(path, [dict(r, words=[]) for r in rows_of(path)])
    convert(path, tmp_path / "shards", "parquet", embed_images=True)
    for data, extra in ((path, {}), (tmp_path / "shards", dict(STREAM, max_steps=2))):
        cfg = load_config(None, overrides(tiny_dir, data, tmp_path / data.name, **extra))
        with pytest.raises(ValueError, match=r"no vision labels in .*\(3 samples, [1-9]\d* text labels, 0 vision"):
            prepare(cfg)
    sft = prepare(load_config(None, overrides(tiny_dir, path, tmp_path / "sft", method="sft")))
    assert len(sft.trainer.train_dataset) == 3  # the same data trains with SFT


def test_all_bad_eval_data_names_the_file_with_the_reasons(tiny_dir, tmp_path):
    data = make_records(tmp_path / "data", n=2)
    bad = write_rows(tmp_path / "data" / "eval.jsonl", [dict(r, image="missing.png") for r in rows_of(data)])
    args = overrides(tiny_dir, data, tmp_path / "run", eval_data=str(bad), eval_strategy="steps", eval_steps=2)
    with pytest.raises(ValueError, match=rf"all 2 records were skipped .*reasons in .*{EVAL_REASONS_FILE}"):
        prepare(load_config(None, args))
    rows = rows_of(tmp_path / "run" / EVAL_REASONS_FILE)
    assert [(r["id"], r["line"]) for r in rows] == [("doc0", 1), ("doc1", 2)]
    assert all("image file not found" in r["reason"] for r in rows)


# ----------------------------------------------------------------------------- training runs over mixed data


@pytest.mark.slow
def test_in_memory_run_skips_each_bad_kind_with_its_reason_and_finishes(tiny_dir, tmp_path):
    data, expected, order = mixed_records(tmp_path / "data")
    out = tmp_path / "run"
    result = train(load_config(None, overrides(tiny_dir, data, out, max_length=MAX_LENGTH, save_final=False)))
    assert len(losses(result.log)) == 4
    assert_reasons(rows_of(out / REASONS_FILE), expected, {i: (str(data), n + 1) for n, i in enumerate(order)})


@pytest.mark.slow
def test_streaming_run_skips_each_bad_kind_with_its_reason_and_finishes(tiny_dir, tmp_path):
    data, expected, order = mixed_records(tmp_path / "data")
    shards = tmp_path / "shards"
    convert(data, shards, "parquet", rows_per_shard=4, embed_images=True)
    out = tmp_path / "run"
    run = prepare(load_config(None, overrides(tiny_dir, shards, out, max_length=MAX_LENGTH, max_steps=4, **STREAM)))
    run.trainer.train()  # 4 steps of 2: the 4 good records of two epochs; the bad ones are read in both
    assert sorted(s[3] for s in run.trainer.trained_samples) == sorted([f"doc{i}" for i in range(4)] * 2)
    epoch1 = run.trainer.train_dataset.order_ids(1)
    last_good = max(k for k, i in enumerate(epoch1) if i.startswith("doc"))
    state = run.trainer.train_dataset.state_dict()
    assert (state["epoch"], state["consumed"]) == (1, [[0, last_good + 1]])  # the skipped records count as read
    where = {i: (str(shards / f"part-{n // 4:05d}.parquet"), n % 4 + 1) for n, i in enumerate(order)}
    assert_reasons(rows_of(out / REASONS_FILE), expected, where)


@pytest.mark.slow
def test_streaming_resume_passes_a_truncated_image(tiny_dir, tmp_path):
    path = make_records(tmp_path / "raw", n=5)
    truncate_image(tmp_path / "raw" / "img2.png")
    convert(path, tmp_path / "shards", "parquet", rows_per_shard=2, embed_images=True)
    orders = [StreamingSamples([tmp_path / "shards"], seed=s, window_rows=4).order_ids(0) for s in range(20)]
    seed = next(s for s, order in enumerate(orders) if "doc2" in order[1:3])  # the truncated record 2nd or 3rd
    order = orders[seed]
    bad = order.index("doc2")
    run = dict(STREAM, seed=seed, per_device_train_batch_size=1, global_batch_size=1, save_steps=bad + 1)
    args = overrides(tiny_dir, tmp_path / "shards", tmp_path / "run", max_steps=bad + 1, **run)
    first = prepare(load_config(None, args))
    first.trainer.train()
    state = json.loads((tmp_path / "run" / f"checkpoint-{bad + 1}" / "data_state.json").read_text())
    assert state["ranks"][0]["consumed"] == [[0, bad + 2]]  # the truncated record counts as read
    args = overrides(tiny_dir, tmp_path / "shards", tmp_path / "run", max_steps=4, **run)
    resumed = prepare(load_config(None, [*args, "--resume", "true"]))
    resumed.trainer.train(resume_from_checkpoint=resumed.resume)
    trained = [s[3] for s in first.trainer.trained_samples + resumed.trainer.trained_samples]
    assert trained == [i for i in order if i != "doc2"]  # epoch 0 once, without the truncated record
    assert resumed.trainer.train_dataset.state_dict()["consumed"] == [[0, 5]]
    (row,) = rows_of(tmp_path / "run" / REASONS_FILE)
    assert row["id"] == "doc2" and "undecodable image" in row["reason"]
