# Shared by the deploy scripts: the venv's Flower, offline variables, argument helpers.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${FLWR_BIN:-$root/.venv/bin}
[ -x "$bin/flower-superlink" ] || { echo "Flower not found in $bin: run bash scripts/setup.sh (or set FLWR_BIN)" >&2; exit 1; }
export PATH="$bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
keys=${FEDQSSL_KEYS:-$root/deploy-keys}
insecure=0
need() {  # need FILE WHAT: fail with the fix when a key file is missing
  [ -f "$1" ] || { echo "missing $2: $1 (run bash scripts/deploy/make-keys.sh first, or pass --keys DIR)" >&2; exit 1; }
}
whole() {  # whole WHAT VALUE: VALUE must be digits only (bash arithmetic would run $(...) in it)
  [[ $2 =~ ^[0-9]+$ ]] || { echo "$(basename "$0"): $1 must be a whole number, got '$2'" >&2; exit 2; }
}
plain_path() {  # plain_path WHAT VALUE: a path that can stand inside --node-config's quotes
  [[ $2 != *'"'* && $2 != *'\'* ]] || { echo "$(basename "$0"): $1 may not hold a quote or a backslash: '$2'" >&2; exit 2; }
}
