#!/usr/bin/env bash
# Runs the test suite; installs requirements.txt first when something it needs is missing.
#   bash scripts/test.sh            # whole suite (about 10 minutes on 2 CPU cores)
#   bash scripts/test.sh -k golden  # extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" - <<'PY' 2>/dev/null
import importlib, sys
mods = ['torch', 'torchvision', 'numpy', 'scipy', 'PIL', 'tqdm', 'tensorboard', 'huggingface_hub', 'tensorflow', 'pytest']
sys.exit(0 if all(importlib.util.find_spec(m) for m in mods) else 1)
PY
then
  echo "[test.sh] installing requirements.txt ..."
  "$PY" -m pip install -q -r requirements.txt
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" -m pytest -q tests "$@"
