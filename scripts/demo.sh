#!/usr/bin/env bash
# The laptop demo: procedural data -> tiny tokenizer -> tiny VIAR -> class-conditional grids -> classifier score.
# CPU only, no download (besides installing requirements.txt once on a fresh machine).
#   bash scripts/demo.sh                  # everything in demo_output/
#   bash scripts/demo.sh --out my_demo    # flags go to demo.py (python demo.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, torchvision, numpy, scipy, PIL, tqdm, tensorboard" >/dev/null 2>&1; then
    echo "[demo.sh] installing requirements.txt (first run on this machine)"
    "$PY" -m pip install -r requirements.txt || {
        echo "[demo.sh] error: 'pip install -r requirements.txt' failed; install the packages it lists, then rerun" >&2
        exit 1
    }
fi
exec "$PY" demo.py "$@"
