"""Label-to-image rendering: token geometry against the real processor, colours, layout, sources, ppl filter."""

import json
import random

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from dvsft.align.aligner import align_words
from dvsft.core.records import image_path, read_jsonl
from dvsft.models.geometry import grid_for, grid_rule
from dvsft.sources import fonts
from dvsft.sources.corpora import corpus_words
from dvsft.sources.instructions import FORMAT_INSTRUCTIONS, TRANSCRIBE_INSTRUCTION
from dvsft.sources.label_to_image import RenderOptions, render_source
from dvsft.sources.render import DARK_MAX, LIGHT_MIN, Renderer, RenderStyle, luminance, plain_page

SMALL = dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 1024)  # lets tiny pages be fixed points


@pytest.fixture(scope="module")
def words():
    return corpus_words()


def text_of(words, start, n):
    return " ".join(words[start : start + n])


def coverage(page):
    """Palette indices = text coverage 0..255."""
    assert page.indexed.mode == "P"
    return np.asarray(page.indexed).astype(np.int32)


@pytest.mark.parametrize(
    "fam_name,font,size,cols",
    [("qwen3-vl", "DejaVuSans", 20, 32), ("qwen2-vl", "DejaVuSerif-Bold", 24, 20), ("qwen3-vl", "random", 30, 24)],
)
def test_every_word_on_its_token_per_the_real_processor(words, fam_name, font, size, cols):
    fam = grid_rule(fam_name)
    r = Renderer(fam_name, cols=cols, max_rows=12, style=RenderStyle(font=font, font_size=size))
    pages = r.render_text(text_of(words, 1000, 500), random.Random(3))
    assert len(pages) >= 2
    proc = Qwen2VLImageProcessorPil(
        patch_size=fam.patch_size,
        merge_size=fam.merge_size,
        size={"shortest_edge": fam.min_pixels, "longest_edge": fam.max_pixels},
    )
    for page in pages:
        assert page.image.mode == "RGB" and page.image.size == (cols * fam.cell, page.rows * fam.cell)
        assert page.rows <= 12
        out = proc(images=page.image, return_tensors="np")
        assert tuple(out["image_grid_thw"][0]) == (1, page.rows * fam.merge_size, cols * fam.merge_size)
        g = grid_for(proc, page.width, page.height)
        assert (g.resized_width, g.resized_height) == (page.width, page.height)  # no resize: exact cells
        alignment = align_words(page.words, g)
        assert not alignment.dropped, alignment.dropped
        assert [lab["token"] for lab in alignment.labels] == page.word_tokens
        assert [lab["text"] for lab in alignment.labels] == [w["text"] for w in page.words]


def test_boxes_are_tight_ink_inside_cells_and_rows(words):
    r = Renderer("qwen3-vl", cols=32, max_rows=10, style=RenderStyle(font="random"))
    for seed in range(3):
        for page in r.render_text(text_of(words, 5000 + 400 * seed, 300), random.Random(seed)):
            cov = coverage(page)
            cell, covered = page.cell, np.zeros_like(cov, dtype=bool)
            prev_token = None
            for word, token in zip(page.words, page.word_tokens, strict=True):
                x0, y0, x1, y1 = word["box"]
                ink = cov[y0:y1, x0:x1]
                # tight: ink touches all four sides of the box
                assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any(), word
                covered[y0:y1, x0:x1] = True
                row, last_col = divmod(token, page.cols)
                assert row * cell <= y0 and y1 <= (row + 1) * cell  # inside its token row
                assert last_col * cell < x1 <= (last_col + 1) * cell  # ends inside its last cell
                assert x0 % cell >= 2  # starts in the first cell of its slot, after the pad
                if prev_token is not None and prev_token // page.cols == row:
                    assert x0 // cell == prev_token % page.cols + 1  # next free cell, no blank cell between
                prev_token = token
            assert not cov[~covered].any()  # no ink outside the word boxes


def test_one_dark_and_one_light_colour_per_page(words):
    for dark_text in (False, True):
        r = Renderer("qwen3-vl", cols=16, max_rows=4, style=RenderStyle(dark_text=dark_text))
        pages = r.render_text(text_of(words, 300, 150), random.Random(11))
        assert len(pages) >= 2
        assert len({(p.background, p.foreground) for p in pages}) == len(pages)  # random per page
        for page in pages:
            back_colour, text_colour = np.array(page.background, float), np.array(page.foreground, float)
            if dark_text:
                assert luminance(page.foreground) <= DARK_MAX and luminance(page.background) >= LIGHT_MIN
            else:
                assert luminance(page.background) <= DARK_MAX and luminance(page.foreground) >= LIGHT_MIN
            rgb = np.asarray(page.image).reshape(-1, 3).astype(np.int64)
            packed = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
            pixels = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1).astype(float)
            # every pixel is a blend of the two colours: background + a * (foreground - background)
            a = (pixels - back_colour) @ (text_colour - back_colour) / np.sum((text_colour - back_colour) ** 2)
            assert np.all(a >= -0.01) and np.all(a <= 1.01)
            assert np.abs(back_colour + a[:, None] * (text_colour - back_colour) - pixels).max() <= 1.0
            assert len(pixels) > 10  # anti-aliased, not a binary image
            assert tuple(np.asarray(page.image)[0, -1]) == page.background  # top-right corner is background


def test_wrapping_and_pagination_keep_every_word_in_order(words):
    r = Renderer("qwen3-vl", cols=8, max_rows=3, **SMALL)
    text = text_of(words, 20, 120)
    pages = r.render_text(text, random.Random(0))
    assert len(pages) > 3
    assert " ".join(p.text for p in pages) == text
    for page in pages:
        assert page.rows <= 3 and page.width == 8 * 32
        rows = [t // 8 for t in page.word_tokens]
        assert rows == sorted(rows) and max(rows) < 3
        assert page.word_tokens == sorted(set(page.word_tokens))
    assert all(p.rows == 3 for p in pages[:-1])
    spans = [s for p in pages for s in p.spans]
    assert [text[a:b] for a, b in spans] == text.split()


@pytest.mark.parametrize("per_row", [1, 2])
def test_words_per_row_caps_each_row_and_keeps_the_order(words, per_row):
    r = Renderer("qwen3-vl", cols=8, max_rows=4, style=RenderStyle(words_per_row=per_row), **SMALL)
    text = text_of(words, 40, 60)
    pages = r.render_text(text, random.Random(0))
    assert " ".join(p.text for p in pages) == text
    proc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, size={"shortest_edge": 4096, "longest_edge": 1 << 20})
    for page in pages:
        rows = [t // 8 for t in page.word_tokens]
        assert all(rows.count(k) <= per_row for k in set(rows))
        alignment = align_words(page.words, grid_for(proc, page.width, page.height))
        assert [lab["token"] for lab in alignment.labels] == page.word_tokens
    if per_row == 1:
        assert all(len(set(t // 8 for t in p.word_tokens)) == len(p.words) for p in pages)
    with pytest.raises(ValueError, match="words_per_row must be at least 1"):
        Renderer("qwen3-vl", cols=8, max_rows=4, style=RenderStyle(words_per_row=0), **SMALL)


def test_min_pixels_pads_rows_and_full_height():
    r = Renderer("qwen3-vl", cols=32, max_rows=32)  # default min_pixels 32*32*64: at least 2 rows
    (page,) = r.render_text("hi", random.Random(0))
    assert (page.width, page.height) == (1024, 64) and page.word_tokens == [0]
    full = Renderer("qwen3-vl", cols=32, max_rows=5, style=RenderStyle(full_height=True)).render_text("hi")
    assert full[0].height == 5 * 32


def test_geometry_errors_are_clear():
    with pytest.raises(ValueError, match="exceeds max_pixels"):
        Renderer("qwen3-vl", cols=64, max_rows=64, max_pixels=32 * 32 * 1024)
    with pytest.raises(ValueError, match="min_pixels"):
        Renderer("qwen3-vl", cols=4, max_rows=2)
    with pytest.raises(ValueError, match="unknown font"):
        Renderer(style=RenderStyle(font="Arial"))
    with pytest.raises(ValueError, match="unknown model family"):
        Renderer("llava")


def test_wide_words_split_and_unsupported_characters_skipped():
    r = Renderer("qwen3-vl", cols=6, max_rows=8, **SMALL)
    long_word = "Pneumonoultramicroscopicsilicovolcanoconiosis" * 2
    (page,) = r.render_text(f"start {long_word} 漢字 end", random.Random(0))
    texts = [w["text"] for w in page.words]
    assert texts[0] == "start" and texts[-1] == "end"
    assert "".join(texts[1:-1]) == long_word and len(texts) > 4
    assert all(w["box"][2] <= 6 * 32 for w in page.words)
    assert page.skipped == {"split_wide_word": 1, "unsupported_characters": 1}
    assert not align_words(page.words, grid_for("qwen3-vl", page.width, page.height, **SMALL)).dropped


def test_overlong_word_splitting_draws_a_bounded_number_of_glyphs(monkeypatch):
    """Splitting costs a few row-wide renderings per piece, whatever the word's length (was: every prefix)."""
    from dvsft.sources import render

    drawn: list[int] = []
    draw = render.word_glyph
    monkeypatch.setattr(
        render, "word_glyph", lambda face, size, text: drawn.append(len(text)) or draw(face, size, text)
    )
    word = "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20_000))
    style = RenderStyle(font="DejaVuSans", max_word_chars=None)
    r = Renderer("qwen3-vl", cols=8, max_rows=64, style=style, **SMALL)
    layouts = r.layout(word)
    pieces = [p.text for lay in layouts for p in lay.placements]
    assert "".join(pieces) == word and layouts[0].skipped == {"split_wide_word": 1}
    assert all(p.box[2] <= 8 * 32 for lay in layouts for p in lay.placements)
    assert len(drawn) <= 3 * len(pieces) and max(drawn) <= 2 * max(map(len, pieces))
    # each piece is the longest that fits: one more character would overflow the row
    room = 8 * 32 - r.style.pad - r.style.gap
    start = 0
    for piece in pieces[:-1]:
        start += len(piece)
        glyph = draw("DejaVuSans", layouts[0].font_size, piece + word[start])
        assert glyph[1][2] - glyph[1][0] > room


def test_words_over_the_length_cap_are_skipped_with_a_reason():
    r = Renderer("qwen3-vl", cols=8, max_rows=4, style=RenderStyle(font="DejaVuSans", max_word_chars=50), **SMALL)
    (layout,) = r.layout("short " + "x" * 51 + " end")
    assert [p.text for p in layout.placements] == ["short", "end"]
    assert layout.skipped == {"word_too_long": 1}


def test_font_size_is_clamped_to_the_row():
    assert fonts.fit_size("DejaVuSans", 40, 32) < 40
    ascent, descent = fonts.line_extent("DejaVuSans", fonts.fit_size("DejaVuSans", 40, 28))
    assert ascent + descent <= 26
    assert set(fonts.FACES) <= set(fonts.available_faces())
    assert fonts.load_font("DejaVuSans", 12) is fonts.load_font("DejaVuSans", 12)  # cached


def test_png_round_trip_palette_and_rgb(tmp_path, words):
    (page,) = Renderer("qwen3-vl", 16, 4, **SMALL).render_text(text_of(words, 0, 20), random.Random(2))
    for mode in ("palette", "rgb"):
        path = page.save(tmp_path / f"{mode}.png", mode=mode)
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(page.image))


# --------------------------------------------------------------------------- dataset rendering


def squad(paragraphs, version="v2.0"):
    return {"version": version, "data": [{"title": "Topic", "paragraphs": paragraphs}]}


def qa(question, answer, context, qid, impossible=None, start=None):
    item = {"id": qid, "question": question, "answers": []}
    if answer is not None:
        item["answers"] = [{"text": answer, "answer_start": context.index(answer) if start is None else start}]
    if impossible is not None:
        item["is_impossible"] = impossible
    return item


SMALL_OPTS = dict(cols=16, max_rows=6, font="DejaVuSans", **SMALL)


def test_pairs_whose_answer_is_not_drawn_on_one_page_are_dropped(tmp_path, words):
    """An answer split over two pages, or with a word the renderer skipped, is dropped and counted."""
    from dvsft.sources.label_to_image import RenderOptions as Opts

    renderer = Opts(**SMALL_OPTS).renderer()
    text = text_of(words, 100, 300) + " Tokyo 東京 tower"  # DejaVuSans has no CJK glyphs: 東京 is skipped
    layouts = renderer.layout(text, face="DejaVuSans")
    assert len(layouts) >= 2 and sum(lay.skipped["unsupported_characters"] for lay in layouts) == 1
    last, first = layouts[0].placements[-1], layouts[1].placements[0]
    across = text[last.span[0] : first.span[1]]  # the last word of page 0 and the first of page 1
    inside = layouts[1].placements[2].text
    qas = [
        qa("Across?", across, text, "across"),
        qa("Skipped?", "Tokyo 東京 tower", text, "skipped"),
        qa("Whole?", inside, text, "whole", start=text.index(inside, first.span[0])),
        qa("Tokyo?", "Tokyo", text, "tokyo"),
    ]
    src = tmp_path / "train-v1.1.json"
    src.write_text(json.dumps(squad([{"context": text, "qas": qas}], "v1.1")))
    stats = render_source(src, tmp_path / "out", RenderOptions(**SMALL_OPTS))
    recs = list(read_jsonl(tmp_path / "out" / "words.jsonl"))
    assert sorted(r["qas"][0]["id"] for r in recs) == ["tokyo", "whole"]
    assert stats["qa_dropped_answer_across_pages"] == 1 and stats["qa_dropped_answer_not_drawn"] == 1
    assert stats["qa_pairs"] == 4 and stats["qa_pairs_kept"] == 2 == stats["samples"]
    for rec in recs:  # the page shows the whole answer
        assert rec["qas"][0]["answers"][0] in " ".join(w["text"] for w in rec["words"])


def test_squad_v2_qa_on_the_page_holding_the_answer(tmp_path, words):
    short = text_of(words, 0, 40)
    long = text_of(words, 100, 300)  # several 16x6 pages
    target = text_of(words, 380, 2)  # near the end: not on page 0
    paragraphs = [
        {"context": short, "qas": [qa("First?", words[3], short, "q1"), qa("None?", None, short, "q2", True)]},
        {
            "context": long,
            "qas": [
                qa("Far?", target, long, "q3", False),
                qa("Wrong offset?", target, long, "q4", False, start=0),  # falls back to a text search
                qa("Missing?", "zzzz not in text", long, "q5", False, start=0),
            ],
        },
    ]
    src = tmp_path / "train-v2.0.json"
    src.write_text(json.dumps(squad(paragraphs)))
    stats = render_source(src, tmp_path / "out", RenderOptions(**SMALL_OPTS))
    assert stats["impossible_questions"] == 1 and stats["qa_dropped_answer_not_in_text"] == 1
    recs = list(read_jsonl(tmp_path / "out" / "words.jsonl"))
    assert len(recs) == 3 == stats["images"] == stats["samples"] == stats["qa_pairs_kept"]  # one pair per image
    by_q = {r["qas"][0]["id"]: r for r in recs}
    for qid in ("q3", "q4"):
        rec = by_q[qid]
        assert rec["page"] > 0
        assert target in " ".join(w["text"] for w in rec["words"])
    assert "q5" not in by_q  # never put on page 0
    assert by_q["q3"]["page"] == by_q["q4"]["page"] and by_q["q3"]["image"] != by_q["q4"]["image"]
    for rec in recs:
        user, assistant = rec["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>" + rec["qas"][0]["question"])
        assert user["content"].split("\n")[-1] in FORMAT_INSTRUCTIONS
        assert assistant == {"role": "assistant", "content": rec["qas"][0]["answers"][0]}
        with Image.open(image_path(rec, tmp_path / "out" / "words.jsonl")) as im:
            assert im.size == (rec["width"], rec["height"])


def test_squad_v1_and_qa_per_image_groups(tmp_path, words):
    ctx = text_of(words, 50, 30)
    qas = [qa(f"Question {i}?", words[50 + i], ctx, f"id{i}") for i in range(5)]
    src = tmp_path / "dev-v1.1.json"
    src.write_text(json.dumps(squad([{"context": ctx, "qas": qas}], "1.1")))
    stats = render_source(src, tmp_path / "out", RenderOptions(qa_per_image=2, **SMALL_OPTS))
    recs = list(read_jsonl(tmp_path / "out" / "words.jsonl"))
    assert [len(r["qas"]) for r in recs] == [2, 2, 1] and stats["samples"] == 5 and stats["images"] == 3
    msgs = recs[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"].count("<image>") == 1 and "<image>" not in msgs[2]["content"]


def test_plain_text_gets_transcription_tasks(tmp_path, words):
    docs = [text_of(words, 0, 30), text_of(words, 40, 200)]
    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(docs) + "\n")
    render_source(src, tmp_path / "out", RenderOptions(**SMALL_OPTS))
    recs = list(read_jsonl(tmp_path / "out" / "words.jsonl"))
    assert len({r["doc"] for r in recs}) == 2 and len(recs) > 2  # the long one paginates
    for rec in recs:
        assert rec["messages"][0]["content"] == "<image>" + TRANSCRIBE_INSTRUCTION
        assert rec["messages"][1]["content"] == " ".join(w["text"] for w in rec["words"])
    assert " ".join(r["messages"][1]["content"] for r in recs if r["doc"] == recs[-1]["doc"]) == docs[1]


def test_jsonl_documents_prepare_layout_and_resume(tmp_path, words):
    ctx = text_of(words, 10, 50)
    rows = [
        {
            "id": "sq/1",
            "text": ctx,
            "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": words[12]}],
        },
        {"text": text_of(words, 70, 20)},  # no messages: transcription, id from the text
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    first = render_source(src, out, RenderOptions(**SMALL_OPTS))
    recs = list(read_jsonl(out / "words.jsonl"))
    assert first["documents_rendered"] == 2 and recs[0]["doc"] == "sq/1"
    assert recs[0]["messages"][0]["content"].startswith("<image>What?\n")
    assert "/" not in recs[0]["image"].removeprefix("images/")
    # resume: nothing new; then a torn, partly written file is repaired to the same content
    again = render_source(src, out, RenderOptions(**SMALL_OPTS))
    assert again["documents_resumed"] == 2 and again["records"] == 0
    lines = (out / "words.jsonl").read_text().splitlines()
    (out / "words.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    third = render_source(src, out, RenderOptions(**SMALL_OPTS))
    assert third["documents_resumed"] == 1 and third["records"] == 1
    assert (out / "words.jsonl").read_text().splitlines() == lines


def test_workers_give_the_same_records(tmp_path, words):
    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(text_of(words, 30 * i, 25) for i in range(6)))
    render_source(src, tmp_path / "a", RenderOptions(**SMALL_OPTS, font_size=18))
    render_source(src, tmp_path / "b", RenderOptions(**SMALL_OPTS, font_size=18, workers=2))
    assert (tmp_path / "a/words.jsonl").read_text() == (tmp_path / "b/words.jsonl").read_text()


def test_bad_sources_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"paragraphs": [{"qas": []}]}]}')
    with pytest.raises(ValueError, match=r"bad.json: data\[0\].paragraphs\[0\]: missing 'context'"):
        render_source(bad, tmp_path / "out", RenderOptions(**SMALL_OPTS))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "x", "body": "no text"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: document 1 \(id x\): missing 'text'"):
        render_source(rows, tmp_path / "out", RenderOptions(**SMALL_OPTS))


# --------------------------------------------------------------------------- perplexity filter


@pytest.fixture(scope="module")
def ppl_model(tmp_path_factory):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dvsft.testing.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("ppl_model")
    tok = train_tokenizer(512)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_perplexity_matches_the_model_loss_batched(ppl_model):
    import math

    import torch

    from dvsft.sources.perplexity import PerplexityScorer

    scorer = PerplexityScorer(ppl_model, batch_size=3)
    pairs = [("The cat sat on the mat.", " the mat"), ("A", " much longer target text here"), ("Doc " * 30, " x")]
    got = scorer.score(pairs)
    for (context, target), value in zip(pairs, got, strict=True):
        ctx = scorer.tokenizer(context, add_special_tokens=False)["input_ids"]
        tgt = scorer.tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + tgt])
        labels = ids.clone()
        labels[0, : len(ctx)] = -100
        with torch.no_grad():
            loss = scorer.model(input_ids=ids, labels=labels).loss.item()
        assert value == pytest.approx(math.exp(loss), rel=1e-4)


@pytest.mark.slow
def test_ppl_filter_strict_drops_loose_keeps(tmp_path, words, ppl_model):
    ctx = text_of(words, 0, 60)
    qas = [qa(f"What is word {i}?", " ".join(words[i : i + 1 + i % 3]), ctx, f"q{i}") for i in range(6)]
    src = tmp_path / "sq.json"
    src.write_text(json.dumps(squad([{"context": ctx, "qas": qas}])))
    base = dict(SMALL_OPTS, ppl_model=str(ppl_model))
    scored = render_source(src, tmp_path / "scored", RenderOptions(**base))
    recs = list(read_jsonl(tmp_path / "scored" / "words.jsonl"))
    assert len(recs) == 6 and scored["qa_pairs_kept"] == 6  # no thresholds: scores recorded, nothing dropped
    answer_ppl = sorted(r["qas"][0]["answer_ppl"] for r in recs)
    assert all(v > 1 for v in answer_ppl) and answer_ppl[0] < answer_ppl[-1]
    strict = render_source(src, tmp_path / "strict", RenderOptions(**base, max_answer_ppl=answer_ppl[2]))
    assert strict["qa_dropped_answer_ppl"] == 3 and strict["qa_pairs_kept"] == 3
    kept = list(read_jsonl(tmp_path / "strict" / "words.jsonl"))
    assert all(r["qas"][0]["answer_ppl"] <= answer_ppl[2] for r in kept)
    loose = render_source(src, tmp_path / "loose", RenderOptions(**base, max_answer_ppl=1e9, max_question_ppl=1e9))
    assert loose["qa_pairs_kept"] == 6 and not any(k.startswith("qa_dropped") for k in loose)
    q_strict = render_source(src, tmp_path / "q", RenderOptions(**base, max_question_ppl=1.0))
    assert q_strict["qa_dropped_question_ppl"] == 6 and q_strict["images"] == 0
    saved = json.loads((tmp_path / "q" / "render_stats.json").read_text())
    assert saved["qa_dropped_question_ppl"] == 6


def test_render_also_writes_parquet_shards(tmp_path):
    from dvsft.core.record_sources import data_files
    from dvsft.core.records import read_records

    src = tmp_path / "docs.txt"
    src.write_text("The first document has words.\n\nThe second one too.\n\nAnd a third.\n")
    opts = dict(SMALL_OPTS, out_format="parquet", rows_per_shard=2)
    stats = render_source(src, tmp_path / "out", RenderOptions(**opts))
    shards = data_files(tmp_path / "out" / "words")
    assert len(shards) == 2 and stats["records_in_file"] == 3
    sharded = list(read_records(tmp_path / "out" / "words", image=True))  # images resolve from the shard folder
    jsonl = list(read_jsonl(tmp_path / "out" / "words.jsonl"))
    assert [r["words"] for r in sharded] == [r["words"] for r in jsonl]


def test_doc_gain_compares_the_answer_with_and_without_the_document(tmp_path, words, ppl_model):
    """Relevance: ppl(answer | document, question) against ppl(answer | question), and the min_doc_gain filter."""
    from dvsft.sources.perplexity import PerplexityScorer, answer_context, no_document_context, quantiles

    ctx = text_of(words, 0, 60)
    qas = [qa(f"Which word comes {i}?", " ".join(words[i : i + 1 + i % 3]), ctx, f"q{i}") for i in range(8)]
    scorer = PerplexityScorer(ppl_model, batch_size=4)
    items = [(ctx, q["question"], q["answers"][0]["text"]) for q in qas]
    scores = scorer.qa_scores(items)
    for (d, q, a), s in zip(items, scores, strict=True):
        (with_doc, without) = scorer.score([(answer_context(d, q), " " + a), (no_document_context(q), " " + a)])
        assert s["answer_ppl"] == pytest.approx(with_doc, rel=1e-5)
        assert s["answer_ppl_no_doc"] == pytest.approx(without, rel=1e-5)
        assert s["doc_gain"] == pytest.approx(without / with_doc, rel=1e-5)
    gains = sorted(s["doc_gain"] for s in scores)
    assert gains[0] < gains[-1]
    src = tmp_path / "sq.json"
    src.write_text(json.dumps(squad([{"context": ctx, "qas": qas}])))
    k = max(range(len(gains) - 1), key=lambda i: gains[i + 1] - gains[i])  # cut at the widest gap
    assert gains[k + 1] - gains[k] > 2e-4  # (stored scores are rounded to 4 decimals)
    opts = dict(SMALL_OPTS, ppl_model=str(ppl_model), min_doc_gain=(gains[k] + gains[k + 1]) / 2)
    stats = render_source(src, tmp_path / "gain", RenderOptions(**opts))
    assert stats["qa_dropped_doc_gain"] == k + 1 and stats["qa_pairs_kept"] == 8 - (k + 1)
    kept = list(read_jsonl(tmp_path / "gain" / "words.jsonl"))
    assert sorted(r["qas"][0]["doc_gain"] for r in kept) == pytest.approx(gains[k + 1 :], rel=1e-3)
    measured = json.loads((tmp_path / "gain" / "render_stats.json").read_text())["ppl_quantiles"]
    assert measured["doc_gain"] == pytest.approx(quantiles(gains), rel=1e-3)
    assert set(measured) == {"answer_ppl", "answer_ppl_no_doc", "doc_gain", "question_ppl"}


def test_quantiles_interpolate():
    from dvsft.sources.perplexity import quantiles

    q = quantiles([float(v) for v in range(101)])
    assert q["p5"] == 5 and q["p50"] == 50 and q["p99"] == 99 and quantiles([]) == {}
    assert quantiles([1.0, 2.0])["p50"] == 1.5


def test_plain_page_wraps_black_words_inside_its_margin_and_leaves_out_what_does_not_fit():
    few, many = plain_page(["ink"] * 3, 256), plain_page(["ink"] * 2000, 256)
    assert few.size == many.size == (256, 256)
    ink = np.asarray(many.convert("L")) < 128
    rows, cols = np.nonzero(ink)
    assert rows.min() >= 32 and cols.min() >= 32 and cols.max() < 256 - 32 and rows.max() < 256 - 32
    assert len({r // 35 for r in rows}) > 3  # wrapped over several lines (22 px font, 35 px apart)
    assert (np.asarray(few.convert("L")) < 128).sum() < ink.sum()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"png": "jpeg"}, "--png 'jpeg'"),
        ({"qa_per_image": 0}, "--qa-per-image 0"),
        ({"max_word_chars": -1}, "--max-word-chars -1"),
        ({"max_answer_ppl": 5.0}, "need --ppl-model"),
    ],
)
def test_render_options_refuse_values_render_cannot_use(bad, message):
    with pytest.raises(ValueError, match=message):
        RenderOptions(**bad)
