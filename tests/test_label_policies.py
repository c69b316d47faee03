"""Label policies of the one aligner (issue #26): bottom-right (the paper's rule), span, fill, multi-label.

Hand-made layouts on Qwen3-VL's 32-pixel grid of a 640x480 image (20 x 15 tokens, no resize), labels from Qwen's
real tokenizer, spans on pages of the real renderer, and the collator's batch.
"""

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import typer
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from dvsft.align.aligner import AlignConfig, align_words
from dvsft.align.cells import clipped_area
from dvsft.align.run import align_file
from dvsft.align.stats import compute_stats
from dvsft.cli.labels import register
from dvsft.core.records import read_jsonl, write_jsonl
from dvsft.models.geometry import grid_for, layout_for
from dvsft.sources.corpora import corpus_words
from dvsft.sources.render import Renderer, RenderStyle

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "4c14a32"  # the commit before the label policies: its bottom-right output is the reference
COLS = 20  # tokens per row of the 640x480 grid


@pytest.fixture(scope="module")
def tok(qwen_tok):
    return qwen_tok


@pytest.fixture(scope="module")
def grid():
    g = grid_for("qwen3-vl", 640, 480)
    assert (g.rows, g.cols, g.cell, g.scale_x) == (15, COLS, 32, 1.0)
    return g


def policy(name: str, multi: bool = False) -> AlignConfig:
    return AlignConfig(label_policy=name, multi_label=multi)


def cells(alignment) -> list[tuple]:
    return [(lab["token"], lab.get("token_id"), lab.get("subtoken")) for lab in alignment.labels]


def even_advances(x0: float, n: int, step: float) -> list[float]:
    return [x0 + step * i for i in range(n + 1)]


# ----------------------------------------------------------------------------------------------- span


def test_span_labels_a_word_across_three_cells_with_the_subtoken_drawn_there(grid, tok):
    """' international' (chars 0-13) + 'ization' (13-20), 4 px a character from x 40: cells 1, 2, 3 of row 3."""
    word = {"text": "internationalization", "box": [40, 100, 120, 120], "advances": even_advances(40, 20, 4)}
    assert tok(" internationalization", add_special_tokens=False)["input_ids"] == [6489, 2022]
    span = align_words([word], grid, tok, policy("span"))
    row = 3 * COLS
    assert cells(span) == [(row + 1, 6489, 0), (row + 2, 6489, 0), (row + 3, 2022, 1)]
    assert {lab["text"] for lab in span.labels} == {"internationalization"} and not span.dropped
    assert cells(align_words([word], grid, tok)) == [(row + 3, 6489, None)]  # the paper's rule: one corner token


def test_span_labels_long_words_the_subtoken_filter_drops(grid, tok):
    """Six sub-tokens, 4 px a character: each cell takes the sub-token covering most of it (the first on a tie)."""
    text = "antidisestablishmentarianism"
    ids = tok(" " + text, add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids] == [" ant", "idis", "establish", "ment", "arian", "ism"]
    word = {"text": text, "box": [0, 0, 112, 20], "advances": even_advances(0, len(text), 4)}
    assert align_words([word], grid, tok).dropped == {"too_many_subtokens": 1}
    span = align_words([word], grid, tok, policy("span"))
    # cell 0: ant 12 px, idis 16, establish 4; cell 2: ment 16 = arian 16 (tie); cell 3: arian 4, ism 12
    assert cells(span) == [(0, ids[1], 1), (1, ids[2], 2), (2, ids[3], 3), (3, ids[5], 5)]


def test_span_without_advances_splits_the_box_by_the_fonts_character_widths(grid, tok):
    """'illWWW' = ' ill' + 'WWW' over two cells: by DejaVu widths the narrow 'ill' is a sliver of cell 0, so 'WWW'
    is drawn in both cells; by character count (a face without the glyphs) 'ill' would take cell 0."""
    ids = tok(" illWWW", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    word = {"text": "illWWW", "box": [0, 0, 64, 20]}
    assert cells(align_words([word], grid, tok, policy("span"))) == [(0, ids[1], 1), (1, ids[1], 1)]
    stale = dict(word, advances=[0.0, 1.0])  # advances that do not fit the text are ignored
    assert cells(align_words([stale], grid, tok, policy("span"))) == [(0, ids[1], 1), (1, ids[1], 1)]
    counted = dict(word, advances=even_advances(0, 6, 64 / 6))  # what a character count gives
    assert cells(align_words([counted], grid, tok, policy("span"))) == [(0, ids[0], 0), (1, ids[1], 1)]


def test_span_keeps_the_height_filter_and_the_conflict_rule(grid, tok):
    tall = {"text": "the", "box": [0, 0, 60, 4 * 32]}
    assert align_words([tall], grid, tok, policy("span")).dropped == {"too_tall": 1}
    # 'hello' ends in cell 1, 'world' starts there: cell 1 loses both labels, the other cells keep theirs
    pair = [{"text": "hello", "box": [0, 0, 40, 20]}, {"text": "world", "box": [50, 0, 90, 20]}]
    hello, world = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("hello", "world"))
    one = align_words(pair, grid, tok, policy("span"))
    assert cells(one) == [(0, hello, 0), (2, world, 0)] and one.dropped == {"token_conflict": 2}
    both = align_words(pair, grid, tok, policy("span", multi=True))
    assert cells(both) == [(0, hello, 0), (1, hello, 0), (1, world, 0), (2, world, 0)] and not both.dropped


def test_span_on_rendered_pages_labels_every_cell_of_each_words_ink(tok):
    """Real pages: the renderer's advances start at the ink and end at it (side bearings aside), and span labels
    each word's ink cells on its row, the corner cell included, from its first sub-token on."""
    r = Renderer("qwen3-vl", cols=12, max_rows=6, style=RenderStyle(font="DejaVuSerif"))
    page = r.render_text(" ".join(corpus_words()[300:420]), random.Random(3))[0]
    g = grid_for("qwen3-vl", page.width, page.height)
    span = align_words(page.words, g, tok, policy("span"))
    corner = align_words(page.words, g, tok)
    assert not span.dropped and len(span.labels) > 2 * len(corner.labels) > 0
    by_word: dict[str, list[dict]] = {}
    for lab in span.labels:
        by_word.setdefault(lab["text"], []).append(lab)
    for w, token in zip(page.words, page.word_tokens, strict=True):
        adv = w["advances"]
        assert len(adv) == len(w["text"]) + 1 and abs(adv[0] - w["box"][0]) < 4 and abs(adv[-1] - w["box"][2]) < 4
        row, (x0, x1) = token // r.cols, (w["box"][0] // 32, (w["box"][2] - 1) // 32)
        want = [row * r.cols + c for c in range(x0, x1 + 1)]
        got = [lab for lab in span.labels if lab["text"] == w["text"] and lab["token"] in want]
        assert [lab["token"] for lab in got] == want, w
        assert got[-1]["token"] == token  # the paper's token is one of them
        ids = tok(" " + w["text"], add_special_tokens=False)["input_ids"]
        assert [lab["subtoken"] for lab in got] == sorted(lab["subtoken"] for lab in got)
        assert all(lab["token_id"] == ids[lab["subtoken"]] for lab in got)


# ----------------------------------------------------------------------------------------------- fill


def test_fill_labels_cells_at_least_half_inside_a_box(grid, tok):
    red = tok(" red", add_special_tokens=False)["input_ids"][0]
    half = {"text": "red circle", "box": [16, 0, 80, 32], "kind": "object"}  # cells 0 and 2 exactly half inside
    short = {"text": "red circle", "box": [17, 0, 79, 32], "kind": "object"}  # ... just under half
    a = align_words([half], grid, tok, policy("fill"))
    assert cells(a) == [(0, red, None), (1, red, None), (2, red, None)]
    assert {lab["kind"] for lab in a.labels} == {"object"} and {lab["text"] for lab in a.labels} == {"red circle"}
    assert cells(align_words([short], grid, tok, policy("fill"))) == [(1, red, None)]
    tiny = {"text": "red circle", "box": [40, 40, 50, 50], "kind": "object"}
    assert align_words([tiny], grid, tok, policy("fill")).dropped == {"too_small": 1}


def test_fill_follows_a_coco_polygon(grid, tok):
    """The triangle x + y <= 64: cell 0 lies inside, cells (0, 1) and (1, 0) exactly half, (1, 1) outside."""
    assert clipped_area(((0, 0), (64, 0), (0, 64)), (32, 0, 64, 32)) == pytest.approx(512)
    tri = {"text": "sail", "box": [0, 0, 64, 64], "kind": "object", "polygon": [[0, 0, 64, 0, 0, 64]]}
    assert [lab["token"] for lab in align_words([tri], grid, tok, policy("fill")).labels] == [0, 1, COLS]
    flat = dict(tri, polygon=[0, 0, 64, 0, 0, 64])  # one ring, unwrapped
    assert [lab["token"] for lab in align_words([flat], grid, tok, policy("fill")).labels] == [0, 1, COLS]
    bad = dict(tri, polygon=[[0, 0, 64, 0]])
    assert align_words([bad], grid, tok, policy("fill")).dropped == {"bad_polygon": 1}


def test_regions_skip_the_word_filters_words_keep_them(grid, tok):
    """A region 5 cells tall with a 4-sub-token name is labeled; a word of that size is not."""
    name = "antidisestablishment"
    assert len(tok(" " + name, add_special_tokens=False)["input_ids"]) > 3
    region = {"text": name, "box": [0, 0, 64, 160], "kind": "object"}
    got = align_words([region], grid, tok, policy("fill"))
    assert [lab["token"] for lab in got.labels] == [r * COLS + c for r in range(5) for c in range(2)]
    assert align_words([dict(region, kind="word")], grid, tok, policy("fill")).dropped == {"too_tall": 1}
    low = dict(region, box=[0, 0, 64, 32])
    assert align_words([dict(low, kind="word")], grid, tok, policy("fill")).dropped == {"too_many_subtokens": 1}
    assert len(align_words([low], grid, tok, policy("fill")).labels) == 2


def test_two_overlapping_regions_with_and_without_multi_label(grid, tok):
    red, blue = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("red", "blue"))
    regions = [
        {"text": "red circle", "box": [0, 0, 64, 32], "kind": "object"},
        {"text": "blue square", "box": [32, 0, 96, 32], "kind": "object"},
        {"text": "red square", "box": [32, 0, 64, 32], "kind": "object"},  # the same label as the first on cell 1
    ]
    one = align_words(regions[:2], grid, tok, policy("fill"))
    assert cells(one) == [(0, red, None), (2, blue, None)] and one.dropped == {"token_conflict": 2}
    both = align_words(regions, grid, tok, policy("fill", multi=True))
    assert cells(both) == [(0, red, None), (1, red, None), (1, blue, None), (2, blue, None)]
    assert [lab["text"] for lab in both.labels if lab["token"] == 1] == ["red circle", "blue square"]
    assert both.label_set == sorted({red, blue}) and not both.dropped


def test_a_region_over_the_whole_image_labels_every_token_of_every_view(tok):
    layout = layout_for("internvl", 900, 500)
    kinds = {v.kind for v in layout.views}
    assert len(layout.views) > 1 and "thumbnail" in kinds
    whole = {"text": "wall", "box": [0, 0, 900, 500], "kind": "object"}
    a = align_words([whole], layout, tok, AlignConfig(label_policy="fill", views="all"))
    assert len(a.labels) == sum(v.num_tokens for v in layout.views) and not a.dropped
    assert {lab["view"] for lab in a.labels} == kinds and {lab["kind"] for lab in a.labels} == {"object"}
    a = align_words([whole], layout, tok, policy("fill"))  # the default views: the tiles only
    assert len(a.labels) == sum(v.num_tokens for v in layout.views if v.kind == "tile")
    assert a.dropped == {"coarser_view": 1}


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="bottom-right, span, fill"):
        AlignConfig(label_policy="corner")


# ----------------------------------------------------------------------------------------------- files, stats, CLI


def word_records(folder: Path) -> Path:
    """Rendered pages (with their advances) plus a record of hand-made words for every filter, as word records."""
    r = Renderer("qwen3-vl", cols=12, max_rows=5, style=RenderStyle(font="random"), min_pixels=32 * 32 * 4)
    pages = r.render_text(" ".join(corpus_words()[500:700]), random.Random(7))[:3]
    (folder / "images").mkdir(parents=True)
    recs = []
    for i, page in enumerate(pages):
        page.save(folder / "images" / f"p{i}.png")
        recs.append({"id": f"p{i}", "image": f"images/p{i}.png", "width": page.width, "height": page.height})
        talk = [{"role": "user", "content": "<image>Read."}, {"role": "assistant", "content": page.text}]
        recs[-1].update(words=page.words, messages=talk)
    hand = [
        {"text": "tall", "box": [0, 0, 30, 120]},
        {"text": "antidisestablishmentarianism", "box": [40, 0, 150, 20]},
        {"text": "1,250", "box": [160, 0, 200, 20]},
        {"text": "a", "box": [200, 0, 220, 20]},
        {"text": "b", "box": [205, 0, 222, 20]},
        {"text": "far", "box": [500, 500, 600, 600]},
        {"text": " ", "box": [0, 40, 10, 50]},
        {"text": "edge", "box": [-10, 40, 30, 60]},
    ]
    recs.append({**recs[0], "id": "hand", "words": hand})
    write_jsonl(folder / "words.jsonl", recs)
    return folder / "words.jsonl"


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cli():
    app, bench = typer.Typer(), typer.Typer()
    register(app, bench)
    app.add_typer(bench, name="bench")
    return app


def old_dvsft(tmp_path: Path) -> dict[str, str]:
    """The environment that runs ``dvsft`` as of commit :data:`BEFORE` (skips where git or the commit is missing)."""
    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "src"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"the code of commit {BEFORE} is not available here: {err}")
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        archive.extractall(tmp_path / "old", filter="data")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "old" / "src")}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3-vl", "internvl"])
def test_bottom_right_writes_the_bytes_it_wrote_before_the_policies(tmp_path, cli, tok_dir, family):
    env = old_dvsft(tmp_path)
    words = word_records(tmp_path / "data")
    args = ["align", str(words), "--family", family, "--tokenizer", str(tok_dir)]
    code = "import sys; from dvsft.cli import app; sys.argv[0] = 'dvsft'; app()"
    out = ["--out", str(tmp_path / "old.jsonl"), "--overlay", str(tmp_path / "ov_old")]
    assert subprocess.run([sys.executable, "-c", code, *args, *out], env=env).returncode == 0
    out = ["--out", str(tmp_path / "new.jsonl"), "--overlay", str(tmp_path / "ov_new")]
    views = ["--views", "all"] if family == "internvl" else []  # the old code labeled every view
    res = CliRunner().invoke(cli, [*args, *out, "--label-policy", "bottom-right", *views])
    assert res.exit_code == 0, res.output
    if family == "qwen3-vl":
        assert (tmp_path / "new.jsonl").read_bytes() == (tmp_path / "old.jsonl").read_bytes()
    else:  # the same records, whose settings now name the views
        new = list(read_jsonl(tmp_path / "new.jsonl"))
        assert all(r["align"].pop("views") == "all" for r in new if "align" in r)
        assert new == list(read_jsonl(tmp_path / "old.jsonl"))
    drawn = sorted(p.name for p in (tmp_path / "ov_new").glob("*.png"))
    assert drawn == sorted(p.name for p in (tmp_path / "ov_old").glob("*.png"))
    assert len(drawn) == (4 if family == "qwen3-vl" else 0)  # overlays are drawn on one-grid layouts
    assert all((tmp_path / "ov_new" / n).read_bytes() == (tmp_path / "ov_old" / n).read_bytes() for n in drawn)
    hand = [r for r in read_jsonl(tmp_path / "new.jsonl") if r["id"] == "hand"][0]
    assert {"too_tall", "too_many_subtokens", "token_conflict", "outside_image", "empty"} <= set(hand["dropped"])


def test_align_writes_the_policy_kinds_and_multi_labels_and_stats_count_them(tmp_path, tok):
    """A page of words and two overlapping objects: fill + multi-label keeps both objects' labels on the shared cell;
    stats split coverage and labels per labeled token by kind and by policy."""
    words = [
        {"text": "the", "box": [4, 100, 28, 120]},
        {"text": "red circle", "box": [0, 0, 64, 64], "kind": "object"},
        {"text": "blue square", "box": [32, 0, 96, 64], "kind": "object"},
    ]
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((0, 0, 63, 63), fill="red")
    draw.rectangle((32, 0, 95, 63), fill="blue")
    draw.text((4, 104), "the", fill="black")
    image.save(tmp_path / "scene.png")
    rec = {"id": "scene", "image": "scene.png", "width": 640, "height": 480, "words": words}
    write_jsonl(tmp_path / "words.jsonl", [rec])
    out = {}
    for name, config in {"br": AlignConfig(), "fill": policy("fill", multi=True)}.items():
        summary = align_file(tmp_path / "words.jsonl", tmp_path / f"{name}.jsonl", "qwen3-vl", tok, config)
        out[name] = next(read_jsonl(tmp_path / f"{name}.jsonl"))
        assert summary["labeled_tokens"] == len({lab["token"] for lab in out[name]["vision_labels"]})
    assert "label_policy" not in out["br"]["align"] and "multi_label" not in out["br"]["align"]
    assert (out["fill"]["align"]["label_policy"], out["fill"]["align"]["multi_label"]) == ("fill", True)
    shared = [lab["text"] for lab in out["fill"]["vision_labels"] if lab["token"] == 1]
    assert shared == ["red circle", "blue square"]
    # fill: red on 0, 1, 20, 21; blue on 1, 2, 21, 22; 'the' (20 px tall) covers no cell by half
    assert len(out["fill"]["vision_labels"]) == 8 and out["fill"]["dropped"] == {"too_small": 1}
    s = compute_stats([out["br"], out["fill"]])
    # bottom-right: the objects' corners 21 and 22 (no height filter for a region), the word's 60
    assert [lab["token"] for lab in out["br"]["vision_labels"]] == [21, 22, 60]
    assert s["per_kind"]["object"]["labeled_tokens"] == 6 + 2 and s["per_kind"]["object"]["vision_labels"] == 8 + 2
    assert s["per_kind"]["word"]["vision_labels"] == 1 and s["visual_tokens"] == 2 * 300
    assert s["labeled_tokens"] == 3 + 6 and s["vision_coverage"] == pytest.approx(9 / 600)
    fill = s["per_policy"]["fill +multi-label"]
    assert fill["records"] == 1 and fill["labels_per_labeled_token"] == pytest.approx(8 / 6)
    assert fill["vision_coverage"] == pytest.approx(6 / 300) and fill["dropped"] == {"too_small": 1}
    assert s["per_policy"]["bottom-right"]["labels_per_labeled_token"] == 1.0
    assert compute_stats([out["fill"]])["per_image"]["vision_coverage"] == pytest.approx(6 / 300)  # tokens, not labels


@pytest.mark.slow
def test_cli_align_takes_the_policy_and_refuses_an_unknown_one(tmp_path, cli, tok_dir):
    words = word_records(tmp_path / "data")
    base = ["align", str(words), "--tokenizer", str(tok_dir)]
    res = CliRunner().invoke(
        cli, [*base, "--out", str(tmp_path / "s.jsonl"), "--label-policy", "span", "--multi-label"]
    )
    assert res.exit_code == 0, res.output
    pages = [r for r in read_jsonl(tmp_path / "s.jsonl") if r["id"] != "hand"]
    assert all(r["align"]["label_policy"] == "span" and r["align"]["multi_label"] for r in pages)
    assert all("subtoken" in lab for r in pages for lab in r["vision_labels"])
    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "x.jsonl"), "--label-policy", "corner"])
    assert res.exit_code == 2 and "label policy 'corner'" in res.output and not (tmp_path / "x.jsonl").exists()
    res = CliRunner().invoke(cli, ["stats", str(tmp_path / "s.jsonl"), "--json"])
    assert res.exit_code == 0 and set(json.loads(res.output)["per_policy"]) == {"span +multi-label"}


@pytest.mark.slow
def test_the_training_config_key_reaches_the_collators_batch(tmp_path, tok):
    """``align_label_policy: span`` in the config: the collated batch's vision targets are the span labels."""
    from dvsft.models.loading import load_processor
    from dvsft.objectives.registry import build_objectives
    from dvsft.testing.tiny import TinyConfig, save_tiny
    from dvsft.training.config import ConfigError, DVSFTConfig, check_ranges
    from dvsft.training.trainer import collator_for

    processor = load_processor(save_tiny(tmp_path / "tiny", TinyConfig(tokenizer="qwen")))
    cfg = DVSFTConfig(output_dir=str(tmp_path / "o"), align_label_policy="span", min_pixels=192 * 128)
    collator = collator_for(processor, cfg, build_objectives(cfg.method, cfg))
    assert collator.align_config == policy("span")
    r = Renderer("qwen3-vl", cols=6, max_rows=4, style=RenderStyle(font="DejaVuSans"), min_pixels=192 * 128)
    page = r.render_text("the internationalization of data", random.Random(0))[0]
    rec = {"id": "p", "image": page.image, "words": page.words, "messages": [{"role": "user", "content": "<image>"}]}
    rec["messages"].append({"role": "assistant", "content": page.text})
    batch = collator([rec])
    first = int((batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).nonzero()[0])
    got = sorted(
        (int(p) - first, int(t)) for p, t in zip(batch["vision_positions"][:, 1], batch["vision_targets"], strict=True)
    )
    grid = grid_for(processor, page.width, page.height)
    want = sorted((lab["token"], lab["token_id"]) for lab in align_words(page.words, grid, tok, policy("span")).labels)
    assert got == want and len(want) > len(page.words)
    with pytest.raises(ConfigError, match="align_label_policy"):
        check_ranges(DVSFTConfig(output_dir=str(tmp_path / "o"), align_label_policy="corner"))
