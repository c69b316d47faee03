"""Two CPU processes (torchrun, gloo) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_records, overrides
from safetensors.torch import load_file

from dvsft.training.config import load_config
from dvsft.training.train import train


def _loss_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one(tiny_dir, tmp_path):
    # two samples, global batch 2: every step sees both, whichever process holds which
    data = make_records(tmp_path / "data", n=2, seed=3)
    common = dict(method="dvsft", max_steps=2, global_batch_size=2, per_device_train_batch_size=1, learning_rate=1e-3)
    single = train(load_config(None, overrides(tiny_dir, data, tmp_path / "one", **common)))  # accumulation 2

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dvsft.cli",
        "train",
        *overrides(tiny_dir, data, tmp_path / "two", **common),  # accumulation 1 on each process
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one, two = _loss_rows(tmp_path / "one"), _loss_rows(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["vision_loss"] == pytest.approx(a["vision_loss"], rel=1e-4)
        assert b["vision_tokens"] == a["vision_tokens"]  # logged over both processes
    p1 = load_file(single.final_dir / "model.safetensors")
    p2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert p1.keys() == p2.keys()
    base = load_file(tiny_dir / "model.safetensors")
    # Adam divides by sqrt(v): near-zero gradients turn float noise into up to ~lr-sized steps, hence atol
    moved = 0
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], atol=1e-4, rtol=1e-4)
        moved += int((p1[k] - base[k]).abs().max() > 1e-3)  # the runs moved the weights well beyond atol
    assert moved > 10
