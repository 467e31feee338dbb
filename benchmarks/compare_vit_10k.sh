#!/usr/bin/env bash
# The ViT claim on the full test set: STARFISH vs kd vs nmse at 50% and 75% sparsity, scored on all
# 10,000 test images (the main grid, compare_healers.sh, uses a class-balanced 5,000 to fit a
# shared 2-core machine). Same protocol otherwise: 200 calibration images, seed 0, default budget.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${STARFISH_SHARED:-../shared}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
starfish compare --model cifar10-vit --weights "$SHARED/models/vit_cifar10_smmk47.pth" \
  --calib "$SHARED/data/cifar10/train" --calib-size 200 \
  --eval "$SHARED/data/cifar10/test" --eval-size 10000 \
  --sparsities 0.5,0.75 --healers none,starfish,kd,nmse --seed 0 --no-progress \
  --out benchmarks/results/compare-cifar10-vit-10k --force
