"""DVSFTConfig: checked when loaded, errors name the key and where its value came from (YAML file or command line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_records, overrides

from dvsft.training.config import DVSFTConfig, load_config


@pytest.fixture()
def good(tmp_path) -> Path:
    """A YAML file with a valid model and data; each test breaks one key."""
    data = tmp_path / "records.jsonl"
    data.write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(f"model: tiny\ndata: {data}\noutput_dir: {tmp_path / 'out'}\n")
    return path


def _yaml_with(path: Path, line: str) -> Path:
    path.write_text(path.read_text() + line + "\n")
    return path


RANGES = [
    ("vision_lambda", "-1", r"vision_lambda must be a number >= 0, got -1"),
    ("vision_lambda", "nan", r"vision_lambda must be a number >= 0"),
    ("vision_eps", "1.5", r"vision_eps must be in \[0, 1\), got 1.5"),
    ("vision_eps", "-0.5", r"vision_eps must be in \[0, 1\), got -0.5"),
    ("vision_eps", "1", r"vision_eps must be in \[0, 1\)"),
    ("per_device_train_batch_size", "0", r"per_device_train_batch_size must be a positive integer, got 0"),
    ("gradient_accumulation_steps", "0", r"gradient_accumulation_steps must be a positive integer"),
    ("global_batch_size", "0", r"global_batch_size must be positive"),
    ("max_steps", "0", r"max_steps must be positive \(or -1"),
    ("logging_steps", "0", r"logging_steps must be positive"),
    ("save_steps", "-5", r"save_steps must be positive"),
    ("eval_steps", "0", r"eval_steps must be positive"),
    ("max_length", "0", r"max_length must be a positive integer"),
    ("min_pixels", "0", r"min_pixels must be a positive integer"),
    ("max_pixels", "100", r"max_pixels \(100\) must be >= min_pixels"),
    ("loss_chunk_size", "0", r"loss_chunk_size must be a positive integer"),
    ("learning_rate", "-1e-5", r"learning_rate must be >= 0"),
    ("warmup_steps", "-1", r"warmup_steps must be >= 0"),
    ("lora_r", "0", r"lora_r must be a positive integer"),
    ("lora_dropout", "1.0", r"lora_dropout must be in \[0, 1\)"),
    ("max_samples", "0", r"max_samples must be positive"),
]


@pytest.mark.parametrize(("key", "value", "message"), RANGES)
def test_ranges_from_the_command_line(good, key, value, message):
    with pytest.raises(ValueError, match=rf"^command line: {message}"):
        load_config(good, [f"--{key}={value}"])


@pytest.mark.parametrize(("key", "value", "message"), RANGES[:4])
def test_ranges_from_the_yaml_file_name_the_file(good, key, value, message):
    path = _yaml_with(good, f"{key}: {'.nan' if value == 'nan' else value}")  # YAML's NaN
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        load_config(path)


def test_global_batch_size_sets_accumulation_and_must_divide(good):
    cfg = load_config(good, ["--global_batch_size", "8", "--per_device_train_batch_size", "2"])
    assert cfg.gradient_accumulation_steps == 4
    with pytest.raises(ValueError, match=r"^command line: global_batch_size 3 is not a multiple of .* 2 x 1 proc"):
        load_config(good, ["--global_batch_size", "3", "--per_device_train_batch_size", "2"])


def test_a_command_line_value_overrides_a_bad_yaml_value(good):
    path = _yaml_with(good, "vision_lambda: -1")
    assert load_config(path, ["--vision_lambda", "0.5"]).vision_lambda == 0.5


def test_ranges_hold_for_a_config_built_in_python():
    with pytest.raises(ValueError, match=r"vision_eps must be in \[0, 1\), got 1.5"):
        DVSFTConfig(output_dir="x", vision_eps=1.5)


def test_type_errors_name_their_source(good):
    with pytest.raises(ValueError, match=r"^command line: argument --max_steps.*invalid int value: 'ten'"):
        load_config(good, ["--max_steps", "ten"])
    with pytest.raises(ValueError, match=r"^command line: argument --lora_r.*invalid int value: 'many'"):
        load_config(good, ["--lora.r", "many"])  # the section spelling is the flat key's option
    path = _yaml_with(good, "max_steps: ten")
    with pytest.raises(ValueError, match=rf"^{path}: max_steps: expected int, got 'ten'"):
        load_config(path)
    path.write_text(path.read_text().replace("max_steps: ten", "lora: {r: [1, 2]}"))
    with pytest.raises(ValueError, match=rf"^{path}: lora_r: expected int, got \[1, 2\]"):
        load_config(path)
    path.write_text(path.read_text().replace("lora: {r: [1, 2]}", "train: {llm: most}"))
    with pytest.raises(
        ValueError, match=rf"^{path}: train_llm: expected one of auto, all, first_layer, none, got 'most'"
    ):
        load_config(path)


def test_yaml_values_are_typed_by_yaml_and_checked_once(good):
    """A YAML value is the type YAML gives it: a quoted number or a 'yes' string is not parsed again."""
    for line, message in (
        ('max_steps: "12"', r"max_steps: expected int, got '12'"),
        ('train: {vision: "yes"}', r"train_vision: expected bool, got 'yes'"),
        ("vision_lambda: true", r"vision_lambda: expected float, got True"),
        ("data: {a: 1}", r"unknown config key 'data_a'"),
    ):
        path = good.with_name("typed.yaml")
        path.write_text(good.read_text() + line + "\n")
        with pytest.raises(ValueError, match=rf"^{path}: {message}"):
            load_config(path)
    path.write_text(good.read_text() + "learning_rate: 5e-6\nnum_train_epochs: 2\ndata: one.jsonl\n")
    cfg = load_config(path, check=False)  # YAML 1.2 numbers; an int widens to float; one value is a list of one
    assert cfg.learning_rate == 5e-6 and cfg.num_train_epochs == 2.0 and cfg.data == ["one.jsonl"]


def test_one_spelling_per_key_sections_by_one_rule(tmp_path):
    """``S: {k: v}`` in YAML and ``--S.k v`` are the key ``S_k``; the former aliases are unknown keys."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {llm: a, vision_from: b, fresh_projector: true}\ntrain: {vision: true, llm: none}\n"
        "align: {max_height_cells: 2}\nlora: {r: 16, alpha: 8}\n"
    )
    cfg = load_config(path, check=False)
    assert (cfg.model_llm, cfg.model_vision_from, cfg.model_fresh_projector) == ("a", "b", True)
    assert (cfg.train_vision, cfg.train_llm, cfg.align_max_height_cells) == (True, "none", 2.0)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora) == (16, 8, False)
    for args in (["--align.max_height_cells", "3"], ["--align_max_height_cells", "3"], ["--align.max-height-cells=3"]):
        assert load_config(path, args, check=False).align_max_height_cells == 3.0
    assert load_config(path, ["--lora"], check=False).lora is True
    for old in ("model: {path: x}", "lora: {enabled: true}", "tiny: {layers: 2}", "model: {trust_remote_code: true}"):
        path.write_text(old + "\n")
        key = "_".join(part.strip("{ ") for part in old.split(":")[:2])
        with pytest.raises(ValueError, match=rf"^{path}: unknown config key '{key}'"):
            load_config(path, check=False)
    with pytest.raises(ValueError, match=r"^command line: unknown config key 'tiny_layers'"):
        load_config(None, ["--tiny.layers", "3"], check=False)


def test_dict_valued_keys_by_one_mechanism(tmp_path):
    """objectives, qa_per_image and model_options: a YAML mapping, ``--K value`` or ``--K.a.b value`` (YAML)."""
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nobjectives: {basic: {lambda1: 1.0, lambda2: 0.5}}\nmodel: {options: {layers: 3}}\n")
    cfg = load_config(path, ["--objectives.basic.lambda2", "1e-3", "--model_options.heads", "2"], check=False)
    assert cfg.objectives == {"basic": {"lambda1": 1.0, "lambda2": 1e-3}}  # an entry: the rest of the mapping stays
    assert cfg.model_options == {"layers": 3, "heads": 2} and cfg.config_sources["objectives"] == "command line"
    cfg = load_config(
        None, ["--objectives", "{basic: {lambda2: 0.5}}", "--qa_per_image={default: 1, infovqa: 2}"], check=False
    )
    assert cfg.objectives == {"basic": {"lambda2": 0.5}} and cfg.qa_per_image == {"default": 1, "infovqa": 2}
    assert load_config(None, ["--qa_per_image", "null"], check=False).qa_per_image is None
    assert load_config(None, ["--qa_per_image.infovqa", "2"], check=False).qa_per_image == {"infovqa": 2}
    with pytest.raises(ValueError, match=r"^command line: qa_per_image: expected int or dict.*got 'many'"):
        load_config(None, ["--qa_per_image", "many"], check=False)
    with pytest.raises(ValueError, match=r"^command line: --objectives.basic needs a value"):
        load_config(None, ["--objectives.basic", "--lora"], check=False)


def test_model_options_are_checked_by_the_builder(good, capsys):
    from dvsft.cli import app

    cfg = load_config("configs/tiny_cpu.yaml", ["--data", str(good)])
    assert cfg.model_options["layers"] == 2 and not hasattr(cfg, "tiny_layers")
    bad = good.with_name("bad.yaml")
    bad.write_text(good.read_text() + "model_options: {layer: 3}\n")
    with pytest.raises(SystemExit) as info:
        app(args=["train", str(bad)], prog_name="dvsft")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert line.startswith(f"error: {bad}: model_options: unknown field(s) layer; valid: vocab_size, hidden_size, ")
    assert "min_pixels" not in line  # the config's own keys, not options
    for args, message in (
        (["--model_options.layers", "many"], r"model_options.layers: expected int, got 'many'"),
        (["--model_options.family", "gpt"], r"model_options: family must be one of qwen3-vl, "),
    ):
        with pytest.raises(ValueError, match=rf"^command line: {message}"):
            load_config(good, args)
    with pytest.raises(ValueError, match=r"^command line: model_options: only a model built by code .* not /"):
        load_config(good, ["--model", str(good.parent), "--model_options.layers", "3"])


def test_model_options_size_the_built_model(good):
    from dvsft.training.model_setup import load_base

    options = "{vocab_size: 600, hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, seed: 3}"
    model, _ = load_base(load_config(good, ["--model_options", options]))
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        32,
        1,
        2,
        1,
    )
    assert model.config.dvsft_tiny["seed"] == 3


def test_paths_that_must_exist(good, tmp_path):
    with pytest.raises(ValueError, match=r"^command line: data .*nope.jsonl does not exist"):
        load_config(good, ["--data", str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match=rf"^{good}: model .*missing-model is not a model dir"):
        load_config(_yaml_with(good, f"model: {tmp_path / 'missing-model'}"))
    good.write_text(good.read_text().replace(f"model: {tmp_path / 'missing-model'}\n", ""))
    with pytest.raises(ValueError, match=r"^command line: eval_data .*gone.jsonl does not exist"):
        load_config(good, ["--eval_data", str(tmp_path / "gone.jsonl")])
    with pytest.raises(ValueError, match=r"^command line: deepspeed .*zero9.json does not exist"):
        load_config(good, ["--deepspeed", str(tmp_path / "zero9.json")])
    with pytest.raises(ValueError, match=r"^command line: resume_from_checkpoint .*ckpt is not a checkpoint dir"):
        load_config(good, ["--resume", str(tmp_path / "ckpt")])
    assert load_config(good, ["--resume"]).resume_from_checkpoint == "last"  # checked when training starts


def test_output_dir_must_be_a_folder(good, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"^command line: output_dir .*a_file exists and is not a folder"):
        load_config(good, ["--output_dir", str(tmp_path / "a_file")])
    with pytest.raises(ValueError, match=r"^command line: output_dir .*a_file is a file, not a folder"):
        load_config(good, ["--output_dir", str(tmp_path / "a_file" / "run")])
    assert load_config(good, ["--output_dir", str(tmp_path / "new" / "run")]).output_dir.endswith("new/run")


def test_cli_prints_one_line_naming_the_source(good, capsys):
    from dvsft.cli import app

    with pytest.raises(SystemExit) as info:
        app(args=["train", str(good), "--vision_eps", "1.5"], prog_name="dvsft")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: command line: vision_eps must be in [0, 1), got 1.5")
    with pytest.raises(SystemExit):
        app(args=["train", str(_yaml_with(good, "vision_lambda: -2"))], prog_name="dvsft")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {good}: vision_lambda must be a number >= 0, got -2")


def test_adam_beta2_reaches_the_trainer_from_yaml_and_command_line(tiny_dir, tmp_path):
    from dvsft.training.train import prepare

    data = make_records(tmp_path / "data", n=2)
    path = tmp_path / "c.yaml"
    path.write_text("adam_beta2: 0.97\noptim: adamw_torch\n")
    for extra, want in (([], 0.97), (["--adam_beta2", "0.95"], 0.95)):
        run = prepare(load_config(path, [*overrides(tiny_dir, data, tmp_path / "run"), *extra]))
        assert run.trainer.args.adam_beta2 == want
        optimizer = run.trainer.create_optimizer()
        assert {g["betas"] for g in optimizer.param_groups} == {(0.9, want)}
