"""``train(config) -> TrainResult``: the whole `dvsft train` run as a library call.

    from dvsft.training.config import load_config
    from dvsft.training.train import train

    cfg = load_config("configs/tiny_cpu.yaml", ["--data", "records.jsonl", "--max_steps", "20"])
    result = train(cfg, callbacks=[MyEvalCallback()])   # transformers.TrainerCallback instances
    result.final_dir   # output_dir/final: model + processor, loads with from_pretrained / dvsft.models.loading
    result.log         # the logged rows (also in output_dir/log.jsonl)

Under ``torchrun`` / ``accelerate launch`` every process calls ``train``; the HF Trainer handles
DDP, DeepSpeed and FSDP. ``global_batch_size`` (when set) fixes ``gradient_accumulation_steps``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.training.config import (
    LAST_CHECKPOINT,
    DVSFTConfig,
    config_from_dict,
    load_config,
    qa_per_image_for,
    to_dict,
    validate,
)
from dvsft.training.lock import output_dir_lock, resume_requested, saves_reported

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None  # None when save_final is false
    log: list[dict[str, Any]] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)  # parameter counts per part


def resume_checkpoint(cfg: DVSFTConfig) -> str | None:
    """The checkpoint dir to resume from (``last`` = the newest intact one in output_dir)."""
    from dvsft.training.checkpoints import check_checkpoint, latest_intact

    value = cfg.resume_from_checkpoint
    if not resume_requested(cfg):
        return None
    if str(value).lower() in LAST_CHECKPOINT:
        return str(latest_intact(cfg.output_dir))
    path = Path(str(value))
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint dir (no trainer_state.json)")
    problem = check_checkpoint(path)
    if problem is not None:
        raise ValueError(f"--resume {path}: {problem}")
    return str(path)


def load_dataset(cfg: DVSFTConfig, files: list[str] | None = None) -> list[dict[str, Any]]:
    """Samples of ``cfg.data`` (bad records skipped and reported), or of ``files`` (held-out: skips only logged)."""
    from dvsft.data.dataset import load_records
    from dvsft.data.skips import report_skips

    held_out = files is not None
    paths = list(files if held_out else cfg.data or [])
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
    if held_out:
        reasons = None
        if skipped:
            log.warning("eval_data: skipped %d bad record(s) of %s", skipped, ", ".join(paths))
    else:
        reasons = report_skips(
            problems, skipped, len(samples), cfg.output_dir, cfg.strict, os.environ.get("RANK", "0") == "0"
        )
    if cfg.max_samples is not None and not held_out:
        samples = samples[: cfg.max_samples]
    if not samples:
        why = f": all {skipped} records were skipped, reasons in {reasons}" if skipped else ""
        raise ValueError(f"no trainable samples in {', '.join(map(str, paths))}{why}")
    return samples


def streaming_samples(cfg: DVSFTConfig) -> Any:
    """``cfg.data`` as a :class:`dvsft.data.streaming.StreamingSamples` (records are read while training)."""
    from dvsft.data.streaming import StreamingSamples

    if cfg.max_samples is not None:
        raise ValueError("max_samples does not apply to streaming input; convert a subset instead")
    paths = cfg.data if isinstance(cfg.data, list) else [cfg.data]
    sources = [(p, qa_per_image_for(cfg.qa_per_image, p)) for p in paths]
    return StreamingSamples(
        sources, seed=cfg.seed, window_rows=cfg.stream_window, qa_per_image=None, split=cfg.stream_split
    )


def build(cfg: DVSFTConfig):
    """(model, processor, trainable counts): the model set up for training (objectives attach in the trainer)."""
    import torch
    from transformers import set_seed

    from dvsft.objectives.registry import method_names, objective_class
    from dvsft.training.model_setup import apply_lora, load_base, set_trainable, trainable_counts

    set_seed(cfg.seed)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model, processor = load_base(cfg, dtype=dtype)
    model.config.use_cache = False
    llm_mode = cfg.train_llm
    if llm_mode == "auto":
        modes = [objective_class(n).train_llm for n in method_names(cfg.method)]
        llm_mode = next((m for m in modes if m), "all")
    if cfg.lora:
        model = apply_lora(model, cfg)
    else:
        set_trainable(model, cfg.train_vision, cfg.train_projector, llm_mode)
    return model, processor, trainable_counts(model)


def save_final(trainer: Any, model: Any, processor: Any, cfg: DVSFTConfig, final_dir: Path) -> None:
    """Model (without objective heads; LoRA merged) + processor: from_pretrained / dvsft.models.loading load it."""
    from dvsft.models.loading import save_processor
    from dvsft.objectives.base import HEADS_ATTR, base_model

    base = base_model(model)
    if HEADS_ATTR in base._modules:
        del base._modules[HEADS_ATTR]
    base.config.use_cache = True
    if cfg.lora:
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

    cfg: DVSFTConfig
    trainer: Any
    model: Any
    processor: Any
    objectives: list[Any]
    trainable: dict[str, int]
    log_callback: Any
    resume: str | None


def as_config(config: DVSFTConfig | dict[str, Any] | str | Path) -> DVSFTConfig:
    if isinstance(config, dict):
        return config_from_dict(config)
    if isinstance(config, str | Path):
        return load_config(config)
    return config


def prepare(config: DVSFTConfig | dict[str, Any] | str | Path, callbacks: list[Any] | None = None) -> Run:
    """Validate the config, load data and model, and build the Trainer (nothing is trained yet)."""
    from dvsft.training.model_setup import trainable_counts
    from dvsft.training.trainer import DVSFTTrainer, JsonlLogCallback

    cfg = as_config(config)
    validate(cfg)
    resume = resume_checkpoint(cfg)
    samples = streaming_samples(cfg) if cfg.streaming else load_dataset(cfg)
    heldout = load_dataset(cfg, cfg.eval_data) if cfg.eval_data else None
    model, processor, trainable = build(cfg)
    if not any(v for k, v in trainable.items() if k.endswith("_trainable")):
        raise ValueError("nothing to train: every parameter is frozen (see train_* and lora*)")
    out = Path(cfg.output_dir)
    resume_step = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else None
    log_cb = JsonlLogCallback(out / "log.jsonl", resume_step=resume_step)
    trainer = DVSFTTrainer(
        model=model,
        args=cfg,
        train_dataset=samples,
        eval_dataset=heldout,
        processing_class=processor,
        callbacks=[log_cb, *(callbacks or [])],
    )
    trainable = trainable_counts(model)  # with the objectives' heads
    return Run(cfg, trainer, model, processor, trainer.objectives, trainable, log_cb, resume)


def train(config: DVSFTConfig | dict[str, Any] | str | Path, callbacks: list[Any] | None = None) -> TrainResult:
    """Train as configured; returns where the results are and the logged rows.

    ``config``: a :class:`DVSFTConfig`, a dict of keys, or a YAML path. ``callbacks``:
    ``transformers.TrainerCallback`` instances (e.g. evaluate the model every N steps; they get
    ``model`` in their keyword arguments). The main process holds ``output_dir``'s lock while it runs (a
    second run into it is refused); a save that fails for a full disk is one OSError naming the file
    (:mod:`dvsft.training.lock`).
    """
    cfg = as_config(config)
    with output_dir_lock(cfg), saves_reported(cfg.output_dir):
        return _train(cfg, callbacks)


def _train(config: DVSFTConfig, callbacks: list[Any] | None) -> TrainResult:
    from dvsft.training.checkpoints import remove_torn_after
    from dvsft.training.trainer import load_heads

    run = prepare(config, callbacks)
    cfg, trainer = run.cfg, run.trainer
    out = Path(cfg.output_dir)
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / "dvsft_train.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    if run.resume:
        if trainer.is_world_process_zero():
            remove_torn_after(run.resume)
        trainer.accelerator.wait_for_everyone()
        load_heads(run.model, run.resume)
    trainer.train(resume_from_checkpoint=run.resume)
    final_dir = out / "final" if cfg.save_final else None
    if final_dir is not None:
        save_final(trainer, run.model, run.processor, cfg, final_dir)
    return TrainResult(output_dir=out, final_dir=final_dir, log=run.log_callback.rows, trainable=run.trainable)
