#!/usr/bin/env bash
# The GPU check, the first thing to run on a lent GPU machine, on its image as it is (its own
# python3 and torch; flwr and Ray not needed). Everything lands in OUT (default results/gpu-check):
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--python PY] [--step-timeout S]
#   bash benchmarks/gpu_check.sh --dry-run        # any machine: the plan and the test selection
#
# The steps and their goals: benchmarks/gpu_check.py. Each step reports and the check goes on.
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
