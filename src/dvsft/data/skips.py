"""What happens to records a reader had to skip: a logged count, a reasons file, ``--strict`` failure; and the
refusal of data that would train on nothing."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dvsft.core.records import Problem, write_jsonl

log = logging.getLogger(__name__)
REASONS_FILE = "skipped_records.jsonl"
EVAL_REASONS_FILE = "skipped_eval_records.jsonl"  # the records of eval_data


class StrictError(ValueError):
    """``--strict``: a bad record that would have been skipped."""


def report_skips(
    problems: list[Problem],
    skipped: int,
    kept: int,
    out_dir: str | Path,
    strict: bool = False,
    write: bool = True,
    name: str = REASONS_FILE,
) -> Path | None:
    """Log and write ``out_dir/name`` (one row per problem); raise :class:`StrictError` in strict mode.

    Returns the reasons file, or None when nothing was skipped (an old reasons file is then removed).
    ``write=False`` (other processes of a distributed run) only logs and checks.
    """
    path = Path(out_dir) / name
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


@dataclass
class LabelCount:
    """What a reader kept of a dataset: samples, their text and vision labels (None: not counted), and the
    records it skipped with the first problem."""

    samples: int = 0
    text: int | None = None
    vision: int | None = None
    skipped: int = 0
    first_problem: Problem | None = None


def require_labels(where: str, count: LabelCount, vision: bool, reasons: Path | str | None = None) -> None:
    """Refuse data that would train on nothing, with the counts: no sample left, no text label, or no vision
    label where the method trains on them (``vision``). ``reasons``: the file that lists the skipped records."""
    if count.samples == 0:
        why = ""
        if count.skipped:
            why = f": all {count.skipped} records were skipped (first: {count.first_problem})"
            why += f", reasons in {reasons}" if reasons is not None else ""
        raise ValueError(f"no trainable samples in {where}{why}")
    counts = f"{count.samples} samples, {count.text} text labels, {count.vision} vision labels"
    if count.text == 0:
        raise ValueError(f"no text labels in {where} ({counts}): no answer token to train on")
    if vision and count.vision == 0:
        raise ValueError(
            f"no vision labels in {where} ({counts}): no word of any record aligns to a visual token, and the "
            "method trains on them; give the records words (dvsft label) or use method sft"
        )
