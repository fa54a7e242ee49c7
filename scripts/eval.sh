#!/usr/bin/env bash
# FID evaluation of VIAR-d30 on ImageNet 256x256: the README's commands.
#
#   bash scripts/eval.sh                  # 50,000 samples (50 per class), then evaluator.py
#   NPROC=8 bash scripts/eval.sh          # the same images, sampled by torchrun on 8 GPUs
#
# 1. sampling.py writes samples/implicit-viar.pth-cfg-1.5-seed-1/{000000..049999}.png and packs them into
#    samples/implicit-viar.pth-cfg-1.5-seed-1.npz; rerunning the script resumes (finished PNGs are kept).
#    Missing checkpoints (ckpts/viar.pth, ckpts/vae_ch160v4096z32.pth) are downloaded from Hugging Face.
# 2. evaluator.py prints Inception Score, FID, sFID, Precision and Recall against the ADM reference batch.
#
# Fewer implicit iterations per scale (faster sampling): change --iter_left / --iter_right below (scale k of 10
# runs int(linspace(iter_left, iter_right, 10)[k]) iterations; 10/10 is the paper's setting).
# Environment: REF_BATCH (reference batch, default below), NPROC (processes, default 1), MASTER_PORT, PYTHON.
set -euo pipefail
REF_BATCH=${REF_BATCH:+$(realpath -m -- "$REF_BATCH")}     # a path given by the caller is relative to their folder
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
REF_BATCH=${REF_BATCH:-data/VIRTUAL_imagenet256_labeled.npz}
REF_URL=https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
NPROC=${NPROC:-1}

# the reference batch is checked first: no point in sampling for hours and failing at the last step
if [ -d "$REF_BATCH" ]; then
  echo "error: reference batch $(realpath -m -- "$REF_BATCH") is a directory: set REF_BATCH to the .npz file" >&2
  exit 1
fi
if [ ! -f "$REF_BATCH" ]; then
  ABS=$(realpath -m -- "$REF_BATCH")
  echo "error: reference batch $ABS not found: download it with" \
       "\`mkdir -p $(dirname "$ABS") && wget -O $ABS $REF_URL\` (or set REF_BATCH=/path/to/it)" >&2
  exit 1
fi

if [ "$NPROC" -gt 1 ]; then
  LAUNCH=("$PY" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NPROC" --master_addr=127.0.0.1
          --master_port="${MASTER_PORT:-7778}")
else
  LAUNCH=("$PY")
fi

# For VAR
# "${LAUNCH[@]}" sampling.py \
#     --ckpt_path ckpts/var_d30.pth \
#     --vae_ckpt ckpts/vae_ch160v4096z32.pth \
#     --cfg 1.5 \
#     --depth 30 \
#     --sample_dir samples
#
# "$PY" evaluator.py \
#     "$REF_BATCH" \
#     samples/d30-var_d30.pth-cfg-1.5-seed-1.npz


# For VIAR
"${LAUNCH[@]}" sampling.py \
    --ckpt_path ckpts/viar.pth \
    --vae_ckpt ckpts/vae_ch160v4096z32.pth \
    --cfg 1.5 \
    --depth 30 \
    --sample_dir samples \
    --use_implicit True \
    --iter_left 10 \
    --iter_right 10

"$PY" evaluator.py \
    "$REF_BATCH" \
    samples/implicit-viar.pth-cfg-1.5-seed-1.npz
