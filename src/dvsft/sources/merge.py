"""`dvsft merge`: join the outputs of ``dvsft label --shard i/N`` runs, checking every input landed once.

Each part is a label output (a JSONL file or a folder of Parquet shards) with its ``<stem>.errors.jsonl``.
Before anything is written the ids of all parts (records and error rows) are counted: an id found twice, and,
when the labeling ``source`` is given, an input of that source found nowhere (a shard that never ran or
stopped early) or an id that is not one of its inputs, fail the merge with the ids named. The output may not
be one of the parts, and an existing output is replaced only with ``overwrite`` (:mod:`dvsft.core.outputs`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from dvsft.core.outputs import check_file, claim_folder, refuse_inputs
from dvsft.core.record_sources import read_ids
from dvsft.core.record_table import DEFAULT_ROWS_PER_SHARD, write_records
from dvsft.core.records import read_jsonl, write_jsonl
from dvsft.sources.image_to_label import collect_inputs, errors_path

SHOWN = 5  # ids named per problem


@dataclass
class MergeReport:
    parts: int
    records: int = 0
    errors: int = 0
    expected: int | None = None  # inputs of the source, when given
    problems: list[str] = field(default_factory=list)


def _names(ids: list[str]) -> str:
    more = f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
    return ", ".join(repr(i) for i in ids[:SHOWN]) + more


def check_parts(parts: list[Path], source: Path | None = None, image_root: Path | None = None) -> MergeReport:
    """Count the ids of every part; ``problems`` lists duplicates, missing and unknown inputs (empty = ok)."""
    report = MergeReport(parts=len(parts))
    seen: Counter = Counter()
    for part in parts:
        if not part.exists():
            raise FileNotFoundError(f"{part}: no such label output")
        ids = read_ids(part, own=True)
        report.records += len(ids)
        seen.update(ids)
        if errors_path(part).is_file():
            err_ids = [str(r["id"]) for r in read_jsonl(errors_path(part), own=True) if "id" in r]
            report.errors += len(err_ids)
            seen.update(err_ids)
    twice = sorted(i for i, n in seen.items() if n > 1)
    if twice:
        report.problems.append(f"{len(twice)} ids appear more than once: {_names(twice)}")
    if source is not None:
        expected = [x.id for x in collect_inputs(source, image_root=image_root)]
        report.expected = len(expected)
        missing = [i for i in expected if i not in seen]
        known = set(expected)
        unknown = sorted(i for i in seen if i not in known)
        if missing:
            report.problems.append(f"{len(missing)} inputs of {source} are in no part: {_names(missing)}")
        if unknown:
            report.problems.append(f"{len(unknown)} ids are not inputs of {source}: {_names(unknown)}")
    return report


def merge(
    parts: list[str | Path],
    out: str | Path,
    fmt: str = "jsonl",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    source: str | Path | None = None,
    image_root: str | Path | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Check ``parts`` (see :func:`check_parts`), then write their records to ``out`` and their error rows to
    ``<out stem>.errors.jsonl``. Raises ``ValueError`` naming the problems, writing nothing, if the check fails,
    if ``out`` is (or contains) a part, or if it exists and ``overwrite`` is not given."""
    from dvsft.core.convert import relocated

    paths = [Path(p) for p in parts]
    out = Path(out)
    if not paths:
        raise ValueError("nothing to merge: give the label outputs of the shards")
    _check_out(out, paths, fmt, overwrite)
    report = check_parts(paths, Path(source) if source else None, Path(image_root) if image_root else None)
    if report.problems:
        raise ValueError("merge check failed: " + "; ".join(report.problems))
    out_dir = out.resolve() if fmt == "parquet" and out.suffix.lower() != ".parquet" else out.resolve().parent
    records: Iterator[dict[str, Any]] = chain.from_iterable(relocated(p, out_dir, own=True) for p in paths)
    write_records(out, records, fmt, rows_per_shard, "merge", overwrite)
    error_rows = chain.from_iterable(read_jsonl(errors_path(p), own=True) for p in paths if errors_path(p).is_file())
    write_jsonl(errors_path(out), error_rows)
    return report


def _check_out(out: Path, parts: list[Path], fmt: str, overwrite: bool) -> None:
    """Refuse, before any work, an output that is a part (or its errors file) or that exists without ``overwrite``."""
    refuse_inputs([out, errors_path(out)], [*parts, *(errors_path(p) for p in parts)])
    if fmt == "parquet" and out.suffix.lower() != ".parquet":
        claim_folder(out, "merge", overwrite)
    else:
        check_file(out, overwrite)
    check_file(errors_path(out), overwrite)
