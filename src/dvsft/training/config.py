"""The training configuration: :class:`DVSFTConfig`, every ``TrainingArguments`` field plus DV-SFT's own.

YAML files and command-line overrides go through ``transformers.HfArgumentParser``: any
``TrainingArguments`` key (``adam_beta2``, ``optim``, ``torch_compile``, ``eval_strategy``, ...) works
in the YAML file and as ``--key value``. DV-SFT's grouped keys (``lora_r``, ``train_llm``, ...) may
also be written as YAML sections (``lora: {r: 16}``) or dotted (``--lora.r 16``): those are the
fields' aliases. Defaults are the paper's Table 4 (Qwen3-VL-2B, full fine-tune).

Values are checked when the config is loaded (ranges, paths that must exist, an output dir that is a
folder); an error names the key and where its value came from (the YAML file or the command line).
``dvsft train --keys`` lists every key with its help.
"""

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser, TrainingArguments

from dvsft.align.aligner import AlignConfig
from dvsft.data.collator import MAX_LENGTH
from dvsft.models.geometry import TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS
from dvsft.models.loading import model_builder
from dvsft.objectives.losses import LossSettings

COMMAND_LINE = "command line"
LAST_CHECKPOINT = ("last", "latest", "true")  # resume_from_checkpoint values meaning "the newest in output_dir"
# The presets (training, accelerate, DeepSpeed) ship inside the package; the repository's configs/ links here.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_file(path: str | Path) -> Path:
    """``path``, or the packaged preset it names: ``configs/X.yaml`` read from :data:`CONFIGS_DIR` when
    no such file exists relative to the working directory (an installed dvsft outside the repository)."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and path.parts[:1] == ("configs",) and len(path.parts) > 1:
        packaged = CONFIGS_DIR.joinpath(*path.parts[1:])
        if packaged.is_file():
            return packaged
    return path


def opt(default: Any, help: str, alias: str | None = None, **extra: Any) -> Any:
    """A dataclass field with a default, a help string and an optional dotted alias (``--lora.r``)."""
    metadata: dict[str, Any] = {"help": help, **extra}
    if alias:
        metadata["aliases"] = [f"--{alias}"]
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class ConfigError(ValueError):
    """A config value that is wrong; ``key`` names it (for the 'where it came from' prefix)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class DVSFTConfig(TrainingArguments):
    """``TrainingArguments`` + DV-SFT: method, vision loss, labels, data, model, LoRA and parts to train."""

    # ---------------------------------------------------------------- TrainingArguments defaults (paper Table 4)
    output_dir: str | None = opt("runs/dvsft", "checkpoints, log.jsonl, dvsft_train.json and final/")
    per_device_train_batch_size: int = opt(1, "samples per device per forward pass")
    num_train_epochs: float = opt(1.0, "training epochs (max_steps > 0 overrides)")
    learning_rate: float = opt(5e-6, "peak learning rate")
    lr_scheduler_type: str = opt("cosine", "HF scheduler name: cosine, linear, constant_with_warmup, ...")
    warmup_steps: float = opt(0.03, "linear warmup: a float in [0, 1) is a fraction of all steps, >= 1 a step count")
    logging_steps: float = opt(1, "log every N optimizer steps")
    save_steps: float = opt(500, "checkpoint every N optimizer steps")
    save_total_limit: int | None = opt(2, "keep at most this many checkpoints")
    seed: int = opt(0, "random seed (model init, data order, dropout)")
    remove_unused_columns: bool = opt(False, "keep False: the collator needs the raw records")
    resume_from_checkpoint: str | None = opt(
        None,
        "continue from a checkpoint dir, or `last` (also `--resume` alone): the newest intact one in output_dir",
        alias="resume",
        nargs="?",
        const="last",
    )

    # ---------------------------------------------------------------- DV-SFT
    method: str = opt("dvsft", "objectives joined by '+': sft, dvsft, basic, and registered ones (dvsft+asvr)")
    vision_lambda: float = opt(
        LossSettings.vision_lambda, "weight of the vision loss: L = L_text + lambda * L_vision (>= 0)"
    )
    vision_eps: float = opt(
        LossSettings.vision_eps, "vision smoothing eps in [0, 1): mass spread over the image's label set"
    )
    label_leading_space: bool = opt(AlignConfig.leading_space, "tokenize vision labels as ' word' (mid-sentence form)")
    align_max_height_cells: float = opt(
        AlignConfig.max_height_cells,
        "drop words taller than this many visual-token cells",
        alias="align.max_height_cells",
    )
    align_max_subtokens: int = opt(
        AlignConfig.max_subtokens, "drop words whose tokenization is longer than this", alias="align.max_subtokens"
    )
    min_pixels: int = opt(TRAIN_MIN_PIXELS, "image processor min pixels")
    max_pixels: int = opt(TRAIN_MAX_PIXELS, "image processor max pixels")
    max_length: int = opt(MAX_LENGTH, "max sequence length (longer samples are truncated by the collator)")
    loss_chunk_size: int = opt(LossSettings.loss_chunk_size, "positions per lm_head chunk in the text / vision losses")
    objectives: dict[str, Any] | str | None = opt(
        None, "per-objective options, e.g. objectives: {basic: {lambda2: 0.5}} or --objectives.basic.lambda2 0.5"
    )
    global_batch_size: int | None = opt(
        None, "samples per optimizer step; sets gradient_accumulation_steps = global / (per_device x processes)"
    )

    # ---------------------------------------------------------------- data
    data: list[str] | None = opt(None, "word records with messages (JSONL, Parquet, shard or datasets folders)")
    eval_data: list[str] | None = opt(
        None, "held-out word-record JSONL file(s): eval loss / vision top-1 at eval_steps"
    )
    qa_per_image: dict[str, Any] | str | None = opt(
        None,
        "QA pairs drawn per image (null = all); a mapping sets it per data file by name or stem, "
        "e.g. {default: 1, infovqa: 2} (the paper's Qwen3-VL setting)",
    )
    keep_conversations: bool = opt(
        True, "a record's chosen QA pairs stay one multi-turn sample (vision labels once); false = one per pair"
    )
    max_samples: int | None = opt(None, "use only the first N samples of data (quick runs); None = all")
    streaming: bool = opt(False, "stream the data (Parquet shards, datasets folders), do not load it; needs max_steps")
    stream_window: int = opt(2048, "streaming: records shuffled together (memory grows with it, not with the data)")
    stream_split: str = opt(
        "auto",
        "streaming: split_dataset_by_node strategy across ranks: auto (whole windows when their count divides "
        "by the world size, else examples), shards (whole windows), examples (every world_size-th record)",
    )
    strict: bool = opt(False, "fail on the first bad record instead of skipping it (reasons: skipped_records.jsonl)")
    save_final: bool = opt(True, "write the trained model + processor to output_dir/final")
    overwrite_output_dir: bool = opt(
        False, "dvsft train: replace a finished run (output_dir/final) instead of refusing to start"
    )

    # ---------------------------------------------------------------- model
    model: str | None = opt(None, "local HF model dir (Qwen3-VL, Qwen2-VL, Qwen2.5-VL) or `tiny`", alias="model.path")
    model_llm: str | None = opt(
        None, "graft: dir of a text LLM (Qwen3ForCausalLM); needs model_vision_from", alias="model.llm"
    )
    model_vision_from: str | None = opt(
        None,
        "graft: dir of a Qwen3-VL model whose vision tower is copied (ViT, merger, DeepStack mergers)",
        alias="model.vision_from",
    )
    model_fresh_projector: bool = opt(
        False,
        "graft: re-initialise the merger and DeepStack mergers instead of copying them",
        alias="model.fresh_projector",
    )
    trust_remote_code: bool = opt(
        False,
        "pass trust_remote_code=True to transformers (only if you trust the dir)",
        alias="model.trust_remote_code",
    )
    attn_implementation: str | None = opt(
        None, "attention kernel: sdpa, eager, flash_attention_2; None = default", alias="model.attn_implementation"
    )
    train_vision: bool = opt(False, "train the vision encoder (ViT blocks); frozen in the paper", alias="train.vision")
    train_projector: bool = opt(True, "train the projector (the vision tower's merger)", alias="train.projector")
    train_llm: Literal["auto", "all", "first_layer", "none"] = opt(
        "auto", "LLM layers to train; auto = the method's choice (BASIC: first_layer, else all)", alias="train.llm"
    )
    lora: bool = opt(False, "LoRA instead of full fine-tuning: only the adapters train", alias="lora.enabled")
    lora_r: int = opt(64, "LoRA rank (paper, Qwen3-VL-8B)", alias="lora.r")
    lora_alpha: int = opt(128, "LoRA alpha", alias="lora.alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout", alias="lora.dropout")
    lora_target_modules: list[str] | None = opt(
        None, "module name suffixes; None = the family's LoRA targets", alias="lora.target_modules"
    )
    tiny_vocab_size: int = opt(2048, "`model: tiny`: BPE vocabulary size (trained on pydoc)", alias="tiny.vocab_size")
    tiny_hidden_size: int = opt(64, "`model: tiny`: LLM hidden size", alias="tiny.hidden_size")
    tiny_layers: int = opt(2, "`model: tiny`: LLM decoder layers", alias="tiny.layers")
    tiny_heads: int = opt(4, "`model: tiny`: LLM attention heads", alias="tiny.heads")
    tiny_kv_heads: int = opt(2, "`model: tiny`: LLM key/value heads", alias="tiny.kv_heads")
    tiny_vision_hidden_size: int = opt(64, "`model: tiny`: ViT hidden size", alias="tiny.vision_hidden_size")
    tiny_vision_depth: int = opt(1, "`model: tiny`: ViT blocks", alias="tiny.vision_depth")
    tiny_vision_heads: int = opt(4, "`model: tiny`: ViT attention heads", alias="tiny.vision_heads")
    tiny_seed: int = opt(0, "`model: tiny`: initialisation seed", alias="tiny.seed")
    tiny_family: str = opt(
        "qwen3-vl",
        "`model: tiny`: architecture: qwen3-vl, qwen3.5, qwen3-vl-moe, internvl, llava_onevision, idefics3, smolvlm",
        alias="tiny.family",
    )
    tiny_experts: int = opt(4, "`model: tiny`: qwen3-vl-moe experts per MoE layer (2 active)", alias="tiny.experts")
    tiny_tokenizer: str = opt(
        "corpus",
        "`model: tiny`: corpus (trained on pydoc, Qwen's splitting) or qwen (Qwen's real one)",
        alias="tiny.tokenizer",
    )

    def __post_init__(self) -> None:
        import torch

        for name in ("data", "eval_data", "lora_target_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        if isinstance(self.objectives, str):
            try:
                self.objectives = json.loads(self.objectives)
            except json.JSONDecodeError as err:
                raise ConfigError("objectives", f"objectives: not a JSON mapping: {err}") from err
        self.objectives = dict(self.objectives or {})
        if isinstance(self.qa_per_image, str):  # from the command line: a count, null, or a JSON mapping
            text = self.qa_per_image.strip()
            try:
                self.qa_per_image = None if text.lower() in ("null", "none", "") else json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError("qa_per_image", f"qa_per_image: {text!r} is not a count, null or a mapping") from err
        check_ranges(self)
        for key in ("deepspeed", "fsdp_config"):  # before TrainingArguments reads them
            value = getattr(self, key)
            _need(not _is_file_arg(value) or Path(value).is_file(), key, f"{value} does not exist")
        if self.global_batch_size is not None:
            steps = accumulation_for(self)
            _need(
                self.gradient_accumulation_steps in (1, steps),
                "gradient_accumulation_steps",
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} disagrees with global_batch_size "
                f"{self.global_batch_size} (which gives {steps}); set one of them",
            )
            self.gradient_accumulation_steps = steps
        if self.eval_data and str(self.eval_strategy) in ("no", "IntervalStrategy.NO"):
            self.eval_strategy = "steps"  # held-out data given: evaluate every eval_steps (default: logging_steps)
        if world_size() > 1 and not torch.cuda.is_available():
            self.use_cpu = True  # several CPU processes: DDP over gloo (accelerate needs to be told)
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
        if (self.activation_checkpointing or self.gradient_checkpointing) and not (
            self.activation_checkpointing_kwargs or self.gradient_checkpointing_kwargs
        ):
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        super().__post_init__()
        check_report_to(self.report_to)
        check_hf_keys(self)


# integrations of report_to -> (modules that provide it, the package to install)
REPORTERS = {
    "wandb": (("wandb",), "wandb"),
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
    "neptune": (("neptune",), "neptune"),
    "codecarbon": (("codecarbon",), "codecarbon"),
}


def check_report_to(report_to: list[str] | str | None) -> None:
    """Refuse a ``report_to`` integration whose package is not installed, naming the package."""
    from importlib.util import find_spec

    for name in [report_to] if isinstance(report_to, str) else report_to or []:
        modules, package = REPORTERS.get(name, ((), ""))
        if modules and not any(find_spec(m) for m in modules):
            raise ConfigError("report_to", f"report_to {name} needs the {package} package: pip install {package}")


def check_hf_keys(args: Any) -> None:
    """Refuse ``TrainingArguments`` values that dvsft cannot honour (:mod:`dvsft.training.hf_keys`), naming the key."""
    from dvsft.training.hf_keys import refusals

    problems = refusals(args)
    if problems:
        raise ConfigError(problems[0].split("=", 1)[0], "; ".join(problems))


def world_size() -> int:
    """The launcher's process count. Read from ``WORLD_SIZE`` (torchrun / accelerate set it) because it is needed
    inside :meth:`DVSFTConfig.__post_init__` (``global_batch_size`` -> ``gradient_accumulation_steps``, gloo on
    CPU) before ``TrainingArguments`` sets up the process group that ``args.world_size`` reports."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accumulation_for(cfg: DVSFTConfig, processes: int | None = None) -> int:
    """``global_batch_size / (per_device_train_batch_size * processes)``; must divide exactly."""
    processes = processes or world_size()
    per_step = cfg.per_device_train_batch_size * processes
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            "global_batch_size",
            f"global_batch_size {cfg.global_batch_size} is not a multiple of per_device_train_batch_size "
            f"{cfg.per_device_train_batch_size} x {processes} process(es)",
        )
    return cfg.global_batch_size // per_step


# --------------------------------------------------------------------------- checks


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, f"{key} {message}")


def check_ranges(cfg: DVSFTConfig) -> None:
    """Value ranges of single keys (and min_pixels <= max_pixels); raises :class:`ConfigError`."""
    lam, eps = cfg.vision_lambda, cfg.vision_eps
    _need(math.isfinite(lam) and lam >= 0, "vision_lambda", f"must be a number >= 0, got {lam}")
    _need(math.isfinite(eps) and 0 <= eps < 1, "vision_eps", f"must be in [0, 1), got {eps}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "loss_chunk_size"):
        _need(getattr(cfg, key) >= 1, key, f"must be a positive integer, got {getattr(cfg, key)}")
    for key in ("min_pixels", "max_pixels", "align_max_subtokens", "lora_r", "lora_alpha"):
        _need(getattr(cfg, key) >= 1, key, f"must be a positive integer, got {getattr(cfg, key)}")
    for key in ("global_batch_size", "max_samples", "eval_steps", "per_device_eval_batch_size"):
        value = getattr(cfg, key)
        _need(value is None or value > 0, key, f"must be positive, got {value}")
    for key in ("logging_steps", "save_steps", "align_max_height_cells"):
        _need(getattr(cfg, key) > 0, key, f"must be positive, got {getattr(cfg, key)}")
    _need(
        cfg.max_pixels >= cfg.min_pixels, "max_pixels", f"({cfg.max_pixels}) must be >= min_pixels ({cfg.min_pixels})"
    )
    _need(
        cfg.max_steps == -1 or cfg.max_steps > 0,
        "max_steps",
        f"must be positive (or -1: use epochs), got {cfg.max_steps}",
    )
    _need(
        cfg.max_steps > 0 or cfg.num_train_epochs > 0,
        "num_train_epochs",
        f"must be positive, got {cfg.num_train_epochs}",
    )
    _need(
        cfg.stream_split in ("auto", "shards", "examples"),
        "stream_split",
        f"must be auto, shards or examples, got {cfg.stream_split!r}",
    )
    _need(cfg.learning_rate >= 0, "learning_rate", f"must be >= 0, got {cfg.learning_rate}")
    _need(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    _need(cfg.weight_decay >= 0, "weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    _need(cfg.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {cfg.max_grad_norm}")
    _need(0 <= cfg.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")


def _is_file_arg(value: Any) -> bool:
    return isinstance(value, str) and value.endswith((".json", ".yaml", ".yml"))


def check_paths(cfg: DVSFTConfig) -> None:
    """Inputs that must exist, and an output dir that is (or can be) a folder."""
    for key in ("data", "eval_data"):
        for path in getattr(cfg, key) or []:
            _need(Path(path).exists(), key, f"{path} does not exist")
    if cfg.model is not None and model_builder(cfg.model) is None:
        _need(Path(cfg.model).is_dir(), "model", f"{cfg.model} is not a model dir (it does not exist)")
    for key in ("model_llm", "model_vision_from"):
        value = getattr(cfg, key)
        _need(value is None or Path(value).is_dir(), key, f"{value} is not a model dir (it does not exist)")
    resume = cfg.resume_from_checkpoint
    if resume and resume.lower() not in (*LAST_CHECKPOINT, "false", "none"):
        _need(Path(resume).is_dir(), "resume_from_checkpoint", f"{resume} is not a checkpoint dir (it does not exist)")
    out = Path(cfg.output_dir or ".")
    _need(not out.exists() or out.is_dir(), "output_dir", f"{out} exists and is not a folder")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    _need(parent is None or parent.is_dir(), "output_dir", f"{out}: {parent} is a file, not a folder")


def validate(cfg: DVSFTConfig, paths: bool = True) -> None:
    """What `dvsft train` needs beyond the ranges: a model, data, and (``paths``) inputs that exist."""
    if cfg.model and (cfg.model_llm or cfg.model_vision_from):
        raise ConfigError("model", "set either model or model_llm + model_vision_from, not both")
    if not cfg.model and not (cfg.model_llm and cfg.model_vision_from):
        raise ConfigError("model", "no model: set model (a dir or `tiny`) or model_llm + model_vision_from")
    if bool(cfg.model_llm) != bool(cfg.model_vision_from):
        raise ConfigError("model_llm", "the graft variant needs both model_llm and model_vision_from")
    if not cfg.data:
        raise ConfigError("data", "no training data: set data to a word-record JSONL file")
    try:
        check_qa_per_image(cfg.qa_per_image, cfg.data)
    except ValueError as err:
        raise ConfigError("qa_per_image", str(err)) from err
    if cfg.streaming and not cfg.keep_conversations:
        raise ConfigError(
            "keep_conversations",
            "streaming makes one sample of each record (keep_conversations: true); for one QA pair per sample, "
            "write one record per pair (dvsft prepare --separate)",
        )
    if paths:
        check_paths(cfg)


def qa_per_image_for(setting: int | dict[str, int | None] | None, path: str | Path) -> int | None:
    """The ``qa_per_image`` of one data file: the setting, or its mapping's entry for the file (else ``default``)."""
    if not isinstance(setting, dict):
        return setting
    p = Path(path)
    for key in (str(path), p.name, p.stem):
        if key in setting:
            return setting[key]
    return setting.get("default")


def check_qa_per_image(setting: int | dict[str, int | None] | None, data: list[str]) -> None:
    """Counts are >= 1 or null; every mapping key names a data file (path, name or stem) or is ``default``."""
    values = setting.values() if isinstance(setting, dict) else [setting]
    for v in values:
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"qa_per_image: {v!r} is not a count >= 1 or null (all pairs)")
    if isinstance(setting, dict):
        names = {"default"} | {k for d in data for k in (str(d), Path(d).name, Path(d).stem)}
        unknown = sorted(str(k) for k in setting if str(k) not in names)
        if unknown:
            raise ValueError(f"qa_per_image: {', '.join(unknown)} names no data file ({', '.join(map(str, data))})")


# --------------------------------------------------------------------------- keys and help


class _Parser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are exceptions naming the command line (not a usage dump + exit)."""

    def error(self, message: str):  # argparse calls this on a bad command line
        raise ConfigError(None, f"{COMMAND_LINE}: {message}")


def parser() -> _Parser:
    return _Parser(DVSFTConfig, allow_abbrev=False)


def _dict_fields() -> set[str]:
    import typing

    hints = typing.get_type_hints(DVSFTConfig)
    out = set()
    for f in fields(DVSFTConfig):
        tp = hints[f.name]
        if (
            tp is dict
            or typing.get_origin(tp) is dict
            or any(a is dict or typing.get_origin(a) is dict for a in typing.get_args(tp))
        ):
            out.add(f.name)
    return out


def flat_keys() -> dict[str, tuple[list[str], Any, str]]:
    """``key -> (aliases, default, help)`` for every config key (field order)."""
    defaults = {f.name: f for f in fields(DVSFTConfig) if f.init}
    out: dict[str, tuple[list[str], Any, str]] = {}
    for name, f in defaults.items():
        default = f.default_factory() if f.default_factory is not __import__("dataclasses").MISSING else f.default
        aliases = [a.removeprefix("--") for a in f.metadata.get("aliases", [])]
        out[name] = (aliases, default, str(f.metadata.get("help", "")).strip())
    return out


# --------------------------------------------------------------------------- loading


def _unknown(key: str, where: str, valid: list[str]) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(None, f"{where}: unknown config key {key!r}{hint}; `dvsft train --keys` lists them")


def _flatten(tree: dict[str, Any], dict_fields: set[str], prefix: str = "") -> dict[str, Any]:
    """YAML sections -> dotted keys (``lora: {r: 8}`` -> ``lora.r``); mappings of dict-valued keys stay whole."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = prefix + str(k)
        if isinstance(v, dict) and key.replace("-", "_") not in dict_fields:
            out.update(_flatten(v, dict_fields, key + "."))
        else:
            out[key] = v
    return out


def _convert(action: Any, value: Any, key: str, where: str, dict_field: bool) -> Any:
    """A YAML value checked and converted the way argparse converts the same value on the command line."""
    from argparse import ArgumentTypeError

    if value is None or (dict_field and isinstance(value, dict)):
        return value
    if action.nargs == "+":
        return [_convert_one(action, v, key, where) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list | dict):
        raise ConfigError(key, f"{where}: {key}: expected one value, got {value!r}")
    try:
        return _convert_one(action, value, key, where)
    except (ArgumentTypeError, TypeError) as err:
        raise ConfigError(key, f"{where}: {key}: invalid value {value!r}: {err}") from err


def _convert_one(action: Any, value: Any, key: str, where: str) -> Any:
    kind = action.type
    if isinstance(value, bool) and kind is not None and getattr(kind, "__name__", "") == "string_to_bool":
        out: Any = value
    elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        out = float(value)
    elif kind is int and isinstance(value, bool):
        raise ConfigError(key, f"{where}: {key}: expected an integer, got {value!r}")
    elif kind is None:
        out = value
    else:
        try:
            out = kind(value if isinstance(value, str) else str(value))
        except ValueError as err:
            name = getattr(kind, "__name__", "value")
            raise ConfigError(key, f"{where}: {key}: invalid {name} value {value!r}") from err
    if action.choices is not None and out not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(key, f"{where}: {key}: {value!r} is not one of {choices}")
    return out


def _set_nested(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def _resolve(key: str, actions: dict[str, Any]) -> Any:
    action = actions.get(f"--{key}")
    if action is None or action.dest == "help" or getattr(action, "const", None) is False:
        return None
    return action


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
    check: bool = True,
) -> DVSFTConfig:
    """A :class:`DVSFTConfig` from a YAML file, ``values`` (a dict like the YAML's) and command-line overrides.

    ``path`` may name a packaged preset as ``configs/tiny_cpu.yaml`` from any directory (:func:`config_file`).

    ``overrides`` is a list of ``--key value`` strings (a dict is taken as more ``values``). Later
    sources win: YAML file, then ``values``, then ``overrides``. ``check``: also validate that a model
    and data are set and that paths exist (ranges are always checked).
    """
    import yaml

    p = parser()
    actions = p._option_string_actions
    dict_fields = _dict_fields()
    sources: dict[str, str] = {}
    defaults: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        path = config_file(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(None, f"{path}: invalid YAML: {' '.join(str(err).split())}") from err
        if not isinstance(tree, dict):
            raise ConfigError(None, f"{path}: the top level must be a mapping of config keys")
        layers.append((str(path), tree))
    if values:
        layers.append(("config", values))
    if isinstance(overrides, dict):
        layers.append(("config", overrides))
        overrides = None
    for where, tree in layers:
        for key, value in _flatten(tree, dict_fields).items():
            _apply(key, value, where, p, actions, dict_fields, defaults, sources)
    cli = list(overrides or [])
    cli = _take_dict_overrides(cli, actions, dict_fields, defaults, sources)
    for arg in cli:
        if arg.startswith("--") and len(arg) > 2:
            action = _resolve(arg[2:].split("=", 1)[0], actions)
            if action is not None:
                sources[action.dest] = COMMAND_LINE
    p.set_defaults(**defaults)
    namespace, rest = p.parse_known_args(cli)
    if rest:
        bad = next((a for a in rest if a.startswith("--")), rest[0])
        if not bad.startswith("--"):
            raise ConfigError(None, f"{COMMAND_LINE}: expected --key value, got {bad!r}")
        raise _unknown(bad[2:].split("=", 1)[0], COMMAND_LINE, sorted(flat_keys()))
    try:
        cfg = DVSFTConfig(**vars(namespace))
        if check:
            validate(cfg)
    except ConfigError as err:
        where = sources.get(err.key or "")
        raise ConfigError(err.key, f"{where}: {err}" if where and not str(err).startswith(where) else str(err)) from err
    except ValueError as err:  # TrainingArguments' own checks (e.g. bf16 without a GPU that supports it)
        where = " + ".join(dict.fromkeys(sources.values())) or "config"
        raise ConfigError(None, f"{where}: {' '.join(str(err).split())}") from err
    cfg.config_sources = sources
    return cfg


def _apply(key, value, where, p, actions, dict_fields, defaults, sources) -> None:
    action = _resolve(key, actions)
    if action is not None:
        defaults[action.dest] = _convert(action, value, key, where, action.dest in dict_fields)
        sources[action.dest] = where
        return
    parts = key.replace("-", "_").split(".")
    if len(parts) > 1 and parts[0] in dict_fields:
        current = defaults.get(parts[0])
        current = dict(current) if isinstance(current, dict) else {}
        _set_nested(current, parts[1:], value)
        defaults[parts[0]] = current
        sources[parts[0]] = where
        return
    raise _unknown(key, where, sorted(flat_keys()))


def _take_dict_overrides(cli, actions, dict_fields, defaults, sources) -> list[str]:
    """Pull ``--objectives.basic.lambda2 0.5`` (keys inside a dict-valued field) out of the command line."""
    import yaml

    rest: list[str] = []
    i = 0
    while i < len(cli):
        arg = cli[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        head = key.replace("-", "_").split(".")[0]
        if "." in key and head in dict_fields and _resolve(key, actions) is None:
            if "=" in arg:
                raw, i = arg.split("=", 1)[1], i + 1
            elif i + 1 < len(cli) and not cli[i + 1].startswith("--"):
                raw, i = cli[i + 1], i + 2
            else:
                raise ConfigError(head, f"{COMMAND_LINE}: {key} needs a value")
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            current = defaults.get(head)
            current = dict(current) if isinstance(current, dict) else {}
            _set_nested(current, key.replace("-", "_").split(".")[1:], value)
            defaults[head] = current
            sources[head] = COMMAND_LINE
            continue
        rest.append(arg)
        i += 1
    return rest


def config_from_dict(values: dict[str, Any], check: bool = True) -> DVSFTConfig:
    """A :class:`DVSFTConfig` from a dict shaped like the YAML file (sections or flat keys)."""
    return load_config(values=values, check=check)


def to_dict(cfg: DVSFTConfig) -> dict[str, Any]:
    out = cfg.to_dict()
    return {k: v for k, v in out.items() if not k.startswith("_")}
