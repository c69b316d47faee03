"""Align word boxes to visual tokens: the one implementation used by `dvsft align` and the collator.

Paper section 4.1 (the default ``bottom-right`` policy): each word labels the visual token that contains its
bottom-right corner; words taller than ``max_height_cells`` token cells or longer than ``max_subtokens`` tokens are
dropped; a token that receives more than one word loses all its labels. The ``span`` and ``fill`` policies and
``multi_label`` (:data:`LABEL_POLICIES`) label more cells per entry, and regions beyond text. Every family aligns
through its :class:`~dvsft.models.geometry.Layout`, each view on its own; a Qwen-VL image is a layout of one view,
its token grid.
"""

from __future__ import annotations

import math
import unicodedata
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dvsft.align.cells import Box, Claim, Piece, Ring, char_edges, fill_cells, polygon_rings, row_cells, word_pieces
from dvsft.models.families import FamilySource, family_source
from dvsft.models.geometry import Grid, Layout, View, grid_layout

LABEL_POLICIES = ("bottom-right", "span", "fill")
"""Label policies (docs/labeling.md#label-policies). An entry of a record's ``words`` is a word (``kind`` absent or
``"word"``) or a region (``"kind": "object"`` or another name; ``box`` its bounding box, optional ``polygon`` in COCO's
format: a list of rings, each a flat ``[x1, y1, x2, y2, ...]`` list in original-image pixels). Its label is the first
sub-token of its ``text``:

- ``bottom-right`` (the paper's rule, the default): the token holding the box's bottom-right corner;
- ``span``: every cell the ink covers on the baseline row (the row of the bottom-right corner) gets the sub-token drawn
  there (character positions from the word's ``advances``, else proportional to the font's character widths inside
  the box); the sub-token filter does not apply;
- ``fill``: every cell whose area lies at least half inside the polygon (else the box).

The height and sub-token filters apply to words only; the conflict rule to every entry. With ``multi_label`` a cell
that several entries claim keeps one label per distinct label (sorted by token, then in claim order) instead of
losing them all.
"""
LABEL_VIEWS = ("finest", "all")
"""Which views of a multi-view image (tiles and a thumbnail, a crop grid and a base image) label an entry: ``finest``,
only the views that show it at the finest scale (fewest original pixels per token: InternVL's tiles, not its
thumbnail, where the same text is several times smaller); ``all``, every view that shows it. A one-view image
(Qwen-VL) labels the same either way."""


@dataclass(frozen=True)
class AlignConfig:
    """The paper's alignment filters; ``AlignConfig()`` holds the defaults of every caller (``dvsft align``,
    ``DVSFTConfig``'s ``align_*`` / ``label_leading_space`` keys, the collator, a plain ``TrainingArguments``)."""

    max_height_cells: float = 3.0  # drop words taller than this many token cells (resized pixels)
    max_subtokens: int = 3  # drop words whose tokenization is longer (needs a tokenizer)
    leading_space: bool = True  # tokenize labels as " word" (mid-sentence form; bare where that starts blank)
    label_policy: str = "bottom-right"  # which cells an entry labels: one of LABEL_POLICIES
    multi_label: bool = False  # a cell several entries claim keeps all their labels (else all are dropped)
    views: str = "finest"  # which views of a multi-view image label an entry: one of LABEL_VIEWS

    def __post_init__(self) -> None:
        if self.label_policy not in LABEL_POLICIES:
            raise ValueError(f"label policy {self.label_policy!r}: choose one of {', '.join(LABEL_POLICIES)}")
        if self.views not in LABEL_VIEWS:
            raise ValueError(f"label views {self.views!r}: choose one of {', '.join(LABEL_VIEWS)}")


@dataclass
class Alignment:
    """Labels of one image: ``[{"token": k, "text": w, "token_id": id?, "kind": kind?, "subtoken": i?, "view":
    kind?, "view_index": i?}]`` sorted by token, then in claim order; ``kind`` only for a region (not a word),
    ``subtoken`` (the index of the label's sub-token in the word) only under ``span``. Without ``multi_label`` a
    token has at most one entry; with it one per distinct label (``token_id``, else ``text``)."""

    labels: list[dict[str, Any]]
    dropped: Counter = field(default_factory=Counter)  # filter name -> entries dropped (span/fill conflicts: labels)
    per_view: dict[str, Counter] = field(default_factory=dict)  # view kind -> labels and drops

    @property
    def label_set(self) -> list[int]:
        """Deduplicated first-token ids of this image's labels (the smoothing set L)."""
        return sorted({lab["token_id"] for lab in self.labels if "token_id" in lab})


_WORD_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {label text: ids}
_BLANK_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {id: whitespace-only?}


def _memo(table: weakref.WeakKeyDictionary, tokenizer: Any) -> dict:
    try:
        return table.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memo
        return {}


def _tokenize(texts: list[str], tokenizer: Any) -> dict[str, list[int]]:
    cache = _memo(_WORD_IDS, tokenizer)
    missing = sorted({t for t in texts if t not in cache})
    if missing:
        if len(cache) > 1_000_000:
            cache.clear()
        cache.update(zip(missing, tokenizer(missing, add_special_tokens=False)["input_ids"], strict=True))
    return cache


def is_blank_token(token_id: int, tokenizer: Any) -> bool:
    """Whether a token decodes to whitespace only (Qwen's bare space 220, newlines, tabs)."""
    cache = _memo(_BLANK_IDS, tokenizer)
    if token_id not in cache:
        cache[token_id] = not tokenizer.decode([token_id]).strip()
    return cache[token_id]


def label_forms(words: list[str], tokenizer: Any, leading_space: bool) -> list[str]:
    """The text each word's label is tokenized from: ``" " + word`` with ``leading_space``, the bare word where
    that form begins with a whitespace-only token (see :func:`first_token_ids`)."""
    if not leading_space:
        return list(words)
    spaced = [" " + w for w in words]
    cache = _tokenize(spaced, tokenizer)
    return [w if cache[s] and is_blank_token(cache[s][0], tokenizer) else s for w, s in zip(words, spaced, strict=True)]


def first_token_ids(words: list[str], tokenizer: Any, leading_space: bool) -> list[list[int]]:
    """Token ids of each word as its label is tokenized (memoised per tokenizer).

    With ``leading_space`` a word is tokenized in its mid-sentence form ``" " + word``, unless that
    form begins with a whitespace-only token: Qwen's tokenizers split the space off numbers and most
    symbols (``" 12"`` is ``[" ", "1", "2"]``), and a bare space carries none of the word. Such words
    take their bare tokenization (``"12"`` is ``["1", "2"]``), so the label is the first token of the
    word's content and the sub-token filter counts that same form.
    """
    forms = label_forms(words, tokenizer, leading_space)
    cache = _tokenize(forms, tokenizer)
    return [cache[f] for f in forms]


_OFFSETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {label form: char spans}


def subtoken_spans(words: list[str], tokenizer: Any, leading_space: bool) -> list[list[tuple[int, int, int]]]:
    """``(token id, first character, end character)`` of each sub-token of each word's label form, characters
    counted in the word itself (a leading space belongs to no character). A tokenizer without offsets (a slow one)
    splits the characters evenly between the sub-tokens."""
    forms = label_forms(words, tokenizer, leading_space)
    ids = _tokenize(forms, tokenizer)
    offsets = _char_offsets(forms, tokenizer, ids)
    out = []
    for word, form in zip(words, forms, strict=True):
        shift, n = len(form) - len(word), len(word)
        spans = [(min(max(a - shift, 0), n), min(max(b - shift, 0), n)) for a, b in offsets[form]]
        out.append([(int(t), a, b) for t, (a, b) in zip(ids[form], spans, strict=True)])
    return out


def _char_offsets(forms: list[str], tokenizer: Any, ids: dict[str, list[int]]) -> dict[str, list[tuple[int, int]]]:
    cache = _memo(_OFFSETS, tokenizer)
    missing = sorted({f for f in forms if f not in cache})
    if not missing:
        return cache
    try:
        got = tokenizer(missing, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        got = [
            [(len(f) * i // len(ids[f]), len(f) * (i + 1) // len(ids[f])) for i in range(len(ids[f]))] for f in missing
        ]
    cache.update({f: [tuple(o) for o in offs] for f, offs in zip(missing, got, strict=True)})
    return cache


def is_invisible(text: str) -> bool:
    """Whether nothing of ``text`` shows: only whitespace and format characters (Unicode category Cf: zero-width
    space U+200B, byte order mark U+FEFF, joiners, direction marks). Such a word labels nothing."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


class Candidate(NamedTuple):
    """An entry that passed the text and box filters."""

    text: str
    box: Box  # clipped to the image
    first: int | None  # the label id (first sub-token)
    refused: str | None  # the tokenizer filter that refuses the entry, or None
    kind: str = "word"
    pieces: tuple[Piece, ...] = ()  # span: each sub-token's ink x range
    rings: tuple[Ring, ...] = ()  # fill: the polygon, if given


def _candidates(
    words: list[dict[str, Any]],
    width: int,
    height: int,
    tokenizer: Any,
    config: AlignConfig,
    dropped: Counter,
) -> list[Candidate]:
    """Entries whose text, box (and polygon, under ``fill``) pass the entry filters. The tokenizer's verdict counts
    only for an entry some view would label (:func:`align_words`), so that a word too tall for the grid is dropped
    as ``too_tall``."""
    texts = [str(w.get("text", "")).strip() for w in words]
    ids = first_token_ids(texts, tokenizer, config.leading_space) if tokenizer is not None else [None] * len(words)
    spans = _subtokens(texts, tokenizer, config) if config.label_policy == "span" else None
    out = []
    for i, (word, text, tok_ids) in enumerate(zip(words, texts, ids, strict=True)):
        if is_invisible(text):
            dropped["empty"] += 1
            continue
        box = _clipped_box(word.get("box"), width, height, dropped)
        if box is None:
            continue
        kind = word.get("kind", "word")
        if not isinstance(kind, str) or not kind:
            dropped["bad_kind"] += 1
            continue
        rings: tuple[Ring, ...] = ()
        if config.label_policy == "fill" and word.get("polygon") is not None:
            rings = polygon_rings(word["polygon"]) or ()
            if not rings:
                dropped["bad_polygon"] += 1
                continue
        limit = config.max_subtokens if kind == "word" and config.label_policy != "span" else None
        first, refused = _first_token(tok_ids, tokenizer, limit)
        pieces = tuple(word_pieces(char_edges(word, text, box), spans[i], box)) if spans is not None else ()
        out.append(Candidate(text, box, first, refused, kind, pieces, rings))
    return out


def _clipped_box(box: Any, width: int, height: int, dropped: Counter) -> Box | None:
    """The box clipped to the image, or None with the filter that drops it counted."""
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(_is_number(v) for v in box):
        dropped["bad_box"] += 1
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        dropped["non_finite_box"] += 1
        return None
    if x0 > x1 or y0 > y1:
        dropped["inverted_box"] += 1
        return None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(width), x1), min(float(height), y1)
        if x1 <= x0 or y1 <= y0:
            dropped["outside_image"] += 1
            return None
    return x0, y0, x1, y1


def _subtokens(
    texts: list[str], tokenizer: Any, config: AlignConfig
) -> list[list[tuple[int | None, int | None, int, int]]]:
    """Per word, ``(token id, index, first char, end char)`` of its sub-tokens, whitespace-only ones left out;
    without a tokenizer the whole word is one piece with no id."""
    if tokenizer is None:
        return [[(None, None, 0, len(t))] for t in texts]
    return [
        [(t, i, a, b) for i, (t, a, b) in enumerate(subs) if not is_blank_token(t, tokenizer)]
        for subs in subtoken_spans(texts, tokenizer, config.leading_space)
    ]


def _first_token(tok_ids: list[int] | None, tokenizer: Any, limit: int | None) -> tuple[int | None, str | None]:
    """(the label id, None), or (None, the tokenizer filter that refuses the entry: more than ``limit`` sub-tokens
    when a limit applies); (None, None) without a tokenizer."""
    if tok_ids is None:
        return None, None
    if not tok_ids:
        return None, "untokenizable"
    if limit is not None and len(tok_ids) > limit:
        return None, "too_many_subtokens"
    if is_blank_token(tok_ids[0], tokenizer):  # never teach a visual token a bare space
        return None, "untokenizable"
    return int(tok_ids[0]), None


def _resolve_conflicts(
    kept: list[tuple[int, dict[str, Any]]], dropped: Counter, multi_label: bool = False
) -> list[dict[str, Any]]:
    """A token that receives more than one label loses them all; with ``multi_label`` it keeps one per distinct
    label (``token_id``, else ``text``), in claim order."""
    if multi_label:
        seen: set[tuple[int, Any]] = set()
        labels = []
        for token, label in kept:
            key = (token, label.get("token_id", label["text"]))
            if key not in seen:
                seen.add(key)
                labels.append(label)
        return labels
    per_token = Counter(token for token, _ in kept)
    labels = []
    for token, label in kept:
        if per_token[token] > 1:
            dropped["token_conflict"] += 1
        else:
            labels.append(label)
    return labels


def align_words(
    words: list[dict[str, Any]],
    layout: Layout | Grid,
    tokenizer: Any = None,
    config: AlignConfig | None = None,
) -> Alignment:
    """Label the tokens of every view of ``layout`` (a :class:`~dvsft.models.geometry.Grid` is the one view of a
    Qwen-VL image) with the entries of ``words`` under ``config.label_policy`` (:data:`LABEL_POLICIES`), and apply
    the paper's filters.

    In each view (the Qwen-VL grid, a tile, thumbnail, base image, crop grid, global image) an entry claims its
    cells: ``bottom-right``, the token that sees its bottom-right corner; ``span``, every cell of that token's row
    its box overlaps, each with the sub-token drawn there; ``fill``, every cell at least half inside it. The height
    filter (words only) counts the cell height of the view (a word can be too tall for a tile yet fit the coarser
    thumbnail); a token of the view that receives two labels loses both (``multi_label``: keeps both).
    ``token`` is the position in the image-token sequence; in a list of views labels also carry ``view`` (kind)
    and ``view_index``. An entry's filters run in the order: text, box and kind (``empty``, ``bad_box``,
    ``non_finite_box``, ``inverted_box``, ``outside_image``, ``bad_kind``, ``bad_polygon`` under fill, once per
    entry), the view's (``unseen``: the corner lies in the view's region but no token sees it; ``too_small``
    under fill: the region's centre lies in the view but no cell is half inside; ``too_tall``; once per entry and
    view, a view that does not show the corner / centre does not count), the tokenizer's (``untokenizable``,
    ``too_many_subtokens`` for words under bottom-right and fill: once per entry that a view would label), then
    ``token_conflict`` per view (per label: under span and fill a word keeps its other cells). Under
    ``config.views == "finest"`` (the default) an entry's claims in views coarser than the finest view that claims
    it are dropped before the conflict rule (``coarser_view``, once per entry and view; :data:`LABEL_VIEWS`).
    :attr:`Alignment.per_view` breaks labels and the view-level drops down by view kind.
    """
    if isinstance(layout, Grid):
        layout = grid_layout(layout)
    config = config or AlignConfig()
    dropped: Counter = Counter()
    per_view: dict[str, Counter] = {}
    candidates = _candidates(words, layout.width, layout.height, tokenizer, config, dropped)
    refused: dict[int, str] = {}  # candidate -> the tokenizer filter that drops it (counted once)
    named = layout.grid is None  # in a list of views each label names its view
    claims = [
        _view_labels(view, candidates, config, named, per_view.setdefault(view.kind, Counter()), refused)
        for view in layout.views
    ]
    if config.views == "finest" and len(layout.views) > 1:
        claims = _finest_claims(layout.views, claims, per_view)
    labels: list[dict[str, Any]] = []
    for view, kept in zip(layout.views, claims, strict=True):
        stats = per_view[view.kind]
        got = _resolve_conflicts([(pos, label) for pos, label, _ in kept], stats, config.multi_label)
        stats["labels"] += len(got)
        labels += got
    dropped.update(refused.values())
    for stats in per_view.values():
        dropped.update({k: v for k, v in stats.items() if k != "labels"})
    labels.sort(key=lambda lab: lab["token"])
    return Alignment(labels, dropped, {k: Counter(v) for k, v in per_view.items()})


def _view_labels(
    view: View,
    candidates: list[Candidate],
    config: AlignConfig,
    named: bool,
    stats: Counter,
    refused: dict[int, str],
) -> list[tuple[int, dict[str, Any], int]]:
    """(sequence position, label, candidate index) of each cell ``view`` labels, before the conflict rule
    (``named``: labels carry ``view`` and ``view_index``); the view's drops go to ``stats``, the tokenizer's refusals
    of entries the view would label to ``refused``."""
    kept = []
    for i, cand in enumerate(candidates):
        claims = _claims(view, cand, config, stats)
        if not claims:
            continue
        if cand.refused is not None:
            refused[i] = cand.refused
            continue
        for k, token_id, subtoken in claims:
            pos = view.position(k)
            label: dict[str, Any] = {"token": pos, "text": cand.text}
            if named:
                label.update(view=view.kind, view_index=view.index)
            if token_id is not None:
                label["token_id"] = token_id
            if subtoken is not None:
                label["subtoken"] = subtoken
            if cand.kind != "word":
                label["kind"] = cand.kind
            kept.append((pos, label, i))
    return kept


def _finest_claims(
    views: tuple[View, ...], claims: list[list[tuple[int, dict[str, Any], int]]], per_view: dict[str, Counter]
) -> list[list[tuple[int, dict[str, Any], int]]]:
    """Each entry's claims in the views that show it at the finest scale (fewest original pixels per token); its
    claims in coarser views are dropped, counted once per entry and view as ``coarser_view``."""
    scale = [view.pixels_per_token for view in views]
    finest: dict[int, float] = {}
    for v, kept in enumerate(claims):
        for _, _, i in kept:
            finest[i] = min(finest.get(i, math.inf), scale[v])
    out = []
    for v, kept in enumerate(claims):
        coarser = {i for _, _, i in kept if scale[v] > finest[i] * (1 + 1e-9)}
        per_view[views[v].kind]["coarser_view"] += len(coarser)
        out.append([claim for claim in kept if claim[2] not in coarser])
    return out


def _claims(view: View, cand: Candidate, config: AlignConfig, stats: Counter) -> list[Claim]:
    """The cells of ``view`` the entry claims under the policy, ``[]`` when a view filter drops it (counted)."""
    if config.label_policy == "fill":
        return _fill_claims(view, cand, config, stats)
    k = _corner(view, cand, config, stats)
    if k is None:
        return []
    if config.label_policy == "span":
        return row_cells(view, k // view.cols, cand.box, list(cand.pieces)) or [(k, cand.first, None)]
    return [(k, cand.first, None)]


def _corner(view: View, cand: Candidate, config: AlignConfig, stats: Counter) -> int | None:
    """The local token that sees the entry's bottom-right corner, or None (``unseen``, or a word ``too_tall``)."""
    x0, y0, x1, y1 = cand.box
    x, y = max(x0, x1 - 0.5), max(y0, y1 - 0.5)  # the last pixel inside the box: its bottom-right corner
    k = view.local_at_point(x, y)
    if k is None:
        rx0, ry0, rx1, ry1 = view.region
        if rx0 <= x < rx1 and ry0 <= y < ry1:  # inside the view, in a strip no token sees
            stats["unseen"] += 1
        return None
    if cand.kind == "word" and view.taller_than(k, y1 - y0, config.max_height_cells):
        stats["too_tall"] += 1
        return None
    return k


def _fill_claims(view: View, cand: Candidate, config: AlignConfig, stats: Counter) -> list[Claim]:
    """Every cell at least half inside the entry (``too_small`` when none is and the view shows its centre)."""
    x0, y0, x1, y1 = cand.box
    cells = fill_cells(view, cand.box, cand.rings)
    if not cells:
        rx0, ry0, rx1, ry1 = view.region
        if rx0 <= (x0 + x1) / 2 < rx1 and ry0 <= (y0 + y1) / 2 < ry1:
            stats["too_small"] += 1
        return []
    if cand.kind == "word" and view.taller_than(cells[-1], y1 - y0, config.max_height_cells):
        stats["too_tall"] += 1
        return []
    return [(k, cand.first, None) for k in cells]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def record_size(record: dict[str, Any], records_file: Any = None) -> tuple[int, int]:
    """(width, height) of a record's image: its ``width``/``height`` fields, else the image header (EXIF-rotated)."""
    w, h = record.get("width"), record.get("height")
    if w is None or h is None:
        from dvsft.core.images import image_size
        from dvsft.core.records import image_path

        path = image_path(record, records_file)
        if not path.is_file():
            raise ValueError(f"no width/height and image {path} not found")
        w, h = image_size(path, decode=False)
    if not isinstance(w, int) or not isinstance(h, int) or isinstance(w, bool) or isinstance(h, bool):
        raise ValueError(f"width/height must be integers, got {w!r} x {h!r}")
    return w, h


def pixel_settings(source: FamilySource, min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
    """The ``min_pixels`` / ``max_pixels`` overrides that apply to ``source``'s family (those it has as settings:
    a tiled family cuts tiles and has none)."""
    given = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    return {k: int(v) for k, v in given.items() if v is not None and k in source.spec.defaults}


def align_record(
    record: dict[str, Any],
    source: Any,
    tokenizer: Any = None,
    config: AlignConfig | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    records_file: Any = None,
) -> tuple[Layout, Alignment]:
    """The layout and alignment of one word record for a family name, model directory, processor or
    :class:`~dvsft.models.families.FamilySource` (read once: what :func:`dvsft.align.run.align_file` passes)."""
    width, height = record_size(record, records_file)
    found = family_source(source)
    layout = found.layout(width, height, **pixel_settings(found, min_pixels, max_pixels))
    words = record.get("words") or []
    for i, w in enumerate(words):
        box = w.get("box") if isinstance(w, dict) else None
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise ValueError(f"words[{i}] has no [x0, y0, x1, y1] box")
    return layout, align_words(words, layout, tokenizer, config)
