"""`dvsft bench label`: images/s of raw rapidocr vs `dvsft label` with 1 and N workers, on the same pages.

The pages are plain white ``size`` x ``size`` images of ~200 random corpus words
(:func:`dvsft.sources.render.plain_page`, seed 0). Every run includes engine construction (and the
worker start-up); CPU time counts this process and its finished children (the pipeline's workers).
"""

from __future__ import annotations

import random
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORDS_PER_PAGE = 200


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pipeline's worker processes)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def bench_label(
    images: int = 24,
    size: int = 1024,
    workers: int = 2,
    keep: Path | None = None,
    single_thread: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """:func:`run_bench` in ``keep`` (kept) or in a temporary folder."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return run_bench(keep, images, size, workers, single_thread, log)
    with tempfile.TemporaryDirectory(prefix="dvsft-bench-label-") as tmp:
        return run_bench(Path(tmp), images, size, workers, single_thread, log)


def run_bench(
    folder: Path,
    n_images: int,
    size: int,
    workers: int,
    single_thread: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Render pages into ``folder``/pages, then time raw rapidocr, the pipeline with 1 and ``workers`` workers.

    Returns images/s per run (``raw``, ``w1``, ``w1t1`` with ``single_thread``, ``wN``), the ratios
    ``ratio_w1_raw`` and ``ratio_wn_w1``, a rich ``table`` and the ``lines`` that explain it.
    """
    from rapidocr import RapidOCR

    from dvsft.sources.corpora import corpus_words
    from dvsft.sources.image_to_label import collect_inputs, default_threads, label_inputs
    from dvsft.sources.render import plain_page

    pages = folder / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    vocab = [w for w in corpus_words() if w.isalnum()]
    rng = random.Random(0)
    for k in range(n_images):
        plain_page([rng.choice(vocab) for _ in range(WORDS_PER_PAGE)], size).save(pages / f"page{k:04d}.png")
    inputs = collect_inputs(pages)
    log(f"{n_images} pages of {size}x{size} px, ~{WORDS_PER_PAGE} words each; {default_threads(1)} cores")

    t0, c0 = time.perf_counter(), cpu_seconds()  # raw: engine construction + a plain loop, same settings
    raw = RapidOCR(params={"Global.log_level": "error", "Global.use_cls": False, "Global.return_word_box": True})
    raw_words = 0
    for x in inputs:
        for line in raw(str(x.path)).word_results or ():
            raw_words += sum(1 for item in line if isinstance(item, tuple) and item[2] is not None)
    results = {"raw": n_images / (time.perf_counter() - t0)}
    cpu = {"raw": cpu_seconds() - c0}
    words = {"raw": raw_words}
    runs = [("w1", 1, None), (f"w{workers}", workers, None)]  # threads: cores // workers
    if single_thread:
        runs.insert(1, ("w1t1", 1, 1))
    for key, n, threads in runs:
        out = folder / f"words_{key}.jsonl"
        for p in (out, out.with_name(f"{out.stem}.errors.jsonl")):
            p.unlink(missing_ok=True)
        c0 = cpu_seconds()
        stats = label_inputs(inputs, out, workers=n, engine_options={"threads": threads} if threads else None)
        cpu[key] = cpu_seconds() - c0
        results[key] = n_images / stats.seconds
        words[key] = stats.words
    r1 = results["w1"] / results["raw"]
    rn = results[f"w{workers}"] / results["w1"]
    return {
        **results,
        "ratio_w1_raw": r1,
        "ratio_wn_w1": rn,
        "table": _table(results, cpu, words, n_images, workers),
        "lines": _lines(results, r1, rn, workers, single_thread),
    }


def _table(results: dict[str, float], cpu: dict[str, float], words: dict[str, int], n_images: int, workers: int):
    from rich.table import Table

    from dvsft.sources.image_to_label import default_threads

    table = Table(title="dvsft bench label (images/s, engine load included)")
    for col in ("run", "images/s", "s/image", "CPU s/image", "cores busy", "words"):
        table.add_column(col)
    names = {
        "raw": "raw rapidocr loop (default threads)",
        "w1": f"dvsft label, 1 worker x {default_threads(1)} threads",
        "w1t1": "dvsft label, 1 worker x 1 thread",
        f"w{workers}": f"dvsft label, {workers} workers x {default_threads(workers)} threads",
    }
    for key, rate in results.items():
        busy = cpu[key] * rate / n_images
        table.add_row(
            names[key], f"{rate:.3f}", f"{1 / rate:.2f}", f"{cpu[key] / n_images:.2f}", f"{busy:.2f}", str(words[key])
        )
    return table


def _lines(results: dict[str, float], r1: float, rn: float, workers: int, single_thread: bool) -> list[str]:
    lines = [
        "cores busy = CPU seconds / wall seconds of our processes; well below the cores a run can use means "
        "other programs shared the CPU and the rates are disturbed.",
        f"pipeline 1 worker / raw: {r1:.2f}x (target >= 0.9x)",
        f"pipeline {workers} workers / 1 worker: {rn:.2f}x (target >= 1.7x for 2 workers)",
    ]
    if single_thread:
        ratio = results[f"w{workers}"] / results["w1t1"]
        lines.append(f"pipeline {workers} workers / 1 single-threaded worker: {ratio:.2f}x")
    return lines
