"""Word records as Arrow tables: the schema, lossless record <-> row conversion, Parquet shard writers.

A record's usual fields get typed columns (see ``SCHEMA`` and docs/records.md); anything else, and any
field whose value the typed column cannot hold exactly (an integer box, a list ``content``, an explicit
``null``), goes into the ``extra`` column as one JSON object, so records come back as they went in.
``image_bytes`` holds the image file itself when it lives inside the shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dvsft.core.outputs import add_to_marker, check_file, claim_folder, install_folder, start_folder, temp_sibling

WORD = pa.struct([("text", pa.string()), ("box", pa.list_(pa.float64())), ("score", pa.float64())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
VISION_LABEL = pa.struct([("token", pa.int64()), ("text", pa.string()), ("token_id", pa.int64())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("image_bytes", pa.binary()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("words", pa.list_(WORD)),
        ("messages", pa.list_(MESSAGE)),
        ("grid", pa.list_(pa.int64())),
        ("vision_labels", pa.list_(VISION_LABEL)),
        ("extra", pa.string()),
    ]
)
EXTRA = "extra"
SHARD_PATTERN = "part-{:05d}.parquet"
DEFAULT_ROWS_PER_SHARD = 10_000
ROW_GROUP_ROWS = 512  # streaming reads one row group at a time


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _word_fits(w: Any) -> bool:
    if not isinstance(w, dict) or not isinstance(w.get("text"), str) or not set(w) <= {"text", "box", "score"}:
        return False
    box = w.get("box")
    if not (isinstance(box, list) and all(type(v) is float for v in box)):
        return False
    return "score" not in w or type(w["score"]) is float


def _message_fits(m: Any) -> bool:
    return (
        isinstance(m, dict)
        and set(m) == {"role", "content"}
        and isinstance(m["role"], str)
        and isinstance(m["content"], str)
    )


def _label_fits(lab: Any) -> bool:
    return (
        isinstance(lab, dict)
        and set(lab) <= {"token", "text", "token_id"}
        and _int(lab.get("token"))
        and isinstance(lab.get("text"), str)
        and ("token_id" not in lab or _int(lab["token_id"]))
    )


FITS = {
    "id": lambda v: isinstance(v, str),
    "image": lambda v: isinstance(v, str),
    "image_bytes": lambda v: isinstance(v, bytes),
    "width": _int,
    "height": _int,
    "words": lambda v: isinstance(v, list) and all(_word_fits(w) for w in v),
    "messages": lambda v: isinstance(v, list) and all(_message_fits(m) for m in v),
    "grid": lambda v: isinstance(v, list) and all(_int(x) for x in v),
    "vision_labels": lambda v: isinstance(v, list) and all(_label_fits(x) for x in v),
}


def to_row(record: dict[str, Any]) -> dict[str, Any]:
    """The Arrow row of a record: typed columns where the value fits exactly, the rest in ``extra`` (JSON)."""
    row: dict[str, Any] = dict.fromkeys(SCHEMA.names)
    extra: dict[str, Any] = {}
    for key, value in record.items():
        fits = FITS.get(key)
        if fits is not None and value is not None and fits(value):
            row[key] = value
        else:
            extra[key] = value
    if extra:
        try:
            row[EXTRA] = json.dumps(extra, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"record {record.get('id', '?')!r}: a field cannot be stored: {err}") from err
    return row


def from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The record of an Arrow row (ours, or any table with record-named columns): nulls dropped, ``extra``
    merged back, a Hugging Face ``Image`` struct (``{"bytes", "path"}``) split into ``image``/``image_bytes``."""
    record: dict[str, Any] = {}
    for key, value in row.items():
        if value is None or key == EXTRA:
            continue
        if key in ("words", "vision_labels"):
            value = [{k: v for k, v in item.items() if v is not None} for item in value]
        elif key == "image" and isinstance(value, dict):
            if value.get("bytes") is not None:
                record["image_bytes"] = value["bytes"]
            if value.get("path"):
                record["image"] = value["path"]
            continue
        record[key] = value
    extra = row.get(EXTRA)
    if extra:
        record.update(json.loads(extra))
    return record


class ShardWriter:
    """Write records into ``folder/part-NNNNN.parquet``, ``rows_per_shard`` each (the last may hold fewer).

    A shard is written under a ``.tmp`` name and renamed when complete, so a killed writer leaves only whole
    shards; a new writer on the same folder continues after the highest shard number found. With ``command``
    the folder is a command's output (:mod:`dvsft.core.outputs`): a folder of other files is refused and each
    finished shard is listed in the folder's marker.
    """

    def __init__(self, folder: str | Path, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, command: str | None = None):
        if rows_per_shard < 1:
            raise ValueError(f"rows per shard must be >= 1, got {rows_per_shard}")
        self.folder = Path(folder)
        self.command = command
        if command is not None:
            start_folder(self.folder, command, hint="choose another --out")
        self.folder.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob("*.parquet.tmp"):
            tmp.unlink()
        self.rows_per_shard = rows_per_shard
        self.index = 1 + max((shard_index(p) for p in self.folder.glob("part-*.parquet")), default=-1)
        self.rows = 0  # rows written by this writer
        self._buffer: list[dict[str, Any]] = []
        self._in_shard = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None

    def write(self, record: dict[str, Any]) -> None:
        self._buffer.append(to_row(record))
        self.rows += 1
        self._in_shard += 1
        if len(self._buffer) >= ROW_GROUP_ROWS or self._in_shard >= self.rows_per_shard:
            self._flush_group()
        if self._in_shard >= self.rows_per_shard:
            self._finish_shard()

    def _flush_group(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self._tmp = self.folder / (SHARD_PATTERN.format(self.index) + ".tmp")
            self._writer = pq.ParquetWriter(self._tmp, SCHEMA, compression="zstd")
        self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=SCHEMA), row_group_size=ROW_GROUP_ROWS)
        self._buffer = []

    def _finish_shard(self) -> None:
        self._flush_group()
        if self._writer is None:
            return
        self._writer.close()
        assert self._tmp is not None
        shard = self.folder / SHARD_PATTERN.format(self.index)
        os.replace(self._tmp, shard)
        if self.command is not None:
            add_to_marker(self.folder, self.command, [shard])
        self._writer, self._tmp, self._in_shard = None, None, 0
        self.index += 1

    def close(self) -> None:
        self._finish_shard()

    def abort(self) -> None:
        """Drop the shard being written (used when the rows fail midway)."""
        if self._writer is not None:
            self._writer.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._writer, self._tmp, self._buffer = None, None, []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def shard_index(path: Path) -> int:
    """``part-00012.parquet`` -> 12 (-1 for other names)."""
    stem = path.name.split(".", 1)[0]
    try:
        return int(stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def write_parquet_file(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """All records into one Parquet file, atomically (temp file + rename); returns the row count."""
    path = Path(path)
    tmp = temp_sibling(path)
    n = 0
    try:
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            buffer: list[dict[str, Any]] = []
            for record in records:
                buffer.append(to_row(record))
                n += 1
                if len(buffer) >= ROW_GROUP_ROWS:
                    writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMA))
                    buffer = []
            if buffer or n == 0:
                writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMA))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def write_shards(
    folder: str | Path,
    records: Iterable[dict[str, Any]],
    rows_per_shard: int,
    command: str = "dvsft",
    overwrite: bool = False,
) -> int:
    """Write ``folder`` as the Parquet shards of ``records``, the output of ``command``: built in a temporary
    sibling, then moved in by :func:`dvsft.core.outputs.install_folder` (which replaces only what a previous
    dvsft output listed; a folder of other files is refused unless ``overwrite``)."""
    folder = Path(folder)
    claim_folder(folder, command, overwrite)
    staging = temp_sibling(folder, folder=True)
    try:
        with ShardWriter(staging, rows_per_shard) as writer:
            for record in records:
                writer.write(record)
        if writer.rows == 0:
            pq.write_table(pa.Table.from_pylist([], schema=SCHEMA), staging / SHARD_PATTERN.format(0))
        install_folder(staging, folder, command, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return writer.rows


FORMATS = ("jsonl", "parquet")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use jsonl or parquet")
    return fmt


def write_records(
    out: str | Path,
    records: Iterable[dict[str, Any]],
    fmt: str = "jsonl",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    command: str = "dvsft",
    overwrite: bool = False,
) -> int:
    """Write records as JSONL (``out`` is the file) or Parquet (``out`` is a folder of shards, or one
    ``.parquet`` file), the output of ``command``; atomic either way. An existing file, or a folder holding
    files ``command`` did not write, is refused unless ``overwrite`` (see :mod:`dvsft.core.outputs`).
    Returns the record count."""
    from dvsft.core.records import write_jsonl

    if check_format(fmt) == "parquet" and Path(out).suffix.lower() != ".parquet":
        return write_shards(out, records, rows_per_shard, command, overwrite)
    check_file(out, overwrite)
    return write_jsonl(out, records) if fmt == "jsonl" else write_parquet_file(out, records)


def open_sink(
    out: str | Path, fmt: str = "jsonl", rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, command: str | None = None
) -> Any:
    """An appending writer (``write(record)``, ``close()``, context manager) that a rerun continues:
    :class:`dvsft.core.records.JsonlAppender` or :class:`ShardWriter` (whole shards survive a kill; with
    ``command``, a folder of files that command did not write is refused)."""
    from dvsft.core.records import JsonlAppender

    if check_format(fmt) == "jsonl":
        return JsonlAppender(out)
    return ShardWriter(out, rows_per_shard, command)
