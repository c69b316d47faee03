"""Two CPU processes (torchrun, gloo) through the public API (DVSFTTrainer standalone) train like one process.

The two samples have very different labeled-token counts, so a per-process mean (instead of the step's
token counts) would give different gradients; SGD makes the parameter change the gradient itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import uneven_records
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import sys
    from dvsft import DVSFTConfig, DVSFTTrainer, load_records
    from dvsft.models.loading import load_model, load_processor

    model_dir, data, out, accumulation = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    args = DVSFTConfig(
        output_dir=out, method="dvsft", vision_lambda=1.0, vision_eps=0.1, per_device_train_batch_size=1,
        gradient_accumulation_steps=accumulation, max_steps=2, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, save_strategy="no", report_to="none",
        disable_tqdm=True, min_pixels=4096, max_pixels=16384, seed=0,
    )
    trainer = DVSFTTrainer(
        model=load_model(model_dir), args=args, train_dataset=load_records(data, one_qa_per_image=True),
        processing_class=load_processor(model_dir),
    )
    trainer.train()
    trainer.save_model(out + "/final")
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_through_the_public_api(tiny_dir, tmp_path):
    data = uneven_records(tmp_path / "data")
    script = tmp_path / "train_public.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    src = Path(__file__).resolve().parents[1] / "src"
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    one = subprocess.run(
        [sys.executable, str(script), str(tiny_dir), str(data), str(tmp_path / "one"), "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        + [str(tiny_dir), str(data), str(tmp_path / "two"), "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    base = load_file(tiny_dir / "model.safetensors")
    p1 = load_file(tmp_path / "one" / "final" / "model.safetensors")
    p2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert p1.keys() == p2.keys()
    moved = 0
    for k in p1:  # SGD: parameter changes are the summed gradients; float32 sums in another order
        torch.testing.assert_close(p2[k] - base[k], p1[k] - base[k], rtol=1e-4, atol=1e-6)
        moved += int((p1[k] - base[k]).abs().max() > 1e-4)
    assert moved > 10


FSDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer
    from dvsft import VisionCollator, load_records
    from dvsft.models.loading import load_model, load_processor
    from dvsft.objectives.losses import model_loss, step_tokens

    model_dir, data, out, world = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model = load_model(model_dir)
    model.config.tie_word_embeddings = False  # untie: the LM head is a unit of its own, sharded after its call
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    samples = list(load_records(data, one_qa_per_image=True))
    collator = VisionCollator(load_processor(model_dir), min_pixels=4096, max_pixels=16384)
    if world > 1:
        policy = ModuleWrapPolicy({Qwen3VLTextDecoderLayer, torch.nn.Linear})
        model = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)
        assert isinstance(model.module.lm_head, FSDP)
        batch = collator([samples[rank]])
    else:
        batch = collator(samples[:2])
    out_ = model_loss(model, batch, vision_weight=1.0, eps=0.1, tokens=step_tokens([batch]))
    out_.loss.backward()
    if world > 1:
        with FSDP.summon_full_params(model, with_grads=True):
            grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}
    else:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save(grads, out)
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_with_a_sharded_lm_head_matches_one_process(tiny_dir, tmp_path):
    """FSDP on CPU runs through torch's FSDP (gloo) directly: accelerate's FSDP needs a GPU-type device.

    Every decoder layer and every linear layer, the LM head included, is its own FSDP unit, resharded after its
    call: the loss must apply the head through the head's own call (a loss that reads ``lm_head.weight``
    afterwards finds a shard). One sample per process vs both samples in one process: the same gradients.
    """
    data = uneven_records(tmp_path / "data")
    script = tmp_path / "fsdp_grads.py"
    script.write_text(FSDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    args = [str(tiny_dir), str(data)]
    one = subprocess.run(
        [sys.executable, str(script), *args, str(tmp_path / "one.pt"), "1"], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    two = subprocess.run([*cmd, *args, str(tmp_path / "two.pt"), "2"], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    ref, sharded = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert ref.keys() == sharded.keys() and "lm_head.weight" in ref
    for name in ref:
        torch.testing.assert_close(sharded[name], ref[name], rtol=1e-4, atol=1e-6)
    assert ref["lm_head.weight"].abs().max() > 1e-2
