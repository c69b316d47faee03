"""Image-to-label: OCR every input image once into word records, resumably and losslessly.

Inputs come from a folder of images or a ShareGPT/LLaVA dataset file (:mod:`dvsft.sources.formats`). Each input
ends up exactly once in the output JSONL (a word record) or in ``<out stem>.errors.jsonl`` (``id``, ``image``,
``reason``, ``detail``). Both files are appended line by line (:class:`dvsft.core.records.JsonlAppender`), so a run
killed at any moment continues where it stopped: ids already present in either file are skipped. A ``parquet``
output folder is marked as label's (:mod:`dvsft.core.outputs`): a folder of other files is refused, never
written into.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.core.images import OCR_FAILURE, UNDECODABLE, ImageError, load_image
from dvsft.core.outputs import claim_folder
from dvsft.core.pools import spawn_pool
from dvsft.core.record_table import DEFAULT_ROWS_PER_SHARD, check_format, open_sink
from dvsft.core.records import JsonlAppender, read_jsonl

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


@dataclass
class LabelInput:
    """One input: a stable ``id``, the image ``path`` (None if the sample itself is bad) and its conversation."""

    id: str
    image: str  # the path as the user gave it (used in error rows)
    path: Path | None
    messages: list[dict[str, Any]] | None = None
    error: tuple[str, str] | None = None  # (reason, detail) known before OCR, e.g. a multi-image sample


@dataclass
class LabelStats:
    total: int = 0  # inputs in this shard
    skipped: int = 0  # already in the output or errors file (resume)
    records: int = 0  # records written by this run
    errors: Counter = field(default_factory=Counter)  # reason -> count written by this run
    words: int = 0
    images: int = 0  # distinct images OCR'd by this run
    seconds: float = 0.0


def errors_path(out: str | Path) -> Path:
    """``words.jsonl`` -> ``words.errors.jsonl``, ``words/`` (shards) -> ``words.errors.jsonl`` (next to it)."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix.lower() == '.jsonl' else out.name}.errors.jsonl")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path; hidden files and folders skipped."""
    folder = Path(folder)
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def collect_inputs(source: str | Path, image_root: str | Path | None = None) -> list[LabelInput]:
    """Inputs of a folder of images (id = relative path), one image file, or a dataset file (.json/.jsonl)."""
    source = Path(source)
    if source.is_dir():
        return [LabelInput(id=p.relative_to(source).as_posix(), image=str(p), path=p) for p in list_images(source)]
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.suffix.lower() in (".json", ".jsonl"):
        from dvsft.sources.formats import load_dataset_samples

        return [
            LabelInput(id=s.id, image=s.image, path=s.path, messages=s.messages, error=s.error)
            for s in load_dataset_samples(source, image_root=image_root)
        ]
    if source.suffix.lower() in IMAGE_EXTENSIONS:
        return [LabelInput(id=source.name, image=str(source), path=source)]
    raise ValueError(f"{source}: expected a folder of images, an image, or a dataset file (.json/.jsonl)")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError as err:
        raise ValueError(f"--shard {spec!r}: expected i/N, e.g. 0/4") from err
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < N")
    return i, n


def shard(inputs: list[LabelInput], index: int, count: int) -> list[LabelInput]:
    """The inputs whose position in the full input list is ``index`` modulo ``count`` (stable, disjoint)."""
    return [x for k, x in enumerate(inputs) if k % count == index]


def done_ids(out: str | Path) -> set[str]:
    """Ids already present in the output (a JSONL file or a folder of Parquet shards) or its errors file."""
    from dvsft.core.record_sources import read_ids

    ids: set[str] = set()
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.glob("*.parquet"))):
        ids.update(read_ids(out, own=True))
    if errors_path(out).exists():
        ids.update(str(row["id"]) for row in read_jsonl(errors_path(out), own=True) if "id" in row)
    return ids


# ---- worker side -------------------------------------------------------------------------------------------

_ENGINE: Any = None


def _init_engine(engine: str, options: dict[str, Any]) -> None:
    global _ENGINE
    from dvsft.sources.ocr import get_engine

    _ENGINE = get_engine(engine, **options)


def _ocr_one(path: str) -> tuple[str, Any]:
    """``("ok", (width, height, words))`` or ``("error", (reason, detail))`` for one image file."""
    try:
        image = load_image(path)
    except ImageError as err:
        return "error", (err.reason, err.detail)
    except Exception as err:  # noqa: BLE001 - any decoder crash is an undecodable image, not a lost input
        return "error", (UNDECODABLE, f"{type(err).__name__}: {err}")
    try:
        words = _check_words(_ENGINE(image))
    except Exception as err:  # noqa: BLE001
        return "error", (OCR_FAILURE, f"{type(err).__name__}: {err}")
    return "ok", (image.width, image.height, words)


def _check_words(words: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for w in words:
        box = w.get("box") if isinstance(w, dict) else None
        if not (isinstance(box, list | tuple) and len(box) == 4 and isinstance(w.get("text"), str)):
            raise ValueError(f"engine returned a malformed word: {w!r}")
        row = {"text": w["text"], "box": [float(v) for v in box]}
        if w.get("score") is not None:
            row["score"] = float(w["score"])
        out.append(row)
    return out


# ---- driver ------------------------------------------------------------------------------------------------


def default_threads(workers: int) -> int:
    """onnxruntime intra-op threads per worker: the usable cores split evenly (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


def label_inputs(
    inputs: list[LabelInput],
    out: str | Path,
    *,
    engine: str = "rapidocr",
    engine_options: dict[str, Any] | None = None,
    workers: int = 1,
    retry_errors: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    fmt: str = "jsonl",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
) -> LabelStats:
    """OCR ``inputs`` into ``out`` (+ its errors file), skipping ids already there.

    ``engine_options`` go to :func:`dvsft.sources.ocr.get_engine`; ``threads`` defaults to cores // workers.
    ``workers > 1`` runs that many processes, each loading its own engine once. ``on_progress(done, total)``
    is called after each input (``done`` counts skipped inputs too). ``retry_errors`` clears the errors file
    first, so inputs that failed before are tried again (e.g. after fixing missing files). ``fmt="parquet"``
    writes ``out`` as a folder of shards of ``rows_per_shard`` records; a rerun keeps the whole shards and
    redoes the records of the shard that was being written.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_format(fmt)
    if fmt == "parquet" and out.is_file():
        raise ValueError(f"--out {out}: a file; --format parquet writes a folder of shards")
    if fmt == "parquet":
        claim_folder(out, "label", hint="choose another --out")
    options = dict(engine_options or {})
    if engine == "rapidocr":
        options.setdefault("threads", default_threads(workers))
    if retry_errors:
        errors_path(out).unlink(missing_ok=True)
    seen = done_ids(out)
    stats = LabelStats(total=len(inputs))
    todo = [x for x in inputs if x.id not in seen]
    stats.skipped = stats.total - len(todo)
    done = stats.skipped
    if on_progress:
        on_progress(done, stats.total)

    out_dir = out.resolve() if fmt == "parquet" else out.resolve().parent
    with open_sink(out, fmt, rows_per_shard, "label") as records, JsonlAppender(errors_path(out)) as errors:

        def write_error(item: LabelInput, reason: str, detail: str) -> None:
            errors.write({"id": item.id, "image": item.image, "reason": reason, "detail": detail})
            stats.errors[reason] += 1

        def finish(group: list[LabelInput], status: str, payload: Any) -> None:
            nonlocal done
            for item in group:
                if status == "ok":
                    width, height, words = payload
                    row: dict[str, Any] = {
                        "id": item.id,
                        "image": _relative(item.path, out_dir),
                        "width": width,
                        "height": height,
                        "words": words,
                    }
                    if item.messages is not None:
                        row["messages"] = item.messages
                    records.write(row)
                    stats.records += 1
                    stats.words += len(words)
                else:
                    write_error(item, *payload)
                done += 1
                if on_progress:
                    on_progress(done, stats.total)

        groups: dict[str, list[LabelInput]] = {}
        for item in todo:
            if item.error is not None or item.path is None:
                finish([item], "error", item.error or (UNDECODABLE, "no image path"))
            else:  # one OCR pass per distinct image, shared by every input that uses it
                groups.setdefault(str(Path(item.path).resolve()), []).append(item)
        stats.images = len(groups)
        for path, status, payload in _run(list(groups), engine, options, workers):
            finish(groups[path], status, payload)
    stats.seconds = time.perf_counter() - t0
    return stats


def _run(paths: list[str], engine: str, options: dict[str, Any], workers: int) -> Iterator[tuple[str, str, Any]]:
    if not paths:
        return
    if workers <= 1:
        _init_engine(engine, options)
        for p in paths:
            yield (p, *_ocr_one(p))
        return
    from dvsft.sources.ocr import get_engine

    get_engine(engine, **options)  # fail here, with the engine's own message, on a bad name or option
    window = 4 * workers  # bounded in-flight tasks: low memory, little lost work on a kill
    todo = iter(paths)
    with spawn_pool(workers, _init_engine, (engine, options)) as pool:
        pending: dict[Future, str] = {}
        try:
            while True:
                while len(pending) < window and (p := next(todo, None)) is not None:
                    pending[pool.submit(_ocr_one, p)] = p
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield (pending.pop(fut), *fut.result())
        except BrokenProcessPool as err:
            raise RuntimeError(
                "an OCR worker process died (out of memory, a crash in the engine, or an engine that could not be "
                "created in a worker); rerun the same command to resume"
            ) from err
        finally:
            for fut in pending:
                fut.cancel()


def _relative(path: Path | None, base: Path) -> str:
    """Image path as stored in a record: relative to the records file's folder when possible."""
    p = Path(path).resolve() if path is not None else Path("")
    try:
        return os.path.relpath(p, base)
    except ValueError:  # different drive (Windows)
        return str(p)
