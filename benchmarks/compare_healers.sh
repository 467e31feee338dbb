#!/usr/bin/env bash
# Benchmark: every healer side by side on the shared CIFAR-10 ViT and ResNet-20 at 50/75/90% sparsity.
#
#   bash benchmarks/compare_healers.sh            # writes benchmarks/results/compare-<model>/
#
# Protocol: per-layer uniform magnitude pruning of the block weights; 200 calibration images drawn
# with seed 0 from shared/data/cifar10/train (labels used only by `finetune`); a class-balanced
# 5,000-image subset of the test split (seed 0) for evaluation, to fit a shared 2-core machine
# (EVAL_SIZE=10000 for the full split; compare_vit_10k.sh checks the ViT claim on all 10,000);
# the default STARFISH budget (Adam, lr 6e-4 -> 1e-6 cosine, batch 32, 10 epochs) shared by
# every trained healer. One CPU thread so runs do not oversubscribe a shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${STARFISH_SHARED:-../shared}"
EVAL_SIZE="${EVAL_SIZE:-5000}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"

# none, the forward-only repairs bn and varmatch (when starfish.repair is installed), then the
# trained healers (finetune is the only one that uses labels).
REPAIRS="$(python -c 'from starfish.compare import available_repairs as a; print(",".join(r for r in a() if r in ("bn", "varmatch")))')"
HEALERS="none${REPAIRS:+,$REPAIRS},starfish,kd,nmse,finetune"

run() {  # model weights-file
  starfish compare --model "$1" --weights "$SHARED/models/$2" \
    --calib "$SHARED/data/cifar10/train" --calib-size 200 \
    --eval "$SHARED/data/cifar10/test" --eval-size "$EVAL_SIZE" \
    --sparsities 0.5,0.75,0.9 --healers "$HEALERS" --seed 0 --no-progress \
    --out "benchmarks/results/compare-$1" --force
}

run cifar10-vit vit_cifar10_smmk47.pth
run cifar10-resnet20 resnet20_akamaster.th
