#!/usr/bin/env bash
# Runs the test suite; first installs, at the versions of requirements-lock.txt, only the packages that are missing
# (an installed torch / torchvision is kept; TensorFlow is needed by the evaluator's tests).
#   bash scripts/test.sh                    # everything (the default)
#   bash scripts/test.sh -m "not slow"      # quick pass: without the end-to-end script runs
#   bash scripts/test.sh tests/test_docs.py # extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYTHON="$PY" LOG_PREFIX="[test.sh]" bash scripts/install_missing.sh \
  torch torchvision numpy scipy pillow tqdm tensorboard huggingface_hub safetensors tensorflow-cpu pytest gradio gradio_client selenium
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" -m pytest -q "$@"     # no path given: pyproject.toml's testpaths (tests/)
