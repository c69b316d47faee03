"""Converters from the public DocVQA / InfographicVQA / SQuAD layouts to records with conversations.

Output (no OCR yet): DocVQA/InfoVQA give ``{"id", "image", "messages"}`` records for ``dvsft label``; SQuAD gives
``{"id", "title", "text", "messages"}`` documents for ``dvsft render``. Following the paper (appendix A.1), a
random subset of QA pairs is kept per image: 1 by default, 2 for InfoVQA; several pairs become the turns of one
conversation (so each image's vision labels appear once) unless ``multi_turn=False``. With ``instructions``
(default) every DocVQA/InfoVQA question is followed by a random format-control instruction (paper appendix
A.1, :mod:`dvsft.sources.instructions`), seeded per image; SQuAD documents get theirs from ``dvsft render``.

Layouts: the lmms-lab parquet files (``questionId, question, answers, image{bytes,path}, ...``; images are
written to ``DIR/images/*.png``), the official JSON releases (DocVQA ``{"data": [{"questionId", "question",
"image", "answers"}]}``, InfoVQA the same with ``image_local_name``), SQuAD v1.1/v2.0 JSON.

The output folder is marked as prepare's (:mod:`dvsft.core.outputs`): a folder of other files, or one holding
the input, is refused unless ``overwrite``; a rerun replaces the files prepare writes and nothing else.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.core.outputs import add_to_marker, read_marker, refuse_inputs, start_folder
from dvsft.core.record_table import DEFAULT_ROWS_PER_SHARD, check_format, write_records
from dvsft.core.records import IMAGE_PLACEHOLDER
from dvsft.sources.qa_json import read_json, read_squad_file, vqa_entries

DATASETS = ("docvqa", "infovqa", "squad")
DEFAULT_QA_PER_IMAGE = {"docvqa": 1, "infovqa": 2, "squad": 1}
IMAGE_DIRS = ("", "images", "documents", "infographicsvqa_images", "infographicVQA_images")


@dataclass
class QA:
    qid: str
    question: str
    answer: str


@dataclass
class PrepareStats:
    out: Path
    records: int = 0
    images: int = 0  # distinct images (documents for SQuAD)
    qa_total: int = 0  # usable QA pairs seen
    qa_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    missing_images: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def prepare_dataset(
    dataset: str,
    path: str | Path,
    out_dir: str | Path,
    *,
    qa_per_image: int | None = None,
    split: str | None = None,
    seed: int = 0,
    multi_turn: bool = True,
    image_root: str | Path | None = None,
    instructions: bool = True,
    fmt: str = "jsonl",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
) -> PrepareStats:
    """Convert ``path`` (file or folder in one of the layouts) into ``out_dir/<dataset>[_<split>].jsonl``.

    ``qa_per_image``: QA pairs kept per image (0 = all), default 1 (2 for InfoVQA), chosen at random with
    ``seed`` (stable per image, independent of file order). ``fmt="parquet"`` writes the folder
    ``out_dir/<dataset>[_<split>]/`` of Parquet shards (``rows_per_shard`` records each) instead.
    ``overwrite`` lets it write into a folder of files prepare did not write (none of them is deleted).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    path, out_dir = Path(path), Path(out_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    n = DEFAULT_QA_PER_IMAGE[dataset] if qa_per_image is None else qa_per_image
    if n < 0:
        raise ValueError("--qa-per-image must be >= 0 (0 keeps all)")
    name = f"{dataset}{'_' + split if split else ''}"
    out = out_dir / (name if check_format(fmt) == "parquet" else f"{name}.jsonl")
    records_dir = out if fmt == "parquet" else out_dir
    stats = PrepareStats(out=out)
    refuse_inputs([out_dir], [path, image_root])
    start_folder(out_dir, "prepare", overwrite)
    written: list[Path] = []
    if dataset == "squad":
        groups = _squad_groups(_find_file(path, ".json", split), stats)
        rows = _build_rows(dataset, groups, n, seed, multi_turn, stats, image_key=None)
    else:
        parquet = _parquet_files(path, split)
        if parquet:
            groups = _parquet_groups(parquet, out_dir / "images", stats)
            written = [g["image"] for g in groups.values()]
        else:
            json_file = _find_file(path, ".json", split)
            groups = _json_groups(json_file, dataset, image_root, stats)
        rows = _build_rows(
            dataset, groups, n, seed, multi_turn, stats, "image", out_dir=records_dir, instructions=instructions
        )
    stats.records = write_records(out, rows, fmt, rows_per_shard, "prepare", overwrite=True)
    shards = [out / f for f in (read_marker(out) or ("", []))[1]] if fmt == "parquet" else [out]
    add_to_marker(out_dir, "prepare", [*shards, *written])
    return stats


# ---- layouts -----------------------------------------------------------------------------------------------


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    files = [path] if path.is_file() and path.suffix == ".parquet" else sorted(path.rglob("*.parquet"))
    if split and path.is_dir() and files:
        files = [
            f
            for f in files
            if f.name.startswith(f"{split}-") or f.name.startswith(f"{split}.") or split in f.parent.parts
        ]
        if not files:
            raise FileNotFoundError(
                f"{path}: no parquet files for split {split!r} (expected names like {split}-00000-of-00001.parquet)"
            )
    return files


def _find_file(path: Path, suffix: str, split: str | None) -> Path:
    if path.is_file():
        return path
    files = sorted(p for p in path.rglob(f"*{suffix}") if not p.name.startswith("."))
    if split:
        files = [f for f in files if split.lower() in f.name.lower()] or files
    if len(files) != 1:
        found = ", ".join(str(f) for f in files[:10]) or "none"
        hint = " (use --split or give the file)" if files else ""
        raise FileNotFoundError(f"{path}: expected one {suffix} file, found {len(files)}: {found}{hint}")
    return files[0]


def _first_answer(answers: Any) -> str | None:
    if isinstance(answers, str):
        return answers.strip() or None
    for a in answers or []:
        text = a.get("text") if isinstance(a, dict) else a
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


def _parquet_groups(files: list[Path], images_dir: Path, stats: PrepareStats) -> dict[str, dict[str, Any]]:
    """image key -> {"image": path, "qas": [QA]}; images decoded once and written as PNG."""
    import pyarrow.parquet as pq

    groups: dict[str, dict[str, Any]] = {}
    images_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        missing = {"question", "answers", "image"} - names
        if missing:
            raise ValueError(f"{f}: missing columns {sorted(missing)}; found {sorted(names)}")
        cols = [c for c in ("questionId", "question", "answers", "image") if c in names]
        row_no = 0
        for batch in pf.iter_batches(batch_size=64, columns=cols):
            for row in batch.to_pylist():
                row_no += 1
                image = row.get("image") or {}
                data = image.get("bytes") if isinstance(image, dict) else image
                if not data:
                    stats.skip("no image bytes")
                    continue
                answer = _first_answer(row.get("answers"))
                if answer is None:  # e.g. the test split: no image written either
                    stats.skip("no answer")
                    continue
                key = hashlib.sha1(data).hexdigest()[:16]
                if key not in groups:
                    groups[key] = {"image": _write_png(data, images_dir / f"{key}.png", f, row_no), "qas": []}
                qid = str(row.get("questionId") or f"{f.stem}-{row_no}")
                groups[key]["qas"].append(QA(qid, str(row["question"]).strip(), answer))
    return groups


def _write_png(data: bytes, target: Path, source: Path, row_no: int) -> Path:
    if target.exists():
        return target
    from dvsft.core.images import ImageError, load_image

    try:
        image = load_image(data)  # the decoder of every stage: other formats are written upright RGB
    except ImageError as err:
        raise ValueError(f"{source}: row {row_no}: image bytes: {err.reason}: {err.detail}") from err
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        tmp_bytes = data
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        tmp_bytes = buf.getvalue()
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(tmp_bytes)
    os.replace(tmp, target)
    return target


def _json_groups(
    json_file: Path, dataset: str, image_root: str | Path | None, stats: PrepareStats
) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for entry in vqa_entries(read_json(json_file), dataset, json_file):
        answer = _first_answer(entry.answers)
        if answer is None:
            stats.skip("no answer")
            continue
        image = _locate(entry.image, json_file, image_root)
        if str(image) not in groups and not image.exists():
            stats.missing_images += 1
        group = groups.setdefault(str(image), {"image": image, "qas": []})
        group["qas"].append(QA(entry.qid, entry.question.strip(), answer))
    return groups


def _locate(name: str, json_file: Path, image_root: str | Path | None) -> Path:
    """An image named in an official JSON: under --image-root, next to the JSON, or in a usual images folder."""
    p = Path(name)
    if p.is_absolute():
        return p
    roots = [Path(image_root)] if image_root else []
    roots += [json_file.resolve().parent, json_file.resolve().parent.parent]
    candidates = [r / d / p for r in roots for d in IMAGE_DIRS] + [r / d / p.name for r in roots for d in IMAGE_DIRS]
    return next((c for c in candidates if c.exists()), candidates[0])


def _squad_groups(json_file: Path, stats: PrepareStats) -> dict[str, dict[str, Any]]:
    """``"article-paragraph"`` -> {"text", "title", "qas": [QA]}; paragraphs without a usable question are skipped."""
    groups: dict[str, dict[str, Any]] = {}
    for para in read_squad_file(json_file):
        qas = []
        for q in para.questions:
            if q.impossible:
                stats.skip("impossible question")
            elif not q.answers:
                stats.skip("no answer")
            else:
                qid = q.id if q.id is not None else f"{para.article}-{para.index}-{len(qas)}"
                qas.append(QA(qid, q.question.strip(), q.answers[0].strip()))
        if not qas:
            stats.skip("document without usable QA")
            continue
        groups[f"{para.article}-{para.index}"] = {"text": para.context, "title": para.title, "qas": qas}
    return groups


# ---- records -----------------------------------------------------------------------------------------------


def _select(qas: list[QA], n: int, seed: int, key: str) -> list[QA]:
    if n == 0 or len(qas) <= n:
        return list(qas)
    rng = random.Random(f"{seed}:{key}")
    keep = sorted(rng.sample(range(len(qas)), n))
    return [qas[i] for i in keep]


def messages_for(qas: list[QA], rng: random.Random | None = None) -> list[dict[str, str]]:
    """User/assistant turns; the first user turn starts with ``<image>``.

    With ``rng`` each question is followed by ``\n`` + a format-control instruction drawn from it.
    """
    from dvsft.sources.instructions import FORMAT_INSTRUCTIONS

    messages = []
    for k, qa in enumerate(qas):
        question = qa.question if rng is None else f"{qa.question}\n{rng.choice(FORMAT_INSTRUCTIONS)}"
        messages.append({"role": "user", "content": (IMAGE_PLACEHOLDER if k == 0 else "") + question})
        messages.append({"role": "assistant", "content": qa.answer})
    return messages


def _build_rows(
    dataset: str,
    groups: dict[str, dict[str, Any]],
    n: int,
    seed: int,
    multi_turn: bool,
    stats: PrepareStats,
    image_key: str | None,
    out_dir: Path | None = None,
    instructions: bool = False,
) -> Iterator[dict[str, Any]]:
    for key, group in groups.items():
        qas = group["qas"]
        stats.qa_total += len(qas)
        if not qas:
            continue
        chosen = _select(qas, n, seed, key)
        stats.images += 1
        stats.qa_kept += len(chosen)
        rng = random.Random(f"{seed}:{key}:instructions") if instructions else None
        for part in [chosen] if multi_turn else [[qa] for qa in chosen]:
            row: dict[str, Any] = {"id": f"{dataset}-{part[0].qid}"}
            if image_key is not None and out_dir is not None:
                row["image"] = os.path.relpath(Path(group["image"]).resolve(), out_dir.resolve())
            else:
                row["title"] = group.get("title", "")
                row["text"] = group["text"]
            row["messages"] = messages_for(part, rng)
            yield row
