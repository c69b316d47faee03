"""Text-only samples (issue #24): records without an image train the text loss alone, mix with image records in one
batch, and a process whose batch has no image still runs the vision tower (the zero-weight dummy pass), so DDP
neither hangs nor skips the vision gradients' sync."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_records, overrides, three_word_pages
from safetensors.torch import load_file

from dvsft.core.convert import convert
from dvsft.core.records import check_record, read_jsonl
from dvsft.data.collator import DUMMY_IMAGE, ENCODED, SampleError, VisionCollator
from dvsft.data.dataset import load_records
from dvsft.data.streaming import StreamingSamples
from dvsft.models.loading import load_processor, set_pixels
from dvsft.objectives.base import forward_hidden, projector_of, vision_tower_of
from dvsft.objectives.losses import model_loss
from dvsft.testing.tiny import TinyConfig, build_tiny
from dvsft.training.config import load_config
from dvsft.training.train import train

QUICK = ["qwen3-vl", "internvl"]
FAMILIES = [*QUICK, *(pytest.param(f, marks=pytest.mark.slow) for f in ("qwen3.5", "qwen3-vl-moe", "llava_onevision",
                                                                       "idefics3", "smolvlm"))]  # fmt: skip


def text_record(rid: str = "chat", answer: str = "the old cat sat on the red mat") -> dict:
    question = "Say something about a cat."
    return {"id": rid, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module", params=["qwen3-vl", "internvl", "qwen3.5"])
def tiny(request):
    """(model, processor) of a tiny real model of each family tested in batches."""
    model, processor = build_tiny(TinyConfig(family=request.param, vocab_size=512))
    return model.eval(), processor


# ------------------------------------------------------------------------------------------------ validation


def test_validator_accepts_a_text_only_record():
    assert check_record(text_record(), image=True) == []
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}, {"role": "assistant", "content": "Hi."}]
    assert check_record({"id": "parts", "messages": parts, "words": []}, image=True) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"messages": [{"role": "user", "content": "<image>Read it."}, {"role": "assistant", "content": "x"}]},
         "messages[0] holds an image"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]},
         "messages[0] holds an image"),
        ({"words": [{"text": "cat", "box": [0, 0, 4, 4]}]}, "words without an image field"),
        ({"width": 96, "height": 64}, "width/height without an image field"),
        ({"messages": None}, "no image field and no messages"),
    ],
    ids=["placeholder", "image-part", "words", "size", "nothing"],
)  # fmt: skip
def test_validator_refuses_image_parts_of_a_record_without_image(change, reason):
    record = {k: v for k, v in {**text_record(), **change}.items() if v is not None}
    (problem,) = check_record(record, "data.jsonl", 3)
    assert problem.file == "data.jsonl" and problem.line == 3 and problem.id == "chat"
    assert reason in problem.reason


def test_load_records_keeps_text_only_records_without_an_image(tmp_path):
    data = make_records(tmp_path, n=1)
    bad = {**text_record("bad"), "messages": [{"role": "user", "content": "<image>Hm?"}, text_record()["messages"][1]]}
    with data.open("a") as f:
        for record in (text_record("a"), text_record("b"), bad):
            f.write(json.dumps(record) + "\n")
    samples = load_records(data, qa_per_image=1)  # each text-only record is a pool of its own
    assert [s["id"] for s in samples] == ["doc0", "a", "b"]
    assert samples[1]["messages"] == text_record("a")["messages"]  # no image placeholder added
    assert samples.skipped == [("bad", "messages[0] holds an image (<image> or an image part) but the record has no "
                                "image field")]  # fmt: skip


def test_streaming_reads_text_only_records_from_parquet(tiny_dir, tmp_path, caplog):
    """A text-only record in Parquet shards streams as a sample of its own, encoded without pixels; a bad one is
    skipped with the in-memory reader's reason."""
    data = make_records(tmp_path, n=1)
    with data.open("a") as f:
        f.write(json.dumps(text_record("chat")) + "\n")
        f.write(json.dumps({**text_record("boxes"), "words": [{"text": "cat", "box": [0, 0, 4, 4]}]}) + "\n")
    convert(data, tmp_path / "shards", "parquet", embed_images=True)
    stream = StreamingSamples([tmp_path / "shards"], seed=0)
    stream.collator = VisionCollator(load_processor(tiny_dir))
    samples = {s["id"]: s for s in stream}
    assert sorted(samples) == ["chat", "doc0"]
    assert samples["chat"][ENCODED].pixel_values is None and samples["doc0"][ENCODED].pixel_values is not None
    assert "part-00000.parquet:3: record boxes: words without an image field" in caplog.text


# ------------------------------------------------------------------------------------------------ the collator


def test_collator_mixed_batch_equals_the_two_kinds_alone(tiny):
    """A batch of an image record and a text-only record has the loss terms of the two collated apart: the text
    loss counts both samples' answer tokens, the vision loss only the image's."""
    model, processor = tiny
    collator = VisionCollator(processor)
    (page,) = three_word_pages([(160, 96)], [[4, 4, 28, 28], [36, 36, 60, 60], [70, 4, 94, 28]])
    chat = text_record()
    alone_image, alone_text, mixed = collator([page]), collator([chat]), collator([page, chat])
    assert "pixel_values" not in alone_text and DUMMY_IMAGE in alone_text and DUMMY_IMAGE not in mixed
    torch.testing.assert_close(mixed["pixel_values"], alone_image["pixel_values"], rtol=0, atol=0)
    assert int((alone_text["labels"] != -100).sum()) >= 8 and alone_text["vision_positions"].numel() == 0
    with torch.no_grad():
        img, txt, both = (model_loss(model, b, vision_weight=1.0) for b in (alone_image, alone_text, mixed))
    assert both.n_text == img.n_text + txt.n_text and both.n_vision == img.n_vision > 0 and txt.n_vision == 0
    text_sum = img.text_loss * img.n_text + txt.text_loss * txt.n_text
    torch.testing.assert_close(both.text_loss * both.n_text, text_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both.vision_loss, img.vision_loss, rtol=1e-5, atol=1e-5)


def test_objectives_that_read_images_skip_text_only_samples(tiny_dir):
    """asvr and lsd read each sample's image (keep_records): a text-only sample is a skip with that reason."""
    with pytest.raises(SampleError, match="record chat: a text-only record, and the method's objectives read each"):
        VisionCollator(load_processor(tiny_dir), keep_records=True).check(text_record())
    assert VisionCollator(load_processor(tiny_dir)).check(text_record()).pixel_values is None


# ------------------------------------------------------------------------------------------------ the dummy pass


@pytest.mark.parametrize("family", FAMILIES)
def test_dummy_pass_gives_every_vision_parameter_a_zero_gradient(family):
    """A text-only batch while the vision tower trains: every vision / projector parameter a real image reaches gets
    a gradient of zeros (what DDP all-reduces), and the loss is the same to the bit as with the tower frozen."""
    model, processor = build_tiny(TinyConfig(family=family, vocab_size=512))
    model.train()
    collator = VisionCollator(processor)
    vision = [*vision_tower_of(model).parameters(), *projector_of(model).parameters()]
    image_batch = collator(three_word_pages([(96, 64)], [[4, 4, 28, 28], [36, 36, 60, 60], [70, 4, 94, 28]]))
    model_loss(model, image_batch, vision_weight=1.0).loss.backward()
    reached = [p.grad is not None for p in vision]  # what a real image trains (LLaVA-OV's unused SigLIP head: not)
    model.zero_grad(set_to_none=True)

    batch = collator([text_record()])
    model_loss(model, batch, vision_weight=1.0).loss.backward()
    assert [p.grad is not None for p in vision] == reached and any(reached)
    assert all(not p.grad.any() for p in vision if p.grad is not None)

    for p in vision:
        p.requires_grad_(False)
    with torch.no_grad():
        frozen = forward_hidden(model, batch).last
    for p in vision:
        p.requires_grad_(True)
    with torch.enable_grad():
        trained = forward_hidden(model, batch).last
    assert trained.grad_fn is not None and torch.equal(trained.detach(), frozen)


# ------------------------------------------------------------------------------------------------ training


def run_to_end(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in a session of its own: (exit code, output), or (None, output) when it hangs past ``timeout``
    (its whole process group is killed, the torchrun workers included)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, f"still running after {timeout} s (a hang): " + proc.communicate()[0]
    return proc.returncode, output


def mixed_data(folder: Path) -> Path:
    """One image record and one text-only record."""
    data = make_records(folder, n=1, seed=3)
    with data.open("a") as f:
        f.write(json.dumps(text_record()) + "\n")
    return data


def label_counts(tiny_dir: Path, data: Path) -> list[tuple[int, int]]:
    """(text labels, vision labels) of each sample, as the run's collator encodes it (helpers.overrides' pixels)."""
    processor = load_processor(tiny_dir)
    set_pixels(processor, 32 * 32 * 4, 32 * 32 * 16)
    collator = VisionCollator(processor)
    return [collator.check(r).label_counts() for r in load_records(data)]


@pytest.mark.slow
def test_training_on_mixed_data_counts_the_text_only_tokens(tiny_dir, tmp_path):
    data = mixed_data(tmp_path / "data")
    (image_text, image_vision), (chat_text, chat_vision) = label_counts(tiny_dir, data)
    assert chat_text > 0 and chat_vision == 0 and image_vision > 0
    result = train(
        load_config(None, overrides(tiny_dir, data, tmp_path / "run", method="dvsft", max_steps=2, logging_steps=1))
    )
    rows = [r for r in result.log if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # each step: both samples (global batch 2)
        assert row["text_tokens"] == image_text + chat_text
        assert row["vision_tokens"] == image_vision
    assert (result.final_dir / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_with_a_text_only_rank_match_one(tiny_dir, tmp_path):
    """train_vision, DDP without find_unused_parameters: each step one process holds the image record and the other
    the text-only one. The run ends (no hang) with the weights of one process accumulating both."""
    data = mixed_data(tmp_path / "data")
    common = dict(
        method="dvsft",
        max_steps=2,
        global_batch_size=2,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        train_vision=True,
        ddp_find_unused_parameters=False,
    )
    single = train(load_config(None, overrides(tiny_dir, data, tmp_path / "one", **common)))  # accumulation 2

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dvsft.cli",
           "train", *overrides(tiny_dir, data, tmp_path / "two", **common)]  # fmt: skip
    code, output = run_to_end(cmd, env, timeout=300)
    assert code == 0, output[-3000:]

    one = [r for r in single.log if "loss" in r]
    two = [r for r in read_jsonl(tmp_path / "two" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["text_tokens"] == a["text_tokens"] and b["vision_tokens"] == a["vision_tokens"]
    p1 = load_file(single.final_dir / "model.safetensors")
    p2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    base = load_file(tiny_dir / "model.safetensors")
    assert p1.keys() == p2.keys()
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], atol=1e-4, rtol=1e-4)
    visual = [k for k in p1 if ".visual.blocks." in k]
    assert visual and all((p1[k] - base[k]).abs().max() > 1e-4 for k in visual)  # the vision tower trained


def test_dvsft_align_keeps_text_only_records(tmp_path):
    """`dvsft align` passes a text-only record through with no labels instead of failing it (a mixed dataset
    keeps its text-only samples through alignment)."""
    from dvsft.align.run import align_file

    images = make_records(tmp_path / "data", n=1)
    data = images.with_name("mixed.jsonl")  # beside the images its records name
    data.write_text(images.read_text() + json.dumps(text_record()) + "\n")
    counts = align_file(data, tmp_path / "aligned.jsonl")
    rows = list(read_jsonl(tmp_path / "aligned.jsonl"))
    assert counts["aligned"] == 2 and counts["errors"] == 0
    chat = next(r for r in rows if r["id"] == "chat")
    assert chat["vision_labels"] == [] and chat["messages"] == text_record()["messages"] and "grid" not in chat
