"""`dvsft bench render`: rendering throughput, including PNG encoding, in one process."""

from __future__ import annotations

import io
import random
import time
from typing import Any

from PIL import Image, ImageDraw

from dvsft.models.families import DEFAULT_FAMILY
from dvsft.sources import fonts
from dvsft.sources.render import PageLayout, Renderer, RenderStyle, pick_colours, word_glyph

TARGET_PAGES_PER_S = 20.0


def naive_page(renderer: Renderer, layout: PageLayout, rng: random.Random) -> bytes:
    """Baseline: RGB canvas, one ``ImageDraw.text`` call per word, 24-bit PNG at Pillow's default level."""
    font = fonts.load_font(layout.face, layout.font_size)
    background, foreground = pick_colours(rng)
    image = Image.new("RGB", (renderer.width, renderer.page_height(layout.rows)), background)
    draw = ImageDraw.Draw(image)
    for p in layout.placements:
        ix0, iy0 = word_glyph(layout.face, layout.font_size, p.text)[1][:2]  # same spot as the renderer
        draw.text((p.box[0] - ix0, p.box[1] - iy0), p.text, font=font, fill=foreground, anchor="ls")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def bench_render(pages: int = 50, words_per_page: int = 200, seed: int = 0) -> dict[str, Any]:
    """Pages/s of ``words_per_page``-word 1024x1024 pages (qwen3-vl, 32x32 cells) with PNG encoding."""
    from dvsft.sources.corpora import corpus_words

    words = corpus_words()
    renderer = Renderer(DEFAULT_FAMILY, 32, 32, RenderStyle(full_height=True))
    rng = random.Random(seed)
    texts = []
    for _ in range(pages):
        start = rng.randrange(len(words) - words_per_page)
        texts.append(" ".join(words[start : start + words_per_page]))
    renderer.render_text(texts[0], random.Random(0))[0].png_bytes()  # load fonts once
    t0 = time.perf_counter()
    sizes, n_words, n_pages = 0, 0, 0
    layouts = []
    for text in texts:
        for layout in renderer.layout(text, rng):
            page = renderer.draw(layout, rng)
            sizes += len(page.png_bytes())
            n_words += len(page.words)
            n_pages += 1
            layouts.append(layout)
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    for layout in layouts:
        naive_page(renderer, layout, rng)
    naive = time.perf_counter() - t1
    rate = n_pages / elapsed
    return {
        "pages": n_pages,
        "page_size": f"{renderer.width}x{renderer.max_rows * renderer.cell}",
        "words_per_page": n_words / n_pages,
        "seconds": elapsed,
        "pages_per_s": rate,
        "ms_per_page": 1000 * elapsed / n_pages,
        "png_kib_per_page": sizes / n_pages / 1024,
        "baseline_pages_per_s": n_pages / naive,
        "speedup_vs_baseline": naive / elapsed,
        "target_pages_per_s": TARGET_PAGES_PER_S,
        "meets_target": rate >= TARGET_PAGES_PER_S,
    }


def report_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """``bench_render``'s result as (name, value) rows, as `dvsft bench render` prints them."""
    return [
        ("pages", f"{r['pages']} x {r['page_size']}, {r['words_per_page']:.0f} words"),
        ("pages/s (one core)", f"{r['pages_per_s']:.1f}"),
        ("ms/page", f"{r['ms_per_page']:.1f}"),
        ("PNG KiB/page", f"{r['png_kib_per_page']:.1f}"),
        ("baseline pages/s (ImageDraw.text per word, RGB PNG)", f"{r['baseline_pages_per_s']:.1f}"),
        ("speed-up vs baseline", f"{r['speedup_vs_baseline']:.2f}x"),
        ("target pages/s", f">= {r['target_pages_per_s']:.0f} ({'met' if r['meets_target'] else 'NOT met'})"),
    ]
