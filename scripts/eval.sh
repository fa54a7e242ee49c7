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
#
# FlexVAR (github jiaosiyu1999/FlexVAR): FLEXVAR=d16|d20|d24 evaluates the published ckpts/FlexVAR{d}-epo*.pth on
# ckpts/FlexVAE.pth (both downloaded when missing) with the official evaluation settings (README, scripts/
# evaluate_c2i.sh, eval_c2i.py: top_k 900, top_p 0.95, max_pn 16, VAR's guidance ramp; cfg 2.5, 3.0 at 512 px) and
# any schedule INFER_PN (default 256 = 1_2_3_4_5_6_8_10_13_16; 512 = the zero-shot 1_2_3_4_5_6_7_8_9_10_12_14_16_23_32,
# against the 512 px reference batch); images go to samples/flexvar-d{depth}-{ckpt}-pn{schedule}-cfg-{cfg}-maxpn-16-seed-1/:
#   FLEXVAR=d24 bash scripts/eval.sh                                              # 10 steps, 256 px
#   FLEXVAR=d20 INFER_PN=1_2_3_4_5_6_7_8_9_10_12_14_16 bash scripts/eval.sh       # 13 steps (zero-shot)
#   FLEXVAR=d20 INFER_PN=512 bash scripts/eval.sh                                 # 512 px (zero-shot)
# Environment: REF_BATCH (reference batch, default below), NPROC (processes, default 1), MASTER_PORT, PYTHON;
# FlexVAR: FLEXVAR, INFER_PN, CFG.
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then     # the header above is the usage
  sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  :
  exit 0
fi
set -euo pipefail
REF_BATCH=${REF_BATCH:+$(realpath -m -- "$REF_BATCH")}     # a path given by the caller is relative to their folder
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
NPROC=${NPROC:-1}
FLEXVAR=${FLEXVAR:-}
# the model, its tokenizer and the evaluation settings come from the registry of published models (utils/zoo.py):
# the resolution, the .npz sampling.py packs, then sampling.py's arguments, one a line; a bad setting is one line
ZOO_PY=python3
command -v python3 > /dev/null || ZOO_PY=$PY
if [ -n "$FLEXVAR" ]; then
  SETTINGS=$("$ZOO_PY" -m utils.zoo eval-args --flexvar "$FLEXVAR" --infer_pn "${INFER_PN:-256}" ${CFG:+--cfg "$CFG"}) \
    || exit 1
else
  SETTINGS=$("$ZOO_PY" -m utils.zoo eval-args) || exit 1
fi
mapfile -t SETTINGS <<< "$SETTINGS"
RESO=${SETTINGS[0]}
NPZ=${SETTINGS[1]}
SAMPLING_ARGS=("${SETTINGS[@]:2}")
if [ "$RESO" = 512 ]; then
  REF_BATCH=${REF_BATCH:-data/VIRTUAL_imagenet512.npz}
  REF_URL=https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/VIRTUAL_imagenet512.npz
else
  REF_BATCH=${REF_BATCH:-data/VIRTUAL_imagenet256_labeled.npz}
  REF_URL=https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
fi

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

# VIAR-d30 (the default) or FlexVAR (FLEXVAR=d16|d20|d24, see the top). VAR-d30 is evaluated the same way:
#   "${LAUNCH[@]}" sampling.py --ckpt_path ckpts/var_d30.pth --vae_ckpt ckpts/vae_ch160v4096z32.pth --cfg 1.5 \
#       --depth 30 --sample_dir samples
#   "$PY" evaluator.py "$REF_BATCH" samples/d30-var_d30.pth-cfg-1.5-seed-1.npz
"${LAUNCH[@]}" sampling.py "${SAMPLING_ARGS[@]}"

"$PY" evaluator.py "$REF_BATCH" "$NPZ"
