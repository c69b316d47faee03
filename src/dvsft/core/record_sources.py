"""Where word records live, and one way to read them all.

A *source* is a JSONL file, a Parquet file, a folder of shards (``*.parquet`` found recursively, or
``*.jsonl`` files directly inside, ``*.errors.jsonl`` excluded), or a Hugging Face ``datasets`` dataset saved
with ``save_to_disk`` (its memory-mapped Arrow files; a ``DatasetDict`` gives its ``train`` split, or its only
one). :func:`iter_entries` yields every record with the file and the line (JSONL) or 1-based row (Parquet,
Arrow) it came from. Relative image paths are relative to the folder of the file that holds the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSONL, PARQUET, ARROW = "jsonl", "parquet", "arrow"
JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Entry:
    """One record of a source (or why the line could not be read): its file and line/row number."""

    file: Path
    number: int
    record: dict[str, Any] | None
    error: str | None = None


def _is_errors_file(p: Path) -> bool:
    return p.name.endswith(".errors.jsonl")


def datasets_dir(path: Path) -> Path | None:
    """The ``save_to_disk`` folder of one split at ``path`` (a Dataset or DatasetDict folder), else None."""
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return path
    dict_file = path / "dataset_dict.json"
    if not dict_file.is_file():
        return None
    splits = json.loads(dict_file.read_text())["splits"]
    split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
    if split is None:
        raise ValueError(f"{path}: a DatasetDict with splits {splits} and no 'train'; pass {path}/<split>")
    return path / split


def data_files(path: str | Path) -> list[tuple[Path, str]]:
    """``[(file, kind), ...]`` of a source, in reading order; kind is ``jsonl``, ``parquet`` or ``arrow``."""
    path = Path(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return [(path, PARQUET)]
        if suffix == ".arrow":
            return [(path, ARROW)]
        return [(path, JSONL)]
    if not path.is_dir():
        raise FileNotFoundError(f"records not found: {path}")
    hf = datasets_dir(path)
    if hf is not None:
        state = json.loads((hf / "state.json").read_text())
        return [(hf / f["filename"], ARROW) for f in state["_data_files"]]
    parquet = sorted(p for p in path.rglob("*.parquet") if not any(s.startswith(".") for s in p.parts))
    jsonl = sorted(p for p in path.iterdir() if p.suffix == ".jsonl" and not _is_errors_file(p))
    if parquet and jsonl:
        raise ValueError(f"{path}: holds both .parquet and .jsonl files; point at one file or a folder of one kind")
    if not parquet and not jsonl:
        raise ValueError(f"{path}: no records (.jsonl, .parquet, or a datasets save_to_disk folder)")
    return [(p, PARQUET) for p in parquet] or [(p, JSONL) for p in jsonl]


def iter_entries(path: str | Path, own: bool = False, columns: list[str] | None = None) -> Iterator[Entry]:
    """Every record of a source as an :class:`Entry` (unreadable JSONL lines carry their ``error``).

    ``own``: JSONL files dvsft appended to itself (a torn last line is dropped, see
    :func:`dvsft.core.records.iter_lines`). ``columns``: read only these columns of Parquet/Arrow files.
    """
    from dvsft.core.records import iter_lines

    for file, kind in data_files(path):
        if kind == JSONL:
            for line in iter_lines(file, own):
                yield Entry(file, line.number, line.record, line.error)
        else:
            number = 0
            for batch in iter_batches(file, kind, columns):
                for record in rows_of(batch):
                    number += 1
                    yield Entry(file, number, record)


def iter_batches(file: Path, kind: str, columns: list[str] | None = None, batch_rows: int = 512) -> Iterator[Any]:
    """``pyarrow.RecordBatch`` es of one Parquet or Arrow (``datasets``) file, a few hundred rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == PARQUET:
        pf = pq.ParquetFile(file)
        cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
        yield from pf.iter_batches(batch_size=batch_rows, columns=cols)
        return
    with pa.memory_map(str(file)) as source:
        reader = _arrow_reader(source)
        for batch in reader:
            if columns:
                batch = batch.select([c for c in columns if c in batch.schema.names])
            yield batch


def _arrow_reader(source: Any) -> Any:
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(source)  # datasets writes the streaming format
    except pa.ArrowInvalid:
        source.seek(0)
        file_reader = pa.ipc.open_file(source)
        return (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))


def rows_of(batch: Any) -> Iterator[dict[str, Any]]:
    """The records of one Arrow record batch (see :func:`dvsft.core.record_table.from_row`)."""
    from dvsft.core.record_table import from_row

    for row in batch.to_pylist():
        yield from_row(row)


def count_records(path: str | Path) -> int:
    """Records in a source: Parquet/Arrow from their metadata, JSONL by counting non-blank lines."""
    import pyarrow.parquet as pq

    total = 0
    for file, kind in data_files(path):
        if kind == PARQUET:
            total += pq.ParquetFile(file).metadata.num_rows
        elif kind == ARROW:
            total += sum(b.num_rows for b in iter_batches(file, ARROW, columns=["id"]))
        else:
            with open(file, "rb") as f:
                total += sum(1 for line in f if line.strip())
    return total


def read_ids(path: str | Path, own: bool = False) -> list[str]:
    """The ``id`` of every record of a source (Parquet/Arrow: only that column is read)."""
    entries = iter_entries(path, own, columns=["id", "extra"])
    return [str(e.record["id"]) for e in entries if e.record is not None and "id" in e.record]
