"""Checkpoints that are whole or absent, and a resume that finds the newest intact one.

* :class:`AtomicCheckpoints` (a ``transformers.Trainer`` mixin) lets the Trainer write a checkpoint into
  ``output_dir/.staging-checkpoint-N/checkpoint-N`` and renames it to ``output_dir/checkpoint-N`` only when
  every file (model, optimizer, scheduler, RNG, ``trainer_state.json``, extras) is written. A kill during the
  save leaves a staging folder that resume ignores and the next save or resume removes.
* :func:`check_checkpoint` says what is wrong with a checkpoint folder (missing ``trainer_state.json`` or
  weights, unreadable safetensors or torch files), :func:`latest_intact` picks the newest checkpoint
  without problems and logs each newer one it passes over (checkpoints written by other tools or before
  this scheme may be torn).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".staging-"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "pytorch_model.bin")


class AtomicCheckpoints:
    """Trainer mixin: checkpoints are staged and renamed into place (see the module docstring).

    Subclasses may override :meth:`save_checkpoint_extras` to add files to the staged checkpoint.
    """

    _staging_dir: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir or super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        args, state = self.args, self.state  # type: ignore[attr-defined]
        run_dir = super()._get_output_dir(trial)  # type: ignore[misc]
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        if args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._barrier()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
            self.save_checkpoint_extras(os.path.join(staging, name))
        finally:
            self._staging_dir = None
        self._barrier()
        if args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)  # the same step saved again (e.g. after a resume)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=args.save_total_limit,
                best_model_checkpoint=state.best_model_checkpoint,
                use_mtime=True,
            )
        self._barrier()

    def save_checkpoint_extras(self, folder: str) -> None:
        """Write extra files into the staged checkpoint ``folder`` (before it is renamed into place)."""

    def _barrier(self) -> None:
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            accelerator.wait_for_everyone()


def check_checkpoint(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it looks intact."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save did not finish)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        return f"trainer_state.json is unreadable: {err}"
    if not any((folder / w).is_file() for w in WEIGHTS):
        return f"no model weights ({', '.join(WEIGHTS)})"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, OSError) as err:
            return f"{index.name} is unreadable: {err}"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return f"missing weight shard(s): {', '.join(missing)}"
    for path in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    for name in TORCH_FILES:
        path = folder / name
        if path.is_file() and not zipfile.is_zipfile(path):
            return f"{name} is truncated or not a torch file"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read: a bad header, or data shorter than the header says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"truncated header ({size} bytes, header says {n})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"unreadable header: {err}"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"truncated: {size} bytes, the tensors need {8 + n + end}"
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_intact(output_dir: str | Path) -> Path:
    """The newest intact checkpoint of ``output_dir``; each newer, broken one is logged with its problem.

    Raises FileNotFoundError when there is no checkpoint, ValueError when none is intact.
    """
    found = checkpoints(output_dir)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint-* dir in {output_dir}")
    passed: list[str] = []
    for folder in found:
        problem = check_checkpoint(folder)
        if problem is None:
            if passed:
                log.warning("resuming from %s: %s", folder, "; ".join(passed))
            return folder
        passed.append(f"{folder.name} is incomplete ({problem})")
    raise ValueError(f"--resume: no intact checkpoint in {output_dir}: {'; '.join(passed)}")


def remove_staging(output_dir: str | Path) -> None:
    """Delete staging folders left by a save that was killed."""
    out = Path(output_dir)
    if out.is_dir():
        for p in out.glob(STAGING_PREFIX + "checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
