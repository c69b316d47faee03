"""`dvsft render`: documents (+ QA) -> rendered page images + word records with chat messages.

Per document (its random generator is seeded by ``seed`` and the document id, so output does not
depend on resuming or on the number of workers):

- QA documents: each QA pair goes to the page on which every character of its answer is drawn
  (SQuAD ``answer_start`` when it matches the text, else the first such occurrence of the answer).
  A pair whose answer is split over two pages, or has a word the renderer skipped (no glyph, taller
  than a row, too long), or is not in the text, is dropped and counted (``qa_dropped_answer_*``).
  The pairs of a page are grouped ``qa_per_image`` at a time and each group gets its own freshly
  coloured image of that page. Pages without QA are not written.
- Documents without QA: every page gets a transcription task (user ``<image>Transcribe the text in
  the image.``, assistant = the page's words joined by spaces).

Output: ``DIR/images/*.png``, ``DIR/words.jsonl`` (word records; image paths relative to it),
``DIR/render_stats.json``. A rerun skips documents whose records are all written. ``DIR`` is marked as
render's output (:mod:`dvsft.core.outputs`): a folder of other files, or one holding the source, is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dvsft.core.outputs import add_to_marker, refuse_inputs, replace_with, start_folder
from dvsft.core.record_table import check_format
from dvsft.core.records import IMAGE_PLACEHOLDER, JsonlAppender, read_jsonl, write_jsonl
from dvsft.models.families import DEFAULT_FAMILY
from dvsft.sources.corpora import QA, Document, load_documents
from dvsft.sources.instructions import TRANSCRIBE_INSTRUCTION, qa_prompt
from dvsft.sources.render import PageLayout, Renderer, RenderStyle

ANSWER_REASONS = ("answer_not_in_text", "answer_not_drawn", "answer_across_pages")


@dataclass(frozen=True)
class RenderOptions:
    """What `dvsft render` draws and writes (its options, same names); a value it cannot use raises ``ValueError``."""

    family: str = DEFAULT_FAMILY
    cols: int = 32
    max_rows: int = 32
    font: str = "random"
    font_size: int = 20
    dark_text: bool = False
    full_height: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    qa_per_image: int = 1
    seed: int = 0
    png: str = "palette"  # or "rgb"
    source_format: str = "auto"
    ppl_model: str | None = None
    max_answer_ppl: float | None = None
    max_question_ppl: float | None = None
    min_doc_gain: float | None = None
    ppl_batch_size: int = 8
    workers: int = 1
    max_word_chars: int = 10_000  # longer words are skipped (word_too_long); 0 = no cap
    out_format: str = "jsonl"  # or "parquet": also DIR/words/ shards, built from words.jsonl at the end
    rows_per_shard: int = 10_000

    def __post_init__(self) -> None:
        ppl_limits = (self.max_answer_ppl, self.max_question_ppl, self.min_doc_gain)
        if any(v is not None for v in ppl_limits) and self.ppl_model is None:
            raise ValueError("--max-answer-ppl / --max-question-ppl / --min-doc-gain need --ppl-model")
        if self.max_word_chars < 0:
            raise ValueError(f"--max-word-chars {self.max_word_chars}: must be 0 (no cap) or positive")
        if self.qa_per_image < 1:
            raise ValueError(f"--qa-per-image {self.qa_per_image}: must be at least 1")
        if self.png not in ("palette", "rgb"):
            raise ValueError(f"--png {self.png!r}: use 'palette' or 'rgb'")

    def renderer(self) -> Renderer:
        style = RenderStyle(
            font=self.font,
            font_size=self.font_size,
            dark_text=self.dark_text,
            full_height=self.full_height,
            max_word_chars=self.max_word_chars or None,
        )
        return Renderer(self.family, self.cols, self.max_rows, style, self.min_pixels, self.max_pixels)


@functools.cache
def _renderer(options: RenderOptions) -> Renderer:
    return options.renderer()


def safe_name(record_id: str) -> str:
    """A file name for a record id (ids with unusual characters get a short hash to stay unique)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)
    if safe != record_id:
        safe += "-" + hashlib.sha1(record_id.encode("utf-8")).hexdigest()[:6]
    return safe


def answer_occurrences(text: str, qa: QA) -> list[tuple[int, int]]:
    """Candidate character spans of the answer: ``answer_start`` when it matches, else every occurrence."""
    answer = qa.answers[0].strip()
    if not answer:
        return []
    if qa.answer_start is not None and text[qa.answer_start : qa.answer_start + len(answer)] == answer:
        return [(qa.answer_start, qa.answer_start + len(answer))]
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(answer), text)]
    if not spans:
        spans = [(m.start(), m.end()) for m in re.finditer(re.escape(answer), text, flags=re.IGNORECASE)]
    return spans


def char_pages(text: str, layouts: list[PageLayout]) -> list[int]:
    """For each character of ``text``: the index of the page that draws it, or -1 (whitespace, skipped words)."""
    owner = [-1] * len(text)
    for i, lay in enumerate(layouts):
        for placement in lay.placements:
            start, end = placement.span
            owner[start:end] = [i] * (end - start)
    return owner


def locate_answer(text: str, qa: QA, layouts: list[PageLayout], owner: list[int] | None = None) -> int | str:
    """Index of the page that draws every character of the answer, else why none does.

    Reasons: ``answer_not_in_text``, ``answer_not_drawn`` (a word of the answer was skipped by the
    renderer: no glyph, taller than a row, too long), ``answer_across_pages``. With several candidate
    spans the first that lies on one page wins; otherwise the first span's reason is given.
    """
    spans = answer_occurrences(text, qa)
    if not spans:
        return "answer_not_in_text"
    owner = char_pages(text, layouts) if owner is None else owner
    reasons = []
    for start, end in spans:
        pages = {owner[c] for c in range(start, end) if not text[c].isspace()}
        if -1 in pages:
            reasons.append("answer_not_drawn")
        elif len(pages) == 1:
            return pages.pop()
        else:
            reasons.append("answer_across_pages")
    return reasons[0]


def render_document(doc: Document, options: RenderOptions, out_dir: Path) -> tuple[list[dict[str, Any]], Counter]:
    """Render one document's records and images (runs in worker processes too)."""
    renderer = _renderer(options)
    rng = random.Random(f"{options.seed}:{doc.id}")
    counts: Counter = Counter()
    layouts = renderer.layout(doc.text, rng)
    for lay in layouts:
        counts.update({f"words_{k}": v for k, v in lay.skipped.items()})
    if not any(lay.placements for lay in layouts):
        counts["empty_documents"] += 1
        counts["qa_dropped_answer_not_drawn"] += len(doc.qas or [])
        return [], counts
    jobs: list[tuple[int, list[QA] | None]] = []
    if doc.qas is None:
        jobs = [(i, None) for i, lay in enumerate(layouts) if lay.placements]
    else:
        by_page: dict[int, list[QA]] = defaultdict(list)
        owner = char_pages(doc.text, layouts)
        for qa in doc.qas:
            page = locate_answer(doc.text, qa, layouts, owner)
            if isinstance(page, str):  # never on a page that does not show the whole answer
                counts[f"qa_dropped_{page}"] += 1
                continue
            by_page[page].append(qa)
        step = max(1, options.qa_per_image)
        for page in sorted(by_page):
            group = by_page[page]
            jobs += [(page, group[i : i + step]) for i in range(0, len(group), step)]
    records = []
    for k, (page_index, qas) in enumerate(jobs):
        page = renderer.draw(layouts[page_index], rng)
        rid = f"{doc.id}-p{page_index}" if qas is None else f"{doc.id}-p{page_index}-{k}"
        rel = Path("images") / f"{safe_name(rid)}.png"
        page.save(out_dir / rel, mode=options.png)
        messages = None  # None: the page's transcription task
        if qas is not None:
            messages = []
            for j, qa in enumerate(qas):
                prompt = qa_prompt(qa.question, rng)
                messages.append(
                    {"role": "user", "content": prompt if j == 0 else prompt.replace(IMAGE_PLACEHOLDER, "", 1)}
                )
                messages.append({"role": "assistant", "content": qa.answers[0].strip()})
        record: dict[str, Any] = {"doc": doc.id, "page": page_index, **page.record(rid, rel.as_posix(), messages)}
        if qas is not None:
            record["qas"] = [
                {"question": qa.question, "answers": qa.answers, **({"id": qa.id} if qa.id else {}), **qa.scores}
                for qa in qas
            ]
        record["render"] = {
            "family": renderer.family,
            "font": page.font,
            "font_size": page.font_size,
            "background": list(page.background),
            "foreground": list(page.foreground),
        }
        records.append(record)
    for r in records:
        r["doc_records"] = len(records)
    counts["pages_used"] += len({p for p, _ in jobs})
    return records, counts


def completed_documents(words_file: Path) -> set[str]:
    """Documents whose records are all in ``words_file``; records of partly written ones are removed."""
    if not words_file.exists():
        return set()
    rows = list(read_jsonl(words_file, own=True))
    written = Counter(r.get("doc") for r in rows)
    expected = {r.get("doc"): r.get("doc_records") for r in rows}
    done = {d for d, n in written.items() if d is not None and expected[d] == n}
    if len(done) != len(written):
        write_jsonl(words_file, (r for r in rows if r.get("doc") in done))
    return done


def _render_job(args: tuple[Document, RenderOptions, Path]) -> tuple[list[dict[str, Any]], Counter]:
    return render_document(*args)


def render_documents(
    docs: Iterable[Document], options: RenderOptions, out_dir: Path, workers: int = 1
) -> Iterable[tuple[list[dict[str, Any]], Counter]]:
    """Render documents in order, in this process or in ``workers`` spawned processes."""
    if workers <= 1:
        for doc in docs:
            yield render_document(doc, options, out_dir)
        return
    from dvsft.core.pools import spawn_pool

    with spawn_pool(workers) as pool:
        yield from pool.map(_render_job, ((d, options, out_dir) for d in docs), chunksize=4)


def apply_ppl_filter(
    docs: list[Document], options: RenderOptions, counts: Counter, progress: Callable[[int, int], Any] | None = None
) -> dict[str, dict[str, float]]:
    """Score every QA pair with the perplexity model; drop pairs over the thresholds (in place).

    Returns the quantiles of each score over all pairs (before dropping), to choose thresholds from.
    """
    from dvsft.sources.perplexity import SCORES, PerplexityScorer, keep_pair, quantiles

    items = [(doc, qa) for doc in docs if doc.qas for qa in doc.qas]
    if not items:
        return {}
    scorer = PerplexityScorer(options.ppl_model, batch_size=options.ppl_batch_size)
    total = 3 * len(items)
    scores = scorer.qa_scores(
        [(doc.text, qa.question, qa.answers[0]) for doc, qa in items],
        progress=(lambda n: progress(n, total)) if progress else None,
    )
    for (_, qa), s in zip(items, scores, strict=True):
        qa.scores = {k: round(v, 4) for k, v in s.items()}
    measured = {k: quantiles([s[k] for s in scores]) for k in SCORES}
    for doc in docs:
        if not doc.qas:
            continue
        kept = []
        for qa in doc.qas:
            reason = keep_pair(qa.scores, options.max_answer_ppl, options.max_question_ppl, options.min_doc_gain)
            if reason is None:
                kept.append(qa)
            else:
                counts[f"qa_dropped_{reason}"] += 1
        doc.qas = kept
    return measured


def render_source(
    source: str | Path,
    out_dir: str | Path,
    options: RenderOptions | None = None,
    progress: Callable[[str, int, int], Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Render a source file into ``out_dir``; returns (and writes) the run's statistics. ``out_dir`` may be new,
    empty or render's own (resumed); a folder of other files is written into only with ``overwrite``."""
    options = options or RenderOptions()
    out_dir = Path(out_dir)
    options.renderer()  # validate the geometry before any work
    check_format(options.out_format)
    refuse_inputs([out_dir], [source, options.ppl_model])
    start_folder(out_dir, "render", overwrite)
    counts: Counter = Counter({k: 0 for k in ("records", "samples", "empty_documents", "pages_used")})
    docs = load_documents(source, options.source_format, counts)
    words_file = out_dir / "words.jsonl"
    done = completed_documents(words_file)
    pending = [d for d in docs if d.id not in done]
    qa_docs = [d for d in pending if d.qas is not None]
    counts["qa_pairs"] = sum(len(d.qas) for d in qa_docs)
    counts["documents_without_qa_pairs"] = sum(1 for d in qa_docs if not d.qas)
    measured = {}
    if options.ppl_model:
        measured = apply_ppl_filter(
            qa_docs, options, counts, (lambda n, t: progress("perplexity", n, t)) if progress else None
        )
    todo = [d for d in pending if d.qas is None or d.qas]
    counts["qa_pairs_kept"] = sum(len(d.qas) for d in todo if d.qas)
    with JsonlAppender(words_file) as out:
        for records, c in render_documents(todo, options, out_dir, options.workers):
            counts.update(c)
            for r in records:
                out.write(r)
            counts["records"] += len(records)
            counts["samples"] += sum(1 for r in records for m in r["messages"] if m["role"] == "assistant")
            if progress:
                progress("render", 1, len(todo))
    counts["documents_rendered"] = sum(1 for d in todo) - counts["empty_documents"]
    counts["qa_pairs_kept"] -= sum(counts[f"qa_dropped_{r}"] for r in ANSWER_REASONS)
    images = [out_dir / r["image"] for r in read_jsonl(words_file, own=True)]
    stats: dict[str, Any] = {
        "source": str(source),
        "documents": len(docs),
        "documents_resumed": len(done & {d.id for d in docs}),
        **dict(sorted(counts.items())),
        "images": counts["records"],
        "records_in_file": len(images),
        **({"ppl_quantiles": measured} if measured else {}),
        "options": asdict(options),
        "transcription_instruction": TRANSCRIBE_INSTRUCTION,
    }
    if options.out_format == "parquet":
        from dvsft.core.convert import convert

        convert(words_file, out_dir / "words", "parquet", options.rows_per_shard, overwrite=True)
        images.extend((out_dir / "words").glob("part-*.parquet"))
    replace_with(out_dir / "render_stats.json", (json.dumps(stats, indent=2) + "\n").encode("utf-8"))
    add_to_marker(out_dir, "render", [words_file, out_dir / "render_stats.json", *images])
    return stats
