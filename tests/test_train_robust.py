"""dvsft train with bad records (validated before the first step) and torn checkpoints (atomic save, fallback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import losses, make_records, overrides

from dvsft.core.records import read_jsonl
from dvsft.data.skips import REASONS_FILE, StrictError
from dvsft.training.checkpoints import check_checkpoint, latest_intact
from dvsft.training.config import load_config
from dvsft.training.train import train

SRC = Path(__file__).resolve().parents[1] / "src"


def with_bad_records(folder: Path) -> Path:
    """Four good records plus one with a corrupt image and one with a string coordinate."""
    path = make_records(folder, n=4)
    rows = list(read_jsonl(path))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    corrupt = dict(rows[0], id="corrupt", image="corrupt.png")
    words = [dict(w) for w in rows[1]["words"]]
    words[2]["box"] = [words[2]["box"][0], "12", *words[2]["box"][2:]]
    stringy = dict(rows[1], id="stringy", words=words)
    rows[2:2] = [corrupt, stringy]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_train_skips_bad_records_and_writes_their_reasons(tiny_dir, tmp_path):
    data = with_bad_records(tmp_path / "data")
    out = tmp_path / "run"
    result = train(load_config(None, overrides(tiny_dir, data, out, max_steps=2, save_final=False)))
    assert len(losses(result.log)) == 2
    reasons = {r["id"]: r for r in read_jsonl(out / REASONS_FILE)}
    assert set(reasons) == {"corrupt", "stringy"}
    assert reasons["corrupt"]["line"] == 3 and "undecodable image" in reasons["corrupt"]["reason"]
    assert reasons["stringy"]["line"] == 4 and reasons["stringy"]["reason"] == "words[2] box y0 is '12', not a number"
    assert all(r["file"] == str(data) for r in reasons.values())


def test_strict_turns_a_skip_into_a_clean_failure(tiny_dir, tmp_path):
    data = with_bad_records(tmp_path / "data")
    with pytest.raises(StrictError, match=r"--strict: 2 of 6 records are bad.*record corrupt: image"):
        train(load_config(None, [*overrides(tiny_dir, data, tmp_path / "run"), "--strict"]))


def test_train_refuses_only_when_nothing_is_left(tiny_dir, tmp_path):
    data = tmp_path / "data" / "bad.jsonl"
    data.parent.mkdir()
    data.write_text('{"id": "a", "image": "nope.png", "messages": []}\n{"id": "b"\n')
    with pytest.raises(ValueError, match=r"no trainable samples .*all 2 records were skipped"):
        train(load_config(None, overrides(tiny_dir, data, tmp_path / "run")))


# ----------------------------------------------------------------------------- checkpoints

RUN = dict(max_steps=6, save_steps=2, save_final=False, save_total_limit=3)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    data = make_records(tmp_path_factory.mktemp("ckdata"), n=4)
    full = train(load_config(None, overrides(tiny_dir, data, tmp_path_factory.mktemp("full"), **RUN)))
    return data, losses(full.log)


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_checkpoint(tiny_dir, uninterrupted, tmp_path, caplog):
    data, full = uninterrupted
    args = overrides(tiny_dir, data, tmp_path, **RUN)
    train(load_config(None, args))
    weights = tmp_path / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    assert "truncated" in check_checkpoint(tmp_path / "checkpoint-6")
    assert "no trainer_state.json" in check_checkpoint(tmp_path / "checkpoint-4")
    assert latest_intact(tmp_path) == tmp_path / "checkpoint-2"
    resumed = train(load_config(None, [*args, "--resume"]))
    assert "resuming from" in caplog.text and "checkpoint-6 is incomplete" in caplog.text
    assert losses(resumed.log) == pytest.approx(full, abs=1e-5)
    assert check_checkpoint(tmp_path / "checkpoint-6") is None  # written again, whole


@pytest.mark.slow
def test_kill_during_checkpoint_save_then_resume(tiny_dir, uninterrupted, tmp_path):
    data, full = uninterrupted
    args = overrides(tiny_dir, data, tmp_path, **RUN)
    script = textwrap.dedent(
        """
        import os, signal, sys
        from transformers import Trainer
        from dvsft.training.config import load_config
        from dvsft.training.train import train

        save_rng = Trainer._save_rng_state

        def killed_midway(self, output_dir):  # model and optimizer are written, the rest is not
            if self.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return save_rng(self, output_dir)

        Trainer._save_rng_state = killed_midway
        train(load_config(None, sys.argv[1:]))
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "no trainer_state.json" in check_checkpoint(tmp_path / "checkpoint-4")  # the torn save
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
    resumed = train(load_config(None, [*args, "--resume"]))
    assert losses(resumed.log) == pytest.approx(full, abs=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert all(check_checkpoint(tmp_path / f"checkpoint-{n}") is None for n in (2, 4, 6))


@pytest.mark.slow
def test_load_best_model_at_end_with_rotation(tiny_dir, tmp_path):
    """The HF options together: best_model_checkpoint is a real checkpoint-N that rotation keeps, and final/
    holds its weights."""
    from safetensors.torch import load_file

    data = make_records(tmp_path / "data", n=4)
    out = tmp_path / "run"
    args = overrides(
        tiny_dir, data, out, max_steps=6, save_steps=2, eval_steps=2, save_total_limit=1,
        eval_data=str(data), eval_strategy="steps", save_strategy="steps",
        load_best_model_at_end=True, metric_for_best_model="eval_loss",
    )  # fmt: skip
    result = train(load_config(None, args))
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.parent == out and best.name.startswith("checkpoint-") and check_checkpoint(best) is None
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert best.name in kept and len(kept) <= 2  # save_total_limit=1 keeps the best beside the newest
    final = load_file(str(result.final_dir / "model.safetensors"))
    best_weights = load_file(str(best / "model.safetensors"))
    assert final.keys() == best_weights.keys()
    assert all(final[k].equal(best_weights[k]) for k in final)
