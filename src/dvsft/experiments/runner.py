"""The experiments' runner: typed training jobs, one process pool with progress bars, one summary.

`dvsft demo` and `dvsft compare` both describe each (method, seed) as a :class:`Job`: a base model,
the training stages that continue from it, and an evaluation. :func:`run_jobs` runs the jobs one after
another in this process (``workers <= 1``) or in ``workers`` spawned processes, with one progress bar
per job in a terminal and one log line per evaluation otherwise; :func:`summarize` reduces the rows
of every job to mean, std and n over seeds.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvsft.experiments.settings import DemoPreset, page_pixels

Row = dict[str, Any]
Report = Callable[[str, str, Any], None]  # (kind "step" or "row", job name, step count or row)


@dataclass(frozen=True)
class TrainStage:
    """One `dvsft train` run of a job; it starts from the previous stage's final model."""

    method: str  # objectives joined by '+' (sft, dvsft, dvsft+asvr, ...)
    data: str  # training records file
    steps: int
    output_dir: str
    logging_steps: int
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One (method, seed): train the stages from ``base``, then evaluate.

    ``evaluation(model, processor)`` returns the metrics. With ``eval_steps`` it runs on the training
    model at those steps (learning curves: one row per step, with ``step``); without, once on the
    saved final model (one row, with ``final_dir``).
    """

    name: str  # the progress bar's label
    method: str
    seed: int
    preset: DemoPreset  # pages, model, optimizer settings and batch size
    base: str  # the starting model
    output_dir: str
    stages: tuple[TrainStage, ...]
    evaluation: Callable[[Any, Any], dict[str, float]]
    eval_steps: tuple[int, ...] = ()
    threads: int = 1

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)


def train_config(
    preset: DemoPreset,
    model_path: str,
    data: str,
    output_dir: str,
    method: str,
    seed: int,
    steps: int,
    batch_size: int,
    logging_steps: int,
) -> dict[str, Any]:
    """The `dvsft train` keys of a demo-style run: a tiny model learning to read from scratch."""
    pixels = page_pixels(preset)
    return {
        "model": model_path,
        "train": {"vision": True, "projector": True, "llm": "all"},  # from scratch: every part learns
        "data": data,
        "output_dir": output_dir,
        "method": method,
        "vision_lambda": preset.vision_lambda,
        "vision_eps": preset.vision_eps,
        **label_policy_keys(preset),
        "qa_per_image": 1,
        "min_pixels": pixels,
        "max_pixels": pixels,
        "max_length": 1024,
        "learning_rate": preset.learning_rate,
        "warmup_steps": 0.05,
        "lr_scheduler_type": preset.lr_scheduler,
        "global_batch_size": batch_size,
        "per_device_train_batch_size": batch_size,
        "max_steps": steps,
        "seed": seed,
        "bf16": bf16_supported(),
        "logging_steps": logging_steps,
        "save_steps": 10**9,
        "save_total_limit": 1,
        "report_to": "none",
    }


def label_policy_keys(preset: DemoPreset) -> dict[str, Any]:
    """The preset's label policy as training-config keys; none at the defaults (the paper's rule, single-label)."""
    keys: dict[str, Any] = {}
    if preset.label_policy != "bottom-right":
        keys["align_label_policy"] = preset.label_policy
    if preset.multi_label:
        keys["align_multi_label"] = True
    return keys


def bf16_supported() -> bool:
    """bfloat16 where the GPU supports it, else float32."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def quiet_transformers() -> None:
    """No per-file progress bars or warnings from transformers under the runner's own progress display."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def pool_size(workers: int | None, threads: int | None, device: str) -> tuple[int, int]:
    """(workers, torch threads per job): by default 2 runs at a time on a CPU, 1 on a GPU, sharing the cores."""
    cores = os.cpu_count() or 1
    workers = workers if workers is not None else (1 if device == "cuda" else min(2, cores))
    return workers, threads or max(1, cores // max(1, workers))


# --------------------------------------------------------------------------- one job


def run_job(job: Job, report: Report | None = None) -> list[Row]:
    """Train ``job`` stage by stage and evaluate it; ``report`` hears of every step and row."""
    import torch
    from transformers import TrainerCallback

    from dvsft.models.loading import load_model, load_processor
    from dvsft.training.train import train

    quiet_transformers()
    torch.set_num_threads(job.threads)
    report = report or (lambda kind, name, payload: None)
    pixels = page_pixels(job.preset)
    processor = load_processor(job.base, min_pixels=pixels, max_pixels=pixels) if job.eval_steps else None
    rows: list[Row] = []
    done = 0  # steps of the finished stages

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            report("step", job.name, done + state.global_step)
            if done + state.global_step in job.eval_steps:
                t = time.time()
                row = {"method": job.method, "seed": job.seed, "step": done + state.global_step}
                row |= {**job.evaluation(model, processor), "eval_seconds": round(time.time() - t, 2)}
                rows.append(row)
                report("row", job.name, row)

    model_path = job.base
    t0 = time.time()
    for stage in job.stages:
        config = train_config(
            job.preset,
            model_path,
            stage.data,
            stage.output_dir,
            stage.method,
            job.seed,
            steps=stage.steps,
            batch_size=job.preset.batch_size,
            logging_steps=stage.logging_steps,
        )
        config["objectives"] = stage.objectives
        config["disable_tqdm"] = True  # no progress bar and no printed logs (log.jsonl is still written)
        model_path = str(train(config, callbacks=[Steps()]).final_dir)
        done += stage.steps
    train_seconds = time.time() - t0
    for row in rows:
        row["train_seconds"] = round(train_seconds, 1)
    if not job.eval_steps:  # the saved final model
        t1 = time.time()
        model = load_model(model_path).eval()
        processor = load_processor(model_path, min_pixels=pixels, max_pixels=pixels)
        row = {"method": job.method, "seed": job.seed, **job.evaluation(model, processor)}
        row |= {"train_seconds": round(train_seconds, 1), "eval_seconds": round(time.time() - t1, 1)}
        rows.append(row | {"final_dir": model_path})
        report("row", job.name, rows[-1])
    return rows


def final_dir(job: Job) -> Path:
    """The final model of a job: ``final/`` in its last stage's output directory (as `dvsft train` saves it)."""
    return Path(job.stages[-1].output_dir) / "final"


# --------------------------------------------------------------------------- many jobs


class _QueueReport:
    """A worker's ``report``: the messages go to the parent through a manager queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, kind: str, name: str, payload: Any) -> None:
        self.queue.put((kind, name, payload))


def _run_in_worker(job: Job, queue: Any) -> list[Row]:
    return run_job(job, _QueueReport(queue))


def _run_pool(jobs: Sequence[Job], workers: int, report: Report) -> list[Row]:
    """The jobs in ``workers`` spawned processes; their messages relayed to ``report``."""
    from dvsft.core.pools import spawn_manager, spawn_pool

    rows: list[Row] = []
    with spawn_manager() as manager, spawn_pool(workers) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_run_in_worker, job, queue) for job in jobs]
        while True:
            finished = all(f.done() for f in futures)
            while not queue.empty():
                report(*queue.get())
            if finished:
                break
            time.sleep(0.2)
        for f in futures:
            rows.extend(f.result())
    return rows


def run_jobs(jobs: Sequence[Job], workers: int, console: Any, line: Callable[[Row], str]) -> list[Row]:
    """Run the jobs (in this process when ``workers <= 1``); returns every row, job by job.

    In a terminal each job has a live progress bar; otherwise (a log file) ``line(row)`` is printed for
    every evaluation as it comes.
    """
    from dvsft.core.progress import progress_bar

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the runs already fill the cores
    quiet_transformers()
    log_lines = not console.is_terminal
    rows: list[Row] = []
    with progress_bar(console, unit="steps", enabled=not log_lines) as progress:
        bars = {job.name: progress.add_task(job.name, total=job.steps) for job in jobs}

        def report(kind: str, name: str, payload: Any) -> None:
            if kind == "step":
                progress.update(bars[name], completed=payload)
            elif log_lines:
                print(line(payload), flush=True)

        if workers <= 1:  # in this process: no start-up cost, progress straight from the callback
            for job in jobs:
                rows.extend(run_job(job, report))
        else:
            rows.extend(_run_pool(jobs, workers, report))
    return rows


# --------------------------------------------------------------------------- summary


def final_rows(rows: list[Row]) -> dict[tuple[str, int], Row]:
    """(method, seed) -> the row of its last evaluated step (rows without ``step``: the final model's)."""
    out: dict[tuple[str, int], Row] = {}
    for r in rows:
        key = (r["method"], r["seed"])
        if key not in out or r.get("step", 0) > out[key].get("step", 0):
            out[key] = r
    return out


def summarize(rows: list[Row], methods: Sequence[str], keys: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> metric -> {mean, std, n} over seeds at the final step (NaN values left out)."""
    final = final_rows(rows)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        mine = [r for (m, _), r in final.items() if m == method]
        if not mine:
            continue
        out[method] = {}
        for key in keys:
            vals = [r[key] for r in mine if key in r and not math.isnan(r[key])]
            if vals:
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                out[method][key] = {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}
    return out
