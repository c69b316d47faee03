"""Label-to-image: draw a text word by word onto a blank image aligned to the visual-token grid.

Layout rules (paper section 4.1):

- A word occupies a *slot* of whole token cells that starts at a cell boundary: its ink starts
  ``pad`` pixels into the first cell and at least ``gap`` blank pixels are left before the next
  slot, so the slot is ``ceil((pad + ink width + gap) / cell)`` cells wide. The next word starts
  at the next free cell boundary. Lines wrap at ``cols`` cells; pages break after ``max_rows``.
- The word is labeled on its slot's LAST cell: its ink always reaches at least ``cell // 4``
  pixels into that cell (a word that would end short of it is shifted right), so the box's
  bottom-right corner lies inside the last cell and ``align_words`` puts it on that token.
- Text is drawn inside its token row: the font size is clamped so ascent + descent fit the cell
  height, and the glyph ink of every word is checked against the row.
- A word wider than a whole row is split by characters into row-wide pieces, each its own word. The split
  points come from the characters' advance widths (prefix sums + binary search, then checked against the
  real ink), so splitting is linear in the word's length. Words longer than ``max_word_chars`` characters
  are skipped (``word_too_long``), as are words with characters the face has no glyph for
  (``unsupported_characters``); both are counted in ``Page.skipped``.
- Each word record keeps ``advances``: where each character starts and the last ends (``len(text) + 1`` page x
  positions from the face's advance widths, kerning ignored), which the ``span`` label policy reads.
- One dark and one light colour per page, random from ``rng``: light text on a dark background
  (the paper's setting) or the reverse with ``dark_text=True``. Anti-aliased pixels are blends
  of the two, so a page is stored as an 8-bit palette image (fast, small PNGs).
- The image is ``cols * cell`` wide and ``rows * cell`` high (at least enough rows for the
  family's ``min_pixels``), a fixed point of the family's ``smart_resize``: the processor does not
  resize it and every token cell is exact.
"""

from __future__ import annotations

import bisect
import colorsys
import functools
import io
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from dvsft.models.families import DEFAULT_FAMILY, family_spec
from dvsft.models.geometry import grid_rule, smart_resize
from dvsft.sources import fonts

WORD_RE = re.compile(r"\S+")


@dataclass(frozen=True)
class RenderStyle:
    """How pages look. ``font="random"`` draws one face per document from ``fonts.FACES``."""

    font: str = "DejaVuSans"
    font_size: int = 20  # clamped to the largest size whose ascent + descent fit a token row
    dark_text: bool = False  # paper: light text on a dark background; True swaps them
    pad: int = 2  # blank pixels before a word's ink inside its first cell
    gap: int = 6  # blank pixels at least between a word's ink and the next word's slot
    full_height: bool = False  # every page max_rows tall (otherwise only the rows it uses)
    max_word_chars: int | None = 10_000  # longer "words" are skipped (word_too_long); None = no cap
    words_per_row: int | None = None  # at most this many words on a row (1: a word list); None = fill rows


@dataclass
class Placement:
    """One word drawn on a page: ink box in page pixels, its token, and its span in the source text."""

    text: str
    box: tuple[int, int, int, int]
    token: int
    span: tuple[int, int]
    glyph: Image.Image
    advances: tuple[float, ...] = ()  # x where each character starts, then where the last ends (page pixels)


@dataclass
class PageLayout:
    """Where the words of one page go (no colours yet)."""

    index: int
    rows: int
    placements: list[Placement]
    face: str
    font_size: int
    skipped: Counter = field(default_factory=Counter)


@dataclass
class Page:
    """A rendered page: the image, its word records and the token each word is labeled on."""

    indexed: Image.Image  # mode "P": palette index = text coverage 0..255
    words: list[dict[str, Any]]
    word_tokens: list[int]
    spans: list[tuple[int, int]]  # character span of each word in the rendered text
    index: int
    rows: int
    cols: int
    cell: int
    background: tuple[int, int, int]
    foreground: tuple[int, int, int]
    font: str
    font_size: int
    skipped: Counter = field(default_factory=Counter)

    @functools.cached_property
    def image(self) -> Image.Image:
        """The page as a PIL RGB image."""
        return self.indexed.convert("RGB")

    @property
    def width(self) -> int:
        return self.indexed.width

    @property
    def height(self) -> int:
        return self.indexed.height

    @property
    def text(self) -> str:
        """The page's words joined by single spaces (the transcription target)."""
        return " ".join(w["text"] for w in self.words)

    def record(self, record_id: str, image: str, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The page's word record (``image`` relative to the JSONL file); default task: transcribe the page."""
        from dvsft.sources.instructions import transcribe_prompt

        if messages is None:
            messages = [
                {"role": "user", "content": transcribe_prompt()},
                {"role": "assistant", "content": self.text},
            ]
        return {
            "id": record_id,
            "image": image,
            "width": self.width,
            "height": self.height,
            "words": self.words,
            "messages": messages,
        }

    def contains(self, start: int, end: int) -> bool:
        """Whether the page holds every word overlapping characters ``[start, end)`` of the source text."""
        if not self.spans or end <= start:
            return False
        first, last = self.spans[0][0], self.spans[-1][1]
        return first <= start and end <= last

    def png_bytes(self, mode: str = "palette", compress_level: int = 6) -> bytes:
        """PNG encoding: ``palette`` (8-bit, default) or ``rgb`` (24-bit)."""
        buf = io.BytesIO()
        self._image_for(mode).save(buf, "PNG", compress_level=compress_level)
        return buf.getvalue()

    def save(self, path: str | Path, mode: str = "palette", compress_level: int = 6) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._image_for(mode).save(path, "PNG", compress_level=compress_level)
        return path

    def _image_for(self, mode: str) -> Image.Image:
        if mode == "palette":
            return self.indexed
        if mode == "rgb":
            return self.image
        raise ValueError(f"unknown PNG mode {mode!r}; use 'palette' or 'rgb'")


def _ink_width(glyph: tuple[Image.Image, tuple[int, int, int, int]]) -> int:
    return glyph[1][2] - glyph[1][0]


def luminance(rgb: tuple[int, int, int]) -> float:
    """Relative luminance in [0, 1] (Rec. 709 weights on gamma-encoded values)."""
    r, g, b = rgb
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


DARK_MAX, LIGHT_MIN = 0.3, 0.6  # luminance bounds of the dark and the light colour


def pick_colours(rng: random.Random, dark_text: bool = False) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, foreground): one dark colour (luminance <= 0.3) and one light one (>= 0.6)."""

    def rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
        return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]

    dark = rgb(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.28))
    light = rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.85, 1.0))
    assert luminance(dark) <= DARK_MAX and luminance(light) >= LIGHT_MIN
    return (light, dark) if dark_text else (dark, light)


def blend_palette(background: tuple[int, int, int], foreground: tuple[int, int, int]) -> list[int]:
    """256-entry palette: index a = background blended with foreground at coverage a / 255."""
    palette = []
    for a in range(256):
        palette.extend(round(b + (f - b) * a / 255) for b, f in zip(background, foreground, strict=True))
    return palette


CACHED_GLYPH_CHARS = 64  # glyphs of longer texts (split pieces) are not cached: the cache stays small


def word_glyph(face: str, size: int, text: str) -> tuple[Image.Image, tuple[int, int, int, int]] | None:
    """The anti-aliased ink of ``text`` cropped tight, and its box relative to the origin on the baseline."""
    if len(text) <= CACHED_GLYPH_CHARS:
        return _cached_glyph(face, size, text)
    return _draw_glyph(face, size, text)


def _draw_glyph(face: str, size: int, text: str) -> tuple[Image.Image, tuple[int, int, int, int]] | None:
    font = fonts.load_font(face, size)
    left, top, right, bottom = font.getbbox(text, anchor="ls")
    m = 2
    canvas = Image.new("L", (right - left + 2 * m, bottom - top + 2 * m), 0)
    ImageDraw.Draw(canvas).text((m - left, m - top), text, font=font, fill=255, anchor="ls")
    ink = canvas.getbbox()
    if ink is None:
        return None
    ox, oy = m - left, m - top
    return canvas.crop(ink), (ink[0] - ox, ink[1] - oy, ink[2] - ox, ink[3] - oy)


_cached_glyph = functools.lru_cache(maxsize=65536)(_draw_glyph)


@functools.lru_cache(maxsize=64)
def _advances(face: str, size: int) -> dict[str, float]:
    """Per-character advance widths of one face and size (filled as characters are met)."""
    return {}


def advance_prefix(face: str, size: int, word: str) -> list[float]:
    """``p[i]`` = advance width of ``word[:i]`` (no kerning): a linear-time width estimate of any prefix."""
    widths = _advances(face, size)
    font = fonts.load_font(face, size)
    out = [0.0]
    total = 0.0
    for c in word:
        w = widths.get(c)
        if w is None:
            w = widths[c] = font.getlength(c)
        total += w
        out.append(total)
    return out


class Renderer:
    """Render text onto pages of a model family's visual-token grid (see the module docstring)."""

    def __init__(
        self,
        family: str = DEFAULT_FAMILY,
        cols: int = 32,
        max_rows: int = 32,
        style: RenderStyle | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        self.family = family_spec(family).name
        fam = grid_rule(self.family)
        self.style = style or RenderStyle()
        self.cell = fam.cell
        self.cols, self.max_rows = int(cols), int(max_rows)
        self.min_pixels = fam.min_pixels if min_pixels is None else int(min_pixels)
        self.max_pixels = fam.max_pixels if max_pixels is None else int(max_pixels)
        if self.cols < 1 or self.max_rows < 1:
            raise ValueError(f"cols ({cols}) and max_rows ({max_rows}) must be >= 1")
        s = self.style
        if s.pad < 0 or s.gap < 0 or s.pad + s.gap + self.min_tail > self.cell:
            raise ValueError(f"pad {s.pad} + gap {s.gap} leave no room in a {self.cell}-pixel cell")
        if s.words_per_row is not None and s.words_per_row < 1:
            raise ValueError(f"words_per_row must be at least 1 (or None to fill rows), got {s.words_per_row}")
        if s.font != "random":
            fonts.font_path(s.font)
        self.width = self.cols * self.cell
        if self.max_rows * self.cell * self.width > self.max_pixels:
            raise ValueError(
                f"a {self.cols}x{self.max_rows}-cell page ({self.width}x{self.max_rows * self.cell} px) exceeds "
                f"max_pixels {self.max_pixels}: the processor would shrink it; lower --cols/--max-rows"
            )
        # fewest rows that reach min_pixels and the processors' 200:1 aspect limit
        need = max(math.ceil(self.min_pixels / (self.width * self.cell)), math.ceil(self.cols / 200), 1)
        if need > self.max_rows:
            raise ValueError(
                f"a page needs at least {need} rows of {self.cell} px to reach min_pixels {self.min_pixels}, "
                f"more than max_rows {self.max_rows}"
            )
        self.min_rows = need

    @property
    def min_tail(self) -> int:
        """Ink pixels a word reaches at least into its last (labeled) cell."""
        return self.cell // 4

    def page_height(self, rows_used: int) -> int:
        rows = self.max_rows if self.style.full_height else max(rows_used, self.min_rows)
        return rows * self.cell

    def choose_face(self, rng: random.Random) -> tuple[str, int]:
        face = rng.choice(fonts.FACES) if self.style.font == "random" else self.style.font
        return face, fonts.fit_size(face, self.style.font_size, self.cell)

    def layout(self, text: str, rng: random.Random | None = None, face: str | None = None) -> list[PageLayout]:
        """Place the words of ``text`` on pages (deterministic for a given face)."""
        rng = rng or random.Random(0)
        face, size = (face, fonts.fit_size(face, self.style.font_size, self.cell)) if face else self.choose_face(rng)
        ascent, descent = fonts.line_extent(face, size)
        baseline = (self.cell - ascent - descent) // 2 + ascent
        cell, cols, pad, gap = self.cell, self.cols, self.style.pad, self.style.gap
        pages: list[PageLayout] = []
        current = PageLayout(0, 0, [], face, size)
        row = col = on_row = 0
        per_row = self.style.words_per_row
        for piece, span, glyph in self._pieces(text, face, size, current.skipped):
            image, (ix0, iy0, ix1, iy1) = glyph
            width = ix1 - ix0
            n = math.ceil((pad + width + gap) / cell)
            if col + n > cols or (per_row is not None and on_row >= per_row):
                row, col, on_row = row + 1, 0, 0
            if row >= self.max_rows:
                pages.append(current)
                current = PageLayout(len(pages), 0, [], face, size)
                row = col = on_row = 0
            top = row * cell + baseline + iy0
            if top < row * cell or row * cell + baseline + iy1 > (row + 1) * cell:
                current.skipped["glyph_taller_than_row"] += 1
                continue
            x0 = col * cell + pad
            last_cell = (col + n - 1) * cell
            x0 += max(0, last_cell + self.min_tail - (x0 + width))
            box = (x0, top, x0 + width, top + (iy1 - iy0))
            advances = tuple(x0 - ix0 + a for a in advance_prefix(face, size, piece))  # from the pen's origin
            current.placements.append(Placement(piece, box, row * cols + col + n - 1, span, image, advances))
            current.rows = row + 1
            col += n
            on_row += 1
        if current.placements or not pages:
            pages.append(current)
        return pages

    def _pieces(self, text: str, face: str, size: int, skipped: Counter):
        """(text, char span, glyph) of each word; words wider than a row are split by characters."""
        room = self.cols * self.cell - self.style.pad - self.style.gap
        cap = self.style.max_word_chars
        for m in WORD_RE.finditer(text):
            word, start = m.group(), m.start()
            if cap is not None and len(word) > cap:
                skipped["word_too_long"] += 1
                continue
            if not fonts.supports(face, word):
                skipped["unsupported_characters"] += 1
                continue
            prefix = advance_prefix(face, size, word)
            if prefix[-1] <= room + self.cell:  # may fit: measure the real ink
                glyph = word_glyph(face, size, word)
                if glyph is None:
                    skipped["no_ink"] += 1
                    continue
                if _ink_width(glyph) <= room:
                    yield word, (start, m.end()), glyph
                    continue
            skipped["split_wide_word"] += 1
            offset = 0
            while offset < len(word):
                k, g = self._longest_fit(face, size, word, offset, prefix, room)
                if g is not None:
                    yield word[offset : offset + k], (start + offset, start + offset + k), g
                offset += k

    @staticmethod
    def _longest_fit(
        face: str, size: int, word: str, offset: int, prefix: list[float], room: int
    ) -> tuple[int, tuple[Image.Image, tuple[int, int, int, int]] | None]:
        """(k, glyph of ``word[offset:offset+k]``): the longest piece whose ink fits ``room`` (k >= 1).

        The advance widths give k by binary search; a few real renderings correct it for kerning and side
        bearings, so the cost is one row-wide glyph per piece whatever the word's length.
        """
        n = len(word)
        k = max(1, bisect.bisect_right(prefix, prefix[offset] + room, lo=offset) - 1 - offset)
        k = min(k, n - offset)
        g = word_glyph(face, size, word[offset : offset + k])
        while k > 1 and g is not None and _ink_width(g) > room:
            k -= 1
            g = word_glyph(face, size, word[offset : offset + k])
        for _ in range(8):  # ink is narrower than the advances: try a few more characters
            if offset + k >= n:
                break
            bigger = word_glyph(face, size, word[offset : offset + k + 1])
            if bigger is not None and _ink_width(bigger) > room:
                break
            k, g = k + 1, bigger
        return k, g

    def draw(self, layout: PageLayout, rng: random.Random) -> Page:
        """Paint a laid-out page with a random dark/light colour pair."""
        height = self.page_height(layout.rows)
        self.check_fixed_point(self.width, height)
        mask = Image.new("L", (self.width, height), 0)
        for p in layout.placements:
            mask.paste(p.glyph, p.box[:2])
        background, foreground = pick_colours(rng, self.style.dark_text)
        mask.putpalette(blend_palette(background, foreground))
        words = [
            {"text": p.text, "box": list(p.box), "score": 1.0, "advances": [round(a, 2) for a in p.advances]}
            for p in layout.placements
        ]
        return Page(
            indexed=mask,
            words=words,
            word_tokens=[p.token for p in layout.placements],
            spans=[p.span for p in layout.placements],
            index=layout.index,
            rows=height // self.cell,
            cols=self.cols,
            cell=self.cell,
            background=background,
            foreground=foreground,
            font=layout.face,
            font_size=layout.font_size,
            skipped=layout.skipped,
        )

    def render_text(self, text: str, rng: random.Random | None = None) -> list[Page]:
        """Render ``text`` into pages; words that do not fit go to the next page."""
        rng = rng or random.Random(0)
        return [self.draw(layout, rng) for layout in self.layout(text, rng)]

    def check_fixed_point(self, width: int, height: int) -> None:
        """Raise unless the family's ``smart_resize`` leaves a ``width`` x ``height`` image as it is."""
        resized = smart_resize(height, width, self.cell, self.min_pixels, self.max_pixels)
        if resized != (height, width):
            raise AssertionError(
                f"page {width}x{height} would be resized to {resized[1]}x{resized[0]} "
                f"(min_pixels {self.min_pixels}, max_pixels {self.max_pixels})"
            )


def plain_page(words: list[str], size: int, font_size: int = 22, face: str = "DejaVuSans") -> Image.Image:
    """A white ``size`` x ``size`` page of ``words`` in black, wrapped into lines with no token grid.

    An OCR engine's input (``dvsft bench label``): a 32 px margin, lines 1.6 font sizes apart; the words
    that do not fit are left out.
    """
    font = fonts.load_font(face, font_size)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    margin, line_h = 32, int(font_size * 1.6)
    x, y = margin, margin
    for word in words:
        w = draw.textlength(word, font=font)
        if x + w > size - margin:
            x, y = margin, y + line_h
        if y + line_h > size - margin:
            break
        draw.text((x, y), word, font=font, fill="black")
        x += w + font_size // 2
    return img
