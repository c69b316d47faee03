"""User errors end in one clear line (``--debug`` shows the traceback); eval goes on past bad items with --skip-bad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dvsft.cli import app
from dvsft.core.records import read_jsonl

# A wide terminal: rich would otherwise break a long temporary path in the middle of a word.
runner = CliRunner(env={"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"})


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """The real entry point (``dvsft ...``): exit code and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        app(args=args, prog_name="dvsft")
    return exit_info.value.code, capsys.readouterr().err


def test_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a", "image": "nope.png"}\n')
    args = ["train", "--model", "tiny", "--data", str(data), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: no trainable samples in ") and "all 1 records were skipped" in line
    with pytest.raises(ValueError, match="no trainable samples"):  # --debug: the exception and its traceback
        app(args=["--debug", *args], prog_name="dvsft")


def records(folder: Path) -> Path:
    """Four items: good, corrupt image, unreadable JSON line, good."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), "white").save(folder / "ok.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")

    def rec(rid: str, image: str) -> str:
        messages = [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "x"}]
        return json.dumps({"id": rid, "image": image, "messages": messages})

    path = folder / "words.jsonl"
    path.write_text("\n".join([rec("q1", "ok.png"), rec("q2", "corrupt.png"), '{"id": "q3", ', rec("q4", "ok.png")]))
    return path


def run_eval(model: Path, data: Path, out: Path, *extra: str):
    args = ["eval", "--model", str(model), "--bench", "docvqa", "--data", str(data), "--out", str(out)]
    return runner.invoke(app, [*args, "--max-new-tokens", "2", *extra])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_stops_at_a_bad_item_naming_it_and_keeps_the_rows_before(tiny_dir, tmp_path, batch_size):
    out = tmp_path / "out"
    result = run_eval(tiny_dir, records(tmp_path / "data"), out, "--batch-size", str(batch_size))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "item q2: cannot make its image" in text or "item q2: cannot read image" in text
    assert [r["id"] for r in read_jsonl(out / "docvqa" / "predictions.jsonl")] == ["q1"]


def test_eval_skip_bad_records_errors_and_goes_on(tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = run_eval(tiny_dir, records(tmp_path / "data"), out, "--skip-bad", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_jsonl(out / "docvqa" / "predictions.jsonl")] == ["q1", "q4"]
    errors = {r["id"]: r["reason"] for r in read_jsonl(out / "docvqa" / "errors.jsonl")}
    assert set(errors) == {"q2", "words-3"}
    assert "corrupt.png" in errors["q2"] and "words.jsonl:3: invalid JSON" in errors["words-3"]
    scores = json.loads((out / "docvqa" / "scores.json").read_text())
    assert scores["n"] == 2 and scores["skipped_bad"] == 2


def test_eval_says_plainly_that_the_model_path_does_not_exist(tmp_path):
    result = run_eval(tmp_path / "no-model", records(tmp_path / "data"), tmp_path / "out")
    assert result.exit_code == 2
    assert f"model directory {tmp_path / 'no-model'} does not exist" in " ".join(result.output.split())
    assert "Repo id" not in result.output
