"""`dvsft convert`: records from any source (see :mod:`dvsft.core.record_sources`) to JSONL, Parquet or a
Hugging Face ``datasets`` folder, losslessly.

Records are copied as they are (no validation); relative image paths are rewritten so they still point at
the same files from the output's folder. ``embed_images`` stores each image file in the record
(``image_bytes``, Parquet and ``datasets`` only); converting such records to JSONL writes the bytes back to
files next to the output, at the record's relative ``image`` path when it stays inside the output folder and
holds no other file there (else ``images/<sha1><suffix>``).

Outputs never destroy (:mod:`dvsft.core.outputs`): the output may not be or contain the source; an existing
file, or a folder holding files ``dvsft convert`` did not write, is refused unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dvsft.core.outputs import check_file, claim_folder, install_folder, refuse_inputs, temp_sibling
from dvsft.core.record_sources import iter_entries
from dvsft.core.record_table import DEFAULT_ROWS_PER_SHARD, write_records
from dvsft.core.records import Problem, RecordError

TARGETS = ("jsonl", "parquet", "datasets")


def target_of(out: Path, to: str) -> str:
    """The output kind: ``to``, or from the suffix of ``out`` (.jsonl, .parquet) when ``to`` is ``auto``."""
    if to != "auto":
        if to not in TARGETS:
            raise ValueError(f"--to {to!r}: use jsonl, parquet or datasets")
        return to
    suffix = out.suffix.lower()
    if suffix in (".jsonl", ".parquet"):
        return suffix[1:]
    raise ValueError(f"{out}: say --to jsonl, parquet (a folder of shards) or datasets")


def convert(
    source: str | Path,
    out: str | Path,
    to: str = "auto",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    embed_images: bool = False,
    overwrite: bool = False,
) -> int:
    """Convert ``source`` into ``out``; returns the record count. ``overwrite`` replaces an existing output
    (a folder loses only the files a dvsft output listed)."""
    source, out = Path(source), Path(out)
    target = target_of(out, to)
    if embed_images and target == "jsonl":
        raise ValueError("--embed-images needs --to parquet or datasets (JSONL cannot hold image bytes)")
    refuse_inputs([out], [source])
    folder = target != "jsonl" and out.suffix.lower() != ".parquet"
    if folder:
        claim_folder(out, "convert", overwrite)
    else:
        check_file(out, overwrite)
    out_dir = (out if folder else out.parent).resolve()
    records = relocated(source, out_dir, embed_images, extract=target == "jsonl")
    if target == "datasets":
        return _save_datasets(out, records, rows_per_shard, overwrite)
    return write_records(out, records, target, rows_per_shard, "convert", overwrite)


def relocated(
    source: Path, out_dir: Path, embed: bool = False, extract: bool = False, own: bool = False
) -> Iterator[dict[str, Any]]:
    """The records of ``source`` with relative image paths made relative to ``out_dir``; ``embed`` reads image
    files into ``image_bytes``, ``extract`` writes ``image_bytes`` out to files under ``out_dir``."""
    for entry in iter_entries(source, own):
        if entry.error is not None:
            raise RecordError(Problem(str(entry.file), entry.number, None, entry.error))
        record = dict(entry.record or {})
        base = entry.file.resolve().parent
        image = record.get("image")
        data = record.get("image_bytes")
        if embed and isinstance(image, str) and not isinstance(data, bytes):
            path = Path(image) if Path(image).is_absolute() else base / image
            try:
                data = record["image_bytes"] = path.read_bytes()
            except OSError as err:
                raise ValueError(f"{entry.file}:{entry.number}: record {record.get('id')}: {err}") from err
        if extract and isinstance(data, bytes):
            record["image"] = _extract(data, image, out_dir)
            del record["image_bytes"]
        elif isinstance(data, bytes):
            pass  # the image travels inside the record; its path is kept as written
        elif isinstance(image, str) and image and not Path(image).is_absolute() and base != out_dir:
            record["image"] = Path(os.path.relpath(base / image, out_dir)).as_posix()
        yield record


def _extract(data: bytes, image: Any, out_dir: Path) -> str:
    """Write embedded image bytes under ``out_dir``; returns the record's new (relative) ``image``. A file
    already there with other bytes is kept: the image goes to the content-named ``images/<sha1><suffix>``."""
    rel = Path(image) if isinstance(image, str) and image else None
    suffix = rel.suffix if rel is not None and rel.suffix else ".img"
    if rel is None or rel.is_absolute() or ".." in rel.parts or _holds_other(out_dir / rel, data):
        rel = Path("images") / (hashlib.sha1(data).hexdigest()[:20] + suffix)
    target = out_dir / rel
    if not target.is_file():
        tmp = temp_sibling(target)
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return rel.as_posix()


def _holds_other(path: Path, data: bytes) -> bool:
    """Whether ``path`` exists with content other than ``data``."""
    return path.exists() and not (path.is_file() and path.read_bytes() == data)


def _save_datasets(out: Path, records: Iterator[dict[str, Any]], rows_per_shard: int, overwrite: bool) -> int:
    """Records -> Parquet shards in a temp folder -> ``datasets.Dataset`` -> ``save_to_disk`` into a temporary
    sibling of ``out``, moved into place (:func:`dvsft.core.outputs.install_folder`)."""
    import datasets

    from dvsft.core.record_table import SCHEMA

    with tempfile.TemporaryDirectory(prefix="dvsft-convert-") as tmp:
        shards = Path(tmp) / "shards"
        n = write_records(shards, records, "parquet", rows_per_shard)
        files = sorted(str(p) for p in shards.glob("*.parquet"))
        features = datasets.Features.from_arrow_schema(SCHEMA)
        ds = datasets.Dataset.from_parquet(files, features=features, cache_dir=str(Path(tmp) / "cache"))
        staging = temp_sibling(out, folder=True)
        try:
            ds.save_to_disk(str(staging))
            del ds
            install_folder(staging, out, "convert", overwrite)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return n
