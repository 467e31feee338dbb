#!/usr/bin/env bash
# The GPU path in one prepared run (< 8 minutes on one H100): heal steps of randomly initialised
# Llama-3.2-1B and Llama-2-7B shapes, and Wanda + SparseGPT calibration on the 1B; writes benchmarks/GPU.md.
# Usage: bash benchmarks/gpu_check.sh [--tiny] [extra gpu_check.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-src}"
exec timeout 470 python benchmarks/gpu_check.py "$@"
