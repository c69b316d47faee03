"""Time the edit-distance and LCS metrics of two source trees on the same seeded pairs (docs/BENCHMARKS.md).

Usage: python scripts/bench_metrics.py BASE_SRC NEW_SRC [--runs 3] [--pairs 1000]
Each tree is timed in its own Python process (PYTHONPATH=TREE), alternately, ``--runs`` times; the
table gives the median wall and CPU seconds per workload and the ratios base / new. The scores of
both trees must agree to the last digit, or the script fails.

Workloads (what the evaluation scores per item):
  ocr    ``benchmarks._ocr_row`` (CER and word accuracy of ``dvsft eval --bench ocr``): 200-600 character
         pages of the bundled prose and of frequency-sampled words (half each, as ``dvsft ocr`` builds them),
         each against an imperfect transcription (0-100% character errors, 10% cut short)
  anls   ``metrics.anls`` on DocVQA-length answers (1-4 words, 1-3 ground truths)
  rouge  ``rouge_l`` on region-task phrases (1-10 words)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time


def corrupt(text: str, rng: random.Random, rate: float) -> str:
    """A model's imperfect reading: substituted, dropped and inserted characters at ``rate``; sometimes cut short."""
    out = []
    for ch in text:
        r = rng.random()
        if r < rate / 3:
            out.append(rng.choice("abcdefghijklmnopqrstuvwxyz .,"))
        elif r < 2 * rate / 3:
            continue
        elif r < rate:
            out.extend((ch, rng.choice("abcdefghijklmnopqrstuvwxyz ")))
        else:
            out.append(ch)
    pred = "".join(out)
    return pred[: rng.randint(0, len(pred))] if rng.random() < 0.1 else pred


def workloads(n: int) -> dict[str, list]:
    from dvsft.evaluation.ocr_tasks import contextual_texts, noncontextual_texts, read_corpus

    rng = random.Random(0)
    docs = read_corpus(None)
    pages = contextual_texts(docs, n // 2, rng) + noncontextual_texts(docs, n - n // 2, rng)
    rates = (0.0, 0.02, 0.1, 0.3, 1.0)
    ocr = [(corrupt(t, rng, rng.choice(rates)), t) for t in pages]
    words = " ".join(docs).split()

    def phrase(lo: int, hi: int) -> str:
        k = rng.randint(lo, hi)
        i = rng.randrange(len(words) - k)
        return " ".join(words[i : i + k])

    anls = []
    for _ in range(2 * n):
        gts = [phrase(1, 4) for _ in range(rng.randint(1, 3))]
        anls.append((corrupt(gts[0], rng, rng.choice(rates)), gts))
    rouge = [(corrupt(p, rng, rng.choice(rates)), p) for p in (phrase(1, 10) for _ in range(2 * n))]
    return {"ocr": ocr, "anls": anls, "rouge": rouge}


def child(n: int) -> None:
    from dvsft.evaluation import benchmarks
    from dvsft.evaluation import metrics as M

    score = {
        "ocr": lambda p, r: sum(benchmarks._ocr_row(p, {"answers": [r]}, "lmms-eval").values()),
        "anls": M.anls,
        "rouge": M.rouge_l,
    }
    result = {}
    for name, pairs in workloads(n).items():
        wall, cpu = time.perf_counter(), time.process_time()
        total = sum(score[name](p, r) for p, r in pairs)
        result[name] = {
            "wall": time.perf_counter() - wall,
            "cpu": time.process_time() - cpu,
            "pairs": len(pairs),
            "total": repr(total),
        }
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="src folder of the baseline tree")
    ap.add_argument("new", help="src folder of the tree to compare")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=1000, help="OCR pages (anls and rouge get twice as many pairs)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.pairs)
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    for _ in range(args.runs):
        for label in runs:
            src = os.path.abspath(getattr(args, label))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
            cmd = [sys.executable, __file__, args.base, args.new, "--child", "--pairs", str(args.pairs)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            runs[label].append(json.loads(out))
            print(label, out.strip(), file=sys.stderr)
    cols = "workload   pairs  base wall  base cpu  new wall  new cpu  ratio wall  ratio cpu"
    print(cols)
    for name in runs["base"][0]:
        totals = {r[name]["total"] for label in runs for r in runs[label]}
        if len(totals) != 1:
            sys.exit(f"{name}: the trees score differently: {sorted(totals)}")
        med = {
            (label, k): statistics.median(r[name][k] for r in runs[label]) for label in runs for k in ("wall", "cpu")
        }
        print(
            f"{name:8} {runs['base'][0][name]['pairs']:>6} {med['base', 'wall']:>10.3f} {med['base', 'cpu']:>9.3f} "
            f"{med['new', 'wall']:>9.3f} {med['new', 'cpu']:>8.3f} {med['base', 'wall'] / med['new', 'wall']:>10.1f}x"
            f" {med['base', 'cpu'] / med['new', 'cpu']:>9.1f}x"
        )


if __name__ == "__main__":
    main()
