"""The fonts rendering uses: matplotlib's bundled DejaVu TTFs, never system fonts.

Loaded ``ImageFont`` objects, their vertical metrics and each face's character map are cached,
so a renderer pays for a font once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import ImageFont

# Faces a `--font random` render draws from (all ship inside the matplotlib wheel).
FACES: tuple[str, ...] = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
)


@functools.cache
def font_dir() -> Path:
    """matplotlib's bundled TTF folder (found without importing matplotlib, which is slow)."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("matplotlib is not installed: it ships the DejaVu fonts dvsft renders with")
    path = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"
    if not path.is_dir():
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return path


def available_faces() -> list[str]:
    """Every DejaVu face in the bundled folder (names without ``.ttf``)."""
    return sorted(p.stem for p in font_dir().glob("DejaVu*.ttf"))


@functools.cache
def font_path(face: str) -> Path:
    """The TTF file of a bundled DejaVu face; a clear error for anything else."""
    path = font_dir() / f"{face}.ttf"
    if not face.startswith("DejaVu") or not path.is_file():
        raise ValueError(f"unknown font {face!r}; bundled faces: {', '.join(available_faces())}")
    return path


@functools.cache
def load_font(face: str, size: int) -> ImageFont.FreeTypeFont:
    """A cached FreeType font of ``face`` at ``size`` pixels."""
    if size < 4:
        raise ValueError(f"font size {size} is too small (minimum 4 px)")
    return ImageFont.truetype(str(font_path(face)), size)


@functools.cache
def charset(face: str) -> frozenset[int]:
    """Code points the face has glyphs for (words with others would render as boxes)."""
    from fontTools.ttLib import TTFont  # a matplotlib dependency

    return frozenset(TTFont(str(font_path(face)), lazy=True).getBestCmap())


def supports(face: str, text: str) -> bool:
    """Whether every character of ``text`` has a glyph in ``face``."""
    chars = charset(face)
    return all(ord(c) in chars for c in text)


def line_extent(face: str, size: int) -> tuple[int, int]:
    """(ascent, descent) in pixels: the vertical room one line of ``face`` at ``size`` needs."""
    return load_font(face, size).getmetrics()


def fit_size(face: str, requested: int, cell: int, margin: int = 1) -> int:
    """The largest size <= ``requested`` whose ascent + descent fits a ``cell``-pixel row with ``margin`` each side."""
    for size in range(requested, 3, -1):
        ascent, descent = line_extent(face, size)
        if ascent + descent <= cell - 2 * margin:
            return size
    raise ValueError(f"no size of {face} fits a {cell}-pixel token row")
