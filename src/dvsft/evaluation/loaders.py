"""Find and read a benchmark's local files: hub parquet, official JSON, MME folders, word records.

``iter_items(bench, path)`` streams ``EvalItem``s in file order; images stay encoded until a
batch needs them, so multi-GB parquet splits never sit in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dvsft.core.records import IMAGE_PLACEHOLDER, Problem, check_record, image_path
from dvsft.evaluation import layouts
from dvsft.evaluation.items import EvalItem
from dvsft.evaluation.layouts import Ctx
from dvsft.models.families import DEFAULT_FAMILY
from dvsft.sources.qa_json import read_json, squad_paragraphs, vqa_entries

DEFAULT_SPLITS = {
    "docvqa": "validation",
    "infovqa": "validation",
    "chartqa": "test",
    "ocrbench": "test",
    "ocrvqa": "test",
    "textvqa": "validation",
    "mme": "test",
    "squad": "validation",
    "ocr": "test",
}
PARQUET_CONFIG_DIRS = {"docvqa": "DocVQA", "infovqa": "InfographicVQA"}
IMAGE_COLUMNS = {"image"}
META_KEYS = ("category", "question_type", "dataset", "type", "questionId", "question_id", "image_id", "pair", "kind")


def iter_items(
    bench: str,
    path: str | Path,
    split: str | None = None,
    family: str = DEFAULT_FAMILY,
    images: bool = True,
    only_ids: set[str] | None = None,
) -> Iterator[EvalItem]:
    """The items of ``bench`` stored at ``path`` (a file or a downloaded dataset folder).

    ``images=False`` is a fast metadata pass (no image columns read, no image lookups);
    ``only_ids`` keeps just those items.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    split = split or DEFAULT_SPLITS.get(bench, "test")
    for item in _dispatch(bench, path, split, family, images):
        if only_ids is None or item.id in only_ids:
            yield item


def _dispatch(bench: str, path: Path, split: str, family: str, images: bool) -> Iterator[EvalItem]:
    if is_record_source(path):
        return records_items(path, bench)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return records_items(path, bench)
        if suffix == ".parquet":
            return parquet_items(bench, [path], split, family, images)
        if suffix == ".json":
            return json_items(bench, path, split, family, images)
        raise ValueError(f"--data {path}: expected a .jsonl (word records), .parquet or .json file")
    if bench == "ocr":
        return records_items(_single(path, "*.jsonl", "a word-records .jsonl"), bench)
    parquet = find_parquet(path, split, PARQUET_CONFIG_DIRS.get(bench))
    if parquet:
        return parquet_items(bench, parquet, split, family, images)
    if bench == "mme":
        return mme_folder_items(path, images)
    json_file = find_json(bench, path, split)
    if json_file is not None:
        return json_items(bench, json_file, split, family, images)
    jsonl = sorted(path.glob("*.jsonl"))
    if len(jsonl) == 1:
        return records_items(jsonl[0], bench)
    raise ValueError(
        f"--data {path}: found no {split} split of {bench} in a layout dvsft reads "
        f"(hub parquet '{split}-*.parquet', the official JSON release, or one word-records .jsonl); "
        "see docs/evaluation.md"
    )


def _single(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise ValueError(f"--data {folder}: expected exactly one {what} ({pattern}), found {len(found)}")
    return found[0]


# ------------------------------------------------------------------------------------ word records


def is_record_source(path: Path) -> bool:
    """Word records in Parquet (a file or a folder of ``dvsft`` shards) or a ``datasets`` folder."""
    import pyarrow.parquet as pq

    from dvsft.core.record_sources import datasets_dir

    if path.is_dir():
        if datasets_dir(path) is not None:
            return True
        shards = sorted(path.glob("part-*.parquet"))
        return bool(shards) and len(shards) == len(list(path.glob("*.parquet"))) and is_record_source(shards[0])
    if path.suffix.lower() != ".parquet":
        return False
    names = set(pq.ParquetFile(path).schema_arrow.names)
    return "extra" in names and "messages" in names  # dvsft.core.record_table.SCHEMA


def records_items(path: Path, bench: str) -> Iterator[EvalItem]:
    """Word records (``dvsft.core.records``, any source of :mod:`dvsft.core.record_sources`): question from the user
    turn, answer from the assistant turn.

    Optional fields: ``answers`` (list; wins over the assistant turn) and the benchmark fields of
    ``META_KEYS`` (e.g. MME ``category``, OCRBench ``dataset``/``question_type``). For ``ocr`` the
    reference is the assistant turn, else the record's words joined by spaces.
    """
    from dvsft.core.record_sources import iter_entries

    for entry in iter_entries(path):
        n, rec, file = entry.number, entry.record, entry.file
        try:
            if rec is None:
                raise ValueError(str(Problem(str(file), n, None, str(entry.error))))
            yield _record_item(rec, file, n, bench)
        except ValueError as err:
            rid = str(rec["id"]) if rec is not None and isinstance(rec.get("id"), str | int) else f"{file.stem}-{n}"
            yield EvalItem(rid, "", [], [BadSource(str(err))])


class BadSource:
    """The image source of an item that could not be read: loading it raises the reason."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self):
        raise ValueError(self.reason)


def _record_item(rec: dict[str, Any], path: Path, n: int, bench: str) -> EvalItem:
    """One word record as an evaluation item; ValueError names the file and line."""
    where = f"{path}:{n}"
    problems = check_record(rec, path, n, image=False)
    if problems:
        raise ValueError(str(problems[0]))
    images: list[Any]
    if isinstance(rec.get("image_bytes"), bytes):
        images = [rec["image_bytes"]]
    elif "image" in rec:
        images = [image_path(rec, path)]
    elif rec.get("images"):
        images = [image_path({"image": im}, path) for im in rec["images"]]
    else:
        raise ValueError(f"{where}: record has no 'image'")
    user, assistant = _turns(rec.get("messages") or [], where)
    if rec.get("answers"):
        answers = [str(a) for a in rec["answers"]]
    elif assistant is not None:
        answers = [assistant]
    elif bench == "ocr" and rec.get("words") is not None:
        answers = [" ".join(str(w["text"]) for w in rec["words"])]
    else:
        answers = []
    if bench == "ocr" and not answers:
        raise ValueError(f"{where}: OCR records need words or an assistant turn (the reference text)")
    if bench != "ocr" and user is None:
        raise ValueError(f"{where}: record has no user turn to take the question from")
    meta = {k: rec[k] for k in META_KEYS if k in rec}
    return EvalItem(str(rec.get("id", f"{path.stem}-{n}")), user or "", answers, list(images), meta)


def _turns(messages: list[dict[str, Any]], where: str) -> tuple[str | None, str | None]:
    user = assistant = None
    for m in messages:
        content = m.get("content", "")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message content must be a string or a list of parts")
        text = content.replace(IMAGE_PLACEHOLDER, "").strip()
        if m.get("role") == "user" and user is None:
            user = text
        elif m.get("role") == "assistant" and assistant is None:
            assistant = text
    return user, assistant


# ------------------------------------------------------------------------------------ parquet


def find_parquet(folder: Path, split: str, config_dir: str | None = None) -> list[Path]:
    """Parquet shards of ``split``: ``{split}-*.parquet``, ``{split}/*.parquet`` or ``parquet-{split}-*``."""
    found: set[Path] = set()
    for pattern in (f"{split}-*.parquet", f"{split}/*.parquet", f"parquet-{split}-*.parquet", f"{split}.parquet"):
        found.update(folder.rglob(pattern))
    files = sorted(found)
    if config_dir:
        in_config = [f for f in files if config_dir in f.relative_to(folder).parts]
        if in_config or any(p.is_dir() for p in folder.iterdir() if p.name in PARQUET_CONFIG_DIRS.values()):
            files = in_config
    return files


def parquet_items(bench: str, files: list[Path], split: str, family: str, images: bool) -> Iterator[EvalItem]:
    import pyarrow.parquet as pq

    if bench not in layouts.PARQUET_ROWS:
        raise ValueError(f"benchmark {bench!r} has no parquet layout; pass word records (.jsonl)")
    mapper = layouts.PARQUET_ROWS[bench]
    ctx = Ctx(source="", split=split, images=images, family=family)
    for file in files:
        ctx.source = str(file)
        pf = pq.ParquetFile(file)
        names = pf.schema_arrow.names
        columns = names if images else [c for c in names if c not in IMAGE_COLUMNS]
        for batch in pf.iter_batches(batch_size=16, columns=columns):
            for row in batch.to_pylist():
                yield from mapper(row, ctx)
                ctx.index += 1


# ------------------------------------------------------------------------------------ official JSON

JSON_NAMES = {  # official file names per benchmark and split (substring match, lowercase)
    "docvqa": {"validation": ["val_v1.0"], "test": ["test_v1.0"], "train": ["train_v1.0"]},
    "infovqa": {"validation": ["_val_"], "test": ["_test_"], "train": ["_train_"]},
    "chartqa": {"test": ["test_human", "test_augmented"], "validation": ["val_human", "val_augmented"]},
    "ocrbench": {"test": ["ocrbench"]},
    "textvqa": {"validation": ["textvqa_0.5.1_val"], "train": ["textvqa_0.5.1_train"], "test": ["textvqa_0.5.1_test"]},
    "ocrvqa": {"test": ["dataset"], "validation": ["dataset"], "train": ["dataset"]},
    "squad": {"validation": ["dev-v"], "train": ["train-v"]},
}


def find_json(bench: str, folder: Path, split: str) -> Path | list[Path] | None:
    keys = JSON_NAMES.get(bench, {}).get(split, [])
    hits = sorted(p for p in folder.rglob("*.json") if any(k in p.name.lower() for k in keys))
    if bench == "chartqa":
        return hits or None  # human and augmented files together
    if len(hits) > 1:
        raise ValueError(
            f"--data {folder}: several {split} files for {bench}: {', '.join(map(str, hits))}; pass one as --data"
        )
    return hits[0] if hits else None


def json_items(bench: str, files: Path | list[Path], split: str, family: str, images: bool) -> Iterator[EvalItem]:
    for file in files if isinstance(files, list) else [files]:
        yield from _json_file_items(bench, file, split, family, images)


def _json_file_items(bench: str, file: Path, split: str, family: str, images: bool) -> Iterator[EvalItem]:
    data = read_json(file)
    d = file.parent
    roots = {
        "docvqa": [d, d.parent],
        "infovqa": [d, d / "infographicsvqa_images", d.parent / "infographicsvqa_images", d / "images"],
        "chartqa": [d / "png", d, d.parent / "png"],
        "ocrbench": [d, d / "OCRBench_Images", d.parent / "OCRBench_Images"],
        "textvqa": [
            d / "train_images",
            d / "train_val_images" / "train_images",
            d / "images",
            d,
            d.parent / "train_images",
        ],
        "ocrvqa": [d / "images", d],
    }.get(bench, [d])
    ctx = Ctx(source=str(file), split=split, images=images, image_roots=roots, family=family)
    if bench == "ocrvqa":
        if not isinstance(data, dict):
            raise ValueError(f"{file}: OCR-VQA dataset.json must map image ids to entries")
        for image_id, entry in data.items():
            yield from layouts.ocrvqa_json(str(image_id), entry, ctx)
            ctx.index += 1
        return
    if bench == "squad":
        for paragraph in squad_paragraphs(data, file):
            yield from layouts.squad_json(paragraph, ctx)
        return
    if bench in ("docvqa", "infovqa"):
        for entry in vqa_entries(data, bench, file):
            yield from layouts.vqa_json(entry, ctx)
            ctx.index += 1
        return
    mapper = {
        "chartqa": layouts.chartqa_json,
        "ocrbench": layouts.ocrbench_json,
        "textvqa": layouts.textvqa_json,
    }.get(bench)
    if mapper is None:
        raise ValueError(f"{file}: benchmark {bench!r} has no official JSON layout; pass word records (.jsonl)")
    for entry in _entries(data, file, bench):
        yield from mapper(entry, ctx)
        ctx.index += 1


def _entries(data: Any, file: Path, bench: str) -> list[dict]:
    entries = data.get("data") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{file}: expected a list of {bench} entries (or {{'data': [...]}})")
    return entries


# ------------------------------------------------------------------------------------ MME folders


def mme_folder_items(root: Path, images: bool = True) -> Iterator[EvalItem]:
    """The official MME release: one folder per category, each image with a ``.txt`` of
    ``question<TAB>answer`` lines, side by side or as ``images/`` + ``questions_answers_YN/``."""
    categories = sorted(p for p in root.iterdir() if p.is_dir())
    found = False
    for cat_dir in categories:
        qa_dir = cat_dir / "questions_answers_YN"
        image_dir = cat_dir / "images" if qa_dir.is_dir() else cat_dir
        qa_dir = qa_dir if qa_dir.is_dir() else cat_dir
        ctx = Ctx(source=str(cat_dir), split="test", images=True, image_roots=[image_dir])
        for txt in sorted(qa_dir.glob("*.txt")):
            found = True
            lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            image = ctx.find_image_stem(txt.stem, str(txt))  # the name (with suffix) is part of the id
            pair = f"{cat_dir.name}/{image[0].name}"
            image = image if images else []
            for k, line in enumerate(lines):
                parts = line.split("\t")
                if len(parts) < 2:
                    raise ValueError(f"{txt}:{k + 1}: expected 'question<TAB>answer'")
                meta = {"category": cat_dir.name, "pair": pair}
                yield EvalItem(f"{pair}#{k}", parts[0], [parts[1].strip()], image, meta)
    if not found:
        raise ValueError(f"--data {root}: no MME category folders with question .txt files (see docs/evaluation.md)")
