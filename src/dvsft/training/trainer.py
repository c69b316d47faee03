"""The HF Trainer recipe: one forward pass, the objectives' named loss terms, their weighted sum.

``compute_loss`` calls the (possibly DDP / DeepSpeed / FSDP / PEFT wrapped) model with
``logits_to_keep=1`` and ``output_hidden_states=True``: the forward goes through the wrapper (so
gradient sync and parameter gathering work) but the LM head runs on one position only; the
objectives project just the rows they need (answer tokens, labeled visual tokens) through
``lm_head`` in chunks. Every term is logged (averaged over the logging window and across
processes) with throughput; the JSONL log callback writes ``output_dir/log.jsonl``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from dvsft.records import JsonlAppender, read_jsonl, write_jsonl
from dvsft.training.checkpoints import AtomicCheckpoints
from dvsft.training.objectives import HEADS_ATTR, HiddenStates, Objective, base_model
from dvsft.training.streaming import StreamingTrainerMixin

MODEL_INPUTS = (
    *("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"),
    *("image_sizes", "batch_num_images", "pixel_attention_mask"),  # LLaVA-OneVision, Idefics3 / SmolVLM
)


class DVSFTTrainer(StreamingTrainerMixin, AtomicCheckpoints, Trainer):
    """``transformers.Trainer`` whose loss is the sum of weighted objective terms; checkpoints are atomic."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean

    def __init__(self, *args: Any, objectives: list[Objective], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.objectives = objectives
        self._needs_layers = any(o.needs_hidden_states for o in objectives)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}
        self._samples = 0
        self._tokens = 0
        self._window_start = time.perf_counter()

    def forward_hidden(self, model: torch.nn.Module, inputs: dict[str, Any]) -> HiddenStates:
        """Run the model body once; the LM head sees a single position."""
        fwd = {k: inputs[k] for k in MODEL_INPUTS if inputs.get(k) is not None}
        out = model(**fwd, output_hidden_states=True, logits_to_keep=1, use_cache=False, return_dict=True)
        layers = tuple(out.hidden_states)
        image_id = base_model(model).config.image_token_id
        return HiddenStates(
            last=layers[-1],
            image_mask=inputs["input_ids"] == image_id,
            layers=layers if self._needs_layers else None,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = self.forward_hidden(model, inputs)
        core = base_model(model)
        total = None
        terms: dict[str, torch.Tensor] = {}
        for obj in self.objectives:
            values = obj.loss(core, inputs, hidden)
            weights = obj.weights()
            for name, value in values.items():
                terms[name] = value
                if name in weights and weights[name] != 0:
                    part = weights[name] * value
                    total = part if total is None else total + part
        if total is None:
            total = hidden.last.sum() * 0.0
        if model.training:
            self._record(terms, inputs)
        return (total, {"terms": terms}) if return_outputs else total

    # ------------------------------------------------------------------ logging

    def _record(self, terms: dict[str, torch.Tensor], inputs: dict[str, Any]) -> None:
        """Accumulate detached terms; ``x_acc`` is weighted by ``x_tokens`` (accuracy over all labeled tokens)."""
        values = {name: float(value.detach().float()) for name, value in terms.items()}
        for name, v in values.items():
            weight = values.get(name[: -len("_acc")] + "_tokens", 1.0) if name.endswith("_acc") else 1.0
            self._sums.setdefault(name, 0.0)  # same names on every rank (all_reduce in _window_metrics)
            self._counts.setdefault(name, 0.0)
            if math.isnan(v) or weight == 0:
                continue
            self._sums[name] = self._sums.get(name, 0.0) + v * weight
            self._counts[name] = self._counts.get(name, 0.0) + weight
        self._samples += int(inputs["input_ids"].shape[0])
        mask = inputs.get("attention_mask")
        self._tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._window_metrics())
        super().log(logs, start_time)

    def _window_metrics(self) -> dict[str, float]:
        names = sorted(self._counts)
        local = [self._sums[n] for n in names] + [self._counts[n] for n in names]
        local += [float(self._samples), float(self._tokens)]
        t = torch.tensor(local, dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)  # every rank logs the same window: sums of sums and counts
        vals = t.tolist()
        k = len(names)
        out: dict[str, float] = {}
        for i, name in enumerate(names):
            if vals[k + i] > 0:
                out[name] = vals[i] if name.endswith("_tokens") else vals[i] / vals[k + i]
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        out["samples_per_s"] = vals[2 * k] / elapsed
        out["tokens_per_s"] = vals[2 * k + 1] / elapsed
        self._sums, self._counts, self._samples, self._tokens = {}, {}, 0, 0
        self._window_start = time.perf_counter()
        return out

    # ------------------------------------------------------------------ checkpoints

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume weights; checkpoints that ``save_pretrained`` wrote in the family's original key
        format (InternVL, LLaVA-OneVision, Idefics3 / SmolVLM) load through ``from_pretrained``,
        which maps the keys back (the Trainer's raw ``load_state_dict`` would miss every key)."""
        target = model if model is not None else self.model
        path = os.path.join(resume_from_checkpoint, "model.safetensors")
        if base_model(target) is target and os.path.isfile(path):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                keys = set(f.keys())
            own = target.state_dict()
            if not keys <= set(own):
                dtype = next(target.parameters()).dtype
                loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype).state_dict()
                missing = [k for k in own if k not in loaded and not k.startswith(HEADS_ATTR + ".")]
                if missing:
                    raise ValueError(f"checkpoint {resume_from_checkpoint} lacks {len(missing)} weights: {missing[:3]}")
                target.load_state_dict(loaded, strict=False)
                return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_checkpoint_extras(self, folder: str) -> None:
        """The objectives' heads and a stream's position, into the staged checkpoint (:class:`AtomicCheckpoints`)."""
        super().save_checkpoint_extras(folder)
        heads = getattr(base_model(self.model), HEADS_ATTR, None)
        if heads is not None and len(heads) and self.args.should_save:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
            save_file(state, os.path.join(folder, "objective_heads.safetensors"))


def load_heads(model: torch.nn.Module, checkpoint: str) -> bool:
    """Restore the objectives' heads from a checkpoint dir (needed where the checkpoint holds adapters only)."""
    path = os.path.join(checkpoint, "objective_heads.safetensors")
    heads = getattr(base_model(model), HEADS_ATTR, None)
    if heads is None or not os.path.isfile(path):
        return False
    from safetensors.torch import load_file

    heads.load_state_dict(load_file(path))
    return True


class JsonlLogCallback(TrainerCallback):
    """Append every log (with its step) to ``path`` on the main process and keep them in ``rows``."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._writer: JsonlAppender | None = None
        self._resume_step = resume_step

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self._resume_step is not None and os.path.isfile(self.path):
            # drop rows written after the checkpoint we resume from (they will be recomputed)
            kept = [r for r in read_jsonl(self.path, own=True) if int(r.get("step", 0)) <= self._resume_step]
            write_jsonl(self.path, kept)
            self.rows = kept
        elif self._resume_step is None and os.path.isfile(self.path):
            os.remove(self.path)
        self._writer = JsonlAppender(self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        row = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        self.rows.append(row)
        if self._writer is not None:
            self._writer.write(row)

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    return v
