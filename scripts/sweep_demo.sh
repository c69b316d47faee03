#!/usr/bin/env bash
# The lambda / eps sweep behind the DV-SFT defaults (docs/training.md, "Defaults sweep").
# DV-SFT only (SFT does not depend on them), demo preset `cpu`, one seed each, two runs at a time.
# Usage: scripts/sweep_demo.sh [OUT_DIR] [SEED]
set -euo pipefail
out=${1:-runs/sweep}
seed_args=(--seeds 1)
configs=("0.1 0" "0.3 0" "1 0" "3 0" "1 0.1" "1 0.3")
run() { dvsft demo --methods dvsft --split val --workers 1 --threads 1 "${seed_args[@]}" --vision-lambda "$1" --vision-eps "$2" \
          --out "$out/lambda$1_eps$2" > "$out/lambda$1_eps$2.log" 2>&1; }
mkdir -p "$out"
for ((i = 0; i < ${#configs[@]}; i += 2)); do
  run ${configs[i]} & run ${configs[i+1]} & wait
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = []
for f in sorted(Path(sys.argv[1]).glob("*/results.json")):
    r = json.loads(f.read_text())
    p, s = r["preset"], r["summary"]["dvsft"]
    rows.append((p["vision_lambda"], p["vision_eps"], *(s[k]["mean"] for k in ("text_word_acc", "random_word_acc", "text_cer", "vision_top1"))))
print("| lambda | eps | running text word acc (%) | non-contextual word acc (%) | CER (%) | vision top-1 (%) |")
print("| --- | --- | --- | --- | --- | --- |")
for lam, eps, wa, ra, c, v in sorted(rows):
    print(f"| {lam} | {eps} | {100 * wa:.1f} | {100 * ra:.1f} | {100 * c:.1f} | {100 * v:.1f} |")
PY
