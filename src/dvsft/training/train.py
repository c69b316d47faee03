"""``train(config) -> TrainResult``: the whole `dvsft train` run as a library call.

    from dvsft.training.config import load_config
    from dvsft.training.train import train

    cfg = load_config("configs/tiny_cpu.yaml", ["--data", "records.jsonl", "--max_steps", "20"])
    result = train(cfg, callbacks=[MyEvalCallback()])   # transformers.TrainerCallback instances
    result.final_dir   # output_dir/final: model + processor, loads with from_pretrained / dvsft.models
    result.log         # the logged rows (also in output_dir/log.jsonl)

Under ``torchrun`` / ``accelerate launch`` every process calls ``train``; the HF Trainer handles
DDP, DeepSpeed and FSDP. The gradient accumulation is derived from ``global_batch_size``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.training.config import (
    TrainConfig,
    config_from_dict,
    load_config,
    qa_per_image_for,
    to_dict,
    validate,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None  # None when save_final is false
    log: list[dict[str, Any]] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)  # parameter counts per part


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def grad_accumulation(cfg: TrainConfig, processes: int | None = None) -> int:
    """``global_batch_size / (per_device_batch_size * world size)``; must divide exactly."""
    processes = processes or world_size()
    per_step = cfg.per_device_batch_size * processes
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of per_device_batch_size "
            f"{cfg.per_device_batch_size} x {processes} process(es)"
        )
    return cfg.global_batch_size // per_step


def use_bf16(cfg: TrainConfig) -> bool:
    import torch

    if cfg.bf16 == "auto":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(cfg.bf16)


def report_to(cfg: TrainConfig) -> str | list[str]:
    import importlib.util

    if cfg.report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    return cfg.report_to


def resume_checkpoint(cfg: TrainConfig) -> str | None:
    """The checkpoint dir to resume from (``resume: true`` = the newest intact one in output_dir)."""
    from dvsft.training.checkpoints import check_checkpoint, latest_intact, remove_staging

    if cfg.resume is False or cfg.resume is None:
        return None
    if cfg.resume is True:
        if os.environ.get("RANK", "0") == "0":
            remove_staging(cfg.output_dir)
        return str(latest_intact(cfg.output_dir))
    path = Path(str(cfg.resume))
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint dir (no trainer_state.json)")
    problem = check_checkpoint(path)
    if problem is not None:
        raise ValueError(f"--resume {path}: {problem}")
    return str(path)


def load_dataset(cfg: TrainConfig) -> list[dict[str, Any]]:
    from dvsft.data.dataset import load_records
    from dvsft.data.skips import report_skips

    paths = cfg.data if isinstance(cfg.data, list) else [cfg.data]
    samples: list[dict[str, Any]] = []
    problems, skipped = [], 0
    for p in paths:
        loaded = load_records(
            p,
            seed=cfg.seed,
            qa_per_image=qa_per_image_for(cfg.qa_per_image, p),
            keep_conversations=cfg.keep_conversations,
        )
        samples.extend(loaded)
        problems.extend(loaded.problems)
        skipped += len(loaded.skipped)
    reasons = report_skips(
        problems, skipped, len(samples), cfg.output_dir, cfg.strict, os.environ.get("RANK", "0") == "0"
    )
    if cfg.max_samples is not None:
        samples = samples[: cfg.max_samples]
    if not samples:
        why = f": all {skipped} records were skipped, reasons in {reasons}" if skipped else ""
        raise ValueError(f"no trainable samples in {', '.join(map(str, paths))}{why}")
    return samples


def streaming_samples(cfg: TrainConfig) -> Any:
    """``cfg.data`` as a :class:`dvsft.data.streaming.StreamingSamples` (records are read while training)."""
    from dvsft.data.streaming import StreamingSamples

    if cfg.max_samples is not None:
        raise ValueError("max_samples does not apply to streaming input; convert a subset instead")
    paths = cfg.data if isinstance(cfg.data, list) else [cfg.data]
    sources = [(p, qa_per_image_for(cfg.qa_per_image, p)) for p in paths]
    return StreamingSamples(sources, seed=cfg.seed, window_rows=cfg.stream_window, qa_per_image=None)


def build(cfg: TrainConfig):
    """(model, processor, objectives, trainable counts): the model set up for training."""
    import torch
    from torch import nn
    from transformers import set_seed

    from dvsft.training.model_setup import apply_lora, load_base, set_trainable, trainable_counts
    from dvsft.training.objectives import HEADS_ATTR, base_model, build_objectives

    objectives = build_objectives(cfg.method, cfg)
    set_seed(cfg.seed)
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    model, processor = load_base(cfg, dtype=dtype)
    model.config.use_cache = False
    llm_mode = cfg.train.llm
    if llm_mode == "auto":
        llm_mode = next((o.train_llm for o in objectives if o.train_llm), "all")
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    else:
        set_trainable(model, cfg.train, llm_mode)
    heads: dict[str, nn.Module] = {}
    for obj in objectives:
        obj.setup(base_model(model), cfg)
        for name, module in obj.modules().items():
            heads[f"{obj.name}_{name}"] = module
    if heads:
        module_dict = nn.ModuleDict(heads).to(dtype)
        for p in module_dict.parameters():
            p.requires_grad_(True)
        setattr(base_model(model), HEADS_ATTR, module_dict)
    return model, processor, objectives, trainable_counts(model)


def training_arguments(cfg: TrainConfig, **extra: Any):
    import torch
    from transformers import TrainingArguments

    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    kwargs: dict[str, Any] = dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=grad_accumulation(cfg),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=use_bf16(cfg),
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        remove_unused_columns=False,
        report_to=report_to(cfg),
        eval_strategy="no",
        disable_tqdm=not cfg.progress,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if world_size() > 1 and not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # several CPU processes: DDP over gloo (accelerate needs to be told)
    if cfg.deepspeed:
        kwargs["deepspeed"] = cfg.deepspeed
    if cfg.fsdp:
        kwargs["fsdp"] = cfg.fsdp
        if cfg.fsdp_config:
            kwargs["fsdp_config"] = cfg.fsdp_config
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def save_final(trainer: Any, model: Any, processor: Any, cfg: TrainConfig, final_dir: Path) -> None:
    """Model (without objective heads; LoRA merged) + processor, loadable with from_pretrained / dvsft.models."""
    from dvsft.models import save_processor
    from dvsft.training.objectives import HEADS_ATTR, base_model

    base = base_model(model)
    if HEADS_ATTR in base._modules:
        del base._modules[HEADS_ATTR]
    base.config.use_cache = True
    if cfg.lora.enabled:
        trainer.save_model(str(Path(cfg.output_dir) / "adapter"))
        if trainer.is_world_process_zero():
            merged = trainer.accelerator.unwrap_model(model).merge_and_unload()
            merged.save_pretrained(final_dir)
    else:
        trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        save_processor(processor, final_dir)
        (final_dir / "dvsft_train.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))


@dataclass
class Run:
    """Everything `train` sets up, before training starts (tests and the demo may drive it themselves)."""

    cfg: TrainConfig
    trainer: Any
    model: Any
    processor: Any
    objectives: list[Any]
    trainable: dict[str, int]
    log_callback: Any
    resume: str | None


def as_config(config: TrainConfig | dict[str, Any] | str | Path) -> TrainConfig:
    if isinstance(config, dict):
        return config_from_dict(config)
    if isinstance(config, str | Path):
        return load_config(config)
    return config


def prepare(config: TrainConfig | dict[str, Any] | str | Path, callbacks: list[Any] | None = None) -> Run:
    """Validate the config, load data and model, and build the Trainer (nothing is trained yet)."""
    from dvsft.data.collator import VisionCollator
    from dvsft.labels.align import AlignConfig
    from dvsft.training.trainer import DVSFTTrainer, JsonlLogCallback

    cfg = as_config(config)
    validate(cfg)
    resume = resume_checkpoint(cfg)
    samples = streaming_samples(cfg) if cfg.streaming else load_dataset(cfg)
    model, processor, objectives, trainable = build(cfg)
    if not any(v for k, v in trainable.items() if k.endswith("_trainable")):
        raise ValueError("nothing to train: every parameter is frozen (see train.* and lora.*)")
    needs_vision = any(o.name == "dvsft" for o in objectives)
    collator = VisionCollator(
        processor,
        align_config=AlignConfig(
            max_height_cells=cfg.align.max_height_cells,
            max_subtokens=cfg.align.max_subtokens,
            leading_space=cfg.label_leading_space,
        ),
        vision_labels=needs_vision,
        keep_records=any(getattr(o, "needs_records", False) for o in objectives),
        max_length=cfg.max_length,
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
    )
    out = Path(cfg.output_dir)
    resume_step = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else None
    log_cb = JsonlLogCallback(out / "log.jsonl", resume_step=resume_step)
    trainer = DVSFTTrainer(
        model=model,
        args=training_arguments(cfg),
        train_dataset=samples,
        data_collator=collator,
        processing_class=processor,
        callbacks=[log_cb, *(callbacks or [])],
        objectives=objectives,
    )
    if not cfg.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return Run(cfg, trainer, model, processor, objectives, trainable, log_cb, resume)


def train(config: TrainConfig | dict[str, Any] | str | Path, callbacks: list[Any] | None = None) -> TrainResult:
    """Train as configured; returns where the results are and the logged rows.

    ``config``: a :class:`TrainConfig`, a dict of keys, or a YAML path. ``callbacks``:
    ``transformers.TrainerCallback`` instances (e.g. evaluate the model every N steps; they get
    ``model`` in their keyword arguments).
    """
    from dvsft.training.trainer import load_heads

    run = prepare(config, callbacks)
    cfg, trainer = run.cfg, run.trainer
    out = Path(cfg.output_dir)
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / "dvsft_train.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    if run.resume:
        load_heads(run.model, run.resume)
    trainer.train(resume_from_checkpoint=run.resume)
    final_dir = out / "final" if cfg.save_final else None
    if final_dir is not None:
        save_final(trainer, run.model, run.processor, cfg, final_dir)
    return TrainResult(output_dir=out, final_dir=final_dir, log=run.log_callback.rows, trainable=run.trainable)
