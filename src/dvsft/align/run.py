"""`dvsft align`: align every word record of a file to one model's visual tokens.

Each output record is the input record plus ``grid: [rows, cols]``, ``vision_labels`` (with
``token_id`` when a tokenizer is given), ``dropped`` (words removed per filter) and ``align``
(the settings used; ``label_policy`` / ``multi_label`` / ``views`` only where not the defaults). Image paths are
rewritten relative to the output file. Lines and records that cannot be aligned (unreadable JSON, anything
:func:`dvsft.core.records.check_record` finds, an image size the processors refuse...) go to
``<out stem>.errors.jsonl``, one row per problem: ``{"file", "line", "id", "reason"}``.
Input where records exist but none aligns (a compressed file, a JSON array, Parquet without images) is an
error naming the first problem; empty input gives an empty output. Outputs never destroy
(:mod:`dvsft.core.outputs`): an existing output or overlay folder of other files is refused unless ``overwrite``.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dvsft.align.aligner import AlignConfig, align_record
from dvsft.core.images import ImageError, load_image
from dvsft.core.outputs import check_file, claim_folder, install_folder, refuse_inputs, temp_sibling
from dvsft.core.record_sources import iter_entries
from dvsft.core.record_table import DEFAULT_ROWS_PER_SHARD, check_format, write_records
from dvsft.core.records import Problem, check_record, has_image, image_path, write_jsonl
from dvsft.models.families import DEFAULT_FAMILY, family_source
from dvsft.models.geometry import Grid


def errors_path(out: Path) -> Path:
    from dvsft.sources.image_to_label import errors_path as beside

    return beside(out)


def load_tokenizer(model_dir: str | Path):
    """A local tokenizer directory via ``AutoTokenizer`` (remote code is never executed)."""
    from transformers import AutoTokenizer

    if not Path(model_dir).is_dir():
        raise ValueError(f"--tokenizer {model_dir}: not a directory")
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def align_file(
    words_file: str | Path,
    out: str | Path,
    source: Any = DEFAULT_FAMILY,
    tokenizer: Any = None,
    config: AlignConfig | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    overlay_dir: str | Path | None = None,
    overlay_limit: int | None = None,
    progress: Callable[[], Any] | None = None,
    fmt: str = "jsonl",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Align ``words_file`` (any record source: JSONL, Parquet, shards, a ``datasets`` folder) into ``out``
    (JSONL, or with ``fmt="parquet"`` a folder of shards); returns counts (records, aligned, errors = records
    that failed, error_rows, vision_labels, labeled_tokens, visual_tokens, overlays, dropped). Raises ``ValueError``
    when records exist but none aligns (nothing is written but the errors file)."""
    words_file, out = Path(words_file), Path(out)
    if not words_file.exists():
        raise ValueError(f"{words_file}: no such file or folder")
    check_format(fmt)
    check_outputs(words_file, out, fmt, overlay_dir, overwrite)
    err_file = errors_path(out)
    used_names: set[str] = set()
    out_dir = out.resolve() if fmt == "parquet" and out.suffix.lower() != ".parquet" else out.resolve().parent
    config = config or AlignConfig()
    settings = {
        "source": str(source),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
        "max_height_cells": config.max_height_cells,
        "max_subtokens": config.max_subtokens,
        "leading_space": config.leading_space,
        **policy_settings(config),
    }
    errors: list[dict[str, Any]] = []
    dropped: Counter = Counter()
    summary = Counter(
        dict.fromkeys(("records", "aligned", "vision_labels", "labeled_tokens", "visual_tokens", "failed"), 0)
    )
    overlays = 0
    source = family_source(source)  # the family and a model directory's settings, read once

    def rows():
        nonlocal overlays
        for entry in iter_entries(words_file):
            n, file = entry.number, entry.file
            summary["records"] += 1
            if progress:
                progress()
            if entry.error is not None:
                errors.append(Problem(str(file), n, None, entry.error).row())
                summary["failed"] += 1
                continue
            rec = entry.record
            assert rec is not None
            problems = check_record(rec, file, n)
            if not problems and not has_image(rec):  # text-only: kept as it is, no token to label
                summary["aligned"] += 1
                yield {**rec, "vision_labels": [], "align": settings}
                continue
            if not problems:
                try:
                    layout, alignment = align_record(rec, source, tokenizer, config, min_pixels, max_pixels, file)
                except (ValueError, KeyError, TypeError) as err:
                    rid = None if rec.get("id") is None else str(rec["id"])
                    problems = [Problem(str(file), n, rid, str(err))]
            if problems:
                errors.extend(p.row() for p in problems)
                summary["failed"] += 1
                continue
            row = dict(rec)
            if "image" in rec and not isinstance(rec.get("image_bytes"), bytes):
                img = image_path(rec, file)
                row["image"] = Path(os.path.relpath(img, out_dir)).as_posix()
            grid = layout.grid
            if grid is None:  # a tiled family: its view list instead of one grid
                row["views"] = [
                    {"kind": v.kind, "index": v.index, "grid": [v.rows, v.cols], "offset": v.offset}
                    for v in layout.views
                ]
                row["visual_tokens"] = sum(v.num_tokens for v in layout.views)
                row["dropped_per_view"] = {k: dict(sorted(c.items())) for k, c in alignment.per_view.items()}
            else:
                row["grid"] = [grid.rows, grid.cols]
            row["vision_labels"] = alignment.labels
            row["dropped"] = dict(sorted(alignment.dropped.items()))
            row["align"] = settings
            summary["aligned"] += 1
            summary["vision_labels"] += len(alignment.labels)
            summary["labeled_tokens"] += len({lab["token"] for lab in alignment.labels})
            summary["visual_tokens"] += grid.num_tokens if grid is not None else row["visual_tokens"]
            dropped.update(alignment.dropped)
            if (
                staging is not None
                and grid is not None
                and (overlay_limit is None or overlays < overlay_limit)
                and "image" in rec
            ):
                overlays += write_overlay(staging, rec, file, n, grid, alignment.labels, used_names, config)
            yield row
        if summary["records"] and not summary["aligned"]:
            _write_errors(err_file, errors)
            raise ValueError(_nothing_aligned(words_file, summary["records"], errors, err_file))

    staging = temp_sibling(overlay_dir, folder=True) if overlay_dir is not None else None  # overlays go here first
    try:
        write_records(out, rows(), fmt, rows_per_shard, "align", overwrite)
        if staging is not None and overlay_dir is not None:
            install_folder(staging, overlay_dir, "align", overwrite)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _write_errors(err_file, errors)
    failed = summary.pop("failed", 0)
    counts = {**summary, "errors": failed, "error_rows": len(errors), "overlays": overlays}
    return {**counts, "dropped": dict(sorted(dropped.items()))}


def policy_settings(config: AlignConfig) -> dict[str, Any]:
    """The label policy, multi-label and views keys of an output's ``align`` settings, only where they differ from the
    defaults (a bottom-right alignment writes the same bytes as before the policies existed)."""
    out: dict[str, Any] = {}
    if config.label_policy != AlignConfig.label_policy:
        out["label_policy"] = config.label_policy
    if config.multi_label != AlignConfig.multi_label:
        out["multi_label"] = config.multi_label
    if config.views != AlignConfig.views:
        out["views"] = config.views
    return out


def write_overlay(
    staging: Path,
    rec: dict[str, Any],
    file: Path,
    line: int,
    grid: Grid,
    labels: list[dict[str, Any]],
    used: set[str],
    config: AlignConfig | None = None,
) -> bool:
    """Save the overlay of an aligned record into ``staging``, drawn on :func:`dvsft.core.images.load_image`'s
    upright RGB picture (transparency on white, 16-bit scaled); False when its image cannot be read."""
    from dvsft.align.overlay import save_overlay, unique_name

    source = rec["image_bytes"] if isinstance(rec.get("image_bytes"), bytes) else image_path(rec, file)
    try:
        image = load_image(source)
    except ImageError:
        return False
    if image.size != (grid.width, grid.height):  # the record's size is authoritative
        image = image.resize((grid.width, grid.height))
    policy = (config or AlignConfig()).label_policy
    save_overlay(staging / unique_name(rec.get("id"), line, used), image, grid, labels, rec.get("words"), policy)
    return True


def check_outputs(words_file: Path, out: Path, fmt: str, overlay_dir: str | Path | None, overwrite: bool) -> None:
    """Refuse outputs that are the input, or exist without ``overwrite`` (:mod:`dvsft.core.outputs`); nothing is
    written. :func:`align_file` calls it first; a caller may call it before showing progress."""
    refuse_inputs([out, errors_path(out), overlay_dir], [words_file])
    if fmt == "parquet" and out.suffix.lower() != ".parquet":
        claim_folder(out, "align", overwrite)
    else:
        check_file(out, overwrite)
    check_file(errors_path(out), overwrite)
    if overlay_dir is not None:
        claim_folder(overlay_dir, "align", overwrite, hint="choose another --overlay or pass --overwrite")


def _write_errors(err_file: Path, errors: list[dict[str, Any]]) -> None:
    """The errors file of this run: its rows, or no file when there were none."""
    if errors:
        write_jsonl(err_file, errors)
    else:
        err_file.unlink(missing_ok=True)


def _nothing_aligned(words_file: Path, records: int, errors: list[dict[str, Any]], err_file: Path) -> str:
    first = Problem(**errors[0]) if errors else "no problem recorded"
    return f"none of the {records} records of {words_file} could be aligned; first: {first} (all problems: {err_file})"
