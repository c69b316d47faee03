"""One evaluation question: images, question, ground-truth answers and benchmark fields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dvsft.core.images import ImageError, load_image

# An image as a loader meets it: decoded, encoded bytes, a file, or a function that makes one
# (rendered SQuAD contexts, possibly several pages). Decoding waits until the batch that needs it.
ImageSource = Image.Image | bytes | Path | Callable[[], Image.Image | list[Image.Image]]


@dataclass
class EvalItem:
    id: str
    question: str
    answers: list[str]  # empty where the split's answers are private (DocVQA/InfoVQA test)
    images: list[ImageSource] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # category, question_type, dataset, type, questionId, ...

    def load_images(self) -> list[Image.Image]:
        """The item's images decoded as RGB; a clear error names the item and file on failure."""
        images: list[Image.Image] = []
        for src in self.images:
            if callable(src) and not isinstance(src, Image.Image):
                try:
                    made = src()
                except Exception as err:  # noqa: BLE001 - re-raised with the item named
                    raise ValueError(f"item {self.id}: cannot make its image: {err}") from err
                images.extend(open_image(im, self.id) for im in (made if isinstance(made, list) else [made]))
            else:
                images.append(open_image(src, self.id))
        return images


def open_image(src: ImageSource, item_id: str = "?") -> Image.Image:
    """Decode one image source with :func:`dvsft.core.images.load_image`, the decoder of every stage (upright,
    RGB, transparency on white); its :class:`~dvsft.core.images.ImageError` is re-raised naming the item."""
    if not isinstance(src, Image.Image | bytes | Path):
        raise ValueError(f"item {item_id}: cannot read image: unsupported image source {type(src).__name__}")
    try:
        return load_image(src)
    except ImageError as err:
        raise ValueError(f"item {item_id}: cannot read image: {err}") from err
