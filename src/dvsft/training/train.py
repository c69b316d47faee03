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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.core.accel import end_process_group_at_exit
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


def load_dataset(cfg: DVSFTConfig, files: list[str] | None = None) -> Any:
    """Samples of ``cfg.data``, or of ``files`` (``eval_data``), as a :class:`dvsft.data.dataset.RecordList`: bad
    records skipped and reported (:func:`report_data_skips`), refused when none is left. The run's collator checks
    the samples next (:func:`check_dataset`)."""
    from dvsft.data.dataset import RecordList, load_records
    from dvsft.data.skips import require_labels

    paths = list(files if files is not None else cfg.data or [])
    samples = RecordList()
    for p in paths:
        qa = qa_per_image_for(cfg.qa_per_image, p)
        samples.add(load_records(p, seed=cfg.seed, qa_per_image=qa, keep_conversations=cfg.keep_conversations))
    reasons = report_data_skips(cfg, samples, files is not None)
    if cfg.max_samples is not None and files is None:
        samples = samples.head(cfg.max_samples)
    require_labels(_names(paths), samples.count(), False, reasons)
    return samples


def check_dataset(cfg: DVSFTConfig, samples: Any, collator: Any, files: list[str] | None = None) -> Any:
    """The samples of :func:`load_dataset` that the run's ``collator`` can encode within ``max_length``
    (:func:`dvsft.data.dataset.check_samples`), the others added to the reported skips; training data (not
    ``files``, the ``eval_data``) without text labels, or without vision labels where the collator aligns words,
    is refused with the counts."""
    from dvsft.data.dataset import check_samples
    from dvsft.data.skips import require_labels

    checked = check_samples(samples, collator, cfg.dataloader_num_workers)
    new_skips = len(checked.problems) > len(samples.problems)
    reasons = report_data_skips(cfg, checked, files is not None) if new_skips else None
    paths = files if files is not None else cfg.data or []
    require_labels(_names(paths), checked.count(), collator.vision_labels and files is None, reasons)
    return checked


def report_data_skips(cfg: DVSFTConfig, samples: Any, held_out: bool) -> Path | None:
    """Log the skipped records and, on the process that saves (``cfg.should_save``), write their reasons
    (``output_dir/skipped_records.jsonl``, or ``skipped_eval_records.jsonl`` for ``eval_data``; ``--strict`` fails
    instead); the reasons file or None."""
    from dvsft.data.skips import EVAL_REASONS_FILE, REASONS_FILE, report_skips

    name = EVAL_REASONS_FILE if held_out else REASONS_FILE
    return report_skips(
        samples.problems, len(samples.skipped), len(samples), cfg.output_dir, cfg.strict, cfg.should_save, name
    )


def streaming_samples(cfg: DVSFTConfig) -> Any:
    """``cfg.data`` as a :class:`dvsft.data.streaming.StreamingSamples` (records are read while training)."""
    from dvsft.data.streaming import StreamingSamples

    if cfg.max_samples is not None:
        raise ValueError("max_samples does not apply to streaming input; convert a subset instead")
    sources = [(p, qa_per_image_for(cfg.qa_per_image, p)) for p in _data_paths(cfg)]
    return StreamingSamples(
        sources, seed=cfg.seed, window_rows=cfg.stream_window, qa_per_image=None, split=cfg.stream_split
    )


def check_stream(cfg: DVSFTConfig, stream: Any, collator: Any) -> None:
    """Check the stream's samples with the run's ``collator`` as they are read (a bad one is skipped), and refuse
    data without text labels, or without vision labels where the collator aligns words (records are read until
    one has them)."""
    from dvsft.data.skips import require_labels

    stream.collator = collator
    count = stream.find_labels(collator.vision_labels)
    require_labels(_names(_data_paths(cfg)), count, collator.vision_labels)


def _data_paths(cfg: DVSFTConfig) -> list[str]:
    return cfg.data if isinstance(cfg.data, list) else [cfg.data]


def _names(paths: list[str]) -> str:
    return ", ".join(map(str, paths))


def build(cfg: DVSFTConfig):
    """(model, processor, trainable counts): the model set up for training (objectives attach in :func:`prepare`)."""
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


def packed(cfg: DVSFTConfig, model: Any, objectives: list[Any], samples: Any, collator: Any) -> tuple[Any, Any]:
    """(training samples, collator) of a packing run (:mod:`dvsft.data.packing`): the checked samples in bins of at
    most ``max_length`` tokens, and the run's collator laying each bin's samples end to end (held-out batches are
    not packed); a ``ValueError`` says why the run cannot pack."""
    from dvsft.data.packing import PackedSamples, PackingCollator, packing_problem

    problem = packing_problem(model, objectives, cfg.per_device_train_batch_size)
    if problem is not None:
        raise ValueError(f"packing: {problem}")
    return PackedSamples(samples, samples.lengths, cfg.max_length), PackingCollator(collator)


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
    """Validate the config, load data and model, and build the Trainer (nothing is trained yet). The records are
    checked before the model loads, the samples after it, with the run's own collator (the model's processor)."""
    from dvsft.objectives.registry import build_objectives
    from dvsft.training.model_setup import trainable_counts
    from dvsft.training.trainer import DVSFTTrainer, JsonlLogCallback, attach_objectives, collator_for

    cfg = as_config(config)
    validate(cfg)
    resume = resume_checkpoint(cfg)
    samples = streaming_samples(cfg) if cfg.streaming else load_dataset(cfg)
    heldout = load_dataset(cfg, cfg.eval_data) if cfg.eval_data else None
    model, processor, trainable = build(cfg)
    if not any(v for k, v in trainable.items() if k.endswith("_trainable")):
        raise ValueError("nothing to train: every parameter is frozen (see train_* and lora*)")
    objectives = build_objectives(cfg.method, cfg)
    attach_objectives(model, objectives, cfg)
    collator = collator_for(processor, cfg, objectives)
    if cfg.streaming:
        check_stream(cfg, samples, collator)
    else:
        samples = check_dataset(cfg, samples, collator)
    if cfg.packing:
        samples, collator = packed(cfg, model, objectives, samples, collator)
    if heldout is not None:
        heldout = check_dataset(cfg, heldout, collator, cfg.eval_data)
    out = Path(cfg.output_dir)
    resume_step = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else None
    log_cb = JsonlLogCallback(out / "log.jsonl", resume_step=resume_step)
    trainer = DVSFTTrainer(
        model=model,
        args=cfg,
        data_collator=collator,
        train_dataset=samples,
        eval_dataset=heldout,
        processing_class=processor,
        objectives=objectives,
        callbacks=[log_cb, *(callbacks or [])],
    )
    end_process_group_at_exit()  # under a launcher: the process group ends before the interpreter does
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
        trainer.accelerator.wait_for_everyone()  # every rank returns once final/ is whole
    return TrainResult(output_dir=out, final_dir=final_dir, log=run.log_callback.rows, trainable=run.trainable)
