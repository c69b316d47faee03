"""DeepSpeed ZeRO-2 and ZeRO-3 for real: two CPU processes (DeepSpeed's CPU accelerator, gloo) train like one.

Skipped where DeepSpeed is not installed (``pip install -e '.[deepspeed]'``; setup.sh installs it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_records, overrides

from dvsft.training.config import load_config
from dvsft.training.train import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed: pip install -e '.[deepspeed]'"
    ),
]
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dvsft" / "configs" / "deepspeed"


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_records(tmp_path_factory.mktemp("ds_data"), n=2, seed=3)


@pytest.mark.parametrize(("stage", "method"), [("zero2", "dvsft"), ("zero3", "dvsft"), ("zero3", "basic")])
def test_deepspeed_two_processes_match_one(tiny_dir, data, tmp_path, stage, method):
    """Same losses, gradient norms and term values as one process with the same global batch, and a final
    model with the same weights (ZeRO-3 gathers them on save; BASIC's KL gathers the LM head)."""
    from transformers import AutoModelForImageTextToText

    common = dict(method=method, max_steps=2, global_batch_size=2, per_device_train_batch_size=1, learning_rate=1e-3)
    single = train(load_config(None, overrides(tiny_dir, data, tmp_path / "one", **common)))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    out = tmp_path / stage
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dvsft.cli"]
    cmd += ["train", *overrides(tiny_dir, data, out, **common), "--deepspeed", str(CONFIGS / f"{stage}.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one, two = _rows(tmp_path / "one"), _rows(out)
    assert [r["step"] for r in two] == [1, 2]
    terms = ["loss", "grad_norm", "text_loss"] + (["vision_loss"] if method == "dvsft" else ["basic_kl", "basic_dir"])
    for a, b in zip(one, two, strict=True):
        for key in terms:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (key, a[key], b[key])
    assert one[0]["basic_kl" if method == "basic" else "vision_loss"] > 0  # the compared term is really computed
    p1 = AutoModelForImageTextToText.from_pretrained(single.final_dir).state_dict()
    p2 = AutoModelForImageTextToText.from_pretrained(out / "final").state_dict()
    assert p1.keys() == p2.keys()
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], atol=1e-4, rtol=1e-4)
