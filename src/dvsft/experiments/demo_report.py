"""The demo's outputs: per-seed margins, curves, lens figure, report and log lines (summary: the runner's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvsft.experiments.demo_eval import EVAL_NAMES, EVALS
from dvsft.experiments.runner import final_rows, summarize

METHODS = ("sft", "dvsft")
NAMES = {"sft": "SFT", "dvsft": "DV-SFT"}
KEYS = tuple(f"{e}_{m}" for e in EVALS for m in ("word_acc", "tf_acc", "cer")) + ("vision_top1", "text_long_word_acc")


def per_seed_margins(rows: list[dict]) -> list[dict]:
    """DV-SFT minus SFT at the final step, per seed (both methods needed).

    ``text`` and ``random``: greedy word accuracy; ``swap``: how much of its running-text
    accuracy each model loses when shown another page's image (the share that comes from reading).
    """
    final = final_rows(rows)
    seeds = sorted({s for (m, s) in final if ("sft", s) in final and ("dvsft", s) in final})
    out = []
    for s in seeds:
        d, b = final[("dvsft", s)], final[("sft", s)]
        out.append(
            {
                "seed": s,
                "text": d["text_word_acc"] - b["text_word_acc"],
                "random": d["random_word_acc"] - b["random_word_acc"],
                "swap": (d["text_word_acc"] - d["swap_word_acc"]) - (b["text_word_acc"] - b["swap_word_acc"]),
            }
        )
    return out


def progress_line(row: dict) -> str:
    """One evaluation point as a plain log line."""
    accs = ", ".join(f"{e} {100 * row[f'{e}_word_acc']:.1f}%" for e in EVALS)
    return f"{NAMES[row['method']]} seed {row['seed']} step {row['step']}: word accuracy {accs}"


def plot_curves(rows: list[dict], path: Path) -> None:
    """Word accuracy (greedy) and token accuracy (teacher-forced) per evaluation, over training."""
    from dvsft.experiments.plots import plot_curves as plot

    panels = [
        *[(f"{e}_word_acc", f"{EVAL_NAMES[e]}\ngreedy word accuracy") for e in EVALS],
        ("vision_top1", "visual tokens: vision-label top-1"),
        *[(f"{e}_tf_acc", f"{EVAL_NAMES[e]}\nteacher-forced token accuracy") for e in EVALS],
        ("text_cer", "held-out running text: CER\n(lower is better, axis clipped at 1.2)"),
    ]
    methods = {"sft": (NAMES["sft"], "#888888"), "dvsft": (NAMES["dvsft"], "#d62728")}
    title = (
        "Tiny Qwen3-VL learning to read rendered text: SFT vs DV-SFT (mean over seeds, band = min..max). "
        "Image swap: each page scored with another page's image; a model that reads falls to zero."
    )
    plot(rows, panels, methods, path, title)


LENS_LEGEND = (  # the colours dvsft.lens.visual_logits.lens_overlay uses
    ("green: the cell's word", (0, 150, 0)),
    ("red: another word", (200, 0, 0)),
    ("blue: cell with no word label (no word ends in it)", (0, 0, 200)),
    ("red lines: token grid", (255, 0, 0)),
)


def plot_lens(model_dirs: dict[str, Path], records_file: Path, record: dict, path: Path, pixels: int) -> None:
    """Visual-logit overlays of the final models, side by side, on one held-out page."""
    from PIL import Image, ImageDraw

    from dvsft.core.images import load_image
    from dvsft.core.records import image_path
    from dvsft.lens.visual_logits import lens_overlay, record_labels, run_lens
    from dvsft.models.loading import load_model, load_processor

    image = load_image(image_path(record, records_file))
    panels = []
    for method, model_dir in model_dirs.items():
        model = load_model(model_dir).eval()
        processor = load_processor(model_dir, min_pixels=pixels, max_pixels=pixels)
        result = run_lens(model, processor, image)
        labels = record_labels(record, result.geometry, processor.tokenizer, str(records_file))
        correct = {token: result.top_ids[token][0] == label for token, label in labels.items()}
        upscale = max(2.0, 768 / image.width)
        panel = lens_overlay(image, result.geometry, result.top1_texts(), correct=correct, upscale=upscale)
        titled = Image.new("RGB", (panel.width, panel.height + 40), "white")
        titled.paste(panel, (0, 40))
        draw = ImageDraw.Draw(titled)
        draw.text((6, 4), f"{NAMES[method]}: top-1 token of each visual token's own logits", fill="black")
        x = 6
        for text, colour in LENS_LEGEND:
            draw.text((x, 22), text, fill=colour)
            x += draw.textlength(text) + 12
        panels.append(titled)
    original = Image.new("RGB", (panels[0].width, image.height * panels[0].width // image.width + 28), "white")
    original.paste(image.resize((panels[0].width, original.height - 28)), (0, 28))
    ImageDraw.Draw(original).text((6, 6), "held-out page (never seen in training)", fill="black")
    panels.insert(0, original)
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels) + 8 * len(panels)), "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height + 8
    out.save(path)


def write_report(rows: list[dict], setup: str, seconds: float, path: Path) -> str:
    """report.md: the summary table, per-seed results and margins, and what the numbers mean."""
    summary = summarize(rows, METHODS, KEYS)
    margins = per_seed_margins(rows)

    def fmt(method: str, key: str) -> str:
        if key not in summary[method]:
            return "–"
        s = summary[method][key]
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"

    lines = [
        "# dvsft demo: SFT vs DV-SFT",
        "",
        f"{setup}; {seconds / 60:.1f} min in all.",
        "",
        "Mean ± std over seeds at the final step, in %. *word*: greedy word accuracy; *TF*: teacher-forced "
        "token accuracy.",
        "",
        "| method | running text: word | TF | non-contextual: word | TF | image swap: word | TF "
        "| running text CER | vision-label top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        if method in summary:
            cells = [fmt(method, f"{e}_{m}") for e in EVALS for m in ("word_acc", "tf_acc")]
            cells += [fmt(method, "text_cer"), fmt(method, "vision_top1")]
            lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    long_words = [f"{NAMES[m]} {fmt(m, 'text_long_word_acc')}" for m in METHODS if m in summary]
    lines += ["", "Running text, words of 4 or more sub-tokens only (greedy word accuracy): " + ", ".join(long_words)]
    final = final_rows(rows)
    lines += ["", "Per seed, greedy word accuracy (%) at the final step:", ""]
    lines += ["| seed | method | running text | non-contextual | image swap |", "| --- | --- | --- | --- | --- |"]
    for (method, seed), r in sorted(final.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        accs = " | ".join(f"{100 * r[f'{e}_word_acc']:.1f}" for e in EVALS)
        lines.append(f"| {seed} | {NAMES[method]} | {accs} |")
    if margins:
        lines += ["", "DV-SFT − SFT per seed (points): running text, non-contextual, and reading gap", ""]
        lines += [
            f"- seed {m['seed']}: {100 * m['text']:+.1f}, {100 * m['random']:+.1f}, {100 * m['swap']:+.1f}"
            for m in margins
        ]
        wins = all(m["text"] > 0 and m["random"] > 0 and m["swap"] > 0 for m in margins)
        lines += ["", f"DV-SFT beats SFT on every seed on all three: **{'yes' if wins else 'no'}**."]
    lines += [
        "",
        "What the numbers mean: both models see the same pages in the same order with the same budget; "
        "SFT learns to read only through the transcription loss, DV-SFT additionally labels visual tokens with "
        "words by the label policy of the setup line (bottom-right, the paper's rule: the token holding a word's "
        "bottom-right corner gets the word's first sub-token). *Running text*: pages of prose never seen in "
        "training. *Non-contextual*: the same vocabulary in random order, so the language cannot be guessed. "
        "*Image swap*: the running-text pages, each scored against its own transcription but shown another "
        "page's image; a model that reads falls to near zero there, one that guesses from the language does "
        "not (the *reading gap* is running-text accuracy minus image-swap accuracy). Word accuracy matches "
        "words in order along an edit-distance alignment; CER is character edit distance over reference "
        "length; vision-label top-1 is how often a visual token's own logits name its word.",
        "",
        "Files: `curves.png` (learning curves of every evaluation, band = seed spread), `lens.png` (visual logit "
        "lens of both final models on one held-out page), `results.json` (every evaluation), `sft/` and "
        "`dvsft/` (final models of the first seed; `dvsft eval` and `dvsft lens` accept them).",
    ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def results_summary(rows: list[dict]) -> dict[str, Any]:
    """The summary, margins and verdict as results.json stores them."""
    margins = per_seed_margins(rows)
    return {
        "summary": summarize(rows, METHODS, KEYS),
        "margins": margins,
        "dvsft_wins_every_seed": (
            all(m["text"] > 0 and m["random"] > 0 and m["swap"] > 0 for m in margins) if margins else None
        ),
    }
