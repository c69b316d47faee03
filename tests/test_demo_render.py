"""The demo renders only the page it keeps: the same page and the same random state as rendering them all."""

import random

from dvsft.experiments.demo import demo_preset, demo_stream, first_page
from dvsft.experiments.settings import page_pixels
from dvsft.models.families import DEFAULT_FAMILY
from dvsft.sources.render import Renderer, RenderStyle


def test_first_page_is_the_first_rendered_page_and_leaves_the_same_random_state():
    preset = demo_preset("cpu")
    pixels = page_pixels(preset)
    style = RenderStyle(font_size=preset.font_size, full_height=True, words_per_row=preset.words_per_row or None)
    renderer = Renderer(
        DEFAULT_FAMILY, cols=preset.cols, max_rows=preset.rows, style=style, min_pixels=pixels, max_pixels=pixels
    )
    text = " ".join(demo_stream(preset.vocab_words)[: preset.cols * preset.rows * 2])
    every, only = random.Random(3), random.Random(3)
    pages = renderer.render_text(text, every)
    page = first_page(renderer, text, only)
    assert len(pages) > 1  # the later pages exist, and were not drawn
    assert page.image.tobytes() == pages[0].image.tobytes() and page.words == pages[0].words
    assert only.getstate() == every.getstate()
