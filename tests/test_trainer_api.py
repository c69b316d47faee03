"""The library as researchers use it: lazy exports, the standalone DVSFTTrainer, exact gradient accumulation
(trainer and custom-Trainer recipe), the one forward path under a sharded LM head, eval metrics, the docs' examples."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_records, uneven_records

ROOT = Path(__file__).resolve().parents[1]
PIXELS = dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16)


@pytest.mark.slow
def test_lazy_top_level_exports():
    code = (
        "import sys, dvsft; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
        "from dvsft import DVSFTConfig, DVSFTTrainer, VisionCollator, dvsft_loss, load_records; "
        "from transformers import Trainer, TrainingArguments; "
        "assert issubclass(DVSFTConfig, TrainingArguments) and issubclass(DVSFTTrainer, Trainer); "
        "print(sorted(dvsft.__all__))"
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DVSFTTrainer" in out.stdout
    import dvsft

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dvsft.nope  # noqa: B018


# ----------------------------------------------------------------------------- exact gradient accumulation


def _one_step_update(trainer_cls, model_dir: Path, data: Path, out: Path, batch: int, accumulation: int, **kw):
    """Parameter change of one SGD step (lr 1, no clipping): minus the gradient of the step's loss."""
    from dvsft import DVSFTConfig, load_records
    from dvsft.models.loading import load_model, load_processor

    torch.manual_seed(0)
    model = load_model(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DVSFTConfig(
        output_dir=str(out),
        method="dvsft",
        vision_lambda=1.0,
        vision_eps=0.1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **PIXELS,
    )
    samples = load_records(data, one_qa_per_image=True)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=samples, processing_class=load_processor(model_dir), **kw
    )
    trainer.train()
    loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return loss, {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_update(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-7)


def _max_diff(a, b) -> float:
    return max(float((a[1][n] - b[1][n]).abs().max()) for n in a[1])


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return uneven_records(tmp_path_factory.mktemp("uneven"))


@pytest.mark.slow
def test_trainer_accumulation_2x1_equals_1x2(tiny_dir, uneven, tmp_path):
    """Tolerance: loss rel 1e-5, gradients rtol 1e-4 / atol 1e-7 (float32, different padding and batching)."""
    from dvsft import DVSFTTrainer

    big = _one_step_update(DVSFTTrainer, tiny_dir, uneven, tmp_path / "a", batch=2, accumulation=1)
    small = _one_step_update(DVSFTTrainer, tiny_dir, uneven, tmp_path / "b", batch=1, accumulation=2)
    _assert_same_update(big, small)

    class MeanOfMeans(DVSFTTrainer):  # the plausible bug: each micro-batch's own mean, divided by the steps
        loss_is_scaled_for_ga = False

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            return super().get_batch_samples(epoch_iterator, num_batches, device)[0], None

    wrong = _one_step_update(MeanOfMeans, tiny_dir, uneven, tmp_path / "c", batch=1, accumulation=2)
    assert _max_diff(big, wrong) > 100 * _max_diff(big, small)  # the test tells the two apart


def _recipe_trainer():
    import runpy

    return runpy.run_path(str(ROOT / "examples" / "custom_trainer.py"))["DVSFTLossTrainer"]


@pytest.mark.slow
def test_custom_trainer_recipe_accumulation_2x1_equals_1x2(tiny_dir, uneven, tmp_path):
    """The documented recipe (examples/custom_trainer.py, docs/api.md): same tolerance as the trainer."""
    from dvsft import VisionCollator
    from dvsft.models.loading import load_processor

    recipe = _recipe_trainer()

    def run(out, batch, accumulation):
        collator = VisionCollator(load_processor(tiny_dir), **PIXELS)
        return _one_step_update(
            lambda processing_class, **kw: recipe(data_collator=collator, vision_weight=1.0, eps=0.1, **kw),
            tiny_dir,
            uneven,
            out,
            batch,
            accumulation,
        )

    _assert_same_update(run(tmp_path / "a", 2, 1), run(tmp_path / "b", 1, 2))
    ours = _one_step_update(_trainer(), tiny_dir, uneven, tmp_path / "c", batch=2, accumulation=1)
    _assert_same_update(ours, run(tmp_path / "d", 1, 2))  # the recipe and DVSFTTrainer: the same step


def _trainer():
    from dvsft import DVSFTTrainer

    return DVSFTTrainer


# ----------------------------------------------------------------------------- the LM head under sharding


class _ShardedHead(torch.nn.Linear):
    """A head sharded like ZeRO-3 / FSDP: its weight is whole only inside its own call and in its backward.

    Pre-forward hook: gather; post-forward hook: free, and gather again when the gradient reaches the call's
    outputs (the wrappers' pre-backward hook); after the gradient is accumulated: free.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0], bias=False)
        self.full = weight.detach().clone()
        self.weight.data = torch.empty(0, dtype=weight.dtype)
        self.register_forward_pre_hook(lambda m, args: m._gather())
        self.register_forward_hook(self._after_forward)
        self.weight.register_post_accumulate_grad_hook(lambda p: self._free())

    def _gather(self):
        self.weight.data = self.full

    def _free(self):
        self.weight.data = torch.empty(0, dtype=self.full.dtype)

    def _after_forward(self, module, args, out):
        self._free()
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad: (self._gather(), grad)[1])


def test_loss_gathers_a_sharded_head_through_its_own_call():
    from dvsft.objectives.losses import dvsft_loss

    torch.manual_seed(0)
    weight = torch.randn(50, 8, dtype=torch.float64)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, -100, -100, -100]])
    pos, targets = torch.tensor([[0, 1], [1, 4], [1, 5]]), torch.tensor([9, 10, 11])
    sets = torch.tensor([[9, 10, -1], [10, 11, 9], [11, -1, -1]])
    ref_w = weight.clone().requires_grad_(True)
    ref = dvsft_loss(hidden, ref_w, labels, pos, targets, sets, vision_weight=0.5, eps=0.1, chunk_size=2)
    grad_h_ref, grad_w_ref = torch.autograd.grad(ref.loss, [hidden, ref_w])

    head = _ShardedHead(weight)
    head.weight.requires_grad_(True)
    out = dvsft_loss(hidden, head, labels, pos, targets, sets, vision_weight=0.5, eps=0.1, chunk_size=2)
    assert head.weight.numel() == 0  # sharded again after the loss
    out.loss.backward()  # the gradient reaches the (sharded) parameter, as a ZeRO-3 / FSDP reduce expects
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(hidden.grad, grad_h_ref)
    torch.testing.assert_close(head.weight.grad, grad_w_ref)
    with pytest.raises(TypeError):  # reading the weight outside the head's call sees the empty shard
        dvsft_loss(hidden, head.weight, labels, pos, targets, sets, vision_weight=0.5, eps=0.1)


def test_model_loss_runs_the_wrapped_models_forward(tiny_dir, tmp_path):
    """The public loss calls the model object it is given (a DDP wrapper's forward), never ``model.model``."""
    from dvsft import VisionCollator, load_records
    from dvsft.models.loading import load_model, load_processor
    from dvsft.objectives.losses import model_loss

    model = load_model(tiny_dir)
    data = make_records(tmp_path / "d", n=2)
    batch = VisionCollator(load_processor(tiny_dir), **PIXELS)(list(load_records(data)))

    class Wrapper(torch.nn.Module):  # what DDP / DeepSpeed put around the model: only their forward syncs
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, **kw):
            self.calls += 1
            return self.module(**kw)

    wrapped = Wrapper(model)
    out = model_loss(wrapped, batch, vision_weight=0.5, eps=0.1)
    assert wrapped.calls == 1 and out.n_vision > 0
    assert float(out.loss) == pytest.approx(float(model_loss(model, batch, vision_weight=0.5, eps=0.1).loss))


# ----------------------------------------------------------------------------- docs/api.md, executed


def _doc_block(title: str) -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split(f"## {title}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_doc(code: str, replace: dict[str, str]) -> dict:
    for old, new in replace.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_docs_standalone_trainer_example_runs_and_evaluates(tiny_dir, tmp_path):
    from dvsft.core.records import read_jsonl
    from dvsft.lens.visual_logits import vision_label_accuracy
    from dvsft.models.loading import load_processor

    train = make_records(tmp_path / "train", n=4, seed=1)
    heldout = make_records(tmp_path / "heldout", n=2, seed=2)
    ns = _run_doc(
        _doc_block("The standalone trainer"),
        {
            '"path/to/Qwen3-VL-2B-Instruct"': repr(str(tiny_dir)),
            '"train.jsonl"': repr(str(train)),
            '"heldout.jsonl"': repr(str(heldout)),
            'output_dir="out",': f"output_dir={str(tmp_path / 'out')!r}, max_steps=6, learning_rate=2e-3, "
            "warmup_steps=0, report_to='none', disable_tqdm=True, min_pixels=4096, max_pixels=16384, "
            "vision_lambda=1.0,",
            "    vision_lambda=0.1,\n": "",
            "gradient_accumulation_steps=4,": "gradient_accumulation_steps=1,",
            "eval_steps=50,": "eval_steps=3,",
        },
    )
    trainer, metrics = ns["trainer"], ns["metrics"]
    assert trainer.args.adam_beta2 == 0.95
    evals = [r for r in trainer.state.log_history if "eval_vision_top1" in r]
    assert [r["step"] for r in evals] == [3, 6, 6]  # every eval_steps, then the explicit evaluate()
    train_rows = [r for r in trainer.state.log_history if "vision_loss" in r]
    assert train_rows[-1]["vision_loss"] < train_rows[0]["vision_loss"]
    assert {"eval_loss", "eval_text_loss", "eval_vision_loss", "eval_vision_top1"} <= set(metrics)
    assert metrics["eval_vision_tokens"] > 0 and 0.0 <= metrics["eval_vision_top1"] <= 1.0
    # the top-1 diagnostic is the lens metric: the same number from `dvsft.lens.visual_logits`, one image at a time
    processor = load_processor(tiny_dir, **{"min_pixels": 4096, "max_pixels": 16384})
    trainer.model.eval()
    lens = vision_label_accuracy(trainer.model, processor, list(read_jsonl(heldout)), heldout)
    assert lens["n"] == metrics["eval_vision_tokens"]
    assert metrics["eval_vision_top1"] == pytest.approx(lens["top1"], abs=1e-6)  # float32 in the metric


@pytest.mark.slow
def test_docs_custom_trainer_example_runs(tiny_dir, tmp_path):
    train = make_records(tmp_path / "train", n=4, seed=1)
    ns = _run_doc(
        _doc_block("Drop-in: your own `Trainer` subclass"),
        {
            '"path/to/Qwen3-VL-2B-Instruct"': repr(str(tiny_dir)),
            '"train.jsonl"': repr(str(train)),
            '"out", ': f"{str(tmp_path / 'out')!r}, max_steps=2, use_cpu=True, report_to='none', logging_steps=1, ",
            "gradient_accumulation_steps=4": "gradient_accumulation_steps=2",
        },
    )
    losses = [r["loss"] for r in ns["trainer"].state.log_history if "loss" in r]
    assert len(losses) == 2 and all(v == v and v > 0 for v in losses)


@pytest.mark.slow
def test_docs_trl_example_trains_and_vision_loss_falls(tiny_dir, tmp_path):
    pytest.importorskip("trl", reason="the TRL extra: pip install 'dvsft[trl]'")
    data = make_records(tmp_path / "train", n=2, seed=1)
    ns = _run_doc(
        _doc_block("TRL"),
        {
            '"path/to/Qwen3-VL-2B-Instruct"': repr(str(tiny_dir)),
            '"train.jsonl"': repr(str(data)),
            '"out",': f"{str(tmp_path / 'out')!r}, max_steps=6, learning_rate=2e-3, lr_scheduler_type='constant', "
            "use_cpu=True, report_to='none', logging_steps=1, save_strategy='no', disable_tqdm=True,",
            "vision_weight=0.1, eps=0.1, tokens=tokens)": "vision_weight=1.0, eps=0.1, tokens=tokens)",
            "VisionCollator(processor)": "VisionCollator(processor, min_pixels=4096, max_pixels=16384)",
        },
    )
    trainer = ns["trainer"]
    assert type(trainer).__mro__[1].__name__ == "SFTTrainer"
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    from dvsft import VisionCollator, load_records
    from dvsft.models.loading import load_model, load_processor
    from dvsft.objectives.losses import model_loss

    processor = load_processor(tiny_dir)
    batch = VisionCollator(processor, min_pixels=4096, max_pixels=16384)(
        list(load_records(data, one_qa_per_image=True))
    )
    with torch.no_grad():
        before = model_loss(load_model(tiny_dir), batch, vision_weight=1.0, eps=0.1)
        after = model_loss(trainer.model, batch, vision_weight=1.0, eps=0.1)
    assert before.n_vision > 0
    assert float(after.vision_loss) < float(before.vision_loss) - 0.5, (before.vision_loss, after.vision_loss)
