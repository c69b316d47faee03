"""`dvsft bench train`: step time and peak memory of SFT vs DV-SFT vs the naive full-logits loss.

One batch (one image of ~1,000 visual tokens, ~20% of them labeled, a short answer) is built once
with the real processor and :class:`~dvsft.data.collator.VisionCollator`; a Qwen3-VL with the
real 151,936-token vocabulary runs forward + backward on it (no optimizer step). Variants:

* ``sft``: text loss only, computed the memory-lean way (:func:`~dvsft.objectives.losses.dvsft_loss`
  with ``vision_weight=0``: only the answer rows go through the LM head, in chunks);
* ``dvsft``: text + lambda * vision (with smoothing) in ONE fused pass over the LM head;
* ``dvsft_separate``: the same loss as two calls, ``text_loss(...) + lambda * vision_loss(...).loss``;
* ``naive``: full logits ``model(...).logits`` [B, L, V], shifted CE + the vision loss from
  gathered ``log_softmax`` rows (what a straightforward implementation does);
* ``hf_sft``: the stock HF loss ``model(..., labels=labels).loss`` (full logits, text only), for reference.

Memory is measured in a FRESH process per variant (no variant inherits another's allocator
state), over one step after a warm-up step: on CUDA ``torch.cuda.max_memory_allocated``; on CPU
the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
warm-up) minus its resident set right after importing torch and transformers, with glibc told to
serve every allocation over 64 KiB by ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``) so freed tensors
leave the resident set at once. Time is measured in ONE further process that holds one model and
runs the variants round-robin (``warmup`` rounds, then ``steps`` timed rounds; medians), so load
from other processes drifts over all variants alike; wall time and process CPU time are reported.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any

from dvsft.core.records import IMAGE_PLACEHOLDER

VARIANTS = ("sft", "dvsft", "dvsft_separate", "naive", "hf_sft")
MODEL_FIELDS = ("hidden_size", "layers", "heads", "kv_heads", "vision_hidden_size", "vision_depth")  # TinyConfig's


@dataclass
class BenchConfig:
    vocab_size: int = 151_936
    hidden_size: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden_size: int = 128
    vision_depth: int = 1
    image_width: int = 1024
    image_height: int = 992  # 32 x 31 = 992 visual tokens
    labeled_fraction: float = 0.2
    answer_words: int = 24
    vision_weight: float = 0.1
    eps: float = 0.1
    chunk_size: int = 1024
    steps: int = 3
    warmup: int = 1
    threads: int = 0  # torch intra-op threads in each variant's process (0: torch's default)
    device: str = "auto"
    seed: int = 0
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))


# ------------------------------------------------------------------ the batch (built once)


def build_batch(cfg: BenchConfig, out_dir: Path) -> dict[str, Any]:
    """Render a page with one word in each of ``labeled_fraction`` of the token cells; collate it; save it."""
    import torch
    from PIL import Image, ImageDraw

    from dvsft.data.collator import VisionCollator
    from dvsft.models.geometry import grid_for
    from dvsft.sources.corpora import corpus_words
    from dvsft.testing.tiny import TinyConfig, build_model_config, tiny_processor, train_tokenizer

    tiny = TinyConfig(
        **{name: getattr(cfg, name) for name in MODEL_FIELDS},
        min_pixels=32 * 32 * 4,
        max_pixels=max(cfg.image_width * cfg.image_height, 32 * 32 * 4),
    )
    tokenizer = train_tokenizer(tiny.vocab_size)
    processor = tiny_processor(tokenizer, tiny.min_pixels, tiny.max_pixels)
    grid = grid_for(processor, cfg.image_width, cfg.image_height)
    rng = random.Random(cfg.seed)
    vocab = [w for w in dict.fromkeys(corpus_words()) if 2 <= len(w) <= 8]
    n_labeled = round(cfg.labeled_fraction * grid.num_tokens)
    image = Image.new("RGB", (cfg.image_width, cfg.image_height), "white")
    draw = ImageDraw.Draw(image)
    words = []
    for k in sorted(rng.sample(range(grid.num_tokens), n_labeled)):
        x0, y0, x1, y1 = grid.token_box(k)
        text = rng.choice(vocab)
        draw.text((x0 + 2, y0 + 10), text[:4], fill="black")
        words.append({"text": text, "box": [x0 + 2, y0 + 8, x1 - 2, y1 - 8], "score": 1.0})
    answer = " ".join(rng.choice(vocab) for _ in range(cfg.answer_words))
    record = {
        "id": "bench",
        "image": image,
        "words": words,
        "messages": [
            {"role": "user", "content": IMAGE_PLACEHOLDER + "Read the page and answer the question about it."},
            {"role": "assistant", "content": answer},
        ],
    }
    batch = VisionCollator(processor, max_length=1 << 20)([record])
    model_cfg = build_model_config(tiny, tokenizer)
    model_cfg.text_config.vocab_size = cfg.vocab_size
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(batch, out_dir / "batch.pt")
    (out_dir / "config.json").write_text(model_cfg.to_json_string())
    return {
        "visual_tokens": grid.num_tokens,
        "labeled_tokens": int(batch["vision_positions"].shape[0]),
        "text_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "sequence_length": int(batch["input_ids"].shape[1]),
    }


# ------------------------------------------------------------------ one variant, in its own process


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _step_fn(variant: str, model: Any, batch: dict[str, Any], cfg: BenchConfig):
    import torch
    import torch.nn.functional as F

    from dvsft.objectives.base import forward_hidden, model_inputs
    from dvsft.objectives.losses import dvsft_loss, gather_vision_rows, text_loss, vision_loss

    def last_hidden_state(model: Any, batch: dict[str, Any]) -> Any:
        return forward_hidden(model, batch).last

    inputs = model_inputs(batch)
    head = model.lm_head
    lam, eps, chunk = cfg.vision_weight, cfg.eps, cfg.chunk_size
    pos, targets, sets = batch["vision_positions"], batch["vision_targets"], batch["vision_label_sets"]

    def sft():
        hidden = last_hidden_state(model, batch)
        return dvsft_loss(hidden, head, batch["labels"], vision_weight=0.0, chunk_size=chunk).loss

    def dvsft():
        hidden = last_hidden_state(model, batch)
        return dvsft_loss(hidden, head, batch["labels"], pos, targets, sets, lam, eps, chunk).loss

    def dvsft_separate():
        hidden = last_hidden_state(model, batch)
        text, _ = text_loss(hidden, head, batch["labels"], chunk_size=chunk)
        vision = vision_loss(gather_vision_rows(hidden, pos), head, targets, sets, eps=eps, chunk_size=chunk)
        return text + lam * vision.loss

    def naive():
        logits = model(**inputs).logits.float()  # [B, L, V]
        v = logits.shape[-1]
        text = F.cross_entropy(logits[:, :-1].reshape(-1, v), batch["labels"][:, 1:].reshape(-1))
        logp = torch.log_softmax(logits[pos[:, 0], pos[:, 1]], dim=-1)
        valid = sets >= 0
        smooth = (logp.gather(1, sets.clamp(min=0)) * valid).sum(1) / valid.sum(1).clamp(min=1)
        vision = (-(1 - eps) * logp.gather(1, targets[:, None])[:, 0] - eps * smooth).mean()
        return text + lam * vision

    def hf_sft():
        return model(**inputs, labels=batch["labels"]).loss

    return {"sft": sft, "dvsft": dvsft, "dvsft_separate": dvsft_separate, "naive": naive, "hf_sft": hf_sft}[variant]


class _Session:
    """The model and batch of one worker process; ``step(variant)`` runs one timed forward+backward."""

    def __init__(self, cfg: BenchConfig, data_dir: Path):
        import torch
        import transformers

        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.torch, self.cfg = torch, cfg
        self.baseline_rss = _proc_status("VmRSS")  # after importing torch + transformers
        self.device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.startswith("cuda")
        model_cfg = transformers.Qwen3VLConfig.from_json_file(str(data_dir / "config.json"))
        torch.manual_seed(cfg.seed)
        self.model = transformers.Qwen3VLForConditionalGeneration(model_cfg).to(self.device).train()
        self.batch = {k: v.to(self.device) for k, v in torch.load(data_dir / "batch.pt").items()}
        self.fns = {v: _step_fn(v, self.model, self.batch, cfg) for v in cfg.variants}

    def step(self, variant: str) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one forward+backward."""
        sync = self.torch.cuda.synchronize if self.cuda else (lambda: None)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.fns[variant]().backward()
        self.model.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def info(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "threads": self.torch.get_num_threads(),
            "params": sum(p.numel() for p in self.model.parameters()),
        }


def measure_memory(variant: str, cfg: BenchConfig, data_dir: Path) -> dict[str, Any]:
    """Peak memory of one variant's step (run in a fresh process): warm-up step, reset the peak, one step."""
    sess = _Session(dataclasses_replace(cfg, variants=[variant]), data_dir)
    torch = sess.torch
    sess.step(variant)
    if sess.cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _proc_status("VmRSS") - sess.baseline_rss
    sess.step(variant)
    peak = torch.cuda.max_memory_allocated() if sess.cuda else _proc_status("VmHWM") - sess.baseline_rss
    return {"variant": variant, "peak_bytes": peak, "resident_before_step_bytes": before, **sess.info()}


def measure_times(cfg: BenchConfig, data_dir: Path) -> dict[str, Any]:
    """Step times of every variant in ONE process, interleaved round by round (load drifts hit all alike)."""
    sess = _Session(cfg, data_dir)
    for _ in range(cfg.warmup):
        for v in cfg.variants:
            sess.step(v)
    wall: dict[str, list[float]] = {v: [] for v in cfg.variants}
    cpu: dict[str, list[float]] = {v: [] for v in cfg.variants}
    for _ in range(cfg.steps):
        for v in cfg.variants:
            w, c = sess.step(v)
            wall[v].append(w)
            cpu[v].append(c)
    return {
        v: {
            "step_s": statistics.median(wall[v]),
            "step_s_all": wall[v],
            "cpu_s": statistics.median(cpu[v]),
            "cpu_s_all": cpu[v],
        }
        for v in cfg.variants
    } | {"_info": sess.info()}


def worker_main() -> None:
    """The measuring child process (started by `_spawn`): one job of ``sys.argv[1]``, printed as JSON."""
    args = json.loads(sys.argv[1])
    cfg = BenchConfig(**args["cfg"])
    data_dir = Path(args["data_dir"])
    result = measure_times(cfg, data_dir) if args["job"] == "times" else measure_memory(args["job"], cfg, data_dir)
    print("BENCH_RESULT " + json.dumps(result))


def _spawn(job: str, cfg: BenchConfig, data_dir: Path) -> dict[str, Any]:
    """Run ``job`` ("times" or a variant's memory) in a fresh Python process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    if cfg.threads > 0:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    payload = json.dumps({"job": job, "cfg": asdict(cfg), "data_dir": str(data_dir)})
    proc = subprocess.run(
        [sys.executable, "-c", "from dvsft.experiments.bench.training import worker_main; worker_main()", payload],
        env=env,
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    raise RuntimeError(f"bench job {job} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------ the whole benchmark


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name()} (CUDA)"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"


def bench_train(cfg: BenchConfig, progress: Any = None) -> dict[str, Any]:
    """Run every variant of ``cfg.variants`` and return the numbers and the ratios to ``sft``."""
    unknown = sorted(set(cfg.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if "sft" not in cfg.variants:
        raise ValueError("the variants must include 'sft', the baseline of every ratio")
    if not 0 < cfg.labeled_fraction <= 1:
        raise ValueError(f"labeled_fraction must be in (0, 1], got {cfg.labeled_fraction}")
    with tempfile.TemporaryDirectory(prefix="dvsft_bench_") as tmp:
        data_dir = Path(tmp)
        shape = build_batch(cfg, data_dir)
        results = {}
        for variant in cfg.variants:
            if progress is not None:
                progress(f"{variant}: peak memory")
            results[variant] = _spawn(variant, cfg, data_dir)
        if progress is not None:
            progress("step times (all variants, interleaved)")
        times = _spawn("times", cfg, data_dir)
        for variant in cfg.variants:
            results[variant].update(times[variant])
    base = results["sft"]
    ratios = {
        v: {
            "time": r["step_s"] / base["step_s"],
            "cpu_time": r["cpu_s"] / base["cpu_s"],
            "peak_memory": r["peak_bytes"] / base["peak_bytes"],
        }
        for v, r in results.items()
    }
    device = base["device"]
    return {
        "config": asdict(cfg),
        "shape": shape,
        "machine": machine_description(device),
        "memory_method": "torch.cuda.max_memory_allocated"
        if device.startswith("cuda")
        else "peak RSS (VmHWM) over the post-import RSS, fresh process per variant, MALLOC_MMAP_THRESHOLD_=65536",
        "results": results,
        "ratios": ratios,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (rows: variants; ratios against sft)."""
    lines = [
        "| variant | step wall (s) | step CPU (s) | peak memory (MiB) | wall / sft | CPU / sft | peak / sft |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v, r in report["results"].items():
        ratio = report["ratios"][v]
        lines.append(
            f"| {v} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | {r['peak_bytes'] / 2**20:,.0f} | "
            f"{ratio['time']:.2f}x | {ratio['cpu_time']:.2f}x | {ratio['peak_memory']:.2f}x |"
        )
    return "\n".join(lines)
