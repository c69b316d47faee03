"""The `dvsft train` configuration: one dataclass, YAML files, command-line overrides.

Defaults are the paper's Table 4 (Qwen3-VL-2B, full fine-tune). Every key can be set in the YAML
file or overridden on the command line as ``--key value`` (dotted keys for nested sections,
``--lora.r 16``); values are parsed as YAML scalars (``--bf16 false``, ``--align.max_subtokens 2``).
``help_text(key)`` gives each key's meaning; ``dvsft train --keys`` prints them all.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from dvsft.geometry import TRAIN_MAX_PIXELS, TRAIN_MIN_PIXELS
from dvsft.training.tiny import TinyConfig


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help string (the config reference)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    path: str | None = opt(None, "local HF model dir (Qwen3-VL, Qwen2-VL, Qwen2.5-VL) or `tiny`")
    llm: str | None = opt(None, "graft: dir of a text LLM (Qwen3ForCausalLM); needs `vision_from`")
    vision_from: str | None = opt(
        None, "graft: dir of a Qwen3-VL model whose vision tower is copied (ViT, merger, DeepStack mergers)"
    )
    fresh_projector: bool = opt(False, "graft: re-initialise the merger and DeepStack mergers instead of copying them")
    trust_remote_code: bool = opt(False, "pass trust_remote_code=True to transformers (only if you trust the dir)")
    attn_implementation: str | None = opt(None, "attention kernel: sdpa, eager, flash_attention_2; None = default")


@dataclass
class TrainParts:
    vision: bool = opt(False, "train the vision encoder (ViT blocks); frozen in the paper")
    projector: bool = opt(True, "train the projector (the vision tower's merger)")
    llm: str | bool = opt(
        "auto", "LLM layers to train: all, first_layer, none; auto = the method's choice (BASIC: first_layer)"
    )


@dataclass
class LoraSection:
    enabled: bool = opt(False, "LoRA instead of full fine-tuning: only the adapters train")
    r: int = opt(64, "LoRA rank (paper, Qwen3-VL-8B)")
    alpha: int = opt(128, "LoRA alpha")
    dropout: float = opt(0.0, "LoRA dropout")
    target_modules: list[str] | None = opt(None, "module name suffixes; None = the family's LoRA targets")


@dataclass
class AlignSection:
    max_height_cells: float = opt(3.0, "drop words taller than this many visual-token cells")
    max_subtokens: int = opt(3, "drop words whose tokenization is longer than this")


@dataclass
class TrainConfig:
    model: ModelConfig = opt(ModelConfig(), "the model to train (see model.*)")
    data: str | list[str] | None = opt(None, "word records with messages (JSONL, Parquet, shard or datasets folders)")
    output_dir: str = opt("runs/dvsft", "checkpoints, log.jsonl, TensorBoard logs and final/")
    method: str = opt("dvsft", "objectives joined by '+': sft, dvsft, basic, and registered ones (dvsft+asvr)")
    vision_lambda: float = opt(0.1, "weight of the vision loss: L = L_text + lambda * L_vision (see 'Defaults sweep')")
    vision_eps: float = opt(0.1, "vision smoothing eps: mass spread over the image's label set")
    label_leading_space: bool = opt(True, "tokenize vision labels as ' word' (mid-sentence form)")
    align: AlignSection = opt(AlignSection(), "label filters (paper section 4.1)")
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
    min_pixels: int = opt(TRAIN_MIN_PIXELS, "image processor min pixels")
    max_pixels: int = opt(TRAIN_MAX_PIXELS, "image processor max pixels")
    max_length: int = opt(8192, "max sequence length (longer samples are truncated by the collator)")
    learning_rate: float = opt(5e-6, "peak learning rate")
    warmup_ratio: float = opt(0.03, "linear warmup as a fraction of all steps")
    lr_scheduler: str = opt("cosine", "HF scheduler name: cosine, linear, constant_with_warmup, ...")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    global_batch_size: int = opt(64, "samples per optimizer step = per_device_batch_size x world size x grad accum")
    per_device_batch_size: int = opt(1, "samples per device per forward pass")
    epochs: float = opt(1.0, "training epochs")
    max_steps: int = opt(-1, "stop after this many optimizer steps (overrides epochs when > 0)")
    seed: int = opt(0, "random seed (model init, data order, dropout)")
    bf16: str | bool = opt("auto", "bfloat16 weights + autocast: true, false, auto (on when the GPU supports it)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (saves memory)")
    train: TrainParts = opt(TrainParts(), "which parts train (full fine-tuning)")
    lora: LoraSection = opt(LoraSection(), "LoRA settings")
    tiny: TinyConfig = opt(TinyConfig(), "sizes of `model.path: tiny`")
    objectives: dict[str, dict[str, Any]] = opt({}, "per-objective options, e.g. objectives.basic.lambda2")
    loss_chunk_size: int = opt(1024, "positions per lm_head chunk in the text / vision losses")
    logging_steps: int = opt(1, "log every N optimizer steps")
    progress: bool = opt(True, "the Trainer's progress bar and printed logs (log.jsonl is always written)")
    save_steps: int = opt(500, "checkpoint every N optimizer steps")
    save_total_limit: int | None = opt(2, "keep at most this many checkpoints")
    dataloader_num_workers: int = opt(0, "DataLoader worker processes")
    report_to: str | list[str] = opt(
        "auto", "HF report_to: auto (tensorboard when installed), none, tensorboard, wandb"
    )
    deepspeed: str | None = opt(None, "DeepSpeed JSON config (for torchrun; accelerate configs set it themselves)")
    fsdp: str = opt("", "HF Trainer fsdp option, e.g. 'full_shard auto_wrap' (or use an accelerate FSDP config)")
    fsdp_config: str | None = opt(None, "FSDP JSON config file for the HF Trainer")
    resume: bool | str = opt(False, "true: continue from the last checkpoint in output_dir; or a checkpoint dir")
    save_final: bool = opt(True, "write the trained model + processor to output_dir/final")
    strict: bool = opt(False, "fail on the first bad record instead of skipping it (reasons: skipped_records.jsonl)")


# --------------------------------------------------------------------------- keys and help

TINY_HELP = {
    "vocab_size": "BPE vocabulary size of the tiny tokenizer (trained on pydoc topics)",
    "hidden_size": "LLM hidden size (also the projector's output size)",
    "layers": "LLM decoder layers",
    "heads": "LLM attention heads",
    "kv_heads": "LLM key/value heads",
    "vision_hidden_size": "ViT hidden size",
    "vision_depth": "ViT blocks",
    "vision_heads": "ViT attention heads",
    "min_pixels": "the tiny processor's saved min pixels (the top-level min_pixels applies in training)",
    "max_pixels": "the tiny processor's saved max pixels (the top-level max_pixels applies in training)",
    "seed": "initialisation seed of the tiny model",
    "family": "architecture of the tiny model: qwen3-vl, qwen3.5 (Gated DeltaNet + attention), qwen3-vl-moe",
    "experts": "qwen3-vl-moe: experts per MoE layer (2 active per token)",
    "tokenizer": "corpus (trained on pydoc topics with Qwen's splitting, vocab_size) or qwen (Qwen's real tokenizer)",
}


def _section_type(tp: Any) -> type | None:
    """The dataclass type of a field (``X`` or ``X | None``), else None."""
    if is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if is_dataclass(arg):
            return arg
    return None


def _hints(cls: type) -> dict[str, Any]:
    import sys

    module = sys.modules[cls.__module__]
    return typing.get_type_hints(cls, globalns=vars(module))


def flat_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, tuple[Any, Any, str]]:
    """``dotted key -> (type, default, help)`` for every key of the config."""
    out: dict[str, tuple[Any, Any, str]] = {}
    hints = _hints(cls)
    defaults = cls()
    for f in fields(cls):
        tp = hints[f.name]
        section = _section_type(tp)
        if section is not None:
            out.update(flat_keys(section, prefix + f.name + "."))
        else:
            help_ = f.metadata.get("help", "")
            if not help_ and cls is TinyConfig:
                help_ = TINY_HELP.get(f.name, "tiny model size")
            out[prefix + f.name] = (tp, getattr(defaults, f.name), help_)
    return out


def help_text(key: str) -> str:
    keys = flat_keys()
    if key not in keys:
        raise KeyError(key)
    return keys[key][2]


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly convert) a YAML value for a field of type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "5e-6" as a string
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def _unknown(key: str, valid: list[str]) -> ValueError:
    import difflib

    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown(key, sorted(flat_keys()))
        tp = hints[name]
        section = _section_type(tp)
        if section is ModelConfig and isinstance(value, str | type(None)):
            value = {"path": value}  # `model: DIR` or `model: tiny`
        if section is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{key}: expected a mapping of {', '.join(f.name for f in fields(section))}")
            kwargs[name] = _build(section, value, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "model" and node is tree:
            child = {"path": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``["--lr", "1e-5", "--resume", "--lora.r=8"]`` -> ``[("lr", 1e-5), ("resume", True), ("lora.r", 8)]``."""
    import yaml

    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        else:
            raw = "true"  # a bare flag: --resume
            i += 1
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, values)


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """The YAML file (if any) with command-line style overrides applied; unknown keys are an error."""
    import yaml

    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: the top level must be a mapping of config keys")
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else list((overrides or {}).items())
    valid = flat_keys()
    for key, value in pairs:
        top = key.split(".")[0]
        if key == "model" and not isinstance(value, dict):
            model = tree.get("model")
            tree["model"] = {
                **(model if isinstance(model, dict) else {}),
                "path": value,
                "llm": None,
                "vision_from": None,
            }
            continue
        if key not in valid and not (top == "objectives" and key.count(".") >= 1) and key != "model":
            raise _unknown(key, sorted(valid))
        _set_dotted(tree, key, value)
    try:
        return config_from_dict(tree)
    except ValueError as err:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}{err}") from err


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def validate(cfg: TrainConfig) -> None:
    """Errors that depend on several keys."""
    m = cfg.model
    if m.path and (m.llm or m.vision_from):
        raise ValueError("set either model.path or model.llm + model.vision_from, not both")
    if not m.path and not (m.llm and m.vision_from):
        raise ValueError("no model: set model (a dir or `tiny`) or model.llm + model.vision_from")
    if bool(m.llm) != bool(m.vision_from):
        raise ValueError("the graft variant needs both model.llm and model.vision_from")
    if isinstance(cfg.train.llm, bool):
        cfg.train.llm = "all" if cfg.train.llm else "none"
    if cfg.train.llm not in ("auto", "all", "first_layer", "none"):
        raise ValueError(f"train.llm must be auto, all, first_layer or none; got {cfg.train.llm!r}")
    if isinstance(cfg.bf16, str) and cfg.bf16 != "auto":
        raise ValueError(f"bf16 must be true, false or auto; got {cfg.bf16!r}")
    if cfg.global_batch_size < 1 or cfg.per_device_batch_size < 1:
        raise ValueError("global_batch_size and per_device_batch_size must be positive")
    if not cfg.data:
        raise ValueError("no training data: set data to a word-record JSONL file")
    check_qa_per_image(cfg.qa_per_image, cfg.data if isinstance(cfg.data, list) else [cfg.data])
    if cfg.streaming and not cfg.keep_conversations:
        raise ValueError(
            "streaming makes one sample of each record (keep_conversations: true); for one QA pair per sample, "
            "write one record per pair (dvsft prepare --separate)"
        )


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
