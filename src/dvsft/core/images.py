"""Load any image as an upright RGB picture, or fail with a typed reason.

Every image dvsft reads goes through :func:`load_image` (``dvsft label`` and ``prepare``, the collator, LSD's
crops, ASVR's codes, evaluation items, the lens, ``dvsft align``'s overlays; ``dvsft align`` reads the same
upright size with :func:`image_size`); its failure reasons are the ones ``dvsft label`` writes to
``<out>.errors.jsonl``.
Handled modes: RGB, L, 1, P (with or without transparency), RGBA/LA/PA (composited on white),
CMYK/YCbCr/LAB/HSV (converted), 16-bit ``I;16*`` (scaled by 1/257), 32-bit ``I`` and float ``F`` (kept when
already in 0..255, else min-max stretched). EXIF orientation is applied, so sizes and boxes are in the
upright frame. Multi-frame files (GIF, TIFF) use their first frame.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dvsft.core.file_memo import FileMemo

MAX_ASPECT_RATIO = 200  # the Qwen-VL processors' smart_resize limit

MISSING = "missing file"
UNDECODABLE = "undecodable image"
ZERO_SIZE = "zero size"
ASPECT = "aspect ratio too extreme"
OCR_FAILURE = "OCR failure"


class ImageError(ValueError):
    """An input image that cannot be used; ``reason`` is one of the module's reason constants."""

    def __init__(self, reason: str, detail: str, path: str | Path | None = None):
        self.reason = reason
        self.detail = detail
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {reason}: {detail}" if path else f"{reason}: {detail}")


def check_size(width: int, height: int, path: str | Path | None = None) -> None:
    """Raise :class:`ImageError` for zero-size images and aspect ratios above ``MAX_ASPECT_RATIO``."""
    if width <= 0 or height <= 0:
        raise ImageError(ZERO_SIZE, f"image is {width}x{height} pixels", path)
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(ASPECT, f"{width}x{height} has aspect ratio {ratio:.1f} > {MAX_ASPECT_RATIO}", path)


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open ``source`` (a file, its bytes, or a PIL image) as an upright 8-bit RGB image (EXIF orientation
    applied, transparency composited on white).

    Raises :class:`ImageError` with reason ``missing file``, ``zero size`` (empty file or a 0-pixel side),
    ``undecodable image`` or ``aspect ratio too extreme``.
    """
    if isinstance(source, Image.Image):
        rgb = to_rgb(_upright(source))
        check_size(*rgb.size)
        return rgb
    if isinstance(source, bytes):
        path: str | Path = "<image bytes>"
        if not source:
            raise ImageError(ZERO_SIZE, "image bytes are empty", path)
        stream: Any = io.BytesIO(source)
    else:
        path = stream = Path(source)
        if not path.is_file():
            raise ImageError(MISSING, "no such file" if not path.exists() else "not a regular file", path)
        if path.stat().st_size == 0:
            raise ImageError(ZERO_SIZE, "file is empty (0 bytes)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency expressed in bytes"
            img = Image.open(stream)
            check_size(*img.size, path=path)  # cheap: before decoding the pixels
            img.seek(0)
            img.load()
            img = _upright(img)
            rgb = to_rgb(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(UNDECODABLE, f"{type(err).__name__}: {err}", path) from err
    check_size(*rgb.size, path=path)
    return rgb


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block counts as no orientation."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed EXIF must not lose the image
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif arr.size and (arr.min() < 0 or arr.max() > 255):
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


CHECKED: FileMemo[tuple[int, int]] = FileMemo()  # the size of each file that passed, per process (and ``decode``)


def image_size(path: str | Path | bytes, decode: bool = True) -> tuple[int, int]:
    """Upright (EXIF-oriented) ``(width, height)`` of an image file (or its bytes, e.g. from a Parquet shard),
    checked without a full RGB conversion.

    The header is read; with ``decode`` the data is checked too (PNG: every chunk's CRC; JPEG: a 1/8-scale
    decode; other formats: a full decode). Raises :class:`ImageError` like :func:`load_image`. A file that passed
    is remembered by path, size and modification time: a process checks it again only once it changed.
    """
    if isinstance(path, bytes):
        return _checked_size(path, decode)
    path = Path(path)
    try:
        return CHECKED.get(path, lambda: _checked_size(path, decode), decode)
    except OSError:  # missing or unreadable: reported as load_image reports it
        return _checked_size(path, decode)


def _checked_size(path: Path | bytes, decode: bool) -> tuple[int, int]:
    if isinstance(path, bytes):
        data = path
        path = "<image bytes>"

        def opened() -> Any:
            return Image.open(io.BytesIO(data))

        if not data:
            raise ImageError(ZERO_SIZE, "image bytes are empty", path)
    else:
        if not path.is_file():
            raise ImageError(MISSING, "no such file" if not path.exists() else "not a regular file", path)
        if path.stat().st_size == 0:
            raise ImageError(ZERO_SIZE, "file is empty (0 bytes)", path)

        def opened() -> Any:
            return Image.open(path)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with opened() as img:
                width, height = img.size
                if _orientation(img) in (5, 6, 7, 8):  # EXIF transpose turns it by 90 degrees
                    width, height = height, width
                fmt = img.format
                if decode and fmt != "PNG":
                    if fmt == "JPEG":
                        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()
            if decode and fmt == "PNG":
                with opened() as img:
                    img.verify()  # must follow the open directly
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(UNDECODABLE, f"{type(err).__name__}: {err}", path) from err
    check_size(width, height, path)
    return width, height


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block counts as no orientation
        return 1
