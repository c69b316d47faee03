"""The trainer side of streaming input (:mod:`dvsft.data.streaming`): a plain DataLoader per rank, the trained
positions recorded from each batch, saved with every checkpoint (``data_state.json``) and restored on resume.

The DataLoader is not handed to ``accelerate``: the dataset already splits itself across ranks, and
``accelerate`` would wrap an iterable dataset into its own sharding (or dispatch batches from rank 0).
The Trainer's own fast-forward on resume (``ignore_data_skip=False`` re-reads and collates every skipped
batch) is switched off; the dataset skips the trained positions without reading them. Records the stream skipped
count as read too (a resume passes them), their reasons appended to ``output_dir/skipped_records.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dvsft.core.records import JsonlAppender, Problem, read_jsonl
from dvsft.data.skips import REASONS_FILE, StrictError
from dvsft.data.streaming import EpochDataLoader, PositionCollator, StreamingSamples

DATA_STATE = "data_state.json"


class StreamingTrainerMixin:
    """``transformers.Trainer`` mixin; active only when ``train_dataset`` is a :class:`StreamingSamples`."""

    trained_samples: list[tuple[int, int, int, str]]  # (step, epoch, local position, id) trained by this process
    _reported: set[tuple[str | None, int | None]]  # (file, line) of the skipped records in the reasons file

    def _streaming(self) -> StreamingSamples | None:
        ds = getattr(self, "train_dataset", None)
        return ds if isinstance(ds, StreamingSamples) else None

    def get_train_dataloader(self) -> Any:
        ds = self._streaming()
        if ds is None:
            return super().get_train_dataloader()  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        ds.rank, ds.world_size = args.process_index, args.world_size
        ds.batch_size = self._train_batch_size  # type: ignore[attr-defined]
        ds.endless = True  # each rank crosses its epoch ends on its own, in full batches (see dvsft.data.streaming)
        kwargs: dict[str, Any] = {
            "batch_size": ds.batch_size,
            "collate_fn": PositionCollator(self.data_collator),  # type: ignore[attr-defined]
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
        }
        if args.dataloader_num_workers > 0:
            kwargs["prefetch_factor"] = args.dataloader_prefetch_factor or 2
        return EpochDataLoader(ds, **kwargs)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        positions = inputs.pop("sample_positions", None)
        ids = inputs.pop("sample_ids", None)
        skipped = inputs.pop("skipped_samples", [])
        ds = self._streaming()
        if ds is not None and positions is not None:
            positions = positions.cpu()
            self._report_skipped(skipped)
            read = sorted(positions.tolist() + [row[:3] for row in skipped], key=lambda p: p[2])  # stream order
            ds.mark_trained(torch.tensor(read, dtype=torch.long).reshape(-1, 3))
            step = self.state.global_step + 1  # type: ignore[attr-defined]
            rows = [(step, e, j, i) for (e, j, _), i in zip(positions.tolist(), ids or [], strict=False)]
            self.__dict__.setdefault("trained_samples", []).extend(rows)
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]

    def _report_skipped(self, skipped: list[list[Any]]) -> None:
        """Append the reasons of records the stream skipped to ``output_dir/skipped_records.jsonl``, once per
        record (each epoch skips it again; every rank writes the records it skipped); ``--strict`` fails instead."""
        if not skipped:
            return
        from dvsft.training.trainer import setting

        args = self.args  # type: ignore[attr-defined]
        problems = [Problem(**row[3]) for row in skipped]
        if setting(args, "strict"):
            raise StrictError(f"--strict: a bad record in the stream: {problems[0]}")
        path = Path(args.output_dir, REASONS_FILE)
        if "_reported" not in self.__dict__:  # a resumed run goes on with the file it left
            self._reported = {(r["file"], r["line"]) for r in read_jsonl(path, own=True)} if path.is_file() else set()
        with JsonlAppender(path) as out:
            for problem in problems:
                if (problem.file, problem.line) not in self._reported:
                    self._reported.add((problem.file, problem.line))
                    out.write(problem.row())

    def save_data_state(self, folder: str) -> None:
        """Every rank's stream position into ``folder/data_state.json`` (called on all ranks)."""
        ds = self._streaming()
        if ds is None:
            return
        args = self.args  # type: ignore[attr-defined]
        states: list[Any] = [ds.state_dict()]
        if args.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * args.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if args.should_save:
            with open(os.path.join(folder, DATA_STATE), "w") as f:
                json.dump({"world_size": args.world_size, "ranks": states}, f)

    def train(self, resume_from_checkpoint: str | bool | None = None, *rest: Any, **kwargs: Any) -> Any:
        ds = self._streaming()
        if ds is not None:
            args = self.args  # type: ignore[attr-defined]
            if args.max_steps is None or args.max_steps <= 0:
                raise ValueError("streaming input has no length: set max_steps (optimizer steps to train)")
            args.ignore_data_skip = True
            if resume_from_checkpoint:
                load_data_state(ds, resume_from_checkpoint, args)
            elif args.should_save:  # a new run: the reasons file lists this run's skips only
                Path(args.output_dir, REASONS_FILE).unlink(missing_ok=True)
        return super().train(resume_from_checkpoint, *rest, **kwargs)  # type: ignore[misc]


def load_data_state(ds: StreamingSamples, checkpoint: str | bool, args: Any) -> None:
    """Restore this rank's stream position from ``checkpoint/data_state.json``."""
    if checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(args.output_dir) or ""
    path = os.path.join(str(checkpoint), DATA_STATE)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint}: no {DATA_STATE}; it was not written by a streaming run")
    with open(path) as f:
        state = json.load(f)
    if state["world_size"] != args.world_size:
        raise ValueError(
            f"{path}: saved by {state['world_size']} processes; resume a stream with the same number "
            f"(this run has {args.world_size})"
        )
    ds.rank, ds.world_size = args.process_index, args.world_size
    ds.load_state_dict(state["ranks"][args.process_index])
