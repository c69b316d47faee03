"""Training samples from word-record JSONL files (see :mod:`dvsft.core.records`).

A record holds one image and a conversation of question-answer pairs (user turn, assistant turn,
user turn, ...). Two options choose the samples:

* ``qa_per_image``: at most this many pairs per image, drawn with ``seed`` among the pairs of every
  record of that image (``None``: all pairs). The paper keeps 1 (2 for InfoVQA) so an image's vision
  labels are not trained several times per epoch; draw fresh pairs each epoch with ``seed=epoch``.
* ``keep_conversations``: the chosen pairs of a record stay one multi-turn sample (``True``; the
  paper's InfoVQA setting: two pairs, one sample, the vision labels once) or each pair becomes its
  own sample (``False``; the image and its vision labels repeat in each).

Every sample keeps the record's system turns, and the image placeholder ``<image>`` goes with the
sample's first user turn. A record without an image is text-only: its samples train the text loss alone (no
visual tokens, no vision labels), ``qa_per_image`` counting its pairs as those of an image of its own. Bad lines
and records (unreadable JSON, anything :func:`dvsft.core.records.check_record` finds: missing or undecodable
image, a size that differs from the image's, non-numeric / non-finite / inverted boxes, an image placeholder or
word boxes in a record without an image; no assistant answer, malformed messages) are skipped, logged with
their file, line, id and reason, and listed in the result's ``skipped`` and ``problems``. Given the run's collator,
:func:`check_samples` then skips the samples it cannot encode or that exceed its ``max_length``, the same way.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dvsft.core.record_sources import iter_entries
from dvsft.core.records import IMAGE_PLACEHOLDER, Problem, check_record, has_image, image_path, record_id
from dvsft.data.skips import LabelCount

log = logging.getLogger(__name__)


class RecordList(list):
    """A list of sample dicts that also carries what was skipped.

    ``skipped``: ``[(record id, reason), ...]``, one per skipped line, record or sample; ``problems``: every
    :class:`dvsft.core.records.Problem` found (file, line, id, reason), possibly several per record.
    ``where``: the file and line of each sample's record. ``labels``: ``(text labels, vision labels)`` of each
    sample (its labeled answer tokens and visual tokens) once a collator checked them (:func:`check_samples`),
    else None; ``lengths``: each sample's tokens then (what packing bins, :mod:`dvsft.data.packing`), else None.
    """

    skipped: list[tuple[str, str]]
    problems: list[Problem]
    where: list[tuple[str, int]]
    labels: list[tuple[int, int]] | None
    lengths: list[int] | None

    def __init__(
        self,
        items=(),
        skipped: list[tuple[str, str]] | None = None,
        problems: list[Problem] | None = None,
        where: list[tuple[str, int]] | None = None,
        labels: list[tuple[int, int]] | None = None,
        lengths: list[int] | None = None,
    ):
        super().__init__(items)
        self.skipped = list(skipped or [])
        self.problems = list(problems or [])
        self.where = list(where or [])
        self.labels = None if labels is None else list(labels)
        self.lengths = None if lengths is None else list(lengths)

    def add(self, other: RecordList) -> None:
        """Append ``other``'s samples with their skips and problems (the samples of several sources)."""
        self.extend(other)
        self.skipped += other.skipped
        self.problems += other.problems
        self.where += other.where
        if self.labels is not None or other.labels is not None:
            self.labels = (self.labels or []) + (other.labels or [])
        if self.lengths is not None or other.lengths is not None:
            self.lengths = (self.lengths or []) + (other.lengths or [])

    def count(self) -> LabelCount:
        """The samples, their labels (where counted), the skipped records and the first problem."""
        text = vision = None
        if self.labels is not None:
            text, vision = sum(t for t, _ in self.labels), sum(v for _, v in self.labels)
        first = self.problems[0] if self.problems else None
        return LabelCount(len(self), text, vision, len(self.skipped), first)

    def head(self, n: int) -> RecordList:
        """The first ``n`` samples, with all the skips and problems."""
        labels = None if self.labels is None else self.labels[:n]
        lengths = None if self.lengths is None else self.lengths[:n]
        return RecordList(self[:n], self.skipped, self.problems, self.where[:n], labels, lengths)


def has_image_placeholder(message: dict[str, Any]) -> bool:
    content = message.get("content")
    if isinstance(content, str):
        return IMAGE_PLACEHOLDER in content
    return any(isinstance(p, dict) and p.get("type") == "image" for p in content or [])


def qa_pairs(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """(system turns, [[user turns..., assistant turn], ...]): each pair ends with an assistant answer."""
    system, pairs, current = [], [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m)
            continue
        current.append(m)
        if m["role"] == "assistant":
            pairs.append(current)
            current = []
    return system, pairs


def _move_image_to(pair: list[dict[str, Any]], template: dict[str, Any]) -> list[dict[str, Any]]:
    """A copy of the pair whose first user turn carries the image (as the record's first image turn wrote it)."""
    pair = copy.deepcopy(pair)
    if any(has_image_placeholder(m) for m in pair):
        return pair
    user = next((m for m in pair if m["role"] == "user"), None)
    if user is None:
        return pair
    if isinstance(user["content"], str):
        user["content"] = IMAGE_PLACEHOLDER + ("\n" if _placeholder_newline(template) else "") + user["content"]
    else:
        user["content"] = [{"type": "image"}, *user["content"]]
    return pair


def _placeholder_newline(template: dict[str, Any]) -> bool:
    content = template.get("content")
    return isinstance(content, str) and (IMAGE_PLACEHOLDER + "\n") in content


def training_problem(record: dict[str, Any]) -> str | None:
    """The training-specific reason a record that :func:`check_record` passed cannot be trained on, or None."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no messages"
    if not any(m["role"] == "assistant" and _text_of(m).strip() for m in messages):
        return "no assistant turn with an answer"
    if sum(_count_images(m) for m in messages) > 1:
        return "more than one image placeholder (one image per record is supported)"
    return None


def _text_of(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))


def _count_images(message: dict[str, Any]) -> int:
    content = message["content"]
    if isinstance(content, str):
        return content.count(IMAGE_PLACEHOLDER)
    return sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image")


def expand_record(
    record: dict[str, Any], chosen: list[int] | None = None, keep_conversations: bool = False
) -> list[dict[str, Any]]:
    """Samples of one (valid) record: its QA pairs ``chosen`` (all when None), one sample or one per pair."""
    system, pairs = answered_pairs(record)
    chosen = list(range(len(pairs))) if chosen is None else sorted(chosen)
    if not chosen:
        return []
    rid = str(record.get("id", ""))
    image_turn = next((m for m in record["messages"] if has_image_placeholder(m)), {})
    image_in_system = any(has_image_placeholder(m) for m in system)

    def sample_of(ks: list[int], sid: str) -> dict[str, Any]:
        turns = [m for k in ks for m in copy.deepcopy(pairs[k])]
        if has_image(record) and not image_in_system:
            turns = _move_image_to(turns, image_turn)
        return dict(record, messages=copy.deepcopy(system) + turns, id=sid, source_id=rid)

    if keep_conversations:
        whole = len(chosen) == len(pairs)
        return [sample_of(chosen, rid if whole else rid + "#qa" + "+".join(map(str, chosen)))]
    return [sample_of([k], rid if len(pairs) == 1 else f"{rid}#qa{k}") for k in chosen]


def answered_pairs(record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """(system turns, QA pairs whose answer is not empty) of a record."""
    system, pairs = qa_pairs(record["messages"])
    return system, [p for p in pairs if _text_of(p[-1]).strip()]


def select_samples(
    records: list[dict[str, Any]],
    qa_per_image: int | None = None,
    keep_conversations: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Samples of valid records (image paths resolved): ``qa_per_image`` pairs per image, grouped or not.

    The pairs of an image are pooled over all its records (same ``image`` path) and drawn with a
    generator seeded by ``seed`` and the image's file name, so the draw depends neither on file order
    nor on where the data folder lies. A text-only record (or one holding its image bytes) is a pool of its
    own, seeded by its id.
    """
    return [sample for _, sample in _samples_of(records, qa_per_image, keep_conversations, seed)]


def _samples_of(
    records: list[dict[str, Any]], qa_per_image: int | None, keep_conversations: bool, seed: int
) -> list[tuple[int, dict[str, Any]]]:
    """:func:`select_samples`, each sample with the index of its record."""
    if qa_per_image is not None and qa_per_image < 1:
        raise ValueError(f"qa_per_image must be >= 1 (or None for all pairs), got {qa_per_image}")
    chosen: dict[int, list[int] | None] = {}
    if qa_per_image is not None:
        by_image: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for r, record in enumerate(records):
            pool = by_image.setdefault(_pool_of(record, r), [])
            pool.extend((r, k) for k in range(len(answered_pairs(record)[1])))
        for (_, name), pool in by_image.items():
            if len(pool) > qa_per_image:
                pool = random.Random(f"{seed}:{name}").sample(pool, qa_per_image)
            for r, k in pool:
                chosen.setdefault(r, []).append(k)  # type: ignore[union-attr]
    samples: list[tuple[int, dict[str, Any]]] = []
    for r, record in enumerate(records):
        if qa_per_image is not None and r not in chosen:
            continue
        samples.extend((r, sample) for sample in expand_record(record, chosen.get(r), keep_conversations))
    return samples


def _pool_of(record: dict[str, Any], index: int) -> tuple[str, str]:
    """(pool key, seed name) of a record's QA pairs: its image file (path; file name), or, for a text-only record
    or one holding its image bytes, the record itself (index; id)."""
    image = record.get("image")
    if image is not None:
        return str(image), Path(str(image)).name
    return f"#{index}", str(record.get("id", index))


def load_records(
    path: str | Path,
    one_qa_per_image: bool = False,
    seed: int = 0,
    qa_per_image: int | None = None,
    keep_conversations: bool = False,
    collator: Any = None,
    workers: int = 0,
) -> RecordList:
    """Training samples of a record source (JSONL or Parquet file, folder of shards, ``datasets`` folder: see
    :mod:`dvsft.core.record_sources`), image paths made absolute, bad records skipped. Everything is held in memory;
    ``dvsft.data.streaming`` streams large sources instead.

    ``one_qa_per_image=True`` is ``qa_per_image=1``; see the module docstring for the options. With a
    ``collator`` (a :class:`dvsft.data.collator.VisionCollator`), every sample is also encoded once as its batch
    will be (:meth:`~dvsft.data.collator.VisionCollator.check`, in ``workers`` DataLoader processes): a sample
    it cannot encode, or longer than its ``max_length``, is skipped with the reason, and the result counts the
    text and vision labels of the rest.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"records file not found: {path}")
    if one_qa_per_image:
        qa_per_image = 1
    if qa_per_image is not None and qa_per_image < 1:
        raise ValueError(f"qa_per_image must be >= 1, got {qa_per_image}")
    records: list[dict[str, Any]] = []
    where: list[tuple[str, int]] = []  # file and line of each record
    skipped: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for entry in iter_entries(path):
        if entry.error is not None:
            found = [Problem(str(entry.file), entry.number, None, entry.error)]
            record: dict[str, Any] = {}
        else:
            record = entry.record  # type: ignore[assignment]
            found = check_record(record, entry.file, entry.number, image=True)
            if not found and (reason := training_problem(record)) is not None:
                found = [Problem(str(entry.file), entry.number, record_id(record), reason)]
        rid = record_id(record) or f"{entry.file.name}#{entry.number}"
        if found:
            for problem in found:
                log.warning("skipping %s", problem)
            skipped.append((rid, "; ".join(p.reason for p in found)))
            problems.extend(found)
            continue
        records.append(absolute_image(dict(record, id=rid), entry.file))
        where.append((str(entry.file), entry.number))
    indexed = _samples_of(records, qa_per_image, keep_conversations, seed)
    loaded = RecordList([sample for _, sample in indexed], skipped, problems, [where[r] for r, _ in indexed])
    return loaded if collator is None else check_samples(loaded, collator, workers)


def check_samples(samples: RecordList, collator: Any, workers: int = 0) -> RecordList:
    """The samples ``collator`` can encode within its ``max_length``, their text and vision labels counted; the
    others skipped with the reason (named by the file and line of their record)."""
    kept = RecordList(skipped=samples.skipped, problems=samples.problems, labels=[], lengths=[])
    outcomes = _outcomes(samples, collator, workers)
    for sample, (file, line), outcome in zip(samples, samples.where, outcomes, strict=True):
        if isinstance(outcome, str):
            problem = Problem(file, line, str(sample["id"]), outcome)
            log.warning("skipping %s", problem)
            kept.skipped.append((str(sample["id"]), outcome))
            kept.problems.append(problem)
            continue
        kept.append(sample)
        kept.where.append((file, line))
        kept.labels.append(outcome[:2])  # type: ignore[union-attr]
        kept.lengths.append(outcome[2])  # type: ignore[union-attr]
    return kept


def _outcomes(samples: list[dict[str, Any]], collator: Any, workers: int) -> Iterator[str | tuple[int, int, int]]:
    """Per sample, in order: why the collator cannot take it, or its (text labels, vision labels, tokens)."""
    if workers <= 0:
        cache = getattr(collator, "cache", None)
        if cache is not None:
            return iter(_shared_outcomes(samples, collator, cache))
        return (_outcome(collator, s) for s in samples)
    from torch.utils.data import DataLoader

    checks = _Checks(samples, collator)
    return iter(DataLoader(checks, batch_size=None, num_workers=workers, collate_fn=_identity))  # type: ignore[arg-type]


CLAIM_CHUNK = 64  # samples per claim of the encoded-sample cache


def _shared_outcomes(samples: list[dict[str, Any]], collator: Any, cache: Any) -> list[str | tuple[int, int, int]]:
    """:func:`_outcome` of every sample, in order, the encoding shared with other processes checking the same samples
    into the same cache: the chunks another process has claimed (:meth:`EncodedCache.claim`) are checked last."""
    from dvsft.data.encoded_cache import chunk_name

    out: list[Any] = [None] * len(samples)
    later: list[range] = []
    chunk = CLAIM_CHUNK
    for start in range(0, len(samples), chunk):
        part = range(start, min(start + chunk, len(samples)))
        name = chunk_name([samples[i] for i in part])
        if not cache.claim(name):
            later.append(part)
            continue
        try:
            for i in part:
                out[i] = _outcome(collator, samples[i])
        finally:
            cache.release(name)
    for part in later:
        for i in part:
            out[i] = _outcome(collator, samples[i])
    return out


def _outcome(collator: Any, sample: dict[str, Any]) -> str | tuple[int, int, int]:
    from dvsft.data.collator import SampleError

    try:
        enc = collator.check(sample)
    except SampleError as err:
        return err.reason
    return (*enc.label_counts(), int(enc.input_ids.numel()))


class _Checks:
    """The samples as a map-style dataset of their :func:`_outcome` (read by DataLoader workers)."""

    def __init__(self, samples: list[dict[str, Any]], collator: Any):
        self.samples, self.collator = samples, collator

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> str | tuple[int, int, int]:
        return _outcome(self.collator, self.samples[i])


def _identity(x: Any) -> Any:
    return x


def absolute_image(record: dict[str, Any], file: Path) -> dict[str, Any]:
    """The record with its image path made absolute (kept as is when the image bytes are in the record, or
    when it has no image)."""
    if isinstance(record.get("image_bytes"), bytes) or not has_image(record):
        return record
    return dict(record, image=str(image_path(record, file).resolve()))
