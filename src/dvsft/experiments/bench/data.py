"""`dvsft bench data`: memory and throughput of the training data pipeline, streaming vs in memory.

* Peak RSS: a fresh process builds the pipeline and reads one epoch of N synthetic records, either
  streamed from Parquet shards (:class:`dvsft.data.streaming.StreamingSamples`) or loaded from JSONL into a
  list (:func:`dvsft.data.dataset.load_records`, the in-memory path); the peak RSS at the end
  (:func:`peak_rss_mib`).
* Throughput: samples/s through the real collator (tiny model processor, alignment, text and vision labels)
  in a DataLoader with ``workers`` processes, next to the tiny model's training samples/s (forward, backward
  and optimizer step) on the same batches.

Records are synthetic: ``words`` words with boxes on one of a few generated page images, and a QA pair.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from dvsft.core.records import IMAGE_PLACEHOLDER

PAGES = 8  # distinct page images the records point at
PAGE_SIZE = (128, 96)
VOCAB = ["total", "invoice", "date", "amount", "paid", "due", "tax", "net", "sum", "order", "item", "price"]


def synthetic_records(n: int, words: int = 20, seed: int = 0) -> Any:
    """``n`` word records over ``PAGES`` page images named ``images/pageK.png`` (relative)."""
    rng = random.Random(seed)
    w, h = PAGE_SIZE
    for i in range(n):
        ws = []
        for _ in range(words):
            x, y = rng.uniform(0, w - 30), rng.uniform(0, h - 10)
            ws.append(
                {
                    "text": rng.choice(VOCAB),
                    "box": [round(x, 1), round(y, 1), round(x + 28, 1), round(y + 9, 1)],
                    "score": 0.99,
                }
            )
        yield {
            "id": f"r{i}",
            "image": f"images/page{i % PAGES}.png",
            "width": w,
            "height": h,
            "words": ws,
            "messages": [
                {"role": "user", "content": IMAGE_PLACEHOLDER + "What is the first word?"},
                {"role": "assistant", "content": ws[0]["text"]},
            ],
        }


def write_data(folder: Path, n: int, words: int = 20) -> tuple[Path, Path]:
    """``folder/words.jsonl`` and ``folder/shards/`` with the same ``n`` records, and the page images."""
    from dvsft.core.record_table import ShardWriter
    from dvsft.core.records import json_row

    done = folder / f"complete-{n}-{words}"
    if done.exists():  # a kept folder from an earlier run
        return folder / "words.jsonl", folder / "shards"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "shards" / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    for k in range(PAGES):
        img = Image.new("RGB", PAGE_SIZE, "white")
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(0, PAGE_SIZE[0] - 30), rng.randrange(0, PAGE_SIZE[1] - 10)
            draw.text((x, y), rng.choice(VOCAB), fill="black")
        img.save(folder / "images" / f"page{k}.png")
        img.save(folder / "shards" / "images" / f"page{k}.png")
    jsonl = folder / "words.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f, ShardWriter(folder / "shards", rows_per_shard=10_000) as shards:
        for record in synthetic_records(n, words):
            f.write(json_row(record) + "\n")
            shards.write(record)
    done.touch()
    return jsonl, folder / "shards"


# ------------------------------------------------------------------------------------------ peak RSS


def read_epoch(kind: str, path: str) -> dict[str, Any]:
    """One epoch through the pipeline in this process; peak RSS (MiB), wall and CPU seconds, sample count."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    if kind == "stream":
        from dvsft.data.streaming import StreamingSamples

        for _ in StreamingSamples([path], seed=0):
            n += 1
    else:
        from dvsft.data.dataset import load_records

        samples = load_records(path)
        for _ in samples:
            n += 1
    rss = peak_rss_mib()
    return {"samples": n, "peak_rss_mib": rss, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def peak_rss_mib() -> float:
    """This process's peak resident set size. Linux: ``VmHWM`` of ``/proc/self/status``, not ``ru_maxrss``:
    a child started by ``subprocess`` keeps in ``ru_maxrss`` the resident size its parent had when it forked
    (a 400 MiB parent gives a 9 MiB child 410 MiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def measure_rss(kind: str, path: Path) -> dict[str, Any]:
    """:func:`read_epoch` in a fresh Python process (so earlier runs do not raise the peak)."""
    call = f"read_epoch({kind!r}, {str(path)!r})"
    code = f"import json; from dvsft.experiments.bench.data import read_epoch; print(json.dumps({call}))"
    import dvsft

    src = str(Path(dvsft.__file__).resolve().parents[1])  # the child imports this dvsft, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ throughput


def collator_rate(shards: Path, model_dir: Path, samples: int, workers: int, batch_size: int) -> dict[str, Any]:
    """Samples/s through DataLoader(StreamingSamples, VisionCollator, workers), over ``samples`` samples after
    a warm-up of one batch per worker (their start-up is not in the rate). CPU time counts the main process
    and the workers (``RUSAGE_CHILDREN`` once they have exited), over the whole run."""
    import gc

    from dvsft.data.collator import VisionCollator
    from dvsft.data.streaming import EpochDataLoader, PositionCollator, StreamingSamples
    from dvsft.models.geometry import TRAIN_MAX_PIXELS
    from dvsft.models.loading import load_processor

    inner = VisionCollator(load_processor(model_dir), min_pixels=32 * 32 * 4, max_pixels=TRAIN_MAX_PIXELS)
    collator = PositionCollator(inner)
    ds = StreamingSamples([shards], seed=0)
    ds.batch_size = batch_size
    kwargs = {"prefetch_factor": 4} if workers else {}
    loader = EpochDataLoader(ds, batch_size=batch_size, collate_fn=collator, num_workers=workers, **kwargs)
    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    it = iter(loader)
    warm = 0
    for _ in range(max(1, workers)):  # the first batch of each worker: start-up, not the steady rate
        warm += next(it)["input_ids"].shape[0]
    t_warm = time.perf_counter()
    counted = 0
    for batch in it:
        counted += batch["input_ids"].shape[0]
        if counted >= samples:
            break
    wall = time.perf_counter() - t_warm
    del it  # shuts the workers down, so their CPU time reaches RUSAGE_CHILDREN
    gc.collect()
    if counted == 0:
        raise ValueError(f"the data ran out during the warm-up ({warm} samples); use more records")
    return {
        "samples_per_s": counted / wall,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0 + _children_cpu() - k0,
        "samples": counted,
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def model_rate(shards: Path, model_dir: Path, steps: int, batch_size: int) -> dict[str, Any]:
    """Training samples/s of the tiny model (forward + backward + AdamW step) on pre-collated batches."""
    import torch

    from dvsft.training.config import load_config
    from dvsft.training.train import prepare

    with tempfile.TemporaryDirectory() as tmp:
        args = ["--model", str(model_dir), "--data", str(shards), "--output_dir", tmp, "--streaming", "true"]
        args += ["--max_steps", str(steps), "--min_pixels", str(32 * 32 * 4), "--report_to", "none"]
        args += ["--global_batch_size", str(batch_size), "--per_device_train_batch_size", str(batch_size)]
        run = prepare(load_config(None, args))
        trainer, model = run.trainer, run.model
        loader = trainer.get_train_dataloader()
        batches = []
        for batch in loader:
            batch.pop("sample_positions")
            batch.pop("sample_ids")
            batches.append(batch)
            if len(batches) > steps:
                break
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()

        def step(batch: dict[str, Any]) -> None:
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        step(batches[0])  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in batches[1 : steps + 1]:
            step(batch)
        wall = time.perf_counter() - t0
    return {
        "samples_per_s": steps * batch_size / wall,
        "steps_per_s": steps / wall,
        "wall_s": wall,
        "cpu_s": time.process_time() - c0,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def bench_data(
    sizes: tuple[int, ...] = (10_000, 200_000),
    repeats: int = 3,
    workers: int = 2,
    collate_samples: int = 256,
    steps: int = 10,
    batch_size: int = 4,
    keep: Path | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); returns medians of ``repeats`` runs (and each run
    under ``runs``)."""
    from dvsft.testing.tiny import TinyConfig, save_tiny

    say = progress or (lambda msg: None)
    root_ctx = tempfile.TemporaryDirectory(prefix="dvsft-bench-data-") if keep is None else None
    root = Path(root_ctx.name) if root_ctx else Path(keep)  # type: ignore[arg-type]
    try:
        result: dict[str, Any] = {"rss": {}, "sizes": list(sizes), "repeats": repeats, "runs": {}}
        data: dict[int, tuple[Path, Path]] = {}
        for n in sizes:
            say(f"writing {n:,} synthetic records")
            data[n] = write_data(root / f"n{n}", n)
        for n in sizes:
            jsonl, shards = data[n]
            for kind, path in (("stream", shards), ("memory", jsonl)):
                runs = []
                for r in range(repeats):
                    say(f"peak RSS: {kind} {n:,} records, run {r + 1}/{repeats}")
                    runs.append(measure_rss(kind, path))
                result["rss"][f"{kind}_{n}"] = median_of(runs)
                result["runs"][f"{kind}_{n}"] = runs
        model_dir = save_tiny(root / "tiny", TinyConfig())
        small = data[sizes[0]][1]
        runs = []
        for r in range(repeats):
            say(f"collator: {workers} workers, run {r + 1}/{repeats}")
            runs.append(collator_rate(small, model_dir, collate_samples, workers, batch_size))
        result["collator"] = median_of(runs)
        result["runs"]["collator"] = runs
        runs = []
        for r in range(repeats):
            say(f"tiny model step rate, run {r + 1}/{repeats}")
            runs.append(model_rate(small, model_dir, steps, batch_size))
        result["model"] = median_of(runs)
        result["runs"]["model"] = runs
        result["settings"] = {"workers": workers, "batch_size": batch_size, "collate_samples": collate_samples}
        first, last = sizes[0], sizes[-1]
        s0, s1 = result["rss"][f"stream_{first}"]["peak_rss_mib"], result["rss"][f"stream_{last}"]["peak_rss_mib"]
        m0, m1 = result["rss"][f"memory_{first}"]["peak_rss_mib"], result["rss"][f"memory_{last}"]["peak_rss_mib"]
        result["stream_growth"] = s1 / s0 - 1
        result["memory_growth"] = m1 / m0 - 1
        result["stream_flat"] = abs(result["stream_growth"]) <= 0.10
        return result
    finally:
        if root_ctx is not None:
            root_ctx.cleanup()


def report_lines(result: dict[str, Any], steps: int) -> list[str]:
    """``bench_data``'s result as `dvsft bench data` prints it (``steps``: the model run's steps)."""
    lines = []
    for key, r in result["rss"].items():
        kind, n = key.split("_")
        lines.append(
            f"{kind:>6} {int(n):>9,} records: peak RSS {r['peak_rss_mib']:8.1f} MiB, "
            f"wall {r['wall_s']:7.1f} s, CPU {r['cpu_s']:7.1f} s"
        )
    c, m = result["collator"], result["model"]
    return lines + [
        f"streaming RSS growth {100 * result['stream_growth']:+.1f}% "
        f"({'flat' if result['stream_flat'] else 'NOT flat'}), in memory {100 * result['memory_growth']:+.1f}%",
        f"collator, {result['settings']['workers']} workers: {c['samples_per_s']:.1f} samples/s "
        f"(run: wall {c['wall_s']:.1f} s, CPU {c['cpu_s']:.1f} s with the workers)",
        f"tiny model training: {m['samples_per_s']:.1f} samples/s ({m['steps_per_s']:.2f} steps/s; "
        f"{steps} steps: wall {m['wall_s']:.1f} s, CPU {m['cpu_s']:.1f} s)",
    ]
