#!/usr/bin/env bash
# The benchmark on a one-GPU machine without internet: the blog's loop, the trainer in-process and
# the README's `accelerate launch` command, EPOCHS (10) epochs per round, ROUNDS (2) rounds, on
# CUDA. Prints compare.py's table; the JSON and the log go to RESULTS_DIR.
#
# Nothing is installed: it needs a python3 with torch (CUDA), torchvision, accelerate, rich and
# safetensors, and imports `trainer` from this checkout (PYTHONPATH), installed or not.
#
# MNIST must travel with the checkout. Before sending it, from the repository root:
#   mkdir -p data/MNIST/raw && cp ../shared/data/MNIST/raw/*-ubyte data/MNIST/raw/    # /data/ is git-ignored
# (55 MB; or gzip the four files in place, 11 MB: the script unpacks *.gz into a scratch folder).
# Then, on the GPU machine, from the repository root:
#   bash benchmarks/gpu.sh [extra compare.py flags, e.g. --mixed-precision bf16 --compile]
# Environment: DATA_DIR (data), EPOCHS (10), ROUNDS (2), BUDGET_S (270: compare.py is stopped
# then and prints what it has), RESULTS_DIR (benchmarks/results), PYTHON (python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATA_DIR=${DATA_DIR:-data}
EPOCHS=${EPOCHS:-10}
ROUNDS=${ROUNDS:-2}
BUDGET_S=${BUDGET_S:-270}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
PYTHON=${PYTHON:-python3}
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

raw="$DATA_DIR/MNIST/raw"
need_unpack=0
for f in "${FILES[@]}"; do
  if [[ ! -f "$raw/$f" ]]; then
    if [[ -f "$raw/$f.gz" ]]; then
      need_unpack=1
    else
      echo "error: $raw/$f not found: copy the four MNIST IDX files there first (see the top of $0)" >&2
      exit 2
    fi
  fi
done
if ((need_unpack)); then
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/mnist-bench.XXXXXX")
  trap 'rm -rf "$scratch"' EXIT
  mkdir -p "$scratch/MNIST/raw"
  for f in "${FILES[@]}"; do
    if [[ -f "$raw/$f" ]]; then
      cp "$raw/$f" "$scratch/MNIST/raw/$f"
    else
      gunzip -c "$raw/$f.gz" >"$scratch/MNIST/raw/$f"
    fi
  done
  DATA_DIR=$scratch
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TRAINER_OFFLINE=1 HF_HUB_OFFLINE=1

"$PYTHON" - <<'EOF'
import importlib.util
import sys

missing = [m for m in ("torch", "torchvision", "accelerate", "rich", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: missing Python packages {', '.join(missing)}; this script installs nothing")
import torch

if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}")
EOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
fi

mkdir -p "$RESULTS_DIR"
stamp=$(date +%Y%m%d-%H%M%S)
status=0
timeout -s TERM -k 30 "$BUDGET_S" "$PYTHON" benchmarks/compare.py \
  --device cuda --data-dir "$DATA_DIR" --epochs "$EPOCHS" --rounds "$ROUNDS" \
  --json "$RESULTS_DIR/gpu-$stamp.json" "$@" \
  2>&1 | tee "$RESULTS_DIR/gpu-$stamp.log" || status=$?
exit "$status"
