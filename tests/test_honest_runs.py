"""Honest resumes and errors a user can act on: eval resumes keyed by content, one training per output_dir,
and one-line errors (exit code 2) for a full disk, a model folder without tokenizer or with a truncated
weights file, a missing report_to package, a negative --limit and bad benchmark options."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from benchmark_files import word_records
from helpers import make_records, overrides
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dvsft.cli import app
from dvsft.core.records import read_jsonl
from dvsft.training.config import load_config
from dvsft.training.lock import LOCK_FILE, output_dir_lock

runner = CliRunner(env={"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"})
SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """The real entry point (``dvsft ...``): exit code and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        app(args=args, prog_name="dvsft")
    return exit_info.value.code, capsys.readouterr().err


def one_error_line(code: int, err: str) -> str:
    """The single ``error:`` line of a user error (exit code 2, no traceback)."""
    assert code == 2 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ")
    return line


def evaluate(model: Path, data: Path, out: Path, *extra: str) -> dict:
    args = ["eval", "--model", str(model), "--bench", "docvqa", "--data", str(data), "--out", str(out)]
    result = runner.invoke(app, [*args, "--max-new-tokens", "2", *extra])
    assert result.exit_code == 0, result.output
    return {"output": " ".join(result.output.split())} | json.loads((out / "docvqa" / "scores.json").read_text())


def model_copy(tiny_dir: Path, folder: Path) -> Path:
    shutil.copytree(tiny_dir, folder)
    return folder


# ----------------------------------------------------------------------------- eval resume by content


def test_eval_resume_regenerates_after_the_model_weights_change(tiny_dir, tmp_path):
    model = model_copy(tiny_dir, tmp_path / "model")
    data = word_records(tmp_path / "data" / "words.jsonl")
    out = tmp_path / "out"
    assert evaluate(model, data, out)["generated_now"] == 3
    assert evaluate(model, data, out)["generated_now"] == 0  # same weights, same data: resumed
    weights = load_file(model / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("lm_head.weight") or "embed_tokens" in k)
    weights[name] = weights[name] * 2  # retrained into the same folder
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    again = evaluate(model, data, out)
    assert again["generated_now"] == 3 and again["n"] == 3
    assert again["regenerated"].startswith("model weights changed (sha256 ")
    assert "docvqa: model weights changed" in again["output"] and "all generated now" in again["output"]


def test_eval_resume_regenerates_after_the_data_file_changes(tiny_dir, tmp_path):
    data = word_records(tmp_path / "data" / "words.jsonl")
    out = tmp_path / "out"
    assert evaluate(tiny_dir, data, out)["generated_now"] == 3
    rows = list(read_jsonl(data))
    rows[0]["messages"][0]["content"] = "<image>Which word is first?"  # same ids, another question
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = evaluate(tiny_dir, data, out)
    assert again["generated_now"] == 3 and again["regenerated"].startswith("data changed (sha256 ")
    predictions = {r["id"]: r for r in read_jsonl(out / "docvqa" / "predictions.jsonl")}
    assert "Which word is first?" in predictions["rec-0"]["prompt"]


# ----------------------------------------------------------------------------- one training per output_dir


@pytest.mark.slow
def test_second_training_into_one_output_dir_is_refused_naming_the_first(tiny_dir, train_records, tmp_path, capsys):
    out = tmp_path / "run"
    first_args = overrides(tiny_dir, train_records, out, max_steps=100_000, save_final=False, disable_tqdm=True)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    first = subprocess.Popen(
        [sys.executable, "-m", "dvsft.cli", "train", *first_args], env=env, stderr=subprocess.DEVNULL
    )
    try:
        lock = out / LOCK_FILE
        deadline = time.time() + 120
        while not (lock.is_file() and lock.stat().st_size) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        code, err = run_cli(["train", *overrides(tiny_dir, train_records, out, max_steps=1)], capsys)
        line = one_error_line(code, err)
        assert f"is in use by another dvsft train (pid {first.pid} on host {socket.gethostname()}" in line
        assert first.poll() is None and json.loads(lock.read_text())["pid"] == first.pid  # the first goes on
    finally:
        first.kill()
        first.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released_at_exit(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    cfg = load_config(None, ["--output_dir", str(out)], check=False)
    with output_dir_lock(cfg) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of {out} left by pid {gone.pid} on host" in caplog.text
    assert not (out / LOCK_FILE).exists()


def test_a_new_run_into_a_finished_runs_output_dir_is_refused(tiny_dir, train_records, tmp_path, capsys):
    out = tmp_path / "run"
    model_copy(tiny_dir, out / "final")  # what a finished `dvsft train` leaves
    code, err = run_cli(["train", *overrides(tiny_dir, train_records, out)], capsys)
    line = one_error_line(code, err)
    assert f"output_dir {out} holds a finished run ({out / 'final'}); --overwrite_output_dir true" in line
    assert not (out / "log.jsonl").exists()


# ----------------------------------------------------------------------------- one-line errors


def test_a_model_folder_without_tokenizer_is_named_with_the_missing_files(tiny_dir, tmp_path, capsys):
    model = model_copy(tiny_dir, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    data = word_records(tmp_path / "data" / "words.jsonl")
    args = ["eval", "--model", str(model), "--bench", "docvqa", "--data", str(data), "--out", str(tmp_path / "o")]
    line = one_error_line(*run_cli(args, capsys))
    assert f"{model} has no tokenizer: none of tokenizer.json, tokenizer.model, vocab.json" in line


def test_a_truncated_safetensors_file_is_named(tiny_dir, tmp_path, capsys):
    model = model_copy(tiny_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # an interrupted copy
    data = word_records(tmp_path / "data" / "words.jsonl")
    args = ["eval", "--model", str(model), "--bench", "docvqa", "--data", str(data), "--out", str(tmp_path / "o")]
    line = one_error_line(*run_cli(args, capsys))
    assert f"{weights}: truncated or not a safetensors file" in line


def test_report_to_wandb_without_wandb_names_the_package(tiny_dir, train_records, tmp_path, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    args = overrides(tiny_dir, train_records, tmp_path / "run", report_to="wandb")
    line = one_error_line(*run_cli(["train", *args], capsys))
    assert line.startswith("error: command line: report_to wandb needs the wandb package: pip install wandb")


def test_eval_refuses_a_negative_limit(tiny_dir, tmp_path, capsys):
    data = word_records(tmp_path / "data" / "words.jsonl")
    args = ["eval", "--model", str(tiny_dir), "--bench", "docvqa", "--data", str(data), "--out", str(tmp_path / "o")]
    line = one_error_line(*run_cli([*args, "--limit", "-3"], capsys))
    assert "--limit -3: must be a positive number of items" in line
    assert not (tmp_path / "o" / "docvqa" / "predictions.jsonl").exists()


def test_bench_train_with_an_unknown_variant_is_a_user_error(capsys):
    line = one_error_line(*run_cli(["bench", "train", "--variants", "sft,nope"], capsys))
    assert "unknown variant(s) nope" in line


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_file(tiny_dir, tmp_path):
    """The file size limit (RLIMIT_FSIZE, as a full disk does: a write fails part way) lets the model of
    checkpoint-1 be written but not its optimizer state: torch.save fails in its C++ writer."""
    data = make_records(tmp_path / "data", n=2)
    out = tmp_path / "run"
    args = overrides(tiny_dir, data, out, max_steps=1, save_steps=1, disable_tqdm=True)
    limit = int((tiny_dir / "model.safetensors").stat().st_size * 1.15)

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "dvsft.cli", "train", *args],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    written = out / "checkpoint-1" / "optimizer.pt"
    assert last.startswith(f"error: [Errno 27] {written}: saving failed: file too large")
    assert f"the file size limit (ulimit -f) is {limit} bytes" in last
