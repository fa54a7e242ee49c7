#!/usr/bin/env bash
# The laptop demo: procedural shapes -> tokenizer -> VIAR -> grids under three iteration schedules -> images/s,
# classifier score and zero-shot editing; about 5 min on 2 CPU cores (docs/demo.md).
# CPU only, no download besides, on a fresh machine, the packages it needs that are missing (pinned in
# requirements-lock.txt; an installed torch / torchvision is kept; no TensorFlow).
#   bash scripts/demo.sh                  # everything in demo_output/
#   bash scripts/demo.sh --out my_demo    # flags go to demo.py (python demo.py --help)
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then     # the header above is the usage
  sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo; "${PYTHON:-python3}" "$(dirname "$0")/../demo.py" --help
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PYTHON="$PY" LOG_PREFIX="[demo.sh]" bash scripts/install_missing.sh torch torchvision numpy pillow tqdm tensorboard
exec "$PY" demo.py "$@"
