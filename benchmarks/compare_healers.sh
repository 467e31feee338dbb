#!/usr/bin/env bash
# Benchmark: every healer side by side on the shared CIFAR-10 ViT and ResNet-20 at 50/75/90% sparsity.
#
#   bash benchmarks/compare_healers.sh                 # both networks, one after the other
#   bash benchmarks/compare_healers.sh cifar10-vit     # one network (run two in parallel on 2 cores)
#
# Writes benchmarks/results/compare-<model>/. Protocol: per-layer uniform magnitude pruning of the
# block weights, once per sparsity; 200 calibration images drawn with seed 0 from
# shared/data/cifar10/train (labels used only by `finetune`); all 10,000 test images; the default
# STARFISH budget (Adam, lr 6e-4 -> 1e-6 cosine, batch 32, 10 epochs) shared by every trained
# healer. `varmatch+X` runs the variance-matching repair before healer X (what `starfish run`
# does by default on networks without BatchNorm). One CPU thread per run.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${STARFISH_SHARED:-../shared}"
EVAL_SIZE="${EVAL_SIZE:-10000}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
HEALERS="none,bn,varmatch,starfish,kd,nmse,finetune,varmatch+starfish,varmatch+kd,varmatch+nmse"

run() {  # model weights-file
  starfish compare --model "$1" --weights "$SHARED/models/$2" \
    --calib "$SHARED/data/cifar10/train" --calib-size 200 \
    --eval "$SHARED/data/cifar10/test" --eval-size "$EVAL_SIZE" \
    --sparsities 0.5,0.75,0.9 --healers "$HEALERS" --seed 0 --no-progress \
    --out "benchmarks/results/compare-$1" --force
}

case "${1:-all}" in
  cifar10-vit) run cifar10-vit vit_cifar10_smmk47.pth ;;
  cifar10-resnet20) run cifar10-resnet20 resnet20_akamaster.th ;;
  all) run cifar10-vit vit_cifar10_smmk47.pth; run cifar10-resnet20 resnet20_akamaster.th ;;
  *) echo "usage: $0 [cifar10-vit|cifar10-resnet20|all]" >&2; exit 2 ;;
esac
