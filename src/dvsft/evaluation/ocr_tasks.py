"""OCR test sets (paper section 5.4): rendered real text (contextual) and frequency-sampled word salad.

A test set is a word-records file: one rendered page per record, its words, and the transcription
turn ("<image>Transcribe the text in the image." -> the page's words joined by spaces), so
``dvsft eval --bench ocr --data DIR/words.jsonl`` scores it like any other set. The folder is marked as
ocr-set's output (:mod:`dvsft.core.outputs`): a folder of other files, or one holding the corpus, is refused.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvsft.core.outputs import claim_folder, install_folder, refuse_inputs, temp_sibling
from dvsft.core.records import read_jsonl, write_jsonl
from dvsft.models.families import DEFAULT_FAMILY

if TYPE_CHECKING:
    from dvsft.sources.render import Renderer

KINDS = ("contextual", "noncontextual")
COMMAND = "ocr-set"  # the name in the output folder's marker
WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def parse_scales(text: str) -> list[float]:
    """``"0.5,0.75,1.0"`` -> ``[0.5, 0.75, 1.0]``: the image scale factors of an OCR task (positive)."""
    values = [float(s) for s in text.split(",") if s.strip()]
    if any(v <= 0 for v in values):
        raise ValueError("factors must be positive")
    return values


def read_corpus(path: str | Path | None) -> list[str]:
    """Documents of a corpus: None = the bundled pydoc prose; ``.txt`` (blank-line separated),
    ``.jsonl`` (field ``document``, ``text`` or ``content``: XSUM's layout has ``document``),
    ``.parquet`` (same columns) or a folder of ``.txt`` files (one document each)."""
    if path is None:
        from dvsft.sources.corpora import corpus_text

        return _paragraphs(corpus_text())
    path = Path(path)
    if path.is_dir():
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.glob("*.txt"))]
    elif path.suffix == ".jsonl":
        docs = [_doc_field(row, f"{path}:{n}") for n, row in enumerate(read_jsonl(path), 1)]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        docs = [_doc_field(row, f"{path} row {n}") for n, row in enumerate(pq.read_table(path).to_pylist())]
    elif path.is_file():
        docs = _paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    else:
        raise FileNotFoundError(f"--corpus {path} does not exist")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"--corpus {path}: no documents found")
    return docs


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _doc_field(row: Any, where: str) -> str:
    if isinstance(row, str):
        return row
    for key in ("document", "text", "content"):
        if isinstance(row, dict) and isinstance(row.get(key), str):
            return row[key]
    raise ValueError(f"{where}: expected a 'document', 'text' or 'content' string field")


def passages(docs: list[str], min_chars: int, max_chars: int) -> list[str]:
    """Each document cut at word boundaries into consecutive passages of at most ``max_chars``;
    passages shorter than ``min_chars`` are dropped."""
    out = []
    for doc in docs:
        words, cur = doc.split(), ""
        for w in words:
            if cur and len(cur) + 1 + len(w) > max_chars:
                if len(cur) >= min_chars:
                    out.append(cur)
                cur = ""
            cur = f"{cur} {w}" if cur else w[:max_chars]
        if len(cur) >= min_chars:
            out.append(cur)
    return out


def contextual_texts(
    docs: list[str], n: int, rng: random.Random, min_chars: int = 200, max_chars: int = 600
) -> list[str]:
    """``n`` distinct real passages of ``min_chars``..``max_chars`` characters."""
    pool = passages(docs, min_chars, max_chars)
    if len(pool) < n:
        raise ValueError(
            f"the corpus yields {len(pool)} passages of {min_chars}-{max_chars} characters, fewer than {n}"
        )
    return rng.sample(pool, n)


def noncontextual_texts(
    docs: list[str], n: int, rng: random.Random, min_chars: int = 200, max_chars: int = 500
) -> list[str]:
    """``n`` meaningless word sequences: words drawn by corpus frequency up to a random length in [min, max]."""
    counts = Counter(w for d in docs for w in WORD.findall(d))
    if not counts:
        raise ValueError("the corpus has no words")
    vocab, weights = list(counts), list(counts.values())
    texts = []
    for _ in range(n):
        target, text, misses = rng.randint(min_chars, max_chars), "", 0
        while len(text) < target:
            w = rng.choices(vocab, weights)[0]
            if len(text) + 1 + len(w) > max_chars:
                misses += 1
                if len(text) >= min_chars or misses > 1000:
                    break
                continue
            text = f"{text} {w}" if text else w
        texts.append(text)
    return texts


def check_output(out_dir: str | Path, corpus: str | Path | None = None, overwrite: bool = False) -> None:
    """Refuse (:class:`dvsft.core.outputs.OutputError`) an output folder that is or holds the corpus, or that holds
    files ``dvsft ocr-set`` did not write (unless ``overwrite``); nothing is written."""
    refuse_inputs([out_dir], [corpus])
    claim_folder(out_dir, COMMAND, overwrite)


def build_ocr_set(
    kind: str,
    out_dir: str | Path,
    n: int = 500,
    corpus: str | Path | None = None,
    seed: int = 0,
    family: str = DEFAULT_FAMILY,
    cols: int = 32,
    max_rows: int = 32,
    font: str = "DejaVuSans",
    dark_text: bool = False,
    min_chars: int | None = None,
    max_chars: int | None = None,
    on_page: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Render ``n`` pages of ``kind`` text into ``out_dir/images`` and write ``out_dir/words.jsonl`` and ``info.json``.

    Outputs never destroy (:mod:`dvsft.core.outputs`): the set is built in a temporary sibling folder and moved in;
    an existing ``out_dir`` must be empty or ocr-set's own (:func:`check_output`), and only the files ocr-set
    wrote there before are replaced.
    """
    from dvsft.sources.render import Renderer, RenderStyle

    if kind not in KINDS:
        raise ValueError(f"unknown OCR set kind {kind!r}; use one of {', '.join(KINDS)}")
    check_output(out_dir, corpus, overwrite)
    rng = random.Random(seed)
    docs = read_corpus(corpus)
    if kind == "contextual":
        texts = contextual_texts(docs, n, rng, min_chars or 200, max_chars or 600)
    else:
        texts = noncontextual_texts(docs, n, rng, min_chars or 200, max_chars or 500)
    renderer = Renderer(family=family, cols=cols, max_rows=max_rows, style=RenderStyle(font=font, dark_text=dark_text))
    staging = temp_sibling(out_dir, folder=True)
    try:
        stats = write_pages(staging, kind, texts, renderer, rng, on_page)
        info = {
            "kind": kind,
            "n": stats["n"],
            "seed": seed,
            "corpus": str(corpus) if corpus else "dvsft.sources.corpora.corpus_text (pydoc topics)",
            "family": family,
            "cols": cols,
            "max_rows": max_rows,
            "mean_reference_chars": stats["mean_reference_chars"],
            "texts_cut_by_page": stats["texts_cut_by_page"],
        }
        (staging / "info.json").write_text(json.dumps(info, indent=2))
        install_folder(staging, out_dir, COMMAND, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Path(out_dir) / "words.jsonl"


def write_pages(
    folder: Path,
    kind: str,
    texts: list[str],
    renderer: Renderer,
    rng: random.Random,
    on_page: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Render each text's first page into ``folder/images`` and write ``folder/words.jsonl``; returns ``n``,
    ``mean_reference_chars`` and ``texts_cut_by_page`` (texts longer than one page)."""
    records, ref_chars, cut = [], 0, 0
    for i, text in enumerate(texts):
        page = renderer.render_text(text, rng)[0]  # text beyond one page is not part of the reference
        cut += page.text != " ".join(text.split())
        rel = f"images/{kind}-{i:05d}.png"
        page.save(folder / rel)
        records.append({**page.record(f"{kind}-{i:05d}", rel), "kind": kind})
        ref_chars += len(page.text)
        if on_page:
            on_page(1)
    write_jsonl(folder / "words.jsonl", records)
    return {"n": len(records), "mean_reference_chars": ref_chars / max(1, len(records)), "texts_cut_by_page": cut}
