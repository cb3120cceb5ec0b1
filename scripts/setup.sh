#!/usr/bin/env bash
# Build fedqssl's environment from nothing: Debian's offline Fashion-MNIST package and a virtual
# environment (.venv) with the pinned torch/torchvision/flwr and the dev tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the offline Fashion-MNIST, and a C++ compiler and ninja for the low-bit step's
# fused kernels (common/lowbit/kernel.py; without them the same numbers, slower)
packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
command -v c++ >/dev/null || packages+=(g++)
command -v ninja >/dev/null || packages+=(ninja-build)
if [ ${#packages[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${packages[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq "${packages[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "fedqssl needs Python >= 3.11 (flwr 1.41 does); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "==> installing fedqssl and its pinned dependencies into .venv (torch is large: minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c 'import common, torch, torchvision, flwr; print("==> ready: torch", torch.__version__, "flwr", flwr.__version__)'
echo "==> building the low-bit step's fused kernels (once per Python environment, ~30 s)"
.venv/bin/python -c 'from common.lowbit import kernel; import sys; sys.exit(kernel.compiled() is None)' \
  || echo "==> the fused kernels did not build: training runs its tensor ops (the same numbers, slower)"
