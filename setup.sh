#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with dvsft, its test, parity, TRL and DeepSpeed extras and lmms-eval.
# Takes the CPU build of PyTorch where no CUDA GPU is present (DVSFT_TORCH overrides the spec).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if [ -n "${DVSFT_TORCH:-}" ]; then
  pip install --quiet "$DVSFT_TORCH"
elif ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install --quiet torch
  else
    # A local CPU wheel is served for this exact version; otherwise use PyTorch's CPU index.
    pip install --quiet torch==2.13.0 2>/dev/null \
      || pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
DS_BUILD_OPS=0 pip install --quiet -e ".[test,parity,trl,deepspeed]"
# lmms-eval, the oracle of tests/test_lmms_eval_parity.py: without its dependencies (the parity extra
# holds the few its task code imports); keep the version equal to dvsft.evaluation.metrics.LMMS_EVAL_VERSION
pip install --quiet --no-deps "lmms-eval==0.7.3"
echo "dvsft installed in $(pwd)/.venv — activate with: . .venv/bin/activate"
