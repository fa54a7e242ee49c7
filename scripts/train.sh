#!/usr/bin/env bash
# VIAR-d30 (5 pre + 1 implicit + 5 post blocks), ImageNet 256x256, one node with 8 GPUs: the README's command.
#
#   bash scripts/train.sh                                   # as published (edit DATA_PATH below first), or
#   bash scripts/train.sh --data_path=/data/imagenet-1k     # extra flags are appended and override the ones below
#
# Needs ckpts/vae_ch160v4096z32.pth (https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth).
# Outputs go to local_output/; running the same command again resumes from local_output/ar-ckpt-last.pth.
# DataLoader workers: train.py's default, min(8, CPUs per GPU process) (--workers=N to change).
# Out of GPU memory (80 GB cards hold this recipe only at small n1): add --grad_ckpt=True (activation checkpointing,
# same gradients) and/or --ac=2 (the same 512-image step in two halves).
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then     # the header above is the usage
  sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "Flags: python train.py --help"
  exit 0
fi
set -e
cd "$(dirname "$0")/.."
DATA_PATH=/path/to/imagenet-1k

# a wrong --data_path stops here, in one line, before torchrun starts 8 processes (the last --data_path given wins)
data_path=$DATA_PATH
prev=
for arg in "$@"; do
  case "$arg" in --data_path=*) data_path=${arg#--data_path=} ;; esac
  if [ "$prev" = --data_path ]; then data_path=$arg; fi
  prev=$arg
done
"${PYTHON:-python3}" -m utils.data_layout "$data_path" scripts/train.sh || exit 1

# d30, 256x256
exec torchrun \
  --nnodes=1 \
  --node_rank=0 \
  --nproc_per_node=8 \
  --master_addr=127.0.0.1 \
  --master_port=7777 \
  train.py \
  --data_path="$DATA_PATH" \
  --depth=30 \
  --bs=512 \
  --ep=550 \
  --tblr=8e-5 \
  --fp16=1 \
  --alng=1e-5 \
  --wpe=0.01 \
  --twde=0.08 \
  --use_implicit=True \
  --p_depth=5 \
  "$@"
