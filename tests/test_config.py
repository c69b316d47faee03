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
    path = _yaml_with(good, f"{key}: {value}")
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
    path = _yaml_with(good, "max_steps: ten")
    with pytest.raises(ValueError, match=rf"^{path}: max_steps: invalid int value 'ten'"):
        load_config(path)
    path.write_text(path.read_text().replace("max_steps: ten", "lora: {r: [1, 2]}"))
    with pytest.raises(ValueError, match=rf"^{path}: lora.r: expected one value"):
        load_config(path)
    path.write_text(path.read_text().replace("lora: {r: [1, 2]}", "train: {llm: most}"))
    with pytest.raises(ValueError, match=rf"^{path}: train.llm: 'most' is not one of auto, all, first_layer, none"):
        load_config(path)


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
