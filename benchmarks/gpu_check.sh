#!/usr/bin/env bash
# The prepared GPU check, in one command, for a lent GPU machine (about 8 minutes):
#   1. `pytest -m gpu`: hundreds of steps in fp32, bf16 and fp16, exact mid-epoch resumes, no
#      host sync in the training step, evaluate and predict on the GPU;
#   2. benchmarks/gpu.sh: the blog's loop, the trainer and the README's launched command on real MNIST.
#
# Before sending the checkout, from the repository root, put MNIST where gpu.sh reads it
# (/data/ is git-ignored; gzipped it is 11 MB):
#   mkdir -p data/MNIST/raw && for f in ../shared/data/MNIST/raw/*-ubyte; do gzip -c "$f" > "data/MNIST/raw/$(basename "$f").gz"; done
# and carry `data` along. On the machine, from the repository root:
#   bash benchmarks/gpu_check.sh
# Logs and the benchmark's JSON go to $OUT when it is set (the device tool), else benchmarks/results.
# Environment: PYTHON (python3), EPOCHS (10), ROUNDS (1), BUDGET_S (240, the benchmark's share).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
RESULTS_DIR=${OUT:-benchmarks/results}
mkdir -p "$RESULTS_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRAINER_OFFLINE=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"

start=$(date +%s)
timeout -k 20 240 "$PYTHON" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts="-ra --durations=0" \
  2>&1 | tee "$RESULTS_DIR/pytest-gpu.log"
tests=$?
echo "pytest -m gpu: exit $tests after $(($(date +%s) - start)) s"

EPOCHS=${EPOCHS:-10} ROUNDS=${ROUNDS:-1} BUDGET_S=${BUDGET_S:-240} RESULTS_DIR="$RESULTS_DIR" PYTHON="$PYTHON" \
  bash benchmarks/gpu.sh
bench=$?
echo "gpu.sh: exit $bench after $(($(date +%s) - start)) s in all"
exit $((tests || bench))
