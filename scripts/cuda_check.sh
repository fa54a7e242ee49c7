#!/usr/bin/env bash
# The CUDA checks in one go (docs/performance.md has the results): the CUDA test module, the fp16 sampling benchmark
# of VAR-d30 and VIAR-d30 at the published widths (with the paper's VIAR/VAR ratios), and VIAR-d30's training step
# at B = 16 for n1 = 1, 4, 12 with and without activation checkpointing.  About 5 min on one H200.
#   bash scripts/cuda_check.sh              # logs and JSON in cuda_check/
#   bash scripts/cuda_check.sh OUT_DIR
# Exit status 1 when a part failed (every part runs anyway, each under its own time limit).
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-cuda_check}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
rc=0
part() {    # part NAME SECONDS COMMAND...: output to the terminal and to OUT/NAME.txt
  local name=$1 secs=$2; shift 2
  echo "=== $name: $*"
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.txt" || { echo "=== $name FAILED (status ${PIPESTATUS[0]})"; rc=1; }
}
part gpu 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; $PY -c \
'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, torch.cuda.get_device_name())'"
part test_cuda 200 "$PY" -m pytest -q -rsP -p no:cacheprovider tests/test_cuda.py
part bench_sampling 220 "$PY" -m scripts.bench --device cuda --dtype fp16 --models var_d30,viar_d30 \
  --batch_sizes 16,64 --train_models none --matmul_n 8192 --json "$OUT/bench_sampling.json"
part bench_training 130 "$PY" -m scripts.bench --device cuda --dtype fp16 --models none --train_models viar_d30 \
  --train_bs 16 --train_grid 5-1,5-4,5-12,0-1,10-1 --train_grad_ckpt off,on --matmul_n 8192 \
  --json "$OUT/bench_training.json"
exit $rc
