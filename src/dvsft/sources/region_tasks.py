"""Region tasks from OCR word boxes: GranViT's Bbox2Caption / Caption2Bbox and FineViT's bbox-to-ocr / ocr-to-bbox.

Words are put in reading order (lines by y, words of a line by x); a phrase is a run of at most
``max_words`` consecutive words of one line. Each task record is the source word record (same image
and words, so DV-SFT vision labels still apply) with new ``messages`` and a ``tasks`` list naming
what was asked::

    {"id": "doc1#caption2bbox0", "image": ..., "words": [...],
     "messages": [{"role": "user", "content": "<image>Please provide ..."}, {"role": "assistant", "content": "[...]"}],
     "tasks": [{"name": "caption2bbox", "box": [x0, y0, x1, y1], "text": "..."}]}

Boxes in prompts and answers use a :class:`BoxCodec` (GranViT's relative 3-decimal form by default, or a
Qwen family's native grounding form) whose ``parse`` inverts ``format``.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.core.outputs import check_file, refuse_inputs
from dvsft.core.records import IMAGE_PLACEHOLDER
from dvsft.models.families import families, family_spec
from dvsft.models.geometry import grid_for

# GranViT (section 3, "Data Reformatting"), verbatim; the bracketed placeholders are filled in.
BBOX2CAPTION = (
    "Describe the content contained within the normalized bounding box coordinates {bbox} in no more than 10 words."
)
CAPTION2BBOX = "Please provide the bounding box coordinate of the region this sentence describes: {caption}"
# FineViT names the tasks (bbox-to-ocr, ocr-to-bbox) but prints no prompt: our own wording.
BBOX2OCR = "Read the text inside the bounding box {bbox}. Answer with the text only."
OCR2BBOX = 'Give the bounding box of the text "{caption}" in the image.'


@dataclass(frozen=True)
class TaskSpec:
    template: str
    answers_box: bool  # True: the question holds the text and the answer is a box


TASKS: dict[str, TaskSpec] = {
    "bbox2caption": TaskSpec(BBOX2CAPTION, False),
    "caption2bbox": TaskSpec(CAPTION2BBOX, True),
    "bbox2ocr": TaskSpec(BBOX2OCR, False),
    "ocr2bbox": TaskSpec(OCR2BBOX, True),
}
GRANVIT_TASKS = ("bbox2caption", "caption2bbox")
FINEVIT_TASKS = ("bbox2ocr", "ocr2bbox")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """A word or phrase: its text and the union box of its words (original-image pixels)."""

    text: str
    box: Box
    n_words: int


# ---------------------------------------------------------------- reading order and phrases


def _clean_words(words: Iterable[dict[str, Any]], width: float, height: float) -> list[tuple[str, Box]]:
    out = []
    for w in words:
        text = " ".join(str(w.get("text", "")).split())
        x0, y0, x1, y1 = (float(v) for v in w["box"])
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
        if text and x1 > x0 and y1 > y0:
            out.append((text, (x0, y0, x1, y1)))
    return out


def reading_lines(words: Sequence[dict[str, Any]], width: float, height: float) -> list[list[tuple[str, Box]]]:
    """Group words into lines (vertical overlap of at least half the smaller height), top to bottom, left to right."""
    items = sorted(_clean_words(words, width, height), key=lambda t: ((t[1][1] + t[1][3]) / 2, t[1][0]))
    lines: list[dict[str, Any]] = []
    for text, box in items:
        h = box[3] - box[1]
        target = None
        for line in reversed(lines[-4:]):  # only recent lines can overlap a word further down
            overlap = min(box[3], line["y1"]) - max(box[1], line["y0"])
            if overlap >= 0.5 * min(h, line["y1"] - line["y0"]):
                target = line
                break
        if target is None:
            lines.append({"y0": box[1], "y1": box[3], "words": [(text, box)]})
        else:
            target["words"].append((text, box))
            target["y0"], target["y1"] = min(target["y0"], box[1]), max(target["y1"], box[3])
    lines.sort(key=lambda line: ((line["y0"] + line["y1"]) / 2, min(b[0] for _, b in line["words"])))
    return [sorted(line["words"], key=lambda t: t[1][0]) for line in lines]


def _union(boxes: Sequence[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _balanced_chunks(n: int, max_size: int) -> list[tuple[int, int]]:
    parts = max(1, math.ceil(n / max_size))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def phrases(
    words: Sequence[dict[str, Any]], width: float, height: float, max_words: int = 10, max_gap: float = 2.5
) -> list[Region]:
    """Runs of at most ``max_words`` consecutive words of a line, in reading order.

    A horizontal gap wider than ``max_gap`` line heights (a column break) also ends a run; long runs are
    cut into near-equal chunks so no phrase is a one-word tail.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    out = []
    for line in reading_lines(words, width, height):
        runs: list[list[tuple[str, Box]]] = [[line[0]]]
        for prev, cur in zip(line, line[1:], strict=False):
            line_h = max(prev[1][3] - prev[1][1], cur[1][3] - cur[1][1])
            if cur[1][0] - prev[1][2] > max_gap * line_h:
                runs.append([])
            runs[-1].append(cur)
        for run in runs:
            for a, b in _balanced_chunks(len(run), max_words):
                chunk = run[a:b]
                out.append(Region(" ".join(t for t, _ in chunk), _union([bx for _, bx in chunk]), len(chunk)))
    return out


def word_regions(words: Sequence[dict[str, Any]], width: float, height: float) -> list[Region]:
    """Every word as its own region, in reading order."""
    return [Region(t, b, 1) for line in reading_lines(words, width, height) for t, b in line]


def regions_of(record: dict[str, Any], level: str = "phrase", max_words: int = 10) -> list[Region]:
    """The record's regions at ``level`` (``word`` or ``phrase``)."""
    w, h = record["width"], record["height"]
    if level == "word":
        return word_regions(record.get("words") or [], w, h)
    if level == "phrase":
        return phrases(record.get("words") or [], w, h, max_words)
    raise ValueError(f"unknown region level {level!r}; use 'word' or 'phrase'")


def caption_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def unique_regions(regions: Sequence[Region]) -> tuple[list[Region], int]:
    """Drop every region whose caption occurs more than once in the image (ambiguous for text-to-box)."""
    counts = Counter(caption_key(r.text) for r in regions)
    kept = [r for r in regions if counts[caption_key(r.text)] == 1]
    return kept, len(regions) - len(kept)


# ---------------------------------------------------------------- coordinate formats

# GranViT's relative boxes, and the box format of each family whose module declares one (FamilySpec.box_format)
COORD_KINDS = ("relative", *(name for name in families() if family_spec(name).box_format))
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)")


@dataclass
class BoxCodec:
    """Writes boxes into prompts/answers and parses them back (to original-image pixels).

    ``kind`` is ``relative`` (GranViT: ``[x0, y0, x1, y1]`` as fractions of the image size, 3 decimals) or a
    family, whose module's ``box_format`` says how its checkpoints write a box:

    - ``tagged-thousandths`` (Qwen2-VL): ``<|box_start|>(x0,y0),(x1,y1)<|box_end|>`` with integers in 0..1000.
    - ``resized-pixels`` (Qwen2.5-VL): ``[x0, y0, x1, y1]`` integer pixels of the *resized* image (``source``
      (default: the family) and ``min_pixels`` / ``max_pixels`` pick the resize, as for
      :func:`dvsft.models.geometry.grid_for`).
    - ``thousandths`` (Qwen3-VL): ``[x0, y0, x1, y1]`` integers in 0..1000 relative to the image.
    """

    kind: str = "relative"
    source: Any = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    decimals: int = 3
    _scales: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict, repr=False)
    style: str = field(init=False, default="relative")  # relative, or the family's box_format

    def __post_init__(self) -> None:
        if self.kind not in COORD_KINDS:
            raise ValueError(f"unknown coordinate format {self.kind!r}; known: {', '.join(COORD_KINDS)}")
        self.style = self.kind if self.kind == "relative" else family_spec(self.kind).box_format

    def _scale(self, width: float, height: float) -> tuple[float, float]:
        """Multipliers from original pixels to the numbers written."""
        if self.style == "relative":
            return 1.0 / width, 1.0 / height
        if self.style in ("thousandths", "tagged-thousandths"):
            return 1000.0 / width, 1000.0 / height
        key = (int(width), int(height))
        if key not in self._scales:
            g = grid_for(self.source or self.kind, key[0], key[1], self.min_pixels, self.max_pixels)
            self._scales[key] = (g.scale_x, g.scale_y)
        return self._scales[key]

    def quantize(self, box: Sequence[float], width: float, height: float) -> list[float] | list[int]:
        """The four numbers ``format`` writes for ``box``."""
        sx, sy = self._scale(width, height)
        raw = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
        if self.style == "relative":
            return [round(min(1.0, max(0.0, v)), self.decimals) for v in raw]
        hi = [1000, 1000] if self.style != "resized-pixels" else [round(width * sx), round(height * sy)]
        return [min(hi[i % 2], max(0, round(v))) for i, v in enumerate(raw)]

    def format(self, box: Sequence[float], width: float, height: float) -> str:
        q = self.quantize(box, width, height)
        if self.style == "tagged-thousandths":
            return f"<|box_start|>({q[0]},{q[1]}),({q[2]},{q[3]})<|box_end|>"
        return "[" + ", ".join(str(v) for v in q) + "]"

    def parse_numbers(self, text: str) -> list[float] | None:
        """The first four numbers of ``text`` (``bbox_2d`` keys ignored); None when there are fewer."""
        nums = _NUMBER.findall(text.replace("bbox_2d", ""))
        return [float(v) for v in nums[:4]] if len(nums) >= 4 else None

    def parse(self, text: str, width: float, height: float) -> Box | None:
        """The box written in ``text``, in original-image pixels; None when no box can be read."""
        nums = self.parse_numbers(text)
        if nums is None:
            return None
        sx, sy = self._scale(width, height)
        return (nums[0] / sx, nums[1] / sy, nums[2] / sx, nums[3] / sy)


# ---------------------------------------------------------------- task records


def box_codec(
    coords: str, model: str | Path | None = None, min_pixels: int | None = None, max_pixels: int | None = None
) -> BoxCodec:
    """The codec of ``coords``; resized-pixel boxes follow ``model``'s resize rule (default: the family's)."""
    return BoxCodec(
        coords, source=str(model) if model is not None else None, min_pixels=min_pixels, max_pixels=max_pixels
    )


@dataclass
class TaskConfig:
    tasks: tuple[str, ...] = GRANVIT_TASKS
    level: str = "phrase"  # word | phrase
    max_words: int = 10
    codec: BoxCodec = field(default_factory=BoxCodec)
    max_per_image: int | None = None  # regions sampled per image (None: all)
    turns: int = 1  # QA pairs per output record (multi-turn chat over one image)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")


def question_answer(task: str, region: Region, codec: BoxCodec, width: float, height: float) -> tuple[str, str]:
    spec = TASKS[task]
    coords = codec.format(region.box, width, height)
    if spec.answers_box:
        return spec.template.format(caption=region.text), coords
    return spec.template.format(bbox=coords), region.text


def _check_record(record: dict[str, Any], where: str) -> None:
    for key in ("width", "height", "words", "image"):
        if key not in record:
            raise ValueError(f"{where}: record {record.get('id', '?')!r} has no {key!r} field")
    for i, w in enumerate(record["words"]):
        box = w.get("box") if isinstance(w, dict) else None
        if not (isinstance(box, (list, tuple)) and len(box) == 4):
            raise ValueError(f"{where}: record {record.get('id', '?')!r} word {i} has no [x0, y0, x1, y1] box")


def task_records(
    record: dict[str, Any], config: TaskConfig, rng: random.Random | None = None, where: str = "records"
) -> tuple[list[dict[str, Any]], Counter]:
    """The region-task records of one word record, and counts (``regions``, ``duplicates``, ``qa``)."""
    _check_record(record, where)
    rng = rng or random.Random(config.seed)
    stats: Counter = Counter()
    regions = regions_of(record, config.level, config.max_words)
    stats["regions"] += len(regions)
    regions, dup = unique_regions(regions)
    stats["duplicates"] += dup
    if config.max_per_image is not None and len(regions) > config.max_per_image:
        picked = sorted(rng.sample(range(len(regions)), config.max_per_image))
        regions = [regions[i] for i in picked]
    pairs = []
    for region in regions:
        for task in config.tasks:
            pairs.append((task, region))
    rng.shuffle(pairs)
    base = {k: v for k, v in record.items() if k not in ("messages", "tasks")}
    rid = str(record.get("id", "record"))
    out = []
    w, h = record["width"], record["height"]
    for start in range(0, len(pairs), config.turns):
        chunk = pairs[start : start + config.turns]
        messages, tasks = [], []
        for i, (task, region) in enumerate(chunk):
            q, a = question_answer(task, region, config.codec, w, h)
            messages.append({"role": "user", "content": (IMAGE_PLACEHOLDER if i == 0 else "") + q})
            messages.append({"role": "assistant", "content": a})
            tasks.append({"name": task, "box": [round(v, 2) for v in region.box], "text": region.text})
        name = chunk[0][0] if len(chunk) == 1 else "mixed"
        out.append({**base, "id": f"{rid}#{name}{start // config.turns}", "messages": messages, "tasks": tasks})
        stats["qa"] += len(chunk)
    return out, stats


def build_task_file(
    records_file: str | Path,
    out_file: str | Path,
    config: TaskConfig,
    limit: int | None = None,
    overwrite: bool = False,
) -> Counter:
    """Write the region-task records of every record of ``records_file`` to ``out_file`` (images re-pointed).
    ``out_file`` may not be the input, and an existing one is replaced only with ``overwrite``."""
    from dvsft.core.records import image_path, read_records, write_jsonl

    records_file, out_file = Path(records_file), Path(out_file)
    if not records_file.is_file():
        raise ValueError(f"{records_file}: no such records file")
    refuse_inputs([out_file], [records_file])
    check_file(out_file, overwrite)
    rng = random.Random(config.seed)
    totals: Counter = Counter()
    out_dir = out_file.resolve().parent

    def rows():
        for n, record in enumerate(read_records(records_file)):
            if limit is not None and n >= limit:
                break
            record = dict(record)
            record["image"] = os.path.relpath(image_path(record, records_file).resolve(), out_dir)
            made, stats = task_records(record, config, rng, where=str(records_file))
            totals.update(stats)
            totals["images"] += 1
            yield from made

    totals["records"] = write_jsonl(out_file, rows())
    return totals
