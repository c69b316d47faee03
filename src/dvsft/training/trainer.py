"""``DVSFTTrainer``: the HF ``Trainer`` with the DV-SFT objectives; usable on its own.

    trainer = DVSFTTrainer(model=model, args=DVSFTConfig(...), train_dataset=samples,
                           eval_dataset=heldout, processing_class=processor)

It builds its objectives (``args.method``) and its :class:`~dvsft.data.collator.VisionCollator`
(from ``processing_class`` and the label options of ``args``) unless given. ``compute_loss`` runs
the (possibly DDP / DeepSpeed / FSDP / PEFT wrapped) model's own forward once
(:func:`~dvsft.objectives.base.forward_hidden`) and the objectives push only the rows they need
through ``lm_head`` in chunks. Gradient accumulation is exact by construction: the step's labeled
tokens are counted over all its micro-batches and processes (``get_batch_samples``) and every
micro-batch returns its share of the step's loss (``loss_is_scaled_for_ga = True``). Every term is
logged (averaged over the logging window and across processes) with throughput; with an
``eval_dataset``, evaluation reports ``eval_text_loss``, ``eval_vision_loss`` and
``eval_vision_top1`` (the lens metric: labeled visual tokens whose own logits rank their word first).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from dvsft.core.accel import name_deepspeed_cpu
from dvsft.core.records import JsonlAppender, read_jsonl, write_jsonl
from dvsft.objectives.base import HEADS_ATTR, Objective, base_model, forward_hidden
from dvsft.objectives.losses import StepTokens, step_tokens
from dvsft.objectives.registry import build_objectives
from dvsft.training.checkpoints import accept_saved_key_format
from dvsft.training.streaming import StreamingTrainerMixin

EVAL_TERMS = ("text", "vision")


def attach_objectives(model: torch.nn.Module, objectives: list[Objective], config: Any) -> None:
    """``setup`` each objective on the model and attach their trainable heads under ``dvsft_heads``."""
    from torch import nn

    core = base_model(model)
    heads: dict[str, nn.Module] = {}
    for obj in objectives:
        obj.setup(core, config)
        for name, module in obj.modules().items():
            heads[f"{obj.name}_{name}"] = module
    if heads:
        dtype = next(core.parameters()).dtype
        module_dict = nn.ModuleDict(heads).to(dtype)
        for p in module_dict.parameters():
            p.requires_grad_(True)
        setattr(core, HEADS_ATTR, module_dict)


def setting(args: Any, key: str) -> Any:
    """``args.<key>``, or :class:`~dvsft.training.config.DVSFTConfig`'s default for a key ``args`` lacks (a plain
    ``TrainingArguments`` has none of dvsft's keys)."""
    from dvsft.training.config import DVSFTConfig

    return getattr(args, key, getattr(DVSFTConfig, key))


def collator_for(processor: Any, args: Any, objectives: list[Objective]) -> Any:
    """The :class:`VisionCollator` of ``args``' label options (DVSFTConfig's defaults where ``args`` lacks them)."""
    from dvsft.align.aligner import AlignConfig
    from dvsft.data.collator import VisionCollator

    return VisionCollator(
        processor,
        align_config=AlignConfig(
            max_height_cells=setting(args, "align_max_height_cells"),
            max_subtokens=setting(args, "align_max_subtokens"),
            leading_space=setting(args, "label_leading_space"),
            label_policy=setting(args, "align_label_policy"),
            multi_label=setting(args, "align_multi_label"),
            views=setting(args, "align_views"),
        ),
        vision_labels=any(o.needs_vision_labels for o in objectives),
        keep_records=any(getattr(o, "needs_records", False) for o in objectives),
        max_length=setting(args, "max_length"),
        min_pixels=setting(args, "min_pixels"),
        max_pixels=setting(args, "max_pixels"),
        cache_dir=setting(args, "encoded_cache_dir"),
        cache_max_gb=setting(args, "encoded_cache_max_gb"),
    )


class DVSFTTrainer(StreamingTrainerMixin, Trainer):
    """``transformers.Trainer`` whose loss is the sum of weighted objective terms."""

    loss_is_scaled_for_ga = True  # compute_loss returns each micro-batch's share of the step's loss

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        objectives: list[Objective] | None = None,
        **kwargs: Any,
    ):
        from dvsft.training.config import DVSFTConfig, check_hf_keys

        name_deepspeed_cpu()  # before the Trainer's accelerate imports DeepSpeed (library use; the CLI did it)
        if args is None:
            args = DVSFTConfig()
        check_hf_keys(args)  # plain TrainingArguments too (a DVSFTConfig checked itself)
        if objectives is None:
            objectives = build_objectives(setting(args, "method"), args)
            attach_objectives(model, objectives, args)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("DVSFTTrainer needs processing_class (the model's processor) or a data_collator")
            data_collator = collator_for(processing_class, args, objectives)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.args.disable_tqdm:  # no progress bar and no printed logs either (log.jsonl is still written)
            from transformers.trainer_callback import PrinterCallback

            self.remove_callback(PrinterCallback)
        self.objectives = objectives
        self.add_callback(RanksFinishTogether())
        for callback in (cb for obj in objectives for cb in obj.callbacks()):
            self.add_callback(callback)
        accept_saved_key_format(base_model(self.model))  # resume and load_best_model_at_end read save_pretrained's keys
        self._needs_layers = any(o.needs_hidden_states for o in objectives)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}
        self._eval: dict[str, float] = {}
        self._samples = 0
        self._tokens = 0
        self._window_start = time.perf_counter()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and their labeled tokens (all micro-batches, all processes)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batches, step_tokens(batches, self.accelerator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training (``num_items_in_batch`` is the step's :class:`StepTokens`): this micro-batch's share of
        the step's loss; otherwise (evaluation, a direct call) the batch's own loss."""
        tokens = num_items_in_batch if isinstance(num_items_in_batch, StepTokens) else None
        hidden = forward_hidden(model, inputs, layers=self._needs_layers)
        hidden.tokens = tokens
        core = base_model(model)
        total = None
        terms: dict[str, torch.Tensor] = {}
        steps = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        for obj in self.objectives:
            values = obj.loss(core, inputs, hidden)
            weights = obj.weights()
            for name, value in values.items():
                if name in weights and weights[name] != 0:
                    part = weights[name] * value
                    if tokens is not None and not obj.step_normalized:
                        part = part / steps  # a micro-batch mean: the step's loss is the mean over micro-batches
                    total = part if total is None else total + part
                if not (obj.step_normalized and name in weights):
                    terms[name] = value
        if total is None:
            total = hidden.last.sum() * 0.0
        if model.training:
            self._record(terms, inputs)
        return (total, {"terms": terms}) if return_outputs else total

    # ------------------------------------------------------------------ evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss of a held-out batch; its text / vision terms and top-1 hits are summed for :meth:`evaluate`."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        terms = out["terms"]
        for kind in EVAL_TERMS:
            n = float(terms[f"{kind}_tokens"]) if f"{kind}_tokens" in terms else 0.0
            if n > 0:
                self._eval[f"{kind}_loss"] = self._eval.get(f"{kind}_loss", 0.0) + float(terms[f"{kind}_loss"]) * n
                self._eval[f"{kind}_tokens"] = self._eval.get(f"{kind}_tokens", 0.0) + n
                if f"{kind}_acc" in terms:
                    hits = float(terms[f"{kind}_acc"]) * n
                    self._eval[f"{kind}_hits"] = self._eval.get(f"{kind}_hits", 0.0) + hits
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        prefix = metric_key_prefix
        names = ["text_loss", "text_tokens", "vision_loss", "vision_tokens", "vision_hits"]
        t = torch.tensor([self._eval.get(n, 0.0) for n in names], dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        text_loss, text_n, vision_loss, vision_n, hits = t.tolist()
        if text_n > 0:
            output.metrics[f"{prefix}_text_loss"] = text_loss / text_n
        if vision_n > 0:
            output.metrics[f"{prefix}_vision_loss"] = vision_loss / vision_n
            output.metrics[f"{prefix}_vision_top1"] = hits / vision_n
            output.metrics[f"{prefix}_vision_tokens"] = vision_n
        return output

    # ------------------------------------------------------------------ logging

    def _record(self, terms: dict[str, torch.Tensor], inputs: dict[str, Any]) -> None:
        """Accumulate detached terms; ``x_acc`` and ``x_loss`` are weighted by ``x_tokens`` (means over all labeled
        tokens of the window)."""
        values = {name: float(value.detach().float()) for name, value in terms.items()}
        for name, v in values.items():
            stem = name.rsplit("_", 1)[0]
            weighted = name.endswith(("_acc", "_loss")) and f"{stem}_tokens" in values
            weight = values[f"{stem}_tokens"] if weighted else 1.0
            self._sums.setdefault(name, 0.0)  # same names on every rank (all_reduce in _window_metrics)
            self._counts.setdefault(name, 0.0)
            if math.isnan(v) or weight == 0:
                continue
            self._sums[name] = self._sums.get(name, 0.0) + v * weight
            self._counts[name] = self._counts.get(name, 0.0) + weight
        packed = inputs.get("packed_lengths")  # a packed batch (dvsft.data.packing): its samples, not its rows
        self._samples += int((packed > 0).sum()) if packed is not None else int(inputs["input_ids"].shape[0])
        mask = inputs.get("attention_mask")
        self._tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._window_metrics())
            logs.update(self._encodings())
        super().log(logs, start_time)

    def _encodings(self) -> dict[str, int]:
        """This process's samples so far: run through the processor (``samples_encoded``) and read from the
        encoded-sample cache (``samples_from_cache``), by the collator's counter (checks and steps)."""
        stats = getattr(self.data_collator, "stats", None)
        return {f"samples_{k}": int(v) for k, v in stats.items()} if stats else {}

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save; a checkpoint (``_internal_call``) also gets the objectives' heads and a stream's
        position, written before the Trainer's last file, ``trainer_state.json``."""
        super().save_model(output_dir, _internal_call)
        if _internal_call:
            self.save_checkpoint_extras(output_dir or self.args.output_dir)

    def save_checkpoint_extras(self, folder: str) -> None:
        """The objectives' heads and a stream's position, into the checkpoint ``folder``."""
        self.save_data_state(folder)
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


class RanksFinishTogether(TrainerCallback):
    """Every process leaves training together, its last collective done on every side: a rank that tore down its
    gloo connections while another was still communicating (the last save's) aborted now and then."""

    def on_train_end(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()


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
