"""The visual logit lens (paper figures 1 and 5): what word the LLM reads at each visual token.

The model runs on an image inside a chat prompt; at every visual-token position
(``input_ids == image_token_id``) the final hidden state goes through ``lm_head`` (only those
positions, in chunks: never the full-vocabulary logits of the whole sequence) and the top-k
tokens are decoded. ``lens_overlay`` draws each token cell's top-1 word on the image grid;
``vision_label_accuracy`` scores the visual logits against word labels.

Library use (the demo calls these)::

    from dvsft.lens.visual_logits import run_lens, lens_overlay, vision_label_accuracy
    result = run_lens(model, processor, image, top_k=5)        # LensResult
    lens_overlay(image, result.grid, result.top1_texts()).save("lens.png")
    vision_label_accuracy(model, processor, records, "aligned.jsonl")  # {"top1", "top5", "n", ...}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from dvsft.core.images import load_image
from dvsft.models.geometry import Grid, Layout, layout_for
from dvsft.sources.instructions import TRANSCRIBE_INSTRUCTION

LENS_PROMPT = TRANSCRIBE_INSTRUCTION  # text after the image cannot change causal visual logits


# views that show the whole image at a coarser scale; overlays draw the other (finer) views
SUMMARY_VIEWS = ("thumbnail", "global", "base")


@dataclass
class LensResult:
    """Top-k readings of each visual token of one image (image-token sequence order).

    ``grid`` is the Qwen-VL grid (None for tiled families); ``layout`` the family's view list
    (positions index ``top_ids``; a LLaVA-OneVision newline slot is read like any token).
    """

    grid: Grid | None
    top_ids: list[list[int]]  # [num_tokens][k]
    top_probs: list[list[float]]
    top_texts: list[list[str]]
    layout: Layout | None = None

    @property
    def geometry(self) -> Grid | Layout:
        return self.grid if self.grid is not None else self.layout

    def top1_texts(self) -> list[str]:
        return [texts[0] for texts in self.top_texts]

    def to_json(self) -> dict[str, Any]:
        if self.grid is None:
            return self._layout_json()
        g = self.grid
        return {
            "grid": [g.rows, g.cols],
            "resized": [g.resized_width, g.resized_height],
            "size": [g.width, g.height],
            "tokens": [
                {
                    "token": k,
                    "box": [round(v, 2) for v in g.token_box(k)],
                    "top": [
                        {"id": i, "text": t, "prob": round(p, 6)} for i, t, p in zip(ids, texts, probs, strict=True)
                    ],
                }
                for k, (ids, texts, probs) in enumerate(zip(self.top_ids, self.top_texts, self.top_probs, strict=True))
            ],
        }

    def _layout_json(self) -> dict[str, Any]:
        lay = self.layout
        assert lay is not None
        tokens = []
        for view in lay.views:
            for k in range(view.num_tokens):
                pos = view.position(k)
                ids, texts, probs = self.top_ids[pos], self.top_texts[pos], self.top_probs[pos]
                top = [{"id": i, "text": t, "prob": round(p, 6)} for i, t, p in zip(ids, texts, probs, strict=True)]
                box = [round(v, 2) for v in view.token_box(k)]
                tokens.append({"token": pos, "view": view.kind, "view_index": view.index, "box": box, "top": top})
        views = [
            {"kind": v.kind, "index": v.index, "grid": [v.rows, v.cols], "offset": v.offset, "region": list(v.region)}
            for v in lay.views
        ]
        return {"family": lay.family, "size": [lay.width, lay.height], "views": views, "tokens": tokens}


def image_token_id(model: Any, processor: Any) -> int:
    """The family's image placeholder id (the tokens the model fills with visual features)."""
    from dvsft.models.families import spec_for_processor

    try:
        return spec_for_processor(processor).image_token_id(processor)
    except ValueError:
        tid = getattr(model.config, "image_token_id", None)
        if tid is None:
            tid = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))
        return int(tid)


def visual_hidden_states(model: Any, processor: Any, image: Image.Image, prompt: str = LENS_PROMPT):
    """Final hidden states at the visual-token positions of ``image`` (through
    :func:`dvsft.core.images.load_image`, the decoder of every stage): a [num_tokens, hidden] tensor."""
    import torch

    from dvsft.evaluation.generation import generation_inputs
    from dvsft.objectives.base import forward_hidden

    inputs = generation_inputs(processor, model, [prompt], [[load_image(image)]])
    with torch.inference_mode():
        hidden = forward_hidden(model, inputs).last[0]  # the forward training uses
    mask = inputs["input_ids"][0] == image_token_id(model, processor)
    return hidden[mask]


def visual_topk(model: Any, hidden, k: int = 5, chunk: int = 256):
    """(probs, ids), each [num_tokens, k], of ``lm_head`` over the given hidden states, ``chunk`` rows at a time."""
    import torch

    head = model.get_output_embeddings()
    probs, ids = [], []
    with torch.inference_mode():
        for start in range(0, hidden.shape[0], chunk):
            logits = head(hidden[start : start + chunk]).float()
            p, i = torch.softmax(logits, dim=-1).topk(k, dim=-1)
            probs.append(p)
            ids.append(i)
    if not ids:
        empty = torch.empty(0, k)
        return empty, empty.long()
    return torch.cat(probs), torch.cat(ids)


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def run_lens(model: Any, processor: Any, image: Image.Image, top_k: int = 5, prompt: str = LENS_PROMPT) -> LensResult:
    """The visual logit lens of one image (made upright RGB by :func:`dvsft.core.images.load_image` first)."""
    image = load_image(image)
    layout = layout_for(processor, image.width, image.height)
    hidden = visual_hidden_states(model, processor, image, prompt)
    if hidden.shape[0] != layout.num_tokens:
        raise RuntimeError(
            f"the prompt holds {hidden.shape[0]} visual tokens but the processor's view list has {layout.num_tokens}"
        )
    probs, ids = visual_topk(model, hidden, top_k)
    tok = processor.tokenizer
    ids_l, probs_l = ids.tolist(), probs.tolist()
    texts = [[token_text(tok, i) for i in row] for row in ids_l]
    return LensResult(layout.grid, ids_l, probs_l, texts, layout)


# ------------------------------------------------------------------------------------ overlay


def _font(size: int) -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def display_text(text: str) -> str:
    """A token as it is drawn: outer spaces dropped, blanks and newlines made visible."""
    shown = text.replace("\n", "⏎").strip()
    return shown if shown else "␣"


def lens_overlay(
    image: Image.Image,
    grid: Grid | Layout,
    texts: list[str],
    correct: dict[int, bool] | None = None,
    upscale: float = 1.0,
    font_size: int | None = None,
) -> Image.Image:
    """``image`` with the token grid drawn over it and each cell's text (e.g. its top-1 token).

    ``correct`` (token -> bool) colours labeled cells green (hit) or red (miss); others are blue.
    ``upscale`` enlarges the image first so small cells stay readable. With a tiled family's
    :class:`~dvsft.models.geometry.Layout`, the cells of its finer views (tiles, crops) are drawn, not
    the thumbnail / global / base views.
    """
    if isinstance(grid, Layout):
        return _layout_overlay(image, grid, texts, correct, upscale, font_size)
    if len(texts) != grid.num_tokens:
        raise ValueError(f"{len(texts)} texts for a grid of {grid.num_tokens} tokens")
    base, sx, sy = _canvas(image, grid.width, grid.height, upscale)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cell_w = grid.cell / grid.scale_x * sx
    cell_h = grid.cell / grid.scale_y * sy
    font = _font(font_size or max(6, int(min(cell_h * 0.4, cell_w * 0.3))))
    for col in range(grid.cols + 1):
        x = min(round(col * cell_w), base.width - 1)
        draw.line([(x, 0), (x, base.height - 1)], fill=(255, 0, 0, 150), width=1)
    for row in range(grid.rows + 1):
        y = min(round(row * cell_h), base.height - 1)
        draw.line([(0, y), (base.width - 1, y)], fill=(255, 0, 0, 150), width=1)
    for k, text in enumerate(texts):
        x0, y0, x1, _ = grid.token_box(k)
        shown = _fit(display_text(text), font, (x1 - x0) * sx - 2)
        colour = (0, 0, 200, 255)
        if correct is not None and k in correct:
            colour = (0, 150, 0, 255) if correct[k] else (200, 0, 0, 255)
        pos = (x0 * sx + 1, y0 * sy + 1)
        box = draw.textbbox(pos, shown, font=font)
        draw.rectangle(box, fill=(255, 255, 255, 190))
        draw.text(pos, shown, fill=colour, font=font)
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def _canvas(image: Image.Image, width: int, height: int, upscale: float) -> tuple[Image.Image, float, float]:
    """The RGB image to draw on (enlarged by ``upscale``) and its scale from processor pixels."""
    base = image.convert("RGB")
    if upscale != 1.0:
        base = base.resize((round(base.width * upscale), round(base.height * upscale)), Image.Resampling.BICUBIC)
    return base, base.width / width, base.height / height


def _layout_overlay(
    image: Image.Image,
    layout: Layout,
    texts: list[str],
    correct: dict[int, bool] | None,
    upscale: float,
    font_size: int | None,
) -> Image.Image:
    if len(texts) != layout.num_tokens:
        raise ValueError(f"{len(texts)} texts for a view list of {layout.num_tokens} tokens")
    base, sx, sy = _canvas(image, layout.width, layout.height, upscale)
    views = [v for v in layout.views if v.kind not in SUMMARY_VIEWS] or list(layout.views)
    cells = [(v.position(k), v.token_box(k)) for v in views for k in range(v.num_tokens)]
    cells = [(p, b) for p, b in cells if b[2] > b[0] and b[3] > b[1]]
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    smallest = min((min((b[2] - b[0]) * sx, (b[3] - b[1]) * sy) for _, b in cells), default=10.0)
    font = _font(font_size or max(6, int(smallest * 0.35)))
    for pos, (x0, y0, x1, y1) in cells:
        draw.rectangle((x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1), outline=(255, 0, 0, 150), width=1)
        shown = _fit(display_text(texts[pos]), font, (x1 - x0) * sx - 2)
        colour = (0, 0, 200, 255)
        if correct is not None and pos in correct:
            colour = (0, 150, 0, 255) if correct[pos] else (200, 0, 0, 255)
        at = (x0 * sx + 1, y0 * sy + 1)
        draw.rectangle(draw.textbbox(at, shown, font=font), fill=(255, 255, 255, 190))
        draw.text(at, shown, fill=colour, font=font)
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def _fit(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


# ------------------------------------------------------------------------------------ label accuracy


def record_labels(record: dict[str, Any], grid: Grid | Layout, tokenizer: Any, where: str = "") -> dict[int, int]:
    """token -> label id of a record: its ``vision_labels`` when made for this grid, else its words aligned now
    (on every view of a tiled family's view list). ``where`` prefixes the ValueError of a record it cannot label."""
    labels = record.get("vision_labels")
    same_grid = isinstance(grid, Grid) and list(record.get("grid") or []) == [grid.rows, grid.cols]
    if labels and same_grid and all("token_id" in lab for lab in labels):
        return {int(lab["token"]): int(lab["token_id"]) for lab in labels}
    if record.get("words") is not None:
        from dvsft.align.aligner import align_words

        alignment = align_words(record["words"], grid, tokenizer)
        return {lab["token"]: lab["token_id"] for lab in alignment.labels}
    why = "its vision_labels were made for another grid" if labels else "it has no vision_labels"
    prefix = f"{where}: " if where else ""
    raise ValueError(f"{prefix}cannot label visual tokens: {why} and it has no words to align")


def record_image(record: dict[str, Any], records_file: str | Path | None = None) -> Image.Image:
    """A record's image (its ``image_bytes``, else its ``image`` file) through :func:`dvsft.core.images.load_image`;
    ValueError says why it cannot be read."""
    from dvsft.core.images import ImageError
    from dvsft.core.records import image_path

    data = record.get("image_bytes")
    if "image" not in record and not isinstance(data, bytes):
        raise ValueError("no 'image'")
    try:
        return load_image(data if isinstance(data, bytes) else image_path(record, records_file))
    except ImageError as err:
        raise ValueError(f"cannot read image: {err}") from err


def read_record(
    model: Any,
    processor: Any,
    record: dict[str, Any],
    records_file: str | Path | None = None,
    prompt: str = LENS_PROMPT,
    top_k: int = 5,
) -> tuple[Image.Image, LensResult, dict[int, int]]:
    """The lens on one record: (its upright image, the readings, ``max(5, top_k)`` per token, and token -> label
    id). ValueError says why the record cannot be read (no image, an unreadable one, no labels for this grid)."""
    image = record_image(record, records_file)
    result = run_lens(model, processor, image, top_k=max(5, top_k), prompt=prompt)
    return image, result, record_labels(record, result.geometry, processor.tokenizer)


@dataclass
class LabelHits:
    """Labeled visual tokens whose label is the top-1 / in the top-5 of their visual logits, over ``images``."""

    top1: int = 0
    top5: int = 0
    n: int = 0
    images: int = 0

    def add(self, result: LensResult, labels: dict[int, int]) -> None:
        for token, label in labels.items():
            top = result.top_ids[token]
            self.top1 += top[0] == label
            self.top5 += label in top[:5]
        self.n += len(labels)
        self.images += 1

    def accuracy(self) -> dict[str, Any]:
        """``{"top1", "top5", "n", "images"}``: fractions in [0, 1], NaN when no token is labeled."""
        return {
            "top1": self.top1 / self.n if self.n else float("nan"),
            "top5": self.top5 / self.n if self.n else float("nan"),
            "n": self.n,
            "images": self.images,
        }


def vision_label_accuracy(
    model: Any,
    processor: Any,
    records: Iterable[dict[str, Any]],
    records_file: str | Path | None = None,
    prompt: str = LENS_PROMPT,
    on_record: Callable[[dict[str, Any], LensResult, dict[int, int]], None] | None = None,
    top_k: int = 5,
) -> dict[str, Any]:
    """Share of labeled visual tokens whose label is the top-1 / in the top-5 of their visual logits.

    Records are aligned records (``vision_labels`` with ``token`` and ``token_id`` for the model's
    grid) or word records (aligned here with ``dvsft.align.aligner.align_words`` and the model's
    tokenizer). Returns fractions in [0, 1]: ``{"top1", "top5", "n" (labeled tokens), "images"}``.
    ``on_record(record, lens_result, labels)`` is called per record (e.g. to draw overlays);
    its lens result holds ``max(5, top_k)`` readings per token. A record that cannot be read raises
    ValueError naming it (``dvsft lens --records`` skips such records instead: :mod:`dvsft.lens.run`).
    """
    hits = LabelHits()
    for i, record in enumerate(records):
        try:
            _, result, labels = read_record(model, processor, record, records_file, prompt, top_k)
        except ValueError as err:
            raise ValueError(f"{records_file or 'records'}: record {record.get('id', i)}: {err}") from err
        hits.add(result, labels)
        if on_record:
            on_record(record, result, labels)
    return hits.accuracy()
