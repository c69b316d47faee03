"""What happens to records a reader had to skip: a logged count, a reasons file, ``--strict`` failure."""

from __future__ import annotations

import logging
from pathlib import Path

from dvsft.core.records import Problem, write_jsonl

log = logging.getLogger(__name__)
REASONS_FILE = "skipped_records.jsonl"


class StrictError(ValueError):
    """``--strict``: a bad record that would have been skipped."""


def report_skips(
    problems: list[Problem], skipped: int, kept: int, out_dir: str | Path, strict: bool = False, write: bool = True
) -> Path | None:
    """Log and write ``out_dir/skipped_records.jsonl`` (one row per problem); raise :class:`StrictError` in strict mode.

    Returns the reasons file, or None when nothing was skipped (an old reasons file is then removed).
    ``write=False`` (other processes of a distributed run) only logs and checks.
    """
    path = Path(out_dir) / REASONS_FILE
    if not problems:
        if write and path.is_file():
            path.unlink()
        return None
    if write:
        write_jsonl(path, (p.row() for p in problems))
    total = skipped + kept
    where = f"reasons in {path}" if write else "reasons in the main process's output dir"
    if strict:
        raise StrictError(
            f"--strict: {skipped} of {total} records are bad ({len(problems)} problems); first: {problems[0]}; {where}"
        )
    log.warning("skipped %d of %d records (%d problems); %s", skipped, total, len(problems), where)
    return path
