"""The training configuration: :class:`DVSFTConfig`, every ``TrainingArguments`` field plus DV-SFT's own.

Every key has one spelling, the field's name; any ``TrainingArguments`` key (``adam_beta2``, ``optim``,
...) works in the YAML file and as ``--key value``. One rule reads sections: ``S: {k: v}`` in YAML and
``--S.k v`` on the command line are the key ``S_k`` (``lora: {r: 16}`` is ``lora_r``, ``model: {llm: X}``
is ``model_llm``), except under a dict-valued key (``objectives``, ``qa_per_image``, ``model_options``, ...),
whose mapping is its value and whose ``--K.a.b v`` sets entry ``a.b``. Values are parsed once: YAML values
as YAML types them, checked against the field's type (:mod:`dvsft.core.typed`); command-line strings by
the field's type (``transformers.HfArgumentParser``), those of dict-valued keys as YAML. Defaults are the
paper's Table 4 (Qwen3-VL-2B, full fine-tune).

Values are checked when the config is loaded (ranges, paths that must exist, an output dir that is a
folder); an error names the key and where its value came from (the YAML file or the command line).
``dvsft train --keys`` lists every key with its help.
"""

import copy
import math
import os
import re
import typing
from argparse import SUPPRESS
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

from dvsft.align.aligner import LABEL_POLICIES, LABEL_VIEWS, AlignConfig
from dvsft.core.typed import fit, type_name
from dvsft.data.collator import MAX_LENGTH
from dvsft.data.encoded_cache import MAX_GB
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


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with a default, a help string and extra ``HfArgumentParser`` settings."""
    metadata: dict[str, Any] = {"help": help, **extra}
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
        aliases=["--resume"],  # the command line's shorthand
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
        AlignConfig.max_height_cells, "drop words taller than this many visual-token cells"
    )
    align_max_subtokens: int = opt(AlignConfig.max_subtokens, "drop words whose tokenization is longer than this")
    align_label_policy: str = opt(
        AlignConfig.label_policy, f"which cells an entry labels: {', '.join(LABEL_POLICIES)} (docs/labeling.md)"
    )
    align_multi_label: bool = opt(AlignConfig.multi_label, "a visual token several entries claim keeps all labels")
    align_views: str = opt(
        AlignConfig.views, f"which views of a tiled image label an entry: {', '.join(LABEL_VIEWS)} (docs/labeling.md)"
    )
    min_pixels: int = opt(TRAIN_MIN_PIXELS, "image processor min pixels")
    max_pixels: int = opt(TRAIN_MAX_PIXELS, "image processor max pixels")
    max_length: int = opt(MAX_LENGTH, "max sequence length (longer samples are truncated by the collator)")
    loss_chunk_size: int = opt(LossSettings.loss_chunk_size, "positions per lm_head chunk in the text / vision losses")
    objectives: dict[str, Any] | None = opt(
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
    qa_per_image: int | dict[str, int | None] | None = opt(
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
    encoded_cache_dir: str = opt(
        "auto",
        "encoded-sample cache: each sample's processor output and alignment, reused by later epochs and runs; "
        "auto = $DVSFT_CACHE_DIR/encoded or ~/.cache/dvsft/encoded, none = off",
    )
    encoded_cache_max_gb: float = opt(MAX_GB, "the encoded-sample cache stops growing at this size (per settings)")
    packing: bool = opt(
        False,
        "pack several samples, each with its image, into sequences of at most max_length tokens (best-fit decreasing); "
        "per_device_train_batch_size then counts packed sequences",
    )
    strict: bool = opt(False, "fail on the first bad record instead of skipping it (reasons: skipped_records.jsonl)")
    save_final: bool = opt(True, "write the trained model + processor to output_dir/final")
    overwrite_output_dir: bool = opt(
        False, "dvsft train: replace a finished run (output_dir/final) instead of refusing to start"
    )

    # ---------------------------------------------------------------- model
    model: str | None = opt(None, "local HF model dir (Qwen3-VL, Qwen2-VL, Qwen2.5-VL) or a builder's name: `tiny`")
    model_options: dict[str, Any] | None = opt(
        None,
        "options of a built model, checked by its builder, e.g. model_options: {family: internvl, layers: 4} for "
        "`model: tiny` (any family of dvsft.testing.tiny.TINY_FAMILIES)",
    )
    model_llm: str | None = opt(None, "graft: dir of a text LLM (Qwen3ForCausalLM); needs model_vision_from")
    model_vision_from: str | None = opt(
        None, "graft: dir of a Qwen3-VL model whose vision tower is copied (ViT, merger, DeepStack mergers)"
    )
    model_fresh_projector: bool = opt(
        False, "graft: re-initialise the merger and DeepStack mergers instead of copying them"
    )
    trust_remote_code: bool = opt(False, "pass trust_remote_code=True to transformers (only if you trust the dir)")
    attn_implementation: str | None = opt(None, "attention kernel: sdpa, eager, flash_attention_2; None = default")
    train_vision: bool = opt(False, "train the vision encoder (ViT blocks); frozen in the paper")
    train_projector: bool = opt(True, "train the projector (the vision tower's merger)")
    train_llm: Literal["auto", "all", "first_layer", "none"] = opt(
        "auto", "LLM layers to train; auto = the method's choice (BASIC: first_layer, else all)"
    )
    lora: bool = opt(False, "LoRA instead of full fine-tuning: only the adapters train (lora_* keys)")
    lora_r: int = opt(64, "LoRA rank (paper, Qwen3-VL-8B)")
    lora_alpha: int = opt(128, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: list[str] | None = opt(None, "module name suffixes; None = the family's LoRA targets")

    def __post_init__(self) -> None:
        import torch

        for name in ("data", "eval_data", "lora_target_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        self.objectives = dict(self.objectives or {})
        self.model_options = dict(self.model_options or {})
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
    for key in ("logging_steps", "save_steps", "align_max_height_cells", "encoded_cache_max_gb"):
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
        cfg.align_label_policy in LABEL_POLICIES,
        "align_label_policy",
        f"must be one of {', '.join(LABEL_POLICIES)}, got {cfg.align_label_policy!r}",
    )
    _need(
        cfg.align_views in LABEL_VIEWS,
        "align_views",
        f"must be one of {', '.join(LABEL_VIEWS)}, got {cfg.align_views!r}",
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
    if cfg.packing and cfg.streaming:
        raise ConfigError(
            "packing", "packing bins the samples by the lengths measured at load, which streaming input does not load"
        )
    check_model_options(cfg)
    if paths:
        check_paths(cfg)


def check_model_options(cfg: DVSFTConfig) -> None:
    """``model_options`` only for a built model (``model: tiny``), checked by its builder's ``check_options``."""
    builder = model_builder(cfg.model)
    if builder is None and cfg.model_options:
        message = f"only a model built by code (model: tiny, ...) takes options, not {cfg.model or 'the graft'}"
        raise ConfigError("model_options", f"model_options: {message}")
    try:
        getattr(builder, "check_options", lambda options: None)(cfg.model_options)
    except ValueError as err:
        raise ConfigError("model_options", str(err)) from err


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


@cache
def field_types() -> dict[str, Any]:
    """``key -> type`` of every config key (the annotations: HfArgumentParser rewrites ``Field.type``)."""
    return typing.get_type_hints(DVSFTConfig)


@cache
def dict_keys() -> frozenset[str]:
    """The keys whose value may be a mapping: ``objectives``, ``qa_per_image``, ``model_options``, ``fsdp_config``..."""
    return frozenset(key for key, tp in field_types().items() if fit({}, tp)[0])


class _Parser(HfArgumentParser):
    """The command line's parser: only the keys given are set, dict-valued keys are left to
    :func:`_command_line`, and an error is an exception naming the command line (not a usage dump + exit)."""

    def __init__(self) -> None:
        super().__init__(DVSFTConfig, allow_abbrev=False)
        for action in self._actions:
            action.default = SUPPRESS

    @staticmethod
    def _parse_dataclass_field(parser: Any, field: Any) -> None:
        if field.name not in dict_keys():
            HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message: str):  # argparse calls this on a bad command line
        raise ConfigError(None, f"{COMMAND_LINE}: {message}")


def flat_keys() -> dict[str, tuple[list[str], Any, str]]:
    """``key -> (command-line shorthands, default, help)`` for every config key (field order)."""
    out: dict[str, tuple[list[str], Any, str]] = {}
    for f in fields(DVSFTConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        shorthands = [a.removeprefix("--") for a in f.metadata.get("aliases", [])]
        out[f.name] = (shorthands, default, str(f.metadata.get("help", "")).strip())
    return out


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's numbers: ``5e-6`` is a float (PyYAML's YAML 1.1 reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(None, f"{where}: invalid YAML: {' '.join(str(err).split())}") from err


def _unknown(key: str, where: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, list(field_types()), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(None, f"{where}: unknown config key {key!r}{hint}; `dvsft train --keys` lists them")


def _key(parts: list[str]) -> tuple[str, list[str]]:
    """The key that section parts name (``[lora, r]`` -> ``lora_r``) and the entry path inside a dict-valued key
    (``[objectives, basic, lambda2]`` -> ``objectives``, ``[basic, lambda2]``)."""
    name = parts[0].replace("-", "_")
    for i, part in enumerate(parts[1:], 1):
        if name in dict_keys():
            return name, parts[i:]
        name = f"{name}_{part.replace('-', '_')}"
    return name, []


def _sections(tree: dict[str, Any], parts: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of a YAML mapping, its sections read by :func:`_key` (``lora: {r: 16}`` -> ``lora_r``)."""
    for k, v in tree.items():
        name, _ = _key([*parts, str(k)])
        if isinstance(v, dict) and name not in dict_keys():
            yield from _sections(v, (*parts, str(k)))
        else:
            yield name, v


def _set(given: dict[str, Any], sources: dict[str, str], key: str, entry: list[str], value: Any, where: str) -> None:
    """``given[key] = value`` checked against the key's type, or ``value`` at the ``entry`` path of a dict key."""
    if key not in field_types():
        raise _unknown(key, where)
    if entry:
        tree = given[key] = copy.deepcopy(given[key]) if isinstance(given.get(key), dict) else {}
        for part in entry[:-1]:
            if not isinstance(tree.get(part), dict):
                tree[part] = {}
            tree = tree[part]
        tree[entry[-1]] = value
    else:
        ok, given[key] = fit(value, field_types()[key])
        if not ok:
            raise ConfigError(key, f"{where}: {key}: expected {type_name(field_types()[key])}, got {value!r}")
    sources[key] = where


def _command_line(args: list[str], given: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """Read the dict-valued keys of ``args`` (``--K value``, ``--K.a.b value``, values as YAML) into ``given``;
    the other arguments are returned for argparse, keys spelled by the rule (``--lora.r`` -> ``--lora_r``)."""
    rest: list[str] = []
    words = iter(args)
    for arg in words:
        if not arg.startswith("--"):
            rest.append(arg)
            continue
        key, eq, text = arg[2:].partition("=")
        name, entry = _key(key.split("."))
        if name not in dict_keys():
            rest.append(f"--{name}{eq}{text}")
            continue
        if not eq:
            text = next(words, "--")
            if text.startswith("--"):
                raise ConfigError(name, f"{COMMAND_LINE}: --{key} needs a value")
        _set(given, sources, name, entry, _yaml(text, COMMAND_LINE), COMMAND_LINE)
    return rest


def _read(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(the file's name for messages, its mapping) of a YAML config file or packaged preset."""
    path = config_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    tree = _yaml(path.read_text(), str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(None, f"{path}: the top level must be a mapping of config keys")
    return str(path), tree


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
    layers = [_read(path)] if path is not None else []
    layers += [("config", tree) for tree in (values, overrides) if isinstance(tree, dict)]
    given: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for where, tree in layers:
        for key, value in _sections(tree):
            _set(given, sources, key, [], value, where)
    args = _command_line(list(overrides or []) if isinstance(overrides, list) else [], given, sources)
    namespace, rest = _Parser().parse_known_args(args)
    if rest:
        bad = next((a for a in rest if a.startswith("--")), rest[0])
        if not bad.startswith("--"):
            raise ConfigError(None, f"{COMMAND_LINE}: expected --key value, got {bad!r}")
        raise _unknown(bad[2:].split("=", 1)[0], COMMAND_LINE)
    given.update(vars(namespace))
    sources.update(dict.fromkeys(vars(namespace), COMMAND_LINE))
    try:
        cfg = DVSFTConfig(**given)
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


def config_from_dict(values: dict[str, Any], check: bool = True) -> DVSFTConfig:
    """A :class:`DVSFTConfig` from a dict shaped like the YAML file (sections or flat keys)."""
    return load_config(values=values, check=check)


def to_dict(cfg: DVSFTConfig) -> dict[str, Any]:
    out = cfg.to_dict()
    return {k: v for k, v in out.items() if not k.startswith("_")}
