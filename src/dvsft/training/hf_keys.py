"""Every ``TrainingArguments`` key, classified: passed to the Trainer unchanged, implemented by dvsft, or
refused at load with one line. Nothing is accepted and ignored (``tests/test_hf_keys.py`` walks every field).

* ``PASSED``: the HF ``Trainer`` acts on the key exactly as it does without dvsft.
* ``IMPLEMENTED``: dvsft acts on the key itself (its loss, data path or checkpoints read it); some values may
  still be refused (``REFUSED``).
* ``REFUSED``: values dvsft cannot honour, as a check of the config and the reason given when it fails; the
  default always passes. A key only here has no other value that dvsft could honour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# fmt: off
PASSED = frozenset({
    # optimisation and schedule
    "per_device_train_batch_size", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "optim_target_modules", "max_grad_norm", "neftune_noise_alpha", "seed", "full_determinism",
    # precision, memory, compilation
    "bf16", "fp16", "bf16_full_eval", "fp16_full_eval", "tf32", "activation_checkpointing",
    "activation_checkpointing_kwargs", "gradient_checkpointing", "gradient_checkpointing_kwargs", "torch_compile",
    "torch_compile_backend", "torch_compile_mode", "torch_empty_cache_steps", "skip_memory_metrics", "debug",
    # logging and reporting
    "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
    "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name",
    "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    # evaluation
    "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "eval_on_start",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    # checkpoints and the Hub
    "save_only_model", "save_strategy", "save_steps", "save_on_each_node", "save_total_limit",
    "enable_jit_checkpoint", "restore_callback_states_from_checkpoint", "push_to_hub", "hub_token",
    "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    # data loading (the Trainer's DataLoader; a stream's uses the first four)
    "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor",
    "dataloader_in_order",
    # processes and engines
    "use_cpu", "accelerator_config", "parallelism_config", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout", "fsdp", "fsdp_config", "deepspeed",
    "local_rank",
    # flags TrainingArguments keeps for the user's own scripts (the Trainer reads neither)
    "do_train", "do_eval",
})
# fmt: on

IMPLEMENTED = {
    "output_dir": "checkpoints, log.jsonl, skipped-record reports and final/; one training at a time (a lock)",
    "gradient_accumulation_steps": "derived from global_batch_size when that is set (a disagreeing value is refused)",
    "average_tokens_across_devices": "dvsft always normalises per token over the whole step, all processes",
    "label_smoothing_factor": "applied to the text loss as the Trainer's LabelSmoother defines it",
    "resume_from_checkpoint": "a checkpoint dir, or `last`: the newest intact checkpoint in output_dir",
    "remove_unused_columns": "must stay False: the collator reads the raw records",
    "prediction_loss_only": "evaluation reports the loss and dvsft's terms; no logits are gathered either way",
    "ignore_data_skip": "a streamed run resumes at its recorded position, without re-reading the trained data",
    "data_seed": "the sampler's seed (in-memory data); a stream's order follows `seed`",
    "train_sampling_strategy": "random or sequential sampling of the in-memory samples",
    "dataloader_persistent_workers": "the Trainer's DataLoader (in-memory data)",
    "dataloader_multiprocessing_context": "the Trainer's DataLoader (in-memory data)",
}


def _default(key: str) -> Callable[[Any], bool]:
    """The check that ``key`` keeps its ``TrainingArguments`` default."""
    import dataclasses

    from transformers import TrainingArguments

    field = next(f for f in dataclasses.fields(TrainingArguments) if f.name == key)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    return lambda cfg: getattr(cfg, key) == default


def _not_streaming(key: str) -> Callable[[Any], bool]:
    is_default = _default(key)
    return lambda cfg: not getattr(cfg, "streaming", False) or is_default(cfg)


NO_LOGITS = "dvsft's evaluation gathers no logits (it reports the loss and its terms), so there is nothing to {}"
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "remove_unused_columns": (
        lambda cfg: not cfg.remove_unused_columns,
        "must be false: the collator reads the records",
    ),
    "average_tokens_across_devices": (
        lambda cfg: cfg.average_tokens_across_devices,
        "must be true: dvsft normalises the loss per token over the whole step, every process",
    ),
    "use_liger_kernel": (
        lambda cfg: not cfg.use_liger_kernel,
        "dvsft's loss already fuses the LM head (and uses Liger's kernel on CUDA where liger_kernel is installed)",
    ),
    "liger_kernel_config": (lambda cfg: not cfg.liger_kernel_config, "goes with use_liger_kernel, which is refused"),
    "use_cache": (lambda cfg: not cfg.use_cache, "training runs without the KV cache"),
    "auto_find_batch_size": (
        lambda cfg: not cfg.auto_find_batch_size,
        "it would shrink the per-device batch and so change the samples per step; set global_batch_size and "
        "per_device_train_batch_size instead",
    ),
    "do_predict": (lambda cfg: not cfg.do_predict, "dvsft train does not predict; use dvsft eval"),
    "label_names": (lambda cfg: not cfg.label_names, "the collator names its labels itself"),
    "include_for_metrics": (lambda cfg: not cfg.include_for_metrics, NO_LOGITS.format("include")),
    "batch_eval_metrics": (lambda cfg: not cfg.batch_eval_metrics, NO_LOGITS.format("batch")),
    "eval_accumulation_steps": (lambda cfg: cfg.eval_accumulation_steps is None, NO_LOGITS.format("accumulate")),
    "eval_use_gather_object": (lambda cfg: not cfg.eval_use_gather_object, NO_LOGITS.format("gather")),
    "eval_do_concat_batches": (lambda cfg: cfg.eval_do_concat_batches, NO_LOGITS.format("concatenate")),
    "train_sampling_strategy": (
        lambda cfg: (
            cfg.train_sampling_strategy in ("random", "sequential") and _not_streaming("train_sampling_strategy")(cfg)
        ),
        "random or sequential, and only for in-memory data (a stream has its own windowed shuffle)",
    ),
    "length_column_name": (_default("length_column_name"), "goes with group_by_length sampling, which is refused"),
    "data_seed": (_not_streaming("data_seed"), "a stream's order follows `seed`; data_seed is for in-memory data"),
    "ignore_data_skip": (
        _not_streaming("ignore_data_skip"),
        "a streamed run always resumes at its recorded position (it skips without re-reading)",
    ),
    "dataloader_persistent_workers": (
        _not_streaming("dataloader_persistent_workers"),
        "a stream's DataLoader is dvsft's own; only num_workers, pin_memory and prefetch_factor apply to it",
    ),
    "dataloader_multiprocessing_context": (
        _not_streaming("dataloader_multiprocessing_context"),
        "a stream's DataLoader is dvsft's own; only num_workers, pin_memory and prefetch_factor apply to it",
    ),
}


def refusals(cfg: Any) -> list[str]:
    """``"key: reason"`` for every key whose value dvsft cannot honour (empty when all are fine)."""
    return [f"{key}={getattr(cfg, key)!r}: {reason}" for key, (ok, reason) in REFUSED.items() if not ok(cfg)]
