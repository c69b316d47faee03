"""Streaming training input: records read from Parquet shards or ``datasets`` folders (memory-mapped Arrow)
a window at a time, in a deterministic order per seed and epoch, split across ranks and DataLoader workers,
with a position that a checkpoint saves and a resume restores.

The order of epoch ``e``: the row groups of every source (Parquet row groups, Arrow record batches) are
shuffled with ``(seed, e)`` and cut into windows of about ``window_rows`` rows; the rows of each window are
shuffled with ``(seed, e, window)``. The ranks split that sequence with
``datasets.distributed.split_dataset_by_node``, applied to a ``datasets.IterableDataset`` whose shards are the
windows (in that order) and whose examples are the positions ``(window, row)``, not the records: with the
default ``split="auto"`` a rank gets whole windows (``w % world_size == rank``) when the window count divides
by the world size, else every ``world_size``-th position (global position ``g`` goes to rank
``g % world_size``). Both are fixed by the seed, the epoch and the data, and each position goes to exactly one
rank. The positions of one rank, in the order ``datasets`` yields them, are its local positions
``j = 0, 1, ...`` of the epoch. For the trainer the stream is endless (``endless=True``): epoch ``e + 1``
follows epoch ``e`` in the same iterator, and ``c``, the count of the rank's positions since epoch 0, goes on
across epochs. Positions ``c`` form batches of ``batch_size`` (a batch may hold the end of one epoch and the
start of the next), and DataLoader worker ``k`` takes batches ``k, k + workers, ...``, so the batches come
out in the same order with any number of workers. The ranks' epochs can have different lengths (whole
windows), and an endless stream lets each rank cross its epoch ends on its own, while every rank still
makes full batches and the same number of optimizer steps (the Trainer would otherwise end a rank's epoch
with a short gradient accumulation and leave the ranks' collectives unmatched). Only the windows holding a
position still to read are read, one row group at a time, so memory does not grow with the dataset.

Each sample carries ``(epoch, j, c)``; the trainer records what it trained and saves it with each checkpoint
(:meth:`StreamingSamples.state_dict`); a resume skips exactly those positions and continues with the same
sequence. ``datasets``' own ``IterableDataset.state_dict`` is not used for this: it is the state at the last
example the dataset yielded (in DataLoader workers, it needs torchdata's ``StatefulDataLoader`` to reach the
main process), not which samples the optimizer stepped on.

Records are checked lazily, as the in-memory reader checks them (:func:`dvsft.core.records.check_record`, the
training checks and, given the run's collator, :meth:`dvsft.data.collator.VisionCollator.check`, whose encoding
the batch then reuses); a bad one is skipped with a warning, and its position rides with the next sample to the
trainer (``skipped_samples`` of the batch), which counts it as read (a resume passes it) and writes its reason.
Each record gives one sample: its QA pairs (``qa_per_image`` of them, drawn as in
:func:`dvsft.data.dataset.select_samples` but per record) as one conversation.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dvsft.core.record_sources import ARROW, JSONL, PARQUET, data_files, rows_of
from dvsft.data.skips import LabelCount

log = logging.getLogger(__name__)
POSITION = "_stream_position"  # (epoch, local position, count since epoch 0) on each sample, removed by the collator
SKIPPED = "_stream_skipped"  # [[epoch, local position, count, problem row], ...] skipped just before a sample
DEFAULT_WINDOW_ROWS = 2048
SPLITS = ("auto", "shards", "examples")  # split_dataset_by_node strategies
MAX_WARNINGS = 20


@dataclass(frozen=True)
class Unit:
    """One row group of one file: the smallest piece read at once."""

    file: Path
    kind: str
    index: int  # row group (Parquet) or record batch (Arrow)
    rows: int
    first_row: int  # 1-based row number of its first row in the file (for problem messages)
    qa_per_image: int | None


def units_of(path: str | Path, qa_per_image: int | None = None) -> list[Unit]:
    """The row groups of a Parquet or Arrow source, from metadata only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    units = []
    for file, kind in data_files(path):
        if kind == JSONL:
            raise ValueError(
                f"{file}: streaming reads Parquet or Arrow; convert it: dvsft convert {file} <folder> --to parquet"
            )
        first = 1
        if kind == PARQUET:
            meta = pq.ParquetFile(file).metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        else:
            with pa.memory_map(str(file)) as source:
                sizes = [b.num_rows for b in pa.ipc.open_stream(source)]
        for i, n in enumerate(sizes):
            if n:
                units.append(Unit(file, kind, i, n, first, qa_per_image))
            first += n
    return units


class StreamingSamples(IterableDataset):
    """Training samples streamed from record sources (see the module docstring).

    ``sources``: paths, or ``(path, qa_per_image)`` pairs. ``rank``/``world_size``/``batch_size`` are set by
    the trainer before iterating. ``split``: the ``strategy`` of ``split_dataset_by_node`` (``auto``: whole
    windows per rank when their count divides by the world size, else ``examples``; ``shards``: whole windows,
    refused with fewer windows than ranks; ``examples``: every ``world_size``-th position, so the ranks' counts
    differ by at most one). ``collator``: the run's :class:`dvsft.data.collator.VisionCollator`; each sample is
    checked with it, and carries its encoding for the batch.
    """

    def __init__(
        self,
        sources: list[str | Path | tuple[str | Path, int | None]],
        seed: int = 0,
        window_rows: int = DEFAULT_WINDOW_ROWS,
        qa_per_image: int | None = 1,
        check_images: bool = True,
        split: str = "auto",
        collator: Any = None,
    ):
        super().__init__()
        self.collator = collator
        self.units: list[Unit] = []
        for src in sources:
            path, qa = src if isinstance(src, tuple) else (src, qa_per_image)
            self.units.extend(units_of(path, qa))
        self.rows = sum(u.rows for u in self.units)
        if not self.rows:
            raise ValueError(f"no records in {', '.join(str(s) for s in sources)}")
        self.seed = int(seed)
        self.window_rows = max(1, int(window_rows))
        self.check_images = check_images
        if split not in SPLITS:
            raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
        self.split = split
        self.rank, self.world_size, self.batch_size = 0, 1, 1
        self.endless = False  # the trainer's stream: epoch after epoch in one iterator
        self.epoch = 0  # set_epoch(k) -> base_epoch + k
        self.base_epoch = 0
        self.offset = 0  # c of position 0 of self.epoch (the rank's positions of the epochs before it)
        self.consumed: dict[int, Ranges] = {}  # epoch -> positions trained (main process)
        self.offsets: dict[int, int] = {}  # epoch -> its c of position 0 (main process)

    # -- order ------------------------------------------------------------------------------------
    def windows(self, epoch: int) -> list[list[Unit]]:
        """The windows of ``epoch``: shuffled row groups, grouped to about ``window_rows`` rows."""
        order = list(self.units)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        out: list[list[Unit]] = []
        size = self.window_rows
        for unit in order:
            if size >= self.window_rows:
                out.append([])
                size = 0
            out[-1].append(unit)
            size += unit.rows
        return out

    def positions(self, epoch: int) -> Iterator[tuple[int, int]]:
        """This rank's positions of ``epoch`` as ``(window, row of the shuffled window)``, in local order: the
        windows' positions as a ``datasets.IterableDataset`` (one shard per window) split by
        ``datasets.distributed.split_dataset_by_node``. Positions only; no record is read."""
        from datasets import IterableDataset
        from datasets.distributed import split_dataset_by_node
        from datasets.iterable_dataset import ExamplesIterable

        sizes = [(w, sum(u.rows for u in window)) for w, window in enumerate(self.windows(epoch))]
        # IterableDataset.from_generator would do the same through a builder, leaving a lock file in the
        # datasets cache for every epoch
        ds = IterableDataset(ExamplesIterable(_window_positions, {"windows": sizes}))
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size, strategy=self.split)
        # .iter(), not iter(ds): in a DataLoader worker, iter(ds) would split the windows across the workers too
        for batch in ds.iter(batch_size=4096):
            yield from zip(batch["w"], batch["k"], strict=True)

    def rows_per_rank(self, epoch: int | None = None) -> int:
        """How many positions this rank gets in ``epoch`` (counted from :meth:`positions`)."""
        return sum(1 for _ in self.positions(self.epoch if epoch is None else epoch))

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at each epoch (0, 1, ... from the start of this run)."""
        self.epoch = self.base_epoch + int(epoch)

    # -- state ------------------------------------------------------------------------------------
    def mark_trained(self, positions: torch.Tensor) -> None:
        """Record trained ``(epoch, j, c)`` positions (from a batch's ``sample_positions``). The batches are
        trained in order, so a position of a new epoch means the rank is done with the epochs before it."""
        for epoch, j, c in positions.tolist():
            if epoch not in self.consumed:
                self.consumed = {e: r for e, r in self.consumed.items() if e > epoch}
                self.consumed[epoch] = Ranges()
                self.offsets = {e: o for e, o in self.offsets.items() if e > epoch}
                self.offsets[epoch] = c - j
            self.consumed[epoch].add(j)

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "offset", "consumed": [[start, stop), ...], "rows", "seed"}`` of this rank."""
        state = {"epoch": self.epoch, "offset": self.offset, "consumed": [], "rows": self.rows, "seed": self.seed}
        if self.consumed:
            epoch = max(self.consumed)
            state.update(epoch=epoch, offset=self.offsets[epoch], consumed=self.consumed[epoch].spans())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the positions a checkpoint recorded (same sources, seed and world size)."""
        if state.get("rows") != self.rows or state.get("seed") != self.seed:
            raise ValueError(
                f"cannot resume the data stream: the checkpoint read {state.get('rows')} records with seed "
                f"{state.get('seed')}, this run has {self.rows} with seed {self.seed}"
            )
        epoch, offset = int(state["epoch"]), int(state.get("offset", 0))
        done = Ranges.of(state["consumed"])
        count = self.rows_per_rank(epoch)
        if done.count() >= count:  # that epoch was finished: start the next one
            epoch, offset, done = epoch + 1, offset + count, Ranges()
        self.base_epoch = self.epoch = epoch
        self.offset = offset
        self.consumed = {epoch: done}
        self.offsets = {epoch: offset}

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        offset = self.offset + sum(self.rows_per_rank(e) for e in range(self.base_epoch, epoch))
        done = self.consumed.get(epoch, Ranges())
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start_batch = (offset + done.first_missing()) // self.batch_size
        skipped: list[list[Any]] = []  # skipped positions not yet passed on: they ride with the next sample
        while True:
            yield from self._epoch(epoch, offset, done, start_batch, worker, workers, skipped)
            if not self.endless:
                return
            count = self.rows_per_rank(epoch)
            if count == 0:  # an endless stream with nothing in it would never yield
                raise ValueError(
                    f"{self.rows} records for {self.world_size} ranks: rank {self.rank} gets none of epoch {epoch}"
                )
            offset += count
            epoch, done = epoch + 1, Ranges()

    def _epoch(
        self, epoch: int, offset: int, done: Ranges, start_batch: int, worker: int, workers: int, skipped: list
    ) -> Iterator[dict[str, Any]]:
        windows = self.windows(epoch)

        def mine() -> Iterator[tuple[int, int, int]]:  # (window, row of the shuffled window, j) this worker reads
            for j, (w, k) in enumerate(self.positions(epoch)):
                b = (offset + j) // self.batch_size
                if b >= start_batch and (b - start_batch) % workers == worker and j not in done:
                    yield w, k, j

        warned = 0
        for w, group in itertools.groupby(mine(), key=lambda t: t[0]):
            picked = [(k, j) for _, k, j in group]
            window = windows[w]
            perm = list(range(sum(u.rows for u in window)))
            random.Random(f"{self.seed}:{epoch}:{w}").shuffle(perm)
            rows = _read_rows(window, {perm[k] for k, _ in picked})
            for k, j in picked:
                unit, number, record = rows[perm[k]]
                sample, problem = self._sample(record, unit, number)
                if sample is None:
                    if warned < MAX_WARNINGS:
                        log.warning("skipping %s", problem)
                        warned += 1
                    skipped.append([epoch, j, offset + j, problem.row()])
                    continue
                sample[POSITION] = (epoch, j, offset + j)
                if skipped:
                    sample[SKIPPED] = skipped[:]
                    skipped.clear()
                yield sample

    def _sample(self, record: dict[str, Any], unit: Unit, number: int) -> tuple[dict[str, Any] | None, Any]:
        from dvsft.core.records import Problem, check_record, has_image, record_id
        from dvsft.data.collator import ENCODED, SampleError
        from dvsft.data.dataset import absolute_image, answered_pairs, expand_record, training_problem

        found = check_record(record, unit.file, number, image=False)
        if not found and self.check_images:
            found = [Problem(str(unit.file), number, record_id(record), r) for r in _image_reasons(record, unit.file)]
        if not found and (reason := training_problem(record)) is not None:
            found = [Problem(str(unit.file), number, record_id(record), reason)]
        if found:
            return None, found[0]
        rid = record_id(record) or f"{unit.file.name}#{number}"
        record = absolute_image(dict(record, id=rid), unit.file)
        pairs = answered_pairs(record)[1]
        chosen = list(range(len(pairs)))
        if unit.qa_per_image is not None and len(chosen) > unit.qa_per_image:
            name = record.get("image") if has_image(record) else rid  # a text-only record: drawn by its id
            chosen = random.Random(f"{self.seed}:{name}").sample(chosen, unit.qa_per_image)
        sample = expand_record(record, chosen, keep_conversations=True)[0]
        if self.collator is not None:
            try:
                sample[ENCODED] = self.collator.check(sample)
            except SampleError as err:
                return None, Problem(str(unit.file), number, str(sample["id"]), err.reason)
        return sample, None

    def find_labels(self, vision: bool) -> LabelCount:
        """Read the records in file order, checked as for training (needs the collator), until a sample has text
        labels and, with ``vision``, vision labels: the counts of what was read (all of it when none has them)."""
        from dvsft.data.collator import ENCODED

        if self.collator is None:
            raise ValueError("find_labels checks samples with the run's collator: set StreamingSamples.collator")
        count = LabelCount(text=0, vision=0)
        for unit in self.units:
            rows = _read_rows([unit], set(range(unit.rows)))
            for _, number, record in (rows[k] for k in range(unit.rows)):
                sample, problem = self._sample(record, unit, number)
                if sample is None:
                    count.skipped += 1
                    count.first_problem = count.first_problem or problem
                    continue
                text, labels = sample[ENCODED].label_counts()
                count.samples, count.text, count.vision = count.samples + 1, count.text + text, count.vision + labels
                if count.text and (count.vision or not vision):
                    return count
        return count

    def window_ids(self, epoch: int) -> list[list[str]]:
        """Record ids of each window of ``epoch``, in its shuffled order (reads every record; for checks and
        tests)."""
        out: list[list[str]] = []
        for w, window in enumerate(self.windows(epoch)):
            n = sum(u.rows for u in window)
            rows = _read_rows(window, set(range(n)))
            perm = list(range(n))
            random.Random(f"{self.seed}:{epoch}:{w}").shuffle(perm)
            out.append([str(rows[p][2].get("id")) for p in perm])
        return out

    def order_ids(self, epoch: int) -> list[str]:
        """Record ids in global position order for ``epoch`` (the windows one after the other)."""
        return [i for ids in self.window_ids(epoch) for i in ids]


def _window_positions(windows: list[tuple[int, int]]) -> Iterator[tuple[str, dict[str, int]]]:
    """The ``(key, example)`` pairs of the positions dataset; ``windows``, its list of shards, holds
    ``(window, rows)`` pairs."""
    for w, n in windows:
        for k in range(n):
            yield f"{w}:{k}", {"w": w, "k": k}


def _image_reasons(record: dict[str, Any], file: Path) -> list[str]:
    """What is wrong with a record's image, checked as the in-memory reader does (header, data, size); checks of
    the same image file and size are remembered, so records sharing an image read it once per worker. A record
    without an image is checked as a text-only record (:func:`dvsft.core.records.text_only_reasons`)."""
    from dvsft.core.records import has_image, image_path, text_only_reasons

    if not has_image(record):
        return text_only_reasons(record)
    data = record.get("image_bytes")
    w, h = record.get("width"), record.get("height")
    if isinstance(data, bytes):  # not remembered: the cache would hold the bytes
        return _image_check.__wrapped__(data, w, h)[0]
    if not isinstance(record.get("image"), str):
        return ["no image field"]
    reasons, w2, h2 = _image_check(str(image_path(record, file)), w, h)
    if w is None and h is None and w2 is not None:
        record["width"], record["height"] = w2, h2
    return reasons


@functools.lru_cache(maxsize=4096)
def _image_check(image: str | bytes, width: int | None, height: int | None) -> tuple[list[str], Any, Any]:
    from dvsft.core.records import check_record

    probe: dict[str, Any] = {"image_bytes": image} if isinstance(image, bytes) else {"image": image}
    if width is not None or height is not None:
        probe.update(width=width, height=height)
    reasons = [p.reason for p in check_record(probe, None, image=True)]
    return reasons, probe.get("width"), probe.get("height")


def _read_rows(window: list[Unit], wanted: set[int]) -> dict[int, tuple[Unit, int, dict[str, Any]]]:
    """``window row -> (unit, row number in its file, record)`` for the wanted rows of a window."""
    out: dict[int, tuple[Unit, int, dict[str, Any]]] = {}
    start = 0
    for unit in window:
        local = sorted(k - start for k in wanted if start <= k < start + unit.rows)
        if local:
            batch = _read_unit(unit)
            picked = batch.take(local) if len(local) < unit.rows else batch
            for k, record in zip(local, rows_of(picked), strict=True):
                out[start + k] = (unit, unit.first_row + k, record)
        start += unit.rows
    return out


def _read_unit(unit: Unit) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if unit.kind == PARQUET:
        return pq.ParquetFile(unit.file).read_row_group(unit.index)
    assert unit.kind == ARROW
    with pa.memory_map(str(unit.file)) as source:
        for i, batch in enumerate(pa.ipc.open_stream(source)):
            if i == unit.index:
                return batch
    raise ValueError(f"{unit.file}: record batch {unit.index} not found")


class Ranges:
    """A set of non-negative integers kept as sorted ``[start, stop)`` spans."""

    def __init__(self) -> None:
        self._set: set[int] = set()
        self._prefix = 0  # every position below this is in the set

    @classmethod
    def of(cls, spans: list[list[int]]) -> Ranges:
        r = cls()
        for a, b in spans:
            for j in range(a, b):
                r.add(j)
        return r

    def add(self, j: int) -> None:
        if j < self._prefix:
            return
        self._set.add(j)
        while self._prefix in self._set:
            self._set.discard(self._prefix)
            self._prefix += 1

    def __contains__(self, j: int) -> bool:
        return j < self._prefix or j in self._set

    def first_missing(self) -> int:
        return self._prefix

    def count(self) -> int:
        return self._prefix + len(self._set)

    def spans(self) -> list[list[int]]:
        out = [[0, self._prefix]] if self._prefix else []
        for j in sorted(self._set):
            if out and out[-1][1] == j:
                out[-1][1] = j + 1
            else:
                out.append([j, j + 1])
        return out


class PositionCollator:
    """Wrap a collator: strip each sample's stream position and return them as ``sample_positions`` [B, 3]
    (and the samples' ids as ``sample_ids``), for the trainer to record; the records skipped before them as
    ``skipped_samples`` (``[[epoch, local position, count, problem row], ...]``, only where there are some)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        positions = [s.get(POSITION, (-1, -1, -1)) for s in samples]
        skipped = [row for s in samples for row in s.get(SKIPPED, ())]
        clean = [{k: v for k, v in s.items() if k not in (POSITION, SKIPPED)} for s in samples]
        batch = self.inner(clean)
        batch["sample_positions"] = torch.tensor(positions, dtype=torch.long).reshape(-1, 3)
        batch["sample_ids"] = [str(s.get("id")) for s in clean]
        if skipped:
            batch["skipped_samples"] = skipped
        return batch


class EpochDataLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches the streaming dataset (the Trainer calls it every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
