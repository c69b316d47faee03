"""Collate word records into model inputs with text labels and per-visual-token vision labels.

Everything the model sees comes from its OWN processor and chat template; dvsft only adds:

* ``labels``: the assistant turns' tokens (each turn's end-of-turn token included), everything
  else -100. Assistant spans are found template-agnostically: the conversation is rendered up to
  each answer with ``add_generation_prompt=True`` and up to the end of that answer, and the
  character span between the two is mapped to tokens through the tokenizer's offsets.
* ``vision_positions`` [N, 2] (batch index, sequence position), ``vision_targets`` [N] and
  ``vision_label_sets`` [N, S] (-1 padded), ``vision_weights`` [N] (1/k for each of the k labels of a token that
  a multi-label alignment labels k times, its position repeated; 1.0 otherwise): the words aligned to visual tokens by
  :func:`dvsft.align.aligner.align_words` on the view list :func:`dvsft.models.geometry.layout_for`
  computes from the same processor (Qwen-VL: one view, its token grid; tiled families: every tile /
  thumbnail / crop grid / global view, each aligned on its own). The
  image tokens are found by the family's own image-token id (:mod:`dvsft.models.families`); the k-th
  of them is position k of the view list. The collator checks the processor's token count
  (and Qwen's ``image_grid_thw``) against the geometry and raises, naming the record, rather
  than shift a label.

:meth:`VisionCollator.check` encodes a record exactly as its batch will (uncut) and raises
:class:`SampleError` with the reason for anything that would fail at its step, or for more tokens than
``max_length`` (image, turns, the model's special tokens written as text, template, token counts): the dataset
readers (:mod:`dvsft.data.dataset`, :mod:`dvsft.data.streaming`) skip such records before training.

Sequences are padded on the right; one image per record, or none: a record without an image
(:func:`dvsft.core.records.has_image`) is encoded as text alone (no pixel inputs, no vision labels) and batches
with image records. The family's pixel inputs are batched as its model expects (tiles / crops per image padded
with zero images where counts differ), from the samples that have an image. A batch with no image at all carries
``dummy_image_inputs`` instead, the family's smallest image (:meth:`FamilySpec.dummy_image_inputs`), for the
dummy vision pass of :func:`dvsft.objectives.base.forward_hidden`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from dvsft.align.aligner import AlignConfig, Alignment, align_words
from dvsft.core.images import ImageError, load_image
from dvsft.core.records import IMAGE_PLACEHOLDER, has_image
from dvsft.data.dataset import has_image_placeholder
from dvsft.data.encoded_cache import MAX_GB, cache_root, open_cache
from dvsft.models.families import family_source
from dvsft.models.geometry import Grid, Layout, layout_for
from dvsft.models.loading import set_pixels


def to_processor_messages(messages: list[dict[str, Any]], image: bool = True) -> list[dict[str, Any]]:
    """Messages in the form the Qwen-VL chat templates expect: ``<image>`` becomes an image part.

    A conversation with no image placeholder gets the image at the start of its first user turn (with ``image``;
    a text-only conversation, ``image=False``, gets none).
    """
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            parts: list[dict[str, Any]] = []
            for i, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
                if i:
                    parts.append({"type": "image"})
                if text:
                    parts.append({"type": "text", "text": text})
            content = parts
        elif isinstance(content, list):
            content = [{"type": "image"} if p.get("type") == "image" else dict(p) for p in content]
        out.append({"role": m["role"], "content": content})
    if image and not any(has_image_placeholder(m) for m in out):
        user = next((m for m in out if m["role"] == "user"), None)
        if user is None:
            raise ValueError("no user turn to put the image in")
        text = user["content"]
        user["content"] = [{"type": "image"}] + ([{"type": "text", "text": text}] if isinstance(text, str) else text)
    return out


MAX_LENGTH = 8192  # tokens per sample: the collator's and DVSFTConfig's max_length default
ENCODED = "_encoded"  # a sample's Encoded from VisionCollator.check, which its batch reuses (streaming input)
DUMMY_IMAGE = "dummy_image_inputs"  # a batch without images: the family's smallest image (the dummy vision pass)


class SampleError(ValueError):
    """A record the collator cannot encode: ``reason`` says why; the message names the record too."""

    def __init__(self, rid: str, reason: str):
        self.reason = reason
        super().__init__(f"record {rid}: {reason}")


@dataclass
class Encoded:
    """One record, encoded and checked."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    mm_token_type_ids: torch.Tensor | None
    pixel_values: torch.Tensor | None  # None: a text-only record
    image_grid_thw: torch.Tensor | None
    vision_tokens: list[tuple[int, int]]  # (sequence position, first-token id)
    label_set: list[int]
    grid: Grid | None  # Qwen-VL families
    alignment: Alignment | None
    layout: Layout | None = None
    image_inputs: dict[str, torch.Tensor] | None = None  # the family's other model inputs (image_sizes, masks)

    def label_counts(self) -> tuple[int, int]:
        """(text labels, vision labels): the labeled answer tokens and visual tokens (a token with several labels
        counts once)."""
        return int((self.labels != -100).sum()), len({p for p, _ in self.vision_tokens})


SEQUENCE_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")  # batched on their own


def label_weights(vision_tokens: list[tuple[int, int]]) -> list[float]:
    """1/k for each entry of a token that ``vision_tokens`` labels k times (multi-label); 1.0 each otherwise."""
    claims = Counter(p for p, _ in vision_tokens)
    return [1.0 / claims[p] for p, _ in vision_tokens]


def special_tokens(tokenizer: Any) -> set[str]:
    """The tokenizer's special tokens (image, vision, turn and end tokens): text never holds them."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {t.content for t in added.values() if t.special} | set(tokenizer.all_special_tokens)


def stack_images(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-record image tensors as one batch tensor: concatenated along dim 0, where dim 1 (tiles or
    crops per image, [1, n, ...]) differs first padded with zeros (the models skip all-zero images)."""
    if len({tuple(p.shape[1:]) for p in parts}) > 1 and all(p.dim() >= 3 for p in parts):
        n = max(p.shape[1] for p in parts)
        padded = []
        for p in parts:
            extra = p.new_zeros((p.shape[0], n - p.shape[1], *p.shape[2:]))
            padded.append(torch.cat([p, extra], dim=1))
        parts = padded
    return torch.cat(parts)


class VisionCollator:
    """``records -> batch`` for DV-SFT (and SFT with ``vision_labels=False``)."""

    def __init__(
        self,
        processor: Any,
        align_config: AlignConfig | None = None,
        vision_labels: bool = True,
        max_length: int = MAX_LENGTH,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        keep_records: bool = False,
        cache_dir: str | os.PathLike | None = None,
        cache_max_gb: float = MAX_GB,
    ):
        self.keep_records = keep_records  # batch["records"]: id, image, size, words (objectives that need boxes)
        if min_pixels is not None or max_pixels is not None:
            processor = copy.copy(processor)
            processor.image_processor = copy.deepcopy(processor.image_processor)
            set_pixels(processor, min_pixels, max_pixels)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.align_config = align_config or AlignConfig()
        self.vision_labels = vision_labels
        self.max_length = int(max_length)
        self.family_source = family_source(processor)  # the processor's family and settings, read once (layouts)
        self.family = self.family_source.spec
        self.image_token = getattr(processor, "image_token", None) or self.family.image_token  # in the template
        self.image_token_id = self.family.image_token_id(processor)  # what the model fills with features
        self.special_tokens = sorted((special_tokens(self.tokenizer) | {self.image_token}) - {IMAGE_PLACEHOLDER})
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self._dummy: dict[str, torch.Tensor] | None = None  # the family's smallest image, made once
        self.stats = Counter(encoded=0, from_cache=0)  # samples run through the processor / read from the cache
        self.cache = None  # the encoded-sample cache (dvsft.data.encoded_cache), None: every sample is encoded
        root = cache_root(cache_dir)
        if root is not None:
            self.cache = open_cache(root, self, cache_max_gb)

    # -- one record -------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def answer_spans(self, messages: list[dict[str, Any]], rid: str) -> tuple[str, list[tuple[int, int]]]:
        """(full text, character spans of the assistant answers incl. their end-of-turn token)."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise SampleError(
                    rid,
                    f"the chat template renders turn {i} differently in context, so its answer span cannot be located",
                )
            end = len(upto.rstrip())
            if end > len(prompt):
                spans.append((len(prompt), end))
        if not spans:
            raise SampleError(rid, "no assistant answer to train on")
        return full, spans

    def encode(self, record: dict[str, Any]) -> Encoded:
        """One record as its batch holds it; longer than ``max_length``, cut there (never inside the image).
        Raises :class:`SampleError` naming the record (see :meth:`check`)."""
        rid = str(record.get("id", "?"))
        enc = self._encoded(record, rid)
        return self._cut(enc, rid) if enc.input_ids.numel() > self.max_length else enc

    def check(self, record: dict[str, Any]) -> Encoded:
        """``record`` encoded exactly as :meth:`encode` does, uncut; :class:`SampleError` for anything its batch
        would fail on, and for more tokens than ``max_length`` (``"N tokens > max_length M"``): what the dataset
        readers skip before training."""
        rid = str(record.get("id", "?"))
        try:
            enc = self._encoded(record, rid)
        except SampleError:
            raise
        except Exception as err:  # noqa: BLE001 - the processor and the chat template raise what they like
            raise SampleError(rid, f"{type(err).__name__}: {err}") from err
        length = int(enc.input_ids.numel())
        if length > self.max_length:
            raise SampleError(rid, f"{length} tokens > max_length {self.max_length}")
        return enc

    def _encoded(self, record: dict[str, Any], rid: str) -> Encoded:
        """:meth:`_encode` through the encoded-sample cache where there is one (``stats`` counts encodings and
        cache hits); the cache holds every sample with its word alignment, dropped here without vision labels."""
        if self.keep_records and not has_image(record):
            raise SampleError(rid, "a text-only record, and the method's objectives read each sample's image")
        if self.cache is None:
            self.stats["encoded"] += 1
            return self._encode(record, rid, self.vision_labels)
        key = self.cache.key(record)
        enc = self.cache.load(key) if key is not None else None
        if enc is None:
            enc = self._encode(record, rid, align=True)
            self.stats["encoded"] += 1
            if key is not None:
                self.cache.save(key, enc)
        else:
            self.stats["from_cache"] += 1
        return enc if self.vision_labels else dataclasses.replace(enc, vision_tokens=[], label_set=[], alignment=None)

    def _encode(self, record: dict[str, Any], rid: str, align: bool) -> Encoded:
        image = self._image(record, rid)
        text, spans = self._text(record, rid, image is not None)
        if image is None:
            return self._encode_text(text, spans, rid)
        w, h = image.size
        out = self.processor(text=[text], images=[image], return_tensors="pt", return_offsets_mapping=True)
        ids = out["input_ids"][0]
        layout = layout_for(self.family_source, w, h)
        grid = layout.grid  # Qwen-VL: one grid; tiled families: a list of views
        image_pos = torch.nonzero(ids == self.image_token_id).flatten()
        self._check_image_tokens(out, image_pos, grid, layout, rid)
        n_img = int(image_pos.numel())
        grow = len(layout.prompt) - len(self.image_token) if layout.prompt else (n_img - 1) * len(self.image_token)
        labels = self.text_labels(ids, out["offset_mapping"][0], text, spans, grow, rid)
        alignment, vision_tokens, label_set = None, [], []
        if align:
            alignment = align_words(
                record.get("words") or [], layout, tokenizer=self.tokenizer, config=self.align_config
            )
            vision_tokens = [(int(image_pos[lab["token"]]), int(lab["token_id"])) for lab in alignment.labels]
            label_set = alignment.label_set
        mm = out.get("mm_token_type_ids")
        return Encoded(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            labels=labels,
            mm_token_type_ids=mm[0] if mm is not None else None,
            pixel_values=out["pixel_values"],
            image_grid_thw=out.get("image_grid_thw"),
            vision_tokens=vision_tokens,
            label_set=label_set,
            grid=grid,
            alignment=alignment,
            layout=layout,
            image_inputs={k: out[k] for k in self.family.image_inputs if k not in SEQUENCE_INPUTS and k in out},
        )

    def _encode_text(self, text: str, spans: list[tuple[int, int]], rid: str) -> Encoded:
        """A text-only record: the conversation's tokens and answer labels, no pixel inputs, no vision labels."""
        out = self.processor(text=[text], return_tensors="pt", return_offsets_mapping=True)
        ids = out["input_ids"][0]
        mm = out.get("mm_token_type_ids")
        return Encoded(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            labels=self.text_labels(ids, out["offset_mapping"][0], text, spans, 0, rid),
            mm_token_type_ids=mm[0] if mm is not None else None,
            pixel_values=None,
            image_grid_thw=None,
            vision_tokens=[],
            label_set=[],
            grid=None,
            alignment=None,
        )

    def _image(self, record: dict[str, Any], rid: str) -> Any:
        """The record's image, decoded upright, its size checked against the record's; None for a text-only
        record."""
        data = record.get("image_bytes")
        if not has_image(record):
            return None
        try:
            image = load_image(data if isinstance(data, bytes) else record["image"])
        except ImageError as err:
            raise SampleError(rid, f"cannot read image: {err}") from err
        w, h = image.size
        if record.get("width") not in (None, w) or record.get("height") not in (None, h):
            shown = record.get("image", "<image bytes>")
            raise SampleError(
                rid,
                f"image {shown} is {w}x{h} after EXIF orientation but the record says "
                f"{record.get('width')}x{record.get('height')}; its word boxes would not match",
            )
        return image

    def _text(self, record: dict[str, Any], rid: str, image: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """The conversation rendered by the chat template, with its answer spans (see :meth:`answer_spans`): one
        image in it, or none (``image=False``)."""
        if "messages" not in record or not record["messages"]:
            raise SampleError(rid, "no messages")
        reason = self.special_token_reason(record["messages"])
        if reason is not None:
            raise SampleError(rid, reason)
        try:
            messages = to_processor_messages(record["messages"], image)
        except ValueError as err:
            raise SampleError(rid, str(err)) from err
        text, spans = self.answer_spans(messages, rid)
        if text.count(self.image_token) != int(image):
            want = "one image" if image else "no image (a text-only record)"
            raise SampleError(rid, f"expected {want} in the conversation, found {text.count(self.image_token)}")
        return text, spans

    def special_token_reason(self, messages: list[dict[str, Any]]) -> str | None:
        """Why a conversation cannot be encoded because its text holds one of the model's special tokens
        (``<|image_pad|>``, ``<|vision_start|>``, ``<|im_end|>``, ...: the processor would read it as a token,
        not as text), or None. The image placeholder ``<image>`` is the record's own syntax, not text."""
        for i, m in enumerate(messages):
            content = m["content"]
            texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
            for text in texts:
                found = next((t for t in self.special_tokens if t in text), None)
                if found is not None:
                    return f"messages[{i}] holds the model's special token {found} as text"
        return None

    def _check_image_tokens(
        self, out: Any, image_pos: torch.Tensor, grid: Grid | None, layout: Layout, rid: str
    ) -> None:
        """The processor's image tokens must be where the geometry puts the labels, or the labels would shift."""
        n_img = int(image_pos.numel())
        w, h = layout.width, layout.height
        if grid is not None:
            thw = tuple(int(v) for v in out["image_grid_thw"][0])
            if n_img != grid.num_tokens or thw != grid.grid_thw:
                raise SampleError(
                    rid,
                    f"the processor made {n_img} image tokens (image_grid_thw {thw}) for the {w}x{h} image but the "
                    f"token grid has {grid.num_tokens} ({grid.rows}x{grid.cols}, grid_thw {grid.grid_thw}); "
                    "refusing to align labels to shifted tokens",
                )
            if n_img and int(image_pos[-1] - image_pos[0]) != n_img - 1:
                raise SampleError(rid, "the image tokens are not contiguous")
        elif n_img != layout.num_tokens:
            views = ", ".join(f"{v.kind} {v.rows}x{v.cols}" for v in layout.views)
            raise SampleError(
                rid,
                f"the processor made {n_img} {self.family.name} image tokens (id {self.image_token_id}) for the "
                f"{w}x{h} image but its view list has {layout.num_tokens} ({views}); refusing to align labels to "
                "shifted tokens",
            )

    def _cut(self, enc: Encoded, rid: str) -> Encoded:
        """``enc`` cut to ``max_length`` tokens; refused where the cut would split the image."""
        length, cut = int(enc.input_ids.numel()), self.max_length
        image_pos = torch.nonzero(enc.input_ids == self.image_token_id).flatten()
        if image_pos.numel() and int(image_pos[-1]) >= cut:
            raise SampleError(
                rid,
                f"{length} tokens exceed max_length {cut} and the cut would split the image (image tokens at "
                f"{int(image_pos[0])}..{int(image_pos[-1])}); raise max_length or lower max_pixels",
            )
        mm = enc.mm_token_type_ids
        return dataclasses.replace(
            enc,
            input_ids=enc.input_ids[:cut],
            attention_mask=enc.attention_mask[:cut],
            labels=enc.labels[:cut],
            mm_token_type_ids=mm[:cut] if mm is not None else None,
            vision_tokens=[(p, t) for p, t in enc.vision_tokens if p < cut],
        )

    def text_labels(
        self, ids: torch.Tensor, offsets: torch.Tensor, text: str, spans: list[tuple[int, int]], grow: int, rid: str
    ) -> torch.Tensor:
        """-100 everywhere but the tokens overlapping an answer span (offsets are in the expanded text,
        where the image placeholder, if any, grew by ``grow`` characters)."""
        at = text.find(self.image_token)
        labels = torch.full_like(ids, -100)
        starts, ends = offsets[:, 0], offsets[:, 1]
        for a, b in spans:
            if at >= 0 and a <= at < b:
                raise SampleError(rid, "an image placeholder inside an assistant answer is not supported")
            if 0 <= at < a:
                a, b = a + grow, b + grow
            inside = (ends > a) & (starts < b) & (ends > starts)
            labels[inside] = ids[inside]
        return labels

    # -- the batch --------------------------------------------------------------------------
    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not records:
            raise ValueError("cannot collate an empty list of records")
        enc = [r[ENCODED] if ENCODED in r else self.encode(r) for r in records]
        length = max(e.input_ids.numel() for e in enc)

        def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
            out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
            for i, row in enumerate(rows):
                out[i, : row.numel()] = row
            return out

        batch: dict[str, torch.Tensor] = {
            "input_ids": pad([e.input_ids for e in enc], self.pad_token_id),
            "attention_mask": pad([e.attention_mask for e in enc], 0),
        }
        if all(e.mm_token_type_ids is not None for e in enc):
            batch["mm_token_type_ids"] = pad([e.mm_token_type_ids for e in enc], 0)
        batch.update(self._image_batch([e for e in enc if e.pixel_values is not None]))
        batch["labels"] = pad([e.labels for e in enc], -100)
        if self.vision_labels:
            positions = [(b, p) for b, e in enumerate(enc) for p, _ in e.vision_tokens]
            targets = [t for e in enc for _, t in e.vision_tokens]
            width = max((len(e.label_set) for e in enc if e.vision_tokens), default=0)
            sets = torch.full((len(targets), width), -1, dtype=torch.long)
            row = 0
            for e in enc:
                for _ in e.vision_tokens:
                    sets[row, : len(e.label_set)] = torch.tensor(e.label_set, dtype=torch.long)
                    row += 1
            batch["vision_positions"] = torch.tensor(positions, dtype=torch.long).reshape(-1, 2)
            batch["vision_targets"] = torch.tensor(targets, dtype=torch.long)
            batch["vision_label_sets"] = sets
            batch["vision_weights"] = torch.tensor([w for e in enc for w in label_weights(e.vision_tokens)])
        if self.keep_records:
            keep = ("id", "image", "width", "height", "words")
            batch["records"] = [{k: r[k] for k in keep if k in r} for r in records]  # type: ignore[assignment]
        return batch

    def _image_batch(self, shown: list[Encoded]) -> dict[str, Any]:
        """The pixel inputs of the samples that have an image (text-only samples add none); with none, the
        family's smallest image under ``DUMMY_IMAGE`` (for the dummy vision pass)."""
        if not shown:
            if self._dummy is None:
                self._dummy = self.family.dummy_image_inputs(self.processor)
            return {DUMMY_IMAGE: self._dummy}
        out: dict[str, Any] = {"pixel_values": stack_images([e.pixel_values for e in shown])}
        if all(e.image_grid_thw is not None for e in shown):
            out["image_grid_thw"] = torch.cat([e.image_grid_thw for e in shown])
        for key in shown[0].image_inputs or {}:
            out[key] = stack_images([e.image_inputs[key] for e in shown])
        return out
