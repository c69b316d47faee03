"""Checkpoints that are whole or absent, and a resume that finds the newest intact one.

The Trainer writes each checkpoint straight into ``output_dir/checkpoint-N`` (so ``best_model_checkpoint``,
``save_total_limit`` and ``load_best_model_at_end`` work as in a plain ``Trainer``); dvsft's extra files
(objective heads, a stream's position) are written with the model, and ``trainer_state.json`` is the
Trainer's last file, so a checkpoint with a readable ``trainer_state.json`` and whole weights and torch files
is complete.

* :func:`check_checkpoint` says what is wrong with a checkpoint folder (missing ``trainer_state.json`` or
  weights, unreadable safetensors or torch files), :func:`latest_intact` picks the newest checkpoint
  without problems and logs each newer one it passes over (a kill during a save leaves one);
  :func:`remove_torn_after` deletes those before the resumed run saves, so the Trainer's rotation never keeps a
  torn checkpoint in place of a whole one.
* :func:`accept_saved_key_format` lets the Trainer's ``load_state_dict`` read the key format of families
  whose ``save_pretrained`` writes original-checkpoint names.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from dvsft.models.loading import safetensors_problem

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "pytorch_model.bin")


def accept_saved_key_format(model: Any) -> None:
    """Let ``model.load_state_dict`` take the key format its own ``save_pretrained`` writes.

    Some families (InternVL, LLaVA-OneVision) save their weights in the original checkpoints' key format;
    ``from_pretrained`` maps them back, but the Trainer loads a checkpoint (resume, ``load_best_model_at_end``)
    with ``load_state_dict``. This registers a state-dict pre-hook (a public torch hook) that renames such keys
    with the model's own transformers conversion mapping; a state dict in the model's own names passes as is.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    if not renamings and not converters:
        return

    def rename_keys(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        own = module.state_dict()
        if prefix or set(state_dict) <= set(own):
            return
        for key in list(state_dict):
            if key not in own:
                new, _ = rename_source_key(key, renamings, converters, module.base_model_prefix, own)
                state_dict[new] = state_dict.pop(key)

    model.register_load_state_dict_pre_hook(rename_keys)


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
        problem = safetensors_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    for name in TORCH_FILES:
        path = folder / name
        if path.is_file() and not zipfile.is_zipfile(path):
            return f"{name} is truncated or not a torch file"
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


def remove_torn_after(checkpoint: str | Path) -> None:
    """Delete the torn checkpoints with a higher step than ``checkpoint`` (the ones a resume passed over; the
    resumed run writes those steps again); whole ones are kept. Call on the main process only."""
    step = int(Path(checkpoint).name.rsplit("-", 1)[-1])
    for folder in checkpoints(Path(checkpoint).parent):
        if int(folder.name.rsplit("-", 1)[-1]) > step and check_checkpoint(folder) is not None:
            shutil.rmtree(folder, ignore_errors=True)
