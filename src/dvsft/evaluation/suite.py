"""``dvsft eval`` as a library call: load the model once, run each benchmark, merge the scores."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dvsft.evaluation.benchmarks import get_benchmark
from dvsft.evaluation.generation import Generator
from dvsft.evaluation.loaders import DEFAULT_SPLITS, iter_items
from dvsft.evaluation.metrics import check_rules, rules_label
from dvsft.evaluation.prompts import check_style, effective_post_prompt, prompt_template
from dvsft.evaluation.runner import WEIGHT_FILES, content_sha256, run_benchmark
from dvsft.evaluation.visible import read_selection, select_visible, write_selection

SUMMARY = "scores.json"


def render_family(model_dir: str | Path) -> str:
    """The family whose token grid SQuAD contexts are drawn on for the model in ``model_dir``: its own where its
    image is one grid of tokens (Qwen-VL), else :data:`~dvsft.models.families.DEFAULT_FAMILY`'s (the SQuAD run's
    settings say which); a model no family module knows is a ``ValueError`` naming the supported families."""
    from dvsft.models.families import DEFAULT_FAMILY, spec_for_model_dir

    spec = spec_for_model_dir(model_dir)
    return spec.name if spec.grid is not None else DEFAULT_FAMILY


def run_benchmarks(
    model_dir: str | Path,
    benches: list[str],
    data: list[str | Path],
    out_dir: str | Path,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_new_tokens: int | None = None,
    scales: list[float] | None = None,
    post_prompt: str | None = None,
    selection: str | Path | None = None,
    select_visible_n: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    device: str | None = None,
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
    skip_bad: bool = False,
    prompt_style: str = "paper",
    rules: str = "lmms-eval",
) -> dict[str, Any]:
    """Evaluate a model on benchmarks; returns ``{bench: scores}`` (also merged into ``OUT/scores.json``).

    ``progress(description, total)`` may return a callback that receives done-item counts. ``skip_bad``:
    items that cannot be read go to ``OUT/<bench>/errors.jsonl`` instead of stopping the run.
    ``post_prompt`` None takes ``prompt_style``'s own per benchmark; ``rules``: ``metrics.RULES``.
    ``limit``: a positive count. Predictions made from other model weights or data (by sha256) are generated
    again (:func:`dvsft.evaluation.runner.check_settings`).
    """
    import torch

    from dvsft.models.loading import load_model, load_processor

    if len(benches) != len(data):
        raise ValueError(f"--bench names {len(benches)} benchmark(s) but --data gives {len(data)} path(s)")
    specs = [get_benchmark(b) for b in benches]
    check_style(prompt_style)
    check_rules(rules)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be a positive number of items (leave it out to evaluate all)")
    if (select_visible_n or selection) and "ocrvqa" not in benches:
        raise ValueError("--select-visible / --selection apply to the ocrvqa benchmark only")
    for path in data:
        if not Path(path).exists():
            raise FileNotFoundError(f"--data {path} does not exist")
    family = render_family(model_dir)  # before loading: an unknown model stops here
    out = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = load_processor(model_dir, min_pixels=min_pixels, max_pixels=max_pixels)  # no tokenizer: stop now
    model_sha256 = content_sha256(model_dir, WEIGHT_FILES)  # before loading: a later change regenerates
    model = load_model(model_dir).to(device).eval()
    results: dict[str, Any] = {}
    for bench, path in zip(specs, data, strict=True):
        bench_split = split or DEFAULT_SPLITS[bench.name]
        if overwrite and (out / bench.name).exists():
            shutil.rmtree(out / bench.name)
        only_ids = None
        if bench.name == "ocrvqa" and (select_visible_n or selection):
            sel_file = Path(selection) if selection else out / "ocrvqa" / "selection.json"
            if select_visible_n and not _same_selection(sel_file, path, select_visible_n, seed, bench_split):
                tick = progress("OCR-VQA visibility (OCR)", None) if progress else None
                chosen = select_visible(path, select_visible_n, seed, bench_split, on_checked=tick)
                write_selection(sel_file, {**chosen, "data": str(Path(path).resolve())})
            only_ids = set(read_selection(sel_file))
        tokens = max_new_tokens or bench.max_new_tokens
        settings = {
            "model": str(Path(model_dir).resolve()),
            "data": str(Path(path).resolve()),
            "split": bench_split,
            "min_pixels": _size(processor, "shortest_edge"),
            "max_pixels": _size(processor, "longest_edge"),
            "max_new_tokens": tokens,
            "prompt_style": prompt_style,
            "post_prompt": effective_post_prompt(bench.name, prompt_style, post_prompt),
            "prompt": prompt_template(bench.name, prompt_style, post_prompt),
            "metric_rules": rules_label(rules),
            "scales": scales if bench.name == "ocr" else None,
            "selection": sorted(only_ids) if only_ids is not None else None,
            "render_family": family if bench.name == "squad" else None,  # the token grid SQuAD pages are drawn on
            "model_sha256": model_sha256,
            "data_sha256": content_sha256(path),
        }
        items = iter_items(bench.name, path, bench_split, family=family, only_ids=only_ids)
        counts = [c for c in (limit, len(only_ids) if only_ids is not None else None) if c is not None]
        total = min(counts) if counts else None
        if total is not None and bench.name == "ocr":
            total *= len(scales or [1.0])
        tick = progress(f"{bench.title}", total) if progress else None
        generate = Generator(model, processor, tokens)
        results[bench.name] = run_benchmark(
            bench,
            items,
            generate,
            out,
            settings,
            batch_size,
            limit,
            post_prompt,
            on_done=tick,
            skip_bad=skip_bad,
            prompt_style=prompt_style,
            rules=rules,
        )
    _merge_summary(out / SUMMARY, results)
    return results


def _size(processor: Any, key: str) -> int | None:
    """The processor's min (``shortest_edge``) or max (``longest_edge``) pixels, dict or SizeDict."""
    size = getattr(processor.image_processor, "size", None) or {}
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value is not None else None


def _same_selection(sel_file: Path, data: str | Path, n: int, seed: int, split: str) -> bool:
    """Whether ``sel_file`` already holds the selection asked for (the OCR pass is then skipped)."""
    if not sel_file.is_file():
        return False
    old = json.loads(sel_file.read_text())
    want = {"data": str(Path(data).resolve()), "requested": n, "seed": seed, "split": split}
    return all(old.get(k) == v for k, v in want.items())


def _merge_summary(path: Path, results: dict[str, Any]) -> None:
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))


def headline(scores: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) pairs worth a table cell, the primary metric first."""
    metrics = scores.get("metrics", {})
    primary = scores.get("primary")
    keys = [primary] + [k for k in metrics if k != primary]
    cells = []
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k in ("n_scored",):
            continue
        cells.append(
            (k, "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}" if isinstance(v, float) else str(v))
        )
    if scores.get("bench") == "ocr":
        for scale, m in metrics.get("scales", {}).items():
            cells.append((f"cer@{scale}", f"{m['cer']:.2f}"))
            cells.append((f"word_acc@{scale}", f"{m['word_accuracy']:.2f}"))
    return cells


def scores_table(results: dict[str, Any]):
    """A rich table of the run: benchmark, split, items, primary and other metrics."""
    from rich.table import Table

    table = Table(title="dvsft eval")
    for col in ("benchmark", "split", "n", "primary", "other metrics"):
        table.add_column(col)
    for name, s in results.items():
        cells = headline(s)
        primary = (
            f"{cells[0][0]} {cells[0][1]}"
            if cells
            else ("private: see submission.json" if s.get("answers_private") else "-")
        )
        other = ", ".join(f"{k} {v}" for k, v in cells[1:])
        table.add_row(name, str(s.get("settings", {}).get("split", "")), str(s.get("n", 0)), primary, other)
    return table
