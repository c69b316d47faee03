"""`dvsft demo --task scenes`: SFT vs DV-SFT with ``fill`` labels on questions about what is where.

The text demo's protocol (:mod:`dvsft.experiments.demo`: the same jobs, runner, seeds, learning curves and image
swap) on synthetic scenes of coloured shapes (:mod:`dvsft.sources.scenes`): every visual token at least half inside
an object is labeled with the object's shape word (the ``fill`` label policy). Three evaluations, each by greedy
exact match of the short answer and teacher-forced:

* ``seen``: held-out scenes whose question is about a colour x shape combination seen in training;
* ``unseen``: held-out scenes whose question is about a held-out combination (never in a training scene);
* ``swap``: the ``seen`` questions, each shown another scene's image (a model that looks falls to chance).

Plus the vision-label top-1 of the visual tokens on ``seen`` scenes (fill labels), and ``unseen_what_acc``: the
"what is in the ...?" questions of ``unseen``, whose answer is a name no training answer holds.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from dvsft.experiments.runner import final_rows, pool_size, quiet_transformers, run_jobs, summarize
from dvsft.experiments.settings import ScenePreset
from dvsft.sources.scenes import SceneSpec

METHODS = ("sft", "dvsft")
NAMES = {"sft": "SFT", "dvsft": "DV-SFT"}
EVALS = ("seen", "unseen", "swap")
EVAL_NAMES = {
    "seen": "held-out scenes (seen combinations)",
    "unseen": "held-out combinations",
    "swap": "image swap (another scene's image)",
}
KEYS = (*(f"{e}_{m}" for e in EVALS for m in ("acc", "tf_acc")), "unseen_what_acc", "vision_top1")
MAX_ANSWER_TOKENS = 8  # answers are two or three words


def scene_spec(preset: ScenePreset) -> SceneSpec:
    """The scenes of a preset: its page size, areas, objects per scene and region labels."""
    labels = tuple(preset.scene_labels.split("+"))
    return SceneSpec(
        cols=preset.cols,
        rows=preset.rows,
        areas=(preset.area_rows, preset.area_cols),
        min_objects=preset.min_objects,
        max_objects=preset.max_objects,
        labels=labels,
    )


def build_scenes(preset: ScenePreset, out: Path) -> dict[str, Path]:
    """Training, validation (``val_seen``, ``val_unseen``) and held-out (``seen``, ``unseen``) scenes, name ->
    records file; reused when ``out/data`` holds them for the same settings."""
    from dvsft.sources.scenes import write_scenes

    data_dir = out / "data"
    spec = scene_spec(preset)
    settings = {"scenes": asdict(spec), "train": preset.train_pages, "heldout": preset.heldout_pages}
    meta = data_dir / "settings.json"
    plan = {  # name -> (split, seed, count)
        "train": ("train", 1, preset.train_pages),
        "val_seen": ("seen", 2, preset.heldout_pages),
        "val_unseen": ("unseen", 3, preset.heldout_pages),
        "seen": ("seen", 4, preset.heldout_pages),
        "unseen": ("unseen", 5, preset.heldout_pages),
    }
    files = {name: data_dir / f"{name}.jsonl" for name in plan}
    if meta.is_file() and json.loads(meta.read_text()) == settings and all(f.is_file() for f in files.values()):
        return files
    for name, (split, seed, n) in plan.items():
        write_scenes(spec, n, split, seed, data_dir, name)
    meta.write_text(json.dumps(settings))
    return files


def with_labels(records: list[dict], processor: Any, config: Any) -> list[dict]:
    """Records with the ``grid`` and ``vision_labels`` of ``config``'s policy for the processor's grid (what the
    vision-label top-1 scores)."""
    from dvsft.align.aligner import align_record

    out = []
    for r in records:
        layout, alignment = align_record(r, processor, processor.tokenizer, config)
        out.append({**r, "grid": [layout.grid.rows, layout.grid.cols], "vision_labels": alignment.labels})
    return out


def answers(model: Any, processor: Any, records: list[dict]) -> list[float]:
    """Exact match (case-insensitive) of each record's greedy answer."""
    from dvsft.evaluation.metrics import exact_match
    from dvsft.experiments.demo_eval import predictions

    return [exact_match(p, [ref]) for p, ref in predictions(model, processor, records, MAX_ANSWER_TOKENS)]


def vision_top1(model: Any, processor: Any, records: list[dict]) -> float:
    """Share of labeled visual tokens whose own logits' top-1 is one of the token's labels (with ``multi_label``
    a cell holds a colour and a shape label: either counts); NaN without labeled tokens."""
    from dvsft.lens.visual_logits import vision_label_accuracy

    hits = total = 0

    def count(record: dict, result: Any, _labels: dict) -> None:
        nonlocal hits, total
        per_token: dict[int, set[int]] = {}
        for lab in record["vision_labels"]:
            per_token.setdefault(int(lab["token"]), set()).add(int(lab["token_id"]))
        hits += sum(result.top_ids[token][0] in ids for token, ids in per_token.items())
        total += len(per_token)

    vision_label_accuracy(model, processor, records, on_record=count)
    return hits / total if total else float("nan")


def evaluate_scenes(
    model: Any, processor: Any, sets: dict[str, list[dict]], config: Any, vision_pages: int = 16
) -> dict[str, float]:
    """Every evaluation of one model: ``{set}_acc`` / ``{set}_tf_acc`` for :data:`EVALS`, ``unseen_what_acc``,
    ``vision_top1``. ``sets`` maps ``seen`` and ``unseen`` to records with absolute image paths."""
    from dvsft.data.collator import VisionCollator
    from dvsft.experiments.demo_eval import swapped, teacher_forced

    was_training = model.training
    model.eval()
    collator = VisionCollator(processor, vision_labels=False)
    pages = {"seen": sets["seen"], "unseen": sets["unseen"], "swap": swapped(sets["seen"])}
    out: dict[str, float] = {}
    for name in EVALS:
        out[f"{name}_tf_acc"] = teacher_forced(model, collator, pages[name])
        hits = answers(model, processor, pages[name])
        out[f"{name}_acc"] = statistics.fmean(hits)
        if name == "unseen":
            what = [h for h, r in zip(hits, pages[name], strict=True) if "What is in" in r["messages"][0]["content"]]
            out["unseen_what_acc"] = statistics.fmean(what) if what else float("nan")
    out["vision_top1"] = vision_top1(model, processor, with_labels(sets["seen"][:vision_pages], processor, config))
    model.train(was_training)
    return out


@dataclass(frozen=True)
class SceneEvaluation:
    """A job's evaluation: :func:`evaluate_scenes` on the scenes of ``split`` (``heldout`` or ``val``), vision
    labels by the preset's policy."""

    files: dict[str, str]
    split: str
    label_policy: str
    multi_label: bool

    @cached_property
    def sets(self) -> dict[str, list[dict]]:
        from dvsft.core.records import read_jsonl
        from dvsft.experiments.demo_eval import resolved

        prefix = "" if self.split == "heldout" else "val_"
        paths = {name: Path(self.files[prefix + name]) for name in ("seen", "unseen")}
        return {name: resolved(list(read_jsonl(p)), p) for name, p in paths.items()}

    def __call__(self, model: Any, processor: Any) -> dict[str, float]:
        from dvsft.align.aligner import AlignConfig

        config = AlignConfig(label_policy=self.label_policy, multi_label=self.multi_label)
        return evaluate_scenes(model, processor, self.sets, config)


# --------------------------------------------------------------------------- outputs


def progress_line(row: dict) -> str:
    """One evaluation point as a plain log line."""
    accs = ", ".join(f"{e} {100 * row[f'{e}_acc']:.1f}%" for e in EVALS)
    return f"{NAMES[row['method']]} seed {row['seed']} step {row['step']}: answer accuracy {accs}"


def plot_scene_curves(rows: list[dict], path: Path) -> None:
    """Exact-match and teacher-forced accuracy per evaluation, and vision-label top-1, over training."""
    from dvsft.experiments.plots import plot_curves

    panels = [
        *[(f"{e}_acc", f"{EVAL_NAMES[e]}\nexact-match answer accuracy") for e in EVALS],
        ("vision_top1", "visual tokens: vision-label top-1 (fill)"),
        *[(f"{e}_tf_acc", f"{EVAL_NAMES[e]}\nteacher-forced token accuracy") for e in EVALS],
        ("unseen_what_acc", "held-out combinations:\n'What is in the ...?' (a never-seen answer)"),
    ]
    methods = {"sft": (NAMES["sft"], "#888888"), "dvsft": (NAMES["dvsft"], "#d62728")}
    title = (
        "Tiny Qwen3-VL answering what is where in scenes of coloured shapes: SFT vs DV-SFT with fill labels "
        "(mean over seeds, band = min..max)"
    )
    plot_curves(rows, panels, methods, path, title)


def per_seed_margins(rows: list[dict]) -> list[dict]:
    """DV-SFT minus SFT at the final step, per seed: answer accuracy on ``seen`` and ``unseen``, and the reading
    gap (accuracy on ``seen`` minus on ``swap``)."""
    final = final_rows(rows)
    seeds = sorted({s for (m, s) in final if ("sft", s) in final and ("dvsft", s) in final})
    out = []
    for s in seeds:
        d, b = final[("dvsft", s)], final[("sft", s)]
        gap = (d["seen_acc"] - d["swap_acc"]) - (b["seen_acc"] - b["swap_acc"])
        out.append({"seed": s, "seen": d["seen_acc"] - b["seen_acc"], "unseen": d["unseen_acc"] - b["unseen_acc"]})
        out[-1]["swap"] = gap
    return out


def write_scene_report(rows: list[dict], setup: str, seconds: float, path: Path) -> str:
    """report.md: the summary table, per-seed accuracies and margins, and what the numbers mean."""
    summary = summarize(rows, METHODS, KEYS)
    margins = per_seed_margins(rows)

    def fmt(method: str, key: str) -> str:
        s = summary[method].get(key)
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s else "–"

    lines = [
        "# dvsft demo --task scenes: SFT vs DV-SFT (fill labels)",
        "",
        f"{setup}; {seconds / 60:.1f} min in all.",
        "",
        "Mean ± std over seeds at the final step, in %. *answer*: greedy exact match; *TF*: teacher-forced token "
        "accuracy.",
        "",
        "| method | held-out scenes: answer | TF | held-out combinations: answer | TF | 'what is in' on held-out "
        "combinations | image swap: answer | TF | vision-label top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in (m for m in METHODS if m in summary):
        keys = ["seen_acc", "seen_tf_acc", "unseen_acc", "unseen_tf_acc", "unseen_what_acc", "swap_acc"]
        cells = [fmt(method, k) for k in [*keys, "swap_tf_acc", "vision_top1"]]
        lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed, answer accuracy (%) at the final step:", ""]
    lines += [
        "| seed | method | held-out scenes | held-out combinations | image swap |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (method, seed), r in sorted(final_rows(rows).items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        lines.append(f"| {seed} | {NAMES[method]} | " + " | ".join(f"{100 * r[f'{e}_acc']:.1f}" for e in EVALS) + " |")
    if margins:
        lines += ["", "DV-SFT − SFT per seed (points): held-out scenes, held-out combinations, reading gap", ""]
        lines += [
            f"- seed {m['seed']}: {100 * m['seen']:+.1f}, {100 * m['unseen']:+.1f}, {100 * m['swap']:+.1f}"
            for m in margins
        ]
        wins = all(m["seen"] > 0 for m in margins)
        lines += ["", f"DV-SFT ahead of SFT on held-out scenes on every seed: **{'yes' if wins else 'no'}**."]
    lines += [
        "",
        "What the numbers mean: both models see the same scenes in the same order with the same budget; each "
        "training scene asks one question (*What is in the top left?* → *red circle*, or *Where is the red "
        "circle?* → *top left*). SFT learns only from the answer; DV-SFT also labels every visual token at least "
        "half inside an object with the object's shape word (the `fill` label policy). *Held-out combinations*: "
        "questions about a colour x shape pair no training scene shows. *Image swap*: the held-out questions, "
        "each shown another scene's image; a model that looks falls to chance there (*reading gap*: held-out "
        "accuracy minus image-swap accuracy). Vision-label top-1: how often a labeled visual token's own logits "
        "name its label.",
        "",
        "Files: `curves.png` (learning curves, band = seed spread), `results.json` (every evaluation), `sft/` and "
        "`dvsft/` (final models of the first seed).",
    ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def setup_line(preset: ScenePreset, spec: SceneSpec, seeds: int) -> str:
    """One sentence describing the run, for the report."""
    return (
        f"Preset `{preset.name}`: tiny Qwen3-VL ({preset.tiny.layers} LLM layers, hidden {preset.tiny.hidden_size}); "
        f"{preset.train_pages} training scenes of {spec.cols}x{spec.rows} visual tokens, {spec.areas[0]}x"
        f"{spec.areas[1]} areas, {spec.min_objects}-{spec.max_objects} objects of {len(spec.colours)} colours x "
        f"{len(spec.shapes)} shapes ({len(spec.colours)} combinations held out); labels: {'+'.join(spec.labels)} "
        f"({preset.label_policy}{', multi-label' if preset.multi_label else ''}); {preset.steps} steps of batch "
        f"{preset.batch_size} per run, lr {preset.learning_rate} {preset.lr_scheduler}, lambda {preset.vision_lambda}, "
        f"{seeds} seed(s)"
    )


def run_scenes(
    preset: ScenePreset,
    seeds: int | None = None,
    out: Path = Path("dvsft-demo"),
    workers: int | None = None,
    methods: tuple[str, ...] = METHODS,
    threads: int | None = None,
    split: str = "heldout",
) -> dict:
    """Run the scene experiment; returns the results dictionary also written to ``out/results.json``."""
    from rich.console import Console

    from dvsft.experiments.demo import demo_jobs, keep_first_seed
    from dvsft.sources.scenes import vocabulary_text

    if split not in ("heldout", "val"):
        raise ValueError(f"split must be heldout or val, got {split!r}")
    quiet_transformers()
    console = Console()
    n_seeds = seeds if seeds is not None else preset.seeds
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    workers, threads = pool_size(workers, threads, preset.device)
    spec = scene_spec(preset)
    with console.status("drawing training, validation and held-out scenes"):
        files = build_scenes(preset, out)
    console.print(f"[green]✓[/] {preset.train_pages} training scenes, held-out scenes in {out / 'data'}")
    evaluation = SceneEvaluation({k: str(v) for k, v in files.items()}, split, preset.label_policy, preset.multi_label)
    # the tokenizer holds every scene word as one token, so a region's label (its first sub-token) is the word
    vocab = vocabulary_text(spec)
    jobs = demo_jobs(
        replace(preset, text_steps=0), methods, n_seeds, files, split, out, None, threads, evaluation, vocab
    )
    rows = run_jobs(jobs, workers, console, progress_line)
    rows.sort(key=lambda r: (r["method"], r["seed"], r["step"]))
    keep_first_seed(jobs, out)
    plot_scene_curves(rows, out / "curves.png")
    seconds = time.time() - t0
    setup = setup_line(preset, spec, n_seeds) + (" (evaluated on the VALIDATION scenes)" if split == "val" else "")
    report = write_scene_report(rows, setup, seconds, out / "report.md")
    margins = per_seed_margins(rows)
    results = {
        "task": "scenes",
        "runs": rows,
        "summary": summarize(rows, METHODS, KEYS),
        "margins": margins,
        "dvsft_ahead_every_seed": all(m["seen"] > 0 for m in margins) if margins else None,
        "preset": asdict(preset),
        "split": split,
        "seeds": n_seeds,
        "seconds": round(seconds, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(report, soft_wrap=True)
    console.print(f"[bold]Files:[/] {out / 'report.md'}, {out / 'results.json'}, {out / 'curves.png'}", soft_wrap=True)
    return results
