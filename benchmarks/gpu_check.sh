#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU (after scripts/setup.sh):
#
#   bash benchmarks/gpu_check.sh                      # DATA_DIR=/path/with/cifar10 adds ResNet-18
#
# 1. the tests that need a GPU, or train on it when there is one: clients sharing one GPU at
#    fractional --gpus-per-client under Ray (tests/test_gpu.py), every algorithm federated in
#    process on CUDA (tests/test_algorithms.py, tests/test_strategy.py, tests/test_rounds.py);
# 2. the CUDA step check and low-bit / fp32 step ratios (benchmarks/gpu_step.py);
# 3. the quickstart at 0.25 GPU a client: round times, per-client GPU peak memory and the server's
#    per-phase split (benchmarks/round_costs.py -> benchmarks/results/gpu_round_costs_*.json);
# 4. with CIFAR-10 in DATA_DIR: two rounds of the ResNet-18 Table 1 setup (Fed-QSSL, seed 0), likewise.
# Record what it prints in docs/BENCHMARKS.md ("Still to be measured on a GPU box").
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=${OUT_DIR:-results/gpu-check}
"$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
    "gpu_check: torch sees no GPU on this machine; run it where there is one")'

"$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_algorithms.py tests/test_strategy.py tests/test_rounds.py
"$python" benchmarks/gpu_step.py
"$python" simulation.py --gpus-per-client 0.25 --output-dir "$out/quickstart"
"$python" benchmarks/round_costs.py "$out/quickstart" \
    --output benchmarks/results/gpu_round_costs_quickstart.json
if [ -n "${DATA_DIR:-}" ]; then
  "$python" simulation.py configs/cifar10-table1.yaml --compare fedqssl --seeds 0 \
      --gpus-per-client 0.25 --set num-rounds=2 --set data-dir="$DATA_DIR" --output-dir "$out/resnet18"
  "$python" benchmarks/round_costs.py "$out/resnet18/fedqssl/seed-0" \
      --output benchmarks/results/gpu_round_costs_resnet18.json
fi
