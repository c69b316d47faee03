"""COCO / LVIS instance annotations to region records: ``dvsft prepare coco`` (issue #26).

One record per annotated image, its objects as regions in the record's ``words`` (the aligner's region entries,
docs/records.md): ``{"text": category name, "box": [x0, y0, x1, y1], "kind": "object", "polygon": [[x, y, ...]]}``
(COCO's ``bbox`` ``[x, y, w, h]`` clipped to the image; ``polygon`` where the segmentation is a polygon list; an RLE
mask keeps its box alone). LVIS names are written as words (``bat_(animal)`` -> ``bat``). The conversation comes
from ``conversations`` (LLaVA ``conversations`` / ShareGPT ``messages`` + ``images``, :mod:`dvsft.sources.formats`),
joined by image file name (several samples of one image become the turns of one conversation), else it is the
templated :data:`LISTING_QUESTION` answered by the image's object names. Train with ``dvsft align --label-policy
fill`` (or the training config's ``align_label_policy: fill``).

Bad annotations (crowd regions, boxes outside the image, malformed polygons, unknown images or categories), images
that are missing or do not match their size, and unreadable conversation samples are left out, each with its
reason, into ``<out stem>.errors.jsonl`` (``file``, ``line``, ``id``, ``reason``); the run goes on. The output
folder follows :mod:`dvsft.core.outputs` (marked as prepare's; ``overwrite`` for a folder of other files).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.core.outputs import add_to_marker, read_marker, refuse_inputs, start_folder
from dvsft.core.record_table import DEFAULT_ROWS_PER_SHARD, check_format, write_records
from dvsft.core.records import IMAGE_PLACEHOLDER, Problem, check_record, write_jsonl
from dvsft.sources.formats import SampleError, normalise_sample, read_samples
from dvsft.sources.image_to_label import errors_path
from dvsft.sources.qa_json import read_json

LISTING_QUESTION = "What objects are in the image?"
OBJECT = "object"  # the kind of every region written here


@dataclass
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int
    path: Path  # where the image is looked for under --images


@dataclass
class CocoStats:
    out: Path
    records: int = 0
    regions: int = 0  # in the records written
    polygons: int = 0  # of them with a polygon
    box_only: int = 0  # of them without (an RLE mask or no segmentation: the box alone)
    conversations: int = 0  # conversation samples joined to an image
    unjoined: int = 0  # conversation samples whose image the annotations do not hold
    problems: list[Problem] = field(default_factory=list)
    errors: Path | None = None  # the errors file, when there were problems


def prepare_coco(
    instances: str | Path,
    images: str | Path,
    out_dir: str | Path,
    conversations: str | Path | None = None,
    fmt: str = "jsonl",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
) -> CocoStats:
    """Write ``out_dir/<instances stem>.jsonl`` (``fmt="parquet"``: a folder of shards) from a COCO or LVIS instances
    file and its image folder; see the module docstring. A file that is not an instances file is a ``ValueError``;
    bad entries are reported in :attr:`CocoStats.problems` and the errors file."""
    instances, images, out_dir = Path(instances), Path(images), Path(out_dir)
    for given in (instances, images, conversations):
        if given is not None and not Path(given).exists():
            raise FileNotFoundError(f"{given}: no such file or folder")
    stem = instances.stem
    out = out_dir / (stem if check_format(fmt) == "parquet" else f"{stem}.jsonl")
    stats = CocoStats(out=out)
    data = read_json(instances)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"{instances}: not a COCO / LVIS instances file (expected 'images' and 'annotations' lists)")
    refuse_inputs([out_dir], [instances, images, conversations])
    start_folder(out_dir, "prepare", overwrite)
    names = category_names(data, instances)
    table = image_table(data, images, instances, stats.problems)
    regions = image_regions(data, names, table, instances, stats)
    talks = read_conversations(Path(conversations), stats) if conversations is not None else None
    records_dir = out if fmt == "parquet" else out_dir
    rows = list(image_records(table, regions, talks, records_dir, instances, stats))
    if talks is not None:
        annotated = {Path(image.file_name).name for image in table.values()}
        stats.unjoined = sum(len(v) for name, v in talks.items() if name not in annotated)
    stats.records = write_records(out, rows, fmt, rows_per_shard, "prepare", overwrite=True)
    written = [out / f for f in (read_marker(out) or ("", []))[1]] if fmt == "parquet" else [out]
    errors = errors_path(out)
    if stats.problems:
        stats.errors = errors
        write_jsonl(errors, (p.row() for p in stats.problems))
        written.append(errors)
    elif errors.name in (read_marker(out_dir) or ("", []))[1]:
        errors.unlink(missing_ok=True)  # a previous run's problems, not this one's
    add_to_marker(out_dir, "prepare", written)
    return stats


def category_text(name: str) -> str:
    """A category name as words: LVIS' ``"bat_(animal)"`` -> ``"bat"``, ``"traffic_light"`` -> ``"traffic light"``."""
    return re.sub(r"_?\([^)]*\)$", "", name).replace("_", " ").strip()


def category_names(data: dict[str, Any], file: Path) -> dict[Any, str]:
    """Category id -> name; categories without an id or a name are a ``ValueError`` (the file is not usable)."""
    names = {}
    for k, cat in enumerate(data.get("categories") or []):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise ValueError(f"{file}: categories[{k}] needs an id and a name, got {str(cat)[:80]}")
        names[cat["id"]] = category_text(cat["name"])
    return names


def image_table(data: dict[str, Any], images: Path, file: Path, problems: list[Problem]) -> dict[Any, CocoImage]:
    """Image id -> :class:`CocoImage`. COCO names the file (``file_name``), LVIS its URL (``coco_url``: the file is
    looked for under ``images`` and under the URL's folder there, e.g. ``val2017/``)."""
    table = {}
    for k, entry in enumerate(data["images"]):
        image = coco_image(entry, images)
        if image is None:
            problems.append(
                Problem(str(file), None, f"images[{k}]", "needs id, file_name (or coco_url), width, height")
            )
        else:
            table[image.id] = image
    return table


def coco_image(entry: Any, images: Path) -> CocoImage | None:
    """One ``images`` entry (None when it lacks an id, a file name or URL, or a positive integer size)."""
    if not isinstance(entry, dict):
        return None
    url = entry.get("coco_url")
    name = entry.get("file_name") or (url.rsplit("/", 1)[-1] if isinstance(url, str) else None)
    iid, width, height = entry.get("id"), entry.get("width"), entry.get("height")
    sizes_ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))
    if iid is None or not isinstance(name, str) or not name or not sizes_ok:
        return None
    candidates = [images / name, images / Path(name).name]
    if isinstance(url, str) and url.count("/") >= 2:
        candidates.append(images / url.rsplit("/", 2)[-2] / Path(name).name)
    return CocoImage(iid, name, width, height, next((c for c in candidates if c.exists()), candidates[0]))


def image_regions(
    data: dict[str, Any], names: dict[Any, str], table: dict[Any, CocoImage], file: Path, stats: CocoStats
) -> dict[Any, list[dict[str, Any]]]:
    """Image id -> its regions, in the file's order; each annotation left out is a problem with its reason."""
    regions: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for k, ann in enumerate(data["annotations"]):
        where = f"annotation {ann.get('id', f'#{k}')}" if isinstance(ann, dict) else f"annotation #{k}"
        try:
            if not isinstance(ann, dict) or ann.get("image_id") not in table:
                raise ValueError(f"image_id {ann.get('image_id') if isinstance(ann, dict) else None} is not in images")
            image = table[ann["image_id"]]
            regions[image.id].append(region_of(ann, names, image))
        except ValueError as err:
            stats.problems.append(Problem(str(file), None, where, str(err)))
    return regions


def region_of(ann: dict[str, Any], names: dict[Any, str], image: CocoImage) -> dict[str, Any]:
    """The region entry of one annotation; a ``ValueError`` says why it cannot be one."""
    if ann.get("iscrowd"):
        raise ValueError("crowd annotation (a group of objects, not one object)")
    if ann.get("category_id") not in names:
        raise ValueError(f"category_id {ann.get('category_id')} is not in categories")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite(v) for v in bbox)):
        raise ValueError(f"bbox must be [x, y, w, h] numbers, got {str(bbox)[:60]}")
    x, y, w, h = bbox
    box = [max(0.0, float(x)), max(0.0, float(y)), min(float(image.width), x + w), min(float(image.height), y + h)]
    if w <= 0 or h <= 0 or box[0] >= box[2] or box[1] >= box[3]:
        raise ValueError(f"bbox {bbox} is empty or outside the {image.width}x{image.height} image")
    region: dict[str, Any] = {"text": names[ann["category_id"]], "box": box, "kind": OBJECT}
    polygon = polygon_of(ann.get("segmentation"))
    if polygon is not None:
        region["polygon"] = polygon
    return region


def polygon_of(segmentation: Any) -> list[list[float]] | None:
    """COCO's polygon list (rings of flat ``x, y`` lists) as floats; None for an RLE mask (``{"counts", "size"}``)
    or no segmentation; a ``ValueError`` for a malformed polygon."""
    if segmentation is None or isinstance(segmentation, dict) or segmentation == []:
        return None
    if not isinstance(segmentation, list) or not all(isinstance(ring, list) for ring in segmentation):
        raise ValueError(f"segmentation is neither a polygon list nor an RLE mask: {str(segmentation)[:60]}")
    for ring in segmentation:
        if len(ring) < 6 or len(ring) % 2 or not all(_finite(v) for v in ring):
            raise ValueError(f"polygon ring of {len(ring)} values (needs >= 3 finite x, y pairs)")
    return [[float(v) for v in ring] for ring in segmentation]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def read_conversations(path: Path, stats: CocoStats) -> dict[str, list[list[dict[str, str]]]]:
    """Image file name -> the conversations of its samples, in file order (LLaVA / ShareGPT JSON or JSONL)."""
    talks: dict[str, list[list[dict[str, str]]]] = defaultdict(list)
    for k, raw in enumerate(read_samples(path)):
        sid = raw.get("id") if isinstance(raw, dict) else None
        try:
            _, image, messages = normalise_sample(raw)
            if messages is None:
                raise SampleError("bad sample", "no conversations or messages")
        except SampleError as err:
            stats.problems.append(Problem(str(path), None, str(sid if sid is not None else f"#{k}"), str(err)))
            continue
        talks[Path(image).name].append(messages)
    return talks


def joined_messages(conversations: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """Several conversations about one image as one: the first whole, the others' turns after it without their
    image placeholder or system turn (the image appears once)."""
    messages = [dict(m) for m in conversations[0]]
    for later in conversations[1:]:
        for m in later:
            if m["role"] != "system":
                text = m["content"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
                messages.append({"role": m["role"], "content": text.strip()})
    return messages


def listing_messages(regions: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The templated question and its answer: the image's object names, each once, in reading order of their
    first box (top to bottom, then left to right)."""
    ordered = sorted(regions, key=lambda r: (r["box"][1], r["box"][0]))
    names = list(dict.fromkeys(r["text"] for r in ordered))
    return [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{LISTING_QUESTION}"},
        {"role": "assistant", "content": ", ".join(names) + "."},
    ]


def image_records(
    table: dict[Any, CocoImage],
    regions: dict[Any, list[dict[str, Any]]],
    talks: dict[str, list[list[dict[str, str]]]] | None,
    records_dir: Path,
    file: Path,
    stats: CocoStats,
) -> Iterator[dict[str, Any]]:
    """The records, in the file's image order: an image needs a conversation (with ``talks``) or a region (without)
    and must read at its stated size (:func:`dvsft.core.records.check_record`), else it is a problem."""
    for image in table.values():
        name = Path(image.file_name).name
        found = regions.get(image.id, [])
        if talks is not None and name not in talks:
            continue  # an annotated image the conversation data does not use
        if talks is None and not found:
            stats.problems.append(Problem(str(file), None, f"image {image.id}", "no usable annotation"))
            continue
        messages = joined_messages(talks[name]) if talks is not None else listing_messages(found)
        record = {
            "id": f"coco-{image.id}",
            "image": os.path.relpath(image.path.resolve(), records_dir.resolve()),
            "width": image.width,
            "height": image.height,
            "words": found,
            "messages": messages,
        }
        problems = check_record(record, records_dir / "records.jsonl", image=True, decode=False)
        if problems:
            stats.problems += [Problem(str(file), None, f"image {image.id}", p.reason) for p in problems]
            continue
        stats.conversations += len(talks[name]) if talks is not None else 0
        stats.regions += len(found)
        stats.polygons += sum("polygon" in r for r in found)
        stats.box_only += sum("polygon" not in r for r in found)
        yield record
